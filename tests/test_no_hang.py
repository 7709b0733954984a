"""No hang and every stop signal honoured: a batch that an epoch cannot fill is a clear error within
seconds (it used to loop over epochs forever), Ctrl-C (SIGINT) saves a checkpoint like SIGTERM, and a
signal that arrives inside a long phase (planning an epoch, an evaluation, an export) ends it within
seconds (tests/phase_probe.py makes the phase long and says when it is inside)."""

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
    assert proc.poll() is None, proc.communicate(timeout=60)[0]
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "SIGINT received" in output, output[-2000:]
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


# ---- a stop signal inside a long phase ----------------------------------------------------------------

PROBE = ROOT / "tests" / "phase_probe.py"


def stop_inside(phase: str, module: str, args: list[str], sig: int, tmp_path: Path, *, start_timeout: float = 240,
                extra_env: dict | None = None) -> tuple[int, str, float]:
    """Run ``module args`` under the phase probe, send ``sig`` once it is inside ``phase``; returns
    ``(exit code, output, seconds from the signal to the exit)``."""
    stamp = tmp_path / f"inside-{phase.replace(':', '-')}"
    proc = subprocess.Popen([sys.executable, str(PROBE), phase, str(stamp), module, *args],
                            env=subprocess_env(**(extra_env or {})), cwd=str(ROOT), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + start_timeout
        while not stamp.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert stamp.exists(), f"never entered {phase}: " + (proc.communicate(timeout=60)[0][-3000:]
                                                               if proc.poll() is not None else "timed out")
        t0 = time.time()
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
        return proc.returncode, out, time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _records(out: Path) -> list[dict]:
    import json

    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if x.strip()]


def test_a_signal_while_the_first_epoch_is_planned_stops_before_the_first_step(small, tmp_path):
    out = tmp_path / "run"
    rc, output, dt = stop_inside("planning:0", "alum_pretrain.train",
                                 train_args(small, out, 50, "--train.eval_every=0"), signal.SIGTERM, tmp_path)
    # 28 training documents at 2 s each: the planning alone would take 56 s; it looks at the flag every 4
    assert rc == 0 and dt < 25, (rc, dt, output[-3000:])
    assert "SIGTERM received during data planning" in output and "nothing new to save" in output, output[-3000:]
    assert not list(out.glob("checkpoints/step-*")) and not list(out.glob("checkpoints/*.tmp"))
    assert not (out / "COMPLETED").exists()


def test_a_signal_while_a_later_epoch_is_planned_saves_the_steps_done(small, tmp_path):
    out = tmp_path / "run"
    # about 30 steps of 32 sequences make an epoch of this corpus
    args = train_args(small, out, 500, "--train.eval_every=0", "--train.save_every=0", "--train.batch_size=32")
    rc, output, dt = stop_inside("planning:1", "alum_pretrain.train", args, signal.SIGUSR1, tmp_path)
    assert rc == 0 and dt < 25, (rc, dt, output[-3000:])
    ckpts = sorted(out.glob("checkpoints/step-*"))
    assert len(ckpts) == 1 and not list(out.glob("checkpoints/*.tmp")), ckpts
    steps = [r["step"] for r in _records(out) if "loss" in r]
    assert ckpts[0].name == f"step-{max(steps)}", (ckpts, steps[-3:])  # the last step done, nothing half-done
    import torch

    state = torch.load(ckpts[0] / "train_state.pt", map_location="cpu", weights_only=True)
    assert state["loader"]["epoch"] == 0 and state["loader"]["offset"] > 0  # the data position of that step
    # the resumed run goes on from there (with a nearer end) and finishes
    assert run_train(small, out, max(steps) + 2, "--train.eval_every=0", "--train.batch_size=32",
                     "--train.resume_override=train.max_steps") == 0
    assert (out / "COMPLETED").exists()


def test_a_signal_during_an_evaluation_cuts_it_short_and_saves(small, tmp_path):
    out = tmp_path / "run"
    args = train_args(small, out, 50, "--train.eval_every=2", "--train.eval_batches=20", "--train.save_every=0")
    rc, output, dt = stop_inside("eval:2", "alum_pretrain.train", args, signal.SIGTERM, tmp_path)
    # 20 batches at 1 s each: the evaluation alone would take 20 s; it looks at the flag before each batch
    assert rc == 0 and dt < 15, (rc, dt, output[-3000:])
    assert "SIGTERM received during evaluation" in output, output[-3000:]
    recs = _records(out)
    valid = [r["step"] for r in recs if r.get("kind") == "valid"]
    assert valid == [0], valid  # the baseline is logged; the cut evaluation at step 2 is not
    assert [c.name for c in out.glob("checkpoints/step-*")] == ["step-2"]


