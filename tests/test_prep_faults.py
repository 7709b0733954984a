"""alum-prep fault injection (seeded): garbage corpora, corrupt compressed inputs, wrong formats, failed starts.

Each case asserts the exact outcome: what is counted (checked against a reference computed here from the
definitions, with Python's own UTF-8 decoder and ``unicodedata``), which error names which file, and that a
failed fresh run leaves nothing behind and never blocks the corrected command.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
import re
import tarfile
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from alum_pretrain.data.databin import DataBin
from data_prep import PrepConfig, prepare
from data_prep.cli import main as cli_main
from data_prep.hygiene import GarbledCorpusError

WORDS = "the first document has a sentence and another one follows here second is also it ends now".split()
MAX_FRAC = 0.2  # the documented default of --max-garbage-frac


@pytest.fixture()
def vocab(tmp_path):
    """A small uncased WordPiece vocab covering WORDS (plus every ASCII letter/digit as a fallback)."""
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "!", "?"] + sorted(set(WORDS))
    pieces += [c for c in "abcdefghijklmnopqrstuvwxyz0123456789" if c not in WORDS]
    pieces += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    p = tmp_path / "vocab.txt"
    p.write_text("\n".join(pieces) + "\n", encoding="utf-8")
    return p


def good_docs(n: int, seed: int = 0, sentences: int = 4) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(" ".join(rng.choice(WORDS, 9)).capitalize() + "." for _ in range(sentences)) + f" Doc {i}."
            for i in range(n)]


def random_doc(nbytes: int, seed: int) -> bytes:
    """Random bytes as one 'document' of --format text: no newline, so no blank line splits it."""
    data = np.random.default_rng(seed).bytes(nbytes)
    return data.replace(b"\n", b"A").replace(b"\r", b"B")


def garbage_chars(text: str) -> int:
    """Reference: U+FFFD plus C0/C1 controls (Unicode category Cc) other than tab, LF and CR."""
    return sum(1 for ch in text if ch == "\ufffd" or (unicodedata.category(ch) == "Cc" and ch not in "\t\n\r"))


def run(inputs, out, vocab, fmt="text", **kw):
    kw.setdefault("progress", False)
    kw.setdefault("valid_fraction", 0.0)
    overwrite = kw.pop("overwrite", False)
    return prepare(PrepConfig(inputs=[str(p) for p in inputs], format=fmt, out=out, vocab=vocab, **kw), overwrite=overwrite)


def cli(args, capsys) -> tuple[int, str]:
    rc = cli_main([str(a) for a in args])
    return rc, capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------
# Garbage
# --------------------------------------------------------------------------------------------------------


def test_urandom_corpus_is_an_error_and_leaves_nothing(tmp_path, vocab, capsys):
    f = tmp_path / "random.txt"
    f.write_bytes(np.random.default_rng(1).bytes(200_000))  # /dev/urandom, seeded
    out = tmp_path / "new" / "deeper" / "out"
    rc, err = cli([f, "--format", "text", "--vocab", vocab, "--out", out, "--no-progress"], capsys)
    assert rc == 2
    assert f"alum-prep: error: {f}: mostly garbage" in err and "--max-garbage-frac 1 keeps every document" in err
    assert not (tmp_path / "new").exists()  # not even the parent folders it had created
    with pytest.raises(GarbledCorpusError):
        run([f], out, vocab)
    # The way out that the message names: keep everything (junk tokens), a complete data-bin.
    m = run([f], out, vocab, max_garbage_frac=1.0)
    assert m["status"] == "complete" and m["counts"]["dropped"]["garbled"] == 0
    data = f.read_bytes()  # invalid sequences = U+FFFD after "replace" minus those literally in the data
    assert m["counts"]["decode_replacements"] == (data.decode("utf-8", "replace").count("\ufffd")
                                                 - data.decode("utf-8", "ignore").count("\ufffd"))


def test_garbled_documents_are_dropped_and_counted(tmp_path, vocab, capsys):
    good = good_docs(12)
    latin1 = "Le café était très chaud à midi. Élise a gagné la deuxième manche près de Nîmes."
    at_limit = "a" * 80 + "\ufffd" * 20  # exactly 0.2: kept (the threshold is "more than")
    over = "a" * 79 + "\ufffd" * 21  # 0.21: dropped
    ctrl = "b " * 30 + "\x01\x02\x1b\x7f\x85" * 10  # controls only, 50 of 110 characters: dropped
    blobs = [d.encode() for d in good] + [latin1.encode("latin-1"), at_limit.encode(), over.encode(), ctrl.encode()]
    blobs += [random_doc(300, seed) for seed in range(3)]
    f = tmp_path / "mixed.txt"
    f.write_bytes(b"\n\n".join(blobs) + b"\n")
    out = tmp_path / "out"
    rc, err = cli([f, "--format", "text", "--vocab", vocab, "--out", out, "--no-progress", "--valid-fraction", "0"], capsys)
    assert rc == 0, err
    m = json.loads((out / "manifest.json").read_text())
    c = m["counts"]
    texts = [b.decode("utf-8", "replace") for b in blobs]
    expect_garbled = sum(garbage_chars(t) / len(t) > MAX_FRAC for t in texts)
    assert expect_garbled == 5  # over, ctrl and the three random blobs; at_limit and latin1 are kept
    assert c["dropped"]["garbled"] == expect_garbled
    assert c["documents"] == len(blobs) - expect_garbled
    assert c["decode_replacements"] == sum(t.count("\ufffd") for t in texts) - at_limit.count("\ufffd") - over.count("\ufffd")
    assert c["chars_read"] == sum(len(t) for t in texts)
    assert c["garbled_chars"] == sum(len(t) for t in texts if garbage_chars(t) / len(t) > MAX_FRAC)
    # The console summary always says it (with --no-progress too), and warns: these shares are large.
    assert f"decode replacements {c['decode_replacements']} (" in err
    assert f"garbled documents dropped {expect_garbled} (" in err and "--max-garbage-frac 0.2" in err
    assert "alum-prep: warning:" in err and "invalid UTF-8 sequences were replaced" in err and "iconv" in err
    assert f"{expect_garbled} of {len(blobs)} documents" in err
    assert any("dropped as garbled" in w for w in m["warnings"])
    # A stricter threshold drops the Latin-1 document and at_limit too.
    m0 = run([f], tmp_path / "strict", vocab, max_garbage_frac=0.1, workers=2)  # the worker pool decides the same
    assert m0["counts"]["dropped"]["garbled"] == sum(garbage_chars(t) / len(t) > 0.1 for t in texts) == 7


def test_clean_corpus_reports_zero_and_warns_nothing(tmp_path, vocab, capsys):
    f = tmp_path / "clean.txt"
    f.write_text("\n\n".join(good_docs(5)) + "\n", encoding="utf-8")
    rc, err = cli([f, "--format", "text", "--vocab", vocab, "--out", tmp_path / "o", "--no-progress",
                   "--valid-fraction", "0"], capsys)
    assert rc == 0
    assert "input hygiene: decode replacements 0 (0.00% of" in err and "control characters removed 0 (0.00%)" in err
    assert "garbled documents dropped 0 (0.00% of 5 read" in err
    assert "warning" not in err


def test_utf16_corpus_is_diagnosed_up_front_and_refused(tmp_path, vocab, capsys):
    f = tmp_path / "utf16.txt"
    f.write_bytes("\n\n".join(good_docs(20)).encode("utf-16"))  # with its byte-order mark
    rc, err = cli([f, "--format", "text", "--vocab", vocab, "--out", tmp_path / "o", "--no-progress"], capsys)
    assert rc == 2
    assert f"alum-prep: warning: {f} starts with" in err and "it looks like UTF-16 text; convert it to UTF-8" in err
    assert f"alum-prep: error: {f}: mostly garbage" in err
    assert not (tmp_path / "o").exists()


def test_device_or_fifo_input_is_refused(tmp_path, vocab):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=rf"{re.escape(str(fifo))}: not a regular file"):
        run([fifo], tmp_path / "out", vocab)
    assert not (tmp_path / "out").exists()


def test_one_huge_garbage_document_makes_the_corpus_mostly_garbage(tmp_path, vocab):
    """Few documents, but most of the characters are junk: refused by the character share."""
    f = tmp_path / "c.txt"
    f.write_bytes(("\n\n".join(good_docs(3)) + "\n\n").encode() + random_doc(20_000, 7) + b"\n")
    with pytest.raises(GarbledCorpusError, match=r"1 of 4 documents \(25\.00%\)"):
        run([f], tmp_path / "out", vocab)
    assert not (tmp_path / "out").exists()


def test_garbage_check_applies_to_tokenizer_training(tmp_path):
    f = tmp_path / "random.txt"
    f.write_bytes(np.random.default_rng(2).bytes(50_000))
    with pytest.raises(GarbledCorpusError, match="mostly garbage"):
        prepare(PrepConfig(inputs=[f], format="text", out=tmp_path / "out", train_tokenizer="spm-unigram", vocab_size=300,
                           progress=False))
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------------
# Wrong --format
# --------------------------------------------------------------------------------------------------------

JSONL = "\n".join(json.dumps({"id": i, "text": d}) for i, d in enumerate(good_docs(4))) + "\n"
WIKI_XML = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">\n  <siteinfo><sitename>W'
            '</sitename></siteinfo>\n  <page>\n    <title>A</title>\n    <ns>0</ns>\n    <revision>\n      <text>'
            + good_docs(1)[0] + '</text>\n    </revision>\n  </page>\n</mediawiki>\n')
WIKIEXTRACTOR = '<doc id="12" url="https://en.wikipedia.org/wiki?curid=12" title="A">\nA\n\n' + good_docs(1)[0] + "\n</doc>\n"
OTHER_XML = '<?xml version="1.0" encoding="UTF-8"?>\n<records>\n<r>' + good_docs(1)[0] + "</r>\n</records>\n"
HTML = "<!DOCTYPE html>\n<html><body><p>" + good_docs(1)[0] + "</p></body></html>\n"
WIKITEXT = " = Title = \n\n " + good_docs(1)[0] + " \n\n = = Section = = \n\n " + good_docs(1, seed=1)[0] + " \n"


@pytest.mark.parametrize("name,content,says", [
    ("data.jsonl", JSONL, "looks like JSON lines, but --format text reads it as plain text"),
    ("dump.xml", WIKI_XML, "looks like a MediaWiki XML dump"),
    ("wiki_00", WIKIEXTRACTOR, "looks like WikiExtractor output"),
    ("records.xml", OTHER_XML, "looks like XML"),
    ("wiki.test.raw", WIKITEXT, "looks like WikiText"),
    ("page.html", HTML, "looks like HTML"),
], ids=["jsonl", "wiki-xml", "wikiextractor", "xml", "wikitext", "html"])
def test_format_text_on_another_format_warns_and_names_it(tmp_path, vocab, capsys, name, content, says):
    hint = {"data.jsonl": "use --format jsonl", "dump.xml": "use --format wiki-xml",
            "wiki_00": "use --format wikiextractor", "records.xml": "--format wiki-xml for a MediaWiki dump",
            "wiki.test.raw": "use --format wikitext", "page.html": "use a text extractor first"}[name]
    f = tmp_path / name
    f.write_text(content, encoding="utf-8")
    rc, err = cli([f, "--format", "text", "--vocab", vocab, "--out", tmp_path / "o", "--no-progress",
                   "--valid-fraction", "0", "--min-doc-chars", "1"], capsys)
    assert rc == 0, err
    assert f"alum-prep: warning: {f} {says}" in err and hint in err
    # Compressed, it is recognised the same way (the sniffer reads through the decompressor).
    g = tmp_path / (name + ".bz2")
    g.write_bytes(bz2.compress(content.encode()))
    rc, err = cli([g, "--format", "text", "--vocab", vocab, "--out", tmp_path / "o2", "--no-progress",
                   "--valid-fraction", "0", "--min-doc-chars", "1"], capsys)
    assert rc == 0 and f"alum-prep: warning: {g} {says}" in err


def test_plain_text_and_the_right_format_do_not_warn(tmp_path, vocab, capsys):
    f = tmp_path / "c.txt"
    f.write_text("{curly} is how this one starts.\n\n" + "\n\n".join(good_docs(3)) + "\n", encoding="utf-8")
    rc, err = cli([f, "--format", "text", "--vocab", vocab, "--out", tmp_path / "o", "--no-progress",
                   "--valid-fraction", "0"], capsys)
    assert rc == 0 and "warning" not in err
    g = tmp_path / "d.jsonl"
    g.write_text(JSONL, encoding="utf-8")
    rc, err = cli([g, "--format", "jsonl", "--vocab", vocab, "--out", tmp_path / "o2", "--no-progress",
                   "--valid-fraction", "0"], capsys)
    assert rc == 0 and "warning" not in err


# --------------------------------------------------------------------------------------------------------
# Corrupt compressed inputs: every error names the file; a fresh run leaves nothing
# --------------------------------------------------------------------------------------------------------


def _big_text() -> bytes:
    # ~220 KB of text: three bz2 blocks at compresslevel 1, far more than the 64 KB sniff window.
    return ("\n\n".join(good_docs(500, seed=3, sentences=8)) + "\n").encode()


def _tar_xz(docs: list[bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for i, d in enumerate(docs):
            info = tarfile.TarInfo(f"doc{i:04d}.txt")
            info.size = len(d)
            tar.addfile(info, io.BytesIO(d))
    return buf.getvalue()


def _flip(data: bytes, at: float | int) -> bytes:
    """Flip one bit at byte ``at`` (an int) or at that share of the data (a float)."""
    i = at if isinstance(at, int) else int(len(data) * at)
    return data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1:]


OWT_DOCS = [d.encode() for d in good_docs(300, seed=4, sentences=8)]

# name, --format, bytes, late (True: the damage lies past the 64 KB that are checked before anything is
# written, so the error comes from the streaming pass, after the output folder was created)
CORRUPTIONS = {
    "bz2-bitflip-late": ("c.txt.bz2", "text", lambda: _flip(bz2.compress(_big_text(), 1), 0.8), True),
    # in the first block's header: found at once (a flip inside a block's data is found at the block's CRC)
    "bz2-bitflip-early": ("c.txt.bz2", "text", lambda: _flip(bz2.compress(_big_text(), 1), 6), False),
    "bz2-truncated": ("c.txt.bz2", "text", lambda: bz2.compress(_big_text(), 1)[:-2000], True),
    "gz-bitflip": ("c.txt.gz", "text", lambda: _flip(gzip.compress(_big_text(), mtime=0), 0.8), True),
    "gz-truncated": ("c.txt.gz", "text", lambda: gzip.compress(_big_text(), mtime=0)[:-500], True),
    "xz-bitflip": ("c.txt.xz", "text", lambda: _flip(lzma.compress(_big_text()), 0.8), True),
    "xz-truncated": ("c.txt.xz", "text", lambda: lzma.compress(_big_text())[:-500], True),
    "wiki-xml-bz2-truncated": ("w-pages-articles.xml.bz2", "wiki-xml", lambda: bz2.compress(WIKI_XML.encode())[:-40], False),
    "owt-tar-xz-truncated": ("subset.tar.xz", "owt", lambda: _tar_xz(OWT_DOCS)[:-3000], True),
    "owt-tar-xz-bitflip": ("subset.tar.xz", "owt", lambda: _flip(_tar_xz(OWT_DOCS), 0.7), True),
    # a plain .tar whose 200th member header is damaged: tarfile itself would stop there without a word
    "owt-tar-header-bitflip": ("subset.tar", "owt", lambda: _flip(_tar(OWT_DOCS), _header_offset(_tar(OWT_DOCS), 200) + 150), True),
}


def _tar(docs: list[bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i, d in enumerate(docs):
            info = tarfile.TarInfo(f"doc{i:04d}.txt")
            info.size = len(d)
            tar.addfile(info, io.BytesIO(d))
    return buf.getvalue()


def _header_offset(data: bytes, k: int) -> int:
    return data.index(f"doc{k:04d}.txt".encode())


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_compressed_input_names_the_file(tmp_path, vocab, capsys, case):
    from data_prep.hygiene import sniff_inputs

    name, fmt, make, late = CORRUPTIONS[case]
    f = tmp_path / name
    f.write_bytes(make())
    if late:
        sniff_inputs([f], fmt)  # passes: the damage is found while streaming, then cleaned up
    else:
        with pytest.raises(ValueError, match=re.escape(str(f))):
            sniff_inputs([f], fmt)  # found before anything is written
    out = tmp_path / "out"
    rc, err = cli([f, "--format", fmt, "--vocab", vocab, "--out", out, "--no-progress", "--valid-fraction", "0"], capsys)
    assert rc == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"alum-prep: error: {f}: ")
    assert any(t in line for t in ("compressed data is truncated or corrupt", "invalid or truncated XML",
                                   "tar archive is damaged"))
    assert "Traceback" not in err
    assert not out.exists()  # no manifest, no tokenizer/, no .parts/
    # The corrected input then works with the same --out, no --overwrite needed.
    good = tmp_path / ("ok-" + name)
    raw = {"text": ("\n\n".join(good_docs(20)) + "\n").encode(), "wiki-xml": WIKI_XML.encode(),
           "owt": _tar_xz(OWT_DOCS[:20]) if name.endswith(".xz") else _tar(OWT_DOCS[:20])}[fmt]
    good.write_bytes(raw if fmt == "owt" else (bz2.compress(raw) if name.endswith(".bz2") else
                                               gzip.compress(raw) if name.endswith(".gz") else lzma.compress(raw)))
    rc, err = cli([good, "--format", fmt, "--vocab", vocab, "--out", out, "--no-progress", "--valid-fraction", "0"], capsys)
    assert rc == 0, err
    assert "warning" not in err  # an archive's NUL padding is not mistaken for garbage


def test_compressed_data_without_its_ending_is_named_before_anything_is_written(tmp_path, vocab):
    f = tmp_path / "corpus.txt"  # gzip data named like text: would be read as pure garbage
    f.write_bytes(gzip.compress(b"The first document has a sentence.\n", mtime=0))
    with pytest.raises(ValueError, match=r"corpus\.txt: is gzip-compressed but its name does not end in \.gz"):
        run([f], tmp_path / "out", vocab)
    assert not (tmp_path / "out").exists()


def test_any_reader_error_names_the_file(tmp_path, vocab, monkeypatch):
    """A reader added later (a new format or decompressor) inherits the naming: the wrapper sits where
    every input is opened and streamed."""
    from data_prep import readers

    class ZstdError(Exception):  # what a third-party decompressor raises
        pass

    real = readers.Reader._text

    def failing(self, path, raw, base):
        for i, doc in enumerate(real(self, path, raw, base)):
            if i == 2:
                raise ZstdError("Unknown frame descriptor")
            yield doc

    monkeypatch.setattr(readers.Reader, "_text", failing)
    f = tmp_path / "c.txt"
    f.write_text("\n\n".join(good_docs(5)) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(f))}: compressed data is truncated or corrupt \(ZstdError: Unknown"):
        run([f], tmp_path / "out", vocab)
    assert not (tmp_path / "out").exists()

    def plain_failure(self, path, raw, base):
        yield from ()
        raise KeyError("offset")

    monkeypatch.setattr(readers.Reader, "_text", plain_failure)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(f))}: cannot be read \(KeyError: 'offset'\)"):
        run([f], tmp_path / "out", vocab)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------------
# Failed starts: validated before writing, nothing left behind, never blocking the corrected command
# --------------------------------------------------------------------------------------------------------


@pytest.fixture()
def corpus(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("\n\n".join(good_docs(6)) + "\n", encoding="utf-8")
    return f


def _bad_tokenizer_args(tmp_path: Path) -> dict:
    binary = tmp_path / "vocab.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    model_as_vocab = tmp_path / "spm.model"  # a protobuf-looking binary passed as --vocab
    model_as_vocab.write_bytes(b"\n\x0b\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02\xff\xfe")
    as_json = tmp_path / "tokenizer.json"
    as_json.write_text('{"version": "1.0", "model": {"type": "WordPiece"}}', encoding="utf-8")
    junk_spm = tmp_path / "junk.model"
    junk_spm.write_bytes(b"")
    return {
        "missing --vocab": (["--vocab", tmp_path / "nope.txt"], r"nope\.txt: --vocab file not found"),
        "binary --vocab": (["--vocab", binary], r"vocab\.bin: not a text vocab file \(invalid UTF-8 at byte 128, line 2\)"),
        "spm model as --vocab": (["--vocab", model_as_vocab], r"spm\.model: not a text vocab file .*--spm-model"),
        "json as --vocab": (["--vocab", as_json], r"tokenizer\.json: looks like JSON, not a vocab\.txt; .*--tokenizer-json"),
        "empty --spm-model": (["--spm-model", junk_spm], r"junk\.model: not a sentencepiece model"),
        "bad --max-garbage-frac": (["--vocab", tmp_path / "vocab.txt", "--max-garbage-frac", "2"], r"--max-garbage-frac must be in \[0, 1\]"),
        "spm vocab too small for byte fallback": (["--train-tokenizer", "spm-bpe", "--vocab-size", "100"],
                                                  r"--vocab-size 100 is too small for --spm-byte-fallback"),
        "spm vocab too small for the corpus": (["--train-tokenizer", "spm-unigram", "--vocab-size", "20",
                                                "--no-spm-byte-fallback"],
                                               r"--vocab-size 20 is too small for this corpus: .* need at least \d+"),
    }


@pytest.mark.parametrize("case", ["missing --vocab", "binary --vocab", "spm model as --vocab", "json as --vocab",
                                  "empty --spm-model", "bad --max-garbage-frac",
                                  "spm vocab too small for byte fallback", "spm vocab too small for the corpus"])
def test_failed_start_leaves_nothing_and_the_corrected_command_runs(tmp_path, vocab, corpus, capsys, case):
    args, pattern = _bad_tokenizer_args(tmp_path)[case]
    out = tmp_path / "out"
    rc, err = cli([corpus, "--format", "text", "--out", out, "--no-progress", *args], capsys)
    assert rc == 2
    assert re.search(pattern, err), err
    assert "Traceback" not in err
    assert not out.exists()
    rc, err = cli([corpus, "--format", "text", "--vocab", vocab, "--out", out, "--no-progress",
                   "--valid-fraction", "0"], capsys)
    assert rc == 0, err


def _stale_manifest(out: Path, **extra) -> None:
    out.mkdir(parents=True)
    (out / "tokenizer").mkdir()
    m = {"format_version": 1, "status": "running", "fingerprint": "0" * 64, "command": ["alum-prep", "old"],
         "segments": {}, "shards": [], **extra}
    (out / "manifest.json").write_text(json.dumps(m), encoding="utf-8")


def test_leftovers_of_a_killed_start_do_not_block(tmp_path, vocab, corpus, capsys):
    """A run killed (kill -9) before completing any segment, then a different, corrected command."""
    import subprocess

    out = tmp_path / "out"
    dead = subprocess.Popen(["true"])
    dead.wait(timeout=60)  # a pid that no longer runs
    _stale_manifest(out, owner={"host": os.uname().nodename, "pid": dead.pid})
    m = run([corpus], out, vocab)
    assert m["status"] == "complete"
    assert "replacing the leftovers of an earlier run that stopped before completing any work" in capsys.readouterr().err
    # Completed work is never thrown away without --overwrite ...
    _out2 = tmp_path / "out2"
    _stale_manifest(_out2, segments={"0": {"status": "complete", "counts": {"dropped": {}}, "parts": {}}})
    with pytest.raises(ValueError, match="different command or different inputs.*--overwrite"):
        run([corpus], _out2, vocab)
    assert (_out2 / "manifest.json").exists()
    # ... and a folder that another live alum-prep is writing is not touched.
    out3 = tmp_path / "out3"
    _stale_manifest(out3, owner={"host": os.uname().nodename, "pid": os.getppid()})
    with pytest.raises(ValueError, match=rf"another alum-prep \(pid {os.getppid()}\) seems to be writing"):
        run([corpus], out3, vocab)
    assert (out3 / "manifest.json").exists()
    # ... nor one that a run on another host (shared file system) may still be writing.
    out4 = tmp_path / "out4"
    _stale_manifest(out4, owner={"host": "another-node-" + os.uname().nodename, "pid": dead.pid})
    with pytest.raises(ValueError, match="different command or different inputs.*--overwrite"):
        run([corpus], out4, vocab)
    assert run([corpus], out4, vocab, overwrite=True)["status"] == "complete"


def test_environment_failure_after_work_keeps_it_for_the_resume(tmp_path, vocab, monkeypatch, capsys):
    """Disk full while merging: the completed segments are kept (not a failed start), the same command resumes."""
    from data_prep import pipeline

    f = tmp_path / "c.txt"
    f.write_text("\n\n".join(good_docs(60)) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    real = pipeline.Preparer._merge_shards

    def full(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline.Preparer, "_merge_shards", full)
    with pytest.raises(OSError, match="No space left") as e:
        run([f], out, vocab, segment_mb=0.002)
    assert "completed segment(s) kept" in capsys.readouterr().err
    msg = str(e.value)  # one clear message: the folder, the bytes needed, what is kept
    assert msg.startswith(f"{out}: no space left on the device while writing the data-bin")
    assert "it needs about" in msg and "completed segment(s) are kept for the resume" in msg
    assert not list(out.rglob("*.tmp"))
    done = json.loads((out / "manifest.json").read_text())["segments"]
    assert len(done) >= 2 and all(s["status"] == "complete" for s in done.values())
    monkeypatch.setattr(pipeline.Preparer, "_merge_shards", real)
    m = run([f], out, vocab, segment_mb=0.002)
    assert m["status"] == "complete" and m["counts"]["documents"] == 60


# --------------------------------------------------------------------------------------------------------
# Shards, warnings and --no-progress
# --------------------------------------------------------------------------------------------------------


def test_more_shards_than_documents_warns_naming_the_empty_shards(tmp_path, vocab, capsys):
    f = tmp_path / "c.txt"
    f.write_text("\n\n".join(good_docs(10)) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    rc, err = cli([f, "--format", "text", "--vocab", vocab, "--out", out, "--shards", "16", "--no-progress",
                   "--valid-fraction", "0"], capsys)
    assert rc == 0
    db = DataBin(out)
    empty = [k for k in range(16) if len(db.split(k, "train")) == 0]
    assert len(empty) >= 6  # 10 documents over 16 shards
    assert f"alum-prep: warning: {len(empty)} of 16 train shards are empty (shard{', shard'.join(map(str, empty))})" in err
    assert "10 documents for --shards 16" in err and "re-run with --shards" in err
    assert "1 warning(s)" in err
    assert json.loads((out / "manifest.json").read_text())["warnings"][0].startswith(f"{len(empty)} of 16 train shards")


def test_warnings_print_whatever_no_progress_says(tmp_path, vocab, capfd):
    f = tmp_path / "c.txt"
    f.write_text("\n\n".join(good_docs(2)) + "\n", encoding="utf-8")
    for progress in (False, True):
        out = tmp_path / f"o{progress}"
        run([f], out, vocab, progress=progress, valid_fraction=0.5, shards=4)
        err = capfd.readouterr().err
        assert "alum-prep: warning:" in err and "train shards are empty" in err and "/valid is empty" in err


# --------------------------------------------------------------------------------------------------------
# Trained sentencepiece: byte fallback, unreached vocabulary size
# --------------------------------------------------------------------------------------------------------

RARE = ["Ωmega", "naïve", "☃", "😀", "日本", "Straße", "ꙮ"]  # each once: below character coverage


@pytest.fixture()
def rare_corpus(tmp_path):
    docs = good_docs(60, seed=5)
    for i, w in enumerate(RARE):
        docs[i * 5] += f" A rare word {w} appears."
    f = tmp_path / "rare.txt"
    f.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return f


@pytest.mark.parametrize("kind", ["spm-unigram", "spm-bpe"])
def test_trained_sentencepiece_has_no_unk_on_its_training_text(tmp_path, rare_corpus, kind, capsys):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    m = prepare(PrepConfig(inputs=[rare_corpus], format="text", out=out, train_tokenizer=kind, vocab_size=5000, progress=False,
                           valid_fraction=0.0))
    assert m["counts"]["unk_tokens"] == 0
    tdir = out / "tokenizer"
    sp = spm.SentencePieceProcessor(model_file=str(tdir / "spm.model"))
    hf = AutoTokenizer.from_pretrained(str(tdir))
    for w in RARE:
        sent = f"A rare word {w} appears."
        ids = hf(sent, add_special_tokens=False)["input_ids"]
        assert ids == sp.encode(sent)  # byte pieces too: the converter follows sentencepiece
        assert hf.unk_token_id not in ids
        assert hf.decode(ids) == sent  # the byte pieces decode back to the character
    assert any(sp.id_to_piece(i).startswith("<0x") for w in RARE for i in sp.encode(w))  # some went to bytes
    # The requested size was not reached: reported, and recorded.
    got = m["tokenizer"]["vocab_size"]
    assert got < 5000 and m["tokenizer"]["requested_vocab_size"] == 5000
    err = capsys.readouterr().err
    assert f"--vocab-size 5000 was not reached: the corpus supports only {got} tokens" in err
    # Without byte fallback, the same corpus gives <unk> (what the default prevents).
    m2 = prepare(PrepConfig(inputs=[rare_corpus], format="text", out=tmp_path / "nofb", train_tokenizer=kind, vocab_size=5000,
                            progress=False, valid_fraction=0.0, spm_byte_fallback=False))
    assert m2["counts"]["unk_tokens"] > 0


# --------------------------------------------------------------------------------------------------------
# The hygiene helpers against references
# --------------------------------------------------------------------------------------------------------


def test_garbage_count_matches_the_unicode_definition():
    from data_prep.hygiene import garbage_count

    rng = np.random.default_rng(11)
    for n in (0, 1, 100, 5000):
        text = rng.bytes(n).decode("utf-8", "replace") + "\t\n\r\ufeff é ☃ \x85"
        assert garbage_count(text) == garbage_chars(text)


def test_compression_magic_and_format_guesses():
    from data_prep.hygiene import compression_mismatch, guess_format

    samples = {"gzip": gzip.compress(b"x" * 100), "bzip2": bz2.compress(b"x" * 100), "xz": lzma.compress(b"x" * 100),
               "zstd": b"\x28\xb5\x2f\xfd" + b"\x00" * 12}
    ending = {"gzip": ".gz", "bzip2": ".bz2", "xz": ".xz", "zstd": ".zst"}
    for kind, data in samples.items():
        assert f"is {kind}-compressed" in compression_mismatch(Path("a.txt"), data[:16])
        assert compression_mismatch(Path("a.txt" + ending[kind]), data[:16]) is None
    assert compression_mismatch(Path("a.txt"), b"BZh is how this text starts") is None  # not the full bz2 header
    assert guess_format(JSONL) == "jsonl"
    cut = JSONL[: JSONL.index("\n") + 30]  # the second line cut in the middle
    assert guess_format(cut, complete=False) == "jsonl"  # a line cut by the sniff window is ignored
    assert guess_format(cut, complete=True) is None  # ... but a broken line otherwise is not JSON lines
    assert guess_format(WIKI_XML) == "wiki-xml" and guess_format(WIKIEXTRACTOR) == "wikiextractor"
    assert guess_format(OTHER_XML) == "xml" and guess_format(WIKITEXT) == "wikitext"
    assert guess_format("{not json} but text\n\nMore text.\n") is None
    assert guess_format('{"a": 1}\nplain text after it\n') is None
    assert guess_format("") is None
