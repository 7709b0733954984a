"""What ALUM does, seen from a training run: adv_share and its one-time warning, the eval-mode smoothness in
the validation records, the adversarial passes' dropout modes / R-Drop / relative epsilon through the native
engine, and training mode from the first step of a continual run."""

from __future__ import annotations

import pytest
import torch

from engine_helpers import make_stdlib_databin, read_log, run_train

pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


@pytest.fixture(scope="module")
def databin(tmp_path_factory):
    return make_stdlib_databin(tmp_path_factory.mktemp("measured") / "db", n_docs=60, vocab_size=600)


def warnings_of(out):
    return [r["message"] for r in read_log(out, "warning")]


def test_delta_share_warning_fires_at_the_papers_epsilon_with_dropout(databin, tmp_path):
    out = tmp_path / "paper"
    # ALUM from step 3, logs every 2 steps: the probe covers steps 3..5 (the partial interval and the next)
    assert run_train(databin, out, 8, "--alum.start_step=3", "--train.log_every=2", "--train.eval_every=0") == 0
    recs = {r["step"]: r for r in read_log(out)}
    assert recs[4]["adv_share"] < 0.01 and recs[6]["adv_share"] < 0.01  # epsilon 1e-5: delta adds ~nothing
    assert recs[4]["adv_dropout"] > 0 and "adv_dropout" not in recs[8]  # probed, then off (log_baseline off)
    assert recs[8]["adv"] > 0
    (msg,) = warnings_of(out)
    assert "dropout consistency" in msg and "--alum.scale rel" in msg and "alum.epsilon=1e-05" in msg


def test_no_warning_at_a_relative_epsilon_that_moves_the_model(databin, tmp_path):
    out = tmp_path / "rel"
    assert run_train(databin, out, 6, "--alum.start_step=2", "--train.log_every=2", "--train.eval_every=0",
                     "--alum.scale=rel", "--alum.epsilon=0.3", "--alum.step_size=0.3", "--alum.noise_std=0.01",
                     "--alum.log_baseline=true") == 0
    recs = read_log(out)
    shares = [r["adv_share"] for r in recs if "adv_share" in r]
    assert len(shares) == 2 and min(shares) > 0.05  # logged at every ALUM interval with log_baseline on
    assert warnings_of(out) == []


def test_shared_dropout_runs_and_its_share_is_all_delta(databin, tmp_path):
    out = tmp_path / "shared"
    assert run_train(databin, out, 4, "--alum.adv_dropout=shared", "--alum.log_baseline=true",
                     "--train.eval_every=0") == 0
    recs = read_log(out)
    assert all(r["adv_dropout"] == 0.0 and r["adv_share"] == 1.0 and r["adv"] > 0 for r in recs)
    # the model card names the setting and the measured delta share
    from alum_pretrain.export import export

    export(out, tmp_path / "hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "adversarial-pass dropout shared" in card and "due to delta (not dropout): 100 %" in card


@pytest.mark.parametrize("extra", [("--alum.adv_dropout=off",), ("--alum.objective=rdrop",)])
def test_off_and_rdrop_run_in_the_native_engine(databin, tmp_path, extra):
    out = tmp_path / "run"
    assert run_train(databin, out, 3, "--train.eval_every=0", *extra) == 0
    recs = read_log(out)
    assert all(r["adv"] > 0 and r["loss"] == pytest.approx(r["mlm"] + r["nsp"] + 10 * r["adv"], rel=1e-5)
               for r in recs)
    if "--alum.objective=rdrop" in extra:
        assert all(r["delta_linf"] == 0.0 for r in recs)


def test_smoothness_in_the_validation_records(databin, tmp_path):
    out = tmp_path / "smooth"
    assert run_train(databin, out, 4, "--train.eval_every=2", "--train.smooth_every=2",
                     "--train.smooth_eps=1e-5,1e-3", "--train.smooth_batches=1") == 0
    valid = {r["step"]: r for r in read_log(out, "valid")}
    assert sorted(valid) == [0, 2, 4]
    for step in (0, 4):  # the first evaluation, then every 2nd (step 2 is the 2nd) and the last
        r = valid[step]
        assert r["smooth_adv_kl_eps1e-05"] > r["smooth_rand_kl_eps1e-05"] > 0
        assert r["smooth_adv_kl_eps0.001"] > r["smooth_adv_kl_eps1e-05"]
        assert r["smooth_entropy"] > 0
    assert "smooth_adv_kl_eps1e-05" not in valid[2]


def test_smoothness_knobs_are_validated():
    from alum_pretrain.engine.config import LoopConfig

    with pytest.raises(ValueError, match="train.smooth_eps"):
        LoopConfig(smooth_eps="1e-5,abc")
    with pytest.raises(ValueError, match="train.smooth_eps"):
        LoopConfig(smooth_eps="-1")


def test_a_continual_model_trains_in_training_mode_also_after_resume(databin, tmp_path):
    """HF from_pretrained returns eval mode: the run must switch training mode on itself (dropout), also when a
    resumed run never evaluates before its first step."""
    from alum_pretrain.engine import distributed as D
    from alum_pretrain.engine.config import TrainConfig
    from alum_pretrain.engine.setup import build_run
    from alum_pretrain.config import parse_config
    from alum_pretrain.models import save_model, build_scratch_model

    from alum_pretrain.data.databin import DataBin

    db = DataBin(databin)
    init = tmp_path / "init"
    hf = build_scratch_model("tiny", db.vocab_size, db.special_ids["pad"], nsp=False)
    hf.eval()
    save_model(hf, init)
    from engine_helpers import train_args

    cfg = parse_config(TrainConfig, train_args(databin, tmp_path / "run", 2, f"--model.init_from={init}",
                                               "--data.nsp=false", "--train.eval_every=0"))
    run = build_run(cfg, D.setup("cpu"))
    assert all(m.training for m in run.model.modules())
