"""ALUM core (alum_pretrain/adversarial.py, divergence.py) against an independent reference of Algorithm 1.

The reference below (``ref_*``) is written from the paper's equations with plain torch ops (softmax/log
instead of log_softmax, explicit max/min instead of clamp, explicit loops) and never calls the module.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from alum_pretrain.adversarial import (
    ALUMConfig,
    alum_regularizer,
    ascent_step,
    init_delta,
    normalize_grad,
    perturb,
    project,
)
from alum_pretrain.divergence import get_divergence, symmetric_kl

V, H, T, B = 37, 16, 9, 3


# --------------------------------------------------------------------------------------------------
# A tiny BERT-like model: word embedding -> (+position, LayerNorm) -> token MLP -> masked token mixing
# -> token MLP -> (MLM head on masked positions (N, V), NSP head on position 0 (B, 2)).
# --------------------------------------------------------------------------------------------------


class TinyMLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.word = nn.Embedding(V, H)
        self.pos = nn.Embedding(T, H)
        self.ln = nn.LayerNorm(H)
        self.mlp1 = nn.Sequential(nn.Linear(H, 2 * H), nn.Tanh(), nn.Linear(2 * H, H))
        self.mix = nn.Linear(H, H)
        self.mlp2 = nn.Sequential(nn.Linear(H, 2 * H), nn.GELU(), nn.Linear(2 * H, H))
        self.lm = nn.Linear(H, V)
        self.nsp = nn.Linear(H, 2)

    def from_embeds(self, e, pad_mask, masked):
        h = self.ln(e + self.pos.weight[: e.shape[1]])  # (B, T, H)
        h = h + self.mlp1(h)
        w = pad_mask.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
        ctx = (h * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)  # (B, 1, H) masked mean over real tokens
        h = h + torch.tanh(self.mix(ctx))
        h = h + self.mlp2(h)
        return self.lm(h[masked]), self.nsp(h[:, 0])  # (N, V), (B, 2)


def make_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    pad_mask = torch.ones(B, T, dtype=torch.bool)
    pad_mask[1, 6:] = False
    pad_mask[2, 4:] = False
    masked = (torch.rand(B, T, generator=g) < 0.4) & pad_mask
    masked[:, 1] = True
    labels = ids[masked]
    nsp_labels = torch.tensor([0, 1, 1])
    return ids, pad_mask, masked, labels, nsp_labels


def make_model(dtype=torch.float64, seed: int = 0) -> TinyMLM:
    torch.manual_seed(seed)
    return TinyMLM().to(dtype).eval()


# --------------------------------------------------------------------------------------------------
# Independent reference of Algorithm 1 (lines 3-8)
# --------------------------------------------------------------------------------------------------


def ref_kl(p_logits, q_logits):
    """KL(p || q) per row from its definition sum_c p_c log(p_c / q_c), mean over rows."""
    p = torch.softmax(p_logits.double(), dim=-1)
    q = torch.softmax(q_logits.double(), dim=-1)
    return (p * (torch.log(p) - torch.log(q))).sum(-1).mean()


def ref_symkl(p_logits, q_logits, form="sym_kl_ce"):
    """sym_kl: KL(p || sg q) + KL(q || sg p); sym_kl_ce (the default): KL(sg q || p) + KL(sg p || q)."""
    if form == "sym_kl":
        return ref_kl(p_logits, q_logits.detach()) + ref_kl(q_logits, p_logits.detach())
    return ref_kl(q_logits.detach(), p_logits) + ref_kl(p_logits.detach(), q_logits)


def ref_alum(model, ids, pad_mask, masked, clean, *, sigma, eps, eta, K, proj, seed, form="sym_kl_ce"):
    """Returns (R, delta) following Algorithm 1 literally, with the per-token max-abs normalised step."""
    e = model.word(ids)  # (B, T, H)
    g = torch.Generator().manual_seed(seed)
    keep = pad_mask.to(e.dtype).unsqueeze(-1)
    delta = torch.randn(e.shape, generator=g, dtype=e.dtype) * sigma * keep  # line 3
    for _ in range(K):  # lines 4-7
        delta = delta.detach().requires_grad_(True)
        adv = model.from_embeds(e.detach() + delta, pad_mask, masked)
        loss = ref_symkl(adv[0], clean[0].detach(), form) + ref_symkl(adv[1], clean[1].detach(), form)
        (gadv,) = torch.autograd.grad(loss, delta)  # line 5
        new = delta.detach().clone()
        for b in range(e.shape[0]):
            for t in range(e.shape[1]):
                m = gadv[b, t].abs().max()
                if m > 0:
                    new[b, t] = new[b, t] + eta * gadv[b, t] / m
                if proj == "linf":  # line 6: Pi onto ||.||_inf <= eps
                    new[b, t] = torch.minimum(torch.maximum(new[b, t], torch.tensor(-eps, dtype=e.dtype)),
                                              torch.tensor(eps, dtype=e.dtype))
                elif proj == "l2":
                    n = torch.sqrt((new[b, t] ** 2).sum())
                    if n > eps:
                        new[b, t] = new[b, t] * (eps / n)
        delta = new * keep
    adv = model.from_embeds(e + delta.detach(), pad_mask, masked)  # line 8
    r = ref_symkl(adv[0], clean[0], form) + ref_symkl(adv[1], clean[1], form)
    return r, delta.detach()


def task_loss_of(clean, labels, nsp_labels):
    return nn.functional.cross_entropy(clean[0], labels) + nn.functional.cross_entropy(clean[1], nsp_labels)


def run_impl(model, ids, pad_mask, masked, cfg, seed, calls=None):
    """Clean pass + alum_regularizer; returns (R, metrics, delta recovered from the final forward's input)."""
    e = model.word(ids)
    clean = model.from_embeds(e, pad_mask, masked)
    inputs = []

    def fwd(x):
        inputs.append(x.detach().clone())
        return model.from_embeds(x, pad_mask, masked)

    r, metrics = alum_regularizer(fwd, e, clean, cfg, pad_mask=pad_mask,
                                  generator=torch.Generator().manual_seed(seed))
    if calls is not None:
        calls.append(len(inputs))
    delta = inputs[-1] - e.detach()
    return r, metrics, delta, clean


def grads_of(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------------------------------
# The ALUM step vs the reference
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["sym_kl_ce", "sym_kl"])
@pytest.mark.parametrize("proj", ["linf", "l2"])
@pytest.mark.parametrize("K", [1, 2])
def test_regularizer_matches_reference_float64(K, proj, form):
    # Larger sigma/eps/eta than the paper so that R and delta are far above rounding noise and the
    # projection is active (eta = 1e-2 per step vs eps = 1.5e-2).
    sigma, eps, eta, alpha, seed = 1e-2, 1.5e-2, 1e-2, 10.0, 1234
    cfg = ALUMConfig(alpha=alpha, epsilon=eps, step_size=eta, noise_std=sigma, k_steps=K, projection=proj,
                     divergence=form, include_nsp=True)
    ids, pad_mask, masked, labels, nsp_labels = make_batch()
    model = make_model()

    calls = []
    r, metrics, delta, clean = run_impl(model, ids, pad_mask, masked, cfg, seed, calls)
    assert calls == [K + 1]
    (task_loss_of(clean, labels, nsp_labels) + alpha * r).backward()
    g_impl = grads_of(model)
    model.zero_grad(set_to_none=True)

    e_ref = model.word(ids)
    clean_ref = model.from_embeds(e_ref, pad_mask, masked)
    r_ref, delta_ref = ref_alum(model, ids, pad_mask, masked, clean_ref, sigma=sigma, eps=eps, eta=eta,
                                K=K, proj=proj, seed=seed, form=form)
    (task_loss_of(clean_ref, labels, nsp_labels) + alpha * r_ref).backward()
    g_ref = grads_of(model)

    assert r_ref.item() > 1e-6  # the comparison below is meaningful
    torch.testing.assert_close(delta, delta_ref, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(r.detach(), r_ref.detach(), atol=1e-12, rtol=1e-9)
    assert metrics["adv"].item() == pytest.approx(r.item())
    assert set(g_impl) == set(g_ref) and "word.weight" in g_impl
    for n in g_ref:
        torch.testing.assert_close(g_impl[n], g_ref[n], atol=1e-12, rtol=1e-9, msg=n)
    # the projection was actually binding somewhere (otherwise the test would not test it)
    if proj == "linf":
        assert (delta_ref.abs() >= eps * (1 - 1e-12)).any()
    else:
        assert (delta_ref.norm(dim=-1) >= eps * (1 - 1e-9)).any()


@pytest.mark.parametrize("proj", ["linf", "l2"])
@pytest.mark.parametrize("K", [1, 2])
def test_regularizer_matches_reference_paper_defaults(K, proj):
    """Paper hyper-parameters (sigma = eps = 1e-5, eta = 1e-3 >> eps), float64 model.

    (In float32 and eval mode the SymKL between the clean and the sigma = 1e-5 pass is ~1e-10, at the
    float32 rounding floor of log-softmax, so the ascent *direction* itself is rounding noise there and
    two correct float32 implementations legitimately disagree; float64 resolves it.)
    """
    cfg = ALUMConfig(k_steps=K, projection=proj)
    ids, pad_mask, masked, labels, nsp_labels = make_batch(1)
    model = make_model(torch.float64, seed=1)
    r, _, delta, clean = run_impl(model, ids, pad_mask, masked, cfg, seed=7)
    (task_loss_of(clean, labels, nsp_labels) + cfg.alpha * r).backward()
    g_impl = grads_of(model)
    model.zero_grad(set_to_none=True)

    e = model.word(ids)
    clean_ref = model.from_embeds(e, pad_mask, masked)
    r_ref, delta_ref = ref_alum(model, ids, pad_mask, masked, clean_ref, sigma=1e-5, eps=1e-5, eta=1e-3,
                                K=K, proj=proj, seed=7)
    (task_loss_of(clean_ref, labels, nsp_labels) + cfg.alpha * r_ref).backward()
    g_ref = grads_of(model)

    torch.testing.assert_close(delta, delta_ref, atol=1e-6 * 1e-5, rtol=1e-6)
    assert r_ref.item() > 0
    assert r.item() == pytest.approx(r_ref.item(), rel=1e-6)
    for n in g_ref:
        torch.testing.assert_close(g_impl[n], g_ref[n], atol=1e-9, rtol=1e-6, msg=n)
    # eta = 100 eps: the step pins delta to the ball boundary at every real token
    if proj == "linf":
        assert torch.allclose(delta.abs().amax(-1)[pad_mask], torch.full((int(pad_mask.sum()),), 1e-5, dtype=delta.dtype))
    else:
        assert torch.allclose(delta.norm(dim=-1)[pad_mask], torch.full((int(pad_mask.sum()),), 1e-5, dtype=delta.dtype))


@pytest.mark.parametrize("proj", ["linf", "l2"])
@pytest.mark.parametrize("K", [1, 2])
def test_regularizer_matches_reference_float32(K, proj):
    """A float32 model (the production dtype) against the reference, to float32 accuracy.

    Perturbations are large here (|e| ~ 1, eps = 0.3) so that SymKL ~ 1e-2 sits far above float32's
    log-softmax rounding (~1e-7 absolute), which is what limits agreement between two float32 codes.
    """
    sigma, eps, eta, seed = 0.2, 0.3, 0.2, 11
    cfg = ALUMConfig(epsilon=eps, step_size=eta, noise_std=sigma, k_steps=K, projection=proj)
    ids, pad_mask, masked, labels, nsp_labels = make_batch(2)
    model = make_model(torch.float32, seed=2)
    r, _, delta, clean = run_impl(model, ids, pad_mask, masked, cfg, seed=seed)
    (task_loss_of(clean, labels, nsp_labels) + cfg.alpha * r).backward()
    g_impl = grads_of(model)
    model.zero_grad(set_to_none=True)

    e = model.word(ids)
    clean_ref = model.from_embeds(e, pad_mask, masked)
    r_ref, delta_ref = ref_alum(model, ids, pad_mask, masked, clean_ref, sigma=sigma, eps=eps, eta=eta,
                                K=K, proj=proj, seed=seed)
    (task_loss_of(clean_ref, labels, nsp_labels) + cfg.alpha * r_ref).backward()
    g_ref = grads_of(model)

    # float32 ascent gradients carry ~1e-6 relative rounding error (up to ~5e-5 on tokens whose gradient
    # is 10x smaller than their neighbours'), which the per-token max-abs normalisation passes on to
    # delta; the 1e-6 agreement with the reference is asserted in float64 above.
    torch.testing.assert_close(delta, delta_ref.float(), atol=1e-4 * eps, rtol=0)
    assert r.item() == pytest.approx(r_ref.item(), rel=1e-5)
    for n in g_ref:
        torch.testing.assert_close(g_impl[n], g_ref[n].float(), atol=1e-5, rtol=1e-4, msg=n)


def test_same_seed_same_result_different_seed_differs():
    cfg = ALUMConfig(noise_std=1e-2, epsilon=1e-2, step_size=1e-2)
    ids, pad_mask, masked, _, _ = make_batch()
    model = make_model()
    r1, _, d1, _ = run_impl(model, ids, pad_mask, masked, cfg, seed=3)
    r2, _, d2, _ = run_impl(model, ids, pad_mask, masked, cfg, seed=3)
    r3, _, d3, _ = run_impl(model, ids, pad_mask, masked, cfg, seed=4)
    assert torch.equal(d1, d2) and r1.item() == r2.item()
    assert not torch.equal(d1, d3)


# --------------------------------------------------------------------------------------------------
# Projection bounds, padding
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("proj", ["linf", "l2"])
def test_projection_bounds_hold_with_step_much_larger_than_eps(proj):
    eps = 1e-5
    cfg = ALUMConfig(epsilon=eps, step_size=10.0, noise_std=1.0, projection=proj)  # eta >> eps, sigma >> eps
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(4, 7, 32, generator=g)
    grad = torch.randn(4, 7, 32, generator=g) * 1e3
    pad = torch.ones(4, 7, dtype=torch.bool)
    pad[0, 5:] = False
    out = ascent_step(delta, grad, cfg, pad)
    if proj == "linf":
        assert out.abs().amax().item() <= eps
        # mostly pinned to the boundary: the step dominates
        assert (out[pad].abs() == eps).float().mean() > 0.9
    else:
        norms = out.norm(dim=-1)
        assert norms.max().item() <= eps * (1 + 1e-6)
        torch.testing.assert_close(norms[pad], torch.full_like(norms[pad], eps), rtol=1e-5, atol=0)
    assert torch.equal(out[~pad], torch.zeros_like(out[~pad]))


def test_project_reference_formulas():
    g = torch.Generator().manual_seed(1)
    d = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    eps = 0.7
    lin = project(d, eps, "linf")
    assert torch.equal(lin, torch.where(d > eps, torch.full_like(d, eps), torch.where(d < -eps, torch.full_like(d, -eps), d)))
    l2 = project(d, eps, "l2")
    for b in range(3):
        for t in range(5):
            n = math.sqrt(sum(x * x for x in d[b, t].tolist()))
            want = d[b, t] * (eps / n) if n > eps else d[b, t]
            torch.testing.assert_close(l2[b, t], want, atol=1e-14, rtol=1e-12)
    assert torch.equal(project(d, eps, "none"), d)
    with pytest.raises(ValueError, match="kind"):
        project(d, eps, "l1")


def test_full_regularizer_respects_bounds_and_zero_padding():
    ids, pad_mask, masked, _, _ = make_batch()
    model = make_model()
    for proj in ("linf", "l2"):
        cfg = ALUMConfig(k_steps=3, projection=proj)  # paper eps, eta = 100 eps
        r, metrics, delta, _ = run_impl(model, ids, pad_mask, masked, cfg, seed=0)
        assert torch.equal(delta[~pad_mask], torch.zeros_like(delta[~pad_mask]))  # exactly zero
        if proj == "linf":
            assert delta.abs().amax().item() <= 1e-5 * (1 + 1e-9)  # (e + delta) - e rounding
        else:
            assert delta.norm(dim=-1).amax().item() <= 1e-5 * (1 + 1e-9)
        assert metrics["ascent_nonfinite"].item() == 0
        # metrics: mean over real tokens of per-token norms
        want_linf = delta.abs().amax(-1)[pad_mask].mean()
        torch.testing.assert_close(metrics["delta_linf"], want_linf)
        torch.testing.assert_close(metrics["delta_l2"], delta.norm(dim=-1)[pad_mask].mean())


def test_init_delta_distribution_padding_and_dtype():
    e = torch.zeros(8, 64, 32, dtype=torch.bfloat16)
    pad = torch.ones(8, 64, dtype=torch.bool)
    pad[:, 40:] = False
    d = init_delta(e, pad, 1e-5, torch.Generator().manual_seed(0))
    assert d.dtype == torch.float32 and d.shape == e.shape and not d.requires_grad
    assert torch.equal(d[~pad], torch.zeros_like(d[~pad]))
    real = d[pad].double()
    assert abs(real.std().item() - 1e-5) < 0.05e-5  # 8*40*32 = 10240 samples
    assert abs(real.mean().item()) < 5 * 1e-5 / math.sqrt(real.numel())
    # same generator seed -> same delta; int 0/1 mask accepted
    d2 = init_delta(e, pad.long(), 1e-5, torch.Generator().manual_seed(0))
    assert torch.equal(d, d2)
    with pytest.raises(ValueError, match="pad_mask shape"):
        init_delta(e, pad[:, :10], 1e-5)


def test_normalize_grad():
    g = torch.tensor([[[1.0, -4.0, 2.0], [0.0, 0.0, 0.0]], [[3e-30, -6e-30, 0.0], [1.0, 1.0, 1.0]]])
    n = normalize_grad(g)
    torch.testing.assert_close(n[0, 0], torch.tensor([0.25, -1.0, 0.5]))
    assert torch.equal(n[0, 1], torch.zeros(3))  # zero stays zero, no NaN
    torch.testing.assert_close(n[1, 0], torch.tensor([0.5, -1.0, 0.0]))  # scale-free for tiny gradients
    n2 = normalize_grad(g, "l2")
    torch.testing.assert_close(n2[1, 1].norm(), torch.tensor(1.0))
    seq = normalize_grad(g, "linf", "sequence")
    torch.testing.assert_close(seq[0], g[0] / 4.0)
    with pytest.raises(ValueError):
        normalize_grad(g, "l1")


def test_perturb_keeps_tiny_delta_in_float32():
    e = torch.full((2, 3, 4), 0.05)
    d = torch.full((2, 3, 4), 1e-5)
    out = perturb(e, d)
    assert out.dtype == torch.float32
    assert torch.all(out - e > 0)  # not rounded away
    eb = e.to(torch.bfloat16)
    assert perturb(eb, d).dtype == torch.bfloat16  # the model's dtype is respected


# --------------------------------------------------------------------------------------------------
# Gradient routing
# --------------------------------------------------------------------------------------------------


def test_ascent_writes_no_parameter_grad_and_fires_no_param_hook():
    ids, pad_mask, masked, _, _ = make_batch()
    model = make_model()
    fired = []
    # DDP's all-reduce hangs off exactly these per-parameter post-accumulate hooks
    for n, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda _p, n=n: fired.append(n))
    cfg = ALUMConfig(k_steps=2)
    r, _, _, _ = run_impl(model, ids, pad_mask, masked, cfg, seed=0)
    assert fired == []  # the K ascent backward passes touched no parameter
    assert all(p.grad is None for p in model.parameters())
    r.backward()
    assert all(p.grad is not None for n, p in model.named_parameters())
    assert sorted(fired) == sorted(n for n, _ in model.named_parameters())  # once each, in ONE backward


def test_gradient_reaches_both_graphs():
    ids, pad_mask, masked, _, _ = make_batch()
    model = make_model()
    cfg = ALUMConfig(noise_std=1e-2, epsilon=1e-2, step_size=1e-2, divergence="sym_kl")  # the hand formula below
    e = model.word(ids)
    e.retain_grad()
    mlm, nsp = model.from_embeds(e, pad_mask, masked)
    mlm.retain_grad()
    nsp.retain_grad()
    adv_outs = []

    def fwd(x):
        out = model.from_embeds(x, pad_mask, masked)
        adv_outs.append(out)
        for o in out:
            if o.requires_grad:
                o.retain_grad()
        return out

    r, _ = alum_regularizer(fwd, e, (mlm, nsp), cfg, pad_mask=pad_mask, generator=torch.Generator().manual_seed(0))
    r.backward()
    # into the clean graph: dR/d clean logits = d KL(clean || sg adv) / d clean, by hand
    adv_mlm, adv_nsp = adv_outs[-1]
    for clean_l, adv_l in ((mlm, adv_mlm), (nsp, adv_nsp)):
        q = torch.softmax(clean_l.detach(), -1)
        lp = torch.log(torch.softmax(adv_l.detach(), -1))
        lq = torch.log(q)
        kl = (q * (lq - lp)).sum(-1, keepdim=True)
        want = q * (lq - lp - kl) / clean_l.shape[0]  # d/dz KL(softmax(z) || p), mean over rows
        assert clean_l.grad.abs().max() > 0
        torch.testing.assert_close(clean_l.grad, want, atol=1e-12, rtol=1e-8)
        assert adv_l.grad.abs().max() > 0  # into the adversarial graph
    # and into the embedding parameters (embeds not detached in the final pass)
    assert e.grad is not None and e.grad.abs().max() > 0


# --------------------------------------------------------------------------------------------------
# alpha = 0 / inactive, and the objective (alum_pretrain.objective) around the regulariser
# --------------------------------------------------------------------------------------------------


def test_inactive_equals_plain_objective_and_never_calls_forward():
    from alum_pretrain.objective import Normalizers, pretrain_objective

    ids, pad_mask, masked, labels, nsp_labels = make_batch()
    model = make_model()
    e = model.word(ids)
    clean = model.from_embeds(e, pad_mask, masked)
    task = task_loss_of(clean, labels, nsp_labels)  # means: the normalisers are the counts
    norm = Normalizers(mlm=float(labels.numel()), nsp=float(B))
    calls = []

    def heads(x, with_nsp):
        calls.append(with_nsp)
        mlm, nsp = model.from_embeds(x, pad_mask, masked)
        return mlm, nsp if with_nsp else None

    def objective(cfg, on, **kw):
        return pretrain_objective(heads, e, clean, mlm_targets=labels, nsp_labels=nsp_labels, pad_mask=pad_mask,
                                  alum=cfg, alum_on=on, norm=norm, **kw)

    for cfg, step in ((ALUMConfig(alpha=0.0), 10), (ALUMConfig(start_step=100), 99)):
        assert not cfg.active(step)
        loss, metrics = objective(cfg, cfg.active(step))
        torch.testing.assert_close(loss, task)
        assert set(metrics) == {"mlm", "nsp", "nsp_correct"}
    loss, _ = objective(ALUMConfig(alpha=0.0), True)  # alpha = 0: never a pass, whatever the caller says
    assert calls == []
    assert int(objective(ALUMConfig(), False)[1]["nsp_correct"]) == int((clean[1].argmax(-1) == nsp_labels).sum())

    # Active: + alpha * R on the MLM head only (the paper), R the row mean like the task terms here.
    cfg = ALUMConfig(start_step=100)
    assert cfg.active(100)
    torch.manual_seed(5)
    loss, metrics = pretrain_objective(heads, e, clean, mlm_targets=labels, nsp_labels=nsp_labels,
                                       pad_mask=pad_mask, alum=cfg, alum_on=cfg.active(100), norm=norm,
                                       generators=None)
    assert calls == [False, False]  # K = 1 ascent + the adversarial pass, no NSP head in R
    torch.manual_seed(5)
    r, _ = alum_regularizer(lambda x: (model.from_embeds(x, pad_mask, masked)[0], None), e, (clean[0], None), cfg,
                            pad_mask=pad_mask)
    torch.testing.assert_close(loss, task + 10.0 * r)
    torch.testing.assert_close(metrics["adv"], r.detach())
    assert {"adv", "delta_linf", "ascent_nonfinite", "ascent_zero_grad_frac", "adv_nonfinite"} <= set(metrics)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in metrics.values())

    # include_nsp: R = sum over masked rows / norm.mlm + sum over sequences / norm.nsp (each head a mean here),
    # and nsp_weight scales the NSP cross-entropy only.
    cfg = ALUMConfig(include_nsp=True)
    calls.clear()
    torch.manual_seed(5)
    loss, metrics = objective(cfg, True, nsp_weight=0.5)
    assert calls == [True, True]
    torch.manual_seed(5)
    r, _ = alum_regularizer(lambda x: model.from_embeds(x, pad_mask, masked), e, clean, cfg, pad_mask=pad_mask)
    plain = nn.functional.cross_entropy(clean[0], labels) + 0.5 * nn.functional.cross_entropy(clean[1], nsp_labels)
    torch.testing.assert_close(loss, plain + 10.0 * r)

    # No masked token: nothing to regularise, no extra pass.
    calls.clear()
    empty = torch.zeros(B, T, dtype=torch.bool)
    e2 = model.word(ids)
    c2 = model.from_embeds(e2, pad_mask, empty)
    _, metrics = pretrain_objective(heads, e2, c2, mlm_targets=labels[:0], nsp_labels=None, pad_mask=pad_mask,
                                    alum=ALUMConfig(), alum_on=True, norm=norm)
    assert calls == [] and "adv" not in metrics and "nsp" not in metrics


