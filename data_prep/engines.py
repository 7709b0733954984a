"""Encoding engines of alum-prep: HF ``tokenizers`` (the reference) and ``kitoken`` (a faster Rust encoder).

Both encode with the tokenizer saved in ``OUT/tokenizer/``: HF from its ``tokenizer.json``; kitoken from the
same ``tokenizer.json`` when it can load it (WordPiece, BPE), else from the ``spm.model`` saved beside it
(sentencepiece).  kitoken is used only when it gives the very ids HF gives, and that is checked on every
run, not assumed: :func:`choose` encodes a sample of the run's own cleaned sentences with both engines
before the bulk work, and picks kitoken only when every id of every sample sentence matches; otherwise
it names the first differing sentence and encodes with HF.  The data-bin is thus the HF data-bin either
way; the engine only changes the speed (``--tokenizer-engine`` is a speed-only option).

The check covers the sample, not the corpus: a character that occurs only after the sample and that the
two engines treat differently would not be seen.  ``--tokenizer-engine hf`` rules that out at HF's speed.
"""

from __future__ import annotations

from pathlib import Path

ENGINES = ("auto", "hf", "kitoken")
#: the identity check encodes the first cleaned sentences of the input, up to this many characters
SAMPLE_CHARS = 1 << 19
SAMPLE_SENTENCES = 20_000


class EngineUnavailable(Exception):
    """kitoken cannot load this tokenizer (the message says why)."""


class HFEngine:
    """``tokenizers.Tokenizer`` from ``tokenizer.json``; ids without special tokens added."""

    name = "hf"

    def __init__(self, tokenizer_json: str | Path):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(tokenizer_json))
        self._encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)

    def encode_batch(self, sentences: list[str]) -> list[list[int]]:
        return [e.ids for e in self._encode(sentences, add_special_tokens=False)] if sentences else []


class KitokenEngine:
    """``kitoken.Kitoken`` from ``tokenizer.json``, else from the ``spm.model`` in the same folder."""

    name = "kitoken"

    def __init__(self, tokenizer_json: str | Path):
        try:
            from kitoken import Kitoken
        except ImportError as e:  # a dependency of the package; only a broken install lacks it
            raise EngineUnavailable(f"kitoken is not installed ({e})") from None
        tokenizer_json = Path(tokenizer_json)
        spm = tokenizer_json.parent / "spm.model"
        errors = []
        try:
            self.kt = Kitoken.from_tokenizers_file(str(tokenizer_json))
            self.source = tokenizer_json.name
            return
        except Exception as e:  # kitoken raises plain exceptions for unsupported definitions
            errors.append(f"{tokenizer_json.name}: {e}")
        if spm.is_file():
            try:
                self.kt = Kitoken.from_sentencepiece_file(str(spm))
                self.source = spm.name
                return
            except Exception as e:
                errors.append(f"{spm.name}: {e}")
        raise EngineUnavailable("kitoken cannot load the tokenizer (" + "; ".join(errors) + ")")

    def encode_batch(self, sentences: list[str]) -> list[list[int]]:
        # encode_specials=True: special tokens written in the text are single ids, as in HF
        return self.kt.encode_all(sentences, True) if sentences else []


def load(name: str, tokenizer_json: str | Path):
    """The engine ``name`` (``hf`` or ``kitoken``) on ``tokenizer_json``."""
    if name == "hf":
        return HFEngine(tokenizer_json)
    if name == "kitoken":
        return KitokenEngine(tokenizer_json)
    raise ValueError(f"--tokenizer-engine must be one of {', '.join(ENGINES)}, got {name!r}")


def first_difference(reference, candidate, sentences: list[str]) -> str | None:
    """None when ``candidate`` encodes every sentence exactly as ``reference``; else the first difference."""
    want, got = reference.encode_batch(sentences), candidate.encode_batch(sentences)
    for i, (a, b) in enumerate(zip(want, got)):
        if list(a) != list(b):
            j = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            return (f"sample sentence {i + 1} of {len(sentences)} differs at token {j}: {sentences[i][:80]!r} -> "
                    f"hf {list(a)[j:j + 5]} vs kitoken {list(b)[j:j + 5]}")
    return None


def choose(requested: str, tokenizer_json: str | Path, sample: list[str]) -> dict:
    """Pick the engine for a run: ``{"engine", "requested", "reason", "sample_sentences"}``.

    ``hf``: HF, nothing checked.  ``auto``: kitoken when it loads the tokenizer and encodes every ``sample``
    sentence with HF's ids, else HF with the reason.  ``kitoken``: the same check, but a failure is a
    ValueError naming the flag instead of a fallback.
    """
    rec = {"requested": requested, "sample_sentences": len(sample)}
    if requested == "hf":
        return {**rec, "engine": "hf", "reason": "--tokenizer-engine hf"}
    if requested not in ENGINES:
        raise ValueError(f"--tokenizer-engine must be one of {', '.join(ENGINES)}, got {requested!r}")
    try:
        kt = KitokenEngine(tokenizer_json)
        diff = first_difference(HFEngine(tokenizer_json), kt, sample)
        why = f"kitoken ids differ from HF's: {diff}" if diff else None
    except EngineUnavailable as e:
        why = str(e)
    if why is None:
        from importlib.metadata import version

        return {**rec, "engine": "kitoken", "kitoken_version": version("kitoken"), "source": kt.source,
                "reason": f"identical ids on all {len(sample)} sample sentences"}
    if requested == "kitoken":
        raise ValueError(f"--tokenizer-engine kitoken: {why}; use --tokenizer-engine auto or hf")
    return {**rec, "engine": "hf", "reason": why}
