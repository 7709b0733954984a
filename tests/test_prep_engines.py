"""alum-prep's encoding engines: kitoken writes the very data-bin HF ``tokenizers`` writes, the identity check
runs on every run's own sample, and any difference falls back to HF with the first differing sentence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_prep import PrepConfig, engines, prepare

MIXED = [
    "東京は日本の首都である。北京是中国的首都。서울은 한국의 수도입니다. Ｆｕｌｌｗｉｄｔｈ ｌｅｔｔｅｒｓ ﬁ ligature.",
    "القاهرة هي عاصمة مصر، وهي أكبر مدينة في العالم العربي. עברית גם כן כאן. Привет, мир и Ελληνικά.",
    "Emoji 😀 👍🏽 family 👨‍👩‍👧 flags 🇫🇷🇯🇵 and symbols ★ ∑ ∞ € £ ¥ — all in one sentence of text.",
    "Combining accents: e\u0301cole, cafe\u0301, nai\u0308ve; precomposed école, café, naïve; İstanbul, straße, ǅemal.",
    "Control characters\x07 inside\x0b a line, a tab\there, zero\u200bwidth, soft\u00adhyphen and a NUL\x00 byte too.",
    "Special tokens written in text: [CLS] [SEP] [MASK] <s> </s> <mask> [UNK] <unk> and ordinary words after them.",
    "Numbers 3.14159, 1,000,000 and dates 2024-01-31; URLs http://example.org/a?b=c&d=e; e-mail a.b@example.com.",
]


def mixed_docs(rounds: int = 6) -> str:
    """One text-format document per blank-line-separated block, every script several times."""
    blocks = []
    for r in range(rounds):
        blocks.append(" ".join(MIXED[(r + i) % len(MIXED)] for i in range(len(MIXED))) + f" Round {r}.")
    return "\n\n".join(blocks) + "\n"


def outputs(out: Path) -> dict[str, bytes]:
    """Every file of a data-bin except the manifest (which records timing and the engine)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def build(tmp_path: Path, name: str, engine: str, **kw) -> tuple[dict, dict]:
    out = tmp_path / name
    kw.setdefault("valid_fraction", 0.0)
    m = prepare(PrepConfig(out=out, progress=False, tokenizer_engine=engine, **kw))
    return m, outputs(out)


def both(tmp_path: Path, **kw) -> dict:
    """Build with ``hf`` and ``auto``; the files must be identical; returns the ``auto`` run's encoding record."""
    _, ref = build(tmp_path, "hf", "hf", **kw)
    m, got = build(tmp_path, "auto", "auto", **kw)
    assert ref.keys() == got.keys()
    for k in ref:
        assert ref[k] == got[k], f"{k} differs between the hf and auto engines"
    assert m["encoding"]["requested"] == "auto"
    return m["encoding"]


@pytest.fixture
def mixed_file(tmp_path) -> Path:
    p = tmp_path / "mixed.txt"
    p.write_text(mixed_docs(), encoding="utf-8")
    return p


def test_wikitext_identical_and_kitoken_used(tmp_path, wikitext_raw, bert_vocab, monkeypatch):
    calls = []
    orig = engines.KitokenEngine.encode_batch
    monkeypatch.setattr(engines.KitokenEngine, "encode_batch", lambda self, s: calls.append(len(s)) or orig(self, s))
    enc = both(tmp_path, inputs=[str(wikitext_raw)], format="wikitext", vocab=str(bert_vocab))
    assert enc["engine"] == "kitoken", enc
    assert enc["sample_sentences"] > 1000 and enc["kitoken_version"]
    assert len(calls) > 1  # the sample check and the bulk encoding both went through kitoken


def test_demo_corpus_identical(tmp_path, bert_vocab):
    from alum_pretrain.demo import stdlib_documents

    docs = stdlib_documents(max_docs=120)
    p = tmp_path / "demo.txt"
    p.write_text("\n\n".join(" ".join(d) for d in docs) + "\n", encoding="utf-8")
    enc = both(tmp_path, inputs=[str(p)], format="text", vocab=str(bert_vocab))
    assert enc["engine"] == "kitoken", enc


