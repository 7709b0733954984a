"""A rank that raises must bring the whole job down within seconds, not hang the others until the
30-minute collective timeout (no collective on the exception path: ``engine.distributed.cleanup``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine_helpers import make_stdlib_databin, train_args

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.multirank


@pytest.mark.parametrize("fault_rank", [1, 0])
def test_one_rank_raising_ends_the_job_in_seconds(tmp_path, fault_rank):
    databin = make_stdlib_databin(tmp_path / "data-bin", n_docs=40)
    out, stamp = tmp_path / "run", tmp_path / "fault_time"
    env = dict(os.environ, OMP_NUM_THREADS="1", ALUM_FAULT_RANK=str(fault_rank), ALUM_FAULT_STEP="3",
               ALUM_FAULT_STAMP=str(stamp),
               PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max_restarts", "0", str(ROOT / "tests" / "fault_inject_train.py"),
           *train_args(databin, out, 50, "--train.eval_every=0", "--train.save_every=2")]
    # A hang would last 30 minutes (the process-group timeout): 240 s is far below it and far above a
    # loaded CI machine's start-up time.
    proc = subprocess.Popen(cmd, env=env, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:  # the hang this test is about: take the whole process group down
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail("the job hung after one rank raised\n" + output[-3000:])
    ended = time.time()
    assert proc.returncode != 0, output[-3000:]
    assert f"injected fault on rank {fault_rank} at step 3" in output, output[-3000:]
    assert stamp.exists(), output[-3000:]
    after_fault = ended - float(stamp.read_text())
    # torchrun's own SIGTERM -> SIGKILL grace period is 30 s; with no collective on the exception path the
    # failing rank exits at once and its gloo peer gets a closed connection: well inside that.
    assert after_fault < 25, f"the job took {after_fault:.1f} s to end after the fault\n" + output[-3000:]
    # the checkpoint of step 2 is intact and the failed step left nothing behind
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert ckpts == ["step-2"], ckpts
