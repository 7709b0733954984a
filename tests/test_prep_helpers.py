"""Unit tests of the cleaning and sentence-splitting helpers of ``data_prep`` (no tokenizer needed)."""

from __future__ import annotations

import unicodedata

from data_prep.clean import MAX_SLICE_CHARS, PunktSplitter, RuleSplitter, SentenceSplitter, clean_text
from data_prep.readers import _utf8_cut, iter_byte_lines
import io

import pytest


def test_clean_text_nfc_controls_crlf_spaces():
    decomposed = "Cafe\u0301"  # 'e' + combining acute -> NFC 'é'
    text = f"  {decomposed}\x00 x\x07y\r\n\r\n\tz  \x85w\ufeff \rlast  "
    cleaned, n = clean_text(text)
    assert cleaned == "Café xy\nz w\nlast"
    assert unicodedata.is_normalized("NFC", cleaned)
    assert n == 4  # \x00 \x07 \x85 \ufeff


def test_clean_text_empty():
    assert clean_text(" \r\n\t \x00\n") == ("", 1)


@pytest.mark.parametrize("splitter", [RuleSplitter, PunktSplitter])
def test_splitter_abbreviations_and_decimals(splitter):
    sp = splitter()
    text = ("Dr. Smith went to Washington D.C. in Jan. 2004. He met Mr. Jones at 3 p.m. and they ate. "
            "It cost $5.5 million, i.e. a lot! Really? John F. Kennedy agreed.")
    assert sp.split(text) == [
        "Dr. Smith went to Washington D.C. in Jan. 2004.",
        "He met Mr. Jones at 3 p.m. and they ate.",
        "It cost $5.5 million, i.e. a lot!",
        "Really?",
        "John F. Kennedy agreed.",
    ]


@pytest.mark.parametrize("splitter", [RuleSplitter, PunktSplitter])
def test_splitter_wikitext_style_spacing(splitter):
    # WikiText puts spaces before punctuation; Punkt must still split there.
    para = ("Robert Boulter is an English film , television and theatre actor . He had a guest-starring role "
            "on the television series The Bill in 2000 . This was followed by a starring role .")
    assert splitter().split(para) == [
        "Robert Boulter is an English film , television and theatre actor .",
        "He had a guest-starring role on the television series The Bill in 2000 .",
        "This was followed by a starring role .",
    ]


@pytest.mark.parametrize("splitter", [RuleSplitter, PunktSplitter])
def test_splitter_keeps_every_character_of_long_paragraphs(splitter):
    words = ("alpha beta gamma delta " * (MAX_SLICE_CHARS // 10)).strip()  # > MAX_SLICE_CHARS, no periods
    sents = splitter().split(words)
    assert len(sents) >= 2
    assert " ".join(sents).split() == words.split()


def test_utf8_cut_never_splits_a_character():
    data = "aé€😀".encode("utf-8")  # 1 + 2 + 3 + 4 bytes
    for end in range(len(data) + 1):
        cut = _utf8_cut(data[:end])
        data[:cut].decode("utf-8")  # whole characters only
        assert end - cut < 4


def test_iter_byte_lines_offsets():
    data = b"ab\ncd\r\n\nlast"
    lines = list(iter_byte_lines(io.BytesIO(data)))
    assert lines == [(b"ab", 0), (b"cd\r", 3), (b"", 7), (b"last", 8)]


def test_rule_splitter_quotes_and_brackets():
    sp = RuleSplitter()
    assert sp.split('He said "Stop." Then he left. (It rained.) Later, "Really?" she asked. It ended …') == [
        'He said "Stop."', "Then he left.", "(It rained.)", 'Later, "Really?" she asked.', "It ended …"]
    # WikiText spacing: a lone closing quote after the period belongs to the sentence before
    assert sp.split('the next game . " Next he won . Finally " quoted text " ends .') == [
        'the next game . "', "Next he won .", 'Finally " quoted text " ends .']
    assert sp.split("Visit example.com today. Version 2.0 is out.") == ["Visit example.com today.", "Version 2.0 is out."]


def test_rule_splitter_agrees_with_punkt_on_wikitext(wikitext_raw):
    """The fast rules against NLTK's Punkt (same abbreviation list) on real Wikipedia text."""
    from data_prep.work import to_plain_text

    text = clean_text(to_plain_text("wikitext", wikitext_raw.read_text(encoding="utf-8"), False))[0]
    rules = RuleSplitter().split_document(text)
    punkt = PunktSplitter().split_document(text)
    assert " ".join(rules).split() == " ".join(punkt).split() == text.split()  # both keep every word
    a, b = set(rules), set(punkt)
    assert len(a & b) / len(a | b) > 0.93
    assert 0.97 < len(rules) / len(punkt) < 1.05
