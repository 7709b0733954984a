"""2-process gloo DDP (``torchrun --nproc_per_node 2``) == 1 process with the same global batch.

Same loss curve (every logged loss part, per step) and the same final weights within float tolerance,
with ALUM switched on half-way, across a masking-rate phase boundary; then a DDP resume from a
checkpoint that continues to the same final weights.  And SIGTERM to one rank stops both cleanly."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from engine_helpers import (PARITY, ROOT, final_weights, make_stdlib_databin, max_weight_diff, read_log, run_train,
                            train_args)
from engine_helpers import torchrun_train as _torchrun

pytestmark = pytest.mark.multirank

COMMON = ("--alum.start_step=3", *PARITY)


def test_two_process_ddp_matches_one_process(tmp_path):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        databin = make_stdlib_databin(tmp_path / "data-bin", n_docs=60)
        one, two = tmp_path / "one", tmp_path / "two"
        steps = 6
        assert run_train(databin, one, steps, *COMMON, "--train.batch_size=8") == 0
        r = _torchrun(train_args(databin, two, steps, *COMMON, "--train.batch_size=4", "--train.save_every=3"))
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
        assert "world size 2" in r.stderr

        l1, l2 = read_log(one), read_log(two)
        assert [x["step"] for x in l2] == list(range(1, steps + 1))
        assert any(x["adv"] > 0 for x in l1) and l1[0]["adv"] == 0
        assert len({x["mask_rate"] for x in l1}) > 1  # crosses a curriculum phase boundary
        for a, b in zip(l1, l2):
            for key in ("loss", "mlm", "nsp", "adv", "grad_norm", "mask_frac"):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-8), (a["step"], key, a[key], b[key])
        v1, v2 = read_log(one, "valid"), read_log(two, "valid")
        assert [v["step"] for v in v2] == [0, 3, 6]
        for a, b in zip(v1, v2):
            assert b["valid_mlm"] == pytest.approx(a["valid_mlm"], rel=1e-5)
        w1, w2 = final_weights(one), final_weights(two)
        assert max_weight_diff(w1, w2) < 1e-5

        # Resume under DDP: drop the final checkpoint, re-run, same weights as before.
        shutil.rmtree(two / "checkpoints" / f"step-{steps}")
        (two / "COMPLETED").unlink()
        r = _torchrun(train_args(databin, two, steps, *COMMON, "--train.batch_size=4", "--train.save_every=3"))
        assert r.returncode == 0, r.stderr[-4000:]
        assert "resumed from" in r.stderr
        assert max_weight_diff(w2, final_weights(two)) <= 1e-6
    finally:
        torch.set_num_threads(n)


def test_sigterm_to_one_rank_stops_all_ranks_cleanly(tmp_path):
    """SIGTERM reaches ONE worker only: the ranks agree (all-reduced flag), finish the same step, rank 0
    saves, everyone exits 0 (so torchrun exits 0)."""
    import signal
    import time

    databin = make_stdlib_databin(tmp_path / "data-bin", n_docs=40)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "alum_pretrain.train",
           *train_args(databin, out, 500, "--train.eval_every=0", "--train.save_every=0")]
    proc = subprocess.Popen(cmd, env=env, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = out / "log.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate(timeout=60)[0][-3000:]
    workers = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True,
                             timeout=60).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGTERM)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, output[-3000:]
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1, ckpts
    n = int(ckpts[0].name.split("-")[1])
    assert 3 <= n < 500
    assert [r["step"] for r in read_log(out)] == list(range(1, n + 1))
    assert not (out / "COMPLETED").exists()