def test_head_weights_scale_each_head():
    """head_weights multiply each head's divergence: R and the ascent see the weighted sum."""
    ids, pad_mask, masked, _, _ = make_batch()
    model = make_model()
    cfg = ALUMConfig(noise_std=1e-3, epsilon=1e-2, step_size=1e-2)
    r1, m1, _, _ = run_impl(model, ids, pad_mask, masked, cfg, seed=3)
    e = model.word(ids)
    clean = model.from_embeds(e, pad_mask, masked)
    r2, m2 = alum_regularizer(lambda x: model.from_embeds(x, pad_mask, masked), e, clean, cfg, pad_mask=pad_mask,
                              generator=torch.Generator().manual_seed(3), head_weights=(2.0, 2.0))
    torch.testing.assert_close(r2, 2.0 * r1)  # a common factor leaves the ascent direction unchanged
    torch.testing.assert_close(m2["delta_linf"], m1["delta_linf"])
    with pytest.raises(ValueError, match="head_weights"):
        alum_regularizer(lambda x: model.from_embeds(x, pad_mask, masked), e, clean, cfg, head_weights=(1.0,))


def test_none_heads_are_skipped_and_single_tensor_accepted():
    ids, pad_mask, masked, _, _ = make_batch()
    model = make_model()
    e = model.word(ids)
    mlm, _ = model.from_embeds(e, pad_mask, masked)
    cfg = ALUMConfig(noise_std=1e-2, epsilon=1e-2, step_size=1e-2)

    def fwd_tuple(x):
        return (model.from_embeds(x, pad_mask, masked)[0], None)

    def fwd_single(x):
        return model.from_embeds(x, pad_mask, masked)[0]

    r1, _ = alum_regularizer(fwd_tuple, e, (mlm, None), cfg, pad_mask, torch.Generator().manual_seed(0))
    r2, _ = alum_regularizer(fwd_single, e, mlm, cfg, pad_mask, torch.Generator().manual_seed(0))
    assert r1.item() == r2.item() and r1.item() > 0
    with pytest.raises(ValueError, match="None"):
        alum_regularizer(fwd_tuple, e, (None, None), cfg, pad_mask)
    with pytest.raises(ValueError, match="same structure"):
        alum_regularizer(fwd_single, e, (mlm, None), cfg, pad_mask)


