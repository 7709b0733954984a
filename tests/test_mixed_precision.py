"""ALUM and the fine-tuning adversaries under fp16/bf16 autocast on CPU, and their numerical guards.

What is checked (the references are written here, not calls into the implementation):

* the scale-free ascent gradient equals the plain ``autograd.grad`` in float64 (any loss scale);
* under fp16 autocast the plain gradient of the globally normalised ascent loss underflows on many tokens
  (the failure the scale-free form fixes) while the project's ascent gradient is non-zero on >= 99 % of
  the real tokens; the first ascent step's direction matches float32 per token (cosine >= 0.99) on a
  model whose float32 direction is well defined; bf16 likewise - for the native engine's model, SMART,
  FreeLB and PGD fine-tuning and the fairseq criterion;
* non-finite ascent gradients skip the update (counted), a non-finite R is not added (counted),
  ``adv_dropout`` is R at delta = 0 under the adversarial pass's dropout masks;
* 16-bit perturbation points are refused with a message naming autocast / ``--amp``;
* the ``sym_kl_ce`` gradient is ``p - q``; RIFT's ASCC target is the eval-mode prediction.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from alum_pretrain.adversarial import ALUMConfig, alum_regularizer, init_delta, perturb
from alum_pretrain.divergence import symmetric_kl_ce
from alum_pretrain.precision import check_perturbation_resolution, scale_free_input_grad
from conftest import requires_fairseq
from test_finetune_cli import sst_files, tiny_dir  # noqa: F401  (fixtures)

HALF = [torch.float16, torch.bfloat16]


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def tiny_pretrain_model(perturb_at="word", dropout=0.1, seed=0):
    from alum_pretrain.models import PretrainModel, build_scratch_model

    torch.manual_seed(seed)
    hf = build_scratch_model("tiny", 300, 0, nsp=True, max_position_embeddings=64, dropout=dropout)
    return PretrainModel(hf, perturb_at=perturb_at)


def mlm_batch(B=6, T=24, V=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (B, T), generator=g)
    attn = torch.ones(B, T, dtype=torch.long)
    attn[1, 15:] = 0
    attn[4, 9:] = 0
    ids[attn == 0] = 0
    sel = (torch.rand(B, T, generator=g) < 0.2) & attn.bool()
    sel[:, 2] = True
    masked = sel.reshape(-1).nonzero().squeeze(1)
    return ids, attn, masked


def autocast(dtype):
    return torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)


def per_token_cosine(a, b, mask):
    """cosine per real token between (B, T, H) tensors."""
    cos = F.cosine_similarity(a.double(), b.double(), dim=-1)  # (B, T)
    return cos[mask.bool()]


def ref_grad(loss_fn, wrt):
    (g,) = torch.autograd.grad(loss_fn(), wrt)
    return g


# --------------------------------------------------------------------------------------------------
# core: the scale-free gradient
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 1e-12, 1e8])
@pytest.mark.parametrize("per_example", [False, True])
def test_scale_free_grad_equals_plain_grad_float64(scale, per_example):
    torch.manual_seed(0)
    w1, w2 = torch.randn(5, 7, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    x = torch.randn(4, 6, 5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 2, 1, 2])

    def model(inp):
        return torch.tanh(inp @ w1).mean(1) @ w2  # (4, 3): examples do not interact

    def loss_of(o):
        return F.cross_entropy(o[0], y, reduction="sum") * scale

    want = ref_grad(lambda: loss_of((model(x),)), x)
    got, finite = scale_free_input_grad([model(x)], loss_of, x, per_example=per_example)
    assert bool(finite)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-300)


def test_scale_free_grad_flags_nonfinite_and_handles_zero():
    x = torch.randn(2, 3, 4, requires_grad=True)
    out = (x * 2).sum(-1)  # (2, 3)
    g, finite = scale_free_input_grad([out], lambda o: (o[0] * float("nan")).sum(), x)
    assert not bool(finite)
    out = (x * 2).sum(-1)
    g, finite = scale_free_input_grad([out], lambda o: (o[0] * 0.0).sum(), x)
    assert bool(finite) and torch.count_nonzero(g) == 0


# --------------------------------------------------------------------------------------------------
# native engine model (PretrainModel, HF BERT) under autocast
# --------------------------------------------------------------------------------------------------


def _native_heads(model, attn, masked):
    return lambda e: model.heads_from_embeds(e, attn, None, masked, False)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("perturb_at", ["word", "embedding_output"])
def test_native_ascent_gradient_nonzero_under_autocast(dtype, perturb_at):
    """Train mode (dropout, as alum-train runs), the paper's sigma = eps = 1e-5, loss normalised by a
    global masked-token count as the engine does: >= 99 % of real tokens get a non-zero ascent gradient.
    In fp16 the plain autograd.grad of the same loss flushes many of them to zero."""
    model = tiny_pretrain_model(perturb_at).train()
    ids, attn, masked = mlm_batch()
    heads = _native_heads(model, attn, masked)
    denom = 4.0 * masked.numel()  # a global count (4 ranks' worth): the engine's normalisation
    cfg = ALUMConfig()

    def div(a, c):
        return symmetric_kl_ce(a, c) * (a.shape[0] / denom)

    torch.manual_seed(1)
    with autocast(dtype):
        e = model.embed(ids)
        clean = heads(e)
        r, m = alum_regularizer(heads, e, (clean[0], None), cfg, pad_mask=attn.bool(),
                                generator=torch.Generator().manual_seed(3), divergence=div)
    assert m["ascent_zero_grad_frac"].item() <= 0.01
    assert m["ascent_nonfinite"].item() == 0 and m["adv_nonfinite"].item() == 0
    assert torch.isfinite(r) and r.item() > 0
    if dtype == torch.float16:  # the failure mode the scale-free ascent removes
        torch.manual_seed(1)
        with autocast(dtype):
            e = model.embed(ids)
            clean = heads(e)
            delta = init_delta(e, attn.bool(), 1e-5, torch.Generator().manual_seed(3)).requires_grad_(True)
            adv = heads(perturb(e.detach(), delta))
            (g,) = torch.autograd.grad(div(adv[0], clean[0].detach()), delta)
        zero = ((g == 0).all(-1) & attn.bool()).sum().item() / attn.sum().item()
        assert zero > 0.05, f"plain fp16 ascent gradient unexpectedly healthy ({zero:.3f} zero)"


@pytest.mark.parametrize("dtype", HALF)
def test_native_first_ascent_step_matches_fp32_direction(dtype):
    """Eval mode and a clean target that differs from the model's prediction (a teacher's logits), so the
    float32 ascent direction is well defined; noise_std = 0 and no projection make delta after one step
    = eta * g / max|g| per token: its direction under autocast must match float32 (cosine >= 0.99)."""
    model = tiny_pretrain_model("word").eval()
    ids, attn, masked = mlm_batch(seed=1)
    heads = _native_heads(model, attn, masked)
    cfg = ALUMConfig(noise_std=0.0, projection="none", step_size=1e-3)
    g = torch.Generator().manual_seed(5)
    deltas = {}
    for dt in (None, dtype):
        captured = []

        def fwd(x):
            captured.append(x.detach().float())
            return heads(x)

        with autocast(dt):
            e = model.embed(ids)
            with torch.no_grad():
                target = heads(e)[0].float() + 3.0 * torch.randn(masked.numel(), 300, generator=g)
                g.manual_seed(5)
            alum_regularizer(fwd, e, (target, None), cfg, pad_mask=attn.bool(), divergence=symmetric_kl_ce)
        deltas[dt] = captured[-1] - e.detach().float()
    cos = per_token_cosine(deltas[dtype], deltas[None], attn)
    assert cos.min().item() >= 0.99, f"min per-token cosine {cos.min().item():.4f}"


def test_pretrain_step_logs_diagnostics_under_fp16():
    """PretrainStep.forward (the native engine's objective) returns the new keys, adv_dropout included."""
    from alum_pretrain.engine.step import PretrainStep

    model = tiny_pretrain_model().train()
    ids, attn, masked = mlm_batch()
    step = PretrainStep(model, ALUMConfig(log_baseline=True), nsp=False)
    flat = torch.full((ids.numel(),), -100)
    flat[masked] = ids.reshape(-1)[masked]
    batch = {"input_ids": ids, "attention_mask": attn, "token_type_ids": torch.zeros_like(ids),
             "masked_pos": masked, "mlm_targets": ids.reshape(-1)[masked]}
    with autocast(torch.float16):
        loss, m = step(batch, alum_on=True, mlm_denom=float(masked.numel()), nsp_denom=float(ids.shape[0]))
    for k in ("adv", "adv_dropout", "ascent_nonfinite", "ascent_zero_grad_frac", "adv_nonfinite"):
        assert k in m and torch.isfinite(m[k]), k
    assert m["ascent_zero_grad_frac"].item() <= 0.01
    assert 0 < m["adv_dropout"].item()
    loss.backward()


# --------------------------------------------------------------------------------------------------
# guards and diagnostics of the core
# --------------------------------------------------------------------------------------------------


def test_nonfinite_R_is_not_added_and_is_counted():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 4)
    lin = torch.nn.Linear(4, 5)
    ids = torch.randint(0, 10, (2, 3))
    e = emb(ids)
    clean = lin(e).reshape(-1, 5)
    calls = []

    def fwd(x):
        calls.append(1)
        out = lin(x).reshape(-1, 5)
        return out * float("inf") if len(calls) == 2 else out  # the final (adversarial) pass blows up

    r, m = alum_regularizer(fwd, e, clean, ALUMConfig(noise_std=1e-2, epsilon=1e-2), generator=torch.Generator())
    assert m["adv_nonfinite"].item() == 1 and not torch.isfinite(m["adv"])
    assert r.item() == 0.0 and not r.requires_grad
    (F.cross_entropy(clean, torch.zeros(6, dtype=torch.long)) + 10 * r).backward()
    assert all(torch.isfinite(p.grad).all() for p in (*emb.parameters(), *lin.parameters()))


