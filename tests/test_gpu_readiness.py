"""GPU-path hazards that can be checked on a CPU machine: launcher precision flags for fairseq, srun CPU
binding, the per-node set-up of the SLURM step, bf16 / kernel-architecture refusal, MFU per (GPU, dtype)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from launch_helpers import run_launcher, run_yaml

ROOT = Path(__file__).resolve().parents[1]


def _run_yaml(tmp_path: Path, alum_alpha: float = 10.0, **train) -> Path:
    return run_yaml(tmp_path, "g", data={"mode": "blocks", "nsp": False}, sections={"alum": {"alpha": alum_alpha}},
                    **train)


def _srun_lines(script: str) -> list[str]:
    return [ln for ln in script.splitlines() if ln.lstrip().startswith("srun ")]


# --------------------------------------------------------------------------------------------------
# fairseq precision flags
# --------------------------------------------------------------------------------------------------

def test_fairseq_fp16_with_alum_emits_amp_and_bf16_is_refused(tmp_path, capsys):
    run = _run_yaml(tmp_path, precision="fp16", global_batch_size=32, batch_size=2)
    rc, script, err = run_launcher(["slurm", "--config", run, "--engine", "fairseq", "--dry-run"], capsys)
    assert rc == 0, err
    assert " --amp" in script and "--fp16" not in script and "--bf16" not in script

    run = _run_yaml(tmp_path, precision="bf16", global_batch_size=32, batch_size=2)
    rc, script, err = run_launcher(["slurm", "--config", run, "--engine", "fairseq", "--dry-run"], capsys)
    assert rc == 2 and script == ""
    assert "--train.precision=bf16" in err and "TPU/XLA" in err and "--train.precision=fp16" in err


@pytest.mark.parametrize("precision,alpha,gpus,want", [
    ("fp16", 0.0, 16, ["--fp16"]),  # no ALUM: fairseq's fp16 weights lose nothing that matters
    ("fp16", 1.0, 16, ["--amp"]),
    ("fp32", 1.0, 16, []),
    ("fp16", 1.0, 0, []),  # CPU: fairseq's 16-bit paths are CUDA-only
])
def test_fairseq_precision_mapping(precision, alpha, gpus, want):
    from launch.spec import fairseq_precision_flags

    assert fairseq_precision_flags(precision, alum_on=alpha > 0, gpus=gpus) == want


def test_preset_precision_override_is_reported(tmp_path, capsys):
    run = _run_yaml(tmp_path, precision="bf16")
    rc, script, err = run_launcher(["slurm", "--config", run, "--preset", "bert-base-scratch", "--dry-run"], capsys)
    assert rc == 0, err
    assert "train.precision=bf16 overrides the preset's fp16" in err and "compute capability 8.0" in err


# --------------------------------------------------------------------------------------------------
# SLURM step: --cpus-per-task on every srun, the per-node set-up
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ["native", "fairseq"])
@pytest.mark.parametrize("cpus", [None, 12])
def test_every_srun_has_cpus_per_task(tmp_path, capsys, engine, cpus):
    run = _run_yaml(tmp_path, precision="fp16", global_batch_size=32, batch_size=2)
    argv = ["slurm", "--config", run, "--engine", engine, "--nodes", 2, "--dry-run"]
    if cpus:
        argv += ["--cpus-per-task", cpus]
    rc, script, err = run_launcher(argv, capsys)
    assert rc == 0, err
    sruns = _srun_lines(script)
    assert sruns
    for line in sruns:
        want = f"--cpus-per-task={cpus}" if cpus else '--cpus-per-task="${SLURM_CPUS_ON_NODE:-1}"'
        assert want in line, line
    subprocess.run(["bash", "-n", "-c", script], check=True, timeout=60)


def test_node_setup_picks_gloo_interface_and_writes_a_per_node_log(tmp_path, capsys):
    """Run the generated ``alum_node_setup`` in bash as a step task would: it tees the task's output into
    slurm/NAME-JOBID-nodeN.log, keeps an explicit GLOO_SOCKET_IFNAME, never picks the loopback."""
    run = _run_yaml(tmp_path)
    rc, script, err = run_launcher(["slurm", "--config", run, "--nodes", 2, "--job-name", "g", "--dry-run"], capsys)
    assert rc == 0, err
    func = re.search(r"^alum_node_setup\(\) \{.*?^\}$", script, re.S | re.M)
    assert func, script
    slurm_dir = tmp_path / "runs" / "g" / "slurm"
    slurm_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "GLOO_SOCKET_IFNAME"}
    env.update(HEAD_NODE="localhost", SLURM_JOB_ID="77", SLURM_NODEID="1")
    body = func.group(0) + '\nalum_node_setup\necho "from the task: GLOO=${GLOO_SOCKET_IFNAME:-unset}"\n'
    r = subprocess.run(["bash", "-c", body], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    log = slurm_dir / "g-77-node1.log"
    for _ in range(50):  # tee may still be flushing after bash exits
        if log.exists() and "from the task" in log.read_text():
            break
        import time
        time.sleep(0.1)
    text = log.read_text()
    assert "from the task: GLOO=" in text and "from the task" in r.stdout  # both the node log and the job log
    assert "GLOO=lo" not in text  # localhost resolves to the loopback: never chosen
    env["GLOO_SOCKET_IFNAME"] = "ib7"
    r = subprocess.run(["bash", "-c", body], env=env, capture_output=True, text=True, timeout=30)
    assert "from the task: GLOO=ib7" in r.stdout  # a user's choice is kept


# --------------------------------------------------------------------------------------------------
# bf16 below compute capability 8, kernels for the card
# --------------------------------------------------------------------------------------------------

def _fake_gpu(monkeypatch, name: str, cap: tuple[int, int], arch: list[str]):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: arch)


def test_bf16_on_v100_is_refused_naming_fp16(monkeypatch):
    from alum_pretrain.engine.gpu import check_device, check_precision

    _fake_gpu(monkeypatch, "Tesla V100-SXM2-32GB", (7, 0), ["sm_70", "sm_80", "sm_90"])
    dev = torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"--train.precision=bf16: Tesla V100.*7\.0.*use --train.precision=fp16"):
        check_device(dev, "bf16")
    check_device(dev, "fp16")
    check_device(dev, "fp32")
    with pytest.raises(ValueError, match="--run.precision=fp16"):
        check_precision("bf16", dev, flag="--run.precision")
    _fake_gpu(monkeypatch, "NVIDIA A100-SXM4-80GB", (8, 0), ["sm_80"])
    check_device(dev, "bf16")
    check_device(torch.device("cpu"), "bf16")  # CPU autocast: no capability to check


@pytest.mark.parametrize("cap,arch,ok,how", [
    ((7, 0), ["sm_80", "sm_90", "compute_90"], False, "no kernels for compute capability 7.0"),
    ((7, 0), ["sm_70", "sm_80"], True, "sass sm_70"),
    ((8, 6), ["sm_80", "sm_90"], True, "sass sm_80"),  # same major, lower minor: binary compatible
    ((9, 0), ["sm_80", "sm_90a"], False, "no kernels"),  # sm_90a runs only as 9.0a code... and no sm_90
    ((9, 0), ["sm_80", "compute_80"], True, "ptx compute_80"),  # PTX JIT
    ((10, 0), ["sm_90", "sm_100"], True, "sass sm_100"),
])
def test_arch_support(cap, arch, ok, how):
    from alum_pretrain.engine.gpu import arch_support

    got_ok, got_how = arch_support(cap, arch)
    assert got_ok == ok and how in got_how


def test_missing_kernels_are_refused_at_start(monkeypatch):
    from alum_pretrain.engine.gpu import check_device

    _fake_gpu(monkeypatch, "Tesla V100-SXM2-32GB", (7, 0), ["sm_80", "sm_90"])
    with pytest.raises(ValueError, match="Tesla V100.*no kernels for compute capability 7.0.*sm_80, sm_90"):
        check_device(torch.device("cuda", 0), "fp16")


# --------------------------------------------------------------------------------------------------
# MFU keyed on (GPU, math mode), padded tokens, decoder term
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,mode,peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
    ("NVIDIA H100 80GB HBM3", "tf32", 495e12),
    ("NVIDIA H100 80GB HBM3", "fp32", 67e12),
    ("NVIDIA H100 PCIe", "bf16", 756e12),
    ("NVIDIA H100 NVL", "fp16", 835e12),
    ("NVIDIA H200", "bf16", 989e12),
    ("NVIDIA A100-SXM4-80GB", "tf32", 156e12),
    ("Tesla V100-SXM2-32GB", "fp16", 125e12),
    ("Tesla V100-SXM2-32GB", "bf16", None),  # no bf16 tensor cores: no MFU rather than a wrong one
    ("Tesla V100-PCIE-16GB", "fp16", 112e12),
    ("Some Future GPU", "bf16", None),
])
def test_peak_flops_per_gpu_and_mode(name, mode, peak):
    from alum_pretrain.engine.metrics import peak_flops_for

    assert peak_flops_for(name, mode) == peak


def test_math_mode_and_mfu_formula():
    from alum_pretrain.engine.metrics import decoder_flops_per_masked_token, flops_per_token, math_mode, mfu

    assert math_mode("bf16") == "bf16" and math_mode("fp16") == "fp16"
    assert math_mode("fp32", tf32=True) == "tf32" and math_mode("fp32", tf32=False) == "fp32"
    # BERT-base by hand: N = 85M non-embedding, L = 12, H = 768, T = 128, V = 30522; 256 x 128 padded tokens,
    # 15 % masked, one step in 0.25 s on 2 GPUs of 989 TFLOP/s.
    n, L, H, T, V = 85e6, 12, 768, 128, 30522
    padded, masked = 256 * 128, 0.15 * 256 * 128
    step_flops = padded * (6 * n + 12 * L * H * T) + masked * 6 * H * V
    want = step_flops / (0.25 * 989e12 * 2)
    got = mfu(padded, masked, 0.25, flops_per_padded_token=flops_per_token(int(n), L, H, T),
              decoder_flops_per_masked=decoder_flops_per_masked_token(H, V), step_units=1.0, peak=989e12,
              world_size=2)
    assert got == pytest.approx(want, rel=1e-12)
    # ALUM K=1 executes (6 + 2) / 3 forward-equivalents of a standard step
    assert mfu(padded, masked, 0.25, flops_per_padded_token=flops_per_token(int(n), L, H, T),
               decoder_flops_per_masked=decoder_flops_per_masked_token(H, V), step_units=8 / 3, peak=989e12,
               world_size=2) == pytest.approx(want * 8 / 3, rel=1e-12)


# --------------------------------------------------------------------------------------------------
# loader workers, host-only batch entries
# --------------------------------------------------------------------------------------------------

def test_num_workers_auto_and_host_only_keys():
    from alum_pretrain.engine.config import LoopConfig
    from alum_pretrain.engine.setup import HOST_ONLY_KEYS, resolve_num_workers

    assert LoopConfig().num_workers == -1
    assert resolve_num_workers(-1, torch.device("cuda", 0)) == 2
    assert resolve_num_workers(-1, torch.device("cpu")) == 0
    assert resolve_num_workers(3, torch.device("cpu")) == 3
    with pytest.raises(ValueError, match="--train.num_workers=-2"):
        LoopConfig(num_workers=-2)
    assert "sample_ids" in HOST_ONLY_KEYS


# --------------------------------------------------------------------------------------------------
# no host read of the attention mask inside the model
# --------------------------------------------------------------------------------------------------

def test_sdpa_gets_a_4d_mask_no_host_check_same_logits(monkeypatch):
    """HF's ``padding_mask.all()`` (a device sync per forward on GPU) is never reached, and the masked-only
    logits equal HF's own forward with the 2-D mask, on a padded batch."""
    from transformers import masking_utils

    from alum_pretrain.models import PretrainModel, build_scratch_model

    torch.manual_seed(0)
    hf = build_scratch_model("tiny", 120, 0, nsp=True, attn_implementation="sdpa").eval()
    assert hf.config._attn_implementation == "sdpa"
    m = PretrainModel(hf)
    B, T = 3, 12
    ids = torch.randint(5, 120, (B, T))
    attn = torch.ones(B, T, dtype=torch.long)
    attn[0, 8:] = 0
    attn[2, 5:] = 0
    ids = ids.masked_fill(attn == 0, 0)
    tt = torch.zeros(B, T, dtype=torch.long)
    ref = hf(input_ids=ids, attention_mask=attn, token_type_ids=tt)  # HF's own 2-D path (may check .all())

    calls = []
    orig = masking_utils._ignore_bidirectional_mask_sdpa
    monkeypatch.setattr(masking_utils, "_ignore_bidirectional_mask_sdpa",
                        lambda *a, **k: calls.append(1) or orig(*a, **k))
    pos = torch.arange(B * T)
    with torch.no_grad():
        mlm, nsp = m.heads_from_embeds(m.embed(ids, tt), attn, tt, pos, True)
    assert calls == []
    real = attn.reshape(-1).bool()
    torch.testing.assert_close(mlm[real], ref.prediction_logits.reshape(B * T, -1)[real], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(nsp, ref.seq_relationship_logits, atol=1e-5, rtol=1e-4)