def test_nonfinite_ascent_gradient_skips_update_and_is_reported():
    ids, pad_mask, masked, _, _ = make_batch()
    model = make_model()
    e = model.word(ids)
    clean = model.from_embeds(e, pad_mask, masked)
    cfg = ALUMConfig(k_steps=1)
    inputs = []

    def fwd(x):
        inputs.append(x.detach().clone())
        mlm, nsp = model.from_embeds(x, pad_mask, masked)
        if len(inputs) == 1:  # ascent pass blows up
            mlm = mlm * torch.tensor(float("nan"), dtype=mlm.dtype)
        return mlm, nsp

    r, metrics = alum_regularizer(fwd, e, clean, cfg, pad_mask, torch.Generator().manual_seed(2))
    assert metrics["ascent_nonfinite"].item() == 1.0
    assert torch.isfinite(r)  # the final term is still computed
    d0 = init_delta(e, pad_mask, cfg.noise_std, torch.Generator().manual_seed(2))
    torch.testing.assert_close(inputs[-1] - e.detach(), d0, atol=1e-15, rtol=0)  # delta kept its init


# --------------------------------------------------------------------------------------------------
# symmetric_kl
# --------------------------------------------------------------------------------------------------


def test_symmetric_kl_matches_hand_formula_symmetric_and_zero():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(6, 11, generator=g, dtype=torch.float64) * 3
    q = torch.randn(6, 11, generator=g, dtype=torch.float64) * 3
    # hand-written: (1/N) sum_rows sum_c (P - Q)(log P - log Q) = KL(P||Q) + KL(Q||P)
    P, Q = torch.softmax(p, -1), torch.softmax(q, -1)
    want = ((P - Q) * (torch.log(P) - torch.log(Q))).sum() / 6
    torch.testing.assert_close(symmetric_kl(p, q), want, atol=1e-14, rtol=1e-12)
    torch.testing.assert_close(symmetric_kl(q, p), symmetric_kl(p, q), atol=1e-14, rtol=1e-12)
    assert symmetric_kl(p, p).item() == pytest.approx(0.0, abs=1e-15)
    # rows = leading dims: (2, 3, C) equals (6, C)
    torch.testing.assert_close(symmetric_kl(p.reshape(2, 3, 11), q.reshape(2, 3, 11)), symmetric_kl(p, q))
    # zero rows: a differentiable 0, not NaN
    e = torch.zeros(0, 11, requires_grad=True)
    z = symmetric_kl(e, e)
    assert z.item() == 0.0
    z.backward()


