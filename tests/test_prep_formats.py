"""alum-prep on the formats corpora ship in today: Parquet (files, row groups, hub-style folders of shards) and
compressed JSON lines (.jsonl.gz / .jsonl.zst / .jsonl.xz) give the *same data-bin, byte for byte* as the same
documents in plain jsonl; damaged files give errors naming the file (and row group) and leave nothing behind;
every shard folder carries dict.txt so that stock fairseq reads ``DATA/shard0:DATA/shard1``."""

from __future__ import annotations

import gzip
import json
import lzma
import random
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import requires_fairseq
from data_prep import PrepConfig, prepare

pa = pytest.importorskip("pyarrow", reason="pyarrow not installed (pip install -r requirements.txt)")
pq = pytest.importorskip("pyarrow.parquet")
zstd = pytest.importorskip("zstandard", reason="zstandard not installed (pip install -r requirements.txt)")

WORDS = ("the river city north south bank bridge station music album song band record film actor "
         "game team season league player match war army battle king queen church house road rail "
         "is was has had and of in on at to for with by from were are built played released won").split()


def make_docs(n: int = 30, seed: int = 0) -> list[str]:
    """Distinct multi-sentence documents (paragraphs separated by newlines) from a fixed word list."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        paras = []
        for _ in range(rng.randint(1, 3)):
            sents = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))).capitalize() + "."
                     for _ in range(rng.randint(1, 4))]
            paras.append(" ".join(sents))
        docs.append(f"Document number {i}. " + "\n".join(paras))
    return docs


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> Path:
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "document", "number"] + sorted(set(WORDS))
    pieces += list("abcdefghijklmnopqrstuvwxyz0123456789") + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    p = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    p.write_text("\n".join(pieces) + "\n", encoding="utf-8")
    return p


def run(inputs, fmt, out, vocab, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("valid_fraction", 0.25)
    kw.setdefault("shards", 2)
    kw.setdefault("min_doc_chars", 10)
    overwrite = kw.pop("overwrite", False)
    return prepare(PrepConfig(inputs=[str(p) for p in inputs], format=fmt, out=out, vocab=vocab, **kw), overwrite=overwrite)


def databin_bytes(out: Path) -> dict[str, bytes]:
    """Every output file that carries data (not the manifest, which records paths and timings)."""
    files = {}
    for f in sorted(out.rglob("*")):
        if f.is_file() and f.name != "manifest.json":
            files[str(f.relative_to(out))] = f.read_bytes()
    return files


def write_jsonl(path: Path, docs: list[str]) -> bytes:
    data = "".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)).encode()
    path.write_bytes(data)
    return data


@pytest.fixture(scope="module")
def reference(tmp_path_factory, vocab):
    """The data-bin of the documents as plain jsonl (the reference every other format must equal)."""
    tmp = tmp_path_factory.mktemp("ref")
    docs = make_docs()
    write_jsonl(tmp / "c.jsonl", docs)
    m = run([tmp / "c.jsonl"], "jsonl", tmp / "out", vocab)
    assert m["counts"]["documents"] == len(docs)
    assert all(s["valid"]["documents"] > 0 and s["train"]["documents"] > 0 for s in m["shards"])
    return docs, databin_bytes(tmp / "out")


def test_compressed_jsonl_equals_plain(tmp_path, vocab, reference):
    docs, ref = reference
    data = "".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)).encode()
    half = len(data) // 2
    half = data.index(b"\n", half) + 1
    # .zst as two concatenated frames (pzstd and some dataset tools write several), .gz, .xz
    (tmp_path / "c.jsonl.zst").write_bytes(zstd.ZstdCompressor().compress(data[:half]) +
                                           zstd.ZstdCompressor(level=9).compress(data[half:]))
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(data))
    (tmp_path / "c.jsonl.xz").write_bytes(lzma.compress(data))
    for name in ("c.jsonl.zst", "c.jsonl.gz", "c.jsonl.xz"):
        out = tmp_path / f"out-{name}"
        run([tmp_path / name], "jsonl", out, vocab)
        assert databin_bytes(out) == ref, name


def test_zstd_streaming_reader_matches_the_library(tmp_path):
    """Our incremental multi-frame reader against zstandard's one-shot decompression of each frame."""
    from data_prep.readers_columnar import open_zstd

    rng = random.Random(3)
    frames = [bytes(rng.getrandbits(8) for _ in range(n)) * 3 for n in (1, 5000, 300_000)]
    blob = b"".join(zstd.ZstdCompressor(level=3).compress(f) for f in frames)
    with open_zstd(__import__("io").BytesIO(blob), "mem.zst") as fh:
        got = fh.read()
    assert got == b"".join(zstd.ZstdDecompressor().decompress(zstd.ZstdCompressor(level=3).compress(f)) for f in frames)


