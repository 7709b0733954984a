"""The pre-training loader: BERT sentence pairs (+NSP) or RoBERTa packed blocks from a data-bin.

:func:`build_loader` -> :class:`PretrainLoader`, an iterable of batches (the format is described in
:mod:`alum_pretrain.data.samples`).  ``mode="pairs"`` builds ``[CLS] A [SEP] B [SEP]`` with next-sentence
labels, ``mode="blocks"`` packs the corpus into ``[CLS] block [SEP]`` (how samples are planned:
:mod:`alum_pretrain.data.plans`).  What a plan could not use is counted in :attr:`PretrainLoader.stats`
(a :class:`~alum_pretrain.data.plans.PlanStats`) and logged once per epoch.

Shards and epochs (0-based): ``shard_mode="per_epoch"`` reads shard ``e % num_shards`` in epoch ``e``
(fairseq's ``data-bin/shard0:data-bin/shard1``); ``"interleave"`` reads every shard every epoch (pairs
are built per shard — a random B comes from another document of the same shard — then all shards'
samples are shuffled together).  The plan of an epoch is computed from sizes and document boundaries
only, the same on every rank, so ranks take disjoint slices: global batch ``g`` is
plan[g·B·W : (g+1)·B·W] and rank ``r`` takes its ``r``-th ``B`` rows.

Resume: :meth:`PretrainLoader.state_dict` is ``{"epoch", "position", "offset", ...}`` where ``offset``
counts *global* samples consumed in the epoch; :meth:`load_state_dict` continues at exactly that sample
without reading the skipped data (the plan is recomputed, nothing is replayed).  A different world size
or batch size on resume continues at the same global sample.

Length grouping (``group_by_length``, pairs mode, shuffled splits): the epoch's plan is reordered so that
each global batch holds pairs of similar length (:func:`~alum_pretrain.data.plans.group_by_length`), and a
batch is padded to its longest pair rather than ``max_seq_len`` (set ``pad_to_max_len=False``).  The plan
is still a function of (seed, epoch) and the global batch size, holds the same samples, and is cut into
the same contiguous global batches, so resuming is unchanged; on a resume with another batch or world
size the resumed epoch keeps the grouping it was started with (``group_batch`` in the state).
"""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import torch

from .. import stopping
from .databin import DataBin
from .plans import PlanStats, group_by_length, pair_lengths, plan_blocks, plan_pairs, shard_rng
from .samples import MODES, SampleBuilder
from .tokens import TokenTables, build_token_tables

log = logging.getLogger("alum_pretrain.data")

SHARD_MODES = ("per_epoch", "interleave")


