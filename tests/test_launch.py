"""alum-launch without a cluster: the batch split, presets, generated scripts for 1/2/4 nodes (bash -n and
the rendezvous / world-size / rank wiring), fairseq's distributed inference on the generated flags, and a
real two-"node" c10d rendezvous of the generated torchrun command on this machine (gloo)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch import cli
from launch.spec import Resources, load_preset, preset_names, split_batch
from launch_helpers import run_launcher, run_yaml, step_command

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------
# The batch split, against an independent brute-force reference
# ------------------------------------------------------------------------------------------------------
def _reference_split(global_batch, world, max_micro):
    """Every (micro, accum) with micro * accum * world == global and micro <= max; the largest micro wins."""
    options = [(m, a) for m in range(1, max_micro + 1) for a in range(1, global_batch + 1)
               if m * a * world == global_batch]
    return max(options) if options else None


@pytest.mark.parametrize("global_batch,world,max_micro", [
    (256, 16, 16), (256, 32, 8), (256, 32, 4), (256, 16, 12), (256, 16, 5), (96, 4, 7), (256, 1, 32),
    (8, 8, 1), (6, 2, 2), (30, 3, 4)])
def test_split_batch_matches_brute_force(global_batch, world, max_micro):
    ref = _reference_split(global_batch, world, max_micro)
    micro, accum = split_batch(global_batch, world, max_micro)
    assert (micro, accum) == ref
    assert micro * accum * world == global_batch and micro <= max_micro


def test_split_batch_paper_runs():
    assert split_batch(256, 16, 16) == (16, 1)  # BERT-base on 1 DGX-2
    assert split_batch(256, 32, 8) == (8, 1)  # RoBERTa-base on 2 DGX-2
    assert split_batch(256, 32, 4) == (4, 2)  # RoBERTa-large on 2 DGX-2


@pytest.mark.parametrize("args", [(256, 48, 16), (256, 3, 64), (10, 4, 8)])
def test_split_batch_rejects_what_does_not_divide(args):
    with pytest.raises(ValueError, match="does not divide"):
        split_batch(*args)


def test_resources_validation_names_the_flag():
    for kw, flag in ((dict(nodes=0), "--nodes"), (dict(signal="USR1"), "--signal"), (dict(time="2 days"), "--time"),
                     (dict(mem="lots"), "--mem"), (dict(gpus_per_node=-1), "--gpus-per-node")):
        with pytest.raises(ValueError, match=flag):
            Resources(**kw)


# ------------------------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------------------------
def test_presets_encode_the_paper_runs():
    assert {"bert-base-scratch", "roberta-base-continual", "roberta-large-continual"} <= set(preset_names())
    bert = load_preset("bert-base-scratch")
    c = bert["config"]
    assert (c["train"]["max_steps"], c["train"]["global_batch_size"], c["optim"]["lr"]) == (1_000_000, 256, 1e-4)
    assert c["alum"]["start_step"] == 500_000 and c["alum"]["alpha"] == 10.0
    assert (bert["resources"]["nodes"], bert["resources"]["gpus_per_node"]) == (1, 16)
    for name, size in (("roberta-base-continual", "base"), ("roberta-large-continual", "large")):
        p = load_preset(name)
        c = p["config"]
        assert (c["train"]["max_steps"], c["train"]["global_batch_size"], c["optim"]["lr"]) == (100_000, 256, 4e-5)
        assert c["alum"]["start_step"] == 0 and c["model"]["preset"] == size
        assert (p["resources"]["nodes"], p["resources"]["gpus_per_node"]) == (2, 16)
        assert "model.init_from" in p["requires"]


def _run_yaml(tmp_path: Path, **train) -> Path:
    return run_yaml(tmp_path, "bert-alum", **train)


def test_preset_batch_split_goes_into_the_resolved_config(tmp_path, capsys):
    run = _run_yaml(tmp_path)
    rc, script, err = run_launcher(["slurm", "--config", run, "--preset", "bert-base-scratch", "--dry-run"], capsys)
    assert rc == 0, err
    out = tmp_path / "runs" / "bert-alum"
    cfg = yaml.safe_load((out / "slurm" / "bert-alum.yaml").read_text())
    assert (cfg["train"]["batch_size"], cfg["train"]["grad_accum"], cfg["train"]["global_batch_size"]) == (16, 1, 256)
    assert cfg["alum"]["start_step"] == 500_000 and cfg["train"]["device"] == "cuda"
    assert cfg["train"]["output_dir"] == str(out) and cfg["data"]["path"] == str(tmp_path / "data-bin")
    # 2 DGX-2 and at most 4 per GPU: 256 = 4 x 2 x 32
    rc, script, err = run_launcher(["slurm", "--config", run, "--preset", "bert-base-scratch", "--nodes", 2,
                                    "--max-micro-batch", 4, "--dry-run"], capsys)
    cfg = yaml.safe_load((out / "slurm" / "bert-alum.yaml").read_text())
    assert (cfg["train"]["batch_size"], cfg["train"]["grad_accum"]) == (4, 2)
    assert "--nodes=2" in script
    # 256 over 3 nodes x 16 GPUs does not divide: a clear error, exit 2
    rc, _, err = run_launcher(["slurm", "--config", run, "--preset", "bert-base-scratch", "--nodes", 3, "--dry-run"],
                              capsys)
    assert rc == 2 and "does not divide over 48 processes" in err


def test_run_yaml_and_engine_overrides_win_over_the_preset(tmp_path, capsys):
    run = _run_yaml(tmp_path, max_steps=2000)
    rc, _, err = run_launcher(["slurm", "--config", run, "--preset", "bert-base-scratch", "--dry-run", "--",
                               "--optim.lr=5e-5", "--alum.start_step=1000"], capsys)
    assert rc == 0, err
    cfg = yaml.safe_load((tmp_path / "runs" / "bert-alum" / "slurm" / "bert-alum.yaml").read_text())
    assert (cfg["train"]["max_steps"], cfg["optim"]["lr"], cfg["alum"]["start_step"]) == (2000, 5e-5, 1000)
    rc, _, err = run_launcher(["slurm", "--config", run, "--dry-run", "--", "--optim.lr=-1"], capsys)
    assert rc == 2 and "optim.lr" in err


def test_continual_preset_requires_init_from(tmp_path, capsys):
    run = _run_yaml(tmp_path)
    rc, _, err = run_launcher(["slurm", "--config", run, "--preset", "roberta-base-continual", "--dry-run"], capsys)
    assert rc == 2 and "model.init_from is required" in err
    init = tmp_path / "roberta-base-hf"
    init.mkdir()
    rc, _, err = run_launcher(["slurm", "--config", run, "--preset", "roberta-base-continual", "--dry-run", "--",
                               f"--model.init_from={init}"], capsys)
    assert rc == 0, err
    cfg = yaml.safe_load((tmp_path / "runs" / "bert-alum" / "slurm" / "bert-alum.yaml").read_text())
    assert (cfg["train"]["batch_size"], cfg["train"]["grad_accum"]) == (8, 1)  # 256 over 2 x 16 GPUs
    assert cfg["data"]["mode"] == "blocks" and cfg["data"]["nsp"] is False


def test_bad_config_key_is_named(tmp_path, capsys):
    run = tmp_path / "run.yaml"
    run.write_text("data: {path: /x}\ntrain: {max_step: 10}\n")
    rc, _, err = run_launcher(["slurm", "--config", run, "--dry-run"], capsys)
    assert rc == 2 and "train.max_step" in err and "max_steps" in err


# ------------------------------------------------------------------------------------------------------
# Generated scripts: 1, 2, 4 nodes
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nodes", [1, 2, 4])
def test_native_script_wiring(tmp_path, capsys, nodes):
    run = _run_yaml(tmp_path, global_batch_size=256, batch_size=64)
    rc, script, err = run_launcher(["slurm", "--config", run, "--nodes", nodes, "--gpus-per-node", 16, "--time",
                                    "48:00:00", "--partition", "dgx2", "--account", "nlp", "--qos", "high",
                                    "--constraint", "volta32gb", "--cpus-per-task", 96, "--mem", "0",
                                    "--max-requeues", 5, "--signal", "USR1@240", "--dry-run"], capsys)
    assert rc == 0, err
    path = tmp_path / "runs" / "bert-alum" / "slurm" / "bert-alum.sbatch"
    assert path.read_text() == script and os.access(path, os.X_OK)
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=60)
    for line in (f"#SBATCH --nodes={nodes}", "#SBATCH --ntasks-per-node=1", "#SBATCH --gres=gpu:16",
                 "#SBATCH --time=48:00:00", "#SBATCH --partition=dgx2", "#SBATCH --account=nlp",
                 "#SBATCH --qos=high", "#SBATCH --constraint=volta32gb", "#SBATCH --cpus-per-task=96",
                 "#SBATCH --mem=0", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 "#SBATCH --signal=B:USR1@240", "#SBATCH --job-name=bert-alum", "MAX_REQUEUES=5",
                 f"#SBATCH --output={tmp_path}/runs/bert-alum/slurm/%x-%j.log",
                 'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
                 "trap on_stop_signal USR1", 'scontrol requeue "$SLURM_JOB_ID"',
                 'if [ "$RESTART" -lt "$MAX_REQUEUES" ]', "RESTART=${SLURM_RESTART_COUNT:-0}",
                 "export NCCL_DEBUG=", 'kill -USR1 "$STEP_PID"'):
        assert line in script, line
    assert "SLURM_JOB_ID" not in script.split("OUTPUT_DIR=")[1].splitlines()[0]  # per job name, not id
    argv = step_command(script)
    assert argv[:5] == ["srun", "--nodes=$SLURM_NNODES", "--ntasks-per-node=1", "--cpus-per-task=96",
                        "--kill-on-bad-exit=1"]  # srun no longer inherits sbatch's --cpus-per-task
    assert argv[5:8] == ["bash", "-c", 'trap "" USR1; alum_node_setup; exec "$@"']
    tr = argv[argv.index("torchrun"):]
    opts = dict(zip(tr[1::2], tr[2::2]))
    # world size = nnodes x nproc_per_node; ranks come from the c10d rendezvous on the head node
    assert opts["--nnodes"] == "$SLURM_NNODES" and opts["--nproc_per_node"] == "16"
    assert opts["--rdzv_backend"] == "c10d" and opts["--rdzv_endpoint"] == "$HEAD_NODE:$PORT"
    assert opts["--rdzv_id"] == "$SLURM_JOB_ID"
    assert tr[tr.index("-m") + 1] == "alum_pretrain.train"
    cfg = yaml.safe_load(Path(tr[tr.index("--config") + 1]).read_text())
    world = nodes * 16
    assert cfg["train"]["global_batch_size"] == 256
    assert cfg["train"]["batch_size"] * cfg["train"]["grad_accum"] * world == 256
    assert cfg["train"]["batch_size"] <= 64


def test_cpu_script_has_no_gpus_and_one_process_per_node(tmp_path, capsys):
    run = _run_yaml(tmp_path)
    rc, script, err = run_launcher(["slurm", "--config", run, "--nodes", 2, "--gpus-per-node", 0, "--dry-run"], capsys)
    assert rc == 0, err
    subprocess.run(["bash", "-n", "-c", script], check=True, timeout=60)
    assert "--gres" not in script and "NCCL_DEBUG" not in script
    tr = step_command(script)
    assert tr[tr.index("--nproc_per_node") + 1] == "1"
    cfg = yaml.safe_load((tmp_path / "runs" / "bert-alum" / "slurm" / "bert-alum.yaml").read_text())
    assert cfg["train"]["device"] == "cpu"


@pytest.mark.parametrize("nodes", [1, 2, 4])
def test_fairseq_script_wiring(tmp_path, capsys, nodes):
    run = _run_yaml(tmp_path, global_batch_size=256, batch_size=8, max_steps=100000, precision="fp16")
    rc, script, err = run_launcher(["slurm", "--config", run, "--engine", "fairseq", "--nodes", nodes, "--dry-run"],
                                   capsys)
    assert rc == 0, err
    subprocess.run(["bash", "-n", "-c", script], check=True, timeout=60)
    argv = step_command(script)
    fs = argv[argv.index("fairseq-train"):]
    assert fs[1] == str(tmp_path / "data-bin")
    opts = {a: b for a, b in zip(fs, fs[1:] + [""]) if a.startswith("--")}
    assert opts["--distributed-world-size"] == str(nodes * 16) and opts["--distributed-port"] == "$PORT"
    assert opts["--task"] == "alum_masked_lm" and opts["--criterion"] == "alum_masked_lm"
    assert Path(opts["--user-dir"]) == ROOT / "alum_pretrain" / "fairseq_ext"
    assert int(opts["--batch-size"]) * int(opts["--update-freq"]) * nodes * 16 == 256
    assert opts["--save-dir"] == str(tmp_path / "runs" / "bert-alum" / "checkpoints")
    assert "--amp" in fs and "--fp16" not in fs and opts["--max-update"] == "100000"  # ALUM on: autocast, fp32 weights
    assert '> "$OUTPUT_DIR/COMPLETED.tmp"' in script
    # stop signal -> forwarded to the step (the plugin saves and exits 0), not an immediate requeue
    assert 'kill -USR1 "$STEP_PID"' in script and '[ ! -e "$ALUM_FAIRSEQ_STOP_FILE" ]' in script


def test_fairseq_knob_flags_follow_the_one_rule(tmp_path, capsys):
    """Every alum.* / masking.* key reaches fairseq-train as --<section>-<field> with its value (booleans as a
    bare flag when true), never in a deprecated spelling."""
    from alum_pretrain import knobs

    run = _run_yaml(tmp_path, batch_size=8, max_steps=1000)
    cfg = yaml.safe_load(run.read_text())
    cfg["alum"] = {"k_steps": 2, "start_step": 30, "divergence": "sym_kl", "include_nsp": True, "projection": "l2"}
    cfg["masking"] = {"mask_prob": 0.7, "random_prob": 0.2, "whole_word": True, "schedule": "constant"}
    run.write_text(yaml.safe_dump(cfg))
    rc, script, err = run_launcher(["slurm", "--config", run, "--engine", "fairseq", "--dry-run"], capsys)
    assert rc == 0, err
    fs = _fairseq_flags_of(script)
    opts = {a: b for a, b in zip(fs, fs[1:] + [""]) if a.startswith("--")}
    assert opts["--alum-k-steps"] == "2" and opts["--alum-start-step"] == "30" and opts["--alum-divergence"] == "sym_kl"
    assert opts["--alum-projection"] == "l2" and "--alum-include-nsp" in fs and "--alum-log-baseline" not in fs
    assert opts["--masking-mask-prob"] == "0.7" and opts["--masking-random-prob"] == "0.2"
    assert opts["--masking-schedule"] == "constant" and "--masking-whole-word" in fs
    for section in knobs.SECTIONS:
        for k in knobs.knobs(section):
            assert k.flag in fs or k.type is bool, k.flag
    assert not any("--" + old.replace("_", "-") in fs for old in knobs.DEPRECATED)


def _fairseq_flags_of(script: str) -> list[str]:
    argv = step_command(script)
    fs = argv[argv.index("fairseq-train") + 1:]
    return [a.replace("$PORT", "29511") for a in fs]


@pytest.mark.fairseq
@pytest.mark.parametrize("nodes", [2, 4])
def test_fairseq_infers_ranks_from_the_generated_flags(tmp_path, capsys, monkeypatch, nodes):
    """fairseq's own SLURM inference on the generated flags, per node, with one task per node.

    Real fairseq code (``distributed_utils.infer_init_method``) and the real ``scontrol show hostnames``;
    only ``torch.cuda.device_count`` is pinned to 16 because this machine has no GPU.
    """
    from conftest import fairseq_available

    if not fairseq_available():
        pytest.skip("fairseq not installed (bash scripts/setup.sh installs the [fairseq] extra)")
    import shutil

    if shutil.which("scontrol") is None:
        pytest.skip("scontrol not installed (apt-get install slurm-client, or bash scripts/setup.sh --system)")
    import torch
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.distributed import utils as dist_utils

    run = _run_yaml(tmp_path, global_batch_size=256, batch_size=8, max_steps=1000)
    (tmp_path / "data-bin" / "manifest.json").write_text("{}")
    rc, script, err = run_launcher(["slurm", "--config", run, "--engine", "fairseq", "--nodes", nodes, "--dry-run"],
                                   capsys)
    assert rc == 0, err
    flags = _fairseq_flags_of(script)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 16)
    # `scontrol show hostnames` only expands the host list, but it insists on reading a slurm.conf.
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=t\nSlurmctldHost=localhost\nNodeName=dgx[01-04] CPUs=1\n"
                    "PartitionName=p Nodes=ALL Default=YES\n")
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, flags)
    seen = []
    for node in range(nodes):
        for k in [k for k in os.environ if k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE"))]:
            monkeypatch.delenv(k)
        monkeypatch.setenv("SLURM_CONF", str(conf))
        monkeypatch.setenv("SLURM_JOB_NODELIST", f"dgx[{1:02d}-{nodes:02d}]")
        monkeypatch.setenv("SLURM_NNODES", str(nodes))
        monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "1")
        monkeypatch.setenv("SLURM_NODEID", str(node))
        cfg = convert_namespace_to_omegaconf(args).distributed_training
        dist_utils.infer_init_method(cfg)
        assert cfg.distributed_init_method == "tcp://dgx01:29511"
        assert cfg.distributed_world_size == nodes * 16
        assert cfg.distributed_num_procs == 16  # spawns one process per GPU on each node
        seen.append(cfg.distributed_rank)
    assert seen == [n * 16 for n in range(nodes)]  # first global rank of each node; local ranks add 0..15


# ------------------------------------------------------------------------------------------------------
# The generated torchrun wiring for real: two "nodes" (two torchrun agents) on this machine, gloo
# ------------------------------------------------------------------------------------------------------
PROBE = """
import os, torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank())])
dist.all_reduce(t)
# One file per rank: two workers of an agent share its stdout, where their lines can interleave.
with open(os.path.join(os.environ["PROBE_DIR"], f"rank{os.environ['RANK']}.txt"), "w") as fh:
    fh.write(f"PROBE rank={os.environ['RANK']} world={os.environ['WORLD_SIZE']} local={os.environ['LOCAL_RANK']} "
             f"group_node={os.environ['GROUP_RANK']} sum={t.item():g}")
