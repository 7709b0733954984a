"""Epoch plans: which samples an epoch of one shard holds, from item sizes and document boundaries only.

A plan is a NumPy record array, one row per sample (:data:`PAIR_DTYPE` or :data:`BLOCK_DTYPE`); no token
is read here (:class:`~alum_pretrain.data.samples.SampleBuilder` turns rows into tokens).  Its randomness
comes from :func:`shard_rng` — ``np.random.RandomState([seed, epoch, shard, 0])`` — so every rank, and
both engines, compute the same plan; each row carries its own seed (``salt``) for what is drawn while
building the sample.

Pairs (:func:`plan_pairs`) follow Google BERT's ``create_instances_from_document`` (also fairseq's
``BlockPairDataset``): walk each document's sentences, accumulate a chunk up to a target length
(``max_num_tokens``, or with probability ``short_seq_prob`` a uniform length in [2, max_num_tokens]),
split the chunk at a random sentence boundary into A | rest; with probability 0.5 (NSP) B is drawn from a
random *other* document starting at a random sentence, and the unused rest of the chunk is returned so
the next pair starts there (every sentence is used once per epoch); otherwise B = the rest of the chunk.
Two departures from Google BERT: a document with one sentence, or a chunk that is a single sentence, is
**not dropped** (as in Megatron) and does **not force** a random B (which biases the NSP labels): the
sentence is split at a random token (snapped to a word start when built) into A | B.  What cannot be used
(a chunk of a single one-token sentence, empty items) is counted in :class:`PlanStats`.

Blocks (:func:`plan_blocks`) follow fairseq ``TokenBlockDataset(break_mode="none")`` / RoBERTa
FULL-SENTENCES: the shard's sentences form one token stream (with ``[SEP]`` between documents when
``cross_doc``; one stream per document otherwise) cut into consecutive blocks of ``block`` tokens; the last
block of a stream is shorter — nothing is dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .. import stopping
from .databin import OffsetDataset

log = logging.getLogger("alum_pretrain.data")

# Plan record layouts (one row per sample).
PAIR_DTYPE = np.dtype(
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
BLOCK_DTYPE = np.dtype([("shard", np.int32), ("start", np.int64), ("end", np.int64)])


@dataclass
class PlanStats:
    """What an epoch's plan holds and what it could not use (summed over the epoch's shards)."""

    docs: int = 0
    items: int = 0
    tokens: int = 0
    samples: int = 0
    single_sentence_docs: int = 0  # documents with one sentence (still used: split A|B, and as random-B source)
    single_sentence_splits: int = 0  # pairs made by splitting one sentence at a word start
    random_next: int = 0
    empty_items: int = 0  # zero-length sentences (nothing to use)
    unusable_chunks: int = 0  # a chunk that was one sentence of < 2 tokens, or an A/B of empty items only
    unusable_tokens: int = 0
    truncated_pairs: int = 0
    truncated_tokens: int = 0  # tokens trimmed to fit max_seq_len (pairs mode)
    empty_docs: int = 0
    remainder_samples: int = 0  # not emitted: short of a full global batch with drop_last (come back next time)
    nsp_off_shards: int = 0  # evaluation shards with one document: label-0 pairs only

    def count_shard(self, sizes: np.ndarray, doc_starts: np.ndarray) -> None:
        """Add one shard's documents, items, tokens, empty items and one-sentence documents."""
        self.docs += len(doc_starts) - 1
        self.items += len(sizes)
        self.tokens += int(sizes.sum())
        self.empty_items += int((sizes == 0).sum())
        self.single_sentence_docs += int((np.diff(doc_starts) == 1).sum())


PLAN_CHUNK_DOCS = 4096  # documents planned between two looks at the stop flag (stopping.poll)


def shard_rng(seed: int, epoch: int, shard: int) -> np.random.RandomState:
    """The generator of the plan of ``shard`` in (0-based) ``epoch``: the same on every rank and engine."""
    return np.random.RandomState([int(seed), int(epoch), int(shard), 0])


def doc_starts(ds: OffsetDataset, where: str) -> np.ndarray:
    """The (D+1,) document start items of ``ds``; ValueError naming ``where`` when it has no ``.doc.npy``."""
    starts = ds.doc_starts
    if starts is None:
        raise ValueError(
            f"{where}: no document index (.doc.npy); pre-training needs document boundaries — re-run alum-prep"
        )
    return np.asarray(starts, dtype=np.int64)


