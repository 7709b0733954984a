"""``alum-launch bench``: an ``alum-bench`` suite on SLURM as a job array plus a collecting job.

    alum-launch bench --suite suite.yaml --checkpoints alum=runs/alum/hf std=runs/std/hf --out bench/ \\
        --gpus 1 --time 4:00:00 --partition gpu [--max-parallel 16] [--dry-run]

Writes ``OUT/slurm/NAME.sbatch`` - an array with one task per run of ``alum-bench --list-runs`` (task i runs
``alum-bench ... --run-index i``: fine-tune, evaluate dev and robust sets, on one GPU) - and
``OUT/slurm/NAME-collect.sbatch``, submitted with ``--dependency=afterany`` on the array: it runs
``alum-bench`` once more without ``--run-index``, which reuses every finished run, redoes any that failed
or were cut by the time limit (fine-tuning resumes from its last epoch checkpoint) and writes
``results.json`` and ``results.md``.  A requeued array task resumes the same way.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from alum_pretrain.atomic import write_text
from alum_pretrain.config import add_dataclass_arguments, opt

from .slurm import SBATCH_TIMEOUT_S, sbatch_resource_lines, env_pairs, submit
from .spec import Resources, check_job_name, shell_join


@dataclass
class BenchOptions:
    """The options of ``alum-launch bench``."""

    suite: str = opt(None, "the alum-bench suite", required=True, metavar="SUITE.yaml")
    checkpoints: list[str] = opt(None, "HF checkpoint folders", required=True, metavar="[NAME=]DIR")
    out: str = opt(None, "alum-bench output folder (shared file system)", required=True, metavar="DIR")
    gpus: int = opt(1, "GPUs per array task (0 = CPU tasks)", metavar="G")
    max_parallel: int | None = opt(None, "at most P array tasks at once (SLURM's %P)", metavar="P")
    cpus_per_task: int | None = opt(None, "CPUs per array task")
    mem: str | None = opt(None, "memory per task, e.g. 32G")
    time: str | None = opt(None, "time limit per task (HH:MM:SS)")
    partition: str | None = opt(None, "")
    account: str | None = opt(None, "")
    qos: str | None = opt(None, "")
    constraint: str | None = opt(None, "")
    job_name: str | None = opt(None, "job name (default: bench-<out folder name>)", metavar="NAME")
    prologue: list[str] = opt([], "shell line before the run (e.g. 'source venv/bin/activate'; repeatable)",
                              metavar="CMD")
    env: list[str] = opt([], "export in the script (repeatable)", metavar="KEY=VALUE")
    dry_run: bool = opt(False, "write the scripts and print them; submit nothing")

    def __post_init__(self):
        if self.max_parallel is not None and self.max_parallel < 1:
            raise ValueError(f"--max-parallel={self.max_parallel}: must be >= 1")
        env_pairs(self.env)  # fail early on a malformed --env


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="run an alum-bench suite as a SLURM job array (one fine-tuning run per task)",
                       description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n", 2)[2],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(p, BenchOptions)


def render(name: str, res: Resources, bench_argv: list[str], log: Path, *, array: str | None,
           prologue: list[str], env: list[tuple[str, str]], header: str) -> str:
    lines = ["#!/bin/bash", f"# {header}", f"#SBATCH --job-name={name}", "#SBATCH --nodes=1", "#SBATCH --ntasks=1"]
    if array:
        lines.append(f"#SBATCH --array={array}")
    lines += sbatch_resource_lines(res)
    lines += [f"#SBATCH --output={log}", "#SBATCH --open-mode=append", "#SBATCH --requeue", "", "set -euo pipefail"]
    lines += list(prologue)
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env]
    cmd = "python -m alum_pretrain.finetune.bench " + shell_join(bench_argv)
    if array:
        cmd += ' --run-index "$SLURM_ARRAY_TASK_ID"'
    lines += [f'echo "[alum-launch $(date -u +%FT%TZ)] {"run ${SLURM_ARRAY_TASK_ID}" if array else "collect"} '
              f'on $(hostname)"', cmd, ""]
    return "\n".join(lines)


def cmd_bench(opts: BenchOptions, argv: list[str]) -> int:
    from alum_pretrain.finetune.bench import load_suite, parse_checkpoints, plan_runs

    out = Path(opts.out).resolve()
    suite = load_suite(opts.suite)
    cks = parse_checkpoints(opts.checkpoints)
    n = len(plan_runs(suite, cks, out))
    res = Resources(nodes=1, gpus_per_node=opts.gpus, cpus_per_task=opts.cpus_per_task, mem=opts.mem,
                    time=opts.time, partition=opts.partition, account=opts.account, qos=opts.qos,
                    constraint=opts.constraint)
    name = check_job_name(opts.job_name or f"bench-{out.name}")
    bench_argv = ["--suite", str(Path(opts.suite).resolve()), "--checkpoints",
                  *[f"{k}={v}" for k, v in cks.items()], "--out", str(out),
                  "--device", "cuda" if opts.gpus > 0 else "cpu", "--no-progress"]
    slurm_dir = out / "slurm"
    header = "Generated by: alum-launch " + shell_join(argv)
    array = f"0-{n - 1}" + (f"%{opts.max_parallel}" if opts.max_parallel else "")
    scripts = {}
    for key, arr, log in (("array", array, slurm_dir / "%x-%A_%a.log"), ("collect", None, slurm_dir / "%x-%j.log")):
        path = slurm_dir / (f"{name}.sbatch" if key == "array" else f"{name}-collect.sbatch")
        scripts[key] = write_text(path, render(name if key == "array" else f"{name}-collect", res, bench_argv, log,
                                               array=arr, prologue=opts.prologue, env=env_pairs(opts.env),
                                               header=header))
    print(f"alum-launch: {n} run(s) as array {array}; wrote {scripts['array']} and {scripts['collect']}",
          file=sys.stderr)
    if opts.dry_run:
        for p in scripts.values():
            print(p.read_text(encoding="utf-8"))
        return 0
    job = submit(scripts["array"])
    collect = _submit_after(scripts["collect"], job)
    print(f"submitted array job {job} ({n} tasks) and collecting job {collect}; results in {out}/results.md")
    return 0


def _submit_after(script: Path, job: str) -> str:
    import shutil
    import subprocess

    exe = shutil.which("sbatch")
    if exe is None:
        raise ValueError(f"sbatch: not found on PATH; submit {script} with --dependency=afterany:{job} yourself")
    try:  # bounded like launch.slurm.submit
        proc = subprocess.run([exe, "--parsable", f"--dependency=afterany:{job}", str(script)], capture_output=True,
                              text=True, timeout=SBATCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ValueError(f"sbatch {script}: no answer in {SBATCH_TIMEOUT_S} s (is slurmctld up?); check "
                         "`squeue --me` before submitting again") from None
    if proc.returncode != 0:
        raise ValueError(f"sbatch {script} failed (status {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]
