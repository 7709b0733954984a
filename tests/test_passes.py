"""The adversarial passes' dropout (alum.adv_dropout), R-Drop as the control objective and the relative
epsilon scale (alum_pretrain/passes.py, adversarial.py), each against a reference written by hand from its
definition: two dropout passes and a softmax KL for R-Drop, the per-token RMS / L2 norm for ``scale=rel``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from alum_pretrain.adversarial import ALUMConfig, alum_regularizer
from alum_pretrain.passes import AdversarialPasses

V, H, T, B = 29, 12, 7, 3


class DropoutMLM(nn.Module):
    """embeddings -> LayerNorm -> dropout -> MLP -> dropout -> LM head on the masked positions."""

    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.word = nn.Embedding(V, H)
        self.ln = nn.LayerNorm(H)
        self.mlp = nn.Sequential(nn.Linear(H, 2 * H), nn.GELU(), nn.Dropout(p), nn.Linear(2 * H, H))
        self.drop = nn.Dropout(p)
        self.lm = nn.Linear(H, V)

    def heads(self, e, masked):
        h = self.drop(self.ln(e))
        h = h + self.mlp(h)
        return self.lm(h[masked])  # (N, V)


def setup(p=0.3, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = DropoutMLM(p).to(dtype).train()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    masked = torch.rand(B, T, generator=g) < 0.5
    masked[:, 0] = True
    return model, ids, masked


def ref_symkl(p_logits, q_logits):
    """KL(p||q) + KL(q||p) per row from sum_c p_c log(p_c/q_c), mean over rows (both forms share the value)."""
    p = torch.softmax(p_logits.double(), -1)
    q = torch.softmax(q_logits.double(), -1)
    return ((p * (p.log() - q.log())).sum(-1) + (q * (q.log() - p.log())).sum(-1)).mean()


def run(model, ids, masked, cfg, *, rng_seed=7, gen_seed=3):
    """Clean pass + alum_regularizer, with the passes captured right before the clean pass."""
    torch.manual_seed(rng_seed)
    e = model.word(ids)
    passes = AdversarialPasses.capture(cfg.adv_dropout, model, e.device)
    clean = model.heads(e, masked)
    r, m = alum_regularizer(lambda x: model.heads(x, masked), e, clean, cfg,
                            generator=torch.Generator().manual_seed(gen_seed), passes=passes)
    return r, m, clean


def test_shared_dropout_with_zero_delta_gives_exactly_zero():
    model, ids, masked = setup()
    cfg = ALUMConfig(noise_std=0.0, k_steps=0, adv_dropout="shared", log_baseline=True)
    r, m, _ = run(model, ids, masked, cfg)
    assert r.item() == 0.0 and m["adv_dropout"].item() == 0.0
    # ... while with independent masks the same delta = 0 leaves the dropout disagreement (R-Drop's term)
    r_ind, _, _ = run(model, ids, masked, ALUMConfig(noise_std=0.0, k_steps=0))
    assert r_ind.item() > 1e-3


def test_independent_zero_delta_equals_rdrop_and_the_two_pass_reference():
    model, ids, masked = setup()
    r_ind, _, _ = run(model, ids, masked, ALUMConfig(noise_std=0.0, k_steps=0))
    r_rdrop, m, _ = run(model, ids, masked, ALUMConfig(objective="rdrop", k_steps=3))  # K ignored: no ascent
    assert r_rdrop.item() == r_ind.item()
    assert m["delta_linf"].item() == 0.0
    # reference: two dropout passes drawn one after the other from the same global stream
    torch.manual_seed(7)
    e = model.word(ids)
    first = model.heads(e, masked)
    second = model.heads(e, masked)
    assert r_rdrop.item() == pytest.approx(ref_symkl(first, second).item(), rel=1e-12, abs=1e-15)


def test_off_runs_the_adversarial_pass_in_eval_mode_and_restores_training():
    model, ids, masked = setup()
    model.drop.eval()  # a submodule the user froze stays frozen afterwards
    r, _, clean = run(model, ids, masked, ALUMConfig(noise_std=0.0, k_steps=0, adv_dropout="off"))
    assert model.training and model.mlp.training and not model.drop.training
    model.eval()
    with torch.no_grad():
        ref = ref_symkl(clean, model.heads(model.word(ids), masked))
    assert r.item() == pytest.approx(ref.item(), rel=1e-12)


def test_shared_leaves_the_training_rng_stream_as_after_the_clean_pass():
    model, ids, masked = setup()
    torch.manual_seed(11)
    e = model.word(ids)
    passes = AdversarialPasses.capture("shared", model, "cpu")
    clean = model.heads(e, masked)
    after_clean = torch.get_rng_state()
    alum_regularizer(lambda x: model.heads(x, masked), e, clean, ALUMConfig(k_steps=2, adv_dropout="shared"),
                     generator=torch.Generator().manual_seed(0), passes=passes, baseline=True)
    assert torch.equal(torch.get_rng_state(), after_clean)


def test_without_dropout_the_mode_changes_nothing():
    model, ids, masked = setup(p=0.0)
    vals = {mode: run(model, ids, masked, ALUMConfig(k_steps=2, step_size=1e-3, epsilon=1e-3,
                                                     adv_dropout=mode))[0].item()
            for mode in ("independent", "shared", "off")}
    assert vals["independent"] > 0
    assert vals["independent"] == vals["shared"] == pytest.approx(vals["off"], rel=1e-12)


def test_shared_with_delta_measures_the_perturbation_only():
    """Shared masks: R at the adversarial delta equals SymKL(clean, same-mask pass at e + delta) by hand."""
    model, ids, masked = setup()
    cfg = ALUMConfig(k_steps=1, epsilon=1e-2, step_size=1e-2, noise_std=1e-3, adv_dropout="shared")
    torch.manual_seed(7)
    e = model.word(ids)
    passes = AdversarialPasses.capture("shared", model, "cpu")
    state = torch.get_rng_state()
    clean = model.heads(e, masked)
    seen = []

    def fwd(x):
        seen.append(x.detach().clone())
        return model.heads(x, masked)

    r, _ = alum_regularizer(fwd, e, clean, cfg, generator=torch.Generator().manual_seed(3), passes=passes)
    torch.set_rng_state(state)
    ref = ref_symkl(clean, model.heads(seen[-1], masked))  # the clean pass's masks, replayed by hand
    assert r.item() == pytest.approx(ref.item(), rel=1e-12) and r.item() > 0


def ref_rel_delta(e, sigma, eta, eps, K, proj, grads, noise):
    """Algorithm 1 with every size a multiple of the token's own scale: sigma, eta and the L-inf radius times
    the token's RMS over H, the L2 radius times its L2 norm. ``grads``: the ascent gradients, replayed."""
    delta = noise.clone()
    for b in range(e.shape[0]):
        for t in range(e.shape[1]):
            rms = torch.sqrt((e[b, t] ** 2).sum() / e.shape[-1])
            delta[b, t] = noise[b, t] * sigma * rms
    for k in range(K):
        for b in range(e.shape[0]):
            for t in range(e.shape[1]):
                rms = torch.sqrt((e[b, t] ** 2).sum() / e.shape[-1])
                g = grads[k][b, t]
                m = g.abs().max()
                new = delta[b, t] + eta * rms * g / m if m > 0 else delta[b, t].clone()  # no gradient: no step
                if proj == "linf":
                    new = torch.minimum(torch.maximum(new, -eps * rms), eps * rms)
                else:
                    radius = eps * torch.sqrt((e[b, t] ** 2).sum())
                    n = torch.sqrt((new ** 2).sum())
                    new = new * (radius / n) if n > radius else new
                delta[b, t] = new
    return delta


