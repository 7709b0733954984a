"""The runs of an ``alum-bench`` suite: one (checkpoint, task, method, seed) fine-tuning run each, reused when
it finished with the same settings, and the evaluation of its best model on the task's robust sets.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..atomic import atomic_file, write_json
from ..config import config_from_dict, config_to_dict
from ..integrity import sha256_file
from .bench_suite import RobustSetSpec, Suite, TaskEntry, deep_merge, flatten_keys
from .config import FinetuneConfig
from .data import changed_data, data_fingerprints
from .robust_sets import LabelledSet, map_labels, model_labels
from .tasks import get_task

log = logging.getLogger("alum_pretrain.finetune.bench")

# Keys that may change between invocations without invalidating a finished run (bookkeeping/speed only).
_SPEED_ONLY = ("run.out", "run.progress", "run.log_every", "run.device", "run.resume", "optim.eval_batch_size")


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
                    raw = deep_merge(t.finetune, overrides or {})
                    raw = deep_merge(raw, {"model": {"path": path}, "data": {"task": t.task, "train": t.train,
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
    flat = flatten_keys(d)
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
    saved, current = res.get("data_fingerprints"), data_fingerprints(run.cfg)
    changed = changed_data(saved, current)
    if changed:  # same paths, other content: its results describe data that is no longer there
        shown = "; ".join(f"--{k}: {saved[k]} -> {current[k]}" for k in changed)
        raise ValueError(f"{run.dir} finished on other data ({shown}); restore the files, delete that folder "
                         "to redo it, or use another --out")
    return res


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
    fp = {"set": {k: v for k, v in spec.__dict__.items() if k != "where"}, "file_sha256": sha256_file(spec.file),
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