def test_adv_dropout_is_R_at_zero_delta_with_the_same_masks():
    """adv_dropout == R with delta = 0 under the dropout masks of the adversarial pass; the training RNG
    stream is untouched (R is the same with and without the baseline)."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(20, 8)
    net = torch.nn.Sequential(torch.nn.Dropout(0.3), torch.nn.Linear(8, 7))
    ids = torch.randint(0, 20, (3, 5))
    e = emb(ids)
    clean = net(e).reshape(-1, 7)
    cfg = ALUMConfig(noise_std=0.0, k_steps=0)  # delta = 0: then R and adv_dropout are the same number

    def fwd(x):
        return net(x).reshape(-1, 7)

    torch.manual_seed(7)
    r0, _ = alum_regularizer(fwd, e, clean, cfg, baseline=False)
    torch.manual_seed(7)
    r1, m = alum_regularizer(fwd, e, clean, cfg, baseline=True)
    assert r1.item() == pytest.approx(r0.item(), rel=1e-6)  # RNG stream unchanged by the baseline pass
    assert m["adv_dropout"].item() == pytest.approx(r1.item(), rel=1e-6) and r1.item() > 0


def test_sym_kl_ce_gradient_is_p_minus_q():
    torch.manual_seed(0)
    p = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    q = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    symmetric_kl_ce(p, q).backward()
    sp, sq = torch.softmax(p.detach(), -1), torch.softmax(q.detach(), -1)
    torch.testing.assert_close(p.grad, (sp - sq) / 4)  # d KL(sg q || p) / d logits_p, mean over rows
    torch.testing.assert_close(q.grad, (sq - sp) / 4)
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1).mean()  # noqa: E731
    assert symmetric_kl_ce(p, q).item() == pytest.approx((kl(sp, sq) + kl(sq, sp)).item())


@pytest.mark.parametrize("dtype", HALF)
def test_pure_half_perturbation_point_is_refused(dtype):
    # |e| ~ 1 (an embedding LayerNorm output): half an ulp is 4.9e-4 (fp16) / 3.9e-3 (bf16) >> 1e-5
    e = (1.0 + 0.1 * torch.randn(2, 5, 16)).to(dtype)
    with pytest.raises(ValueError, match="autocast|--amp"):
        check_perturbation_resolution(e, 1e-5, 1e-5)
    check_perturbation_resolution(e, 1.0, 1.0)  # a perturbation above the resolution is allowed
    check_perturbation_resolution(e.float(), 1e-5, 1e-5)  # float32: nothing to check
    with pytest.raises(ValueError, match="autocast"):
        alum_regularizer(lambda x: x.float().sum(-1), e, e.float().sum(-1), ALUMConfig())


def test_alum_config_validates_new_fields():
    with pytest.raises(ValueError, match="alum.divergence"):
        ALUMConfig(divergence="kl")
    with pytest.raises(ValueError, match="alum.include_nsp"):
        ALUMConfig(include_nsp="yes")
    assert ALUMConfig().divergence == "sym_kl_ce" and ALUMConfig().include_nsp is False


# --------------------------------------------------------------------------------------------------
# fine-tuning: SMART, FreeLB, PGD under autocast (+ GradScaler for fp16)
# --------------------------------------------------------------------------------------------------


def _ft_model(dropout=0.1):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout, num_labels=3)
    return BertForSequenceClassification(cfg)


def _ft_batch(B=6, T=20):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 120, (B, T), generator=g)
    attn = torch.ones(B, T, dtype=torch.long)
    attn[2, 12:] = 0
    ids[attn == 0] = 0
    return {"input_ids": ids, "attention_mask": attn, "token_type_ids": torch.zeros_like(ids),
            "labels": torch.tensor([0, 1, 2, 0, 1, 2])}


def _ctx(model, dtype):
    from alum_pretrain.finetune.methods.base import TrainContext

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ctx = TrainContext(model=model, optimizer=opt, grad_clip=1.0, step_seed=3)
    if dtype == torch.float16:
        ctx.scaler = torch.amp.GradScaler("cpu")
    return ctx


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("method", ["smart", "freelb", "pgd"])
def test_finetune_methods_ascent_under_autocast(method, dtype):
    from alum_pretrain.finetune.methods import build_method
    from alum_pretrain.finetune.config import FinetuneConfig

    cfg = FinetuneConfig()
    m = build_method(method, cfg, False)
    model = _ft_model().train()
    ctx = _ctx(model, dtype)
    before = copy.deepcopy(model.state_dict())
    with autocast(dtype):
        metrics = m.train_step(ctx, _ft_batch())
    assert metrics["ascent_zero_grad_frac"].item() <= 0.01, metrics
    assert metrics["ascent_nonfinite"].item() == 0
    assert torch.isfinite(metrics["loss"])
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dtype", HALF)
def test_smart_first_ascent_step_matches_fp32_direction(dtype):
    """SMART's ascent on a fine-tuning classifier: eval mode, a teacher target far from the prediction,
    noise_std = 0, no projection: delta after one step has the float32 direction per token."""
    from alum_pretrain.finetune.methods.base import forward_from_embeds, word_embeddings

    model = _ft_model(dropout=0.0).eval()
    batch = _ft_batch()
    cfg = ALUMConfig(alpha=1.0, noise_std=0.0, projection="none")
    target = torch.randn(6, 3, generator=torch.Generator().manual_seed(2)) * 3
    deltas = {}
    for dt in (None, dtype):
        seen = []

        def fwd(x):
            seen.append(x.detach().float())
            return forward_from_embeds(model, x, batch)

        with autocast(dt):
            e = word_embeddings(model, batch)
            alum_regularizer(fwd, e, target, cfg, pad_mask=batch["attention_mask"], divergence=symmetric_kl_ce,
                             per_example_scale=True)
        deltas[dt] = seen[-1] - e.detach().float()
    cos = per_token_cosine(deltas[dtype], deltas[None], batch["attention_mask"])
    assert cos.min().item() >= 0.99, f"min per-token cosine {cos.min().item():.4f}"


@pytest.mark.parametrize("dtype", HALF)
def test_freelb_first_ascent_step_matches_fp32_direction(dtype):
    """FreeLB's delta_1 (after one ascent step from delta_0 = 0, no dropout) under autocast (+ GradScaler
    for fp16) has the float32 direction per example (cosine of the flattened delta >= 0.99)."""
    from alum_pretrain.finetune.methods.embedding_adv import EmbeddingAdvConfig
    from alum_pretrain.finetune.methods.freelb import FreeLB

    batch = _ft_batch()
    out = {}
    for dt in (None, dtype):
        model = _ft_model(dropout=0.0).eval()
        method = FreeLB(EmbeddingAdvConfig(adv_steps=2, adv_init_mag=0.0, adv_lr=0.1, norm_type="l2"))
        ctx = _ctx(model, dt)
        seen = []
        emb = model.get_input_embeddings()
        h = model.bert.embeddings.register_forward_pre_hook(
            lambda mod, args, kw: seen.append(kw["inputs_embeds"].detach().float()), with_kwargs=True)
        with autocast(dt):
            method.train_step(ctx, batch)
        h.remove()
        e0 = F.embedding(batch["input_ids"], emb.weight).detach().float()
        out[dt] = seen[1] - e0 if len(seen) > 1 else None
    a, b = out[dtype], out[None]
    assert a is not None and b is not None
    mask = batch["attention_mask"].bool().unsqueeze(-1)
    cos = F.cosine_similarity((a * mask).flatten(1), (b * mask).flatten(1), dim=1)
    assert cos.min().item() >= 0.99, cos


def test_finetune_precision_flag_validated():
    from alum_pretrain.finetune.config import RunConfig
    from alum_pretrain.finetune.robust import RRunConfig

    with pytest.raises(ValueError, match="--run.precision"):
        RunConfig(precision="fp8")
    with pytest.raises(ValueError, match="--run.precision"):
        RRunConfig(precision="half")
    assert RunConfig(precision="bf16").precision == "bf16"


# --------------------------------------------------------------------------------------------------
# RIFT ASCC: the eval-mode clean target
# --------------------------------------------------------------------------------------------------


def test_ascc_target_is_the_eval_mode_prediction():
    """With dropout in the model, the attack (eval mode throughout) must not depend on the train-mode
    clean logits passed in, nor on the global RNG: the official attack's target is eval-mode."""
    from alum_pretrain.finetune.methods.rift import RIFT, RIFTConfig
    from test_finetune_rift import rift_batch, tiny_model

    model = tiny_model(dropout=0.2)
    model.train()
    batch = rift_batch()
    method = RIFT(RIFTConfig(ascc_steps=3, max_candidates=4, proj_hidden=8, proj_dim=4))
    method.setup(model)
    logits_a = torch.randn(3, 2, dtype=torch.float64)
    w1 = method.ascc_weights(model, batch, logits_a, torch.Generator().manual_seed(1))
    torch.manual_seed(123)
    w2 = method.ascc_weights(model, batch, logits_a * 5, torch.Generator().manual_seed(1))
    torch.testing.assert_close(w1, w2)
    assert model.training  # restored
    # initial weights near uniform: Kaiming-normal over (B, T, S, 1) has std sqrt(2 / (T * S))
    b, t, s = batch["sub_mask"].shape
    w_hat = torch.nn.init.kaiming_normal_(torch.empty(b, t, s, 1), generator=torch.Generator().manual_seed(1))
    assert w_hat.std().item() == pytest.approx(math.sqrt(2 / (t * s)), rel=0.35)


