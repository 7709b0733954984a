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

``manifest.json`` is read only by :func:`load_manifest`; keys read here: ``format_version``, ``status``,
``id_offset``, ``num_shards``, ``shards``, ``tokenizer`` (``{"kind", "vocab_size", "special_ids":
{"cls","sep","mask","pad","unk", ...}}``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .indexed import MMapIndexedDataset

MANIFEST = "manifest.json"
FORMAT_VERSION = 1  # of manifest.json and the layout it describes
FAIRSEQ_NSPECIAL = 4  # <s> <pad> </s> <unk>: the id offset of data-bins whose manifest does not record one


class DataIntegrityError(ValueError):
    """A data-bin file does not hold what its manifest says (the message names shard, split and item)."""


class OffsetDataset:
    """An :class:`MMapIndexedDataset` whose items come back as int64 tokenizer ids (disk id - offset).

    With ``vocab_size``, every item is range-checked on read (one NumPy reduction over a sentence): an id
    outside ``[0, vocab_size)`` - a ``.bin`` overwritten by another tool, a bit flip - raises
    :class:`DataIntegrityError` naming the shard, split and item instead of an IndexError in the model."""

    def __init__(self, ds: MMapIndexedDataset, offset: int, vocab_size: int | None = None, where: str = ""):
        self.ds = ds
        self.offset = offset
        self.vocab_size = vocab_size
        self.where = where or ds.prefix
        self.sizes = ds.sizes
        self.doc_starts = ds.doc_starts

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> np.ndarray:
        tok = self.ds[i].astype(np.int64) - self.offset
        # one reduction for both bounds: a negative id viewed as uint64 is >= 2**63
        if self.vocab_size is not None and tok.size and tok.view(np.uint64).max() >= self.vocab_size:
            bad = int(tok.max()) if tok.max() >= self.vocab_size else int(tok.min())
            raise DataIntegrityError(
                f"{self.where} item {i}: token id {bad} is outside the vocabulary [0, {self.vocab_size}) "
                f"(disk id {bad + self.offset}); the .bin was overwritten or corrupted - re-run alum-prep, or "
                "check it with --data.verify=full")
        return tok

    @property
    def num_docs(self) -> int:
        return self.ds.num_docs


def load_manifest(root: str | os.PathLike) -> dict:
    """The parsed ``ROOT/manifest.json`` of a data-bin, in any state (a running ``alum-prep`` included).

    The one reader of the file: FileNotFoundError when it is missing, ValueError naming the file when it is
    not JSON, not a JSON object, or has a ``format_version`` this version cannot read."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found — {Path(root)} is not a data-bin written by alum-prep "
                                "(run `alum-prep INPUT --out DIR ...` first)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the file is damaged — re-run alum-prep") from e
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: not a JSON object (a {type(manifest).__name__}); re-run alum-prep")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version!r}, but this alum-pretrain reads format_version "
                         f"{FORMAT_VERSION} (written by another version of alum-prep, or by another tool); "
                         "re-run alum-prep with this version")
    return manifest


@dataclass
class DataBin:
    """Open a complete data-bin folder: ``DataBin("data-bin")``."""

    path: Path

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest = load_manifest(self.path)
        mpath = self.path / MANIFEST
        if self.manifest.get("status", "complete") != "complete":
            raise ValueError(f"{mpath}: preparation did not finish (status {self.manifest.get('status')!r}); re-run alum-prep")
        try:
            self.id_offset = int(self.manifest.get("id_offset", FAIRSEQ_NSPECIAL))
            self.num_shards = int(self.manifest["num_shards"])
            tok = self.manifest["tokenizer"]
            self.vocab_size = int(tok["vocab_size"])
            self.special_ids: dict[str, int] = {k: int(v) for k, v in tok["special_ids"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{mpath}: missing or malformed entry ({type(e).__name__}: {e}); it needs num_shards, "
                             "id_offset and tokenizer.{vocab_size, special_ids} — re-run alum-prep") from e

    def shard_dir(self, shard: int) -> Path:
        if not 0 <= shard < self.num_shards:
            raise ValueError(f"{self.path}: shard {shard} does not exist (the data-bin has {self.num_shards})")
        return self.path / f"shard{shard}"

    def split(self, shard: int, split: str = "train") -> OffsetDataset:
        """Items of ``split`` in ``shard`` as tokenizer ids (range-checked against the vocabulary)."""
        return OffsetDataset(MMapIndexedDataset(self.shard_dir(shard) / split), self.id_offset, self.vocab_size,
                             where=f"{self.path}: shard {shard} split {split!r} ({self.shard_dir(shard) / split}.bin)")

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


def verify_databin(databin: DataBin, level: str = "size", log=None) -> int:
    """Check the shard files against ``manifest.json``: byte counts (``size``) or also SHA-256 (``full``).

    Returns the number of files checked; :class:`DataIntegrityError` naming the file and what differs.
    Data-bins whose manifest records no per-file sums (made by other tools) pass ``size`` (the reader
    still checks each ``.bin`` against its ``.idx``) but not ``full``, which has nothing to compare with."""
    import hashlib

    if level not in ("size", "full"):
        raise ValueError(f"--data.verify={level!r}: choose size or full")
    shards = databin.manifest.get("shards") or []
    checked = 0
    for rec in shards:
        if not isinstance(rec, dict) or "shard" not in rec:
            continue
        sdir = databin.path / f"shard{rec['shard']}"
        for split, srec in rec.items():
            files = srec.get("files") if isinstance(srec, dict) else None
            for name, want in (files or {}).items():
                p = sdir / name
                if not p.is_file():
                    raise DataIntegrityError(f"{p}: missing (shard {rec['shard']} split {split!r} in "
                                             f"{databin.path / MANIFEST}); re-run alum-prep")
                size = p.stat().st_size
                if size != want.get("bytes"):
                    raise DataIntegrityError(f"{p}: {size} bytes but manifest.json records {want.get('bytes')} "
                                             f"(shard {rec['shard']} split {split!r}); re-run alum-prep")
                if level == "full":
                    h = hashlib.sha256()
                    with open(p, "rb") as fh:
                        for b in iter(lambda: fh.read(1 << 22), b""):
                            h.update(b)
                    if h.hexdigest() != want.get("sha256"):
                        raise DataIntegrityError(
                            f"{p}: SHA-256 differs from manifest.json (shard {rec['shard']} split {split!r}): the "
                            "file changed after alum-prep wrote it (bit rot, a partial copy, another tool); "
                            "re-run alum-prep or copy the data-bin again")
                checked += 1
    if level == "full" and checked == 0:
        raise DataIntegrityError(f"{databin.path / MANIFEST}: records no per-file SHA-256 sums, so "
                                 "--data.verify=full has nothing to check against (use --data.verify=size, or "
                                 "re-run alum-prep)")
    if log is not None:
        log(f"data-bin {databin.path}: {checked} shard file(s) match manifest.json "
            f"({'sizes and SHA-256' if level == 'full' else 'sizes'})" if checked else
            f"data-bin {databin.path}: manifest.json records no per-file sizes (not written by alum-prep); "
            "only the .bin/.idx consistency and token-id range checks apply")
    return checked
