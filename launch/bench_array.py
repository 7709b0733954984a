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
from pathlib import Path

from .spec import Resources, check_job_name, shell_join


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="run an alum-bench suite as a SLURM job array (one fine-tuning run per task)",
                       description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n", 2)[2],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", required=True, metavar="SUITE.yaml", help="the alum-bench suite")
    p.add_argument("--checkpoints", nargs="+", required=True, metavar="[NAME=]DIR", help="HF checkpoint folders")
    p.add_argument("--out", required=True, metavar="DIR", help="alum-bench output folder (shared file system)")
    p.add_argument("--gpus", type=int, default=1, metavar="G", help="GPUs per array task (0 = CPU tasks)")
    p.add_argument("--max-parallel", type=int, metavar="P", help="at most P array tasks at once (SLURM's %%P)")
    for flag, hlp in (("--cpus-per-task", "CPUs per array task"), ("--mem", "memory per task, e.g. 32G"),
                      ("--time", "time limit per task (HH:MM:SS)"), ("--partition", None), ("--account", None),
                      ("--qos", None), ("--constraint", None)):
        p.add_argument(flag, type=int if flag == "--cpus-per-task" else str, help=hlp)
    p.add_argument("--job-name", metavar="NAME", help="job name (default: bench-<out folder name>)")
    p.add_argument("--prologue", action="append", default=[], metavar="CMD", help="shell line before the run "
                   "(e.g. 'source venv/bin/activate'; repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="export in the script (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="write the scripts and print them; submit nothing")


def render(name: str, res: Resources, bench_argv: list[str], log: Path, *, array: str | None,
           prologue: list[str], env: list[tuple[str, str]], header: str) -> str:
    from .slurm import _sbatch_resource_lines

    lines = ["#!/bin/bash", f"# {header}", f"#SBATCH --job-name={name}", "#SBATCH --nodes=1", "#SBATCH --ntasks=1"]
    if array:
        lines.append(f"#SBATCH --array={array}")
    lines += _sbatch_resource_lines(res)
    lines += [f"#SBATCH --output={log}", "#SBATCH --open-mode=append", "#SBATCH --requeue", "", "set -euo pipefail"]
    lines += list(prologue)
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env]
    cmd = "python -m alum_pretrain.finetune.bench " + shell_join(bench_argv)
    if array:
        cmd += ' --run-index "$SLURM_ARRAY_TASK_ID"'
    lines += [f'echo "[alum-launch $(date -u +%FT%TZ)] {"run ${SLURM_ARRAY_TASK_ID}" if array else "collect"} '
              f'on $(hostname)"', cmd, ""]
    return "\n".join(lines)


def cmd_bench(args) -> int:
    from alum_pretrain.finetune.bench import load_suite, parse_checkpoints, plan_runs

    from . import slurm as S

    out = Path(args.out).resolve()
    suite = load_suite(args.suite)
    cks = parse_checkpoints(args.checkpoints)
    n = len(plan_runs(suite, cks, out))
    if args.max_parallel is not None and args.max_parallel < 1:
        raise ValueError(f"--max-parallel={args.max_parallel}: must be >= 1")
    res = Resources(nodes=1, gpus_per_node=args.gpus, cpus_per_task=args.cpus_per_task, mem=args.mem,
                    time=args.time, partition=args.partition, account=args.account, qos=args.qos,
                    constraint=args.constraint)
    env = []
    for kv in args.env:
        if "=" not in kv or not kv.split("=", 1)[0].isidentifier():
            raise ValueError(f"--env {kv!r}: use KEY=VALUE")
        env.append(tuple(kv.split("=", 1)))
    name = check_job_name(args.job_name or f"bench-{out.name}")
    bench_argv = ["--suite", str(Path(args.suite).resolve()), "--checkpoints",
                  *[f"{k}={v}" for k, v in cks.items()], "--out", str(out),
                  "--device", "cuda" if args.gpus > 0 else "cpu", "--no-progress"]
    slurm_dir = out / "slurm"
    slurm_dir.mkdir(parents=True, exist_ok=True)
    header = "Generated by: alum-launch " + shell_join(args.argv)
    array = f"0-{n - 1}" + (f"%{args.max_parallel}" if args.max_parallel else "")
    scripts = {}
    for key, arr, log in (("array", array, slurm_dir / "%x-%A_%a.log"), ("collect", None, slurm_dir / "%x-%j.log")):
        path = slurm_dir / (f"{name}.sbatch" if key == "array" else f"{name}-collect.sbatch")
        text = render(name if key == "array" else f"{name}-collect", res, bench_argv, log, array=arr,
                      prologue=args.prologue, env=env, header=header)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        scripts[key] = path
    print(f"alum-launch: {n} run(s) as array {array}; wrote {scripts['array']} and {scripts['collect']}",
          file=sys.stderr)
    if args.dry_run:
        for p in scripts.values():
            print(p.read_text(encoding="utf-8"))
        return 0
    job = S.submit(scripts["array"])
    collect = _submit_after(scripts["collect"], job)
    print(f"submitted array job {job} ({n} tasks) and collecting job {collect}; results in {out}/results.md")
    return 0


def _submit_after(script: Path, job: str) -> str:
    import shutil
    import subprocess

    exe = shutil.which("sbatch")
    if exe is None:
        raise ValueError(f"sbatch: not found on PATH; submit {script} with --dependency=afterany:{job} yourself")
    proc = subprocess.run([exe, "--parsable", f"--dependency=afterany:{job}", str(script)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise ValueError(f"sbatch {script} failed (status {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]
