"""Engine tests (alum-train): the step against HF's full-logit loss, split invariance, the LR schedule,
a tiny end-to-end run, resume == uninterrupted, gradient accumulation, SIGTERM, config checks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine_helpers import (ROOT, final_weights, make_stdlib_databin, max_weight_diff, read_log, run_train,
                            subprocess_env, train_args)



pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


@pytest.fixture(scope="module")
def databin(tmp_path_factory) -> Path:
    return make_stdlib_databin(tmp_path_factory.mktemp("engine") / "data-bin")


def _batch(databin, batch_size=8, seq=32, seed=3):
    from alum_pretrain.data.databin import DataBin
    from alum_pretrain.data import build_loader, build_token_tables

    tables = build_token_tables(DataBin(databin))
    loader = build_loader(str(databin), "train", mode="pairs", nsp=True, max_seq_len=seq, batch_size=batch_size,
                          seed=seed, pad_to_max_len=True, tables=tables)
    return next(iter(loader)), tables


def _tiny_model(databin, dropout=0.0):
    from alum_pretrain import models as M
    from alum_pretrain.data.databin import DataBin

    torch.manual_seed(0)
    return M.build_model(databin=DataBin(databin), preset="tiny", nsp=True, dropout=dropout)


# ------------------------------------------------------------------------------------------------
# The step, against independent references
# ------------------------------------------------------------------------------------------------


def test_step_loss_equals_hf_full_logit_loss(databin):
    """Masked-only head + global normalisation == HF BertForPreTraining's loss (full logits, mean CE + NSP)."""
    from alum_pretrain.adversarial import ALUMConfig
    from alum_pretrain.engine.step import Masker, PretrainStep
    from alum_pretrain.masking import MaskingConfig

    raw, tables = _batch(databin)
    model = _tiny_model(databin)
    b = Masker(MaskingConfig(), tables.mask_id, tables.random_pool, seed=1)(raw, 0.15, 0, torch.arange(8))
    step = PretrainStep(model, ALUMConfig(alpha=0.0), nsp=True)
    loss, metrics = step(b, alum_on=False, mlm_denom=float(b["n_masked"]), nsp_denom=8.0)
    # Independent reference: HF's own forward with labels (full (B, T, V) logits).
    ref = model.hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"],
                   labels=b["labels"], next_sentence_label=b["next_sentence_label"])
    assert abs(float(loss.detach()) - float(ref.loss.detach())) < 1e-5
    g1 = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    g2 = torch.autograd.grad(ref.loss, list(model.parameters()), allow_unused=True)
    for a, c in zip(g1, g2):
        if a is not None or c is not None:
            assert torch.allclose(a, c, atol=1e-6, rtol=1e-4)


def test_masking_and_loss_do_not_depend_on_the_split(databin):
    """Two halves with global denominators == the whole batch: masks, loss, ALUM term and gradients."""
    from alum_pretrain.adversarial import ALUMConfig
    from alum_pretrain.engine.step import Masker, PretrainStep
    from alum_pretrain.masking import STREAM_ALUM, sample_generators
    from alum_pretrain.masking import MaskingConfig

    raw, tables = _batch(databin)
    masker = Masker(MaskingConfig(), tables.mask_id, tables.random_pool, seed=5)
    whole = masker(raw, 0.2, 7, torch.arange(8))
    halves = [masker({k: (v[s] if torch.is_tensor(v) else v) for k, v in raw.items()}, 0.2, 7, torch.arange(8)[s])
              for s in (slice(0, 4), slice(4, 8))]
    assert torch.equal(whole["input_ids"], torch.cat([h["input_ids"] for h in halves]))
    assert torch.equal(whole["labels"], torch.cat([h["labels"] for h in halves]))

    model = _tiny_model(databin, dropout=0.0)  # dropout draws would differ between one call and two
    alum = ALUMConfig(alpha=10.0, epsilon=1e-2, step_size=1e-1, noise_std=1e-2)  # large: a visible R
    step = PretrainStep(model, alum, nsp=True)
    N = float(whole["n_masked"])

    def run(b):
        gens = sample_generators(9, 7, b["sample_ids"], STREAM_ALUM)
        loss, m = step(b, alum_on=True, mlm_denom=N, nsp_denom=8.0, alum_generators=gens)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        return loss.detach(), m, grads

    lw, mw, gw = run(whole)
    parts = [run(h) for h in halves]
    assert mw["adv"] > 1e-6
    assert abs(float(lw) - sum(float(p[0]) for p in parts)) < 1e-5 * max(1.0, abs(float(lw)))
    for key in ("mlm", "nsp", "adv"):
        assert abs(float(mw[key]) - sum(float(p[1][key]) for p in parts)) < 1e-5 * max(1.0, float(mw[key]))
    for i, g in enumerate(gw):
        gs = parts[0][2][i] + parts[1][2][i]
        assert torch.allclose(g, gs, atol=1e-5, rtol=1e-3)


