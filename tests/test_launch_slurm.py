"""alum-launch against a REAL SLURM (munged + slurmctld + slurmd started by the fixture on this machine).

The cluster has two nodes when this machine allows network namespaces (each slurmd in its own network,
UTS and mount namespace: real two-node gloo training over TCP, `tests/slurm_cluster.py:NetnsSlurm`), and
one node otherwise (`LocalSlurm`); the tests skip with the reason when SLURM cannot start at all.

A tiny CPU run is submitted with the generated script, preempted mid-run with the script's stop signal
(``scancel --signal=USR1 --batch``: exactly what ``--signal=B:USR1@180`` delivers before a time limit), and
must save, requeue itself, resume and finish with the same step count and weights as an uninterrupted run
of the same config and world size started with ``alum-launch local``.  The fairseq engine's script is
preempted the same way (the plugin saves checkpoint_last.pt at the current update, fairseq-train exits 0,
the script requeues and fairseq resumes from that update), and a second signal after the last allowed
requeue must save but not requeue again.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engine_helpers import final_weights, make_stdlib_databin, max_weight_diff, read_log
from launch_helpers import RUNNING, log_lines, started_cluster, submit, wait_for
from slurm_cluster import LocalSlurm, NetnsSlurm

pytestmark = pytest.mark.slurm
STEPS = 30


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two nodes in network namespaces when possible, else one node; skip when neither starts."""
    candidates = [] if NetnsSlurm.unavailable() else [lambda: NetnsSlurm(tmp_path_factory.mktemp("slurm2"), nodes=2)]
    candidates.append(lambda: LocalSlurm(tmp_path_factory.mktemp("slurm1")))
    with started_cluster(*candidates) as c:
        yield c


@pytest.fixture(scope="module")
def databin(tmp_path_factory) -> Path:
    return make_stdlib_databin(tmp_path_factory.mktemp("launch") / "data-bin", n_docs=60)


def _run_yaml(tmp_path: Path, databin: Path, steps: int = STEPS, **train) -> Path:
    cfg = {
        "data": {"path": str(databin), "max_seq_len": 32},
        "model": {"preset": "tiny"},
        # ALUM switches on mid-run and the masking curriculum has 5 phases: the resumed part crosses both.
        "alum": {"start_step": 6, "epsilon": 1e-3, "noise_std": 1e-3},
        "optim": {"lr": 1e-3, "warmup_ratio": 0.1},
        "train": {"max_steps": steps, "batch_size": 4, "log_every": 1, "eval_every": 0, "save_every": 0,
                  "progress": False, "keep_last": 5, **train},
    }
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return p


def test_preempted_job_saves_requeues_and_resumes_to_the_uninterrupted_weights(cluster, databin, tmp_path):
    nodes = len(cluster.node_names)
    run = _run_yaml(tmp_path, databin, global_batch_size=4 * nodes)
    ref, out = tmp_path / "reference", tmp_path / "runs" / "alum-slurm-test"

    # The uninterrupted reference on this machine with the same world size (torchrun --standalone, CPU),
    # in parallel.  One intra-op thread in both runs, so the float reductions match and the check is tight.
    reference = subprocess.Popen(
        [sys.executable, "-m", "launch.cli", "local", "--config", str(run), "--device", "cpu",
         "--nproc-per-node", str(nodes), "--output-dir", str(ref)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))

    job_id, log_file = submit(cluster, "--config", run, "--output-dir", out, "--nodes", nodes, "--gpus-per-node", 0,
                              "--cpus-per-task", 1, "--time", 10, "--max-requeues", 1)
    assert log_file == out / "slurm" / f"alum-slurm-test-{job_id}.log"
    # Preempt mid-run: once a few steps are logged, signal the batch shell as SLURM does before the time limit.
    wait_for(cluster, job_id, log_file, lambda: log_lines(out / "log.jsonl") >= 3, "training progress")
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    cluster.wait_job(job_id, lambda j: j.get("Restarts") == "1", 120, "the requeue")
    info = cluster.wait_job(job_id, lambda j: j.get("JobState") not in RUNNING, 240, "the end")
    text = log_file.read_text()
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert f"on {nodes} node(s) [" in text and f"world size {nodes}" in text, text[-4000:]
    assert "got SIGUSR1" in text and "requeueing job" in text, text[-4000:]
    assert "(restart 1/1)" in text and "run completed" in text, text[-4000:]
    # every node's step task ran the per-node set-up: its own log file, and gloo never bound to loopback
    for node in range(nodes):
        node_log = out / "slurm" / f"alum-slurm-test-{job_id}-node{node}.log"
        assert node_log.exists() and "GLOO_SOCKET_IFNAME=" in node_log.read_text(), node_log
    assert "GLOO_SOCKET_IFNAME=lo" not in text

    # The first run saved at the step it stopped, strictly inside the run; the requeued one went on from there.
    stopped = re.search(r"signal \S+ received: saved step (\d+)", text)
    assert stopped, text[-4000:]
    stop_step = int(stopped.group(1))
    assert 3 <= stop_step < STEPS
    assert re.search(rf"resumed from \S+step-{stop_step} at step {stop_step}", text), text[-4000:]
    assert json.loads((out / "COMPLETED").read_text())["step"] == STEPS
    assert [r["step"] for r in read_log(out)] == list(range(1, STEPS + 1))  # each step exactly once

    ref_out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_out[-3000:]
    assert json.loads((ref / "COMPLETED").read_text())["step"] == STEPS
    assert max_weight_diff(final_weights(ref), final_weights(out)) <= 1e-6
    la = {r["step"]: r for r in read_log(ref)}
    for r in read_log(out):
        for key in ("loss", "mlm", "nsp", "adv"):
            assert r[key] == pytest.approx(la[r["step"]][key], rel=1e-6, abs=1e-9), (r["step"], key)


