"""Memory-mapped token datasets in fairseq's ``MMapIndexedDataset`` layout (no fairseq needed).

On-disk format (one *prefix*, e.g. ``data-bin/shard0/train``):

``PREFIX.idx`` — fairseq ``MMIDIDX`` version 1, little-endian::

    offset  size  type   content
    0       9     bytes  b"MMIDIDX\\x00\\x00"
    9       8     <Q     version = 1
    17      1     <B     dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64,
                         7 double, 8 uint16, 9 uint32, 10 uint64)
    18      8     <Q     N = number of items
    26      4*N   int32  sizes (tokens per item)
    26+4N   8*N   int64  byte offsets of each item in PREFIX.bin

``PREFIX.bin`` — the items' tokens back to back, little-endian, no header.

``PREFIX.doc.npy`` — (project addition, ignored by fairseq) int64 array of length D+1: item index at
which each document starts, the last entry = N.  Document d is items ``doc[d]:doc[d+1]``.  This is
Megatron's ``document_indices`` kept in a side file so that the ``.idx`` stays byte-compatible with
fairseq (Megatron puts it inside the ``.idx``, which fairseq then misreads).

The reader also accepts Megatron's ``.idx`` (which carries a document count at offset 26 and the
document index after the pointers) when ``megatron=True``.

Writers write to ``PREFIX.{bin,idx,doc.npy}.tmp`` and rename only in :meth:`IndexedDatasetBuilder.finalize`
(``.bin`` first, ``.idx`` last: a prefix whose ``.idx`` exists is complete), so a killed run never leaves a
truncated file under its final name.
"""

from __future__ import annotations

import contextlib
import os
import struct
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from ..atomic import atomic_file

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<9sQBQ")  # magic, version, dtype code, count -> 26 bytes

DTYPE_TO_CODE = {
    np.dtype(np.uint8): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.int32): 4,
    np.dtype(np.int64): 5,
    np.dtype(np.float64): 6,
    np.dtype(np.uint16): 8,
    np.dtype(np.uint32): 9,
    np.dtype(np.uint64): 10,
}
CODE_TO_DTYPE = {code: dt for dt, code in DTYPE_TO_CODE.items()}
CODE_TO_DTYPE[7] = np.dtype(np.float64)


def best_dtype(vocab_size: int) -> np.dtype:
    """fairseq's ``best_fitting_int_dtype``: uint16 below 65,500 symbols, else uint32."""
    if vocab_size < 65500:
        return np.dtype(np.uint16)
    if vocab_size < 4294967295:
        return np.dtype(np.uint32)
    return np.dtype(np.int64)