@pytest.mark.parametrize("proj", ["linf", "l2"])
def test_relative_scale_matches_the_per_token_reference(proj):
    model, ids, masked = setup(p=0.0)
    with torch.no_grad():  # tokens of very different scales
        model.word.weight.mul_(torch.logspace(-3, 1, V, dtype=torch.float64).unsqueeze(-1))
    cfg = ALUMConfig(k_steps=2, epsilon=0.05, step_size=0.03, noise_std=0.01, projection=proj, scale="rel")
    e = model.word(ids).detach()
    grads, inputs = [], []

    def fwd(x):
        inputs.append(x.detach().clone())
        return model.heads(x, masked)

    # capture the ascent gradients the implementation used (replayed in the reference)
    orig = torch.autograd.grad

    def spy(outputs, inputs_, *a, **k):
        out = orig(outputs, inputs_, *a, **k)
        if out[0] is not None and out[0].shape == e.shape:  # the gradient w.r.t. delta (not the logits')
            grads.append(out[0].detach().clone())
        return out

    torch.autograd.grad = spy
    try:
        clean = model.heads(e, masked)
        alum_regularizer(fwd, e, clean, cfg, generator=torch.Generator().manual_seed(5))
    finally:
        torch.autograd.grad = orig
    noise = torch.randn(e.shape, generator=torch.Generator().manual_seed(5), dtype=e.dtype)
    ref = ref_rel_delta(e, cfg.noise_std, cfg.step_size, cfg.epsilon, 2, proj, grads, noise)
    got = inputs[-1] - e
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-15)
    # the bound, in the ball's own norm relative to the token
    if proj == "linf":
        ratio = got.abs().amax(-1) / e.pow(2).mean(-1).sqrt()
    else:
        ratio = got.norm(dim=-1) / e.norm(dim=-1)
    assert ratio.max().item() <= cfg.epsilon * (1 + 1e-9)
    # every token the loss sees (the model mixes no positions) moved on its own scale, tiny ones too
    assert ratio[masked].min().item() >= cfg.epsilon * 0.5


