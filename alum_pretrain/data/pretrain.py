"""Pre-training batches from a data-bin: BERT sentence pairs (+NSP) or RoBERTa packed blocks.

What a batch is (a dict of CPU tensors, **unmasked** — the train step masks at a rate that follows the
step, see :mod:`alum_pretrain.masking`)::

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

Padding: to the longest sequence in the batch rounded up to ``pad_to_multiple_of`` (8 by default,
capped at ``max_seq_len``), or to ``max_seq_len`` with ``pad_to_max_len=True``.

Pairs (``mode="pairs"``) follow Google BERT's ``create_instances_from_document`` (also fairseq's
``BlockPairDataset``): walk each document's sentences, accumulate a chunk up to a target length
(``max_seq_len - 3``, or with probability ``short_seq_prob`` a uniform length in [2, max_seq_len - 3]),
split the chunk at a random sentence boundary into A | rest; with probability 0.5 (NSP) B is drawn from a
random *other* document starting at a random sentence, and the unused rest of the chunk is returned so
the next pair starts there (every sentence is used once per epoch); otherwise B = the rest of the chunk.
The longer of A/B is trimmed one token at a time from a random end until the pair fits.
Differences from the prior code (see ``../shared/papers/implementations-pretraining.md`` §2.4, §7):
a document with one sentence, or a chunk that is a single sentence, is **not dropped** (Megatron) and
does **not force** a random B (Google BERT, which biases the NSP labels): the sentence is split at a
random word start into A | B. Sentences longer than ``max_seq_len`` are truncated, never dropped. What
cannot be used (a chunk of a single one-token sentence, empty items) is counted in :attr:`PretrainLoader.stats`
and logged once per epoch. ``stats`` keys: docs, items, tokens, samples, single_sentence_docs,
single_sentence_splits, random_next, empty_items, empty_docs, unusable_chunks, unusable_tokens,
truncated_pairs, truncated_tokens, remainder_samples (not emitted: short of a full global batch with
``drop_last``; their sentences come back, re-chunked, the next time the shard is read), nsp_off_shards.

Blocks (``mode="blocks"``) follow fairseq ``TokenBlockDataset(break_mode="none")`` / RoBERTa
FULL-SENTENCES: the shard's sentences are concatenated into one token stream (with ``[SEP]`` between
documents when ``cross_doc=True``; per document otherwise) and cut into consecutive blocks of
``max_seq_len - 2`` tokens, each emitted as ``[CLS] block [SEP]``. The last block of the stream (or of each
document) is shorter and padded — nothing is dropped.

Shards and epochs (0-based): ``shard_mode="per_epoch"`` reads shard ``e % num_shards`` in epoch ``e``
(fairseq's ``data-bin/shard0:data-bin/shard1``); ``"interleave"`` reads every shard every epoch (pairs
are built per shard — a random B comes from another document of the same shard — then all shards'
samples are shuffled together). The sample plan of an epoch is computed from sizes and document boundaries only, with
``np.random.RandomState([seed, epoch, shard, tag])`` — the same on every rank, so ranks take disjoint
slices: global batch ``g`` is plan[g·B·W : (g+1)·B·W] and rank ``r`` takes its ``r``-th ``B`` rows.
Each sample's own randomness (truncation ends, split-point snapping) comes from a per-sample seed stored
in the plan, so a sample does not depend on which rank or worker builds it.

Resume: :meth:`PretrainLoader.state_dict` is ``{"epoch", "position", "offset", ...}`` where ``offset``
counts *global* samples consumed in the epoch; :meth:`load_state_dict` continues at exactly that sample
without reading the skipped data (the plan is recomputed, nothing is replayed). A different world size
or batch size on resume continues at the same global sample.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from .databin import DataBin, OffsetDataset

log = logging.getLogger("alum_pretrain.data")

MODES = ("pairs", "blocks")
SHARD_MODES = ("per_epoch", "interleave")

# Plan record layouts (one row per sample).
_PAIR_DTYPE = np.dtype(
    [
        ("shard", np.int32),
        ("a_lo", np.int64),  # A = items a_lo .. a_hi-1 of the shard
        ("a_hi", np.int64),
        ("a_cut", np.int64),  # >= 0: keep only the first a_cut tokens of item a_hi-1 (single-sentence split)
        ("b_lo", np.int64),  # B = items b_lo .. b_hi-1
        ("b_hi", np.int64),
        ("b_skip", np.int64),  # skip the first b_skip tokens of item b_lo (single-sentence split)
        ("label", np.int8),  # 0 = true continuation, 1 = random B from another document
        ("salt", np.uint32),  # per-sample seed for truncation / split snapping
    ]
)
_BLOCK_DTYPE = np.dtype([("shard", np.int32), ("start", np.int64), ("end", np.int64)])


# --------------------------------------------------------------------------------------------------
# Per-vocabulary tables (computed once from the tokenizer)
# --------------------------------------------------------------------------------------------------


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


def _continuation_rule(tokenizer, vocab: dict[str, int]) -> tuple[str, callable]:
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
            raise ValueError(f"{databin.path}/manifest.json: tokenizer.special_ids lacks {key!r} (re-run alum-prep)")
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


def random_pool(databin: DataBin, tokenizer=None) -> torch.Tensor:
    """LongTensor of vocabulary ids allowed as random replacement tokens (non-special, no ``[unusedN]``)."""
    return build_token_tables(databin, tokenizer).random_pool


# --------------------------------------------------------------------------------------------------
# Epoch plans (sizes and document boundaries only — no token reads)
# --------------------------------------------------------------------------------------------------


def _doc_starts(ds: OffsetDataset, where: str) -> np.ndarray:
    ds_starts = ds.doc_starts
    if ds_starts is None:
        raise ValueError(
            f"{where}: no document index (.doc.npy); pre-training needs document boundaries — re-run alum-prep"
        )
    return np.asarray(ds_starts, dtype=np.int64)


def _new_stats() -> dict[str, int]:
    return {
        "docs": 0,
        "items": 0,
        "tokens": 0,
        "samples": 0,
        "single_sentence_docs": 0,  # documents with one sentence (still used: split A|B, and as random-B source)
        "single_sentence_splits": 0,  # pairs made by splitting one sentence at a word start
        "random_next": 0,
        "empty_items": 0,  # zero-length sentences (nothing to use)
        "unusable_chunks": 0,  # a chunk that was one sentence of < 2 tokens (cannot form A|B)
        "unusable_tokens": 0,
        "truncated_pairs": 0,
        "truncated_tokens": 0,  # tokens trimmed to fit max_seq_len (pairs mode)
        "empty_docs": 0,
        "remainder_samples": 0,  # samples not emitted this epoch because they did not fill a global batch
        "nsp_off_shards": 0,  # evaluation shards with one document: label-0 pairs only
    }


def _plan_pairs(
    sizes: np.ndarray,
    doc_starts: np.ndarray,
    shard: int,
    rng: np.random.RandomState,
    max_num_tokens: int,
    short_seq_prob: float,
    nsp: bool,
    stats: dict[str, int],
    where: str,
    strict: bool = True,
) -> np.ndarray:
    """Google BERT's ``create_instances_from_document`` over every document of one shard.

    ``strict=False`` (evaluation splits): a shard with a single document gets true-continuation pairs
    only (label 0) instead of an error, counted in ``stats["nsp_off_shards"]``.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    num_docs = len(doc_starts) - 1
    if nsp and num_docs < 2:
        if strict:
            raise ValueError(
                f"{where}: next-sentence prediction needs at least 2 documents per shard (found {num_docs}); "
                "use more text, fewer shards, or --data.nsp=false"
            )
        log.warning("%s: only %d document(s): no random segments possible, all pairs are true continuations",
                    where, num_docs)
        stats["nsp_off_shards"] += 1
        nsp = False
    stats["docs"] += num_docs
    stats["items"] += len(sizes)
    stats["tokens"] += int(sizes.sum())
    stats["empty_items"] += int((sizes == 0).sum())
    doc_len = np.diff(doc_starts)
    stats["single_sentence_docs"] += int((doc_len == 1).sum())
    rows: list[tuple] = []
    rand = rng.random_sample
    # Python lists and prefix sums: this loop visits every sentence, numpy scalar indexing would dominate.
    size_l = sizes.tolist()
    prefix = [0]
    for x in size_l:
        prefix.append(prefix[-1] + x)
    starts_l = [int(x) for x in doc_starts]
    for d in range(num_docs):
        lo, hi = starts_l[d], starts_l[d + 1]
        if prefix[hi] == prefix[lo]:
            stats["empty_docs"] += 1
            continue
        target = max_num_tokens
        if rand() < short_seq_prob:
            target = int(rng.randint(2, max_num_tokens + 1))
        chunk_lo = lo
        cur = 0
        i = lo
        while i < hi:
            cur += size_l[i]
            i += 1
            if i < hi and cur < target:
                continue
            # chunk = items chunk_lo .. i-1
            n = i - chunk_lo
            if cur == 0:  # only empty items
                chunk_lo, cur = i, 0
                continue
            random_b = nsp and rand() < 0.5
            if n >= 2:
                a_end = chunk_lo + int(rng.randint(1, n))  # A = chunk_lo .. a_end-1, at least one sentence each side
                a_cut = -1
            else:
                a_end = i
                a_cut = -1
                if not random_b:
                    # One sentence: split it at a random token (snapped to a word start at build time).
                    sz = size_l[chunk_lo]
                    if sz < 2:
                        stats["unusable_chunks"] += 1
                        stats["unusable_tokens"] += sz
                        chunk_lo, cur = i, 0
                        target = max_num_tokens if rand() >= short_seq_prob else int(rng.randint(2, max_num_tokens + 1))
                        continue
                    a_cut = int(rng.randint(1, sz))
            len_a = prefix[a_end] - prefix[chunk_lo] if a_cut < 0 else a_cut
            if random_b:
                target_b = max(1, target - len_a)
                # Uniform over the OTHER documents (never this one), then a random start sentence.
                for _ in range(10):
                    od = int(rng.randint(num_docs - 1))
                    od += od >= d
                    olo, ohi = starts_l[od], starts_l[od + 1]
                    b_lo = int(rng.randint(olo, ohi))
                    b_hi = b_lo
                    len_b = 0
                    while b_hi < ohi and len_b < target_b:
                        len_b += size_l[b_hi]
                        b_hi += 1
                    if len_b > 0:
                        break
                b_skip = 0
                # Google BERT: the unused sentences of the chunk go back and start the next chunk.
                next_lo = a_end
            else:
                if a_cut >= 0:
                    b_lo, b_hi, b_skip = chunk_lo, chunk_lo + 1, a_cut
                    len_b = size_l[chunk_lo] - a_cut
                else:
                    b_lo, b_hi, b_skip = a_end, i, 0
                    len_b = prefix[i] - prefix[a_end]
                next_lo = i
            if len_a == 0 or len_b == 0:  # an A or B made only of empty items
                stats["unusable_chunks"] += 1
                stats["unusable_tokens"] += len_a + (0 if random_b else len_b)
            else:
                excess = len_a + len_b - max_num_tokens
                if excess > 0:
                    stats["truncated_pairs"] += 1
                    stats["truncated_tokens"] += excess
                stats["random_next"] += int(random_b)
                stats["single_sentence_splits"] += int(a_cut >= 0 and not random_b)
                rows.append((shard, chunk_lo, a_end, a_cut, b_lo, b_hi, b_skip, int(random_b), rng.randint(2**32, dtype=np.uint64)))
            if next_lo < i:
                i = next_lo
            chunk_lo, cur = i, 0
            target = max_num_tokens if rand() >= short_seq_prob else int(rng.randint(2, max_num_tokens + 1))
    plan = np.array(rows, dtype=_PAIR_DTYPE) if rows else np.zeros(0, dtype=_PAIR_DTYPE)
    return plan


