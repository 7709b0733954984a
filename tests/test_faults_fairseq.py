"""Fault injection, fairseq engine: real ``fairseq-train`` checkpoints pass the safe loader's allow-list,
and a diverging fp32 run skips its NaN updates and stops like alum-train (exit 3, after --max-nonfinite in a
row) without a non-finite checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, requires_fairseq
from engine_helpers import make_stdlib_databin

USER_DIR = ROOT / "alum_pretrain" / "fairseq_ext"
TINY = ["--arch", "roberta", "--encoder-layers", "2", "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
        "--encoder-attention-heads", "2", "--tokens-per-sample", "32", "--batch-size", "4", "--optimizer", "adam",
        "--cpu", "--num-workers", "0", "--log-format", "json", "--log-interval", "1", "--no-epoch-checkpoints",
        "--disable-validation", "--seed", "3"]


@pytest.fixture(scope="module")
def databin(tmp_path_factory):
    return make_stdlib_databin(tmp_path_factory.mktemp("fs-faults") / "data-bin", n_docs=40)


def _fairseq_train(data, save_dir, *extra):
    cmd = [sys.executable, "-m", "fairseq_cli.train", str(data), "--user-dir", str(USER_DIR), "--task",
           "alum_masked_lm", "--criterion", "alum_masked_lm", "--save-dir", str(save_dir), *TINY, *map(str, extra)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    return p.returncode, p.stdout + p.stderr


@pytest.mark.fairseq
@requires_fairseq
def test_real_fairseq_checkpoint_passes_the_allow_list_and_nan_run_stops(databin, tmp_path):
    from alum_pretrain.fairseq_ext.export_hf import load_checkpoint_state

    rc, out = _fairseq_train(databin, tmp_path / "ok", "--lr", "1e-3", "--max-update", "2")
    assert rc == 0, out[-3000:]
    names = torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "ok" / "checkpoint_last.pt")
    state = load_checkpoint_state(tmp_path / "ok" / "checkpoint_last.pt")  # no --trust-checkpoint needed
    assert "model" in state and state["optimizer_history"], names

    rc, out = _fairseq_train(databin, tmp_path / "nan", "--lr", "1e6", "--max-update", "30",
                             "--save-interval-updates", "1")
    assert rc == 3 and "NaN/Inf for 5 consecutive steps" in out, out[-3000:]
    saved = sorted((tmp_path / "nan").glob("*.pt"))
    assert saved  # written before the updates went NaN
    for p in saved:
        load_checkpoint_state(p)  # refuses NaN/Inf weights: every checkpoint written is finite