def test_symmetric_kl_gradient_routing():
    g = torch.Generator().manual_seed(1)
    p = (torch.randn(4, 5, generator=g, dtype=torch.float64)).requires_grad_()
    q = (torch.randn(4, 5, generator=g, dtype=torch.float64)).requires_grad_()
    symmetric_kl(p, q).backward()
    # d/dp of KL(softmax(p) || sg softmax(q)), mean over rows: P * (log P - log Q - KL)
    P, Q = torch.softmax(p.detach(), -1), torch.softmax(q.detach(), -1)
    kl_pq = (P * (P.log() - Q.log())).sum(-1, keepdim=True)
    kl_qp = (Q * (Q.log() - P.log())).sum(-1, keepdim=True)
    torch.testing.assert_close(p.grad, P * (P.log() - Q.log() - kl_pq) / 4, atol=1e-14, rtol=1e-10)
    torch.testing.assert_close(q.grad, Q * (Q.log() - P.log() - kl_qp) / 4, atol=1e-14, rtol=1e-10)


@pytest.mark.parametrize("form", ["sym_kl_ce", "sym_kl"])
@pytest.mark.parametrize("which", ["both", "p", "q"])
def test_symmetric_kl_value_and_gradients_equal_autograd_of_the_reference(form, which):
    """The fused divergence (closed-form backward) against autograd through ref_symkl (softmax/log, float64)
    with the stop-gradients of each form; rows are the leading dims (2, 3); only the inputs that require
    grad get one."""
    g = torch.Generator().manual_seed(3)
    p0 = torch.randn(2, 3, 29, generator=g, dtype=torch.float64) * 4
    q0 = p0 + torch.randn(2, 3, 29, generator=g, dtype=torch.float64)
    p, q = p0.clone().requires_grad_(which in ("both", "p")), q0.clone().requires_grad_(which in ("both", "q"))
    rp, rq = p0.clone().requires_grad_(which in ("both", "p")), q0.clone().requires_grad_(which in ("both", "q"))
    out = get_divergence(form)(p, q)
    want = ref_symkl(rp.reshape(6, 29), rq.reshape(6, 29), form)
    torch.testing.assert_close(out, want, atol=1e-13, rtol=1e-11)
    (out * 2.5).backward()
    (want * 2.5).backward()
    for mine, ref in ((p, rp), (q, rq)):
        if ref.requires_grad:
            torch.testing.assert_close(mine.grad, ref.grad, atol=1e-13, rtol=1e-10)
        else:
            assert mine.grad is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", ["sym_kl_ce", "sym_kl"])