def test_relative_scale_is_invariant_to_rescaling_the_embeddings():
    """f(c * e) == f(e) for a model that normalises first: with scale=rel, R is the same for any c."""
    model, ids, masked = setup(p=0.0)
    model.ln.eps = 1e-30  # LayerNorm exactly scale-free (its default eps would matter at c = 1e-3)
    cfg = ALUMConfig(k_steps=1, epsilon=1e-2, step_size=1e-2, noise_std=1e-3, scale="rel")
    vals = []
    for c in (1.0, 1e-3, 50.0):
        e = model.word(ids) * c
        clean = model.heads(e, masked)
        r, _ = alum_regularizer(lambda x: model.heads(x, masked), e, clean, cfg,
                                generator=torch.Generator().manual_seed(1))
        vals.append(r.item())
    assert vals[0] > 0
    assert vals[1] == pytest.approx(vals[0], rel=1e-6) and vals[2] == pytest.approx(vals[0], rel=1e-6)


@pytest.mark.parametrize("kwargs,field", [
    (dict(adv_dropout="same"), "alum.adv_dropout"),
    (dict(objective="vat"), "alum.objective"),
    (dict(scale="relative"), "alum.scale"),
    (dict(objective="rdrop", adv_dropout="shared"), "alum.adv_dropout"),
    (dict(objective="rdrop", adv_dropout="off"), "alum.adv_dropout"),
])
def test_config_names_the_flag(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        ALUMConfig(**kwargs)


def test_shared_without_captured_passes_is_a_clear_error():
    model, ids, masked = setup()
    e = model.word(ids)
    clean = model.heads(e, masked)
    with pytest.raises(ValueError, match="adv_dropout=shared"):
        alum_regularizer(lambda x: model.heads(x, masked), e, clean, ALUMConfig(adv_dropout="shared"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_shared_and_rel_under_cpu_autocast(dtype):
    model, ids, masked = setup(dtype=torch.float32)
    cfg = ALUMConfig(k_steps=1, epsilon=1e-2, step_size=1e-2, scale="rel", adv_dropout="shared",
                     log_baseline=True)
    with torch.autocast("cpu", dtype=dtype):
        r, m, _ = run(model, ids, masked, cfg)
    assert torch.isfinite(r) and r.item() > 0 and m["adv_dropout"].item() == 0.0
