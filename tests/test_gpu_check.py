"""``benchmarks/gpu_check.py --cpu-smoke``: every section runs its GPU code path on a tiny CPU model and
prints its figures; the figures that mean something on CPU hold (resume round trip, export parity, DDP)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

EXPECTED = [
    "torch", "device", "capability", "bf16_real",
    "tokens_per_s_standard_bf16_eager", "tokens_per_s_alum_fp16_compile", "mfu_standard_bf16_eager",
    "alum_over_standard_bf16_eager", "ascent_ms_fp16_compile", "recompiles_standard_bf16", "compile_graphs_fp16",
    "fp16_over_bf16_standard_eager",
    "host_mask_ms_per_step", "gpu_idle_frac_from_masking", "host_syncs_standard_step", "host_syncs_alum_step",
    "ascent_fp16_zero_frac", "ascent_fp16_cos_vs_fp32", "ascent_fp32_zero_frac",
    "peak_mem_gib_bert-base-scratch", "peak_mem_gib_roberta-large-continual",
    "sigusr1_stopped", "sigusr1_saved_step", "resume_completed", "resume_steps_each_once", "export_parity_max_abs_diff",
    "ddp_gloo_alum_step", "fairseq_update", "total_seconds",
]


def test_cpu_smoke_runs_every_section(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-smoke", "--work",
                        str(tmp_path)], cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    lines = [ln for ln in r.stdout.splitlines() if ln and not ln.startswith("#")]
    assert all("=" in ln for ln in lines), [ln for ln in lines if "=" not in ln]  # stdout: figures only
    figures = dict(ln.split("=", 1) for ln in lines)
    missing = [k for k in EXPECTED if k not in figures]
    assert not missing, (missing, r.stdout[-3000:])
    errors = {k: v for k, v in figures.items() if v.startswith("error")}
    if "fairseq_update" in errors and "fairseq" not in sys.modules and not _has_fairseq():
        errors.pop("fairseq_update")
    assert not errors, (errors, r.stderr[-4000:])
    assert figures["sigusr1_stopped"] == "1" and figures["resume_completed"] == "1"
    assert figures["resume_steps_each_once"] == "1"
    assert 3 <= int(figures["sigusr1_saved_step"]) < 8
    assert float(figures["export_parity_max_abs_diff"]) < 1e-4
    assert figures["ddp_gloo_alum_step"] == "ok"
    assert figures["ascent_fp32_zero_frac"] == "0"
    assert figures["fairseq_update"] in ("ok", "skipped(fairseq not installed)")
    assert float(figures["tokens_per_s_standard_bf16_eager"]) > 0


def _has_fairseq() -> bool:
    import importlib.util

    return importlib.util.find_spec("fairseq") is not None
