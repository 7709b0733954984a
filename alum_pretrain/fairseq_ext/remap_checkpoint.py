"""Re-index a fairseq RoBERTa checkpoint's vocabulary rows to an ``alum-prep`` data-bin's dictionary.

Continual pre-training (``fairseq-train ... --restore-file CKPT``) needs the checkpoint's embedding rows
in the order of the task's dictionary.  In an ``alum-prep`` data-bin that order is ``fairseq id =
tokenizer id + id_offset`` (4: fairseq's ``<s> <pad> </s> <unk>`` come first) followed by the ``<mask>``
the task appends.  A checkpoint whose rows follow the *tokenizer's* ids directly - e.g. the released
fairseq ``roberta.base`` / ``roberta.large``, whose dictionary ids are exactly the ids of the HuggingFace
``roberta-base`` tokenizer (``--src-id-offset 0``) when the data-bin was made with
``alum-prep --tokenizer-json roberta-base/tokenizer.json`` - is shifted here::

    new row 0..3                    = old row 0..3                (fairseq specials)
    new row id_offset + i           = old row src_id_offset + i   (every tokenizer token i)
    new row of the appended <mask>  = old row of the tokenizer's mask token

for ``encoder.sentence_encoder.embed_tokens.weight``, ``encoder.lm_head.bias`` and an untied
``encoder.lm_head.weight``.  Everything else is copied; the optimizer state is dropped (restore with
``--reset-optimizer``).  No fairseq import::

    python3 -m alum_pretrain.fairseq_ext.remap_checkpoint roberta.base/model.pt DATA_BIN roberta.base/remapped.pt \\
        --src-id-offset 0
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from ..atomic import atomic_file
from ..data.databin import FAIRSEQ_NSPECIAL, MANIFEST, DataBin
from .export_hf import FairseqExportError, upgrade_key, load_checkpoint_state

VOCAB_KEYS = ("encoder.sentence_encoder.embed_tokens.weight", "encoder.lm_head.weight", "encoder.lm_head.bias")


def remap_rows(t: torch.Tensor, *, src_off: int, dst_off: int, vocab: int, mask_id: int, rows: int) -> torch.Tensor:
    """``t`` (old rows, ...) -> (rows, ...) in the data-bin order (module docstring)."""
    if src_off + vocab > t.shape[0]:
        raise FairseqExportError(f"the checkpoint has {t.shape[0]} vocabulary rows; --src-id-offset {src_off} + "
                                 f"{vocab} tokenizer ids does not fit: wrong offset or wrong data-bin")
    new = t.new_zeros((rows,) + tuple(t.shape[1:]))
    new[:FAIRSEQ_NSPECIAL] = t[:FAIRSEQ_NSPECIAL]
    new[dst_off:dst_off + vocab] = t[src_off:src_off + vocab]
    if rows > dst_off + vocab:  # the <mask> appended by the task (and anything after it)
        new[dst_off + vocab:] = t[src_off + mask_id]
    return new


def remap_checkpoint(src: str | os.PathLike, databin: str | os.PathLike, out: str | os.PathLike, *,
                     src_id_offset: int = 0) -> Path:
    db, out = DataBin(databin), Path(out)
    dst_off, vocab = db.id_offset, db.vocab_size
    if "mask" not in db.special_ids:
        raise ValueError(f"{db.path / MANIFEST}: tokenizer.special_ids has no 'mask' (re-run alum-prep)")
    mask_id = db.special_ids["mask"]
    with open(db.path / "dict.txt", encoding="utf-8") as fh:
        n_dict = sum(1 for line in fh if line.strip())
    rows = FAIRSEQ_NSPECIAL + n_dict + 1  # fairseq's specials + dict.txt + the task's <mask>
    state = load_checkpoint_state(src)
    model = state["model"] = {upgrade_key(k): v for k, v in state["model"].items()}  # decoder.* -> encoder.*
    for k in VOCAB_KEYS:
        if k in model:
            model[k] = remap_rows(model[k], src_off=src_id_offset, dst_off=dst_off, vocab=vocab, mask_id=mask_id,
                                  rows=rows)
    if VOCAB_KEYS[0] not in model:
        raise FairseqExportError(f"{src}: no {VOCAB_KEYS[0]} - not a fairseq RoBERTa checkpoint")
    state.pop("last_optimizer_state", None)
    with atomic_file(out) as tmp:
        torch.save(state, tmp)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m alum_pretrain.fairseq_ext.remap_checkpoint",
                                description="Re-index a fairseq RoBERTa checkpoint's vocabulary rows to an alum-prep "
                                            "data-bin (for --restore-file continual pre-training).")
    p.add_argument("src", help="fairseq checkpoint, e.g. roberta.base/model.pt")
    p.add_argument("databin", help="the alum-prep data-bin the next run trains on")
    p.add_argument("out", help="output checkpoint (written to OUT.tmp, then renamed)")
    p.add_argument("--src-id-offset", type=int, default=0,
                   help="row of tokenizer id 0 in the source checkpoint (0 for the released roberta.* models with "
                        "the HF roberta tokenizer; 4 for checkpoints trained on an alum-prep data-bin)")
    a = p.parse_args(argv)
    try:
        print(remap_checkpoint(a.src, a.databin, a.out, src_id_offset=a.src_id_offset))
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"remap_checkpoint: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
