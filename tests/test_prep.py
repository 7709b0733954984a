"""alum-prep end to end: the WikiText-2 round trip, fairseq compatibility, every input format, tokenizers."""

from __future__ import annotations

import bz2
import io
import json
import lzma
import re
import tarfile
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from alum_pretrain.data.databin import DataBin
from alum_pretrain.data.indexed import MMapIndexedDataset
from conftest import requires_fairseq
from data_prep import PrepConfig, prepare
from data_prep.cli import main as cli_main

# --------------------------------------------------------------------------------------------------------
# Independent reference helpers (written from the formats' definitions, not calling data_prep)
# --------------------------------------------------------------------------------------------------------


def bert_words(text: str) -> list[str]:
    """The uncased BERT BasicTokenizer's word sequence (lower-case, accents stripped, punctuation split)."""
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    norm = BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
    return [w for w, _ in BertPreTokenizer().pre_tokenize_str(norm.normalize_str(text))]


def wordpiece_is_unk(word: str, vocab: set[str], max_chars: int = 100) -> bool:
    """BERT's greedy longest-match-first WordPiece (Devlin et al. 2019 / google-research/bert): True when the
    word cannot be covered by vocabulary pieces, i.e. the whole word becomes [UNK]."""
    if len(word) > max_chars:
        return True
    start = 0
    while start < len(word):
        end = len(word)
        while end > start:
            piece = word[start:end] if start == 0 else "##" + word[start:end]
            if piece in vocab:
                break
            end -= 1
        if end == start:
            return True
        start = end
    return False


UNK = "qqunkqq"


def wikitext_reference_docs(raw_path: Path) -> list[str]:
    """Documents of a WikiText raw file as defined in the issue: ' = Title = ' (one '=' each side) starts a
    document; ' = = Heading = = ' lines are dropped; '@-@' style escapes are undone; NFC."""
    text = raw_path.read_bytes().decode("utf-8").replace("\r\n", "\n")
    docs: list[list[str]] = []
    for line in text.split("\n"):
        if re.match(r"^ = [^=].* = $", line):
            docs.append([])
            continue
        if re.match(r"^ = = .* = = $", line) or not line.strip():
            continue
        line = line.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
        docs[-1].append(unicodedata.normalize("NFC", line))
    return ["\n".join(d) for d in docs]


def decoded_docs(out: Path) -> list[list[str]]:
    """Every document of every shard/split as a list of decoded sentences (via the saved HF tokenizer)."""
    db = DataBin(out)
    tok = db.tokenizer()
    docs = []
    for k in range(db.num_shards):
        for split in ("train", "valid"):
            ds = db.split(k, split)
            for d in range(ds.num_docs):
                lo, hi = int(ds.doc_starts[d]), int(ds.doc_starts[d + 1])
                docs.append([tok.decode(ds[i].tolist()) for i in range(lo, hi)])
    return docs


# --------------------------------------------------------------------------------------------------------
# WikiText-2 with the BERT vocab, through the CLI exactly as documented
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wikitext_bin(tmp_path_factory, wikitext_raw, bert_vocab):
    out = tmp_path_factory.mktemp("wt") / "OUT"
    rc = cli_main([str(wikitext_raw), "--format", "wikitext", "--vocab", str(bert_vocab), "--out", str(out),
                   "--shards", "2", "--workers", "2", "--no-progress"])
    assert rc == 0
    return out


def test_wikitext_roundtrip_and_doc_count(wikitext_bin, wikitext_raw, bert_vocab):
    m = json.loads((wikitext_bin / "manifest.json").read_text())
    ref_docs = wikitext_reference_docs(wikitext_raw)
    n_titles = sum(1 for line in wikitext_raw.read_text(encoding="utf-8").replace("\r\n", "\n").split("\n")
                   if re.match(r"^ = [^=].* = $", line))
    assert n_titles == len(ref_docs) == 62
    c = m["counts"]
    assert c["documents_read"] == n_titles
    assert c["documents"] + sum(c["dropped"].values()) == n_titles
    assert c["documents"] == n_titles  # no WikiText-2 test article is empty, short or duplicated

    vocab = set(bert_vocab.read_text(encoding="utf-8").split("\n"))

    def expected_words(doc: str) -> list[str]:
        return [UNK if wordpiece_is_unk(w, vocab) else w for w in bert_words(doc)]

    got = decoded_docs(wikitext_bin)
    assert len(got) == c["documents"]
    got_words = sorted(tuple(bert_words(" ".join(s.replace("[UNK]", UNK) for s in doc))) for doc in got)
    want_words = sorted(tuple(expected_words(d)) for d in ref_docs)
    assert got_words == want_words  # every word of every article, in order, nothing lost or added

    # Sentences are real sentences: the first article's first two sentences, and sensible lengths.
    first = [doc for doc in got if doc[0].startswith("robert boulter is an english film")][0]
    assert bert_words(first[0]) == bert_words("Robert Boulter is an English film , television and theatre actor .")
    assert bert_words(first[1]) == bert_words("He had a guest-starring role on the television series The Bill in 2000 .")
    n_sent = sum(len(d) for d in got)
    assert n_sent == c["sentences"] == c["items"]
    assert 8000 < n_sent < 12000  # WikiText-2 test: ~245K tokens, ~25 words per sentence


