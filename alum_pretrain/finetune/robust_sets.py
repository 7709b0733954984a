"""Robustness evaluation sets read in the formats they are published in, with labels matched by *name*.

Readers (each returns a :class:`LabelledSet`: examples whose gold label is a name, plus the set's label
vocabulary and the GLUE task that gives the names their meaning):

* **AdvGLUE** ``dev.json`` (:func:`read_advglue`): one JSON object whose keys are ``sst2, qqp, mnli,
  mnli-mm, qnli, rte``; each a list of ``{"idx", "label", ...fields}`` with the GLUE field names of the
  task (``sentence``; ``question1``/``question2``; ``premise``/``hypothesis``; ``question``/``sentence``;
  ``sentence1``/``sentence2``) and GLUE's *integer* labels (SST-2: 1 positive; QQP: 1 duplicate; MNLI:
  0 entailment, 1 neutral, 2 contradiction; QNLI/RTE: 0 entailment, 1 not_entailment).
* **ANLI** rounds (``R1/dev.jsonl`` ... ``R3/test.jsonl``, :func:`read_anli`): JSON lines with ``uid,
  premise, hypothesis, label``, label ``e``/``n``/``c`` (the official v1.0 files call the premise
  ``context``: both are read); evaluated with an MNLI-trained model.
* **GLUE layout** (:func:`read_glue_layout`): any TSV/JSONL the fine-tuning reader understands (the GLUE
  dev files, or custom field names), labels as written in the file.

Label mapping (:func:`map_labels`): every label name - of the set and of the model's ``id2label`` - is
resolved to a *meaning* (``entailment``, ``positive``, ``duplicate`` ...) through a synonym table and
the task's GLUE conventions (SST-2's ``"1"`` means positive, WNLI's ``"1"`` entailment).  Set labels are
then matched to model class ids by meaning, never by position: the project's MNLI classifier orders its
classes ``contradiction, entailment, neutral`` while GLUE's integers order them ``entailment, neutral,
contradiction``, so a positional match would score a perfect model at ~1/3.  A set label with no model
label of the same meaning, two set labels on one model class, a model with opaque names (``LABEL_0``)
or an explicit ``label_map`` that contradicts the names are errors naming both label sets.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .data import Example, read_examples, read_jsonl
from .tasks import get_task

# GLUE's integer label conventions (HF datasets / AdvGLUE): index = integer label, value = meaning.
GLUE_INT_LABELS: dict[str, tuple[str, ...]] = {
    "sst2": ("negative", "positive"),
    "cola": ("unacceptable", "acceptable"),
    "mrpc": ("not_equivalent", "equivalent"),
    "qqp": ("not_duplicate", "duplicate"),
    "mnli": ("entailment", "neutral", "contradiction"),
    "qnli": ("entailment", "not_entailment"),
    "rte": ("entailment", "not_entailment"),
    "wnli": ("not_entailment", "entailment"),
}

# AdvGLUE dev.json keys -> (GLUE task, text_a field, text_b field).
ADVGLUE_SUBSETS: dict[str, tuple[str, str, Optional[str]]] = {
    "sst2": ("sst2", "sentence", None),
    "qqp": ("qqp", "question1", "question2"),
    "mnli": ("mnli", "premise", "hypothesis"),
    "mnli-mm": ("mnli", "premise", "hypothesis"),
    "qnli": ("qnli", "question", "sentence"),
    "rte": ("rte", "sentence1", "sentence2"),
}

ANLI_LABELS = {"e": "entailment", "n": "neutral", "c": "contradiction"}

# Spellings of each meaning (after lower-casing and mapping ' ' and '-' to '_').
_SYNONYMS: dict[str, tuple[str, ...]] = {
    "entailment": ("entailment", "entails", "entailed", "e"),
    "neutral": ("neutral", "n"),
    "contradiction": ("contradiction", "contradicts", "contradictory", "c"),
    "not_entailment": ("not_entailment", "non_entailment", "not_entailed", "no_entailment"),
    "positive": ("positive", "pos"),
    "negative": ("negative", "neg"),
    "duplicate": ("duplicate", "is_duplicate", "paraphrase"),
    "not_duplicate": ("not_duplicate", "non_duplicate", "not_paraphrase"),
    "equivalent": ("equivalent",),
    "not_equivalent": ("not_equivalent",),
    "acceptable": ("acceptable",),
    "unacceptable": ("unacceptable",),
}
_MEANING = {s: m for m, spellings in _SYNONYMS.items() for s in spellings}
_GENERIC = re.compile(r"^label_?\d+$")


def _norm(name) -> str:
    return re.sub(r"[\s\-]+", "_", str(name).strip().lower())


def label_meaning(name, task: str = "") -> Optional[str]:
    """The meaning of a label name in the context of GLUE ``task`` (None when the name says nothing).

    Digit names take the task's GLUE integer convention (SST-2 ``"1"`` = positive); words go through
    the synonym table; HF's placeholder names ``LABEL_0`` ... carry no meaning.
    """
    n = _norm(name)
    if n in _MEANING:
        return _MEANING[n]
    try:
        key = get_task(task).name if task and task != "custom" else ""
    except ValueError:
        key = ""
    if n.isdigit() and key in GLUE_INT_LABELS and int(n) < len(GLUE_INT_LABELS[key]):
        return GLUE_INT_LABELS[key][int(n)]
    return None


@dataclass
class LabelledSet:
    """A labelled evaluation set: examples with label *names*, the set's label vocabulary, its GLUE task."""

    name: str
    path: str
    task: str                                  # GLUE task giving the label names their meaning
    labels: tuple[str, ...]                    # the set's label vocabulary (names)
    examples: list[Example] = field(default_factory=list)   # Example.label holds the label *name*
    ids: list[str] = field(default_factory=list)             # the published idx/uid of each example


