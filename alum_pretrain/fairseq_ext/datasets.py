"""fairseq datasets over the project's data-bin shards: sentence chunks, MLM blocks and NSP pairs.

All items are *unmasked* token ids in the fairseq dictionary's id space (``tokenizer id + id_offset``);
masking happens per update in :meth:`AlumMaskedLMTask.train_step` so the masking-rate curriculum can
follow ``update_num`` (see ``task.py``).

* :class:`SentenceChunkDataset` - one item per sentence of the shard, sentences longer than the block
  split into consecutive chunks (nothing is dropped), and the document-end ``[SEP]`` appended to the last
  chunk of every document (the document boundaries come from the ``PREFIX.doc.npy`` side file).
  fairseq's :class:`~fairseq.data.TokenBlockDataset` then packs these into RoBERTa-style blocks.
* :class:`NSPPairDataset` - BERT-style sentence pairs ``[CLS] A [SEP] B [SEP]`` with next-sentence
  labels, planned once per shard (epoch) by the native engine's sampler (shared code, same pairs).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from fairseq.data import FairseqDataset, data_utils

from alum_pretrain.data.plans import PlanStats, plan_pairs, shard_rng
from alum_pretrain.data.samples import SampleBuilder

logger = logging.getLogger(__name__)


def load_doc_starts(prefix: str, num_items: int) -> np.ndarray:
    """Document start indices (length D+1, last = N) from ``PREFIX.doc.npy``; one document if absent."""
    path = prefix + ".doc.npy"
    if not os.path.exists(path):
        logger.warning("%s not found: treating the whole split as one document "
                       "(data-bins written by alum-prep always have it)", path)
        return np.array([0, num_items], dtype=np.int64)
    doc = np.load(path).astype(np.int64)
    if doc.ndim != 1 or len(doc) < 1 or doc[0] != 0 or doc[-1] != num_items or np.any(np.diff(doc) < 0):
        raise ValueError(f"{path}: not a valid document index for {num_items} items "
                         f"(must start at 0, end at {num_items}, be non-decreasing); re-run alum-prep")
    return doc


class _SizedDataset(FairseqDataset):
    """fairseq's size protocol from a precomputed ``self._sizes`` (tokens per item, int64)."""

    _sizes: np.ndarray

    @property
    def sizes(self) -> np.ndarray:
        return self._sizes

    def num_tokens(self, index):
        return int(self._sizes[index])

    def size(self, index):
        return int(self._sizes[index])


class FairseqIds:
    """The native reader of one shard and split (:meth:`DataBin.split <alum_pretrain.data.databin.DataBin.split>`,
    range-checked against the vocabulary) as fairseq ids: item ``i`` is a LongTensor of tokenizer ids +
    ``id_offset``.  An id outside the vocabulary raises the native engine's
    :class:`~alum_pretrain.data.databin.DataIntegrityError` naming the shard, split and item."""

    def __init__(self, reader, id_offset: int):
        self.reader = reader
        self.id_offset = int(id_offset)
        self.sizes = reader.sizes

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.reader[int(i)] + self.id_offset)


