"""fairseq-train save-on-signal (alum_pretrain/fairseq_ext/preemption.py), on CPU without SLURM.

A tiny `fairseq-train` (test_fairseq.py's model, flags and data-bin) gets SIGUSR1 mid-run: it must save a
checkpoint at the update where it stopped -- not only at a --save-interval-updates multiple --, exit 0, and
the same command must resume from that checkpoint and train exactly the updates that were left, like an
uninterrupted run.  Importing the plugin outside fairseq-train must change nothing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import ROOT, requires_fairseq
from test_fairseq import TINY, USER_DIR, databin, fairseq_train  # noqa: F401  (databin: module fixture)

pytestmark = [pytest.mark.fairseq, requires_fairseq]
MAX_UPDATE, INTERVAL = 10, 4
STOPPED_RE = re.compile(r"SIGUSR1 received: saved (\S+) at update (\d+); stopping \(exit 0\)")


def _train_inner(out: str) -> list[dict]:
    return [json.loads(line.split("| train_inner |", 1)[1]) for line in out.splitlines() if "| train_inner |" in line]


def _popen(data, save_dir, stop_file, *extra, **kw) -> subprocess.Popen:
    """fairseq-train started as test_fairseq.fairseq_train runs it, with the stop file set."""
    cmd = [sys.executable, "-m", "fairseq_cli.train", str(data), "--user-dir", str(USER_DIR),
           "--task", "alum_masked_lm", "--criterion", "alum_masked_lm", "--save-dir", str(save_dir), *TINY,
           *map(str, extra)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", ALUM_FAIRSEQ_STOP_FILE=str(stop_file))
    return subprocess.Popen(cmd, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT, **kw)


def _signalled_run(data, save_dir, stop_file, *extra, after_update: int = 1, timeout: float = 180):
    """fairseq-train with SIGUSR1 sent once update `after_update` is logged."""
    p = _popen(data, save_dir, stop_file, *extra, stdout=subprocess.PIPE)
    killer = threading.Timer(timeout, p.kill)
    killer.start()
    lines, sent = [], False
    try:
        for line in p.stdout:
            lines.append(line)
            if not sent and "| train_inner |" in line and int(_train_inner(line)[0]["num_updates"]) >= after_update:
                p.send_signal(signal.SIGUSR1)
                sent = True
        rc = p.wait()
    finally:
        killer.cancel()
    out = "".join(lines)
    assert sent, out[-4000:]
    return rc, out


def test_sigusr1_saves_at_the_current_update_exits_0_and_resumes(databin, tmp_path):
    common = ["--max-update", MAX_UPDATE, "--mask-curriculum-updates", MAX_UPDATE, "--save-interval-updates", INTERVAL,
              "--alum-start-step", 2, "--alum-epsilon", "1e-2", "--alum-noise-std", "1e-3"]
    save, stop_file = tmp_path / "a", tmp_path / "stopped.json"
    rc, out = _signalled_run(databin, save, stop_file, *common)
    assert rc == 0, out[-4000:]
    stopped = STOPPED_RE.findall(out)
    assert len(stopped) == 1, out[-4000:]  # one line, from the saving rank
    last, stop = stopped[0][0], int(stopped[0][1])
    assert last == str(save / "checkpoint_last.pt") and 1 <= stop < MAX_UPDATE, out[-4000:]
    assert "Stopping training due to num_updates" not in out
    first = _train_inner(out)
    assert [int(r["num_updates"]) for r in first] == list(range(1, stop + 1))

    # The checkpoint is the state after update `stop`, with the data position right after its batch.
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["optimizer_history"][-1]["num_updates"] == stop
    itr = state["extra_state"]["train_iterator"]
    assert itr["epoch"] == 1 and itr["iterations_in_epoch"] == stop  # (one epoch is > MAX_UPDATE batches)
    # fairseq itself saved only at interval multiples: a stop between them was saved by the signal path.
    interval_saves = sorted(int(m.group(1)) for f in save.iterdir()
                            if (m := re.fullmatch(r"checkpoint_1_(\d+)\.pt", f.name)))
    assert interval_saves == list(range(INTERVAL, stop + 1, INTERVAL))
    assert not any(f.name.endswith(".tmp") for f in save.iterdir())  # atomic writes/copies left nothing behind
    assert json.loads(stop_file.read_text()) == {"signal": "SIGUSR1", "num_updates": stop, "checkpoint": last}

    # Re-running the same command resumes from it and trains exactly the remaining updates ...
    stop_file.unlink()
    second, out2 = fairseq_train(databin, save, *common)
    assert f"Loaded checkpoint {last} (epoch 1 @ {stop} updates)" in out2, out2[-4000:]
    assert [int(r["num_updates"]) for r in second] == list(range(stop + 1, MAX_UPDATE + 1))
    assert f"num_updates: {MAX_UPDATE} >= max_update: {MAX_UPDATE}" in out2
    assert not stop_file.exists()  # reached --max-update: nothing tells a job script to resume
    assert torch.load(save / "checkpoint_last.pt", map_location="cpu",
                      weights_only=False)["optimizer_history"][-1]["num_updates"] == MAX_UPDATE
    # ... on the same batches with the same masks as an uninterrupted run.
    full, _ = fairseq_train(databin, tmp_path / "b", *common)
    assert len(full) == MAX_UPDATE
    for r, f in zip(first + second, full):
        assert r["num_updates"] == f["num_updates"]
        assert r["masked_frac"] == f["masked_frac"] and r["mask_rate"] == f["mask_rate"]
        assert float(r["mlm_loss"]) == pytest.approx(float(f["mlm_loss"]), abs=2e-3)


@pytest.mark.multirank
def test_a_signal_on_one_rank_stops_every_rank_at_the_same_update(databin, tmp_path):
    """Two CPU ranks (gloo): SIGUSR1 reaches rank 1 only; rank 0 -- the saving rank, never signalled -- must
    stop at the same update (the flag is all-reduced), save there, and both must exit 0 (a rank left behind
    would hang in the next collective, and the timeout would fail the test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    save, stop_file = tmp_path / "ck", tmp_path / "stopped.json"
    dist = ["--max-update", 40, "--batch-size", 4, "--distributed-world-size", 2, "--distributed-backend", "gloo",
            "--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-no-spawn", "--device-id", 0,
            "--ddp-backend", "legacy_ddp"]  # (pytorch_ddp passes device_ids, which CPU modules refuse)
    logs = [tmp_path / f"rank{r}.log" for r in range(2)]
    procs = []
    for r in range(2):
        with open(logs[r], "w") as f:
            procs.append(_popen(databin, save, stop_file, *dist, "--distributed-rank", r, stdout=f))
    try:
        deadline = time.time() + 150
        while not any(int(x["num_updates"]) >= 2 for x in _train_inner(logs[0].read_text())):  # rank 0 logs
            assert time.time() < deadline and all(p.poll() is None for p in procs), logs[0].read_text()[-3000:]
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGUSR1)
        rcs = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    out0, out1 = (f.read_text() for f in logs)
    assert rcs == [0, 0], (out0[-3000:], out1[-3000:])
    stopped = STOPPED_RE.findall(out0)
    assert len(stopped) == 1 and not STOPPED_RE.search(out1), (out0[-3000:], out1[-3000:])
    stop = int(stopped[0][1])
    assert 2 <= stop < 40 and "Stopping training due to num_updates" not in out0
    assert max(int(x["num_updates"]) for x in _train_inner(out0)) == stop
    state = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert state["optimizer_history"][-1]["num_updates"] == stop
    assert json.loads(stop_file.read_text())["num_updates"] == stop


def test_importing_the_plugin_outside_fairseq_train_changes_nothing():
    code = ("import signal, fairseq_cli.train as t\n"
            "orig = t.validate_and_save\n"
            "import alum_pretrain.fairseq_ext\n"
            "from alum_pretrain.fairseq_ext import preemption\n"
            "assert t.validate_and_save is orig, 'validate_and_save wrapped'\n"
            "assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL, signal.getsignal(signal.SIGUSR1)\n"
            "assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, signal.getsignal(signal.SIGTERM)\n"
            "assert not preemption.install()\n"
            "print('ok')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-2000:]