def test_wikitext_manifest_and_layout(wikitext_bin, wikitext_raw):
    m = json.loads((wikitext_bin / "manifest.json").read_text())
    for key in ("format_version", "status", "version", "command", "inputs", "tokenizer", "counts", "id_offset",
                "num_shards", "splits", "shards", "dict"):
        assert key in m, key
    assert m["status"] == "complete" and m["id_offset"] == 4 and m["num_shards"] == 2
    assert m["inputs"][0]["bytes"] == wikitext_raw.stat().st_size and len(m["inputs"][0]["sha256"]) == 64
    assert m["command"][:2] == ["alum-prep", str(wikitext_raw)]
    tok = m["tokenizer"]
    assert tok["kind"] == "wordpiece" and tok["lowercase"] is True and tok["vocab_size"] == 30522
    assert tok["special_ids"] == {"cls": 101, "sep": 102, "mask": 103, "pad": 0, "unk": 100}
    assert m["dtype"] == "uint16"
    total = sum(s[sp]["tokens"] for s in m["shards"] for sp in ("train", "valid"))
    assert total == m["counts"]["tokens"]
    for s in m["shards"]:
        for sp in ("train", "valid"):
            for name, rec in s[sp]["files"].items():
                assert (wikitext_bin / f"shard{s['shard']}" / name).stat().st_size == rec["bytes"]
    assert not (wikitext_bin / ".parts").exists()
    assert not list(wikitext_bin.rglob("*.tmp"))
    # dict.txt: one line per tokenizer id, counts = token frequencies in the corpus
    lines = (wikitext_bin / "dict.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 30522 and lines[101].startswith("[CLS] ")
    counts = np.array([int(line.rsplit(" ", 1)[1]) for line in lines])
    assert counts.sum() == m["counts"]["tokens"]
    db = DataBin(wikitext_bin)
    freq = np.zeros(30522, dtype=np.int64)
    for k in range(2):
        for sp in ("train", "valid"):
            ds = db.split(k, sp)
            for i in range(len(ds)):
                freq += np.bincount(ds[i], minlength=30522)
    assert (freq == counts).all()


def test_saved_tokenizer_gives_the_ids_on_disk(wikitext_bin, bert_vocab):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(wikitext_bin / "tokenizer"))
    assert (tok.cls_token, tok.sep_token, tok.mask_token, tok.pad_token, tok.unk_token) == (
        "[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]")
    db = DataBin(wikitext_bin)
    ds = db.split(0, "train")
    raw = MMapIndexedDataset(wikitext_bin / "shard0" / "train")
    for i in range(0, len(ds), 97):
        ids = ds[i]
        assert (raw[i].astype(np.int64) == ids + 4).all()
        assert tok(tok.decode(ids.tolist()), add_special_tokens=False)["input_ids"] == ids.tolist()


@requires_fairseq
@pytest.mark.fairseq
def test_fairseq_loads_the_databin(wikitext_bin):
    from fairseq.data import Dictionary, data_utils

    d = Dictionary.load(str(wikitext_bin / "dict.txt"))
    assert len(d) == 4 + 30522
    vocab = [line.rsplit(" ", 1)[0] for line in (wikitext_bin / "dict.txt").read_text(encoding="utf-8").splitlines()]
    for tid in (0, 100, 101, 102, 103, 1996, 2000, 30521):
        assert d.index(vocab[tid]) == tid + 4
    for k in range(2):
        for split in ("train", "valid"):
            prefix = str(wikitext_bin / f"shard{k}" / split)
            ds = data_utils.load_indexed_dataset(prefix, d)
            ours = MMapIndexedDataset(prefix)
            assert ds is not None and len(ds) == len(ours)
            for i in range(0, len(ours), 53):
                assert ds[i].tolist() == ours[i].astype(np.int64).tolist()
            assert (np.asarray(ds.sizes) == ours.sizes).all()


