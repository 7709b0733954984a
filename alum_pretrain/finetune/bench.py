"""``alum-bench``: the papers' downstream tables from one command - fine-tune every checkpoint on every task
of a suite with every method and seed, evaluate each best model on its dev set and on the robust sets
attached to its task, and write ``results.json`` and a Markdown table (rows: checkpoint x method;
columns: task / set; cell: median over seeds with min-max beside it; with several checkpoints a paired
row per later checkpoint against the first: median of the per-seed differences, sign count, differences).

    alum-bench --checkpoints runs/alum/hf runs/std/hf --suite suite.yaml --out bench/
    alum-bench ... --list-runs               # the numbered (checkpoint, task, method, seed) runs
    alum-bench ... --run-index 7             # one run only (a SLURM array task; see alum-launch bench)

Suite file (YAML; relative paths are relative to the suite file)::

    seeds: [1, 2, 3]                 # fine-tuning seeds (the papers report the median of 3-5)
    methods: [plain]                 # default methods (alum-finetune --method) of every task
    finetune:                        # alum-finetune options for every task (its sections)
      optim: {epochs: 3, batch_size: 32}
    tasks:
      - name: sst2                   # column name (default: task)
        task: sst2                   # GLUE task of alum-finetune (label names, metric)
        train: glue/SST-2/train.tsv
        dev: glue/SST-2/dev.tsv
        methods: [plain, smart]      # optional, overrides the default
        finetune: {optim: {lr: 2e-5}}            # merged over the suite's
        robust:                      # evaluated with each best model of this task
          - {name: advglue, format: advglue, file: adv_glue/dev.json, subset: sst2}
      - name: mnli
        ...
        robust:
          - {name: anli-r1, format: anli, file: anli_v1.0/R1/test.jsonl}
          - {name: hans, format: glue, file: hans.tsv, task: custom, text_a_field: premise, ...}

Robust-set keys: ``name``, ``file``, ``format`` (advglue | anli | glue), ``subset`` (AdvGLUE task key),
``task``/``fmt``/``text_a_field``/``text_b_field``/``label_field``/``labels`` (glue layout),
``label_map`` ({set label: model label}, only for models whose label names say nothing),
``max_examples``, and ``attack``/``embedding`` (alum-eval-robust's sections, off by default).

Output folder: ``runs/CKPT/TASK/METHOD/seedS/`` (an alum-finetune output folder each, plus ``eval/`` with
one JSON report per robust set), ``results.json`` and ``results.md``.  Re-running reuses finished runs
and cached evaluations; a run whose settings changed since it finished is an error naming the keys.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

from ..atomic import atomic_file, write_json, write_text
from ..config import add_dataclass_arguments, config_from_dict, config_to_dict, dataclass_from_args, opt
from .config import FinetuneConfig
from .robust_sets import LabelledSet, map_labels, model_labels, read_advglue, read_anli, read_glue_layout
from .tasks import get_task

log = logging.getLogger("alum_pretrain.finetune.bench")

SET_FORMATS = ("advglue", "anli", "glue")
# Set by the suite for every run: a suite that sets them itself is an error.
_RUN_KEYS = ("model.path", "data.task", "data.train", "data.dev", "run.method", "run.seed", "run.out")
# Keys that may change between invocations without invalidating a finished run (bookkeeping/speed only).
_SPEED_ONLY = ("run.out", "run.progress", "run.log_every", "run.device", "run.resume", "optim.eval_batch_size")


# -------------------------------------------------------------------------------------------------
# suite file
# -------------------------------------------------------------------------------------------------

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


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v):
            out.update(_flat(v, f"{prefix}{k}."))
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
        ft = _merge(defaults, t.get("finetune") or {})
        clash = [k for k in _flat(ft) if k in _RUN_KEYS]
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


# -------------------------------------------------------------------------------------------------
# runs
# -------------------------------------------------------------------------------------------------

@dataclass
class Run:
    index: int
    checkpoint: str     # name
    task: TaskEntry
    method: str
    seed: int
    dir: Path
    cfg: FinetuneConfig


def parse_checkpoints(items: list[str]) -> dict[str, str]:
    """``[NAME=]PATH`` items -> {name: path} (name defaults to the folder name; names must be unique)."""
    out: dict[str, str] = {}
    for it in items:
        name, sep, p = it.partition("=")
        if not sep:
            p, name = it, Path(it.rstrip("/")).name
        if not name or "/" in name:
            raise ValueError(f"--checkpoints {it!r}: give NAME=PATH (the name must not contain '/')")
        if not (Path(p) / "config.json").is_file():
            raise ValueError(f"--checkpoints {it!r}: {p} has no config.json (expected a HuggingFace folder, "
                             "e.g. alum-export output)")
        if name in out:
            raise ValueError(f"--checkpoints: two checkpoints are named {name!r}; use NAME=PATH to tell them apart")
        out[name] = str(Path(p).resolve())
    if not out:
        raise ValueError("--checkpoints: give at least one checkpoint folder")
    return out


def plan_runs(suite: Suite, checkpoints: dict[str, str], out: Path, overrides: Optional[dict] = None) -> list[Run]:
    """Every (checkpoint, task, method, seed) run with its validated alum-finetune config, in a fixed order."""
    runs = []
    for ck, path in checkpoints.items():
        for t in suite.tasks:
            for m in t.methods:
                for s in suite.seeds:
                    d = out / "runs" / ck / t.name / m / f"seed{s}"
                    raw = _merge(t.finetune, overrides or {})
                    raw = _merge(raw, {"model": {"path": path}, "data": {"task": t.task, "train": t.train,
                                                                          "dev": t.dev},
                                       "run": {"method": m, "seed": s, "out": str(d)}})
                    where = f"{suite.path}: task {t.name!r}"
                    try:
                        cfg = config_from_dict(FinetuneConfig, raw, _source=f"{where} finetune")
                    except ValueError as exc:
                        msg = str(exc)
                        raise ValueError(msg if msg.startswith(where) else f"{where}, method {m!r}: {msg}") from None
                    runs.append(Run(len(runs), ck, t, m, s, d, cfg))
    return runs


def _comparable(d: dict) -> dict:
    flat = _flat(d)
    return {k: v for k, v in flat.items() if k not in _SPEED_ONLY}


def finished_results(run: Run) -> Optional[dict]:
    """The results of a finished run in ``run.dir`` (None if it has not finished).

    A finished run whose settings differ from ``run.cfg`` is an error naming the keys; an unreadable
    results.json is moved aside (``results.json.corrupt``) and the run is redone (alum-finetune resumes
    from its checkpoint, so nothing trained is lost).
    """
    p = run.dir / "results.json"
    if not p.is_file():
        return None
    try:
        res = json.loads(p.read_text(encoding="utf-8"))
        if not isinstance(res, dict) or "config" not in res:
            raise ValueError("no config")
    except (ValueError, UnicodeDecodeError) as exc:
        bad = p.with_name("results.json.corrupt")
        os.replace(p, bad)
        log.warning("%s: unreadable (%s); moved to %s, the run is resumed", p, exc, bad)
        return None
    if not res.get("finished") or res.get("best") is None or not (run.dir / "best" / "config.json").is_file():
        return None
    was, now = _comparable(res["config"]), _comparable(json.loads(json.dumps(config_to_dict(run.cfg))))
    diff = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
    if diff:
        shown = "; ".join(f"{k}: {was.get(k)!r} -> {now.get(k)!r}" for k in diff[:6])
        raise ValueError(f"{run.dir} finished with other settings ({shown}); delete that folder to redo it, "
                         "or use another --out")
    return res


def _file_fingerprint(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _model_fingerprint(best: Path) -> list:
    return sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in best.iterdir() if f.is_file())


def evaluate_set(run: Run, spec: RobustSetSpec, lset: LabelledSet, *, device: str = "auto",
                 progress: bool = False) -> dict:
    """Evaluate ``run``'s best model on a robust set through ``alum-eval-robust`` (cached in ``eval/``).

    The set's label names are mapped to the model's class ids through ``id2label``; the examples are
    written as JSON lines in the model's label names (``eval/NAME.jsonl``) and evaluated in-process with
    :func:`alum_pretrain.finetune.robust.evaluate_robustness` (clean accuracy; the PWWS attack and the
    embedding-space loss increase when the set asks for them).
    """
    from transformers import AutoConfig

    best = run.dir / "best"
    names = model_labels(AutoConfig.from_pretrained(best))
    mapping = map_labels(lset.labels, lset.task, names, run.task.task, spec.label_map,
                         what=f"robust set {spec.name!r} ({spec.file})")
    edir = run.dir / "eval"
    edir.mkdir(exist_ok=True)
    fp = {"set": {k: v for k, v in spec.__dict__.items() if k != "where"}, "file_sha256": _file_fingerprint(Path(spec.file)),
          "model": _model_fingerprint(best), "max_length": run.cfg.data.max_length, "mapping": mapping}
    fp = json.loads(json.dumps(fp))
    cache = edir / f"{spec.name}.json"
    if cache.is_file():
        try:
            old = json.loads(cache.read_text(encoding="utf-8"))
            if old.get("fingerprint") == fp:
                return old["report"]
        except (ValueError, UnicodeDecodeError, AttributeError, KeyError):
            log.warning("%s: unreadable evaluation cache, evaluating again", cache)
    report = evaluate_labelled_set(best, lset, model_task=run.task.task, label_map=spec.label_map,
                                   workdir=edir, max_length=run.cfg.data.max_length,
                                   batch_size=run.cfg.optim.eval_batch_size, device=device, seed=run.seed,
                                   attack=spec.attack, embedding=spec.embedding, progress=progress,
                                   where=spec.where)
    write_json(cache, {"fingerprint": fp, "report": report}, indent=2)
    return report


def evaluate_labelled_set(model_dir: str | Path, lset: LabelledSet, *, model_task: str = "",
                          label_map: Optional[dict] = None, workdir: str | Path, max_length: int = 128,
                          batch_size: int = 64, device: str = "auto", seed: int = 0, attack: Optional[dict] = None,
                          embedding: Optional[dict] = None, progress: bool = False, where: str = "") -> dict:
    """Evaluate a fine-tuned classifier folder on a labelled set with labels matched through ``id2label``.

    The examples are written as JSON lines in the model's label names (``WORKDIR/NAME.jsonl``) and
    evaluated in-process by :func:`alum_pretrain.finetune.robust.evaluate_robustness` (``alum-eval-robust``);
    ``attack``/``embedding`` are its sections (both off unless ``enabled: true``).  The report gains
    ``accuracy`` (= ``clean_accuracy``) and ``label_mapping`` ({set label: model label}).
    """
    from transformers import AutoConfig

    from .robust import RobustConfig, evaluate_robustness

    names = model_labels(AutoConfig.from_pretrained(model_dir))
    mapping = map_labels(lset.labels, lset.task, names, model_task, label_map,
                         what=f"set {lset.name!r} ({lset.path})")
    pair = lset.examples[0].text_b is not None
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / f"{lset.name}.jsonl"
    with atomic_file(data) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for e, idx in zip(lset.examples, lset.ids):
            rec = {"id": idx, "text_a": e.text_a, "label": names[mapping[e.label]]}
            if pair:
                rec["text_b"] = e.text_b
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    rcfg = config_from_dict(RobustConfig, {
        "model": {"path": str(model_dir)},
        "data": {"task": "custom", "file": str(data), "format": "jsonl", "text_a_field": "text_a",
                 "text_b_field": "text_b" if pair else "", "label_field": "label", "labels": names,
                 "max_length": max_length, "batch_size": batch_size},
        "attack": {"enabled": False, **(attack or {})}, "embedding": {"enabled": False, **(embedding or {})},
        "run": {"device": device, "seed": seed, "progress": progress}},
        _source=f"{where or lset.name} (attack/embedding)")
    report = evaluate_robustness(rcfg)
    report["accuracy"] = report["clean_accuracy"]
    report["label_mapping"] = {s: names[i] for s, i in mapping.items()}
    return report


def execute(run: Run, sets: dict, *, device: str = "auto", progress: bool = False) -> dict:
    """Fine-tune (or reuse) one run and evaluate it; returns its record for results.json."""
    from .trainer import finetune

    res = finished_results(run)
    reused = res is not None
    if res is None:
        run.cfg.run.progress = progress
        if device != "auto":
            run.cfg.run.device = device
        if (run.dir / "checkpoint.pt").is_file() and not (run.dir / "best" / "config.json").is_file():
            # the epoch checkpoint exists but the best model it refers to is gone: resuming would skip
            # the finished epochs and never write best/ again, so this run starts over
            log.warning("%s: best/ is missing although checkpoint.pt exists; fine-tuning this run again", run.dir)
            run.cfg.run.resume = "never"
        log.info("run %d: %s / %s / %s / seed %d -> %s", run.index, run.checkpoint, run.task.name, run.method,
                 run.seed, run.dir)
        res = finetune(run.cfg)
        if not res.get("finished") or res.get("best") is None:
            raise ValueError(f"{run.dir}: the fine-tuning run did not finish with a best model "
                             f"(finished={res.get('finished')}, best={res.get('best')})")
    metric = res["metric"]
    rec = {"index": run.index, "checkpoint": run.checkpoint, "task": run.task.name, "method": run.method,
           "seed": run.seed, "dir": str(run.dir), "reused": reused, "metric": metric,
           "dev": res["best"]["metrics"], "best_epoch": res["best"]["epoch"], "robust": {}}
    for spec in run.task.robust:
        rep = evaluate_set(run, spec, sets[(run.task.name, spec.name)], device=device, progress=progress)
        rec["robust"][spec.name] = {k: rep[k] for k in ("accuracy", "examples", "label_mapping")}
        if "attack" in rep:
            rec["robust"][spec.name]["attacked_accuracy"] = rep["attack"]["attacked_accuracy"]
    return rec


# -------------------------------------------------------------------------------------------------
# aggregation and the table
# -------------------------------------------------------------------------------------------------

def _columns(suite: Suite) -> list[tuple[str, str]]:
    """(column key, header) in table order: per task its dev metric, then each robust set."""
    cols = []
    for t in suite.tasks:
        metric = get_task(t.task).metric
        cols.append((f"{t.name}/dev", f"{t.name} dev ({metric})"))
        for r in t.robust:
            cols.append((f"{t.name}/{r.name}", f"{t.name} {r.name} (acc)"))
            if r.attack.get("enabled", False):
                cols.append((f"{t.name}/{r.name}/attacked", f"{t.name} {r.name} attacked (acc)"))
    return cols


def _value(rec: dict, col: str) -> Optional[float]:
    task, _, rest = col.partition("/")
    if rest == "dev":
        v = rec["dev"].get(rec["metric"])
    elif rest.endswith("/attacked"):
        v = rec["robust"].get(rest[:-len("/attacked")], {}).get("attacked_accuracy")
    else:
        v = rec["robust"].get(rest, {}).get("accuracy")
    return None if v is None else 100.0 * float(v)


def summarise(suite: Suite, checkpoints: list[str], records: list[dict]) -> dict:
    """Per (checkpoint, method, column): per-seed values, median, min, max (non-finite values counted apart);
    per later checkpoint vs the first: per-seed differences (seeds both have), median and sign count."""
    cols = _columns(suite)
    methods = list(dict.fromkeys(m for t in suite.tasks for m in t.methods))
    summary: dict = {}
    for ck in checkpoints:
        for m in methods:
            row = {}
            for key, _ in cols:
                task = key.split("/")[0]
                vals = {r["seed"]: _value(r, key) for r in records
                        if r["checkpoint"] == ck and r["method"] == m and r["task"] == task}
                if not vals:
                    continue
                finite = [v for v in vals.values() if v is not None and math.isfinite(v)]
                row[key] = {"values": {str(s): v for s, v in sorted(vals.items())}, "n": len(finite),
                            "non_finite": len(vals) - len(finite),
                            "median": float(np.median(finite)) if finite else None,
                            "min": min(finite) if finite else None, "max": max(finite) if finite else None}
            if row:
                summary.setdefault(ck, {})[m] = row
    paired = []
    base = checkpoints[0]
    for ck in checkpoints[1:]:
        for m in methods:
            row = {}
            for key, _ in cols:
                a = (summary.get(base, {}).get(m, {}).get(key) or {}).get("values", {})
                b = (summary.get(ck, {}).get(m, {}).get(key) or {}).get("values", {})
                diffs = {s: b[s] - a[s] for s in a if s in b and a[s] is not None and b[s] is not None
                         and math.isfinite(a[s]) and math.isfinite(b[s])}
                if not diffs:
                    continue
                d = list(diffs.values())
                row[key] = {"differences": diffs, "median": float(np.median(d)),
                            "wins": sum(x > 0 for x in d), "losses": sum(x < 0 for x in d),
                            "ties": sum(x == 0 for x in d)}
            if row:
                paired.append({"checkpoint": ck, "baseline": base, "method": m, "columns": row})
    return {"columns": [{"key": k, "header": h} for k, h in cols], "summary": summary, "paired": paired}


def markdown_table(summary: dict, seeds: list) -> str:
    cols = summary["columns"]
    head = "| checkpoint | method | " + " | ".join(c["header"] for c in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for ck, by_method in summary["summary"].items():
        for m, row in by_method.items():
            cells = []
            for c in cols:
                s = row.get(c["key"])
                if not s or s["median"] is None:
                    cells.append("n/a" if not s else f"n/a ({s['non_finite']} failed/non-finite)")
                    continue
                cell = f"{s['median']:.1f} ({s['min']:.1f}–{s['max']:.1f})"
                if s["non_finite"]:
                    cell += f" [{s['non_finite']} failed/non-finite]"
                cells.append(cell)
            lines.append(f"| {ck} | {m} | " + " | ".join(cells) + " |")
    for p in summary["paired"]:
        cells = []
        for c in cols:
            s = p["columns"].get(c["key"])
            if not s:
                cells.append("n/a")
                continue
            diffs = ", ".join(f"{d:+.1f}" for _, d in sorted(s["differences"].items(), key=lambda kv: int(kv[0])))
            cells.append(f"{s['median']:+.1f} [{s['wins']}+ {s['losses']}− {s['ties']}=] ({diffs})")
        lines.append(f"| {p['checkpoint']} − {p['baseline']} | {p['method']} | " + " | ".join(cells) + " |")
    note = (f"\nCells: median over seeds {', '.join(map(str, seeds))} (min–max), in %.  Paired rows: median of the "
            "per-seed differences [seeds better+ worse− equal=] (the differences in seed order).")
    return "\n".join(lines) + "\n" + note + "\n"


# -------------------------------------------------------------------------------------------------
# driver
# -------------------------------------------------------------------------------------------------

def load_sets(suite: Suite) -> dict:
    """Read every robust set once (errors before any training) and check its labels against the task's."""
    sets = {}
    for t in suite.tasks:
        spec = get_task(t.task)
        for r in t.robust:
            s = r.load(t.task)
            if not spec.is_regression:   # the fine-tuned model will carry the task's label names
                map_labels(s.labels, s.task, list(spec.labels), t.task, r.label_map,
                           what=f"robust set {r.name!r} ({r.file})")
            sets[(t.name, r.name)] = s
    return sets