# --------------------------------------------------------------------------------------------------
# fairseq criterion
# --------------------------------------------------------------------------------------------------


def _fairseq_setup(databin, *extra):
    import alum_pretrain.fairseq_ext  # noqa: F401
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from test_fairseq import TINY

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [str(databin), "--task", "alum_masked_lm", "--criterion",
                                                "alum_masked_lm", "--max-update", "10", *TINY, *extra])
    cfg = convert_namespace_to_omegaconf(args)
    torch.manual_seed(0)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    return task, model, cfg


@pytest.fixture(scope="module")
def small_databin(tmp_path_factory):
    from engine_helpers import make_stdlib_databin

    return make_stdlib_databin(tmp_path_factory.mktemp("mp") / "bin", n_docs=40, vocab_size=400)


@pytest.mark.fairseq
@requires_fairseq
def test_fairseq_criterion_refuses_pure_half_and_takes_amp(small_databin):
    task, model, cfg = _fairseq_setup(small_databin, "--amp")
    task.build_criterion(cfg.criterion)  # --amp keeps fp32 weights: accepted
    for flag in ("--fp16", "--bf16", "--memory-efficient-fp16"):
        task, model, cfg = _fairseq_setup(small_databin, flag)
        assert cfg.common[flag[2:].replace("-", "_")]
        with pytest.raises(ValueError, match="--amp"):
            task.build_criterion(cfg.criterion)
    task, model, cfg = _fairseq_setup(small_databin, "--fp16", "--alum-alpha", "0")
    task.build_criterion(cfg.criterion)  # plain MLM in pure fp16 is fine


