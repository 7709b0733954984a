"""Fault injection, native engine: kill -9 at each point of a run, damaged checkpoint files, NaN runs.

Every case ends in an exact outcome: the resumed run's final weights and logged losses are bit-identical
to an uninterrupted run's and its log holds every step once; or a fallback to the named previous checkpoint;
or an error naming the file and the reason.  Seeded (train.seed=1), tiny preset, 6 steps, every run (in this
process or a child) with ``engine_helpers.THREADS`` intra-op threads: another thread count rounds float
reductions differently (1 vs 2 threads: 1.0e-6 apart after these 6 steps).
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine_helpers import (ROOT, final_weights, make_stdlib_databin, max_weight_diff, read_log, run_train,
                            subprocess_env, train_args)

STEPS = 6
ARGS = ("--train.save_every=2", "--train.eval_every=0", "--alum.start_step=3", "--alum.epsilon=1e-3",
        "--alum.noise_std=1e-3")


pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


@pytest.fixture(scope="module")
def databin(tmp_path_factory) -> Path:
    return make_stdlib_databin(tmp_path_factory.mktemp("faults") / "data-bin")


@pytest.fixture(scope="module")
def reference(databin, tmp_path_factory) -> Path:
    """The uninterrupted run (checkpoints step-2, step-4, step-6 kept)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert run_train(databin, out, STEPS, *ARGS, "--train.keep_last=3") == 0
    return out


def _assert_same_as_reference(out: Path, reference: Path) -> None:
    assert json.loads((out / "COMPLETED").read_text())["step"] == STEPS
    # bit-identical: a checkpoint holds every state the step depends on (weights, AdamW moments, LR schedule,
    # loss scale, data position, python/numpy/torch RNG states; masks and ALUM noise are keyed by step and
    # sample) and both runs use the same thread count; one lost or repeated step would move weights by ~1e-3
    diff = max_weight_diff(final_weights(out), final_weights(reference))
    assert diff == 0.0, f"resumed weights differ from the uninterrupted run's by up to {diff:.3g}"
    assert [r["step"] for r in read_log(out)] == list(range(1, STEPS + 1))  # nothing lost, nothing twice
    ref = {r["step"]: r for r in read_log(reference)}
    for r in read_log(out):
        for key in ("loss", "mlm", "nsp", "adv", "grad_norm", "lr"):
            assert r[key] == ref[r["step"]][key], (r["step"], key)