class SentenceChunkDataset(_SizedDataset):
    """Sentences of ``base`` cut to at most ``max_len`` tokens, ``sep`` appended at each document's end.

    ``base``: a fairseq indexed dataset (items = sentences, no EOS); ``doc_starts``: (D+1,) item index of
    each document start.  Item ``j`` is chunk ``j``: tokens ``[start_j, end_j)`` of sentence ``item_j``,
    followed by ``sep`` if it is the last chunk of a document's last sentence.  The SEP counts towards
    ``max_len``, so every item fits a block of ``max_len`` tokens.
    """

    def __init__(self, base, doc_starts: np.ndarray, max_len: int, sep: int):
        if max_len < 2:
            raise ValueError(f"--tokens-per-sample leaves a block of {max_len} tokens; need at least 2")
        sizes = np.asarray(base.sizes, dtype=np.int64)  # (N,)
        n = len(sizes)
        is_doc_end = np.zeros(n, dtype=bool)
        ends = doc_starts[1:] - 1
        is_doc_end[ends[(ends >= 0) & (doc_starts[1:] > doc_starts[:-1])]] = True
        eff = sizes + is_doc_end  # tokens incl. the document-end SEP
        self.base = base
        self.sep = sep
        if (eff <= max_len).all() and (eff > 0).all():
            # Common case (no long or empty sentence): chunk j = sentence j, no index arrays needed.
            self._item = self._start = self._end = None
            self._add_sep = is_doc_end
            self._sizes = eff
            return
        nchunks = np.maximum(1, -(-eff // max_len))  # ceil; empty sentences still give one (SEP-only or empty) chunk
        item = np.repeat(np.arange(n), nchunks)  # (M,)
        first = np.cumsum(nchunks) - nchunks  # chunk index of each item's first chunk
        k = np.arange(len(item)) - first[item]  # chunk number within its item
        start = k * max_len
        end = np.minimum(start + max_len, sizes[item])
        last = k == nchunks[item] - 1
        add_sep = last & is_doc_end[item]
        keep = (end - start + add_sep) > 0  # drop empty sentences that are not document ends
        self._item = item[keep]
        self._start = start[keep]
        self._end = end[keep]
        self._add_sep = add_sep[keep]
        self._sizes = (self._end - self._start + self._add_sep).astype(np.int64)

    def __len__(self) -> int:
        return len(self._sizes)

    def __getitem__(self, index: int) -> torch.Tensor:
        if self._item is None:
            toks = self.base[int(index)].long()
        else:
            toks = self.base[int(self._item[index])][int(self._start[index]):int(self._end[index])].long()
        if self._add_sep[index]:
            toks = torch.cat([toks, toks.new_tensor([self.sep])])
        return toks

    @property
    def supports_prefetch(self) -> bool:
        return False


class NSPPairDataset(_SizedDataset):
    """BERT sentence pairs ``[CLS] A [SEP] B [SEP]`` with next-sentence labels (0 next, 1 random).

    The sampling is the native engine's, shared rather than re-implemented: the epoch plan comes from
    :func:`alum_pretrain.data.plans.plan_pairs` (Google BERT's ``create_instances_from_document``,
    without its single-sentence biases) and each pair is assembled by the native
    :meth:`SampleBuilder.pair <alum_pretrain.data.samples.SampleBuilder.pair>` (truncation, split-point
    snapping).  Here the result is moved to fairseq ids (``+ id_offset``) and the segment ids are dropped
    (fairseq RoBERTa has no segment embeddings).  The plan is drawn from
    :func:`~alum_pretrain.data.plans.shard_rng` for ``(seed, epoch - 1, shard)`` - the native loader's
    generator for the same (0-based) epoch and shard - so both engines see the same pairs.

    Each item is ``{"source": LongTensor (L,), "nsp": int}``.
    """

    def __init__(self, root: str, shard: int, split: str, tokens_per_sample: int, tables, id_offset: int,
                 short_seq_prob: float = 0.1, seed: int = 1, epoch: int = 1):
        if tokens_per_sample < 5:
            raise ValueError(f"--tokens-per-sample {tokens_per_sample} is too small for sentence pairs (need >= 5)")
        self.builder = SampleBuilder(root, split, mode="pairs", tables=tables, max_seq_len=tokens_per_sample, nsp=True)
        where = self.builder.where(shard)
        sizes = np.asarray(self.builder.dataset(shard).sizes, dtype=np.int64)
        stats = PlanStats()
        try:
            plan = plan_pairs(sizes, self.builder.doc_starts(shard), shard=shard, rng=shard_rng(seed, epoch - 1, shard),
                              max_num_tokens=tokens_per_sample - 3, short_seq_prob=short_seq_prob, nsp=True,
                              stats=stats, where=where)
        except ValueError as e:
            raise ValueError(f"{where}: --sample-mode pairs needs at least 2 documents per shard and split for "
                             f"random next sentences ({e}); use --sample-mode blocks, more data, or for a tiny "
                             "valid split --disable-validation (or alum-prep --valid-fraction)") from e
        if len(plan) == 0:
            raise ValueError(f"{where}: no sentence pairs could be built ({stats})")
        self.plan = plan
        self.id_offset = int(id_offset)
        la = np.where(plan["a_cut"] >= 0, plan["a_cut"], sizes_between(sizes, plan["a_lo"], plan["a_hi"]))
        lb = sizes_between(sizes, plan["b_lo"], plan["b_hi"]) - plan["b_skip"]
        self._sizes = (np.minimum(la + lb, tokens_per_sample - 3) + 3).astype(np.int64)
        logger.info("%s: %d NSP pairs (%.1f%% random next); %s", where, len(plan), 100.0 * plan["label"].mean(), stats)

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, index: int) -> dict:
        ids, _, _ = self.builder.pair(self.plan[index])  # tokenizer ids, [CLS] A [SEP] B [SEP]
        return {"source": torch.from_numpy(ids + self.id_offset), "nsp": int(self.plan[index]["label"])}

    def ordered_indices(self):
        return np.arange(len(self))

    @property
    def supports_prefetch(self) -> bool:
        return False


def sizes_between(sizes: np.ndarray, first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Total tokens of items ``[first_i, last_i)`` for every i (vectorised with a prefix sum)."""
    csum = np.concatenate([[0], np.cumsum(sizes)])
    return csum[last] - csum[first]


class NSPSampleDataset(FairseqDataset):
    """Collates :class:`NSPPairDataset` items into fairseq samples (same keys as ``masked_lm`` + ``nsp_target``)."""

    def __init__(self, pairs: NSPPairDataset, pad: int):
        self.pairs = pairs
        self.pad = pad

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index):
        item = self.pairs[index]
        return {"id": index, "source": item["source"], "nsp": item["nsp"]}

    @property
    def sizes(self):
        return self.pairs.sizes

    def num_tokens(self, index):
        return self.pairs.num_tokens(index)

    def size(self, index):
        return self.pairs.size(index)

    def ordered_indices(self):
        return np.arange(len(self))

    def collater(self, samples):
        if len(samples) == 0:
            return {}
        src = data_utils.collate_tokens([s["source"] for s in samples], self.pad, left_pad=False)
        return {
            "id": torch.LongTensor([s["id"] for s in samples]),
            "net_input": {
                "src_tokens": src,  # (B, T) unmasked; the task masks it per update
                "src_lengths": torch.LongTensor([s["source"].numel() for s in samples]),
            },
            "nsp_target": torch.LongTensor([s["nsp"] for s in samples]),  # (B,)
            "nsentences": len(samples),
            "ntokens": sum(int(s["source"].numel()) for s in samples),
        }

    @property
    def supports_prefetch(self) -> bool:
        return False
