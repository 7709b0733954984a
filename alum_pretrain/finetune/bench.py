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
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .. import stopping
from ..atomic import write_json, write_text
from ..runlock import lock_folder
from ..config import add_dataclass_arguments, config_to_dict, dataclass_from_args, opt
from .bench_report import markdown_table, summarise
from .bench_runs import (Run, evaluate_labelled_set, evaluate_set, execute, finished_results, load_sets,
                         parse_checkpoints, plan_runs)
from .bench_suite import SET_FORMATS, RobustSetSpec, Suite, TaskEntry, load_suite
from .tasks import get_task

__all__ = ["SET_FORMATS", "BenchArgs", "RobustSetSpec", "Run", "Suite", "TaskEntry", "bench", "build_parser",
           "evaluate_labelled_set", "evaluate_set", "execute", "finished_results", "load_sets", "load_suite",
           "main", "markdown_table", "parse_checkpoints", "plan_runs", "summarise"]

log = logging.getLogger("alum_pretrain.finetune.bench")


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
    todo = [run for run in runs if finished_results(run) is None]  # refuses a run finished with other settings
    check_runs(todo)  # every value of every run still to do, before any folder is locked or written
    # One alum-bench per --out (alum_pretrain.runlock); the tasks of a SLURM array share --out by design
    # and each locks only its own run folder.
    with lock_folder(outp if run_index is None else runs[0].dir, tool="alum-bench"):
        return _bench_runs(suite_path, suite, cks, outp, runs, sets, run_index, device, progress)


def check_runs(runs) -> None:
    """:func:`~alum_pretrain.finetune.trainer.check_finetune_inputs` once per distinct model, data and
    method setting of ``runs`` (seeds share it): a bad value fails the bench at once, naming the run."""
    from .trainer import check_finetune_inputs

    seen = set()
    for run in runs:
        d = config_to_dict(run.cfg)
        key = json.dumps([d["model"], d["data"], d["run"]["method"], d.get("smart")], sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        try:
            check_finetune_inputs(run.cfg)
        except ValueError as exc:
            raise ValueError(f"run {run.index} ({run.checkpoint} / {run.task.name} / {run.method}): {exc}") from exc


def _bench_runs(suite_path, suite, cks, outp, runs, sets, run_index, device, progress) -> dict:
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
        with stopping.raising():  # a stop signal ends the bench at once; finished runs are kept
            res = bench(args.suite, args.checkpoints, args.out, run_index=args.run_index, device=args.device,
                        progress=args.progress)
    except stopping.StopRequested as stop:
        return stopping.report("alum-bench", stop, "finished runs are kept; the same command runs the others")
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