# --------------------------------------------------------------------------------------------------------
# Formats on small handwritten fixtures (a tiny WordPiece trained on the fixture: no ../shared needed)
# --------------------------------------------------------------------------------------------------------

DOCS = [
    "Alpha bravo charlie delta. Echo foxtrot golf hotel india.\nJuliett kilo lima mike november oscar.",
    "Papa quebec romeo sierra tango. Uniform victor whiskey xray yankee zulu!",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs?",
]


def run_small(inputs, fmt, out, **kw):
    kw.setdefault("train_tokenizer", "wordpiece")
    kw.setdefault("vocab_size", 200)
    kw.setdefault("progress", False)
    kw.setdefault("valid_fraction", 0.0)
    kw.setdefault("min_doc_chars", 10)
    overwrite = kw.pop("overwrite", False)
    return prepare(PrepConfig(inputs=[str(p) for p in inputs], format=fmt, out=out, **kw), overwrite=overwrite)


def doc_word_sets(out: Path) -> list[list[str]]:
    return sorted(bert_words(" ".join(d)) for d in decoded_docs(out))


def expect_docs(out: Path, docs: list[str]):
    assert doc_word_sets(out) == sorted(bert_words(d) for d in docs)


def test_format_text(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("\n\n".join(DOCS) + "\n\n\n", encoding="utf-8")
    m = run_small([f], "text", tmp_path / "out")
    expect_docs(tmp_path / "out", DOCS)
    assert m["counts"]["documents"] == 3 and m["counts"]["sentences"] == 7
    m2 = run_small([f], "text", tmp_path / "punkt", sentence_splitter="punkt", workers=2)
    expect_docs(tmp_path / "punkt", DOCS)
    assert m2["counts"]["sentences"] == 7 and m2["config"]["sentence_splitter"] == "punkt"


def test_format_jsonl_and_bad_json(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS)) + "\n", encoding="utf-8")
    run_small([f], "jsonl", tmp_path / "out")
    expect_docs(tmp_path / "out", DOCS)
    g = tmp_path / "bad.jsonl"
    g.write_text(json.dumps({"text": DOCS[0]}) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        run_small([g], "jsonl", tmp_path / "out2")
    h = tmp_path / "nokey.jsonl"
    h.write_text(json.dumps({"body": DOCS[0]}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"nokey.jsonl:1: no 'text' field"):
        run_small([h], "jsonl", tmp_path / "out3")
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()


def test_format_wikitext_small(tmp_path):
    f = tmp_path / "wiki.raw"
    body = " \n = First Article = \n \n The value was 1 @,@ 000 and 3 @.@ 5 per guest @-@ star . It rose .\n" \
           " \n = = History = = \n \n Later it fell again . Then it stopped .\n \n = Second = \n \n " \
           "Another article is here with text .\n"
    f.write_text(body, encoding="utf-8")
    m = run_small([f], "wikitext", tmp_path / "out")
    assert m["counts"]["documents"] == 2
    assert doc_word_sets(tmp_path / "out") == sorted([
        bert_words("The value was 1,000 and 3.5 per guest-star . It rose . Later it fell again . Then it stopped ."),
        bert_words("Another article is here with text ."),
    ])
    assert m["counts"]["sentences"] == 5
    # --keep-headings keeps titles and section headings as sentences
    m2 = run_small([f], "wikitext", tmp_path / "out2", keep_headings=True)
    words = [w for d in doc_word_sets(tmp_path / "out2") for w in d]
    assert "history" in words and "first" in words and m2["counts"]["sentences"] == m["counts"]["sentences"] + 3


def test_format_wikiextractor_blocks_and_json(tmp_path):
    folder = tmp_path / "text" / "AA"
    folder.mkdir(parents=True)
    blocks = "".join(
        f'<doc id="{i}" url="https://en.wikipedia.org/wiki?curid={i}" title="Title {i}">\nTitle {i}\n\n{d}\n</doc>\n'
        for i, d in enumerate(DOCS[:2])
    )
    (folder / "wiki_00").write_text(blocks, encoding="utf-8")
    (folder / "wiki_01.bz2").write_bytes(bz2.compress(
        f'<doc id="9" url="u" title="Last">\nLast\n\n{DOCS[2]}\n</doc>\n'.encode("utf-8")))
    m = run_small([tmp_path / "text"], "wikiextractor", tmp_path / "out")
    expect_docs(tmp_path / "out", DOCS)  # the repeated title line is dropped
    assert m["counts"]["documents"] == 3
    j = tmp_path / "json" / "wiki_00"
    j.parent.mkdir()
    j.write_text("\n".join(json.dumps({"id": str(i), "url": "u", "title": f"T{i}", "text": d})
                           for i, d in enumerate(DOCS)) + "\n", encoding="utf-8")
    run_small([j], "wikiextractor", tmp_path / "outj")
    expect_docs(tmp_path / "outj", DOCS)
    bad = tmp_path / "bad" / "wiki_00"
    bad.parent.mkdir()
    bad.write_text('<doc id="1" url="u" title="T">\nT\nsome text\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"wiki_00:1: '<doc>' block not closed"):
        run_small([bad], "wikiextractor", tmp_path / "outb")


PAGES_XML = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10" xml:lang="en">
  <siteinfo>
    <sitename>Wikipedia</sitename>
    <dbname>enwiki</dbname>
    <base>https://en.wikipedia.org/wiki/Main_Page</base>
    <generator>MediaWiki 1.41.0-wmf.1</generator>
    <case>first-letter</case>
    <namespaces>
      <namespace key="0" case="first-letter" />
      <namespace key="1" case="first-letter">Talk</namespace>
      <namespace key="10" case="first-letter">Template</namespace>
    </namespaces>
  </siteinfo>
  <page>
    <title>Ada Lovelace</title>
    <ns>0</ns>
    <id>1</id>
    <revision>
      <id>11</id>
      <text bytes="100" xml:space="preserve">{{Infobox person|name=Ada Lovelace|birth_date=1815}}
'''Augusta Ada King, Countess of Lovelace''' was an English [[mathematician]] and [[writer|author]].&lt;ref&gt;{{cite web|url=http://x.org|title=X}}&lt;/ref&gt; She worked on [[Charles Babbage]]'s [[Analytical Engine]].
[[File:Ada.jpg|thumb|left|Portrait of Ada]]
== Early life ==
Ada was born in London &amp;amp; raised there.&lt;!-- a comment --&gt; Her father was Lord Byron.
{| class="wikitable"
| cell one || cell two
|}
[[Category:1815 births]]</text>
    </revision>
  </page>
  <page>
    <title>Lovelace</title>
    <ns>0</ns>
    <id>2</id>
    <redirect title="Ada Lovelace" />
    <revision>
      <id>12</id>
      <text bytes="100" xml:space="preserve">#REDIRECT [[Ada Lovelace]]</text>
    </revision>
  </page>
  <page>
    <title>Talk:Ada Lovelace</title>
    <ns>1</ns>
    <id>3</id>
    <revision>
      <id>13</id>
      <text bytes="100" xml:space="preserve">This talk page is not an article and must be skipped.</text>
    </revision>
  </page>
  <page>
    <title>Analytical Engine</title>
    <ns>0</ns>
    <id>4</id>
    <revision>
      <id>14</id>
      <text bytes="100" xml:space="preserve">The '''Analytical Engine''' was a proposed [[mechanical computer]] designed by Charles Babbage. It was never built.</text>
    </revision>
  </page>
</mediawiki>
"""


def test_format_wiki_xml_bz2(tmp_path):
    f = tmp_path / "enwiki-test-pages-articles.xml.bz2"
    f.write_bytes(bz2.compress(PAGES_XML.encode("utf-8")))
    m = run_small([f], "wiki-xml", tmp_path / "out")
    c = m["counts"]
    assert c["documents_read"] == 4 and c["documents"] == 2
    assert c["dropped"]["redirect"] == 1 and c["dropped"]["non_article_page"] == 1
    words = doc_word_sets(tmp_path / "out")
    flat = [w for d in words for w in d]
    assert bert_words("Augusta Ada King, Countess of Lovelace was an English mathematician and author.")[:8] == \
        [d for d in words if d[0] == "augusta"][0][:8]
    for junk in ("infobox", "cite", "thumb", "category", "wikitable", "comment", "talk", "redirect"):
        assert junk not in flat, junk  # markup removed by wikiextractor, skipped pages absent
    assert "babbage" in flat and "london" in flat and "early" not in flat  # heading dropped by default
    # &amp;amp; in the XML is "&amp;" in wikitext, i.e. a literal "&" in the text
    assert "&" in flat


def test_wikiextractor_cli_output_equals_wiki_xml(tmp_path):
    """Recipe (b) of the README: the WikiExtractor command's output (both modes) gives the same documents
    as streaming the dump with --format wiki-xml (headings kept, as WikiExtractor keeps them)."""
    import subprocess
    import sys

    dump = tmp_path / "enwiki-test-pages-articles.xml.bz2"
    dump.write_bytes(bz2.compress(PAGES_XML.encode("utf-8")))
    run_small([dump], "wiki-xml", tmp_path / "xml", keep_headings=True)
    want = doc_word_sets(tmp_path / "xml")
    for mode in ([], ["--json"]):
        ext = tmp_path / f"extracted{len(mode)}"
        subprocess.run([sys.executable, "-m", "wikiextractor.WikiExtractor", str(dump), "-o", str(ext), "--processes", "1",
                        *mode], check=True, capture_output=True, timeout=120)
        out = tmp_path / f"out{len(mode)}"
        m = run_small([ext], "wikiextractor", out)
        assert m["counts"]["documents"] == 2
        assert doc_word_sets(out) == want
        assert "&" in [w for d in want for w in d] and "amp" not in [w for d in want for w in d]


def _tar_bytes(members: dict[str, bytes], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_format_owt_folder_and_nested_archives(tmp_path):
    root = tmp_path / "openwebtext"
    root.mkdir()
    (root / "0001-a.txt").write_text(DOCS[0], encoding="utf-8")
    # OpenWebText layout: an outer tar whose members are .xz tar archives of .txt documents
    inner = lzma.compress(_tar_bytes({"0002-b.txt": DOCS[1].encode(), "0003-c.txt": DOCS[2].encode()}))
    (root / "subset00.tar").write_bytes(_tar_bytes({"openwebtext/urlsf_subset00-1_data.xz": inner}))
    (root / "0004-d.xz").write_bytes(lzma.compress("A single compressed document lives here.".encode()))
    (root / "README.md").write_text("ignored: not an OWT file type")
    m = run_small([root], "owt", tmp_path / "out")
    expect_docs(tmp_path / "out", DOCS + ["A single compressed document lives here."])
    assert m["counts"]["documents"] == 4
    assert [Path(i["path"]).name for i in m["inputs"]] == ["0001-a.txt", "0004-d.xz", "subset00.tar"]
    # The distribution file itself: openwebtext.tar.xz (an .xz-compressed tar of .xz tar archives)
    whole = tmp_path / "openwebtext.tar.xz"
    whole.write_bytes(lzma.compress(_tar_bytes({"openwebtext/urlsf_subset00-1_data.xz": inner})))
    m2 = run_small([whole], "owt", tmp_path / "out2")
    expect_docs(tmp_path / "out2", DOCS[1:])


def test_duplicates_short_docs_and_split_by_seed(tmp_path):
    docs = [f"Document number {i} talks about topic {i % 7} at some length here." for i in range(60)]
    corpus = docs + [docs[3], docs[10], "tiny"]
    f = tmp_path / "c.txt"
    f.write_text("\n\n".join(corpus), encoding="utf-8")
    # A fixed vocab: WordPiece *training* in `tokenizers` is not bit-reproducible (frequency ties).
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(
        {w for d in docs for w in bert_words(d)} | set("0123456789"))) + "\n", encoding="utf-8")
    opts = dict(train_tokenizer=None, vocab_size=None, vocab=vocab, valid_fraction=0.3, shards=3)
    m = run_small([f], "text", tmp_path / "a", seed=1, **opts)
    c = m["counts"]
    assert c["dropped"]["duplicate"] == 2 and c["dropped"]["too_short"] == 1 and c["documents"] == 60
    n_valid = sum(s["valid"]["documents"] for s in m["shards"])
    assert 5 <= n_valid <= 35  # ~30 % of 60
    assert all(s["train"]["documents"] > 5 for s in m["shards"])  # hash sharding spreads documents
    # Same seed, other worker count: byte-identical shards.  Other seed: another split.
    m2 = run_small([f], "text", tmp_path / "b", seed=1, workers=2, **opts)
    for s1, s2 in zip(m["shards"], m2["shards"]):
        assert s1["train"]["files"] == s2["train"]["files"] and s1["valid"]["files"] == s2["valid"]["files"]
    m3 = run_small([f], "text", tmp_path / "c", seed=2, **opts)
    assert [s["valid"]["files"] for s in m3["shards"]] != [s["valid"]["files"] for s in m["shards"]]


def test_overlong_sentences_are_chunked_not_dropped(tmp_path):
    long_sent = " ".join(f"word{i % 10}" for i in range(40)) + "."
    f = tmp_path / "c.txt"
    f.write_text(f"Short one here. {long_sent} Another short one.", encoding="utf-8")
    m = run_small([f], "text", tmp_path / "out", max_tokens=8, vocab_size=120)
    c = m["counts"]
    ds = DataBin(tmp_path / "out").split(0, "train")
    assert max(ds.sizes) <= 8
    assert c["overlong_sentences"] >= 1 and c["items"] == c["sentences"] + c["overlong_extra_items"]
    words = [w for d in decoded_docs(tmp_path / "out") for s in d for w in bert_words(s)]
    assert words == bert_words(f"Short one here. {long_sent} Another short one.")


# --------------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------------

CORPUS = [
    " ".join(
        ["The engine computed tables of numbers", "Ada wrote notes about the machine", "Babbage designed gears",
         "Lovelace described loops and variables", "Punched cards held the program"][(i + j) % 5]
        + f" in year {1830 + (i * 7 + j) % 20}." for j in range(3)
    )
    for i in range(40)
]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("corpus") / "c.txt"
    f.write_text("\n\n".join(CORPUS) + "\n", encoding="utf-8")
    return f


def test_trained_wordpiece_numbering_does_not_depend_on_the_trainers_order():
    """tokenizers' WordPiece trainer numbers tied pieces in hash-map order (another order per process):
    one set of pieces must give one numbering, specials first in their own order."""
    import random

    from data_prep.tokenizer import canonical_vocab

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = ["the", "##s", "a", "##ing", "lovelace", "##hed", "i", "pro", "z"]
    numberings = []
    for seed in range(4):
        order = pieces[:]
        random.Random(seed).shuffle(order)
        numberings.append(canonical_vocab({t: i for i, t in enumerate(specials + order)}, len(specials)))
    assert all(n == numberings[0] for n in numberings)
    assert sorted(numberings[0], key=numberings[0].get) == specials + sorted(pieces)


@pytest.mark.parametrize("kind", ["spm-unigram", "spm-bpe"])
def test_train_sentencepiece_matches_sentencepiece_ids(tmp_path, corpus_file, kind):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    m = run_small([corpus_file], "text", out, train_tokenizer=kind, vocab_size=400, valid_fraction=0.0)
    tdir = out / "tokenizer"
    hf = AutoTokenizer.from_pretrained(str(tdir))
    sp = spm.SentencePieceProcessor(model_file=str(tdir / "spm.model"))
    assert (hf.cls_token, hf.sep_token, hf.mask_token, hf.pad_token, hf.unk_token) == ("<s>", "</s>", "<mask>", "<pad>", "<unk>")
    assert m["tokenizer"]["special_ids"] == {"cls": 0, "sep": 2, "mask": 4, "pad": 1, "unk": 3}
    assert m["tokenizer"]["kind"] == kind
    # The data on disk is sentencepiece's own encoding of the sentences (+4).
    ds = DataBin(out).split(0, "train")
    sents = [s for doc in decoded_docs(out) for s in doc]
    assert len(sents) == len(ds) == m["counts"]["sentences"]
    for sent in sents[:20]:
        assert hf(sent, add_special_tokens=False)["input_ids"] == sp.encode(sent)
    all_ids = sorted(tuple(ds[i].tolist()) for i in range(len(ds)))
    assert all_ids == sorted(tuple(sp.encode(s)) for s in sents)
    # dict.txt flags the tokens fairseq already has
    lines = (out / "dict.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0].endswith(" #fairseq:overwrite") and lines[0].startswith("<s> ")
    assert lines[4].startswith("<mask> ") and not lines[4].endswith("overwrite")
    # Re-using the trained model with --spm-model gives the same ids.
    m2 = run_small([corpus_file], "text", tmp_path / "out2", train_tokenizer=None, vocab_size=None,
                   spm_model=str(tdir / "spm.model"))
    assert [s["train"]["files"]["train.bin"] for s in m2["shards"]] == [s["train"]["files"]["train.bin"] for s in m["shards"]]


@requires_fairseq
@pytest.mark.fairseq
def test_fairseq_dictionary_with_roberta_specials(tmp_path, corpus_file):
    from fairseq.data import Dictionary, data_utils

    out = tmp_path / "out"
    run_small([corpus_file], "text", out, train_tokenizer="spm-bpe", vocab_size=400)
    d = Dictionary.load(str(out / "dict.txt"))
    tokens = [line.split(" ")[0] for line in (out / "dict.txt").read_text(encoding="utf-8").splitlines()]
    assert len(d) == 4 + len(tokens)
    for tid, t in enumerate(tokens):
        assert d.index(t) == tid + 4
    ds = data_utils.load_indexed_dataset(str(out / "shard0" / "train"), d)
    ours = DataBin(out).split(0, "train")
    assert len(ds) == len(ours) and ds[0].tolist() == (ours[0] + 4).tolist()


def test_train_wordpiece_and_tokenizer_json(tmp_path, corpus_file):
    from transformers import AutoTokenizer

    m = run_small([corpus_file], "text", tmp_path / "a", vocab_size=150)
    assert m["tokenizer"]["kind"] == "wordpiece" and m["tokenizer"]["lowercase"] is True
    assert m["tokenizer"]["special_ids"] == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "a" / "tokenizer"))
    assert hf("Ada wrote")["input_ids"][0] == hf.cls_token_id
    assert m["counts"]["unk_tokens"] == 0  # trained on this very corpus
    m2 = run_small([corpus_file], "text", tmp_path / "b", train_tokenizer=None, vocab_size=None,
                   tokenizer_json=str(tmp_path / "a" / "tokenizer" / "tokenizer.json"))
    assert m2["tokenizer"]["kind"] == "tokenizer-json"
    assert m2["shards"][0]["train"]["files"]["train.bin"] == m["shards"][0]["train"]["files"]["train.bin"]


def test_vocab_lowercase_inference(tmp_path, corpus_file):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(
        w for s in CORPUS for w in bert_words(s)))
    cased = vocab + ["Ada", "The"]
    (tmp_path / "uncased.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (tmp_path / "cased.txt").write_text("\n".join(cased) + "\n", encoding="utf-8")
    m = run_small([corpus_file], "text", tmp_path / "u", train_tokenizer=None, vocab_size=None, vocab=tmp_path / "uncased.txt")
    assert m["tokenizer"]["lowercase"] is True and m["counts"]["unk_tokens"] == 0
    m = run_small([corpus_file], "text", tmp_path / "c", train_tokenizer=None, vocab_size=None, vocab=tmp_path / "cased.txt")
    assert m["tokenizer"]["lowercase"] is False and m["counts"]["unk_tokens"] > 0  # "Babbage" is not in it


def test_options_are_validated(tmp_path, corpus_file):
    o = {"inputs": [corpus_file], "out": tmp_path / "o"}
    with pytest.raises(ValueError, match="exactly one tokenizer"):
        PrepConfig(**o, format="text", vocab="v.txt", train_tokenizer="wordpiece", vocab_size=100)
    with pytest.raises(ValueError, match="--vocab-size"):
        PrepConfig(**o, format="text", train_tokenizer="wordpiece")
    with pytest.raises(ValueError, match="--format"):
        PrepConfig(**o, format="csv", train_tokenizer="wordpiece", vocab_size=100)
    with pytest.raises(ValueError, match="--valid-fraction"):
        PrepConfig(**o, format="text", train_tokenizer="wordpiece", vocab_size=100, valid_fraction=1.0)
    with pytest.raises(ValueError, match="--lowercase"):
        PrepConfig(**o, format="text", spm_model="x.model", lowercase=True)
    assert not (tmp_path / "o").exists()


def test_cli_help_lists_every_option(capsys):
    from dataclasses import fields

    with pytest.raises(SystemExit):
        cli_main(["--help"])
    text = capsys.readouterr().out
    for f in fields(PrepConfig):
        if f.name != "inputs":
            assert "--" + f.name.replace("_", "-") in text, f.name
    assert "--overwrite" in text