def test_symmetric_kl_gradients_come_back_in_the_input_dtype(form, dtype):
    """16-bit logits (what autocast gives the heads): float32 value, gradients in the logits' dtype equal to
    the float32 computation's, also when computed under CPU autocast."""
    g = torch.Generator().manual_seed(4)
    p = (torch.randn(5, 40, generator=g) * 3).to(dtype).requires_grad_()
    q = (torch.randn(5, 40, generator=g) * 3).to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        out = get_divergence(form)(p, q)
    out.backward()
    p32, q32 = p.detach().float().requires_grad_(), q.detach().float().requires_grad_()
    want = get_divergence(form)(p32, q32)
    want.backward()
    assert out.dtype == torch.float32 and out.item() == want.item()
    assert p.grad.dtype == q.grad.dtype == dtype
    torch.testing.assert_close(p.grad, p32.grad.to(dtype))
    torch.testing.assert_close(q.grad, q32.grad.to(dtype))


def test_symmetric_kl_float32_under_bf16_inputs():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(8, 50, generator=g).to(torch.bfloat16)
    q = torch.randn(8, 50, generator=g).to(torch.bfloat16)
    out = symmetric_kl(p, q)
    assert out.dtype == torch.float32
    want = symmetric_kl(p.float(), q.float())
    assert out.item() == want.item()
    with pytest.raises(ValueError, match="shapes differ"):
        symmetric_kl(p, q[:, :10])