@pytest.mark.fairseq
@requires_fairseq
@pytest.mark.parametrize("dtype", HALF)
def test_fairseq_criterion_under_autocast_and_per_sample_noise(small_databin, dtype):
    """Train mode under autocast: >= 99 % of real tokens get an ascent gradient, every diagnostic is
    logged; eval mode in float32: the batch split in two halves gives the same summed R (per-sample
    random start), which keying by the batch's first sample id would not."""
    task, model, cfg = _fairseq_setup(small_databin, "--alum-log-baseline", "--alum-noise-std", "1e-3",
                                      "--alum-epsilon", "1e-2", "--alum-step-size", "1e-2")
    crit = task.build_criterion(cfg.criterion)
    task.load_dataset("valid")
    itr = task.get_batch_iterator(task.dataset("valid"), max_sentences=6, seed=1).next_epoch_itr(shuffle=False)
    sample = task.mask_sample(next(iter(itr)), 0.15, 4, 0)
    sample["update_num"] = 4
    model.train()
    crit.train()
    with autocast(dtype):
        loss, n, log = crit(model, sample)
    assert torch.isfinite(loss)
    assert float(log["ascent_zero_grad_frac"]) <= 0.01
    assert float(log["ascent_nonfinite"]) == 0 and float(log["adv_nonfinite"]) == 0
    assert float(log["adv_dropout"]) > 0

    model.eval()
    _, n_all, log_all = crit(model, sample)
    halves = []
    for idx in (slice(0, 3), slice(3, 6)):
        part = {"id": sample["id"][idx], "nsentences": 3, "ntokens": 0, "update_num": 4,
                "net_input": {"src_tokens": sample["net_input"]["src_tokens"][idx]},
                "target": sample["target"][idx]}
        _, _, lg = crit(model, part)
        halves.append(float(lg["adv"]))
    assert sum(halves) == pytest.approx(float(log_all["adv"]), rel=1e-4)


