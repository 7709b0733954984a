"""Per-vocabulary tables of a data-bin's tokenizer: which ids are special, which word-pieces continue a word,
which ids may replace a masked token.

Built once per run from the tokenizer (:func:`build_token_tables`) and shared by the pre-training
loaders (special and continuation flags of every batch) and the masking step of both engines.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .databin import MANIFEST, DataBin

log = logging.getLogger("alum_pretrain.data")


@dataclass
class TokenTables:
    """Per-vocabulary lookup tables shared by the loader and the masking step.

    ``special`` (V,) bool: ids masking must never select (every tokenizer special token).
    ``continuation`` (V,) bool: word-piece continues the previous word (``##x`` for WordPiece; a piece
    without the leading ``▁`` for sentencepiece, without ``Ġ`` for byte-level BPE).
    ``random_pool`` (R,) long: ids allowed as random replacement tokens (non-special, not ``[unusedN]`` /
    ``<unusedN>`` / ``madeupwordN`` placeholders).
    ``kind``: how continuation was decided ("wordpiece", "sentencepiece", "bytelevel", "none").
    """

    special: torch.Tensor
    continuation: torch.Tensor
    random_pool: torch.Tensor
    kind: str
    cls_id: int
    sep_id: int
    pad_id: int
    mask_id: int

    @property
    def vocab_size(self) -> int:
        return int(self.special.numel())


_PLACEHOLDER = re.compile(r"^(\[unused\d+\]|<unused\d+>|madeupword\d+)$")


def _continuation_rule(tokenizer, vocab: dict[str, int]) -> tuple[str, Callable[[str], bool]]:
    """Decide how to recognise a word-continuation piece for this tokenizer."""
    model = None
    try:
        model = tokenizer.backend_tokenizer.model
    except AttributeError:  # slow tokenizer
        pass
    mname = type(model).__name__ if model is not None else ""
    prefix = getattr(model, "continuing_subword_prefix", None) if model is not None else None
    if mname == "WordPiece" or (prefix and mname != "Unigram"):
        p = prefix or "##"
        return "wordpiece", lambda t: t.startswith(p)
    # Sentencepiece (Unigram or BPE with the Metaspace pre-tokenizer) marks word STARTS with "▁";
    # byte-level BPE (GPT-2/RoBERTa) marks a preceding space with "Ġ". Decide from the vocabulary itself.
    n = max(1, len(vocab))
    n_meta = sum(1 for t in vocab if t.startswith("\u2581"))
    n_g = sum(1 for t in vocab if t.startswith("\u0120"))
    if n_meta >= 0.05 * n and n_meta >= n_g:
        return "sentencepiece", lambda t: not t.startswith("\u2581")
    if n_g >= 0.05 * n:
        return "bytelevel", lambda t: not t.startswith("\u0120")
    if prefix is None and any(t.startswith("##") for t in vocab):
        return "wordpiece", lambda t: t.startswith("##")
    return "none", lambda t: False


def build_token_tables(databin: DataBin, tokenizer=None) -> TokenTables:
    """Build :class:`TokenTables` for ``databin``'s tokenizer (``tokenizer`` overrides the loaded one)."""
    tok = tokenizer if tokenizer is not None else databin.tokenizer()
    V = int(databin.vocab_size)
    vocab = tok.get_vocab()
    special = np.zeros(V, dtype=bool)
    cont = np.zeros(V, dtype=bool)
    present = np.zeros(V, dtype=bool)
    placeholder = np.zeros(V, dtype=bool)
    kind, is_cont = _continuation_rule(tok, vocab)
    for t, i in vocab.items():
        if 0 <= i < V:
            present[i] = True
            cont[i] = is_cont(t)
            placeholder[i] = bool(_PLACEHOLDER.match(t))
    special_ids = set(int(i) for i in getattr(tok, "all_special_ids", []) or [])
    special_ids |= set(int(v) for v in databin.special_ids.values())
    try:  # added special tokens (e.g. <mask> appended by a sentencepiece trainer)
        for i, at in tok.added_tokens_decoder.items():
            if getattr(at, "special", False):
                special_ids.add(int(i))
    except AttributeError:
        pass
    for i in special_ids:
        if 0 <= i < V:
            special[i] = True
    cont &= ~special
    pool = np.nonzero(present & ~special & ~placeholder)[0]
    if pool.size == 0:
        raise ValueError(f"{databin.tokenizer_dir}: the tokenizer has no non-special tokens for random replacement")
    if kind == "none":
        log.warning("%s: cannot tell word-continuation pieces for this tokenizer; whole-word masking will mask single pieces",
                    databin.tokenizer_dir)
    sid = databin.special_ids
    for key in ("cls", "sep", "pad", "mask"):
        if key not in sid:
            raise ValueError(f"{databin.path / MANIFEST}: tokenizer.special_ids lacks {key!r} (re-run alum-prep)")
    return TokenTables(
        special=torch.from_numpy(special),
        continuation=torch.from_numpy(cont),
        random_pool=torch.from_numpy(pool.astype(np.int64)),
        kind=kind,
        cls_id=int(sid["cls"]),
        sep_id=int(sid["sep"]),
        pad_id=int(sid["pad"]),
        mask_id=int(sid["mask"]),
    )


__all__ = ["TokenTables", "build_token_tables"]
