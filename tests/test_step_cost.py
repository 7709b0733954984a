"""``benchmarks/step_cost.py`` runs end to end on a tiny CPU model and prints every figure it documents
(the timings themselves are checked by people reading them, never asserted here)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ["standard_forward", "standard_backward", "alum_clean_forward", "alum_random_start", "alum_noisy_forward",
          "alum_ascent_backward", "alum_ascent_step", "alum_adversarial_forward", "alum_symmetric_kl",
          "alum_backward_both_graphs"]


def test_step_cost_prints_ratios_and_alum_phases():
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_cost.py"), "--device", "cpu",
                        "--preset", "tiny", "--vocab", "500", "--batch-size", "2", "--seq-len", "32", "--rounds", "2",
                        "--steps", "2", "--warmup", "1", "--no-compile", "--phases", "--phase-steps", "2"],
                       cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    figures = {}
    for line in r.stdout.splitlines():
        if "=" in line and " " not in line.split("=", 1)[0]:
            key, value = line.split("=", 1)
            figures[key] = float(value.split()[0])
    wanted = ["standard_speedup_vs_hf", "alum_over_standard", "phases_alum_over_standard"]
    wanted += [f"phase_ms_{p}" for p in PHASES]
    missing = [k for k in wanted if k not in figures]
    assert not missing, (missing, r.stdout[-3000:])
    assert all(math.isfinite(figures[k]) and figures[k] > 0 for k in wanted), figures
    assert "every step a sample" in r.stdout  # the CPU estimator is said in the header