def test_mixed_scripts_wordpiece(tmp_path, mixed_file, bert_vocab):
    enc = both(tmp_path, inputs=[str(mixed_file)], format="text", vocab=str(bert_vocab), min_doc_chars=1)
    assert enc["engine"] == "kitoken", enc


def trained(tmp_path: Path, mixed_file: Path, kind: str) -> Path:
    """A tokenizer trained on the mixed corpus, once (WordPiece training is not bit-reproducible): its saved
    ``tokenizer.json`` (WordPiece) or sentencepiece ``.model``."""
    out = tmp_path / f"train-{kind}"
    prepare(PrepConfig(inputs=[str(mixed_file)], format="text", out=out, progress=False, valid_fraction=0.0,
                       train_tokenizer=kind, vocab_size=700, min_doc_chars=1, tokenizer_engine="hf"))
    return out / "tokenizer" / ("tokenizer.json" if kind == "wordpiece" else "spm.model")


def test_mixed_scripts_trained_wordpiece(tmp_path, mixed_file):
    tj = trained(tmp_path, mixed_file, "wordpiece")
    enc = both(tmp_path, inputs=[str(mixed_file)], format="text", tokenizer_json=str(tj), min_doc_chars=1)
    assert enc["engine"] == "kitoken", enc


@pytest.mark.parametrize("kind", ["spm-bpe", "spm-unigram"])
def test_mixed_scripts_sentencepiece(tmp_path, mixed_file, kind):
    """Identical data-bins from a sentencepiece ``.model`` either way; kitoken is taken for BPE (the converted
    tokenizer.json loads and agrees); for unigram only where it agrees on the sample, else the reason is kept."""
    model = trained(tmp_path, mixed_file, kind)
    enc = both(tmp_path, inputs=[str(mixed_file)], format="text", spm_model=str(model), min_doc_chars=1)
    if kind == "spm-bpe":
        assert enc["engine"] == "kitoken", enc
    else:
        assert enc["engine"] == "kitoken" or enc["reason"], enc


def test_mixed_scripts_byte_level_bpe(tmp_path, mixed_file):
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(MIXED * 20, vocab_size=600, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                            show_progress=False)
    tj = tmp_path / "bpe.json"
    bpe.save(str(tj))
    enc = both(tmp_path, inputs=[str(mixed_file)], format="text", tokenizer_json=str(tj), min_doc_chars=1)
    assert enc["engine"] == "kitoken", enc


def _corrupt(monkeypatch):
    orig = engines.KitokenEngine.encode_batch

    def wrong(self, sents):
        ids = orig(self, sents)
        return [[i + 1 for i in ids[0]]] + ids[1:] if ids else ids

    monkeypatch.setattr(engines.KitokenEngine, "encode_batch", wrong)


def test_forced_mismatch_falls_back_with_message(tmp_path, mixed_file, bert_vocab, monkeypatch, capsys):
    _, ref = build(tmp_path, "hf", "hf", inputs=[str(mixed_file)], format="text", vocab=str(bert_vocab))
    _corrupt(monkeypatch)
    m, got = build(tmp_path, "auto", "auto", inputs=[str(mixed_file)], format="text", vocab=str(bert_vocab))
    enc = m["encoding"]
    assert enc["engine"] == "hf"
    assert enc["reason"].startswith("kitoken ids differ from HF's: sample sentence 1 of "), enc
    assert "differs at token 0" in enc["reason"] and "hf [" in enc["reason"]
    assert got == ref
    on_disk = json.loads((tmp_path / "auto" / "manifest.json").read_text())
    assert on_disk["encoding"] == enc
    with pytest.raises(ValueError, match="--tokenizer-engine kitoken: kitoken ids differ from HF's"):
        build(tmp_path, "forced", "kitoken", inputs=[str(mixed_file)], format="text", vocab=str(bert_vocab))