class _BatchDataset(torch.utils.data.Dataset):
    """Batch k of the remaining batches of an epoch (for DataLoader workers; order kept by the sampler)."""

    def __init__(self, builder: SampleBuilder, row_sets: list[np.ndarray]):
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
                 pad_to_max_len: bool, num_workers: int, tables: TokenTables | None, group_by_length: bool = False):
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
        self.group_by_length = bool(group_by_length) and mode == "pairs" and self.shuffle
        self._resume_group: tuple[int, int] | None = None  # (epoch, global batch) of a resumed grouped epoch
        self.group_batch = 0  # global batch size the current plan was grouped with (0 = not grouped)
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
        self.builder = SampleBuilder(databin.path, split, mode=mode, tables=self.tables, max_seq_len=self.max_seq_len,
                                     nsp=self.nsp, cross_doc=self.cross_doc, pad_to_multiple_of=pad_to_multiple_of,
                                     pad_to_max_len=pad_to_max_len)
        self.epoch = 0
        self.offset = 0  # global samples consumed in this epoch
        self.position = 0  # batches this loader yielded in this epoch
        self._plan_epoch: int | None = None
        self._plan: np.ndarray | None = None
        self.stats = PlanStats()  # of the last planned epoch

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
        stats = PlanStats()
        parts = []
        for shard in self.shards_for_epoch(epoch):
            stopping.poll("data planning")
            sizes, docs = self.builder.dataset(shard).sizes, self.builder.doc_starts(shard)
            rng = shard_rng(self.seed, epoch, shard)
            if self.mode == "pairs":
                p = plan_pairs(sizes, docs, shard=shard, rng=rng, max_num_tokens=self.max_seq_len - 3,
                               short_seq_prob=self.short_seq_prob, nsp=self.nsp, stats=stats,
                               where=self.builder.where(shard), strict=self.split == "train")
            else:
                p = plan_blocks(sizes, docs, shard=shard, block=self.max_seq_len - 2, cross_doc=self.cross_doc,
                                stats=stats)
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
        if self.group_by_length:
            plan = self._grouped(plan, epoch, gb)
        stats.samples = len(plan)
        stats.remainder_samples = len(plan) % gb if self.drop_last else 0
        self._plan_epoch, self._plan, self.stats = epoch, plan, stats
        if self.rank == 0:
            log.info("%s/%s epoch %d shards %s: %s", self.databin.path, self.split, epoch,
                     self.shards_for_epoch(epoch), stats)
        return plan

    def _grouped(self, plan: np.ndarray, epoch: int, gb: int) -> np.ndarray:
        """``plan`` reordered into global batches of similar-length pairs (module docstring)."""
        if self._resume_group is not None and self._resume_group[0] == epoch:
            gb = self._resume_group[1]
        sizes = {k: self.builder.dataset(k).sizes for k in np.unique(plan["shard"]).tolist()}
        rng = np.random.RandomState([self.seed, epoch, 2**31 - 1, 2])
        self.group_batch = gb
        return plan[group_by_length(pair_lengths(plan, sizes, self.max_seq_len - 3), gb, rng)]

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
            if self.drop_last and n < gb:  # would loop over epochs forever without a batch
                raise ValueError(
                    f"{self.databin.path} split {self.split!r}, epoch {self.epoch} (shard(s) "
                    f"{self.shards_for_epoch(self.epoch)}): only {n} samples, fewer than one global batch of "
                    f"{gb} (--train.batch_size={self.batch_size} x {self.world_size} process(es)); lower "
                    "--train.batch_size (--train.grad_accum or --train.global_batch_size keep a large global "
                    "batch), shorten --data.max_seq_len, or prepare more data")
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
            "group_by_length": self.group_by_length,
            "group_batch": (self.group_batch if self._plan_epoch == self.epoch else self.batch_size * self.world_size)
            if self.group_by_length else 0,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue at the recorded epoch and global sample offset (nothing is replayed or re-read)."""
        for key in ("seed", "mode", "nsp", "max_seq_len", "shard_mode", "split"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"data loader state was saved with {key}={state[key]!r} but this run has {getattr(self, key)!r}; "
                    "resuming would change the data order — restore the original setting or start a new run"
                )
        if "offset" in state and bool(state.get("group_by_length", False)) != self.group_by_length:
            raise ValueError(
                f"data loader state was saved with group_by_length={bool(state.get('group_by_length', False))} but "
                f"this run has {self.group_by_length} (--data.group_by_length); resuming would change the data "
                "order — restore the original setting or start a new run"
            )
        self.epoch = int(state["epoch"])
        self.offset = int(state["offset"])
        if self.group_by_length and state.get("group_batch"):
            self._resume_group = (self.epoch, int(state["group_batch"]))
            self._plan_epoch = None  # re-plan with the resumed grouping
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
    group_by_length: bool = False,
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
        ``loader.stats.remainder_samples``). With False, the remainder is split over the ranks.
    epochs: stop after this many epochs (e.g. 1 for validation); None = forever.
    pad_to_multiple_of: pad to the batch's longest sequence rounded up to this (capped at max_seq_len).
    pad_to_max_len: pad every batch to max_seq_len instead.
    num_workers: build batches in this many DataLoader worker processes (same stream as 0).
    tables: precomputed :class:`TokenTables` (default: built from the data-bin's tokenizer).
    group_by_length: pairs mode, shuffled splits: global batches of similar-length pairs (module docstring);
        use with ``pad_to_max_len=False`` to pad each batch only to its longest pair.
    """
    if not isinstance(databin, DataBin):
        databin = DataBin(databin)
    is_train = split == "train"
    return PretrainLoader(
        databin, split, mode=mode, nsp=nsp, max_seq_len=max_seq_len, batch_size=batch_size, seed=seed, rank=rank,
        world_size=world_size, shard_mode=shard_mode, short_seq_prob=short_seq_prob, cross_doc=cross_doc,
        shuffle=is_train if shuffle is None else shuffle, drop_last=is_train if drop_last is None else drop_last,
        epochs=epochs, pad_to_multiple_of=pad_to_multiple_of, pad_to_max_len=pad_to_max_len,
        num_workers=num_workers, tables=tables, group_by_length=group_by_length,
    )


__all__ = ["SHARD_MODES", "PretrainLoader", "build_loader"]