def _interrupted_copy(reference: Path, tmp_path: Path, keep_upto: int) -> Path:
    """The reference run as if killed right after checkpoint ``keep_upto``."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "COMPLETED").unlink()
    for p in (out / "checkpoints").glob("step-*"):
        if int(p.name.split("-")[1]) > keep_upto:
            shutil.rmtree(p)
    return out


# ------------------------------------------------------------------------------------------------
# kill -9 at every point of a run, then the same command
# ------------------------------------------------------------------------------------------------

# (fault, checkpoints on disk after the kill): one run killed seven times in a row, each time at a new point,
# each restart by the same command.  save counts and forward counts are per process.
KILL_CHAIN = [
    ("forward:1", []),  # step 1, before any checkpoint
    ("forward:3", ["step-2"]),  # mid-step after the first checkpoint
    ("model:1", ["step-2", "step-4.tmp"]),  # model.safetensors of step-4 half written
    ("state:1", ["step-2", "step-4.tmp"]),  # train_state.pt half written
    ("checksums:1", ["step-2", "step-4.tmp"]),  # checksums.json half written
    ("renamed:1", ["step-2", "step-4"]),  # step-4 renamed into place, step-2 not yet pruned
    ("forward:2", ["step-2", "step-4"]),  # resumed at 4: mid-step 6 (pruning waits for the next save)
]


def test_kill9_at_seven_points_then_rerun_equals_uninterrupted(databin, reference, tmp_path):
    out = tmp_path / "run"
    args = train_args(databin, out, STEPS, *ARGS, "--train.keep_last=1")
    env = subprocess_env()
    for fault, left in KILL_CHAIN:
        proc = subprocess.run([sys.executable, str(ROOT / "tests" / "fault_runner.py"), fault, "--", *args],
                              env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=300)
        assert proc.returncode == -9, (fault, proc.stderr[-2000:])  # really killed at the injection point
        ck = out / "checkpoints"
        assert (sorted(p.name for p in ck.iterdir()) if ck.exists() else []) == left, fault
        assert not (out / "COMPLETED").exists()
    assert run_train(databin, out, STEPS, *ARGS, "--train.keep_last=1") == 0
    _assert_same_as_reference(out, reference)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-6"]


def test_resume_under_another_thread_count_is_equal_within_rounding(databin, reference, tmp_path, capsys):
    """A CPU resume that is not bit-identical: one under another intra-op thread count (a requeue on a node
    with other cores, OMP_NUM_THREADS set in one job script only).  Float reductions split over 2 threads
    instead of 1 round differently; the run says so, and stays within float rounding of the uninterrupted one
    (1 vs 2 threads for all 6 steps: 1.0e-6 measured; one lost or repeated step moves ~1e-3)."""
    out = _interrupted_copy(reference, tmp_path, keep_upto=2)
    assert run_train(databin, out, STEPS, *ARGS, "--train.keep_last=3", threads=2) == 0
    assert "intra-op threads changed (1 when saved -> 2 now)" in capsys.readouterr().err
    assert max_weight_diff(final_weights(out), final_weights(reference)) <= 1e-5
    assert [r["step"] for r in read_log(out)] == list(range(1, STEPS + 1))
    ref = {r["step"]: r["loss"] for r in read_log(reference)}
    for r in read_log(out):
        assert r["loss"] == pytest.approx(ref[r["step"]], rel=1e-5)


# ------------------------------------------------------------------------------------------------
# damaged checkpoint files: fall back to the previous checkpoint, name the file and the reason
# ------------------------------------------------------------------------------------------------

def _truncate(p: Path) -> None:
    with open(p, "r+b") as fh:
        fh.truncate(p.stat().st_size // 2)


def _bitflip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    i = len(data) * 2 // 3  # inside the payload (tensor data / the zip's records), not only a header
    data[i] ^= 0x10
    p.write_bytes(bytes(data))


CHECKPOINT_FILES = ["model/model.safetensors", "model/config.json", "train_state.pt", "checksums.json"]


@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
@pytest.mark.parametrize("rel", CHECKPOINT_FILES)
def test_damaged_newest_checkpoint_falls_back(databin, reference, tmp_path, capsys, rel, damage):
    out = _interrupted_copy(reference, tmp_path, keep_upto=4)
    bad = out / "checkpoints" / "step-4" / rel
    (_truncate if damage == "truncate" else _bitflip)(bad)
    assert run_train(databin, out, STEPS, *ARGS, "--train.keep_last=3") == 0
    err = capsys.readouterr().err
    assert f"checkpoint {out / 'checkpoints' / 'step-4'} is unusable" in err
    assert str(bad) in err or (rel == "checksums.json" and "checksums.json" in err), err[-2000:]
    assert "unreadable" in err or "bytes" in err or "does not match" in err  # the reason
    assert "resumed from" in err and "step-2 at step 2" in err
    _assert_same_as_reference(out, reference)


def test_checkpoint_without_checksums_is_still_checked_by_format(databin, reference, tmp_path, capsys):
    """A checkpoint from before checksums existed: a truncated safetensors is caught by its header check."""
    out = _interrupted_copy(reference, tmp_path, keep_upto=4)
    for p in (out / "checkpoints").glob("step-*/checksums.json"):
        p.unlink()
    _truncate(out / "checkpoints" / "step-4" / "model" / "model.safetensors")
    assert run_train(databin, out, STEPS, *ARGS) == 0
    err = capsys.readouterr().err
    assert "model.safetensors: unreadable" in err and "step-2 at step 2" in err
    _assert_same_as_reference(out, reference)


def _rewrite_checksums(step: Path) -> None:
    from alum_pretrain.integrity import write_checksums

    write_checksums(step)


def test_nan_weights_on_disk_with_valid_checksums_fall_back(databin, reference, tmp_path, capsys):
    """Weights garbled to NaN and the sums recomputed (so only the finiteness check can notice)."""
    from safetensors.torch import load_file, save_file

    out = _interrupted_copy(reference, tmp_path, keep_upto=4)
    step4 = out / "checkpoints" / "step-4"
    f = step4 / "model" / "model.safetensors"
    w = load_file(str(f))
    key = sorted(w)[0]
    w[key] = torch.full_like(w[key], float("nan"))
    save_file(w, str(f), metadata={"format": "pt"})
    _rewrite_checksums(step4)
    assert run_train(databin, out, STEPS, *ARGS) == 0
    err = capsys.readouterr().err
    assert f"weight {key} holds NaN/Inf" in err and "step-2 at step 2" in err
    _assert_same_as_reference(out, reference)


def test_every_checkpoint_damaged_is_an_error_naming_each(databin, reference, tmp_path, capsys):
    out = _interrupted_copy(reference, tmp_path, keep_upto=4)
    for s in (2, 4):
        _truncate(out / "checkpoints" / f"step-{s}" / "train_state.pt")
    assert run_train(databin, out, STEPS, *ARGS) == 2
    err = capsys.readouterr().err
    assert "no intact checkpoint to resume from" in err
    for s in (2, 4):
        assert str(out / "checkpoints" / f"step-{s}" / "train_state.pt") in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]  # nothing deleted


class _Evil:
    """Unpickling calls ``Path.touch(marker)``: the stand-in for arbitrary code in a pickle."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_malicious_train_state_is_refused_and_does_not_run(databin, reference, tmp_path, capsys):
    out = _interrupted_copy(reference, tmp_path, keep_upto=4)
    step4 = out / "checkpoints" / "step-4"
    marker = tmp_path / "PWNED"
    state = torch.load(step4 / "train_state.pt", weights_only=True)
    state["evil"] = _Evil(str(marker))
    torch.save(state, step4 / "train_state.pt")
    _rewrite_checksums(step4)  # a consistent, deliberately crafted checkpoint
    assert run_train(databin, out, STEPS, *ARGS) == 0
    err = capsys.readouterr().err
    assert not marker.exists()  # the pickle's code never ran
    assert "refused to load" in err and "--train.trust_checkpoint=true" in err and "step-2 at step 2" in err
    _assert_same_as_reference(out, reference)
    # the raw pickle really would run the code
    pickle.loads(pickle.dumps(_Evil(str(marker))))
    assert marker.exists()