def _publish(prefix: Path, dtype: np.dtype, sizes: np.ndarray, doc_starts: np.ndarray,
             publish_bin: Callable[[], None]) -> None:
    """Write ``PREFIX.idx`` and ``PREFIX.doc.npy`` through temporaries; rename ``.bin`` (``publish_bin``),
    then ``.doc.npy``, then ``.idx``: a prefix whose ``.idx`` exists is complete."""
    sizes = np.asarray(sizes, dtype=np.int32)
    pointers = np.zeros(len(sizes), dtype=np.int64)
    if len(sizes) > 1:
        np.cumsum(sizes[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    with atomic_file(f"{prefix}.idx", durable=True) as tmp_idx:
        with open(tmp_idx, "wb") as fh:
            fh.write(_HEADER.pack(MAGIC, VERSION, DTYPE_TO_CODE[dtype], len(sizes)))
            fh.write(sizes.astype("<i4").tobytes(order="C"))
            fh.write(pointers.astype("<i8").tobytes(order="C"))
        with atomic_file(f"{prefix}.doc.npy", durable=True) as tmp_doc:
            with open(tmp_doc, "wb") as fh:
                np.save(fh, np.asarray(doc_starts, dtype=np.int64))
            publish_bin()


class _Abort(Exception):
    pass


class IndexedDatasetBuilder:
    """Appends items (1-D integer arrays) and document boundaries; ``finalize()`` publishes the files.

    >>> b = IndexedDatasetBuilder("out/train", vocab_size=30526)
    >>> b.add_item([101, 2023, 102]); b.end_document(); b.finalize()
    """

    def __init__(self, prefix: str | os.PathLike, vocab_size: int | None = None, dtype=None):
        if dtype is None:
            if vocab_size is None:
                raise ValueError("IndexedDatasetBuilder needs vocab_size or dtype")
            dtype = best_dtype(vocab_size)
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPE_TO_CODE:
            raise ValueError(f"unsupported dtype {self.dtype}")
        self.prefix = Path(prefix)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._pending = contextlib.ExitStack()  # the .bin, renamed into place by finalize()
        self._bin = open(self._pending.enter_context(atomic_file(f"{self.prefix}.bin", durable=True)), "wb")
        self.sizes: list[int] = []
        self.doc_starts: list[int] = [0]
        self._max = np.iinfo(self.dtype).max if self.dtype.kind in "iu" else None

    def add_item(self, tokens: Sequence[int] | np.ndarray) -> None:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"an item must be 1-D, got shape {arr.shape}")
        if self._max is not None and arr.size and (arr.min() < 0 or arr.max() > self._max):
            raise ValueError(f"token id out of range for {self.dtype}: min {arr.min()}, max {arr.max()}")
        self._bin.write(arr.astype(self.dtype.newbyteorder("<"), copy=False).tobytes(order="C"))
        self.sizes.append(int(arr.size))

    def add_items(self, tokens: np.ndarray, sizes: Sequence[int] | np.ndarray) -> None:
        """Append several items at once: ``tokens`` is their concatenation, ``sizes`` their lengths.

        The fast path for writers that receive a whole document as one flat array (no per-item Python loop).
        """
        arr = np.asarray(tokens)
        sizes = np.asarray(sizes, dtype=np.int64)
        if arr.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {arr.shape}")
        if int(sizes.sum()) != arr.size or (sizes.size and sizes.min() < 0):
            raise ValueError(f"sizes sum to {int(sizes.sum())} but there are {arr.size} tokens")
        if self._max is not None and arr.size and arr.dtype != self.dtype and (arr.min() < 0 or arr.max() > self._max):
            raise ValueError(f"token id out of range for {self.dtype}: min {arr.min()}, max {arr.max()}")
        self._bin.write(arr.astype(self.dtype.newbyteorder("<"), copy=False).tobytes(order="C"))
        self.sizes.extend(sizes.tolist())

    def add_document(self, items: Iterable[Sequence[int]]) -> None:
        for item in items:
            self.add_item(item)
        self.end_document()

    def end_document(self) -> None:
        """Close the current document (no-op when it has no items)."""
        if len(self.sizes) > self.doc_starts[-1]:
            self.doc_starts.append(len(self.sizes))

    def finalize(self) -> None:
        self.end_document()
        self._bin.close()
        _publish(self.prefix, self.dtype, self.sizes, self.doc_starts, self._pending.close)

    def abort(self) -> None:
        """Close and delete the temp files (nothing is published)."""
        self._bin.close()
        with contextlib.suppress(_Abort), self._pending:
            raise _Abort  # unwinds the pending .bin write: its temporary is removed


class MMapIndexedDataset:
    """Read-only view of ``PREFIX.{idx,bin}`` (+ ``PREFIX.doc.npy`` when present).

    ``ds[i]`` is a NumPy array (the on-disk dtype, zero-copy); ``ds.sizes`` the item lengths;
    ``ds.doc_starts`` the document index (``None`` when there is no side file and no Megatron index).
    Pickles as its path, so DataLoader workers re-open the memory map.
    """

    def __init__(self, prefix: str | os.PathLike, megatron: bool = False):
        self.prefix = str(prefix)
        self.megatron = megatron
        self._open()

    def _open(self) -> None:
        idx_path = self.prefix + ".idx"
        bin_path = self.prefix + ".bin"
        for p in (idx_path, bin_path):
            if not os.path.exists(p):
                raise FileNotFoundError(f"{p}: missing (expected a fairseq mmap dataset at prefix {self.prefix})")
        with open(idx_path, "rb") as fh:
            head = fh.read(_HEADER.size)
        if len(head) < _HEADER.size:
            raise ValueError(f"{idx_path}: truncated header ({len(head)} bytes)")
        magic, version, code, count = _HEADER.unpack(head)
        if magic != MAGIC:
            raise ValueError(f"{idx_path}: not an MMIDIDX index (magic {magic!r})")
        if version != VERSION:
            raise ValueError(f"{idx_path}: unsupported MMIDIDX version {version}")
        if code not in CODE_TO_DTYPE:
            raise ValueError(f"{idx_path}: unknown dtype code {code}")
        self.dtype = CODE_TO_DTYPE[code]
        self._idx = np.memmap(idx_path, mode="r", order="C")
        offset = _HEADER.size
        doc_count = None
        if self.megatron:
            (doc_count,) = struct.unpack("<Q", bytes(self._idx[offset : offset + 8]))
            offset += 8
        expected = offset + 12 * count + (8 * doc_count if doc_count is not None else 0)
        if self._idx.size < expected:
            raise ValueError(f"{idx_path}: truncated ({self._idx.size} bytes, expected at least {expected})")
        self.sizes = np.frombuffer(self._idx, dtype="<i4", count=count, offset=offset)
        self.pointers = np.frombuffer(self._idx, dtype="<i8", count=count, offset=offset + 4 * count)
        self.doc_starts: np.ndarray | None = None
        if doc_count is not None:
            self.doc_starts = np.frombuffer(
                self._idx, dtype="<i8", count=doc_count, offset=offset + 12 * count
            ).astype(np.int64)
        elif os.path.exists(self.prefix + ".doc.npy"):
            self.doc_starts = np.load(self.prefix + ".doc.npy")
            if self.doc_starts[-1] != count:
                raise ValueError(
                    f"{self.prefix}.doc.npy: ends at item {self.doc_starts[-1]} but the index has {count} items"
                )
        nbytes = int(self.sizes.astype(np.int64).sum()) * self.dtype.itemsize
        bin_size = os.path.getsize(bin_path)
        if bin_size < nbytes:
            raise ValueError(f"{bin_path}: truncated ({bin_size} bytes, index expects {nbytes})")
        self._bin = np.memmap(bin_path, mode="r", order="C") if bin_size else np.zeros(0, np.uint8)

    def __getstate__(self):
        return {"prefix": self.prefix, "megatron": self.megatron}

    def __setstate__(self, state):
        self.prefix = state["prefix"]
        self.megatron = state["megatron"]
        self._open()

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"item {i} out of range for {len(self)} items in {self.prefix}")
        i = int(i) % len(self)
        return np.frombuffer(self._bin, dtype=self.dtype, count=int(self.sizes[i]), offset=int(self.pointers[i]))

    @property
    def num_docs(self) -> int:
        return 0 if self.doc_starts is None else len(self.doc_starts) - 1

    def all_tokens(self) -> np.ndarray:
        """Every item's tokens, concatenated in item order: a zero-copy view of ``.bin`` in the on-disk dtype.

        The builder writes items back to back from offset 0, so this is the first ``sizes.sum()`` tokens of
        the file; an index whose pointers say otherwise is refused with :class:`ValueError`.
        """
        nbytes = int(self.sizes.astype(np.int64).sum()) * self.dtype.itemsize
        last_end = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if len(self) else 0
        if len(self) and (int(self.pointers[0]) != 0 or last_end != nbytes):
            raise ValueError(f"{self.prefix}.idx: items are not stored back to back from offset 0")
        return self._bin[:nbytes].view(self.dtype)

    def document(self, d: int) -> list[np.ndarray]:
        """The items of document ``d``."""
        if self.doc_starts is None:
            raise ValueError(f"{self.prefix}: no document index ({self.prefix}.doc.npy missing)")
        return [self[i] for i in range(int(self.doc_starts[d]), int(self.doc_starts[d + 1]))]