def bench(suite_path: str, checkpoints: list[str], out: str, *, run_index: Optional[int] = None,
          device: str = "auto", progress: bool = True, overrides: Optional[dict] = None) -> dict:
    """Run (or reuse) every run of the suite and write ``results.json``/``results.md``; returns the results.

    ``run_index``: run only that run (SLURM array task) and write nothing else.
    """
    suite = load_suite(suite_path)
    cks = parse_checkpoints(checkpoints)
    outp = Path(out)
    runs = plan_runs(suite, cks, outp, overrides)
    sets = load_sets(suite)
    if run_index is not None:
        if not 0 <= run_index < len(runs):
            raise ValueError(f"--run-index {run_index}: the suite has runs 0..{len(runs) - 1}")
        runs = [runs[run_index]]
    for run in runs:   # a run that finished with other settings is refused before any work is done
        finished_results(run)
    outp.mkdir(parents=True, exist_ok=True)
    records, failed = [], []
    try:
        from tqdm.auto import tqdm
        bar = tqdm(runs, desc="alum-bench", disable=not progress or len(runs) < 2)
    except ImportError:  # pragma: no cover
        bar = runs
    for run in bar:
        if run_index is not None:   # one array task: its failure is the task's failure
            records.append(execute(run, sets, device=device, progress=progress))
            continue
        try:
            records.append(execute(run, sets, device=device, progress=progress and len(runs) == 1))
        except (ValueError, RuntimeError, FloatingPointError, OSError) as exc:
            # one failed run (diverged, bad file found late, disk full ...) must not cost the others: it is
            # recorded, counted as missing in its cells, and redone by the next invocation
            log.error("run %d (%s) failed: %s", run.index, run.dir, exc)
            failed.append({"index": run.index, "dir": str(run.dir), "error": f"{type(exc).__name__}: {exc}"})
            records.append({"index": run.index, "checkpoint": run.checkpoint, "task": run.task.name,
                            "method": run.method, "seed": run.seed, "dir": str(run.dir), "reused": False,
                            "metric": get_task(run.task.task).metric, "dev": {}, "robust": {},
                            "error": failed[-1]["error"]})
    if run_index is not None:
        return {"runs": records}
    result = {"suite": str(Path(suite_path).resolve()), "checkpoints": cks, "seeds": suite.seeds,
              "runs": records, "failed": failed}
    result.update(summarise(suite, list(cks), records))
    write_json(outp / "results.json", result, indent=2)
    table = markdown_table(result, suite.seeds)
    write_text(outp / "results.md", table)
    result["table"] = table
    return result