# ------------------------------------------------------------------------------------------------
# non-finite training: skipped, counted, stopped; never checkpointed
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_nan_from_huge_lr_stops_with_the_last_good_checkpoint(databin, tmp_path, capsys, precision):
    out = tmp_path / "run"
    rc = run_train(databin, out, 30, "--optim.lr=1e6", "--optim.warmup_ratio=0", "--train.save_every=1",
                   "--train.eval_every=0", "--train.keep_last=50", f"--train.precision={precision}")
    err = capsys.readouterr().err
    assert rc == 3, err[-2000:]
    recs = read_log(out)
    last = recs[-1]["step"]
    assert last < 30 and not (out / "COMPLETED").exists()
    assert f"step {last}: the loss or gradient norm was NaN/Inf for 5 consecutive steps" in err
    ckpts = sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    assert f"the last good checkpoint is {ckpts[-1]}" in err
    assert sum(r["nonfinite_skipped"] for r in recs) >= 5
    assert all(r["nonfinite_skipped"] == 1 for r in recs[-5:])
    assert all(r["grad_norm"] is None or r["grad_norm"] == r["grad_norm"] for r in recs)  # never NaN in the log
    from alum_pretrain.engine.checkpoint import verify_checkpoint

    for ck in ckpts:  # every checkpoint written is finite and verifies
        verify_checkpoint(ck)
    # the weights did not move during the skipped steps: the last checkpoints are identical
    from safetensors.torch import load_file

    a, b = (load_file(str(c / "model" / "model.safetensors")) for c in ckpts[-2:])
    assert max_weight_diff(a, b) == 0.0


