"""Plan rows -> token arrays -> batches: the only place the pre-training loaders read tokens.

A batch is a dict of CPU tensors, **unmasked** (the train step masks at a rate that follows the step, see
:mod:`alum_pretrain.masking`)::

    input_ids            (B, T) long   [CLS] A [SEP] B [SEP] [PAD]...   or   [CLS] block [SEP] [PAD]...
    attention_mask       (B, T) long   1 on real tokens, 0 on padding
    token_type_ids       (B, T) long   0 for [CLS] A [SEP], 1 for B [SEP]; 0 everywhere in blocks mode
    special_mask         (B, T) bool   True where masking must never select: [CLS]/[SEP]/[PAD] and any
                                       tokenizer special id (also every padding position)
    continuation         (B, T) bool   True on a word-piece that continues the previous word (whole-word
                                       masking); False on word starts, specials, padding and on the first
                                       token of every sentence
    next_sentence_label  (B,)   long   pairs mode with NSP only; HF convention 0 = B is the true
                                       continuation of A, 1 = B is a random segment from ANOTHER document

Padding: to the longest sequence in the batch rounded up to ``pad_to_multiple_of`` (capped at
``max_seq_len``), or to ``max_seq_len`` with ``pad_to_max_len``.

A pair longer than ``max_seq_len - 3`` is trimmed on its longer side one token at a time from a random end
(Google BERT's ``truncate_seq_pair``); a sentence longer than ``max_seq_len`` is truncated, never dropped.
Those draws, and the snapping of a single-sentence split to a word start, come from the row's own seed
(``salt``), so a sample does not depend on which rank or worker builds it.  A block is emitted as
``[CLS] block [SEP]``; stream positions between documents are ``[SEP]``.
"""

from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import torch

from .databin import DataBin, OffsetDataset
from .plans import doc_starts, stream_offsets
from .tokens import TokenTables

MODES = ("pairs", "blocks")


