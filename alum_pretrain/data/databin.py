"""A prepared corpus ("data-bin"), as written by ``alum-prep`` and read by both engines.

Layout (fairseq ``data-bin`` convention, one shard per epoch in fairseq's ``DATA=bin/shard0:bin/shard1``)::

    OUT/
      manifest.json          what was done: inputs (size, sha256), tokenizer, counts, shards, command, version
      dict.txt               fairseq dictionary: every tokenizer token in id order, "<token> <count>"
      tokenizer/             a HuggingFace tokenizer folder (``AutoTokenizer.from_pretrained(OUT/tokenizer)``)
      shard0/train.bin .idx .doc.npy
      shard0/valid.bin .idx .doc.npy
      shard0/dict.txt        a copy of dict.txt: stock fairseq loads the dictionary from the first shard path
      shard1/...

Token ids on disk are **fairseq dictionary ids**: ``disk_id = tokenizer_id + id_offset`` with
``id_offset = 4`` (fairseq's ``Dictionary`` puts ``<s> <pad> </s> <unk>`` at 0..3 before the symbols of
``dict.txt``).  So fairseq tasks read the files unchanged, and the native engine subtracts the offset
(:meth:`DataBin.split` returns a view that does it).  One item = one sentence (no EOS appended); the
``.doc.npy`` side file gives document boundaries (see :mod:`alum_pretrain.data.indexed`).

``manifest.json`` keys read here: ``format_version``, ``id_offset``, ``num_shards``, ``splits``,
``tokenizer`` (``{"kind", "vocab_size", "special_ids": {"cls","sep","mask","pad","unk", ...}}``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .indexed import MMapIndexedDataset

MANIFEST = "manifest.json"
FAIRSEQ_NSPECIAL = 4  # <s> <pad> </s> <unk>


class OffsetDataset:
    """An :class:`MMapIndexedDataset` whose items come back as int64 tokenizer ids (disk id - offset)."""

    def __init__(self, ds: MMapIndexedDataset, offset: int):
        self.ds = ds
        self.offset = offset
        self.sizes = ds.sizes
        self.doc_starts = ds.doc_starts

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.ds[i].astype(np.int64) - self.offset

    @property
    def num_docs(self) -> int:
        return self.ds.num_docs


@dataclass
class DataBin:
    """Open a data-bin folder: ``DataBin("data-bin")``."""

    path: Path

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.exists():
            raise FileNotFoundError(
                f"{mpath}: not found — {self.path} is not a data-bin written by alum-prep "
                "(run `alum-prep INPUT --out DIR ...` first)"
            )
        with open(mpath, encoding="utf-8") as fh:
            self.manifest = json.load(fh)
        if self.manifest.get("status", "complete") != "complete":
            raise ValueError(f"{mpath}: preparation did not finish (status {self.manifest.get('status')!r}); re-run alum-prep")
        self.id_offset = int(self.manifest.get("id_offset", FAIRSEQ_NSPECIAL))
        self.num_shards = int(self.manifest["num_shards"])
        tok = self.manifest["tokenizer"]
        self.vocab_size = int(tok["vocab_size"])
        self.special_ids: dict[str, int] = {k: int(v) for k, v in tok["special_ids"].items()}

    def shard_dir(self, shard: int) -> Path:
        if not 0 <= shard < self.num_shards:
            raise ValueError(f"{self.path}: shard {shard} does not exist (the data-bin has {self.num_shards})")
        return self.path / f"shard{shard}"

    def split(self, shard: int, split: str = "train") -> OffsetDataset:
        """Items of ``split`` in ``shard`` as tokenizer ids."""
        return OffsetDataset(MMapIndexedDataset(self.shard_dir(shard) / split), self.id_offset)

    def has_split(self, shard: int, split: str) -> bool:
        prefix = self.shard_dir(shard) / split
        return Path(f"{prefix}.idx").exists()

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    def tokenizer(self):
        """The HuggingFace fast tokenizer the corpus was encoded with (imports transformers)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.tokenizer_dir))
