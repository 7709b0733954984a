"""GLUE-style task definitions: where the text and label columns are, the label set, the metric.

A task spec says how to read a GLUE TSV file (header names, or column indices for header-less files
such as CoLA's train/dev), which labels exist (their order defines the class ids) and which metric
selects the best checkpoint.  ``custom`` reads any TSV/JSONL whose field names are given on the command
line (``--data.text_a_field`` ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class TaskSpec:
    name: str
    text_a: str                      # header name (TSV/JSONL) of the first text
    text_b: Optional[str]            # header name of the second text (pairs) or None
    label: str                       # header name of the label
    labels: tuple[str, ...] = ()     # class names in class-id order; () = regression
    metric: str = "accuracy"         # main metric (checkpoint selection)
    # header-less TSV layouts (CoLA train/dev): column indices of (text_a, text_b, label)
    headerless_columns: Optional[tuple[int, Optional[int], int]] = None
    extra_metrics: tuple[str, ...] = field(default=())

    @property
    def is_regression(self) -> bool:
        return not self.labels

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.labels)


# Column names as in the GLUE distribution (the gluebenchmark.com TSV files).
TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec("sst2", "sentence", None, "label", ("0", "1"), "accuracy"),
    "cola": TaskSpec("cola", "sentence", None, "label", ("0", "1"), "matthews", headerless_columns=(3, None, 1),
                     extra_metrics=("accuracy",)),
    "mrpc": TaskSpec("mrpc", "#1 String", "#2 String", "Quality", ("0", "1"), "f1", extra_metrics=("accuracy",)),
    "qqp": TaskSpec("qqp", "question1", "question2", "is_duplicate", ("0", "1"), "f1", extra_metrics=("accuracy",)),
    "stsb": TaskSpec("stsb", "sentence1", "sentence2", "score", (), "pearson", extra_metrics=("spearman",)),
    "mnli": TaskSpec("mnli", "sentence1", "sentence2", "gold_label", ("contradiction", "entailment", "neutral"),
                     "accuracy"),
    "qnli": TaskSpec("qnli", "question", "sentence", "label", ("entailment", "not_entailment"), "accuracy"),
    "rte": TaskSpec("rte", "sentence1", "sentence2", "label", ("entailment", "not_entailment"), "accuracy"),
    "wnli": TaskSpec("wnli", "sentence1", "sentence2", "label", ("0", "1"), "accuracy"),
}
ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mnli-mm": "mnli"}
TASK_NAMES = tuple(TASKS) + ("custom",)


def get_task(name: str, *, text_a: str = "", text_b: str = "", label: str = "",
             labels: tuple[str, ...] | list[str] = (), regression: bool = False,
             metric: str = "") -> TaskSpec:
    """The spec of a GLUE task (field names/labels/metric may be overridden), or a ``custom`` one."""
    key = ALIASES.get(name.lower(), name.lower())
    if key == "custom":
        if not text_a or not label:
            raise ValueError("--data.task=custom needs --data.text_a_field and --data.label_field "
                             "(and --data.labels=a,b,... for classification or --data.regression=true)")
        if not regression and len(labels) < 2:
            raise ValueError("--data.task=custom: give --data.labels (at least 2 class names, e.g. 0,1) "
                             "or --data.regression=true")
        return TaskSpec("custom", text_a, text_b or None, label, () if regression else tuple(labels),
                        metric or ("pearson" if regression else "accuracy"),
                        extra_metrics=("pearson", "spearman") if regression else ("accuracy",))
    if key not in TASKS:
        raise ValueError(f"--data.task={name!r}: unknown task (choose one of {', '.join(TASK_NAMES)})")
    spec = TASKS[key]
    if text_a or text_b or label or labels or metric:
        spec = TaskSpec(spec.name, text_a or spec.text_a, (text_b or spec.text_b), label or spec.label,
                        tuple(labels) or spec.labels, metric or spec.metric, spec.headerless_columns,
                        spec.extra_metrics)
    return spec
