"""``alum-launch slurm|local --engine deepspeed``: the native job (one torchrun per node, the same c10d
rendezvous, preemption and requeue logic) with ``train.engine=deepspeed`` in the resolved config; the
ZeRO-2 DGX-2 preset for RoBERTa-large; and one real run of the generated script on a local SLURM cluster
(preempted with the script's stop signal, requeued, resumed, completed, equal to an uninterrupted run)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch.spec import load_preset
from launch_helpers import RUNNING, log_lines, run_launcher, run_yaml, started_cluster, step_command, submit, wait_for

HAS_DS = importlib.util.find_spec("deepspeed") is not None


def _run_yaml(tmp_path: Path, **train) -> Path:
    return run_yaml(tmp_path, "ds", **train)


@pytest.mark.parametrize("nodes", [1, 2])
def test_deepspeed_slurm_script_is_the_native_job_with_train_engine_deepspeed(tmp_path, capsys, nodes):
    run = _run_yaml(tmp_path, global_batch_size=256)
    rc, script, err = run_launcher(["slurm", "--config", run, "--engine", "deepspeed", "--nodes", nodes,
                                    "--gpus-per-node", 16, "--max-micro-batch", 8, "--dry-run", "--",
                                    "--deepspeed.zero_stage=3", "--deepspeed.offload_optimizer=cpu"], capsys)
    assert rc == 0, err
    assert "DeepSpeed ZeRO-3 (train.engine=deepspeed)" in err
    path = tmp_path / "runs" / "ds" / "slurm" / "ds.sbatch"
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=60)
    for line in ("#SBATCH --requeue", "trap on_stop_signal USR1", 'scontrol requeue "$SLURM_JOB_ID"',
                 f"#SBATCH --nodes={nodes}", "#SBATCH --ntasks-per-node=1"):
        assert line in script, line
    argv = step_command(script)
    tr = argv[argv.index("torchrun"):]
    opts = dict(zip(tr[1::2], tr[2::2]))
    assert opts["--nnodes"] == "$SLURM_NNODES" and opts["--nproc_per_node"] == "16"
    assert opts["--rdzv_backend"] == "c10d" and opts["--rdzv_endpoint"] == "$HEAD_NODE:$PORT"
    assert tr[tr.index("-m") + 1] == "alum_pretrain.train"
    cfg = yaml.safe_load(Path(tr[tr.index("--config") + 1]).read_text())
    assert cfg["train"]["engine"] == "deepspeed"
    assert cfg["deepspeed"]["zero_stage"] == 3 and cfg["deepspeed"]["offload_optimizer"] == "cpu"
    assert cfg["train"]["batch_size"] * cfg["train"]["grad_accum"] * nodes * 16 == 256
    assert cfg["train"]["device"] == "cuda"


def test_deepspeed_local_dry_run_and_ddp_default(tmp_path, capsys):
    run = _run_yaml(tmp_path)
    rc, _, err = run_launcher(["local", "--config", run, "--engine", "deepspeed", "--device", "cpu",
                               "--nproc-per-node", 2, "--dry-run"], capsys)
    assert rc == 0, err
    assert "torch.distributed.run --standalone --nproc_per_node 2 -m alum_pretrain.train --config" in err
    cfg = yaml.safe_load((tmp_path / "runs" / "ds" / "launch" / "local.yaml").read_text())
    assert cfg["train"]["engine"] == "deepspeed"
    rc, _, err = run_launcher(["local", "--config", run, "--device", "cpu", "--dry-run"], capsys)
    assert rc == 0 and "DeepSpeed" not in err
    assert yaml.safe_load((tmp_path / "runs" / "ds" / "launch" / "local.yaml").read_text())["train"]["engine"] == "ddp"


def test_zero2_preset_for_roberta_large(tmp_path, capsys):
    p = load_preset("roberta-large-continual-zero2")
    base = load_preset("roberta-large-continual")
    assert p["engine"] == "deepspeed" and p["config"]["deepspeed"]["zero_stage"] == 2
    # The paper's recipe is unchanged: only the engine (and the micro-batch ZeRO's memory allows) differ.
    for sec in ("data", "model", "alum", "optim", "masking"):
        assert p["config"][sec] == base["config"][sec], sec
    drop = {"engine"}
    assert {k: v for k, v in p["config"]["train"].items() if k not in drop} == base["config"]["train"]
    run = _run_yaml(tmp_path)
    rc, script, err = run_launcher(["slurm", "--config", run, "--preset", "roberta-large-continual-zero2", "--dry-run",
                                    "--", "--model.init_from=/models/roberta-large"], capsys)
    assert rc == 0, err
    assert "global batch 256 = 8 per process x 1 accumulation x 32 processes" in err
    assert "DeepSpeed ZeRO-2" in err


# ------------------------------------------------------------------------------------------------------
# One real run of the generated DeepSpeed job on a local SLURM cluster
# ------------------------------------------------------------------------------------------------------

STEPS = 16


@pytest.mark.slurm
@pytest.mark.slow  # ~75 s; the native and fairseq SLURM jobs (tests/test_launch_slurm.py) stay in CI
@pytest.mark.skipif(not HAS_DS, reason="deepspeed not installed (pip install 'alum-pretrain[deepspeed]')")
def test_deepspeed_slurm_job_is_preempted_requeued_and_resumes_to_the_uninterrupted_weights(tmp_path_factory,
                                                                                          tmp_path):
    from engine_helpers import final_weights, make_stdlib_databin, max_weight_diff, read_log
    from slurm_cluster import LocalSlurm

    with started_cluster(lambda: LocalSlurm(tmp_path_factory.mktemp("slurm-ds"))) as cluster:
        databin = make_stdlib_databin(tmp_path / "data-bin", n_docs=40)
        cfg = {"data": {"path": str(databin), "max_seq_len": 32}, "model": {"preset": "tiny", "dropout": 0.0},
               "alum": {"start_step": 3, "epsilon": 1e-3, "noise_std": 1e-3},
               "optim": {"lr": 1e-3, "warmup_ratio": 0.1},
               "train": {"max_steps": STEPS, "batch_size": 2, "global_batch_size": 4, "log_every": 1,
                         "eval_every": 0, "save_every": 0, "progress": False, "keep_last": 5},
               "deepspeed": {"zero_stage": 2}}
        run = tmp_path / "run.yaml"
        run.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        ref, out = tmp_path / "reference", tmp_path / "runs" / "ds-slurm"
        # The same job with no preemption, on this machine, 2 processes (the SLURM job: 1 node x 2 CPU processes).
        r = subprocess.run([sys.executable, "-m", "launch.cli", "local", "--engine", "deepspeed", "--config", str(run),
                            "--device", "cpu", "--nproc-per-node", "2", "--output-dir", str(ref)],
                           capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
        assert r.returncode == 0, r.stderr[-4000:]

        # The SLURM job: 1 CPU node = 1 process (the launcher's CPU layout), so batch 2 x 2 accumulation; the
        # reference above splits the same global batch of 4 over 2 processes: the numbers are the same.
        job_id, log_file = submit(cluster, "--engine", "deepspeed", "--config", run, "--output-dir", out, "--nodes", 1,
                                  "--gpus-per-node", 0, "--cpus-per-task", 1, "--time", 10, "--max-requeues", 1)
        wait_for(cluster, job_id, log_file, lambda: log_lines(out / "log.jsonl") >= 3, "training progress",
                 timeout=300, poll=0.3)
        cluster.run("scancel", "--signal=USR1", "--batch", job_id)
        cluster.wait_job(job_id, lambda j: j.get("Restarts") == "1", 180, "the requeue")
        info = cluster.wait_job(job_id, lambda j: j.get("JobState") not in RUNNING, 400, "the end")
        text = log_file.read_text()
        assert info["JobState"] == "COMPLETED", text[-4000:]
        assert "got SIGUSR1" in text and "requeueing job" in text and "run completed" in text, text[-4000:]
        stopped = re.search(r"signal \S+ received: saved step (\d+)", text)
        assert stopped and 3 <= int(stopped.group(1)) < STEPS, text[-4000:]
        assert "DeepSpeed ZeRO-2" in text, text[-4000:]
        assert json.loads((out / "COMPLETED").read_text())["step"] == STEPS
        assert [x["step"] for x in read_log(out)] == list(range(1, STEPS + 1))
        # uninterrupted 2-process reference vs the preempted 1-process SLURM job: same global batch
        assert max_weight_diff(final_weights(ref), final_weights(out)) < 1e-5
        la = {x["step"]: x for x in read_log(ref)}
        for x in read_log(out):
            assert x["loss"] == pytest.approx(la[x["step"]]["loss"], rel=1e-5), x["step"]
