"""alum-prep restarts: a killed run, re-run with the same arguments, skips finished work and ends with the
same bytes as an uninterrupted run; no truncated file ever sits under a final name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import data_prep.segments as segments
import data_prep.work as work
from alum_pretrain.data.databin import DataBin
from alum_pretrain.data.indexed import MMapIndexedDataset
from data_prep import PrepConfig, prepare

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("restart")
    docs = []
    for i in range(120):
        sents = [" ".join(WORDS[(i * 3 + j * 5 + k) % len(WORDS)] for k in range(6 + (i + j) % 5)).capitalize() + "."
                 for j in range(1 + i % 4)]
        docs.append(f"Doc {i}. " + " ".join(sents))
    f = d / "c.txt"
    f.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    vocab = d / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "doc"] + WORDS +
                               [str(i) for i in range(10)] + [f"##{i}" for i in range(10)]) + "\n", encoding="utf-8")
    return f, vocab


def run(corpus, out, **kw):
    f, vocab = corpus
    kw.setdefault("progress", False)
    overwrite = kw.pop("overwrite", False)
    cfg = PrepConfig(inputs=[str(f)], format="text", out=out, vocab=vocab, shards=2, valid_fraction=0.2, segment_mb=0.002, **kw)
    return prepare(cfg, overwrite=overwrite)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    m = run(corpus, out)
    assert m["num_segments"] >= 4  # the corpus is ~12 KB, segments are ~2 KB
    return out, m


def shard_records(m):
    return [(s["shard"], s["train"]["files"], s["valid"]["files"]) for s in m["shards"]]


def final_prefixes_are_whole(out: Path):
    """Every .idx under a final name opens and matches its .bin (nothing truncated is published)."""
    for idx in out.glob("shard*/*.idx"):
        MMapIndexedDataset(str(idx)[: -len(".idx")])


def test_kill_while_streaming_then_resume(corpus, reference, tmp_path, monkeypatch):
    ref_out, ref_m = reference
    out = tmp_path / "out"
    real = work.work_encode
    calls = {"n": 0, "docs": 0}

    def dying(texts):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # the user pressed Ctrl-C / the job was killed mid-stream
        return real(texts)

    monkeypatch.setattr(work, "CHUNK_DOCS", 16)
    monkeypatch.setattr(work, "work_encode", dying)
    with pytest.raises(KeyboardInterrupt):
        run(corpus, out)
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "running"
    done = [j for j, s in m["segments"].items() if s["status"] == "complete"]
    assert 1 <= len(done) < m["num_segments"]
    assert not list(out.glob("shard*/*.idx"))  # no shard published
    with pytest.raises(ValueError, match="did not finish"):
        DataBin(out)
    # A leftover temp file from the killed builder must not survive or be mistaken for output.
    (out / ".parts" / "seg99999").mkdir(parents=True, exist_ok=True)
    (out / ".parts" / "seg99999" / "train.bin.tmp").write_bytes(b"\x00" * 7)

    def counting(texts):
        calls["docs"] += len(texts)
        return real(texts)

    monkeypatch.setattr(work, "work_encode", counting)
    m2 = run(corpus, out)
    assert m2["status"] == "complete"
    assert 0 < calls["docs"] < ref_m["counts"]["documents_read"]  # the finished segments were skipped
    assert shard_records(m2) == shard_records(ref_m)  # byte-identical to the uninterrupted run
    assert (out / "dict.txt").read_bytes() == (ref_out / "dict.txt").read_bytes()
    assert m2["counts"] == ref_m["counts"]
    assert not list(out.rglob("*.tmp")) and not (out / ".parts").exists()


def test_kill_while_merging_then_resume(corpus, reference, tmp_path, monkeypatch):
    _, ref_m = reference
    out = tmp_path / "out"
    real = segments.merge
    merged = []

    def dying(parts, prefix):
        if len(merged) == 2:  # shard0 train+valid done, die on shard1
            Path(prefix).parent.mkdir(parents=True, exist_ok=True)
            Path(str(prefix) + ".bin.tmp").write_bytes(b"\x01\x02\x03")  # a half-written temp file
            raise KeyboardInterrupt
        merged.append(str(prefix))
        return real(parts, prefix)

    monkeypatch.setattr(segments, "merge", dying)
    with pytest.raises(KeyboardInterrupt):
        run(corpus, out)
    m = json.loads((out / "manifest.json").read_text())
    assert [s["status"] for s in m["shards"]] == ["complete"]
    # an interrupt (Ctrl-C, a stop signal) removes its temporary files; a kill -9 leaves them: put the
    # half-written one back, as a killed merge would have left it, for the resume to clean up
    assert not (out / "shard1" / "train.idx").exists() and not list(out.rglob("*.tmp"))
    (out / "shard1" / "train.bin.tmp").write_bytes(b"\x01\x02\x03")
    final_prefixes_are_whole(out)

    merged.clear()
    monkeypatch.setattr(segments, "merge", lambda parts, prefix: (merged.append(str(prefix)), real(parts, prefix)))
    m2 = run(corpus, out)
    assert all("shard0" not in p for p in merged) and len(merged) == 2  # shard0 verified and skipped
    assert shard_records(m2) == shard_records(ref_m)
    assert not list(out.rglob("*.tmp"))
    final_prefixes_are_whole(out)


def test_corrupted_complete_databin_is_detected(corpus, tmp_path):
    out = tmp_path / "out"
    run(corpus, out)
    p = out / "shard1" / "train.bin"
    data = bytearray(p.read_bytes())
    data[10] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"shard1/train.bin content differs.*--overwrite"):
        run(corpus, out)


def test_one_part_shard_rebuilt_only_from_intact_parts(corpus, tmp_path, monkeypatch):
    """A one-segment shard's files are hard links of its part files: killed after the merge, a shard replaced
    by a bad copy is rebuilt from the intact part (same bytes as an uninterrupted run), while a shard
    corrupted in place (so its part too) is refused rather than rebuilt from bad data."""
    from data_prep import pipeline

    f, vocab = corpus

    def one_segment(out):
        return prepare(PrepConfig(inputs=[str(f)], format="text", out=out, vocab=vocab, shards=2, valid_fraction=0.2,
                                  progress=False))

    ref = one_segment(tmp_path / "ref")
    real = pipeline.Preparer._write_dict

    def killed(self, *a):
        raise KeyboardInterrupt

    for how in ("replaced", "in_place"):
        out = tmp_path / how
        monkeypatch.setattr(pipeline.Preparer, "_write_dict", killed)
        with pytest.raises(KeyboardInterrupt):
            one_segment(out)
        monkeypatch.setattr(pipeline.Preparer, "_write_dict", real)
        p = out / "shard1" / "train.bin"
        data = bytearray(p.read_bytes())
        data[0] ^= 0xFF
        if how == "replaced":  # a new file under the name: the part keeps the good bytes
            p.unlink()
            p.write_bytes(bytes(data))
            m = one_segment(out)
            assert shard_records(m) == shard_records(ref)
        else:
            with open(p, "r+b") as fh:
                fh.write(bytes(data[:1]))
            with pytest.raises(ValueError, match="and so do its parts"):
                one_segment(out)