@pytest.mark.fairseq
def test_fairseq_job_saves_on_signal_requeues_resumes_and_respects_max_requeues(cluster, databin, tmp_path):
    """The stop signal makes fairseq-train (the plugin) save checkpoint_last.pt at the current update and exit
    0; the script requeues and the requeued job resumes from exactly that update.  A second signal after the
    last allowed requeue saves again but does not requeue; resubmitting the script (as its log says) resumes
    and finishes: every update runs exactly once over the three runs and the script writes COMPLETED."""
    from conftest import fairseq_available

    if not fairseq_available():
        pytest.skip("fairseq not installed (bash scripts/setup.sh installs the [fairseq] extra)")
    steps, interval = 40, 25
    run = _run_yaml(tmp_path, databin, steps=steps)
    out = tmp_path / "runs" / "fairseq-test"
    job_id, log_file = submit(cluster, "--engine", "fairseq", "--config", run, "--output-dir", out, "--nodes", 1,
                              "--gpus-per-node", 0, "--max-requeues", 1, "--", "--save-interval-updates", interval)
    script = out / "slurm" / "fairseq-test.sbatch"
    updates_re = re.compile(r"num_updates=(\d+)")
    stopped_re = re.compile(r"SIGUSR1 received: saved \S+checkpoint_last\.pt at update (\d+); stopping")
    resumed_re = re.compile(r"Loaded checkpoint \S+checkpoint_last\.pt \(epoch \d+ @ (\d+) updates\)")

    def progress() -> int:
        text = log_file.read_text() if log_file.exists() else ""
        return max(map(int, updates_re.findall(text)), default=0)

    wait_for(cluster, job_id, log_file, lambda: progress() >= 3, "training progress")
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    cluster.wait_job(job_id, lambda j: j.get("Restarts") == "1", 120, "the requeue")
    wait_for(cluster, job_id, log_file, lambda: resumed_re.search(log_file.read_text()) is not None, "the resume")
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)  # no requeue left: saves, stops, not requeued
    info = cluster.wait_job(job_id, lambda j: j.get("JobState") not in RUNNING, 240, "the end")
    text = log_file.read_text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "1", text[-4000:]
    assert text.count("got SIGUSR1: asking fairseq-train to save checkpoint_last.pt") == 2, text[-4000:]
    assert "(restart 1/1)" in text and text.count("fairseq-train saved and stopped: {") == 2, text[-4000:]
    assert f"not requeued: 1 requeue(s) used; resubmit (sbatch {script})" in text, text[-4000:]
    assert not (out / "COMPLETED").exists()
    stops = [int(u) for u in stopped_re.findall(text)]
    resumes = [int(u) for u in resumed_re.findall(text)]
    assert len(stops) == 2 and 3 <= stops[0] < stops[1] < steps, text[-4000:]
    assert resumes == [stops[0]], text[-4000:]  # resumed at the update it stopped, not at an interval save

    # Resubmit as the log says: a new job resumes from the second stop and completes the run.
    job2 = cluster.run("sbatch", "--parsable", str(script)).stdout.strip().split(";")[0]
    info2 = cluster.wait_job(job2, lambda j: j.get("JobState") not in RUNNING, 240, "the resubmitted job")
    text2 = (out / "slurm" / f"fairseq-test-{job2}.log").read_text()
    assert info2["JobState"] == "COMPLETED", text2[-4000:]
    assert [int(u) for u in resumed_re.findall(text2)] == [stops[1]], text2[-4000:]
    assert f"num_updates: {steps} >= max_update: {steps}" in text2 and "run completed" in text2
    assert json.loads((out / "COMPLETED").read_text()) == {"engine": "fairseq", "job_id": job2}
    # Each update trained exactly once over the three runs (fairseq logs every update: --log-interval 1).
    logged = [int(u) for u in updates_re.findall(text + text2)]
    assert logged == list(range(1, steps + 1)), logged


def test_sbatch_refusal_is_a_clear_error(cluster, databin, tmp_path):
    r = subprocess.run([sys.executable, "-m", "launch.cli", "slurm", "--config", str(_run_yaml(tmp_path, databin)),
                        "--output-dir", str(tmp_path / "out"), "--gpus-per-node", "0", "--partition", "no-such-part"],
                       capture_output=True, text=True, env=cluster.env, timeout=120)
    assert r.returncode == 2 and "alum-launch: error: sbatch" in r.stderr and "partition" in r.stderr.lower(), r.stderr
    assert (tmp_path / "out" / "slurm" / "out.sbatch").exists()  # the script is kept for inspection
