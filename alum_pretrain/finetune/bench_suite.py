"""The ``alum-bench`` suite file: its tasks, methods, seeds, alum-finetune overrides and robust sets, read
and validated (every error names the file and the key).  The file's layout is described in
:mod:`alum_pretrain.finetune.bench`.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .robust_sets import LabelledSet, read_advglue, read_anli, read_glue_layout
from .tasks import get_task

SET_FORMATS = ("advglue", "anli", "glue")
# Set by the suite for every run: a suite that sets them itself is an error.
_RUN_KEYS = ("model.path", "data.task", "data.train", "data.dev", "run.method", "run.seed", "run.out")


@dataclass
class RobustSetSpec:
    """One robust evaluation set attached to a task."""

    name: str
    file: str
    format: str = "glue"
    subset: str = ""
    task: str = ""
    fmt: str = "auto"
    text_a_field: str = ""
    text_b_field: str = ""
    label_field: str = ""
    labels: list = field(default_factory=list)
    label_map: dict = field(default_factory=dict)
    max_examples: int = 0
    attack: dict = field(default_factory=dict)
    embedding: dict = field(default_factory=dict)
    where: str = ""

    def __post_init__(self) -> None:
        w = self.where
        if not self.name or "/" in self.name:
            raise ValueError(f"{w}: name {self.name!r} must be non-empty and contain no '/'")
        if self.format not in SET_FORMATS:
            raise ValueError(f"{w}: format {self.format!r} must be one of {', '.join(SET_FORMATS)}")
        if self.format == "advglue" and not self.subset:
            raise ValueError(f"{w}: format advglue needs subset (sst2, qqp, mnli, mnli-mm, qnli or rte)")
        if not isinstance(self.max_examples, int) or self.max_examples < 0:
            raise ValueError(f"{w}: max_examples must be an integer >= 0")
        for k in ("attack", "embedding", "label_map"):
            if not isinstance(getattr(self, k), dict):
                raise ValueError(f"{w}: {k} must be a mapping")

    def load(self, default_task: str) -> LabelledSet:
        if self.format == "advglue":
            s = read_advglue(self.file, self.subset, self.max_examples)
        elif self.format == "anli":
            s = read_anli(self.file, self.max_examples)
        else:
            s = read_glue_layout(self.file, self.task or default_task, fmt=self.fmt, text_a=self.text_a_field,
                                 text_b=self.text_b_field, label=self.label_field, labels=tuple(map(str, self.labels)),
                                 limit=self.max_examples)
        s.name = self.name
        if not s.examples:
            raise ValueError(f"{self.where}: {self.file} has no examples")
        return s


@dataclass
class TaskEntry:
    """One task of the suite: fine-tuning data, methods, alum-finetune overrides, robust sets."""

    name: str
    task: str
    train: str
    dev: str
    methods: list
    finetune: dict
    robust: list


@dataclass
class Suite:
    path: str
    seeds: list
    tasks: list


def deep_merge(base: dict, over: dict) -> dict:
    """A deep copy of ``base`` with ``over`` laid on top, nested dicts merged key by key."""
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def flatten_keys(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (nested dicts with string keys become dotted keys)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v):
            out.update(flatten_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite file (every error names the file and the key)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--suite {path}: file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"--suite {path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"--suite {path}: expected a mapping with seeds, tasks (and methods, finetune)")
    unknown = sorted(set(raw) - {"seeds", "methods", "finetune", "tasks"})
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown} (valid: seeds, methods, finetune, tasks)")
    base = path.parent

    def resolve(p) -> str:
        p = Path(os.path.expanduser(str(p)))
        return str(p if p.is_absolute() else (base / p).resolve())

    seeds = raw.get("seeds", [1, 2, 3])
    if (not isinstance(seeds, list) or not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds)
            or len(set(seeds)) != len(seeds)):
        raise ValueError(f"{path}: seeds must be a non-empty list of distinct integers (got {seeds!r})")
    default_methods = raw.get("methods", ["plain"])
    defaults = raw.get("finetune") or {}
    if not isinstance(defaults, dict):
        raise ValueError(f"{path}: finetune must be a mapping of alum-finetune sections")
    tasks_raw = raw.get("tasks")
    if isinstance(tasks_raw, dict):
        tasks_raw = [{"name": k, **(v or {})} for k, v in tasks_raw.items()]
    if not isinstance(tasks_raw, list) or not tasks_raw:
        raise ValueError(f"{path}: tasks must be a non-empty list of task entries")
    tasks, names = [], set()
    for i, t in enumerate(tasks_raw):
        w = f"{path}: tasks[{i}]"
        if not isinstance(t, dict):
            raise ValueError(f"{w}: expected a mapping")
        bad = sorted(set(t) - {"name", "task", "train", "dev", "methods", "finetune", "robust"})
        if bad:
            raise ValueError(f"{w}: unknown key(s) {bad} (valid: name, task, train, dev, methods, finetune, robust)")
        task = str(t.get("task") or t.get("name") or "")
        name = str(t.get("name") or task)
        w = f"{path}: task {name!r}"
        if not name or "/" in name or name in names:
            raise ValueError(f"{w}: names must be unique, non-empty, without '/'")
        names.add(name)
        get_task(task)   # unknown task -> ValueError listing the tasks
        for key in ("train", "dev"):
            if not t.get(key):
                raise ValueError(f"{w}: {key} (file) is required")
        methods = t.get("methods", default_methods)
        if isinstance(methods, str):
            methods = [methods]
        if not isinstance(methods, list) or not methods or len(set(methods)) != len(methods):
            raise ValueError(f"{w}: methods must be a non-empty list of distinct alum-finetune methods")
        ft = deep_merge(defaults, t.get("finetune") or {})
        clash = [k for k in flatten_keys(ft) if k in _RUN_KEYS]
        if clash:
            raise ValueError(f"{w}: finetune sets {clash}; alum-bench sets these per run (use the suite's "
                             "train/dev/task/methods/seeds and --checkpoints/--out)")
        robust = []
        for j, r in enumerate(t.get("robust") or []):
            rw = f"{w} robust[{j}]"
            if not isinstance(r, dict) or "file" not in r:
                raise ValueError(f"{rw}: expected a mapping with at least file (and name, format)")
            allowed = set(RobustSetSpec.__dataclass_fields__) - {"where"}
            bad = sorted(set(r) - allowed)
            if bad:
                raise ValueError(f"{rw}: unknown key(s) {bad} (valid: {', '.join(sorted(allowed))})")
            r = dict(r)
            r.setdefault("name", Path(str(r["file"])).stem if r.get("format") != "advglue"
                         else f"advglue-{r.get('subset', '')}")
            r["file"] = resolve(r["file"])
            robust.append(RobustSetSpec(**r, where=rw))
        if len({r.name for r in robust}) != len(robust):
            raise ValueError(f"{w}: robust set names must be unique")
        tasks.append(TaskEntry(name, task, resolve(t["train"]), resolve(t["dev"]), list(methods), ft, robust))
    return Suite(str(path), list(seeds), tasks)
