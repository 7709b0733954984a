"""No hang and every stop signal honoured: a batch that an epoch cannot fill is a clear error within
seconds (it used to loop over epochs forever), and Ctrl-C (SIGINT) saves a checkpoint like SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine_helpers import ROOT, make_stdlib_databin, run_train, subprocess_env, train_args

pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return make_stdlib_databin(tmp_path_factory.mktemp("small") / "data-bin", n_docs=40, vocab_size=400)


def test_a_batch_larger_than_the_corpus_is_a_clear_error_in_seconds(small, tmp_path, capsys):
    t0 = time.time()
    rc = run_train(small, tmp_path / "run", 2, "--train.batch_size=6000", "--train.eval_every=0")
    err = capsys.readouterr().err
    assert rc == 2 and "fewer than one global batch of 6000" in err and "--train.batch_size" in err, err
    assert time.time() - t0 < 60
    assert not list((tmp_path / "run").glob("checkpoints/step-*"))


def test_ctrl_c_saves_a_checkpoint_and_exits_0(small, tmp_path):
    out = tmp_path / "run"
    args = train_args(small, out, 200, "--train.eval_every=0", "--train.save_every=0")
    proc = subprocess.Popen([sys.executable, "-m", "alum_pretrain.train", *args], env=subprocess_env(),
                            cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "signal 2 received" in output or "signal Signals.SIGINT" in output, output[-2000:]
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and not ckpts[0].name.endswith(".tmp")


def test_a_signal_during_setup_exits_before_the_first_step(small, tmp_path, monkeypatch):
    import os

    import alum_pretrain.train as T

    real = T.build_run

    def build_then_preempted(cfg, env, checked=None):
        run = real(cfg, env, checked)
        os.kill(os.getpid(), signal.SIGUSR1)  # arrives while the data is planned / the model is built
        return run

    monkeypatch.setattr(T, "build_run", build_then_preempted)
    out = tmp_path / "run"
    assert run_train(small, out, 50, "--train.eval_every=0") == 0
    assert not list(out.glob("checkpoints/step-*")) and not (out / "COMPLETED").exists()
