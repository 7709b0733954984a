"""Exclusive run folders (alum_pretrain/runlock.py): one process per output folder, released by kill -9.

Unit cases of the lock (flock and the O_EXCL + heartbeat fallback), then the commands: two ``alum-train``
processes on one folder (the second exits 2 within seconds naming the first; after ``kill -9`` of the first
the same command resumes), ``alum-prep --out`` refused while a stand-in holds a fresh folder (nothing
touched), and two real ``alum-prep`` / ``fairseq-train`` processes on one folder, the first held mid-work by
``tests/hold_runner.py``: the second is refused naming the first, and after ``kill -9`` the same command
resumes the first's work.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alum_pretrain import runlock as RL
from alum_pretrain.data.databin import DataBin
from engine_helpers import ROOT, make_stdlib_databin, subprocess_env, train_args

HOLD = ("import sys, time, os\n"
        "from alum_pretrain.runlock import lock_folder\n"
        "lk = lock_folder(sys.argv[1], tool='holder')\n"
        "if len(sys.argv) > 2 and os.fork() == 0:\n"  # a forked worker that outlives its parent
        "    time.sleep(120); os._exit(0)\n"
        "print('locked', flush=True)\n"
        "time.sleep(600)\n")


def _holder(folder: Path, fork_child: bool = False) -> subprocess.Popen:
    """A process that locks ``folder`` and sleeps (optionally after forking a long-lived child)."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), *(["fork"] if fork_child else [])],
                         stdout=subprocess.PIPE, text=True, env=subprocess_env(), cwd=ROOT)
    assert p.stdout.readline().strip() == "locked"
    return p


def _kill9(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)


def test_second_lock_is_refused_with_the_holder_named(tmp_path):
    lk = RL.lock_folder(tmp_path / "run", tool="t", command="cmd one")
    assert lk.mode == "flock" and (tmp_path / "run" / RL.LOCK_NAME).exists()
    info = RL.holder_info(lk.path)
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and info["command"] == "cmd one"
    with pytest.raises(RL.FolderBusyError) as e:  # flock: another open file description conflicts too
        RL.lock_folder(tmp_path / "run", tool="t2")
    msg = str(e.value)
    assert str(tmp_path / "run") in msg and f"PID {os.getpid()}" in msg and socket.gethostname() in msg
    assert "cmd one" in msg and "choose another output folder" in msg
    lk.release()
    assert not lk.path.exists()
    RL.lock_folder(tmp_path / "run", tool="t").release()  # free again


def test_kill_9_releases_the_lock_even_with_a_forked_child_alive(tmp_path):
    p = _holder(tmp_path / "run", fork_child=True)
    with pytest.raises(RL.FolderBusyError, match=f"PID {p.pid} on host"):
        RL.lock_folder(tmp_path / "run", tool="t")
    _kill9(p)  # its forked child still runs, with a copy of the descriptor closed at fork
    RL.lock_folder(tmp_path / "run", tool="t").release()


def test_fallback_without_flock_uses_o_excl_and_a_heartbeat(tmp_path, monkeypatch, caplog):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(RL.fcntl, "flock", no_flock)
    monkeypatch.setattr(RL, "HEARTBEAT_S", 0.05)
    lk = RL.lock_folder(tmp_path / "run", tool="t")
    assert lk.mode == "excl" and "does not support flock" in caplog.text
    t0 = time.monotonic()
    with pytest.raises(RL.FolderBusyError, match="taken over 1 s after"):  # a live holder: heartbeat seen
        RL.lock_folder(tmp_path / "run", tool="t", stale_s=1.0)
    assert time.monotonic() - t0 < 1.0
    lk.release()
    # A holder that died (no heartbeat: a lock file nobody touches) is taken over after stale_s.
    (tmp_path / "run" / RL.LOCK_NAME).write_text('{"pid": 1, "host": "elsewhere", "started": 0}')
    t0 = time.monotonic()
    lk2 = RL.lock_folder(tmp_path / "run", tool="t", stale_s=0.5)
    assert 0.5 <= time.monotonic() - t0 < 5 and RL.holder_info(lk2.path)["pid"] == os.getpid()
    lk2.release()


# ---- the commands ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def databin(tmp_path_factory) -> Path:
    return make_stdlib_databin(tmp_path_factory.mktemp("lock") / "data-bin")


def _train(databin: Path, out: Path, **kw) -> subprocess.Popen:
    args = train_args(databin, out, 100000, "--train.save_every=2", "--train.eval_every=0", "--train.log_every=1")
    return subprocess.Popen([sys.executable, "-m", "alum_pretrain.train", *args], env=subprocess_env(), cwd=ROOT,
                            stderr=subprocess.STDOUT, stdout=subprocess.PIPE, text=True, **kw)


def _wait_for(pred, timeout: float = 240) -> None:
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.2)


def _steps(out: Path) -> list[int]:
    d = out / "checkpoints"
    return sorted(int(p.name[5:]) for p in d.glob("step-*") if p.name[5:].isdigit()) if d.is_dir() else []