def test_global_batch_must_divide():
    from alum_pretrain.engine.config import LoopConfig, resolve_grad_accum

    assert resolve_grad_accum(LoopConfig(batch_size=4, global_batch_size=32), 2) == (4, 32)
    assert resolve_grad_accum(LoopConfig(batch_size=4, grad_accum=3), 2) == (3, 24)
    with pytest.raises(ValueError, match="global_batch_size.*batch_size"):
        resolve_grad_accum(LoopConfig(batch_size=4, global_batch_size=30), 2)


def test_config_errors_name_the_flag():
    from alum_pretrain.engine.config import DataConfig, OptimConfig

    with pytest.raises(ValueError, match="--optim.lr"):
        OptimConfig(lr=0.0)
    with pytest.raises(ValueError, match="--data.nsp"):
        DataConfig(mode="blocks", nsp=True)


# ------------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------------


def test_tiny_end_to_end_run(databin, tmp_path):
    out = tmp_path / "run"
    steps, start = 30, 15
    assert run_train(databin, out, steps, f"--alum.start_step={start}", "--train.eval_every=15",
                     "--alum.epsilon=1e-3", "--alum.noise_std=1e-3") == 0
    recs = read_log(out)
    assert [r["step"] for r in recs] == list(range(1, steps + 1))
    for r in recs:
        for key in ("step", "loss", "mlm", "nsp", "adv", "mask_rate", "lr", "grad_norm", "tokens_per_s"):
            assert key in r, key
    # logged step s covers optimizer step s-1 (0-based): ALUM from step index `start` on.
    assert all(r["adv"] == 0 for r in recs if r["step"] <= start)
    assert all(r["adv"] > 0 for r in recs if r["step"] > start)
    # curriculum: 5 % .. 25 % in five equal phases (independent formula)
    for r in recs:
        assert r["mask_rate"] == pytest.approx([0.05, 0.10, 0.15, 0.20, 0.25][(r["step"] - 1) * 5 // steps])
    # the LR: linear warm-up over ceil(0.1 * 30) = 3 steps to 1e-3, then linear decay to 0 (paper Sec. 4.2)
    for r in recs:
        s = r["step"] - 1
        want = 1e-3 * ((s + 1) / 3 if s < 3 else (steps - s) / (steps - 3))
        assert r["lr"] == pytest.approx(want, rel=1e-6)
    first = sum(r["mlm"] for r in recs[:5]) / 5
    last = sum(r["mlm"] for r in recs[-5:]) / 5
    assert last < first - 0.3, (first, last)
    valid = read_log(out, "valid")
    assert [v["step"] for v in valid] == [0, 15, 30]
    assert valid[-1]["valid_mlm"] < valid[0]["valid_mlm"]
    assert (out / "plot.png").stat().st_size > 10_000
    assert json.loads((out / "COMPLETED").read_text())["step"] == steps
    assert any((out / "tb").iterdir())
    ck = out / "checkpoints" / f"step-{steps}"
    assert (ck / "model" / "config.json").exists() and (ck / "train_state.pt").exists()
    assert (out / "config.yaml").exists()


def test_resume_equals_uninterrupted(databin, tmp_path):
    """Split at step 6: the resumed run crosses a mask-rate phase boundary (7) and the ALUM start (8).
    Dropout is on (0.1), so this also checks the restored RNG states.  Bit-identical: same process, same
    thread count (engine_helpers.THREADS); the loader worker only reads integers."""
    args = ("--alum.start_step=8", "--alum.epsilon=1e-3", "--alum.noise_std=1e-3", "--train.eval_every=0",
            "--train.keep_last=5")
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_train(databin, a, 16, *args) == 0
    # b also loads data in a worker process: num_workers is speed-only (same data, same dropout stream)
    assert run_train(databin, b, 16, *args, "--train.save_every=6", "--train.num_workers=1") == 0
    # "interrupt" b after step 6: drop everything it did later, then resume
    import shutil

    for s in (12, 16):
        shutil.rmtree(b / "checkpoints" / f"step-{s}")
    (b / "COMPLETED").unlink()
    assert run_train(databin, b, 16, *args, "--train.save_every=6", "--train.num_workers=1") == 0
    wa, wb = final_weights(a), final_weights(b)
    assert max_weight_diff(wa, wb) == 0.0
    la = {r["step"]: r for r in read_log(a)}
    lb = read_log(b)  # steps 7..16 of the first go were dropped on resume and logged again
    assert [r["step"] for r in lb] == list(range(1, 17))
    for r in lb:
        for key in ("loss", "mlm", "nsp", "adv", "grad_norm"):
            assert r[key] == la[r["step"]][key], (r["step"], key)


def test_resume_error_message_names_the_key(databin, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_train(databin, out, 3, "--train.eval_every=0") == 0
    assert run_train(databin, out, 3, "--train.eval_every=0", "--optim.lr=5e-4") == 2
    err = capsys.readouterr().err
    assert "--optim.lr" in err and "0.001" in err
    # speed-only keys may change: the finished run is recognised and nothing is redone
    assert run_train(databin, out, 3, "--train.eval_every=0", "--train.num_workers=1", "--train.log_every=2") == 0
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]


def test_grad_accum_equals_big_batch(databin, tmp_path):
    """Batch 8 = 4 x 2 accumulation = 2 x 4 (``global_batch_size``), within float rounding, not bit for bit.

    Masks, ALUM noise (keyed by step and sample) and the loss normalisers (global counts) do not depend on the
    split; what does is the order in which per-sample gradients are summed (one matmul over 8 rows vs partial
    sums added), so float32 rounding differs.  Measured over 13 data variants (orders of the test's ids):
    weights <= 1.2e-6 apart, loss / mlm / nsp / grad_norm rel <= 2.1e-7, adv (a 3e-5 KL taken from
    log-probability differences, hence coarser) rel <= 4.4e-6; the bounds below keep a 10-20x margin."""
    common = ("--model.dropout=0", "--alum.start_step=3", "--alum.epsilon=1e-3", "--alum.noise_std=1e-3",
              "--train.eval_every=0")
    big, acc, glob = tmp_path / "big", tmp_path / "acc", tmp_path / "glob"
    assert run_train(databin, big, 6, *common, "--train.batch_size=8") == 0
    assert run_train(databin, acc, 6, *common, "--train.batch_size=4", "--train.grad_accum=2") == 0
    assert run_train(databin, glob, 6, *common, "--train.batch_size=2", "--train.global_batch_size=8") == 0
    lb = read_log(big)
    for other in (acc, glob):
        lo = read_log(other)
        for r1, r2 in zip(lb, lo):
            for key, rel in (("loss", 2e-6), ("mlm", 2e-6), ("nsp", 2e-6), ("grad_norm", 2e-6), ("adv", 1e-4)):
                assert r2[key] == pytest.approx(r1[key], rel=rel, abs=1e-12), (other.name, r1["step"], key)
        assert max_weight_diff(final_weights(big), final_weights(other)) < 1e-5


def test_sigterm_saves_and_exits_0_then_resume_completes(databin, tmp_path):
    out = tmp_path / "run"
    steps = 100
    args = train_args(databin, out, steps, "--train.eval_every=0", "--train.save_every=0")
    env = subprocess_env()
    proc = subprocess.Popen([sys.executable, "-m", "alum_pretrain.train", *args], env=env, cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate(timeout=60)[0]
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and not ckpts[0].name.endswith(".tmp"), ckpts
    stopped_at = int(ckpts[0].name.split("-")[1])
    assert 3 <= stopped_at < steps
    assert not (out / "COMPLETED").exists()
    # resume with fewer remaining steps is a config change; the same command finishes the run
    proc2 = subprocess.run([sys.executable, "-m", "alum_pretrain.train", *args], env=env, cwd=str(ROOT),
                           capture_output=True, text=True, timeout=600)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    assert "resumed from" in proc2.stderr
    assert json.loads((out / "COMPLETED").read_text())["step"] == steps
    steps_logged = [r["step"] for r in read_log(out)]
    assert steps_logged == list(range(1, steps + 1))  # nothing lost, nothing repeated


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    from alum_pretrain.engine import checkpoint as C

    def fake_model(d: Path):
        d.mkdir()
        (d / "config.json").write_text("{}")

    # a save killed half-way leaves only a .tmp folder: never picked up for resume
    (tmp_path / "checkpoints" / "step-9.tmp" / "model").mkdir(parents=True)
    assert C.latest_checkpoint(tmp_path) is None
    for s in (2, 4, 6, 8):
        C.save_checkpoint(tmp_path, s, fake_model, {"step": s}, keep_last=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-6", "step-8"]  # pruned to the newest two; the stale .tmp removed
    assert C.latest_checkpoint(tmp_path).name == "step-8"
    assert C.load_state(C.latest_checkpoint(tmp_path))["step"] == 8
    # a checkpoint folder without train_state.pt is incomplete: ignored
    (tmp_path / "checkpoints" / "step-10" / "model").mkdir(parents=True)
    assert C.latest_checkpoint(tmp_path).name == "step-8"


@pytest.mark.parametrize("extra", [
    ("--train.precision=bf16",),
    ("--train.precision=fp16",),  # autocast + the dynamic GradScaler path
    ("--alum.perturb_at=embedding_output",),
    ("--data.mode=blocks", "--data.nsp=false", "--masking.whole_word=true"),
], ids=["bf16", "fp16", "embedding_output", "blocks_wwm"])
def test_variants_train(databin, tmp_path, extra):
    out = tmp_path / "run"
    assert run_train(databin, out, 3, "--alum.start_step=1", "--train.eval_every=0", *extra) == 0
    recs = read_log(out)
    assert len(recs) == 3
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    assert recs[0]["adv"] == 0 and recs[-1]["adv"] > 0
    if "--data.nsp=false" in extra:
        assert all(r["nsp"] == 0 for r in recs)


def test_the_loop_asks_the_stepper_not_the_engine():
    """train() and its loop never branch on the engine: the run's stepper (DDP or DeepSpeed) does the engine's
    half."""
    import ast
    import inspect
    import textwrap
    from types import SimpleNamespace

    from alum_pretrain import train as T
    from alum_pretrain.engine import distributed as D
    from alum_pretrain.engine.stepper import DDPStepper, DeepSpeedStepper, make_stepper

    tree = ast.parse(textwrap.dedent(inspect.getsource(T.train)) + textwrap.dedent(inspect.getsource(T.loop)))
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    used |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert not used & {"engine", "DDP", "no_sync", "scaler", "DS", "optimizer", "scheduler"}
    assert {"forward_backward", "optimizer_step"} <= used
    run = SimpleNamespace(engine=None, env=D.DistEnv(), amp_dtype=None)
    assert type(make_stepper(run)) is DDPStepper
    run.engine = object()
    assert type(make_stepper(run)) is DeepSpeedStepper