def write_parquet(path: Path, docs: list[str], row_group_size: int, **kw) -> None:
    table = pa.table({"id": [str(i) for i in range(len(docs))],
                      "url": [f"https://en.wikipedia.org/wiki?curid={i}" for i in range(len(docs))],
                      "title": [f"Title {i}" for i in range(len(docs))], "text": docs})
    pq.write_table(table, str(path), row_group_size=row_group_size, **kw)


def test_parquet_file_with_row_groups_equals_plain(tmp_path, vocab, reference):
    docs, ref = reference
    f = tmp_path / "wiki.parquet"
    write_parquet(f, docs, row_group_size=7)
    assert pq.ParquetFile(str(f)).num_row_groups == 5
    m = run([f], "parquet", tmp_path / "out", vocab)
    assert databin_bytes(tmp_path / "out") == ref
    assert m["config"]["text_column"] == "text" and m["format"] == "parquet"


def test_parquet_folder_of_shards_like_the_hub(tmp_path, vocab, reference):
    """``20231101.en/train-0000K-of-00003.parquet`` plus the hub's README.md: only *.parquet are read, by name."""
    docs, ref = reference
    folder = tmp_path / "wikipedia" / "20231101.en"
    folder.mkdir(parents=True)
    cuts = [0, 9, 21, len(docs)]
    for k in range(3):
        write_parquet(folder / f"train-{k:05d}-of-00003.parquet", docs[cuts[k]:cuts[k + 1]], row_group_size=4)
    (tmp_path / "wikipedia" / "README.md").write_text("---\nlicense: cc-by-sa-3.0\n---\n")
    run([tmp_path / "wikipedia"], "parquet", tmp_path / "out", vocab)
    assert databin_bytes(tmp_path / "out") == ref


def test_parquet_text_and_title_columns(tmp_path, vocab):
    docs = make_docs(8, seed=5)
    f = tmp_path / "owt.parquet"
    pq.write_table(pa.table({"content": docs, "name": [f"Heading number {i}" for i in range(8)],
                             "n": list(range(8))}), str(f), row_group_size=3)
    with pytest.raises(ValueError, match=r"owt.parquet: no column 'text' \(the file has content, name, n\); set --text-column"):
        run([f], "parquet", tmp_path / "o1", vocab)
    with pytest.raises(ValueError, match=r"owt.parquet: column 'n' has type int64, not text"):
        run([f], "parquet", tmp_path / "o2", vocab, text_column="n")
    with pytest.raises(ValueError, match=r"no column 'title'"):
        run([f], "parquet", tmp_path / "o3", vocab, text_column="content", title_column="title")
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))
    plain = run([f], "parquet", tmp_path / "plain", vocab, text_column="content", shards=1, valid_fraction=0)
    titled = run([f], "parquet", tmp_path / "titled", vocab, text_column="content", title_column="name",
                 keep_headings=True, shards=1, valid_fraction=0)
    # --keep-headings: the title is one more sentence at the start of every document
    assert titled["counts"]["sentences"] == plain["counts"]["sentences"] + 8
    with pytest.raises(ValueError, match=r"--text-column/--title-column only apply to --format parquet"):
        run([f], "jsonl", tmp_path / "o4", vocab, text_column="content")


def test_parquet_nulls_are_counted_empty_docs(tmp_path, vocab):
    docs = make_docs(6, seed=9)
    f = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": docs[:3] + [None] + docs[3:]}), str(f), row_group_size=2)
    m = run([f], "parquet", tmp_path / "out", vocab, shards=1, valid_fraction=0)
    assert m["counts"]["documents_read"] == 7 and m["counts"]["documents"] == 6
    assert m["counts"]["dropped"]["empty"] == 1