def test_unloadable_tokenizer_falls_back(tmp_path, mixed_file, bert_vocab, monkeypatch):
    import kitoken

    def refuse(path):
        raise RuntimeError("unsupported definition")

    monkeypatch.setattr(kitoken.Kitoken, "from_tokenizers_file", staticmethod(refuse))
    m, _ = build(tmp_path, "auto", "auto", inputs=[str(mixed_file)], format="text", vocab=str(bert_vocab))
    assert m["encoding"]["engine"] == "hf"
    assert "kitoken cannot load the tokenizer (tokenizer.json: unsupported definition)" in m["encoding"]["reason"]


def test_engine_flag_and_speed_only():
    from data_prep.cli import build_parser

    args = build_parser().parse_args(["x", "--format", "text", "--out", "o", "--vocab", "v",
                                      "--tokenizer-engine", "hf"])
    assert args.tokenizer_engine == "hf"
    with pytest.raises(ValueError, match="--tokenizer-engine"):
        PrepConfig(inputs=["x"], format="text", out="o", vocab="v", tokenizer_engine="fast")
    assert "tokenizer_engine" not in PrepConfig(inputs=["x"], format="text", out="o", vocab="v").result_options()


def test_check_on_two_workers(tmp_path, wikitext_raw, bert_vocab, monkeypatch):
    """With a worker pool the check runs on the workers: the sample is the chunks that start within the first
    SAMPLE_CHARS characters; a difference found there makes every chunk HF-encoded; a match lets the
    workers switch to kitoken; the data-bin is the HF one either way."""
    from data_prep import work

    monkeypatch.setattr(engines, "SAMPLE_CHARS", 20_000)
    monkeypatch.setattr(work, "CHUNK_CHARS", 8_000)  # several sample and bulk chunks on the 2.4 MB file
    kw = dict(inputs=[str(wikitext_raw)], format="wikitext", vocab=str(bert_vocab), workers=2)
    _, ref = build(tmp_path, "hf", "hf", **kw)
    m, got = build(tmp_path, "auto", "auto", **kw)
    assert got == ref and m["encoding"]["engine"] == "kitoken", m["encoding"]
    assert 0 < m["encoding"]["sample_sentences"] < m["counts"]["sentences"] / 10
    _corrupt(monkeypatch)  # inherited by the forked workers
    m, got = build(tmp_path, "mismatch", "auto", **kw)
    assert m["encoding"]["engine"] == "hf" and "sample sentence 1 of " in m["encoding"]["reason"], m["encoding"]
    assert got == ref


def test_board_needs_every_sample_chunk():
    """kitoken only once the last sample chunk is known and every sample chunk matched."""
    from data_prep.work import Board

    b = Board()
    b.report(1, True, last=True)
    assert not b.kitoken_verified()  # chunk 0 still pending
    b.report(0, True, last=False)
    assert b.kitoken_verified()
    b.report(1, False, last=True)
    assert not b.kitoken_verified()
    c = Board()
    c.report(0, True, last=False)
    assert not c.kitoken_verified()  # the last sample chunk is not known yet


def test_identity_check_record():
    """The main process's record: the first difference in input order, numbered over the whole sample."""
    chk = engines.IdentityCheck("auto")
    chk.add({"sentences": 3, "diff": None, "unavailable": None, "source": "tokenizer.json"})
    chk.add({"sentences": 4, "diff": (2, "third of chunk 2", 1, [5, 6], [5, 7]), "unavailable": None, "source": None})
    chk.add({"sentences": 2, "diff": (0, "later", 0, [1], [2]), "unavailable": None, "source": None})
    rec = chk.decide()
    assert rec["engine"] == "hf" and rec["sample_sentences"] == 9
    assert rec["reason"] == ("kitoken ids differ from HF's: sample sentence 6 of 9 differs at token 1: "
                             "'third of chunk 2' -> hf [5, 6] vs kitoken [5, 7]")
    with pytest.raises(ValueError, match="--tokenizer-engine kitoken: kitoken ids differ"):
        forced = engines.IdentityCheck("kitoken")
        forced.add({"sentences": 1, "diff": (0, "x", 0, [1], [2]), "unavailable": None, "source": None})
        forced.decide()
    assert engines.IdentityCheck("hf").decide()["reason"] == "--tokenizer-engine hf"
