"""End to end, on a tiny BERT: benchmarks/alum_vs_standard.py trains the shared phase and two arms for two
pre-training seeds, measures their smoothness, prints its name=value lines with finite values, and reuses every
stage on a second invocation."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "alum_vs_standard.py"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A stdlib data-bin and an HF folder of a tiny BERT (with MLM head) using its tokenizer."""
    from transformers import AutoTokenizer

    from alum_pretrain.models import build_scratch_model, save_model
    from engine_helpers import make_stdlib_databin

    root = tmp_path_factory.mktemp("ablation")
    data = make_stdlib_databin(root / "data-bin", n_docs=40, vocab_size=400)
    tok = AutoTokenizer.from_pretrained(str(data / "tokenizer"))
    torch.manual_seed(0)
    hf = build_scratch_model("tiny", len(tok), tok.pad_token_id, nsp=False, max_position_embeddings=64,
                             num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    save_model(hf, root / "init")
    tok.save_pretrained(str(root / "init"))
    return root, data


def _run(root: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(SCRIPT), "--init-from", str(root / "init"), "--data-bin", str(data),
           "--out", str(root / "out"), "--tasks", "none", "--arms", "standard,alum_shared", "--seeds", "1,2",
           "--shared-steps", "3", "--arm-steps", "2", "--batch-size", "4", "--seq-len", "32", "--eval-batches", "1",
           "--smooth-batches", "1", "--smooth-batch-size", "4", "--lr", "1e-3", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=800)


def _values(stdout: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line and not line.startswith(("+", "|")))


def test_ablation_end_to_end_prints_finite_paired_ratios(tiny):
    root, data = tiny
    r = _run(root, data)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:] + (root / "out" / "pipeline.log").read_text()[-3000:]
    vals = _values(r.stdout)
    for name in ("ratio_raw_alum_shared", "ratio_matched_alum_shared", "mlm_cost_alum_shared",
                 "ratio_raw_alum_shared_eps0.001", "ratio_matched_alum_shared_rel", "acc_diff_alum_shared"):
        assert math.isfinite(float(vals[name])), name
        lo, hi = (float(x) for x in vals[name + "_range"].split(".."))
        assert lo <= float(vals[name]) <= hi
    assert float(vals["ratio_raw_alum_shared"]) > 0
    share = float(vals["delta_share_alum_shared"])   # shared dropout masks: R is the delta's effect alone
    assert math.isfinite(share) and share > 0.99
    assert "smoothness_ratio_alum_over_standard" not in vals   # no paper-ALUM arm in this run
    table = [line for line in r.stdout.splitlines() if line.startswith("| alum_shared")]
    assert len(table) == 2   # one row per seed
    for seed in (1, 2):
        for arm in ("standard", "alum_shared"):
            assert (root / "out" / f"seed{seed}" / arm / "COMPLETED").exists()
            assert not (root / "out" / f"seed{seed}" / f"{arm}-hf").exists()   # no export without tasks
    # the seed changes the arms: the two seeds' standard arms differ
    a, b = ((root / "out" / f"seed{s}" / "smooth" / "standard-abs.json").read_text() for s in (1, 2))
    assert a != b
    # a second invocation reuses every stage and prints the same lines
    again = _run(root, data)
    assert again.returncode == 0 and "+ " not in again.stdout
    assert _values(again.stdout) == vals


def test_bad_arms_name_the_flag(tiny):
    root, data = tiny
    r = _run(root, data, "--arms", "alum,rdrop")
    assert r.returncode != 0 and "--arms" in r.stderr
    r = _run(root, data, "--seeds", "1")
    assert r.returncode != 0 and "--seeds" in r.stderr