def test_two_trainers_one_folder_second_refused_then_resume_after_kill_9(databin, tmp_path):
    out = tmp_path / "run"
    first = _train(databin, out)
    try:
        _wait_for(lambda: len(_steps(out)) >= 1)
        second = _train(databin, out)
        t0 = time.monotonic()
        text, _ = second.communicate(timeout=240)
        took = time.monotonic() - t0
        assert second.returncode == 2, text[-3000:]
        assert f"{out} is in use by PID {first.pid} on host {socket.gethostname()}" in text, text[-3000:]
        assert took < 120  # the start-up (imports) dominates; the refusal itself is immediate
        assert first.poll() is None  # the first run was not disturbed
        _kill9(first)
        ckpt = _steps(out)[-1]
        again = _train(databin, out)  # the same command, no clean-up
        lines = []
        for line in again.stdout:
            lines.append(line)
            if "resumed from" in line:
                assert f"at step {ckpt}" in line or _steps(out)[-1] >= ckpt
                again.send_signal(signal.SIGUSR1)  # save and exit 0
        assert again.wait(timeout=240) == 0, "".join(lines)[-3000:]
        assert any("resumed from" in x for x in lines)
        assert not (out / RL.LOCK_NAME).exists()  # a clean exit leaves no lock file
    finally:
        for p in (first,):
            if p.poll() is None:
                p.kill()


def _prep_cmd(inp: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "data_prep.cli", str(inp), "--format", "text", "--out", str(out),
            "--train-tokenizer", "wordpiece", "--vocab-size", "200", "--workers", "1", "--shards", "1"]


def test_alum_prep_refused_while_held_and_runs_after_kill_9(tmp_path):
    inp = tmp_path / "corpus.txt"
    inp.write_text("".join(f"Sentence number {i} of a small corpus for the lock test.\n\n" for i in range(300)))
    out = tmp_path / "bin"
    holder = _holder(out)
    try:
        r = subprocess.run(_prep_cmd(inp, out), env=subprocess_env(), cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 2, r.stderr[-3000:]
        assert f"{out} is in use by PID {holder.pid}" in r.stderr, r.stderr[-3000:]
        assert sorted(p.name for p in out.iterdir()) == [RL.LOCK_NAME]  # nothing touched
        _kill9(holder)
        r = subprocess.run(_prep_cmd(inp, out), env=subprocess_env(), cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert (out / "manifest.json").is_file() and not (out / RL.LOCK_NAME).exists()
    finally:
        if holder.poll() is None:
            holder.kill()


# ---- two real processes on one folder (the first held mid-work by tests/hold_runner.py) ------------------

def _held(kind: str, n: int, hold: Path, args: list[str]) -> subprocess.Popen:
    """A real alum-prep / fairseq-train that holds after doing real work (tests/hold_runner.py)."""
    log = hold.with_suffix(".log")
    with open(log, "w") as fh:  # a file, not a pipe: a full pipe would block the process
        p = subprocess.Popen([sys.executable, str(ROOT / "tests" / "hold_runner.py"), kind, str(n), str(hold), "--",
                              *args], env=subprocess_env(), cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    _wait_for(lambda: hold.exists() or p.poll() is not None, timeout=120)
    assert p.poll() is None, log.read_text()[-3000:]
    return p


def _refused_naming(cmd: list[str], folder: Path, first: subprocess.Popen) -> float:
    t0 = time.monotonic()
    r = subprocess.run(cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert r.returncode == 2, (r.stdout + r.stderr)[-3000:]
    assert f"{folder} is in use by PID {first.pid} on host {socket.gethostname()}" in r.stderr, r.stderr[-3000:]
    assert first.poll() is None  # the first process was not disturbed
    return took


def test_two_real_alum_prep_on_one_out_second_refused_then_rerun_after_kill_9(tmp_path):
    inp = tmp_path / "corpus.txt"
    inp.write_text("".join(f"Sentence number {i} of a small corpus for the lock test.\n\n" for i in range(300)))
    out = tmp_path / "bin"
    first = _held("prep", 0, tmp_path / "held", _prep_cmd(inp, out)[3:])  # tokenised, parts written, holding
    try:
        assert (out / "manifest.json").is_file() and RL.holder_info(out / RL.LOCK_NAME)["pid"] == first.pid
        assert _refused_naming(_prep_cmd(inp, out), out, first) < 60  # imports dominate; the refusal is at once
        _kill9(first)
        r = subprocess.run(_prep_cmd(inp, out), env=subprocess_env(), cwd=ROOT, capture_output=True, text=True,
                           timeout=300)  # the same command, no clean-up: resumes the killed run's work
        assert r.returncode == 0, r.stderr[-3000:]
        assert DataBin(out).manifest["status"] == "complete" and not (out / RL.LOCK_NAME).exists()
    finally:
        if first.poll() is None:
            first.kill()


@pytest.mark.fairseq
def test_two_real_fairseq_trains_on_one_save_dir_second_refused_then_resume_after_kill_9(databin, tmp_path):
    pytest.importorskip("fairseq")
    from test_fairseq import TINY, USER_DIR

    save = tmp_path / "ck"
    args = [str(databin), "--user-dir", str(USER_DIR), "--task", "alum_masked_lm", "--criterion", "alum_masked_lm",
            "--save-dir", str(save), *TINY, "--max-update", "4", "--save-interval-updates", "1"]
    first = _held("fairseq", 2, tmp_path / "held", args)  # 2 updates done (and saved), holding in the third
    try:
        assert RL.holder_info(save / RL.LOCK_NAME)["pid"] == first.pid
        cmd = [sys.executable, "-m", "fairseq_cli.train", *args]
        assert _refused_naming(cmd, save, first) < 60
        _kill9(first)
        r = subprocess.run(cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-3000:]
        assert "Loaded checkpoint" in out and "@ 2 updates" in out, out[-3000:]  # resumed where the first stopped
        assert '"num_updates": "4"' in out and not (save / RL.LOCK_NAME).exists()
    finally:
        if first.poll() is None:
            first.kill()