def _fail(path, where: str, what: str) -> ValueError:
    return ValueError(f"{path}{where}: {what}")


def read_advglue(path: str | Path, subset: str, limit: int = 0) -> LabelledSet:
    """One task of an AdvGLUE ``dev.json`` (``subset``: sst2, qqp, mnli, mnli-mm, qnli or rte)."""
    path = Path(path)
    if subset not in ADVGLUE_SUBSETS:
        raise ValueError(f"AdvGLUE subset {subset!r}: choose one of {', '.join(ADVGLUE_SUBSETS)}")
    if not path.is_file():
        raise ValueError(f"AdvGLUE file {path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise _fail(path, f":{exc.lineno}", f"not valid JSON ({exc.msg}); AdvGLUE dev.json is one JSON object") from None
    except UnicodeDecodeError as exc:
        raise _fail(path, "", f"not UTF-8 text (byte {exc.start})") from None
    if not isinstance(data, dict):
        raise _fail(path, "", f"expected one JSON object keyed by task ({', '.join(ADVGLUE_SUBSETS)}), "
                              f"got {type(data).__name__}")
    if subset not in data:
        raise _fail(path, "", f"no task {subset!r} (the file has: {', '.join(map(str, data)) or 'nothing'})")
    items = data[subset]
    if not isinstance(items, list):
        raise _fail(path, f"[{subset}]", f"expected a list of examples, got {type(items).__name__}")
    task, fa, fb = ADVGLUE_SUBSETS[subset]
    names = GLUE_INT_LABELS[task]
    out = LabelledSet(f"advglue-{subset}", str(path), task, names)
    for i, it in enumerate(items):
        where = f"[{subset}][{i}]" + (f" (idx {it.get('idx')})" if isinstance(it, dict) and "idx" in it else "")
        if not isinstance(it, dict):
            raise _fail(path, where, f"expected an object, got {type(it).__name__}")
        for f in (fa, fb) if fb else (fa,):
            if not isinstance(it.get(f), str):
                raise _fail(path, where, f"missing text field {f!r} (AdvGLUE {subset} uses {fa!r}"
                                         f"{' and ' + repr(fb) if fb else ''}; fields here: {sorted(it)})")
        lab = it.get("label")
        if isinstance(lab, bool) or not isinstance(lab, int) or not 0 <= lab < len(names):
            raise _fail(path, where, f"label {lab!r} is not a GLUE integer label of {subset} "
                                     f"(0..{len(names) - 1}: {', '.join(names)})")
        out.examples.append(Example(it[fa], it[fb] if fb else None, names[lab], i + 1))
        out.ids.append(str(it.get("idx", i)))
        if limit and len(out.examples) >= limit:
            break
    return out


def read_anli(path: str | Path, limit: int = 0) -> LabelledSet:
    """An ANLI round file (``R1/dev.jsonl`` ...): JSON lines ``uid, premise, hypothesis, label (e/n/c)``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"ANLI file {path} not found")
    name = f"anli-{path.parent.name.lower()}-{path.stem}" if path.parent.name else f"anli-{path.stem}"
    out = LabelledSet(name, str(path), "mnli", ("entailment", "neutral", "contradiction"))
    for i, obj in read_jsonl(path):
        if not isinstance(obj, dict):
            raise _fail(path, f":{i}", "expected a JSON object per line")
        if "premise" not in obj and "context" in obj:   # the official v1.0 files name it "context"
            obj["premise"] = obj["context"]
        for f in ("premise", "hypothesis"):
            if not isinstance(obj.get(f), str):
                raise _fail(path, f":{i}", f"missing text field {f!r} (ANLI lines have uid, premise (or "
                                           f"context), hypothesis, label; fields here: {sorted(obj)})")
        lab = obj.get("label")
        if lab not in ANLI_LABELS:
            raise _fail(path, f":{i}", f"label {lab!r} is not one of e, n, c (ANLI's labels)")
        out.examples.append(Example(obj["premise"], obj["hypothesis"], ANLI_LABELS[lab], i))
        out.ids.append(str(obj.get("uid", i)))
        if limit and len(out.examples) >= limit:
            break
    return out


def read_glue_layout(path: str | Path, task: str, *, fmt: str = "auto", text_a: str = "", text_b: str = "",
                     label: str = "", labels: tuple[str, ...] = (), limit: int = 0) -> LabelledSet:
    """A GLUE-layout TSV/JSONL file (field names default to the task's; ``labels`` for custom files)."""
    spec = get_task(task, text_a=text_a, text_b=text_b, label=label, labels=tuple(labels))
    if spec.is_regression:
        raise ValueError(f"task {spec.name} is a regression: robust sets need a classification task")
    ex = read_examples(path, spec, fmt=fmt, limit=limit)   # label = index into spec.labels
    for e in ex:
        e.label = spec.labels[e.label]
    return LabelledSet(f"{Path(path).stem}", str(path), spec.name, tuple(spec.labels), ex,
                       [str(e.line) for e in ex])


def model_labels(config) -> list[str]:
    """The model's class names in class-id order (``config.id2label`` with int or str keys)."""
    n = int(getattr(config, "num_labels", 0) or 0)
    id2 = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    if sorted(id2) != list(range(n)):
        raise ValueError(f"model config id2label {id2} does not cover class ids 0..{n - 1}")
    return [id2[i] for i in range(n)]


def map_labels(set_labels, set_task: str, model_names, model_task: str = "",
               label_map: Optional[dict] = None, *, what: str = "set") -> dict[str, int]:
    """``{set label name: model class id}`` matched by meaning (see the module docstring).

    ``label_map`` ({set label: model label name}) is for models whose names carry no meaning; an entry
    whose two names both have a meaning must agree with them (a permuted map is an error).
    """
    model_names = [str(m) for m in model_names]
    both = (f"{what} labels {list(set_labels)} (task {set_task}) vs model labels {model_names}"
            f"{f' (task {model_task})' if model_task else ''}")
    if len(set(model_names)) != len(model_names):
        raise ValueError(f"model id2label has duplicate names: {model_names}")
    out: dict[str, int] = {}
    if label_map:
        unknown = [k for k in label_map if str(k) not in map(str, set_labels)]
        if unknown:
            raise ValueError(f"label_map keys {unknown} are not labels of the {what}: {both}")
        for s, m in label_map.items():
            s, m = str(s), str(m)
            if m not in model_names:
                raise ValueError(f"label_map maps {s!r} to {m!r}, which is not a model label: {both}")
            ms, mm = label_meaning(s, set_task), label_meaning(m, model_task or set_task)
            if ms and mm and ms != mm:
                raise ValueError(f"label_map maps {s!r} ({ms}) to model label {m!r} ({mm}): the names disagree "
                                 f"(a permuted map?): {both}")
            out[s] = model_names.index(m)
    meanings = {}
    for i, m in enumerate(model_names):
        mean = label_meaning(m, model_task or set_task)
        if mean is not None:
            if mean in meanings:
                raise ValueError(f"model labels {model_names[meanings[mean]]!r} and {m!r} both mean {mean}: {both}")
            meanings[mean] = i
    for s in set_labels:
        s = str(s)
        if s in out:
            continue
        mean = label_meaning(s, set_task)
        if mean is None or mean not in meanings:
            why = ("the model's label names carry no meaning (HF placeholders); give label_map"
                   if all(label_meaning(m, model_task or set_task) is None for m in model_names)
                   else f"no model label means {mean or repr(s)}")
            raise ValueError(f"cannot map {what} label {s!r}: {why}: {both}")
        out[s] = meanings[mean]
    hit: dict[int, str] = {}
    for s, i in out.items():
        if i in hit:
            raise ValueError(f"{what} labels {hit[i]!r} and {s!r} both map to model label {model_names[i]!r}: {both}")
        hit[i] = s
    if not label_map and len(hit) != len(model_names):
        missing = [model_names[i] for i in range(len(model_names)) if i not in hit]
        raise ValueError(f"model labels {missing} have no counterpart in the {what} (a {len(model_names)}-way "
                         f"model on a {len(set_labels)}-way set; give label_map to accept): {both}")
    return out
