"""Each fine-tuning method's single update against an independent reference written from the equations.

Tiny BERT (float64, dropout 0), same initial parameters and batch, plain SGD: after one update the
parameters of the implementation and of the reference agree to 1e-6.  The references below do not call
alum_pretrain.adversarial or alum_pretrain.finetune - they restate the algorithms:

* FreeLB (Zhu et al. 2020, Alg. 1): g_theta = (1/K) sum_t grad_theta L(x + delta_{t-1});
  delta_t = Proj_{||.||_F <= eps}(delta_{t-1} + a g_delta / ||g_delta||_F); one step theta -= lr g_theta.
* PGD (Madry): delta_K from K input-gradient ascent steps, then theta -= lr grad_theta L(x + delta_K).
* FreeAT (Shafahi): for t < K: (g_theta, g_delta) from one backward at (theta_t, delta_t);
  theta_{t+1} = theta_t - lr g_theta; delta_{t+1} = Proj(delta_t + a g_delta/||g_delta||).
* SMART/ALUM (Liu et al. 2020, Alg. 1): delta_0 ~ N(0, s^2); delta <- clip(delta + eta g/||g||_inf,token, -eps, eps)
  with g = grad_delta KL(p(x+delta) || q(x)); loss = CE + alpha * [KL(p_adv || sg q) + KL(q || sg p_adv)].
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification

from alum_pretrain.finetune.methods import (EmbeddingAdvConfig, FreeAT, FreeLB, FreeLBConfig, PGD, Plain, Smart, SmartConfig,
                                            TrainContext)

LR = 0.5


def tiny_model(seed=0, dropout=0.0, num_labels=2):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, type_vocab_size=2,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, num_labels=num_labels)
    cfg._attn_implementation = "eager"
    return BertForSequenceClassification(cfg).double()


def tiny_batch(regression=False):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(5, 60, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    ids = ids * mask
    types = torch.zeros_like(ids)
    types[0, 5:] = 1
    labels = torch.tensor([0.3, -1.2, 0.9], dtype=torch.float64) if regression else torch.tensor([0, 1, 1])
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels}


def make_ctx(model, regression=False):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    return TrainContext(model=model, optimizer=opt, grad_clip=0.0, regression=regression, step_seed=11)


def logits_of(model, embeds, batch):
    return model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                 token_type_ids=batch["token_type_ids"]).logits


def loss_of(logits, batch, regression=False):
    if regression:
        return ((logits.squeeze(-1) - batch["labels"]) ** 2).mean()
    return F.cross_entropy(logits, batch["labels"])


def sgd_apply(model, grads):
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            if g is not None:
                p -= LR * g


def grads_of(loss, model, extra=()):
    params = list(model.parameters())
    out = torch.autograd.grad(loss, params + list(extra), allow_unused=True)
    return list(out[:len(params)]), list(out[len(params):])


def ref_uniform_init(ctx, batch, hidden, mag, norm_type):
    if mag == 0:
        return torch.zeros(*batch["input_ids"].shape, hidden, dtype=torch.float64)
    u = torch.rand((*batch["input_ids"].shape, hidden), generator=ctx.generator(2)).double() * 2 - 1
    m = batch["attention_mask"].double().unsqueeze(-1)
    if norm_type == "l2":
        lengths = batch["attention_mask"].double().sum(1)
        return u * m * (mag / torch.sqrt(lengths * hidden)).view(-1, 1, 1)
    return u * m * mag


def ref_ascent(delta, g, a, eps, norm_type, mask):
    b = delta.shape[0]
    if norm_type == "l2":
        d = delta + a * g / g.reshape(b, -1).norm(dim=1).view(-1, 1, 1)
    elif norm_type == "linf":
        d = delta + a * g / g.reshape(b, -1).abs().max(dim=1).values.view(-1, 1, 1)
    else:  # FGSM-style sign step
        d = delta + a * torch.where(g > 0, 1.0, torch.where(g < 0, -1.0, 0.0)).double()
    if eps > 0:
        if norm_type == "l2":
            dn = d.reshape(b, -1).norm(dim=1).view(-1, 1, 1)
            d = torch.where(dn > eps, d * eps / dn, d)
        else:
            d = d.clamp(-eps, eps)
    return d * mask.double().unsqueeze(-1)


def assert_same_params(m1, m2, tol=1e-6):
    moved = 0.0
    for (n1, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        assert torch.allclose(p1, p2, atol=tol, rtol=0), f"{n1}: max diff {(p1 - p2).abs().max():.3g}"
    return moved


def changed(before, after):
    return max((a - b).abs().max().item() for a, b in zip(before.parameters(), after.parameters()))


ADV_CASES = [
    dict(norm_type="l2", adv_init_mag=0.5, adv_max_norm=0.3, adv_lr=0.2, adv_steps=3),
    dict(norm_type="l2", adv_init_mag=0.0, adv_max_norm=0.0, adv_lr=0.1, adv_steps=2),
    dict(norm_type="linf", adv_init_mag=0.05, adv_max_norm=0.04, adv_lr=0.03, adv_steps=3),
    dict(norm_type="sign", adv_init_mag=0.02, adv_max_norm=0.03, adv_lr=0.01, adv_steps=2),
]


def test_plain_matches_sgd_on_cross_entropy():
    model, batch = tiny_model(), tiny_batch()
    ref, start = copy.deepcopy(model), copy.deepcopy(model)
    Plain().train_step(make_ctx(model), batch)
    e = F.embedding(batch["input_ids"], ref.bert.embeddings.word_embeddings.weight)
    g, _ = grads_of(loss_of(logits_of(ref, e, batch), batch), ref)
    sgd_apply(ref, g)
    assert_same_params(model, ref)
    assert changed(start, model) > 1e-4


@pytest.mark.parametrize("case", ADV_CASES)
def test_freelb_update_matches_reference(case):
    model, batch = tiny_model(), tiny_batch()
    ref, start = copy.deepcopy(model), copy.deepcopy(model)
    cfg = EmbeddingAdvConfig(**case, reuse_dropout_masks=False)
    ctx = make_ctx(model)
    FreeLB(cfg).train_step(ctx, batch)

    # reference: K passes, parameter gradients averaged over the K adversarial losses, one step
    k = case["adv_steps"]
    delta = ref_uniform_init(ctx, batch, 16, case["adv_init_mag"], case["norm_type"])
    acc = None
    for t in range(k):
        delta = delta.detach().requires_grad_(True)
        e = F.embedding(batch["input_ids"], ref.bert.embeddings.word_embeddings.weight)
        loss = loss_of(logits_of(ref, e + delta, batch), batch)
        gp, (gd,) = grads_of(loss, ref, [delta])
        acc = [x / k if a is None else a + x / k for a, x in zip(acc or [None] * len(gp), gp)]
        delta = ref_ascent(delta.detach(), gd, case["adv_lr"], case["adv_max_norm"], case["norm_type"],
                           batch["attention_mask"])
    sgd_apply(ref, acc)
    assert_same_params(model, ref)
    assert changed(start, model) > 1e-4


@pytest.mark.parametrize("case", ADV_CASES)
def test_pgd_update_matches_reference(case):
    model, batch = tiny_model(), tiny_batch()
    ref = copy.deepcopy(model)
    cfg = EmbeddingAdvConfig(**case, reuse_dropout_masks=False)
    ctx = make_ctx(model)
    PGD(cfg).train_step(ctx, batch)

    delta = ref_uniform_init(ctx, batch, 16, case["adv_init_mag"], case["norm_type"])
    e0 = F.embedding(batch["input_ids"], ref.bert.embeddings.word_embeddings.weight).detach()
    for _ in range(case["adv_steps"]):
        delta = delta.detach().requires_grad_(True)
        loss = loss_of(logits_of(ref, e0 + delta, batch), batch)
        (gd,) = torch.autograd.grad(loss, delta)
        delta = ref_ascent(delta.detach(), gd, case["adv_lr"], case["adv_max_norm"], case["norm_type"],
                           batch["attention_mask"])
    for p in ref.parameters():
        assert p.grad is None  # the inner max of the reference wrote no parameter gradient either
    e = F.embedding(batch["input_ids"], ref.bert.embeddings.word_embeddings.weight)
    g, _ = grads_of(loss_of(logits_of(ref, e + delta, batch), batch), ref)
    sgd_apply(ref, g)
    assert_same_params(model, ref)


@pytest.mark.parametrize("case", ADV_CASES)
def test_freeat_update_matches_reference(case):
    model, batch = tiny_model(), tiny_batch()
    ref = copy.deepcopy(model)
    cfg = EmbeddingAdvConfig(**case, reuse_dropout_masks=False)
    ctx = make_ctx(model)
    method = FreeAT(cfg)
    assert method.optimizer_steps_per_batch == case["adv_steps"]
    method.train_step(ctx, batch)
    assert ctx.optimizer_steps == case["adv_steps"]

    delta = ref_uniform_init(ctx, batch, 16, case["adv_init_mag"], case["norm_type"])
    for _ in range(case["adv_steps"]):
        delta = delta.detach().requires_grad_(True)
        e = F.embedding(batch["input_ids"], ref.bert.embeddings.word_embeddings.weight)
        gp, (gd,) = grads_of(loss_of(logits_of(ref, e + delta, batch), batch), ref, [delta])
        sgd_apply(ref, gp)      # descent on theta with this replay's gradient ...
        delta = ref_ascent(delta.detach(), gd, case["adv_lr"], case["adv_max_norm"], case["norm_type"],
                           batch["attention_mask"])   # ... and ascent on delta from the same backward
    assert_same_params(model, ref)


def ref_kl(p_logits, q_logits):
    """mean over rows of KL(p || q) = sum_c p_c (log p_c - log q_c)."""
    lp, lq = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).mean()


@pytest.mark.parametrize("eps,eta,sigma,k", [(1e-3, 1e-2, 1e-3, 1), (2e-2, 1e-2, 1e-2, 2), (1e-5, 1e-3, 1e-5, 1)])
def test_smart_update_matches_reference(eps, eta, sigma, k):
    model, batch = tiny_model(), tiny_batch()
    ref = copy.deepcopy(model)
    cfg = SmartConfig(alpha=1.0, epsilon=eps, step_size=eta, noise_std=sigma, k_steps=k, projection="linf")
    ctx = make_ctx(model)
    Smart(cfg).train_step(ctx, batch)

    mask = batch["attention_mask"].double().unsqueeze(-1)
    e = F.embedding(batch["input_ids"], ref.bert.embeddings.word_embeddings.weight)
    clean = logits_of(ref, e, batch)
    delta = torch.randn(e.shape, generator=ctx.generator(1), dtype=torch.float64) * sigma * mask
    for _ in range(k):
        delta = delta.detach().requires_grad_(True)
        adv = logits_of(ref, e.detach() + delta, batch)
        (g,) = torch.autograd.grad(ref_kl(adv, clean.detach()), delta)
        gn = g / g.abs().amax(-1, keepdim=True).clamp_min(1e-300)
        delta = (delta.detach() + eta * gn).clamp(-eps, eps) * mask
    adv = logits_of(ref, e + delta.detach(), batch)
    r = ref_kl(adv, clean.detach()) + ref_kl(clean, adv.detach())
    total = loss_of(clean, batch) + 1.0 * r
    g, _ = grads_of(total, ref)
    sgd_apply(ref, g)
    assert_same_params(model, ref)


def test_smart_regression_uses_mse_divergence():
    model, batch = tiny_model(num_labels=1), tiny_batch(regression=True)
    ref = copy.deepcopy(model)
    cfg = SmartConfig(alpha=2.0, epsilon=1e-2, step_size=1e-2, noise_std=1e-2, k_steps=1)
    ctx = make_ctx(model, regression=True)
    Smart(cfg, regression=True).train_step(ctx, batch)

    mask = batch["attention_mask"].double().unsqueeze(-1)
    e = F.embedding(batch["input_ids"], ref.bert.embeddings.word_embeddings.weight)
    clean = logits_of(ref, e, batch)
    delta = (torch.randn(e.shape, generator=ctx.generator(1), dtype=torch.float64) * 1e-2 * mask).requires_grad_(True)
    adv = logits_of(ref, e.detach() + delta, batch)
    (g,) = torch.autograd.grad(((adv - clean.detach()) ** 2).mean(), delta)
    delta = (delta.detach() + 1e-2 * g / g.abs().amax(-1, keepdim=True).clamp_min(1e-300)).clamp(-1e-2, 1e-2) * mask
    adv = logits_of(ref, e + delta, batch)
    total = loss_of(clean, batch, regression=True) + 2.0 * ((adv - clean) ** 2).mean()
    g, _ = grads_of(total, ref)
    sgd_apply(ref, g)
    assert_same_params(model, ref)


class _MaskRecorder:
    """Forward hooks on every nn.Dropout and the classifier: dropout masks and logits per pass."""

    def __init__(self, model):
        self.masks, self.logits = [], []
        self.handles = []
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                self.handles.append(m.register_forward_hook(self._drop))
        self.handles.append(model.classifier.register_forward_hook(lambda m, i, o: self.logits.append(o.detach())))

    def _drop(self, module, inp, out):
        self.masks.append((out == 0) & (inp[0] != 0))

    def per_pass(self, k):
        n = len(self.masks) // k
        return [self.masks[i * n:(i + 1) * n] for i in range(k)]


@pytest.mark.parametrize("reuse", [True, False])
def test_freelb_reuses_dropout_masks_across_ascent_steps(reuse):
    model, batch = tiny_model(dropout=0.3), tiny_batch()
    model.train()
    k = 3
    # adv_lr = 0 and no random start: the K passes see the same input, so any difference comes from dropout
    cfg = EmbeddingAdvConfig(adv_lr=0.0, adv_steps=k, adv_init_mag=0.0, reuse_dropout_masks=reuse)
    rec = _MaskRecorder(model)
    ctx = make_ctx(model)
    torch.manual_seed(3)
    rng_before = torch.get_rng_state()
    FreeLB(cfg).train_step(ctx, batch)
    passes = rec.per_pass(k)
    assert len(rec.logits) == k and len(passes[0]) >= 5  # embeddings, attention, outputs, classifier ...
    assert any(m.any() for m in passes[0])                # dropout is really active
    same = all(torch.equal(a, b) for p in passes[1:] for a, b in zip(passes[0], p))
    same_logits = all(torch.equal(rec.logits[0], x) for x in rec.logits[1:])
    assert same == reuse and same_logits == reuse
    if reuse:  # the forked RNG leaves the global stream untouched
        assert torch.equal(torch.get_rng_state(), rng_before)


def test_freelb_masks_differ_between_minibatches():
    model, batch = tiny_model(dropout=0.3), tiny_batch()
    model.train()
    cfg = EmbeddingAdvConfig(adv_lr=0.0, adv_steps=1, adv_init_mag=0.0)
    rec = _MaskRecorder(model)
    ctx = make_ctx(model)
    method = FreeLB(cfg)
    method.train_step(ctx, batch)
    ctx.step_seed += 1
    method.train_step(ctx, batch)
    first, second = rec.per_pass(2)
    assert not all(torch.equal(a, b) for a, b in zip(first, second))


def test_embedding_adv_config_rejects_bad_values():
    with pytest.raises(ValueError, match="--freelb.norm_type"):
        FreeLBConfig(norm_type="l1")
    with pytest.raises(SystemExit):  # the CLI reports it as a usage error naming the flag
        from alum_pretrain.finetune.cli import main
        main(["--pgd.adv_steps=0"])
    with pytest.raises(ValueError, match="adv_steps"):
        EmbeddingAdvConfig(adv_steps=0)
    with pytest.raises(ValueError, match="adv_lr"):
        EmbeddingAdvConfig(adv_lr=-1.0)


def test_freelb_random_start_is_scaled_and_masked():
    from alum_pretrain.finetune.methods.embedding_adv import init_uniform_delta

    batch = tiny_batch()
    embeds = torch.zeros(3, 9, 16)
    g = torch.Generator().manual_seed(0)
    d = init_uniform_delta(embeds, batch["attention_mask"], 0.5, "l2", g)
    lengths = batch["attention_mask"].sum(1)
    assert torch.all(d[batch["attention_mask"] == 0] == 0)
    bound = 0.5 / torch.sqrt(lengths.float() * 16)                     # |U(-1,1)| * mag / sqrt(len * dim)
    assert torch.all(d.abs().amax(dim=(1, 2)) <= bound + 1e-7)
    assert torch.all(d.abs().amax(dim=(1, 2)) > 0.8 * bound)
    d = init_uniform_delta(embeds, batch["attention_mask"], 0.05, "linf", g)
    assert d.abs().max() <= 0.05 and d.abs().max() > 0.04 and torch.all(d[batch["attention_mask"] == 0] == 0)


@pytest.mark.parametrize("mode", ["independent", "shared", "off"])
def test_smart_adversarial_dropout_modes(mode):
    """SMART fine-tuning takes alum.adv_dropout too: with delta = 0, shared masks give exactly 0, independent
    masks the dropout disagreement, off the train-vs-eval difference (both > 0)."""
    model, batch = tiny_model(dropout=0.3), tiny_batch()
    model.train()
    cfg = SmartConfig(noise_std=0.0, k_steps=0, adv_dropout=mode)
    torch.manual_seed(3)
    m = Smart(cfg).train_step(make_ctx(model), batch)
    assert (m["adv"].item() == 0.0) == (mode == "shared")
    assert model.training and all(x.training for x in model.modules())
