"""Fault injection under 2-process gloo DDP: a damaged newest checkpoint falls back on every rank (rank 0
verifies, the others load the same one), and a NaN run stops every rank with exit code 3 (no hang)."""

from __future__ import annotations

import pytest
import torch

from engine_helpers import final_weights, make_stdlib_databin, max_weight_diff, train_args
from engine_helpers import torchrun_train as _torchrun

pytestmark = pytest.mark.multirank


def test_ddp_fallback_and_nan_stop(tmp_path):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        databin = make_stdlib_databin(tmp_path / "data-bin", n_docs=60)
        out = tmp_path / "run"
        args = train_args(databin, out, 4, "--train.save_every=2", "--train.eval_every=0")
        r = _torchrun(args)
        assert r.returncode == 0, r.stderr[-4000:]
        w = {k: v.clone() for k, v in final_weights(out).items()}  # load_file maps the file: copy before truncating it
        bad = out / "checkpoints" / "step-4" / "model" / "model.safetensors"
        with open(bad, "r+b") as fh:
            fh.truncate(bad.stat().st_size // 2)
        (out / "COMPLETED").unlink()
        r = _torchrun(args)
        assert r.returncode == 0, r.stderr[-4000:]
        assert f"{bad}: " in r.stderr and "resumed from" in r.stderr and "step-2 at step 2" in r.stderr
        assert max_weight_diff(w, final_weights(out)) <= 1e-6

        nan = tmp_path / "nan"
        r = _torchrun(train_args(databin, nan, 30, "--optim.lr=1e6", "--optim.warmup_ratio=0",
                                 "--train.eval_every=0", "--train.save_every=1"))
        assert r.returncode != 0
        assert r.stderr.count("NaN/Inf for 5 consecutive steps") >= 2, r.stderr[-4000:]  # both ranks
        assert not (nan / "COMPLETED").exists()
    finally:
        torch.set_num_threads(n)