def test_bf16_autocast_end_to_end():
    ids, pad_mask, masked, _, _ = make_batch()
    model = make_model(torch.float32)
    cfg = ALUMConfig(noise_std=1e-3, epsilon=1e-3, step_size=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        e = model.word(ids)  # float32: embedding is not autocast
        clean = model.from_embeds(e, pad_mask, masked)
        inputs = []

        def fwd(x):
            inputs.append(x)
            return model.from_embeds(x, pad_mask, masked)

        r, metrics = alum_regularizer(fwd, e, clean, cfg, pad_mask, torch.Generator().manual_seed(0))
    assert clean[0].dtype == torch.bfloat16
    assert r.dtype == torch.float32 and torch.isfinite(r)
    assert all(x.dtype == torch.float32 for x in inputs)  # perturbed embeddings enter in float32
    assert metrics["delta_linf"].dtype == torch.float32 and metrics["delta_linf"].item() > 0
    r.backward()
    assert model.word.weight.grad is not None


# --------------------------------------------------------------------------------------------------
# Config validation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,field", [
    (dict(alpha=-1.0), "alpha"),
    (dict(alpha=float("nan")), "alpha"),
    (dict(epsilon=0.0), "epsilon"),
    (dict(step_size=-1e-3), "step_size"),
    (dict(noise_std="x"), "noise_std"),
    (dict(k_steps=-1), "k_steps"),
    (dict(k_steps=1.5), "k_steps"),
    (dict(projection="l1"), "projection"),
    (dict(perturb_at="hidden"), "perturb_at"),
    (dict(start_step=-3), "start_step"),
])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"alum\.{field}="):
        ALUMConfig(**kwargs)