class SampleBuilder:
    """Turns plan rows of ``split`` of the data-bin at ``databin_path`` into token arrays and batches.

    ``mode``: "pairs" or "blocks" (the plan's kind); ``tables``: the tokenizer's :class:`TokenTables`;
    ``max_seq_len``: tokens per sequence including [CLS]/[SEP]; ``nsp``: add ``next_sentence_label`` to pair
    batches; ``cross_doc``: blocks mode, the stream runs across documents with [SEP] between them;
    ``pad_to_multiple_of`` / ``pad_to_max_len``: batch padding (module docstring).  Picklable: DataLoader
    workers re-open the data-bin.
    """

    def __init__(self, databin_path: str, split: str, *, mode: str, tables: TokenTables, max_seq_len: int,
                 nsp: bool = False, cross_doc: bool = False, pad_to_multiple_of: int | None = None,
                 pad_to_max_len: bool = False):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: choose one of {MODES} (--data.mode)")
        self.databin_path = str(databin_path)
        self.split = split
        self.mode = mode
        self.nsp = bool(nsp)
        self.max_seq_len = int(max_seq_len)
        self.cross_doc = bool(cross_doc)
        self.tables = tables
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_to_max_len = bool(pad_to_max_len)
        self._cont_np = tables.continuation.numpy()
        self._special_np = tables.special.numpy()
        self._ds: dict[int, OffsetDataset] = {}
        self._offsets: dict[int, np.ndarray] = {}
        self._databin: DataBin | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_ds"] = {}
        state["_offsets"] = {}
        state["_databin"] = None
        return state

    def where(self, shard: int) -> str:
        """``ROOT/shardK/SPLIT``: how messages name this split of ``shard``."""
        return f"{self.databin_path}/shard{shard}/{self.split}"

    def dataset(self, shard: int) -> OffsetDataset:
        ds = self._ds.get(shard)
        if ds is None:
            if self._databin is None:
                self._databin = DataBin(self.databin_path)
            ds = self._ds[shard] = self._databin.split(shard, self.split)
        return ds

    def doc_starts(self, shard: int) -> np.ndarray:
        """The (D+1,) document start items of ``shard`` (ValueError when it has no ``.doc.npy``)."""
        return doc_starts(self.dataset(shard), self.where(shard))

    def item_offsets(self, shard: int) -> np.ndarray:
        off = self._offsets.get(shard)
        if off is None:
            off, _ = stream_offsets(self.dataset(shard).sizes, self.doc_starts(shard), self.cross_doc)
            self._offsets[shard] = off
        return off

    # -- pairs ------------------------------------------------------------------------------------
    def _snap_to_word_start(self, tokens: np.ndarray, k: int) -> int:
        """Move a split point inside one sentence to the nearest word start (so B never starts with ##x)."""
        cont = self._cont_np[tokens]
        if not cont[k]:
            return k
        left = k
        while left > 1 and cont[left]:
            left -= 1
        if not cont[left]:
            return left
        right = k
        while right < len(tokens) - 1 and cont[right]:
            right += 1
        return right if not cont[right] else k

    def pair(self, row) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ds = self.dataset(int(row["shard"]))
        rng = random.Random(int(row["salt"]))  # per-sample stream (cheap to seed, unlike np.random.RandomState)
        a_items = [ds[i] for i in range(int(row["a_lo"]), int(row["a_hi"]))]
        if int(row["a_cut"]) >= 0:
            whole = a_items[-1]
            cut = self._snap_to_word_start(whole, int(row["a_cut"]))
            a_items[-1] = whole[:cut]
            b_items = [whole[cut:]]
        else:
            b_items = [ds[i] for i in range(int(row["b_lo"]), int(row["b_hi"]))]
            if int(row["b_skip"]) > 0:
                b_items[0] = b_items[0][int(row["b_skip"]):]
        a, a_start = _concat_with_starts(a_items)
        b, b_start = _concat_with_starts(b_items)
        # Trim the longer side one token at a time from a random end (Google BERT's truncate_seq_pair).
        # The final lengths are deterministic; each removed token's end is a fair coin, so the number
        # removed from the front is Binomial(removed, 1/2) = popcount of `removed` random bits.
        max_num = self.max_seq_len - 3
        la, lb = len(a), len(b)
        while la + lb > max_num:
            if la > lb:
                la -= 1
            else:
                lb -= 1
        a, a_start = _trim(a, a_start, la, rng)
        b, b_start = _trim(b, b_start, lb, rng)
        t = self.tables
        ids = np.concatenate([[t.cls_id], a, [t.sep_id], b, [t.sep_id]]).astype(np.int64)
        tt = np.zeros(len(ids), dtype=np.int64)
        tt[len(a) + 2:] = 1
        starts = np.concatenate([[True], a_start, [True], b_start, [True]])
        return ids, tt, starts

    # -- blocks -----------------------------------------------------------------------------------
    def block(self, row) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        shard = int(row["shard"])
        ds = self.dataset(shard)
        off = self.item_offsets(shard)
        s, e = int(row["start"]), int(row["end"])
        t = self.tables
        body = np.full(e - s, t.sep_id, dtype=np.int64)  # positions no item covers are document separators
        starts = np.zeros(e - s, dtype=bool)
        first = max(int(np.searchsorted(off, s, side="right")) - 1, 0)
        i = first
        n = len(off)
        while i < n and off[i] < e:
            tok = ds[i]
            lo = int(off[i])
            a, b = max(lo, s), min(lo + len(tok), e)
            if b > a:
                body[a - s:b - s] = tok[a - lo:b - lo]
                if lo >= s:
                    starts[lo - s] = True
            i += 1
        ids = np.concatenate([[t.cls_id], body, [t.sep_id]]).astype(np.int64)
        tt = np.zeros(len(ids), dtype=np.int64)
        return ids, tt, np.concatenate([[True], starts, [True]])

    # -- batch ------------------------------------------------------------------------------------
    def batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        samples = [self.pair(r) if self.mode == "pairs" else self.block(r) for r in rows]
        B = len(samples)
        longest = max(len(s[0]) for s in samples)
        if self.pad_to_max_len:
            T = self.max_seq_len
        else:
            m = self.pad_to_multiple_of or 1
            T = min(-(-longest // m) * m, max(self.max_seq_len, longest))
        t = self.tables
        ids = np.full((B, T), t.pad_id, dtype=np.int64)
        att = np.zeros((B, T), dtype=np.int64)
        tt = np.zeros((B, T), dtype=np.int64)
        word_start = np.ones((B, T), dtype=bool)
        for j, (x, y, st) in enumerate(samples):
            L = len(x)
            assert L <= self.max_seq_len, (L, self.max_seq_len)
            ids[j, :L] = x
            att[j, :L] = 1
            tt[j, :L] = y
            word_start[j, :L] = st
        special = self._special_np[ids] | (att == 0)
        cont = self._cont_np[ids] & ~word_start & ~special
        # A piece right after a special token (e.g. a front-trimmed "##x" opening segment B) starts a word.
        cont[:, 1:] &= ~special[:, :-1]
        cont[:, 0] = False
        out = {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(att),
            "token_type_ids": torch.from_numpy(tt),
            "special_mask": torch.from_numpy(special),
            "continuation": torch.from_numpy(cont),
        }
        if self.mode == "pairs" and self.nsp:
            out["next_sentence_label"] = torch.from_numpy(rows["label"].astype(np.int64))
        return out


def _concat_with_starts(items: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if not items:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    toks = np.concatenate([np.asarray(x, dtype=np.int64) for x in items])
    starts = np.zeros(len(toks), dtype=bool)
    pos = 0
    for x in items:
        if len(x):
            starts[pos] = True
        pos += len(x)
    return toks, starts


def _trim(tok: np.ndarray, starts: np.ndarray, keep: int, rng: random.Random):
    removed = len(tok) - keep
    if removed <= 0:
        return tok, starts
    front = rng.getrandbits(removed).bit_count()  # one fair coin per removed token: True = from the front
    return tok[front:front + keep], starts[front:front + keep]


__all__ = ["MODES", "SampleBuilder"]