def merge(prefixes: Sequence[str | os.PathLike], out_prefix: str | os.PathLike) -> None:
    """Concatenate datasets (same dtype) into ``out_prefix``, documents kept; written atomically.

    Items keep their order (all of ``prefixes[0]``, then ``prefixes[1]``, ...); each part's document index
    is shifted by the number of items before it.  Parts without a ``.doc.npy`` count as one document.
    """
    out_prefix = Path(out_prefix)
    parts = [MMapIndexedDataset(p) for p in prefixes]
    if not parts:
        raise ValueError(f"merge into {out_prefix}: no input datasets")
    dtype = parts[0].dtype
    for p in parts:
        if p.dtype != dtype:
            raise ValueError(f"merge into {out_prefix}: {p.prefix} has dtype {p.dtype}, {parts[0].prefix} has {dtype}")
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    sizes = np.concatenate([np.asarray(p.sizes, dtype=np.int32) for p in parts]) if parts else np.zeros(0, np.int32)
    doc = [np.zeros(1, dtype=np.int64)]
    n_before = 0
    for p in parts:
        starts = p.doc_starts if p.doc_starts is not None else np.array([0, len(p)], dtype=np.int64)
        doc.append(starts[1:].astype(np.int64) + n_before)
        n_before += len(p)
    doc_starts = np.concatenate(doc)

    def copy_bins() -> None:
        with atomic_file(f"{out_prefix}.bin", durable=True) as tmp_bin, open(tmp_bin, "wb") as out:
            for p in parts:
                nbytes = int(np.asarray(p.sizes, dtype=np.int64).sum()) * dtype.itemsize
                with open(p.prefix + ".bin", "rb") as src:
                    remaining = nbytes
                    while remaining:
                        buf = src.read(min(remaining, 1 << 24))
                        if not buf:
                            raise ValueError(f"{p.prefix}.bin: shorter than its index says")
                        out.write(buf)
                        remaining -= len(buf)

    _publish(out_prefix, dtype, sizes, doc_starts, copy_bins)

def exists(prefix: str | os.PathLike) -> bool:
    return os.path.exists(f"{prefix}.idx") and os.path.exists(f"{prefix}.bin")