def _stream_offsets(sizes: np.ndarray, doc_starts: np.ndarray, cross_doc: bool) -> tuple[np.ndarray, np.ndarray]:
    """Start offset of every item in the shard's token stream, and the stream's document end offsets.

    With ``cross_doc`` a separator token follows every document, so item i starts at
    ``sum(sizes[:i]) + (number of documents before i's document)``.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    starts = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=starts[1:])
    doc_tok = starts[doc_starts]  # (D+1,) token offsets of doc boundaries without separators
    if cross_doc:
        doc_of_item = np.repeat(np.arange(len(doc_starts) - 1, dtype=np.int64), np.diff(doc_starts))
        item_off = starts[:-1] + doc_of_item
        doc_end = doc_tok[1:] + np.arange(1, len(doc_starts), dtype=np.int64)  # offset after each doc's separator
    else:
        item_off = starts[:-1]
        doc_end = doc_tok[1:]
    return item_off, doc_end


def _plan_blocks(
    sizes: np.ndarray, doc_starts: np.ndarray, shard: int, block: int, cross_doc: bool, stats: dict[str, int]
) -> np.ndarray:
    sizes = np.asarray(sizes, dtype=np.int64)
    num_docs = len(doc_starts) - 1
    stats["docs"] += num_docs
    stats["items"] += len(sizes)
    stats["tokens"] += int(sizes.sum())
    stats["empty_items"] += int((sizes == 0).sum())
    stats["single_sentence_docs"] += int((np.diff(doc_starts) == 1).sum())
    item_off, doc_end = _stream_offsets(sizes, doc_starts, cross_doc)
    if cross_doc:
        total = int(doc_end[-1]) if num_docs else 0
        starts = np.arange(0, total, block, dtype=np.int64)
        ends = np.minimum(starts + block, total)
    else:
        doc_begin = np.concatenate([[0], doc_end[:-1]]).astype(np.int64)
        lens = doc_end - doc_begin
        stats["empty_docs"] += int((lens == 0).sum())
        nb = (lens + block - 1) // block
        first = np.repeat(doc_begin, nb)
        k = np.arange(int(nb.sum()), dtype=np.int64) - np.repeat(np.cumsum(nb) - nb, nb)
        starts = first + k * block
        ends = np.minimum(starts + block, np.repeat(doc_end, nb))
    plan = np.zeros(len(starts), dtype=_BLOCK_DTYPE)
    plan["shard"] = shard
    plan["start"] = starts
    plan["end"] = ends
    return plan


# --------------------------------------------------------------------------------------------------
# Sample building (token reads happen here)
# --------------------------------------------------------------------------------------------------


class _SampleBuilder:
    """Turns plan rows into token arrays; picklable (re-opens the data-bin in DataLoader workers)."""

    def __init__(self, databin_path: str, split: str, mode: str, nsp: bool, max_seq_len: int, cross_doc: bool,
                 tables: TokenTables, pad_to_multiple_of: int | None, pad_to_max_len: bool):
        self.databin_path = databin_path
        self.split = split
        self.mode = mode
        self.nsp = nsp
        self.max_seq_len = max_seq_len
        self.cross_doc = cross_doc
        self.tables = tables
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_to_max_len = pad_to_max_len
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

    def dataset(self, shard: int) -> OffsetDataset:
        ds = self._ds.get(shard)
        if ds is None:
            if self._databin is None:
                self._databin = DataBin(self.databin_path)
            ds = self._ds[shard] = self._databin.split(shard, self.split)
        return ds

    def item_offsets(self, shard: int) -> np.ndarray:
        off = self._offsets.get(shard)
        if off is None:
            ds = self.dataset(shard)
            where = f"{self.databin_path}/shard{shard}/{self.split}"
            off, _ = _stream_offsets(ds.sizes, _doc_starts(ds, where), self.cross_doc)
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


# --------------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------------


class _BatchDataset(torch.utils.data.Dataset):
    """Batch k of the remaining batches of an epoch (for DataLoader workers; order kept by the sampler)."""

    def __init__(self, builder: _SampleBuilder, row_sets: list[np.ndarray]):
        self.builder = builder
        self.row_sets = row_sets

    def __len__(self):
        return len(self.row_sets)

    def __getitem__(self, k):
        return self.builder.batch(self.row_sets[k])


class PretrainLoader:
    """Iterable over pre-training batches (see the module docstring); build with :func:`build_loader`.

    Iterating yields batches forever (epochs advance automatically) unless ``epochs`` is set; a finite
    loader that has been exhausted starts again from epoch 0 when iterated again. ``state_dict()`` after
    receiving a batch records that batch as consumed.
    """

    def __init__(self, databin: DataBin, split: str, *, mode: str, nsp: bool, max_seq_len: int, batch_size: int,
                 seed: int, rank: int, world_size: int, shard_mode: str, short_seq_prob: float, cross_doc: bool,
                 shuffle: bool, drop_last: bool, epochs: int | None, pad_to_multiple_of: int | None,
                 pad_to_max_len: bool, num_workers: int, tables: TokenTables | None):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: choose one of {MODES} (--data.mode)")
        if shard_mode not in SHARD_MODES:
            raise ValueError(f"shard_mode={shard_mode!r}: choose one of {SHARD_MODES} (--data.shard_mode)")
        if max_seq_len < (5 if mode == "pairs" else 3):
            raise ValueError(f"max_seq_len={max_seq_len} is too short for mode={mode!r} (--data.max_seq_len)")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if not 0.0 <= short_seq_prob <= 1.0:
            raise ValueError(f"short_seq_prob={short_seq_prob} must be in [0, 1] (--data.short_seq_prob)")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs={epochs} must be >= 1 or None (forever)")
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0")
        self.databin = databin
        self.split = split
        self.mode = mode
        self.nsp = bool(nsp) and mode == "pairs"
        self.max_seq_len = int(max_seq_len)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.shard_mode = shard_mode
        self.short_seq_prob = float(short_seq_prob)
        self.cross_doc = bool(cross_doc)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.epochs = epochs
        self.num_workers = int(num_workers)
        self.shards = [k for k in range(databin.num_shards) if databin.has_split(k, split)]
        if not self.shards:
            raise ValueError(f"{databin.path}: no shard has a {split!r} split (expected shardK/{split}.idx)")
        if split == "train" and len(self.shards) != databin.num_shards:
            missing = sorted(set(range(databin.num_shards)) - set(self.shards))
            raise ValueError(f"{databin.path}: shards {missing} have no train split; the data-bin is incomplete")
        empty = [k for k in self.shards if len(databin.split(k, split)) == 0]
        if split == "train" and empty:
            raise ValueError(f"{databin.path}: shard(s) {empty} have an empty train split; re-run alum-prep with "
                             "fewer --shards for this corpus")
        self.shards = [k for k in self.shards if k not in empty]  # evaluation splits: skip empty shards
        if not self.shards:
            raise ValueError(f"{databin.path}: the {split!r} split is empty in every shard")
        self.tables = tables if tables is not None else build_token_tables(databin)
        self.builder = _SampleBuilder(str(databin.path), split, mode, self.nsp, self.max_seq_len, self.cross_doc,
                                      self.tables, pad_to_multiple_of, pad_to_max_len)
        self.epoch = 0
        self.offset = 0  # global samples consumed in this epoch
        self.position = 0  # batches this loader yielded in this epoch
        self._plan_epoch: int | None = None
        self._plan: np.ndarray | None = None
        self.stats: dict[str, int] = {}

    # -- plans ------------------------------------------------------------------------------------
    def shards_for_epoch(self, epoch: int) -> list[int]:
        """Shard indices read in ``epoch``: one (per_epoch) or all (interleave)."""
        if self.shard_mode == "per_epoch":
            return [self.shards[epoch % len(self.shards)]]
        return list(self.shards)

    def plan(self, epoch: int) -> np.ndarray:
        """All samples of ``epoch`` in order (identical on every rank)."""
        if self._plan_epoch == epoch:
            return self._plan
        stats = _new_stats()
        parts = []
        for shard in self.shards_for_epoch(epoch):
            ds = self.builder.dataset(shard)
            where = f"{self.databin.path}/shard{shard}/{self.split}"
            docs = _doc_starts(ds, where)
            rng = np.random.RandomState([self.seed, epoch, shard, 0])
            if self.mode == "pairs":
                p = _plan_pairs(ds.sizes, docs, shard, rng, self.max_seq_len - 3, self.short_seq_prob, self.nsp,
                                stats, where, strict=self.split == "train")
            else:
                p = _plan_blocks(ds.sizes, docs, shard, self.max_seq_len - 2, self.cross_doc, stats)
            if self.shuffle:
                p = p[rng.permutation(len(p))]
            parts.append(p)
        plan = np.concatenate(parts) if len(parts) > 1 else parts[0]
        if self.shuffle and len(parts) > 1:  # interleave: mix the shards' samples
            plan = plan[np.random.RandomState([self.seed, epoch, 2**31 - 1, 1]).permutation(len(plan))]
        if len(plan) == 0:
            raise ValueError(f"{self.databin.path} split {self.split!r}, epoch {epoch}: no samples could be built "
                             f"(stats {stats})")
        gb = self.batch_size * self.world_size
        stats["samples"] = len(plan)
        stats["remainder_samples"] = len(plan) % gb if self.drop_last else 0
        self._plan_epoch, self._plan, self.stats = epoch, plan, stats
        if self.rank == 0:
            log.info("%s/%s epoch %d shards %s: %s", self.databin.path, self.split, epoch,
                     self.shards_for_epoch(epoch), stats)
        return plan

    def batches_in_epoch(self, epoch: int | None = None) -> int:
        """Number of batches this rank yields in ``epoch`` (default: the current one), from its start."""
        e = self.epoch if epoch is None else epoch
        return self._count_batches(len(self.plan(e)), 0)

    @property
    def len_epoch(self) -> int:
        return self.batches_in_epoch()

    def _count_batches(self, n: int, offset: int) -> int:
        gb = self.batch_size * self.world_size
        full = max(0, (n - offset) // gb)
        if self.drop_last:
            return full
        rest_off = offset + full * gb
        return full + int(len(self._rank_rows(n, rest_off)) > 0)

    def _rank_rows(self, n: int, offset: int) -> np.ndarray:
        """Plan indices this rank takes for the global batch starting at ``offset``."""
        B, W, r = self.batch_size, self.world_size, self.rank
        if offset + B * W <= n:
            lo = offset + r * B
            return np.arange(lo, lo + B)
        if self.drop_last or offset >= n:
            return np.zeros(0, dtype=np.int64)
        # Last, partial global batch (validation): split the remainder evenly over the ranks.
        return np.array_split(np.arange(offset, n), W)[r]

    # -- iteration --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.epochs is not None and self.epoch >= self.epochs:
            self.epoch, self.offset, self.position = 0, 0, 0
        while self.epochs is None or self.epoch < self.epochs:
            plan = self.plan(self.epoch)
            n = len(plan)
            gb = self.batch_size * self.world_size
            offsets = []
            off = self.offset
            while off < n:
                if self.drop_last and off + gb > n:
                    break
                rows = self._rank_rows(n, off)
                if len(rows):  # the last partial batch may leave a rank without rows
                    offsets.append((off, rows))
                off = min(off + gb, n)
            for (off, rows), batch in zip(offsets, self._batches([plan[r] for _, r in offsets])):
                self.offset = min(off + gb, n)
                self.position += 1
                yield batch
            self.epoch += 1
            self.offset = 0
            self.position = 0

    def _batches(self, row_sets: list[np.ndarray]):
        if self.num_workers <= 0 or not row_sets:
            for rows in row_sets:
                yield self.builder.batch(rows)
            return
        # Workers build whole batches; the sequential sampler keeps the order, so the stream is identical
        # to num_workers=0 (the plan fixes every sample's content and randomness).
        dl = torch.utils.data.DataLoader(_BatchDataset(self.builder, row_sets), batch_size=None, shuffle=False,
                                         num_workers=self.num_workers, persistent_workers=False)
        yield from dl

    # -- resume -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "offset": self.offset,
            "seed": self.seed,
            "mode": self.mode,
            "nsp": self.nsp,
            "max_seq_len": self.max_seq_len,
            "shard_mode": self.shard_mode,
            "split": self.split,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue at the recorded epoch and global sample offset (nothing is replayed or re-read)."""
        for key in ("seed", "mode", "nsp", "max_seq_len", "shard_mode", "split"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"data loader state was saved with {key}={state[key]!r} but this run has {getattr(self, key)!r}; "
                    "resuming would change the data order — restore the original setting or start a new run"
                )
        self.epoch = int(state["epoch"])
        self.offset = int(state["offset"])
        same_layout = state.get("batch_size") == self.batch_size and state.get("world_size") == self.world_size
        if same_layout:
            self.position = int(state["position"])
        else:  # continues at the same global sample; batches are counted afresh
            self.position = self.offset // (self.batch_size * self.world_size)
            log.warning("resuming the data loader with batch_size*world_size %d (was %s*%s): continuing at global "
                        "sample %d of epoch %d", self.batch_size * self.world_size, state.get("batch_size"),
                        state.get("world_size"), self.offset, self.epoch)