def test_config_defaults_are_the_papers():
    c = ALUMConfig()
    assert (c.alpha, c.epsilon, c.step_size, c.noise_std, c.k_steps, c.projection, c.perturb_at, c.start_step) == \
        (10.0, 1e-5, 1e-3, 1e-5, 1, "linf", "word", 0)
    assert ALUMConfig(projection="none", epsilon=0.0).projection == "none"  # eps unused without projection


def test_init_delta_per_sample_generators_independent_of_batch_split():
    e = torch.zeros(4, 6, 8)
    gens = lambda idx: [torch.Generator().manual_seed(100 + i) for i in idx]  # noqa: E731
    full = init_delta(e, None, 1e-5, gens(range(4)))
    halves = torch.cat([init_delta(e[:2], None, 1e-5, gens([0, 1])), init_delta(e[2:], None, 1e-5, gens([2, 3]))])
    assert torch.equal(full, halves)
    row2 = torch.randn(6, 8, generator=torch.Generator().manual_seed(102)) * 1e-5
    assert torch.equal(full[2], row2)
    with pytest.raises(ValueError, match="generators"):
        init_delta(e, None, 1e-5, gens(range(3)))


def test_hf_bert_through_inputs_embeds_matches_reference():
    """A tiny HF BertForPreTraining (dropout 0): delta on the word-embedding output via inputs_embeds."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    conf = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0)
    model = transformers.BertForPreTraining(conf).double().eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 50, (2, 10), generator=g)
    attn = torch.ones(2, 10, dtype=torch.long)
    attn[1, 7:] = 0
    masked = torch.zeros(2, 10, dtype=torch.bool)
    masked[0, [2, 5]] = True
    masked[1, [1, 3, 4]] = True

    def fwd(e):
        out = model(inputs_embeds=e, attention_mask=attn)
        return out.prediction_logits[masked], out.seq_relationship_logits  # (N, V), (B, 2)

    cfg = ALUMConfig(noise_std=1e-2, epsilon=2e-2, step_size=1.5e-2, k_steps=2)
    e = model.get_input_embeddings()(ids)
    clean = fwd(e)
    inputs = []

    def rec(x):
        inputs.append(x.detach().clone())
        return fwd(x)

    r, _ = alum_regularizer(rec, e, clean, cfg, pad_mask=attn, generator=torch.Generator().manual_seed(9))

    # reference, Algorithm 1 by hand
    gen = torch.Generator().manual_seed(9)
    keep = attn.to(e.dtype).unsqueeze(-1)
    delta = torch.randn(e.shape, generator=gen, dtype=e.dtype) * 1e-2 * keep
    for _ in range(2):
        delta = delta.detach().requires_grad_(True)
        adv = fwd(e.detach() + delta)
        loss = ref_symkl(adv[0], clean[0].detach()) + ref_symkl(adv[1], clean[1].detach())
        (gd,) = torch.autograd.grad(loss, delta)
        m = gd.abs().amax(-1, keepdim=True)
        step = torch.where(m > 0, gd / torch.where(m > 0, m, torch.ones_like(m)), torch.zeros_like(gd))
        delta = torch.minimum(torch.maximum(delta.detach() + 1.5e-2 * step, torch.tensor(-2e-2, dtype=e.dtype)),
                              torch.tensor(2e-2, dtype=e.dtype)) * keep
    adv = fwd(e + delta)
    r_ref = ref_symkl(adv[0], clean[0]) + ref_symkl(adv[1], clean[1])
    torch.testing.assert_close(inputs[-1] - e.detach(), delta.detach(), atol=1e-12, rtol=1e-9)
    assert r_ref.item() > 1e-6
    assert r.item() == pytest.approx(r_ref.item(), rel=1e-9)


def test_moved_names_stay_importable_from_adversarial():
    """The divergences and the precision helpers moved to their own modules; the old imports still work."""
    import alum_pretrain.adversarial as adv
    import alum_pretrain.divergence as div
    import alum_pretrain.precision as prec

    for mod, names in ((div, ("DIVERGENCES", "symmetric_kl", "symmetric_kl_ce", "get_divergence")),
                       (prec, ("ASCENT_GRAD_TARGET", "scale_free_input_grad", "zero_grad_fraction",
                               "check_perturbation_resolution"))):
        for name in names:
            assert name in adv.__all__ and getattr(adv, name) is getattr(mod, name), name
