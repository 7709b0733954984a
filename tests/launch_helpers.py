"""Helpers shared by the launcher tests: run ``alum-launch`` in-process, write a run YAML, read a generated
script's step command, and drive a job on the local SLURM cluster of ``tests/slurm_cluster.py``.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import yaml

from launch import cli
from slurm_cluster import LocalSlurm

# squeue states of a job that has not ended yet
RUNNING = ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING")


def run_launcher(argv, capsys) -> tuple[int, str, str]:
    """``alum-launch ARGV`` in this process -> (exit status, stdout, stderr)."""
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def run_yaml(tmp_path: Path, run_name: str, data: dict | None = None, sections: dict | None = None,
             **train) -> Path:
    """``tmp_path/run.yaml`` for a dry run: an empty ``data-bin/`` folder, output ``runs/RUN_NAME``, ``train``
    keys from the keyword arguments, extra ``data`` keys and other config ``sections`` as given."""
    path = tmp_path / "data-bin"
    path.mkdir(exist_ok=True)
    cfg = {"data": {"path": str(path), **(data or {})}, **(sections or {}),
           "train": {"output_dir": str(tmp_path / "runs" / run_name), **train}}
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return p


def step_command(script: str) -> list[str]:
    """The srun ... command of the script as argv (continuation lines joined; `&` dropped)."""
    m = re.search(r"^srun .*?&$", script, re.S | re.M)
    assert m, "no srun step in the script"
    text = m.group(0).replace("\\\n", " ")[:-1]
    return shlex.split(text)


@contextlib.contextmanager
def started_cluster(*makers: Callable[[], LocalSlurm]) -> Iterator[LocalSlurm]:
    """The first cluster of ``makers`` that starts, stopped on exit; the test skips with every reason when none
    does (or when SLURM cannot run on this machine at all)."""
    why = LocalSlurm.unavailable()
    if why:
        pytest.skip(why)
    reasons = []
    for make in makers:
        c = make()
        try:
            c.start()
        except (RuntimeError, subprocess.CalledProcessError, OSError) as exc:
            c.stop()
            reasons.append(f"{type(c).__name__}: {exc}")
            continue
        try:
            yield c
        finally:
            c.stop()
        return
    pytest.skip("a local SLURM cluster could not start here: " + " | ".join(reasons))


def submit(cluster, *argv) -> tuple[str, Path]:
    """alum-launch slurm ...; returns (job id, log file).  One OpenMP thread per process everywhere."""
    r = subprocess.run([sys.executable, "-m", "launch.cli", "slurm", *map(str, argv)], capture_output=True,
                       text=True, env=dict(cluster.env, OMP_NUM_THREADS="1"), timeout=120)
    assert r.returncode == 0, r.stderr
    job_id = re.search(r"submitted job (\d+)", r.stdout).group(1)
    return job_id, Path(re.search(r"log: (\S+)", r.stdout).group(1))


def wait_for(cluster, job_id: str, log_file: Path, ready, what: str, timeout: float = 150,
             poll: float = 0.2) -> None:
    """Poll until ``ready()``; the job must stay in a :data:`RUNNING` state meanwhile (its log is shown if not)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            return
        info = cluster.job(job_id)
        assert info.get("JobState") in RUNNING, (info, log_file.read_text()[-3000:] if log_file.exists() else "")
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}: {log_file.read_text()[-3000:] if log_file.exists() else ''}")


def log_lines(path: Path) -> int:
    """Lines in ``path`` (0 while it does not exist)."""
    return len(path.read_text().splitlines()) if path.exists() else 0