def test_a_signal_during_an_export_leaves_no_temporary_folder(small, tmp_path):
    run = tmp_path / "run"
    assert run_train(small, run, 2, "--train.eval_every=0") == 0
    dest = tmp_path / "exports" / "hf"
    rc, output, dt = stop_inside("export", "alum_pretrain.export", [str(run), str(dest)], signal.SIGTERM, tmp_path)
    assert rc == 128 + signal.SIGTERM and dt < 15, (rc, dt, output[-3000:])
    assert "alum-export: stopped: SIGTERM received" in output, output[-2000:]
    assert not dest.exists() and list(dest.parent.iterdir()) == [], list(dest.parent.iterdir())


def test_ctrl_c_during_a_prep_with_workers_stops_the_pool_and_leaves_no_tmp(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Document {d}. " + " ".join(f"Sentence {i} of document {d} has words."
                                                                  for i in range(20)) for d in range(600)))
    out = tmp_path / "data-bin"
    args = [str(corpus), "--format=text", f"--out={out}", "--train-tokenizer=wordpiece", "--vocab-size=300",
            "--workers=2", "--no-progress"]
    rc, output, dt = stop_inside("prep", "data_prep.cli", args, signal.SIGINT, tmp_path)
    assert rc == 130 and dt < 20, (rc, dt, output[-3000:])
    assert "alum-prep: stopped: SIGINT received" in output and "re-run the same command" in output, output[-2000:]
    assert not list(tmp_path.rglob("*.tmp")), list(tmp_path.rglob("*.tmp"))
    import json  # what is kept is the resume state: a manifest that does not say complete

    assert json.loads((out / "manifest.json").read_text()).get("status") != "complete"


def test_a_signal_during_a_smoothness_evaluation_stops_without_logging_it(small, tmp_path):
    out = tmp_path / "run"
    args = train_args(small, out, 50, "--train.eval_every=10", "--train.smooth_every=1", "--train.smooth_batches=20")
    rc, output, dt = stop_inside("smooth", "alum_pretrain.train", args, signal.SIGTERM, tmp_path)
    assert rc == 0 and dt < 15, (rc, dt, output[-3000:])  # 20 batches at 1 s: the pass would take 20 s
    assert "SIGTERM received during smoothness evaluation" in output, output[-3000:]
    assert not [r for r in _records(out) if r.get("kind") == "valid"]  # the baseline's record was cut
    assert not list(out.glob("checkpoints/step-*"))  # before the first step: nothing to save


def test_a_signal_during_finetuning_keeps_the_last_epoch_and_exits_143(tmp_path, bert_vocab):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    import torch

    model = tmp_path / "tiny"
    tok = BertTokenizerFast(vocab_file=str(bert_vocab), do_lower_case=True)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(model)
    tok.save_pretrained(model)
    rows = "\n".join(f"{s}\t{y}" for s, y in [("a great film", 1), ("a dull mess", 0)] * 4)
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + rows + "\n")
    out = tmp_path / "ft"
    args = [f"--model={model}", "--task=sst2", f"--train={tmp_path / 'train.tsv'}", f"--dev={tmp_path / 'train.tsv'}",
            f"--out={out}", "--optim.epochs=3", "--optim.batch_size=4", "--data.max_length=32",
            "--run.progress=false"]
    rc, output, dt = stop_inside("finetune:1", "alum_pretrain.finetune.cli", args, signal.SIGTERM, tmp_path)
    assert rc == 128 + signal.SIGTERM and dt < 15, (rc, dt, output[-3000:])  # a step would take 30 s
    assert "alum-finetune: stopped: SIGTERM received" in output and "checkpoint.pt" in output, output[-2000:]
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 0  # the finished epoch; the interrupted one is redone on resume
    assert not list(tmp_path.rglob("*.tmp")) and not list(out.glob(".*")), list(out.iterdir())


def test_the_suite_has_a_per_test_timeout(pytestconfig):
    assert float(pytestconfig.getini("timeout")) > 0  # pyproject.toml: a hanging test fails with a traceback


