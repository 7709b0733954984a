"""The fairseq-compatible mmap dataset: bytes on disk against the layout in DESIGN.md, written here by hand."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from alum_pretrain.data.indexed import IndexedDatasetBuilder, MMapIndexedDataset, best_dtype, exists, merge
from conftest import requires_fairseq


def expected_idx(sizes, dtype_code: int, itemsize: int) -> bytes:
    """fairseq MMIDIDX v1: magic, <Q version, <B dtype code, <Q count, int32 sizes, int64 byte pointers."""
    out = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", dtype_code) + struct.pack("<Q", len(sizes))
    out += b"".join(struct.pack("<i", s) for s in sizes)
    ptr = 0
    for s in sizes:
        out += struct.pack("<q", ptr)
        ptr += s * itemsize
    return out


ITEMS = [[5, 6, 7], [8], [9, 10], [], [65000, 4]]
DOCS = [[0, 1], [2, 3, 4]]  # document 0 = items 0-1, document 1 = items 2-4


def build(prefix, items=ITEMS, docs=DOCS, vocab_size=65001):
    b = IndexedDatasetBuilder(prefix, vocab_size=vocab_size)
    for d in docs:
        for i in d:
            b.add_item(items[i])
        b.end_document()
    b.finalize()


def test_bytes_match_the_fairseq_layout(tmp_path):
    prefix = tmp_path / "train"
    build(prefix)
    assert (tmp_path / "train.idx").read_bytes() == expected_idx([len(x) for x in ITEMS], 8, 2)
    assert (tmp_path / "train.bin").read_bytes() == b"".join(struct.pack("<H", t) for x in ITEMS for t in x)
    assert np.load(tmp_path / "train.doc.npy").tolist() == [0, 2, 5]
    ds = MMapIndexedDataset(prefix)
    assert [ds[i].tolist() for i in range(len(ds))] == ITEMS and ds.dtype == np.uint16
    assert [[x.tolist() for x in ds.document(d)] for d in range(ds.num_docs)] == [[ITEMS[i] for i in d] for d in DOCS]
    assert not list(tmp_path.glob("*.tmp"))


def test_add_items_equals_add_item(tmp_path):
    build(tmp_path / "a")
    b = IndexedDatasetBuilder(tmp_path / "b", vocab_size=65001)
    for d in DOCS:
        flat = np.concatenate([np.asarray(ITEMS[i], dtype=np.uint16) for i in d])
        b.add_items(flat, [len(ITEMS[i]) for i in d])
        b.end_document()
    b.finalize()
    for ext in ("bin", "idx", "doc.npy"):
        assert (tmp_path / f"a.{ext}").read_bytes() == (tmp_path / f"b.{ext}").read_bytes()
    with pytest.raises(ValueError, match="sizes sum"):
        IndexedDatasetBuilder(tmp_path / "c", vocab_size=10).add_items(np.arange(3), [1, 1])


def test_dtype_choice_and_range_check(tmp_path):
    assert best_dtype(30526) == np.uint16 and best_dtype(65499) == np.uint16 and best_dtype(65500) == np.uint32
    b = IndexedDatasetBuilder(tmp_path / "x", vocab_size=100)
    with pytest.raises(ValueError, match="out of range"):
        b.add_item([70000])
    b.abort()
    assert not list(tmp_path.iterdir())
    build(tmp_path / "big", items=[[70000, 1]], docs=[[0]], vocab_size=80000)
    assert (tmp_path / "big.idx").read_bytes() == expected_idx([2], 9, 4)


def test_merge_concatenates_items_and_documents(tmp_path):
    build(tmp_path / "p0")
    build(tmp_path / "p1", items=[[1, 2], [3]], docs=[[0], [1]])
    build(tmp_path / "p2", items=[], docs=[])
    merge([tmp_path / "p0", tmp_path / "p2", tmp_path / "p1"], tmp_path / "m")
    ds = MMapIndexedDataset(tmp_path / "m")
    assert [ds[i].tolist() for i in range(len(ds))] == ITEMS + [[1, 2], [3]]
    assert ds.doc_starts.tolist() == [0, 2, 5, 6, 7]
    # merged bytes = what one builder writing everything would produce
    build(tmp_path / "one", items=ITEMS + [[1, 2], [3]], docs=DOCS + [[5], [6]])
    for ext in ("bin", "idx", "doc.npy"):
        assert (tmp_path / f"m.{ext}").read_bytes() == (tmp_path / f"one.{ext}").read_bytes()


def test_all_tokens_is_every_item_in_order(tmp_path):
    build(tmp_path / "a")
    ds = MMapIndexedDataset(tmp_path / "a")
    flat = ds.all_tokens()
    assert flat.dtype == ds.dtype and flat.tolist() == [t for item in ITEMS for t in item]
    assert np.shares_memory(flat, ds[0])  # a view of the memory map, not a copy
    IndexedDatasetBuilder(tmp_path / "e", vocab_size=10).finalize()
    assert MMapIndexedDataset(tmp_path / "e").all_tokens().size == 0
    # items that do not start at offset 0 (readable one by one) are not one flat run of tokens
    sizes = [len(i) for i in ITEMS]
    idx = bytearray(expected_idx(sizes, 8, 2))  # code 8 = uint16
    ptr_at = 26 + 4 * len(sizes)
    for k in range(len(sizes)):
        p = struct.unpack_from("<q", idx, ptr_at + 8 * k)[0]
        struct.pack_into("<q", idx, ptr_at + 8 * k, p + 2)
    (tmp_path / "s.idx").write_bytes(bytes(idx))
    (tmp_path / "s.bin").write_bytes(b"\0\0" + (tmp_path / "a.bin").read_bytes())
    shifted = MMapIndexedDataset(tmp_path / "s")
    assert shifted[4].tolist() == ITEMS[4]
    with pytest.raises(ValueError, match="back to back"):
        shifted.all_tokens()


def test_empty_dataset_and_truncation(tmp_path):
    IndexedDatasetBuilder(tmp_path / "e", vocab_size=10).finalize()
    e = MMapIndexedDataset(tmp_path / "e")
    assert len(e) == 0 and e.num_docs == 0 and exists(tmp_path / "e")
    build(tmp_path / "t")
    data = (tmp_path / "t.bin").read_bytes()
    (tmp_path / "t.bin").write_bytes(data[:-2])
    with pytest.raises(ValueError, match="truncated"):
        MMapIndexedDataset(tmp_path / "t")
    with pytest.raises(FileNotFoundError, match="missing"):
        MMapIndexedDataset(tmp_path / "nothing")


@requires_fairseq
@pytest.mark.fairseq
def test_fairseq_reads_our_files(tmp_path):
    from fairseq.data.indexed_dataset import MMapIndexedDataset as FairseqMMap

    build(tmp_path / "train")
    ds = FairseqMMap(str(tmp_path / "train"))
    assert [ds[i].tolist() for i in range(len(ds))] == ITEMS