# --------------------------------------------------------------------------------------------------
# alum-finetune end to end under --run.precision (GradScaler state survives a resume)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp16"])  # bf16 is the same path without the GradScaler
def test_finetune_precision_end_to_end_and_resume(tiny_dir, sst_files, tmp_path, precision):
    from alum_pretrain.finetune.trainer import finetune
    from test_finetune_cli import cfg_for

    train, dev, _ = sst_files
    over = {"run.method": "smart", "run.precision": precision, "model.hidden_dropout": 0.1, "run.log_every": 1}
    full = finetune(cfg_for(tiny_dir, train, dev, tmp_path / "full", **over))
    logged = full["history"][-1]["train"]
    for k in ("adv", "ascent_nonfinite", "ascent_zero_grad_frac", "adv_nonfinite"):
        assert k in logged, k
    assert logged["ascent_zero_grad_frac"] <= 0.01 and math.isfinite(logged["loss"])
    state = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    assert (state["scaler"] is not None) == (precision == "fp16")
    finetune(cfg_for(tiny_dir, train, dev, tmp_path / "part", **over, **{"run.stop_after_epochs": 1}))
    resumed = finetune(cfg_for(tiny_dir, train, dev, tmp_path / "part", **over))
    a = state["model"]
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=False)["model"]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert resumed["history"][1]["dev"] == full["history"][1]["dev"]