dist.destroy_process_group()
"""


@pytest.mark.multirank
def test_two_node_rendezvous_of_the_generated_command(tmp_path, capsys):
    """Run the script's torchrun line as two agents (nodes) x 2 processes, with a probe as the program."""
    run = _run_yaml(tmp_path)
    rc, script, err = run_launcher(["slurm", "--config", run, "--nodes", 2, "--gpus-per-node", 0, "--dry-run"], capsys)
    assert rc == 0, err
    argv = step_command(script)
    tr = argv[argv.index("torchrun"):]
    tr = tr[:tr.index("-m")]  # the launcher part; the probe replaces alum_pretrain.train
    tr[tr.index("--nproc_per_node") + 1] = "2"
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    probe_dir = tmp_path / "probe_out"
    probe_dir.mkdir()
    env = dict(os.environ, SLURM_NNODES="2", HEAD_NODE="127.0.0.1", PORT=str(port), SLURM_JOB_ID="4242",
               OMP_NUM_THREADS="1", PROBE_DIR=str(probe_dir))
    cmd = [re.sub(r"\$(\w+)", lambda m: env[m.group(1)], a) for a in tr]  # what the batch shell expands
    cmd[0:1] = [sys.executable, "-m", "torch.distributed.run"]
    procs = [subprocess.Popen(cmd + [str(probe)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    lines = sorted(f.read_text() for f in probe_dir.glob("rank*.txt"))
    assert all(line.startswith("PROBE") for line in lines), lines
    ranks = sorted(int(re.search(r"rank=(\d+)", line).group(1)) for line in lines)
    assert ranks == [0, 1, 2, 3]
    assert all("world=4" in line and "sum=6" in line for line in lines)  # 0+1+2+3 over all four
    assert sorted(re.search(r"group_node=(\d)", line).group(1) for line in lines) == ["0", "0", "1", "1"]


# ------------------------------------------------------------------------------------------------------
# alum-launch local
# ------------------------------------------------------------------------------------------------------
def test_local_dry_run_command(tmp_path, capsys):
    run = _run_yaml(tmp_path, global_batch_size=8, batch_size=8)
    rc, _, err = run_launcher(["local", "--config", run, "--device", "cpu", "--nproc-per-node", 2, "--dry-run"], capsys)
    assert rc == 0, err
    assert "torch.distributed.run --standalone --nproc_per_node 2 -m alum_pretrain.train --config" in err
    cfg = yaml.safe_load((tmp_path / "runs" / "bert-alum" / "launch" / "local.yaml").read_text())
    assert (cfg["train"]["batch_size"], cfg["train"]["grad_accum"], cfg["train"]["device"]) == (4, 1, "cpu")


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["slurm", "--help"])
    out = capsys.readouterr().out
    for flag in ("--nodes", "--gpus-per-node", "--cpus-per-task", "--mem", "--time", "--partition", "--account",
                 "--qos", "--constraint", "--job-name", "--output-dir", "--signal", "--max-requeues", "--engine",
                 "--dry-run", "--preset", "--config", "--prologue", "--env", "--port"):
        assert flag in out, flag


def test_flags_parse_into_the_option_dataclasses():
    from alum_pretrain.config import dataclass_from_args

    args = cli.build_parser().parse_args(["slurm", "--config", "r.yaml", "--nodes", "2", "--gpus-per-node", "0",
                                          "--no-exclusive", "--prologue", "a", "--prologue", "b", "--env", "A=1",
                                          "--max-requeues", "5", "--dry-run"])
    run = dataclass_from_args(cli.RunOptions, args)
    alloc = dataclass_from_args(cli.Allocation, args)
    job = dataclass_from_args(cli.JobOptions, args)
    assert (run.config, run.dry_run, run.engine) == ("r.yaml", True, None)
    assert (alloc.nodes, alloc.gpus_per_node, alloc.exclusive, alloc.time) == (2, 0, False, None)
    assert (job.prologue, job.env, job.max_requeues) == (["a", "b"], ["A=1"], 5)
    local = dataclass_from_args(cli.LocalOptions, cli.build_parser().parse_args(["local", "--nproc-per-node", "3"]))
    assert (local.nproc_per_node, local.device) == (3, "auto")
    assert dataclass_from_args(cli.Allocation, cli.build_parser().parse_args(["slurm"])).exclusive is None


def test_no_exclusive_overrides_the_preset_and_bad_env_is_an_error(tmp_path, capsys):
    run = _run_yaml(tmp_path)
    rc, script, err = run_launcher(["slurm", "--config", run, "--preset", "bert-base-scratch", "--dry-run"], capsys)
    assert rc == 0 and "#SBATCH --exclusive" in script, err  # the preset's
    rc, script, err = run_launcher(["slurm", "--config", run, "--preset", "bert-base-scratch", "--no-exclusive",
                                    "--dry-run"], capsys)
    assert rc == 0 and "#SBATCH --exclusive" not in script, err
    rc, script, err = run_launcher(["slurm", "--config", run, "--env", "A=1", "--env", "B=x=y", "--dry-run"], capsys)
    assert rc == 0 and "export A=1\n" in script and "export B=x=y\n" in script, err
    rc, _, err = run_launcher(["slurm", "--config", run, "--env", "1A=2", "--dry-run"], capsys)
    assert rc == 2 and "--env '1A=2': use KEY=VALUE" in err


def test_missing_data_is_an_error_unless_dry_run(tmp_path, capsys):
    run = tmp_path / "run.yaml"
    run.write_text(f"data: {{path: {tmp_path}/nowhere}}\ntrain: {{output_dir: {tmp_path}/out}}\n")
    rc, _, err = run_launcher(["slurm", "--config", run], capsys)
    assert rc == 2 and f"data.path {tmp_path}/nowhere is not a folder" in err
    assert not (tmp_path / "out" / "slurm").exists()  # nothing written, nothing submitted
    rc, script, err = run_launcher(["slurm", "--config", run, "--dry-run"], capsys)
    assert rc == 0 and "WARNING: data.path" in err and script.startswith("#!/bin/bash")


def test_usr2_signal_is_trapped_ignored_by_the_step_and_forwarded_as_usr1(tmp_path, capsys):
    run = _run_yaml(tmp_path)
    rc, script, err = run_launcher(["slurm", "--config", run, "--signal", "USR2@120", "--dry-run"], capsys)
    assert rc == 0, err
    assert "#SBATCH --signal=B:USR2@120" in script and "trap on_stop_signal USR2" in script
    assert step_command(script)[7] == 'trap "" USR1 USR2; alum_node_setup; exec "$@"'
    assert 'kill -USR1 "$STEP_PID"' in script  # alum-train's save signal, whatever SLURM sent
    rc, _, err = run_launcher(["slurm", "--config", run, "--signal", "KILL@10", "--dry-run"], capsys)
    assert rc == 2 and "--signal" in err


def test_run_folder_follows_the_job_name_when_the_config_has_none(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data-bin").mkdir()
    run = tmp_path / "run.yaml"
    run.write_text(f"data: {{path: {tmp_path}/data-bin}}\n")
    rc, script, err = run_launcher(["slurm", "--config", run, "--job-name", "alum-b1", "--dry-run"], capsys)
    assert rc == 0, err
    assert f"OUTPUT_DIR={tmp_path}/runs/alum-b1\n" in script and "#SBATCH --job-name=alum-b1" in script
    assert (tmp_path / "runs" / "alum-b1" / "slurm" / "alum-b1.sbatch").exists()