def test_save_refuses_nonfinite_weights(databin, tmp_path):
    from alum_pretrain.engine import distributed as D
    from alum_pretrain.engine.config import TrainConfig
    from alum_pretrain.config import parse_config
    from alum_pretrain.engine.checkpoint import save
    from alum_pretrain.engine.setup import build_run
    from alum_pretrain.engine.step import NonFiniteError

    cfg = parse_config(TrainConfig, train_args(databin, tmp_path / "run", 2), prog="t")
    run = build_run(cfg, D.DistEnv())
    with torch.no_grad():
        next(run.model.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"step 1: parameter .* holds NaN/Inf; no checkpoint written"):
        save(run, 1)
    run.logger.close()
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_fp16_overflow_step_is_not_logged_as_inf(databin, tmp_path):
    """A GradScaler overflow (finite loss, inf gradient) is skipped by the scaler as before, counted in
    ``overflow_skipped``, and the interval's grad_norm averages the finite steps only."""
    from alum_pretrain.engine import distributed as D
    from alum_pretrain.engine.metrics import Accumulator

    class _R:  # the parts of Run the accumulator reads
        env = D.DistEnv()
        grad_accum = 1
        peak_flops = None
        flops_per_token = 0.0
        scaler = torch.amp.GradScaler("cpu", enabled=True)

        class cfg:
            class alum:
                alpha = 1.0
                k_steps = 1

    acc = Accumulator(_R())
    batch = {"n_tokens": 10, "n_masked": 2, "n_maskable": 8, "input_ids": torch.zeros(2, 5, dtype=torch.long)}
    for gn, loss_ok, grad_ok in ((2.0, True, True), (float("inf"), True, False), (4.0, True, True),
                                 (float("nan"), False, False)):
        acc.add({"mlm": torch.tensor(1.0 if loss_ok else float("nan"))}, batch)
        acc.end_step(torch.tensor(gn), 0.15, False, 1e-4, loss_ok=loss_ok, grad_ok=grad_ok, skipped=not loss_ok)
    rec = acc.flush(4)
    assert rec["grad_norm"] == pytest.approx(3.0)  # (2 + 4) / 2: the inf and NaN steps left out
    assert rec["mlm"] == pytest.approx(1.0)  # the NaN-loss step left out of the loss mean
    assert rec["overflow_skipped"] == 1 and rec["nonfinite_skipped"] == 1


def test_alum_diagnostics_of_a_skipped_step_are_counted_but_not_averaged_into_adv_dropout():
    """An ALUM interval with one NaN-loss step: adv_dropout averages the finite steps like adv does (not
    NaN), while ascent_nonfinite / adv_nonfinite count every micro-batch and ascent_zero_grad_frac averages
    over all of them (the skipped step's diagnostics are what explains the skip)."""
    from alum_pretrain.engine import distributed as D
    from alum_pretrain.engine.metrics import Accumulator

    class _R:  # the parts of Run the accumulator reads
        env = D.DistEnv()
        grad_accum = 1
        peak_flops = None
        flops_per_token = 0.0
        scaler = torch.amp.GradScaler("cpu", enabled=False)

        class cfg:
            class alum:
                alpha = 10.0
                k_steps = 1

    acc = Accumulator(_R())
    batch = {"n_tokens": 10, "n_masked": 2, "n_maskable": 8, "input_ids": torch.zeros(2, 5, dtype=torch.long)}
    nan = float("nan")
    steps = ((True, 2e-3, 1e-3, 0.0, 0.0, 0.1), (False, nan, nan, 1.0, 1.0, 0.7), (True, 4e-3, 3e-3, 0.0, 0.0, 0.1))
    for ok, adv, adv_dropout, ascent_nonfinite, adv_nonfinite, zero_frac in steps:
        acc.add({"mlm": torch.tensor(1.0 if ok else nan), "adv": torch.tensor(adv),
                 "delta_linf": torch.tensor(1e-5), "adv_dropout": torch.tensor(adv_dropout),
                 "ascent_nonfinite": torch.tensor(ascent_nonfinite), "adv_nonfinite": torch.tensor(adv_nonfinite),
                 "ascent_zero_grad_frac": torch.tensor(zero_frac)}, batch)
        acc.end_step(torch.tensor(1.0 if ok else nan), 0.15, True, 1e-4, loss_ok=ok, grad_ok=ok, skipped=not ok)
    rec = acc.flush(3)
    assert rec["adv"] == pytest.approx(3e-3) and rec["adv_dropout"] == pytest.approx(2e-3)
    assert rec["delta_linf"] == pytest.approx(1e-5)
    assert rec["ascent_nonfinite"] == 1 and rec["adv_nonfinite"] == 1
    assert rec["ascent_zero_grad_frac"] == pytest.approx(0.3)  # (0.1 + 0.7 + 0.1) / 3
    assert rec["nonfinite_skipped"] == 1