def test_alum_launch_local_hands_sigterm_on_to_the_run(tmp_path):
    import os
    import threading

    from launch.cli import run_forwarding_stop_signals

    up = tmp_path / "up"
    child = [sys.executable, "-c", "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(7)); "
             "open(sys.argv[1], 'w').close(); time.sleep(120)", str(up)]

    def stop_the_launcher():
        deadline = time.time() + 60
        while not up.exists() and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler stops the launcher

    threading.Thread(target=stop_the_launcher, daemon=True).start()
    t0 = time.time()
    assert run_forwarding_stop_signals(child) == 7 and time.time() - t0 < 60


@pytest.mark.multirank
def test_a_signal_to_one_rank_while_an_epoch_is_planned_stops_both_ranks_together(small, tmp_path):
    """2 ranks (gloo): SIGUSR1 reaches rank 1 only, inside the planning of epoch 1.  The ranks look at the
    flag together at each planning chunk, so both stop there, save the last step and exit 0 (torchrun too)."""
    import os

    out, stamp = tmp_path / "run", tmp_path / "inside"
    args = train_args(small, out, 500, "--train.eval_every=0", "--train.save_every=0", "--train.batch_size=16")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(PROBE),
           "planning:1", str(stamp), "alum_pretrain.train", *args]
    proc = subprocess.Popen(cmd, env=subprocess_env(), cwd=str(ROOT), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not stamp.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert stamp.exists(), proc.communicate(timeout=60)[0][-3000:] if proc.poll() is not None else "timed out"
        workers = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True,
                                 timeout=60).stdout.split()
        assert len(workers) == 2, workers
        rank1 = next(int(w) for w in workers if "LOCAL_RANK=1" in Path(f"/proc/{w}/environ").read_bytes()
                     .decode(errors="replace").split("\0"))
        t0 = time.time()
        os.kill(rank1, signal.SIGUSR1)
        output, _ = proc.communicate(timeout=180)
        dt = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    # rank 0 alone would plan for 56 s (28 documents at 2 s); without the collective look rank 1 would stop
    # alone and the two ranks would meet in different collectives
    assert proc.returncode == 0 and dt < 30, (proc.returncode, dt, output[-3000:])
    ckpts = sorted(out.glob("checkpoints/step-*"))
    steps = [r["step"] for r in _records(out) if "loss" in r]
    assert [c.name for c in ckpts] == [f"step-{max(steps)}"] and not list(out.glob("checkpoints/*.tmp"))


def test_the_stop_flag_its_collective_look_and_the_exit_codes():
    import os

    from alum_pretrain import stopping

    with stopping.handlers(stopping.record):
        stopping.poll("planning")  # nothing received: goes on
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stopping.requested() == signal.SIGUSR1
        with pytest.raises(stopping.StopRequested) as exc:
            stopping.poll("data planning")
        assert exc.value.exit_code == 138 and str(exc.value) == "SIGUSR1 received during data planning"
    assert stopping.requested() is None  # the note ends with the command
    asked = []
    stopping.set_poll(lambda flag: asked.append(flag) or True)  # another rank received one
    try:
        with pytest.raises(stopping.StopRequested, match="another rank's stop signal received during x"):
            stopping.poll("x")
    finally:
        stopping.set_poll(None)
    assert asked == [False]
    with pytest.raises(stopping.StopRequested) as exc, stopping.raising():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # interrupted at once
    assert exc.value.exit_code == 143 and isinstance(exc.value, BaseException) and not isinstance(exc.value, Exception)


def test_a_signal_during_a_checkpoint_save_stops_right_after_it(small, tmp_path):
    out = tmp_path / "run"
    args = train_args(small, out, 50, "--train.eval_every=0", "--train.save_every=2")
    rc, output, dt = stop_inside("save", "alum_pretrain.train", args, signal.SIGTERM, tmp_path)
    assert rc == 0 and dt < 30, (rc, dt, output[-3000:])
    assert "SIGTERM received: saved step 2" in output, output[-3000:]
    # the save finished (atomic), and no further step was taken
    assert [c.name for c in out.glob("checkpoints/step-*")] == ["step-2"] and not list(out.glob("checkpoints/*.tmp"))
    assert max(r["step"] for r in _records(out) if "loss" in r) == 2
