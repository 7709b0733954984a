"""Encoding engines of alum-prep: HF ``tokenizers`` (the reference) and ``kitoken`` (a faster Rust encoder).

Both encode with the tokenizer saved in ``OUT/tokenizer/``: HF from its ``tokenizer.json``; kitoken from the
same ``tokenizer.json`` when it can load it (WordPiece, BPE), else from the ``spm.model`` saved beside it
(sentencepiece).  kitoken is used only when it gives the very ids HF gives, and that is checked on every
run, not assumed.  The check is part of the bulk pass, so that it runs on the workers in parallel
instead of before them: the first chunks of the run's input (whole chunks up to :data:`SAMPLE_CHARS`
characters, at most :data:`SAMPLE_CHUNKS` chunks) are the *sample*; a worker encodes each of their cleaned
sentences with both engines (:func:`compare`), keeps HF's ids and reports the first difference.  Every
chunk is encoded with HF until every sample chunk has matched, and with kitoken after that
(:mod:`data_prep.work`); the main process gathers the reports in input order (:class:`IdentityCheck`) and
records the choice, naming the first differing sentence when there is one.  The data-bin is thus the HF
data-bin either way; the engine only changes the speed (``--tokenizer-engine`` is a speed-only option).

The check covers the sample, not the corpus: a character that occurs only after the sample and that the
two engines treat differently would not be seen.  ``--tokenizer-engine hf`` rules that out at HF's speed.
"""

from __future__ import annotations

from pathlib import Path

ENGINES = ("auto", "hf", "kitoken")
#: the identity check's sample: the chunks that start within the first this-many characters of the input
SAMPLE_CHARS = 1 << 19
#: ... and at most this many chunks (a corpus of tiny documents: chunks close at 256 documents)
SAMPLE_CHUNKS = 64


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


def compare(hf_ids: list, candidate, sentences: list[str], unavailable: str | None = None) -> dict:
    """A worker's check of one sample chunk: ``candidate`` (a :class:`KitokenEngine`, or None with the reason
    ``unavailable``) encodes ``sentences``, whose HF ids are ``hf_ids``.  -> ``{"sentences": n, "diff": None
    or (index in the chunk, sentence, token index, hf ids, kitoken ids from that token), "unavailable",
    "source"}`` (the input of :meth:`IdentityCheck.add`)."""
    rec = {"sentences": len(sentences), "diff": None, "unavailable": unavailable,
           "source": getattr(candidate, "source", None)}
    if candidate is None:
        return rec
    for i, (a, b) in enumerate(zip(hf_ids, candidate.encode_batch(sentences))):
        if list(a) != list(b):
            j = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            rec["diff"] = (i, sentences[i][:80], j, list(a)[j:j + 5], list(b)[j:j + 5])
            break
    return rec


class IdentityCheck:
    """The main process's side of the identity check: the workers' :func:`compare` records of the sample
    chunks, in input order (:meth:`add`), then the choice (:meth:`decide`)."""

    def __init__(self, requested: str):
        if requested not in ENGINES:
            raise ValueError(f"--tokenizer-engine must be one of {', '.join(ENGINES)}, got {requested!r}")
        self.requested = requested
        self.sentences = 0
        self.why: str | None = None
        self.diff: tuple | None = None  # (global sentence index, chunk's record diff)
        self.source: str | None = None

    def add(self, rec: dict) -> None:
        if rec["unavailable"] and self.why is None:
            self.why = rec["unavailable"]
        elif rec["diff"] is not None and self.diff is None and self.why is None:
            self.diff = (self.sentences + rec["diff"][0], rec["diff"])
        self.source = self.source or rec["source"]
        self.sentences += rec["sentences"]

    def decide(self) -> dict:
        """The run's engine: ``{"engine", "requested", "reason", "sample_sentences"}`` (+ ``kitoken_version``,
        ``source`` for kitoken).  ``hf``: HF, nothing checked.  ``auto``: kitoken when it loaded the tokenizer
        and encoded every sample sentence with HF's ids, else HF with the reason.  ``kitoken``: the same, but
        a failure is a ValueError naming the flag instead of a fallback."""
        rec = {"requested": self.requested, "sample_sentences": self.sentences}
        if self.requested == "hf":
            return {**rec, "engine": "hf", "reason": "--tokenizer-engine hf"}
        why = self.why
        if why is None and self.diff is not None:
            g, (_, sent, j, a, b) = self.diff
            why = (f"kitoken ids differ from HF's: sample sentence {g + 1} of {self.sentences} differs at token {j}: "
                   f"{sent!r} -> hf {a} vs kitoken {b}")
        if why is None:
            from importlib.metadata import version

            return {**rec, "engine": "kitoken", "kitoken_version": version("kitoken"), "source": self.source,
                    "reason": f"identical ids on all {self.sentences} sample sentences"}
        if self.requested == "kitoken":
            raise ValueError(f"--tokenizer-engine kitoken: {why}; use --tokenizer-engine auto or hf")
        return {**rec, "engine": "hf", "reason": why}