@dataclass
class BenchArgs:
    """The options of ``alum-bench``."""

    checkpoints: list[str] = opt(None, "HF checkpoint folders (alum-export output, MiniLM, bert-base ...); the first "
                                 "is the baseline of the paired rows; NAME defaults to the folder name",
                                 required=True, metavar="[NAME=]DIR")
    suite: str = opt(None, "tasks, methods, seeds, robust sets", required=True, metavar="SUITE.yaml")
    out: str = opt(None, "output folder (runs/, results.json, results.md); finished runs in it are reused",
                   required=True, metavar="DIR")
    run_index: Optional[int] = opt(None, "run only run I of --list-runs (one SLURM array task) and write no table",
                                   metavar="I")
    list_runs: bool = opt(False, "print the numbered runs and exit")
    device: str = opt("auto", "device for fine-tuning and evaluation (speed only: finished runs stay valid)",
                      choices=("auto", "cpu", "cuda"))
    progress: bool = opt(True, "progress bars")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alum-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(p, BenchArgs)
    return p


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = dataclass_from_args(BenchArgs, build_parser().parse_args(argv))
    try:
        if args.list_runs:
            suite = load_suite(args.suite)
            runs = plan_runs(suite, parse_checkpoints(args.checkpoints), Path(args.out))
            for r in runs:
                state = "done" if finished_results(r) is not None else "todo"
                print(f"{r.index}\t{r.checkpoint}\t{r.task.name}\t{r.method}\tseed {r.seed}\t{state}\t{r.dir}")
            return 0
        res = bench(args.suite, args.checkpoints, args.out, run_index=args.run_index, device=args.device,
                    progress=args.progress)
    except ValueError as exc:
        print(f"alum-bench: error: {exc}", file=sys.stderr)
        return 2
    if args.run_index is None:
        print(res["table"])
        print(f"results: {Path(args.out) / 'results.json'}, {Path(args.out) / 'results.md'}")
        if res["failed"]:
            for f in res["failed"]:
                print(f"alum-bench: run {f['index']} failed ({f['dir']}): {f['error']}", file=sys.stderr)
            print(f"alum-bench: {len(res['failed'])} run(s) failed; re-run the same command to redo them",
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
