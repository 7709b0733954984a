"""--optim.fresh_lr_mult: tensors a continual-pre-training load initialises randomly (the MLM head of a checkpoint
that has none) get their own LR, scaled by the same warm-up/decay schedule; everything else is unchanged."""

from __future__ import annotations

import pytest
import torch

from alum_pretrain.engine.config import OptimConfig
from alum_pretrain.engine.optim import build_optimizer, build_scheduler, lr_factor, warmup_steps
from alum_pretrain.models import load_continual_model


@pytest.fixture()
def headless_bert(tmp_path):
    """A tiny HF BertModel folder (encoder only, no MLM head): what sentence-embedding checkpoints ship."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(str(tmp_path / "enc"))
    return tmp_path / "enc"


def test_fresh_head_gets_its_own_scheduled_lr(headless_bert):
    model = load_continual_model(headless_bert, nsp=False)
    fresh = {n for n, p in model.named_parameters() if getattr(p, "_alum_fresh", False)}
    assert fresh and all(n.startswith("cls.predictions.") for n in fresh)
    assert "bert.embeddings.word_embeddings.weight" not in fresh  # the tied decoder is loaded, not fresh

    cfg = OptimConfig(lr=1e-4, warmup_ratio=0.2, fresh_lr_mult=30.0)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    assert len(opt.param_groups) == 4
    ids = {id(p): n for n, p in model.named_parameters()}
    in_fresh = {ids[id(p)] for g in opt.param_groups[2:] for p in g["params"]}
    assert in_fresh == fresh
    # every trainable tensor exactly once
    all_params = [p for g in opt.param_groups for p in g["params"]]
    assert len(all_params) == len({id(p) for p in model.parameters()})
    # the schedule multiplies both LRs alike: reference = peak * (warm-up then linear decay), written out here
    sched = build_scheduler(opt, cfg, max_steps=10)
    w = warmup_steps(10, 0.2)
    for s in range(10):
        factor = (s + 1) / w if s < w else (10 - s) / (10 - w)
        assert factor == pytest.approx(lr_factor(s, 10, w))
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-4 * factor)
        assert opt.param_groups[2]["lr"] == pytest.approx(3e-3 * factor)
        assert opt.param_groups[2]["weight_decay"] == cfg.weight_decay and opt.param_groups[3]["weight_decay"] == 0.0
        opt.step()
        sched.step()


def test_mult_one_keeps_the_two_groups(headless_bert):
    model = load_continual_model(headless_bert, nsp=False)
    opt = build_optimizer(model, OptimConfig(lr=1e-4), torch.device("cpu"))
    assert len(opt.param_groups) == 2 and all(g["lr"] == 1e-4 for g in opt.param_groups)


def test_fresh_lr_mult_is_validated():
    with pytest.raises(ValueError, match="optim.fresh_lr_mult"):
        OptimConfig(fresh_lr_mult=0.0)