def test_corrupt_and_truncated_parquet(tmp_path, vocab):
    docs = make_docs(40, seed=2)
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"text": docs}), str(good), row_group_size=10, use_dictionary=False,
                   write_page_checksum=True)
    data = good.read_bytes()
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(data[: len(data) * 2 // 3])  # an interrupted download: no footer
    with pytest.raises(ValueError, match=r"cut.parquet: not a readable Parquet file .*download is complete"):
        run([cut], "parquet", tmp_path / "out", vocab)
    # damage inside row group 2's data pages (the page CRC catches it even where snappy would not)
    col = pq.ParquetFile(str(good)).metadata.row_group(2).column(0)
    off = col.data_page_offset + col.total_compressed_size // 2
    bad = bytearray(data)
    bad[off:off + 16] = bytes(range(200, 216))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(bytes(bad))
    with pytest.raises(ValueError, match=r"broken.parquet: row group 2 of 4 is corrupt"):
        run([broken], "parquet", tmp_path / "out", vocab)
    notpq = tmp_path / "x.parquet"
    notpq.write_text("id,text\n1,hello\n")
    with pytest.raises(ValueError, match=r"x.parquet: not a readable Parquet file"):
        run([notpq], "parquet", tmp_path / "out", vocab)
    assert not (tmp_path / "out").exists()


def test_truncated_and_corrupt_zst(tmp_path, vocab):
    data = "".join(json.dumps({"text": d}) + "\n" for d in make_docs(200, seed=4)).encode()
    comp = zstd.ZstdCompressor().compress(data)
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(comp[: len(comp) // 2])
    with pytest.raises(ValueError, match=r"cut.jsonl.zst: Zstandard data is truncated"):
        run([cut], "jsonl", tmp_path / "out", vocab)
    garbage = tmp_path / "garbage.jsonl.zst"
    garbage.write_bytes(b"this is not zstd at all\n" * 10)
    with pytest.raises(ValueError, match=r"garbage.jsonl.zst: corrupt Zstandard data"):
        run([garbage], "jsonl", tmp_path / "out", vocab)
    gz = tmp_path / "cut.jsonl.gz"
    gz.write_bytes(gzip.compress(data)[:-30])
    with pytest.raises(ValueError, match=r"cut.jsonl.gz: compressed data is truncated or corrupt"):
        run([gz], "jsonl", tmp_path / "out", vocab)
    assert not (tmp_path / "out").exists()


def test_dict_txt_in_every_shard(tmp_path, vocab):
    docs = make_docs(12, seed=7)
    f = tmp_path / "c.jsonl"
    write_jsonl(f, docs)
    out = tmp_path / "out"
    run([f], "jsonl", out, vocab, shards=3)
    root = (out / "dict.txt").read_bytes()
    for k in range(3):
        d = out / f"shard{k}" / "dict.txt"
        assert d.is_file() and not d.is_symlink() and d.read_bytes() == root
    # a data-bin written before shards carried dict.txt gets its copies on a re-run of the same command
    for k in range(3):
        (out / f"shard{k}" / "dict.txt").unlink()
    run([f], "jsonl", out, vocab, shards=3)
    assert all((out / f"shard{k}" / "dict.txt").read_bytes() == root for k in range(3))


@requires_fairseq
def test_stock_fairseq_masked_lm_trains_on_two_shards(tmp_path, vocab):
    """``fairseq-train OUT/shard0:OUT/shard1 --task masked_lm`` (stock fairseq, no --user-dir), 3 updates."""
    docs = make_docs(60, seed=11)
    f = tmp_path / "c.jsonl"
    write_jsonl(f, docs)
    out = tmp_path / "bin"
    run([f], "jsonl", out, vocab, shards=2, valid_fraction=0.2)
    cmd = [sys.executable, "-m", "fairseq_cli.train", f"{out}/shard0:{out}/shard1", "--task", "masked_lm",
           "--criterion", "masked_lm", "--arch", "roberta_base", "--encoder-layers", "1", "--encoder-embed-dim", "32",
           "--encoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2", "--tokens-per-sample", "64",
           "--sample-break-mode", "complete", "--batch-size", "4", "--optimizer", "adam", "--lr", "1e-4",
           "--max-update", "3", "--max-epoch", "2", "--cpu", "--no-save", "--log-format", "simple",
           "--log-interval", "1", "--num-workers", "0", "--seed", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    text = r.stdout + r.stderr
    assert "num_updates 3" in text or "num_updates\": \"3" in text or "| num_updates 3" in text, text[-2000:]
    assert "shard0" in text
