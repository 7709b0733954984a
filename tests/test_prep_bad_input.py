"""alum-prep on bad input: each case gives a clear error (or a counted repair) and loses nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from alum_pretrain.data.databin import DataBin
from data_prep import EmptyCorpusError, PrepConfig, prepare
from data_prep.cli import main as cli_main

GOOD = "The first document has a sentence. And another one follows here.\n\nThe second document is also here. It ends now."


@pytest.fixture()
def vocab(tmp_path):
    """A small uncased WordPiece vocab covering the test texts (plus every ASCII letter as a fallback)."""
    words = set("the first document has a sentence and another one follows here second is also it ends now".split())
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "!", "?"] + sorted(words)
    pieces += [c for c in "abcdefghijklmnopqrstuvwxyz0123456789" if c not in words]
    pieces += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    p = tmp_path / "vocab.txt"
    p.write_text("\n".join(pieces) + "\n", encoding="utf-8")
    return p


def run(inputs, out, vocab, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("valid_fraction", 0.0)
    overwrite = kw.pop("overwrite", False)
    return prepare(PrepConfig(inputs=[str(p) for p in inputs], format="text", out=out, vocab=vocab, **kw), overwrite=overwrite)


def all_tokens(out: Path) -> list[list[int]]:
    db = DataBin(out)
    return [db.split(k, s)[i].tolist() for k in range(db.num_shards) for s in ("train", "valid")
            for i in range(len(db.split(k, s)))]


def test_invalid_utf8_replace_counts(tmp_path, vocab):
    f = tmp_path / "c.txt"
    data = GOOD.encode() + b"\n\nBad \xff\xfe bytes and a cut \xe2\x82 here too.\n"
    f.write_bytes(data)
    m = run([f], tmp_path / "out", vocab)
    # Python's own "replace" decoding says how many invalid sequences there are (3: ff, fe, e2 82).
    assert m["counts"]["decode_replacements"] == data.decode("utf-8", "replace").count("\ufffd") == 3
    assert m["counts"]["documents"] == 3


def test_invalid_utf8_fail_names_file_and_offset(tmp_path, vocab):
    f = tmp_path / "c.txt"
    data = GOOD.encode() + b"\n\nBad \xff bytes.\n"
    f.write_bytes(data)
    with pytest.raises(ValueError) as e:
        run([f], tmp_path / "out", vocab, on_decode_error="fail")
    msg = str(e.value)
    offset = data.index(b"\xff")
    assert str(f) in msg and f"byte offset {offset}" in msg and "--on-decode-error replace" in msg
    assert not (tmp_path / "out").exists()  # nothing left behind
    # The CLI turns it into a one-line error and exit status 2.
    assert cli_main([str(f), "--format", "text", "--vocab", str(vocab), "--out", str(tmp_path / "o2"),
                     "--on-decode-error", "fail", "--no-progress"]) == 2


def test_nul_bytes_and_control_chars_are_removed_and_counted(tmp_path, vocab):
    f = tmp_path / "c.txt"
    f.write_bytes(GOOD.replace("first", "fi\x00rst").replace("second", "sec\x00\x00ond\x07").encode())
    m = run([f], tmp_path / "out", vocab)
    g = tmp_path / "clean.txt"
    g.write_text(GOOD, encoding="utf-8")
    m2 = run([g], tmp_path / "out2", vocab)
    assert m["counts"]["control_chars_removed"] == 4
    assert all_tokens(tmp_path / "out") == all_tokens(tmp_path / "out2")


def test_crlf_equals_lf(tmp_path, vocab):
    f = tmp_path / "crlf.txt"
    f.write_bytes(GOOD.replace("\n", "\r\n").encode())
    g = tmp_path / "lf.txt"
    g.write_bytes(GOOD.encode())
    m1 = run([f], tmp_path / "a", vocab)
    m2 = run([g], tmp_path / "b", vocab)
    assert m1["counts"]["documents"] == m2["counts"]["documents"] == 2
    assert m1["shards"][0]["train"]["files"] == m2["shards"][0]["train"]["files"]  # byte-identical output


def test_ten_megabyte_single_line(tmp_path, vocab):
    line = ("the first document has a sentence and another one follows here " * 160_000)[: 10 * 1024 * 1024]
    f = tmp_path / "big.txt"
    f.write_text(line + "\n\n" + GOOD, encoding="utf-8")
    m = run([f], tmp_path / "out", vocab, max_tokens=510)
    c = m["counts"]
    assert c["documents"] == 3
    ds = DataBin(tmp_path / "out").split(0, "train")
    assert max(ds.sizes) <= 510
    assert c["overlong_sentences"] >= 1
    assert c["tokens"] >= len(line.split())  # every word kept (one token per word with this vocab)


def test_empty_corpus_is_an_error_and_leaves_nothing(tmp_path, vocab):
    f = tmp_path / "empty.txt"
    f.write_text("\n\n  \n\nhi\n\n\x00\n", encoding="utf-8")
    with pytest.raises(EmptyCorpusError, match="empty corpus"):
        run([f], tmp_path / "out", vocab)
    assert not (tmp_path / "out").exists()
    z = tmp_path / "zero.txt"
    z.write_bytes(b"")
    with pytest.raises(ValueError, match="empty corpus"):
        run([z], tmp_path / "out", vocab)
    assert not (tmp_path / "out").exists()


def test_vocab_with_duplicate_lines_is_rejected(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text(GOOD, encoding="utf-8")
    v = tmp_path / "dup.txt"
    v.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\na\nthe\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"dup.txt:8: token 'the' already on line 6"):
        run([f], tmp_path / "out", v)
    assert not (tmp_path / "out").exists()


def test_missing_input_file(tmp_path, vocab):
    with pytest.raises(FileNotFoundError, match=r"nope\.txt: input not found"):
        run([tmp_path / "nope.txt"], tmp_path / "out", vocab)
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="--vocab file not found"):
        f = tmp_path / "c.txt"
        f.write_text(GOOD)
        run([f], tmp_path / "out", tmp_path / "no_vocab.txt")


def test_unwritable_output_folder(tmp_path, vocab):
    f = tmp_path / "c.txt"
    f.write_text(GOOD, encoding="utf-8")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="not writable"):
        run([f], blocker / "out", vocab)
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(PermissionError, match="not writable"):
                run([f], ro / "out", vocab)
        finally:
            ro.chmod(0o700)


def test_existing_output_from_another_command(tmp_path, vocab):
    f = tmp_path / "c.txt"
    f.write_text(GOOD, encoding="utf-8")
    out = tmp_path / "out"
    m1 = run([f], out, vocab)
    # same command again: verified, nothing redone
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    m_again = run([f], out, vocab, workers=2)  # workers change speed only: same command
    assert m_again["fingerprint"] == m1["fingerprint"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    # a different command is refused, with the way out in the message
    with pytest.raises(ValueError, match="different command.*--overwrite"):
        run([f], out, vocab, shards=2)
    assert json.loads((out / "manifest.json").read_text())["num_shards"] == 1  # untouched
    m2 = run([f], out, vocab, shards=2, overwrite=True)
    assert m2["num_shards"] == 2 and DataBin(out).num_shards == 2
    # a non-empty folder that is not a data-bin is never written into, even with --overwrite
    other = tmp_path / "mine"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an alum-prep output"):
        run([f], other, vocab, overwrite=True)
    assert (other / "precious.txt").read_text() == "keep me"


def test_changed_input_is_a_different_command(tmp_path, vocab):
    f = tmp_path / "c.txt"
    f.write_text(GOOD, encoding="utf-8")
    run([f], tmp_path / "out", vocab)
    f.write_text(GOOD + "\n\nA third document appears here now.", encoding="utf-8")
    with pytest.raises(ValueError, match="different command or different inputs"):
        run([f], tmp_path / "out", vocab)


def test_truncated_compressed_and_broken_xml(tmp_path, vocab):
    import bz2

    xml = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">\n<page>\n<title>A</title>\n<ns>0</ns>\n'
           '<revision>\n<text>The first document has a sentence. And another one follows here.</text>\n'
           '</revision>\n</page>\n</mediawiki>\n')
    data = bz2.compress(xml.encode())
    f = tmp_path / "cut-pages-articles.xml.bz2"
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut-pages-articles.xml.bz2: compressed data is truncated or corrupt"):
        prepare(PrepConfig(inputs=[f], format="wiki-xml", out=tmp_path / "out", vocab=vocab, progress=False))
    g = tmp_path / "broken-pages-articles.xml"
    g.write_text(xml.replace("</revision>", "</revisio>"), encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken-pages-articles.xml: invalid XML"):
        prepare(PrepConfig(inputs=[g], format="wiki-xml", out=tmp_path / "out", vocab=vocab, progress=False))
    assert not (tmp_path / "out").exists()