def plan_pairs(sizes: np.ndarray, doc_starts: np.ndarray, *, shard: int, rng: np.random.RandomState,
               max_num_tokens: int, short_seq_prob: float, nsp: bool, stats: PlanStats, where: str,
               strict: bool = True) -> np.ndarray:
    """Sentence pairs over every document of one shard (module docstring); rows of :data:`PAIR_DTYPE`.

    ``max_num_tokens``: tokens of A + B (``max_seq_len - 3``).  ``strict=False`` (evaluation splits): a
    shard with a single document gets true-continuation pairs only (label 0) instead of an error, counted
    in ``stats.nsp_off_shards``.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    num_docs = len(doc_starts) - 1
    nsp = _nsp_usable(nsp, num_docs, strict, where, stats)
    stats.count_shard(sizes, doc_starts)
    walk = _PairWalk(sizes.tolist(), [int(x) for x in doc_starts], shard, rng, max_num_tokens, short_seq_prob,
                     nsp, stats)
    for d in range(num_docs):
        if d % PLAN_CHUNK_DOCS == 0:  # a stop signal is honoured within one chunk of a long planning
            stopping.poll("data planning")
        walk.document(d)
    return np.array(walk.rows, dtype=PAIR_DTYPE) if walk.rows else np.zeros(0, dtype=PAIR_DTYPE)


def _nsp_usable(nsp: bool, num_docs: int, strict: bool, where: str, stats: PlanStats) -> bool:
    """Whether random-B pairs can be drawn: NSP needs a second document (an error when ``strict``)."""
    if nsp and num_docs < 2:
        if strict:
            raise ValueError(
                f"{where}: next-sentence prediction needs at least 2 documents per shard (found {num_docs}); "
                "use more text, fewer shards, or --data.nsp=false"
            )
        log.warning("%s: only %d document(s): no random segments possible, all pairs are true continuations",
                    where, num_docs)
        stats.nsp_off_shards += 1
        return False
    return nsp


class _PairWalk:
    """The walk of :func:`plan_pairs` over one shard: chunks of each document become pairs in ``rows``.

    Python lists and prefix sums: the walk visits every sentence, numpy scalar indexing would dominate.
    Every draw from ``rng`` happens in a fixed order (the plan is a function of the seed).
    """

    def __init__(self, size_l: list[int], starts_l: list[int], shard: int, rng: np.random.RandomState,
                 max_num_tokens: int, short_seq_prob: float, nsp: bool, stats: PlanStats):
        self.size_l, self.starts_l, self.shard, self.rng = size_l, starts_l, shard, rng
        self.max_num_tokens, self.short_seq_prob, self.nsp, self.stats = max_num_tokens, short_seq_prob, nsp, stats
        self.num_docs = len(starts_l) - 1
        self.prefix = [0]
        for x in size_l:
            self.prefix.append(self.prefix[-1] + x)
        self.rows: list[tuple] = []

    def new_target(self) -> int:
        """Tokens of the next chunk: ``max_num_tokens``, or with ``short_seq_prob`` a uniform [2, max]."""
        rng = self.rng
        return self.max_num_tokens if rng.random_sample() >= self.short_seq_prob \
            else int(rng.randint(2, self.max_num_tokens + 1))

    def document(self, d: int) -> None:
        """Accumulate sentences of document ``d`` up to the target length, then make a pair of the chunk."""
        size_l, prefix = self.size_l, self.prefix
        lo, hi = self.starts_l[d], self.starts_l[d + 1]
        if prefix[hi] == prefix[lo]:
            self.stats.empty_docs += 1
            return
        target = self.new_target()
        chunk_lo = lo
        cur = 0
        i = lo
        while i < hi:
            cur += size_l[i]
            i += 1
            if i < hi and cur < target:
                continue
            if cur == 0:  # chunk (items chunk_lo .. i-1) of empty items only
                chunk_lo, cur = i, 0
                continue
            i = self.chunk(d, chunk_lo, i, target)
            chunk_lo, cur = i, 0
            target = self.new_target()

    def chunk(self, d: int, chunk_lo: int, i: int, target: int) -> int:
        """The pair of the chunk ``chunk_lo .. i-1`` of document ``d`` (appended to ``rows`` unless unusable);
        returns the item where the next chunk starts."""
        rng, size_l, prefix, stats = self.rng, self.size_l, self.prefix, self.stats
        n = i - chunk_lo
        random_b = self.nsp and rng.random_sample() < 0.5
        a_cut = -1
        if n >= 2:
            a_end = chunk_lo + int(rng.randint(1, n))  # A = chunk_lo .. a_end-1, at least one sentence each side
        else:
            a_end = i
            if not random_b:
                # One sentence: split it at a random token (snapped to a word start at build time).
                sz = size_l[chunk_lo]
                if sz < 2:
                    stats.unusable_chunks += 1
                    stats.unusable_tokens += sz
                    return i
                a_cut = int(rng.randint(1, sz))
        len_a = prefix[a_end] - prefix[chunk_lo] if a_cut < 0 else a_cut
        if random_b:
            b_lo, b_hi, len_b = self.random_segment(d, max(1, target - len_a))
            b_skip = 0
            # Google BERT: the unused sentences of the chunk go back and start the next chunk.
            next_lo = a_end
        elif a_cut >= 0:
            b_lo, b_hi, b_skip = chunk_lo, chunk_lo + 1, a_cut
            len_b = size_l[chunk_lo] - a_cut
            next_lo = i
        else:
            b_lo, b_hi, b_skip = a_end, i, 0
            len_b = prefix[i] - prefix[a_end]
            next_lo = i
        if len_a == 0 or len_b == 0:  # an A or B made only of empty items
            stats.unusable_chunks += 1
            stats.unusable_tokens += len_a + (0 if random_b else len_b)
        else:
            excess = len_a + len_b - self.max_num_tokens
            if excess > 0:
                stats.truncated_pairs += 1
                stats.truncated_tokens += excess
            stats.random_next += int(random_b)
            stats.single_sentence_splits += int(a_cut >= 0 and not random_b)
            self.rows.append((self.shard, chunk_lo, a_end, a_cut, b_lo, b_hi, b_skip, int(random_b),
                              rng.randint(2**32, dtype=np.uint64)))
        return next_lo

    def random_segment(self, d: int, target_b: int) -> tuple[int, int, int]:
        """A random B: uniform over the OTHER documents (never ``d``), a random start sentence, then
        sentences up to ``target_b`` tokens; -> (b_lo, b_hi, tokens), 10 tries for a non-empty one."""
        rng, size_l, starts_l = self.rng, self.size_l, self.starts_l
        for _ in range(10):
            od = int(rng.randint(self.num_docs - 1))
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
        return b_lo, b_hi, len_b


def stream_offsets(sizes: np.ndarray, doc_starts: np.ndarray, cross_doc: bool) -> tuple[np.ndarray, np.ndarray]:
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


def plan_blocks(sizes: np.ndarray, doc_starts: np.ndarray, *, shard: int, block: int, cross_doc: bool,
                stats: PlanStats) -> np.ndarray:
    """Consecutive blocks of ``block`` tokens of the shard's stream(s) (module docstring); rows of
    :data:`BLOCK_DTYPE` (``start``/``end`` are offsets in the stream of :func:`stream_offsets`)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    num_docs = len(doc_starts) - 1
    stats.count_shard(sizes, doc_starts)
    item_off, doc_end = stream_offsets(sizes, doc_starts, cross_doc)
    if cross_doc:
        total = int(doc_end[-1]) if num_docs else 0
        starts = np.arange(0, total, block, dtype=np.int64)
        ends = np.minimum(starts + block, total)
    else:
        doc_begin = np.concatenate([[0], doc_end[:-1]]).astype(np.int64)
        lens = doc_end - doc_begin
        stats.empty_docs += int((lens == 0).sum())
        nb = (lens + block - 1) // block
        first = np.repeat(doc_begin, nb)
        k = np.arange(int(nb.sum()), dtype=np.int64) - np.repeat(np.cumsum(nb) - nb, nb)
        starts = first + k * block
        ends = np.minimum(starts + block, np.repeat(doc_end, nb))
    plan = np.zeros(len(starts), dtype=BLOCK_DTYPE)
    plan["shard"] = shard
    plan["start"] = starts
    plan["end"] = ends
    return plan