# --------------------------------------------------------------------------------------------------
# alum-train (native engine) end to end: the command on a tiny data-bin
# --------------------------------------------------------------------------------------------------


def test_alum_train_fp16_logs_the_diagnostics(small_databin, tmp_path):
    """``alum-train --model.preset tiny --train.precision fp16 --train.device cpu --alum.start_step 0
    --alum.log_baseline true``: every ALUM log step has ascent_zero_grad_frac <= 0.01, ascent_nonfinite,
    adv_nonfinite and adv_dropout."""
    from engine_helpers import read_log, run_train

    rc = run_train(small_databin, tmp_path / "run", 2, "--train.precision=fp16", "--train.device=cpu",
                   "--alum.start_step=0", "--alum.log_baseline=true", "--train.eval_every=0")
    assert rc == 0
    recs = [r for r in read_log(tmp_path / "run") if r.get("alum") == 1.0]
    assert len(recs) == 2
    for r in recs:
        assert r["ascent_zero_grad_frac"] <= 0.01
        assert r["ascent_nonfinite"] == 0 and r["adv_nonfinite"] == 0
        assert 0 < r["adv_dropout"] and math.isfinite(r["adv"])


@pytest.mark.fairseq
@requires_fairseq
def test_fairseq_embedding_output_point_is_after_the_embedding_dropout(small_databin):
    """--alum-perturb-at embedding_output taps the embedding block after LayerNorm AND dropout (as the
    native engine's embeddings-module output): in train mode the captured tensor has dropout's zeros."""
    from alum_pretrain.fairseq_ext.criterion import EmbeddingTap

    task, model, cfg = _fairseq_setup(small_databin)
    enc = model.encoder.sentence_encoder
    tap = EmbeddingTap(model, "embedding_output")
    assert tap.point is enc.dropout_module
    src = torch.randint(5, 100, (3, 12))
    model.train()
    with tap.capture():
        model(src, masked_tokens=src.ne(-1))
    zeros = (tap.embeds == 0).float().mean().item()
    assert 0.03 < zeros < 0.3, zeros  # dropout p = 0.1 zeroed about a tenth (LayerNorm output has no zeros)