def build_loader(
    databin: DataBin | str,
    split: str = "train",
    *,
    mode: str = "pairs",
    nsp: bool = True,
    max_seq_len: int = 128,
    batch_size: int = 32,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    shard_mode: str = "per_epoch",
    short_seq_prob: float = 0.1,
    cross_doc: bool = True,
    shuffle: bool | None = None,
    drop_last: bool | None = None,
    epochs: int | None = None,
    pad_to_multiple_of: int | None = 8,
    pad_to_max_len: bool = False,
    num_workers: int = 0,
    tables: TokenTables | None = None,
) -> PretrainLoader:
    """Build a :class:`PretrainLoader` over ``split`` of ``databin``.

    mode: "pairs" ([CLS] A [SEP] B [SEP], NSP labels when ``nsp``) or "blocks" (packed, MLM only).
    nsp: 50 % random B from another document + ``next_sentence_label`` (pairs mode; ignored for blocks).
    max_seq_len: tokens per sequence including [CLS]/[SEP].
    batch_size: sequences per rank per batch.
    seed, rank, world_size: the sample plan depends on (seed, epoch) only; each rank takes a disjoint slice.
    shard_mode: "per_epoch" (epoch e reads shard e % num_shards) or "interleave" (all shards each epoch).
    short_seq_prob: probability of a shorter random target length for a pair (Google BERT: 0.1).
    cross_doc: blocks mode: concatenate across documents with [SEP] (True) or keep blocks within a document.
    shuffle: shuffle the samples of an epoch (default: True for "train", False otherwise).
    drop_last: drop the last incomplete global batch of an epoch (default: True for "train"; counted in
        ``loader.stats["remainder_samples"]``). With False, the remainder is split over the ranks.
    epochs: stop after this many epochs (e.g. 1 for validation); None = forever.
    pad_to_multiple_of: pad to the batch's longest sequence rounded up to this (capped at max_seq_len).
    pad_to_max_len: pad every batch to max_seq_len instead.
    num_workers: build batches in this many DataLoader worker processes (same stream as 0).
    tables: precomputed :class:`TokenTables` (default: built from the data-bin's tokenizer).
    """
    if not isinstance(databin, DataBin):
        databin = DataBin(databin)
    is_train = split == "train"
    return PretrainLoader(
        databin, split, mode=mode, nsp=nsp, max_seq_len=max_seq_len, batch_size=batch_size, seed=seed, rank=rank,
        world_size=world_size, shard_mode=shard_mode, short_seq_prob=short_seq_prob, cross_doc=cross_doc,
        shuffle=is_train if shuffle is None else shuffle, drop_last=is_train if drop_last is None else drop_last,
        epochs=epochs, pad_to_multiple_of=pad_to_multiple_of, pad_to_max_len=pad_to_max_len,
        num_workers=num_workers, tables=tables,
    )


__all__ = ["PretrainLoader", "TokenTables", "build_loader", "build_token_tables", "random_pool"]