#: length grouping sorts this many global batches of the shuffled plan together (fairseq's batch_by_size
#: sorts the whole epoch; a window keeps the content of neighbouring batches random)
GROUP_WINDOW_BATCHES = 64


def pair_lengths(plan: np.ndarray, sizes_of: dict[int, np.ndarray], max_num_tokens: int) -> np.ndarray:
    """Sequence length of every :data:`PAIR_DTYPE` row as built: ``min(len A + len B, max_num_tokens) + 3``
    (``[CLS] A [SEP] B [SEP]``; truncation only trims).  ``sizes_of[shard]``: the shard's item sizes."""
    out = np.zeros(len(plan), dtype=np.int64)
    for shard in np.unique(plan["shard"]).tolist():
        sel = plan["shard"] == shard
        rows = plan[sel]
        prefix = np.zeros(len(sizes_of[shard]) + 1, dtype=np.int64)
        np.cumsum(np.asarray(sizes_of[shard], dtype=np.int64), out=prefix[1:])
        len_a = np.where(rows["a_cut"] >= 0, rows["a_cut"], prefix[rows["a_hi"]] - prefix[rows["a_lo"]])
        len_b = prefix[rows["b_hi"]] - prefix[rows["b_lo"]] - rows["b_skip"]
        out[sel] = np.minimum(len_a + len_b, max_num_tokens) + 3
    return out


def group_by_length(lengths: np.ndarray, global_batch: int, rng: np.random.RandomState,
                    window: int = GROUP_WINDOW_BATCHES) -> np.ndarray:
    """A permutation of ``range(len(lengths))`` whose consecutive ``global_batch`` slices hold samples of
    similar length: each window of ``window`` global batches of the (already shuffled) order is sorted by
    length (stable) and cut into global batches, then the order of all full batches of the epoch is
    shuffled with ``rng``.  The last ``len % global_batch`` samples keep their place at the end (what
    ``drop_last`` drops is unchanged)."""
    n = len(lengths)
    n_full = n - n % global_batch
    span = max(1, window) * global_batch
    batches = [lo + np.argsort(lengths[lo:min(lo + span, n_full)], kind="stable")
               for lo in range(0, n_full, span)]
    if not batches:
        return np.arange(n, dtype=np.int64)
    b = np.concatenate(batches).reshape(-1, global_batch)
    b = b[rng.permutation(len(b))]
    return np.concatenate([b.ravel(), np.arange(n_full, n, dtype=np.int64)])
