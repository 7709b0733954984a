"""ALUM: the virtual-adversarial regulariser of Liu et al. (2020), engine-independent (torch only).

Method card
===========

**What.** ALUM (Adversarial training for large neural LangUage Models, Liu et al. 2020, Eq. 3 and
Algorithm 1) adds to the task loss ``L`` (MLM cross-entropy on the masked tokens, + NSP) a virtual
adversarial smoothness term::

    loss = L(f(e), y) + alpha * max_{||delta|| <= eps} SymKL(f(e + delta), f(e))

where ``e`` is the sub-word embedding of the input, ``f`` the rest of the model and SymKL the symmetric
KL divergence between the clean and the perturbed output distributions (over the *masked-token* MLM
distributions, plus the NSP distribution when NSP is on).  The inner max is approximated by ``K``
projected normalised-gradient-ascent steps from a small random start (Algorithm 1, lines 3-7):

1. clean pass (done by the caller): ``z = f(e)``, task loss ``L``;
2. ``delta ~ N(0, sigma^2)`` with the shape of ``e``, zero at padding            -> :func:`init_delta`;
3. ``K`` times: ``z_adv = f(e.detach() + delta)``;
   ``g = grad_delta SymKL(z_adv, z.detach())`` (an *input-only* gradient);
   ``delta <- Proj_eps(delta + eta * g / ||g||_inf,token)``                      -> :func:`ascent_step`;
4. adversarial pass ``z_adv = f(e + delta.detach())``, ``R = SymKL(z_adv, z)`` -> :func:`alum_regularizer`;
5. ``loss = L + alpha * R``; one backward; one optimizer step  -> :func:`alum_pretrain.objective.pretrain_objective`.

**Defaults (the paper, Sec. 4.2).** ``epsilon`` = 1e-5, ``step_size`` (eta) = 1e-3, ``noise_std``
(sigma) = 1e-5, ``k_steps`` (K) = 1, ``alpha`` = 10 for pre-training and 1 for fine-tuning.  The paper's
"curriculum": train with the standard objective first and switch ALUM on later (``start_step``; the
paper used the last 500K of 1M BERT steps, and ALUM from step 0 for continual pre-training of RoBERTa).

**alpha = 0.** ``alpha == 0`` (or ``step < start_step``) means *do not call the regulariser*: the engine
runs a standard step with no extra forward or backward pass (:func:`alum_pretrain.objective.pretrain_objective`
skips the call).

**Cost per step (K = 1).** Three forwards (clean, noisy start, adversarial), one input-only backward
for the ascent (no weight gradients) and one backward through two graphs (clean + adversarial).  Counting
a forward as 1 unit and a full backward as 2 (input grads 1 + weight grads 1): standard = 1 + 2 = 3;
ALUM = 3 forwards + 1 (input-only ascent backward) + 2 * 2 (full backward through two graphs) = 8, so the
floor is 8/3 ~= 2.67x a standard step.  Each extra ascent step adds one forward and one input-only
backward (+2/3).  Staying at the floor is the caller's job: run the LM head on masked positions only in
every forward, and keep the ascent free of parameter gradients and DDP synchronisation (this module
uses ``torch.autograd.grad(loss, delta)`` only, so no ``AccumulateGrad`` hook - hence no DDP all-reduce
hook - fires during the ascent; with DDP, call the *unwrapped* module (``ddp.module``) in ``forward_fn``
so DDP's forward bookkeeping runs only for the clean pass, whose prepared reducer then reduces the
summed clean + adversarial gradients in the single final backward).

**Where delta is applied.** ``embeds`` is whatever the caller perturbs; with ``perturb_at: word``
(default, FreeLB's choice) it is the output of the word-embedding lookup, *before* position/segment
embeddings and the embedding LayerNorm - for HuggingFace models: ``inputs_embeds =
model.get_input_embeddings()(input_ids)`` and ``forward_fn = lambda e: model(inputs_embeds=e, ...)``.
``perturb_at: embedding_output`` is mt-dnn's placement (after the embedding LayerNorm), to be wired by
the engine with a forward hook on the embeddings module.  This module does not care which: the
projection and normalisation are per token over the last (hidden) dimension in both cases.

**Differences from the authors' code (namisan/mt-dnn, v0.2 ``alum/``).**

* The epsilon-ball projection of Algorithm 1 line 6 is kept (``projection: linf``, the paper).
  mt-dnn has no projection: it normalises ``delta + eta*g`` to unit per-token L_inf norm, so its
  perturbation has max-abs ~= 1 per token whatever sigma, eta, epsilon are (a known problem of the public mt-dnn code).
  ``projection: none`` here means *no projection at all*: ``delta <- delta + eta * g/||g||_inf``, an
  unconstrained normalised ascent step of size eta per token (so ``||delta||_inf <= sigma-ish + K*eta``).
  It is NOT mt-dnn's rule ``delta <- (delta + eta*g) / ||delta + eta*g||_inf`` (unit max-abs per token,
  i.e. a perturbation ~1e5 times the paper's epsilon), which is deliberately not offered.
* The gradient is normalised per token by its max-abs *before* it is added (as the paper's Algorithm 1), with a
  scale-free zero guard (mt-dnn adds 1e-6 to the norm, which shrinks the step when gradients are tiny).
* Padding positions of delta are zero at init and after every step (mt-dnn ignores its mask).
* A non-finite ascent gradient does not silently drop the adversarial term (mt-dnn ``return 0``):
  the ascent update of that step is skipped (delta keeps its previous value), the final term is still
  computed, and ``metrics["ascent_nonfinite"]`` counts the skipped steps (no host sync needed).  A
  non-finite final term R is *not* added (it would poison every gradient) and is counted in
  ``metrics["adv_nonfinite"]``.
* Gradients of R reach the word-embedding parameters (``embeds`` is not detached in the final pass),
  as in mt-dnn fine-tuning; the v0.2 pre-training criterion detached them.

**SymKL and its stop-gradients** (``cfg.divergence``).  Both forms are computed in float32 via
``log_softmax``, averaged over rows (masked tokens for MLM, batch items for NSP), and have the value
KL(p||q) + KL(q||p).  ``sym_kl_ce`` (default): :func:`symmetric_kl_ce` = ``KL(sg(q) || p) + KL(sg(p) ||
q)``, the cross-entropy form of the authors' mt-dnn code, SMART, SiFT and R-Drop, whose gradient w.r.t.
p's logits is ``p - q``.  ``sym_kl``: :func:`symmetric_kl` = ``KL(p || sg(q)) + KL(q || sg(p))``.  The
gradient reaches ``p`` through the first term and ``q`` through the second, so the final term trains
both the adversarial and the clean graph; in the ascent ``clean`` is detached, so only the first term
drives delta.  At ``p ~= q`` both gradients equal the Fisher metric times ``(p - q)`` to first order;
they differ when dropout and confident predictions make the two passes far apart (per-token cosine of
the two ascent gradients ~0.9 at logits x10 of an untrained tiny BERT, ~0.6 at x30), hence the
authors' form by default.  ``divergence=`` accepts any other choice.

**Mixed precision.** sigma = epsilon = 1e-5 is below the resolution of fp16/bf16 for O(0.01-1)
activations (bf16 has 8 mantissa bits: one ulp at 0.05 is ~2e-4), so a half-precision ``delta`` or a
half-precision ``embeds + delta`` would round the perturbation away before the model sees it.  Hence:
``delta`` is created, updated and projected in float32, the sum ``embeds + delta`` is formed in float32
(:func:`perturb`) and only then cast to ``embeds.dtype``.  Under autocast with float32 parameters the
embedding lookup returns float32, the cast is a no-op and the perturbed embeddings enter the model in
float32 (the embedding sum and LayerNorm also run in float32 under autocast); later low-precision matmuls
quantise what they receive, which is inherent to 16-bit training.  If the whole model is in bf16/fp16
(``model.half()``, fairseq ``--fp16``/``--bf16``), the perturbed input is necessarily rounded to that
dtype: :func:`alum_regularizer` refuses it when epsilon is below half an ulp - use autocast.
Divergences are always computed in float32 (:func:`symmetric_kl` upcasts).  The ascent gradient is
taken from a rescaled backward (:func:`scale_free_input_grad`): GradScaler only scales the final
backward, and the ascent loss (a divergence of ~1e-3 with dropout, ~1e-10 without, further divided by
the global masked-token count in the native engine) would otherwise be flushed to zero by fp16 on most
tokens.  A 16-bit perturbation point too coarse for epsilon is refused
(:func:`check_perturbation_resolution`).  Note that with the paper's
sigma = eps = 1e-5 and no dropout (eval mode) the SymKL between the clean and the perturbed pass is
~1e-10, at the float32 rounding floor of log-softmax, so the ascent direction is partly rounding noise;
in training mode the independent dropout masks of the passes make them differ far more and dominate the
ascent direction, as in every public implementation.  "float32" in this module
means "at least float32": float64 inputs are kept in float64 (the tests compare against a float64
reference).

**Sharing with fine-tuning (FreeLB, SMART).** The building blocks are public and separate:
:func:`init_delta` (Gaussian start, padding zeroed), :func:`normalize_grad` (per-token or per-sequence
L_inf/L2 normalisation), :func:`project` (per-token L_inf/L2 ball), :func:`perturb` (float32 add), and
:func:`ascent_step` (ALUM's update = normalise + step + project + re-zero padding).

``pad_mask`` convention everywhere in this module: a ``(B, T)`` bool (or 0/1) tensor, **True/1 = real
token**, False/0 = padding (the HF ``attention_mask`` convention).  ``None`` = no padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .config import opt

__all__ = [
    "ALUMConfig",
    "PROJECTIONS",
    "PERTURB_AT",
    "DIVERGENCES",
    "symmetric_kl",
    "symmetric_kl_ce",
    "get_divergence",
    "scale_free_input_grad",
    "zero_grad_fraction",
    "check_perturbation_resolution",
    "init_delta",
    "normalize_grad",
    "project",
    "perturb",
    "ascent_step",
    "alum_regularizer",
]

PROJECTIONS = ("linf", "l2", "none")
PERTURB_AT = ("word", "embedding_output")
DIVERGENCES = ("sym_kl", "sym_kl_ce")

Logits = Optional[torch.Tensor]
LogitsTuple = Union[torch.Tensor, Sequence[Logits]]
ForwardFn = Callable[[torch.Tensor], LogitsTuple]
Divergence = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: float16/bfloat16 -> float32, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


@dataclass
class ALUMConfig:
    """ALUM knobs (paper defaults for pre-training; use ``alpha=1`` for fine-tuning)."""

    alpha: float = opt(10.0, "weight of the adversarial SymKL term (paper: 10 pre-training, 1 fine-tuning); "
                             "0 disables ALUM with no extra passes")
    epsilon: float = opt(1e-5, "radius of the per-token perturbation ball (Algorithm 1 line 6); "
                               "unused with projection=none")
    step_size: float = opt(1e-3, "ascent step size eta: delta += eta * g / max|g| per token")
    noise_std: float = opt(1e-5, "std sigma of the Gaussian initial perturbation delta ~ N(0, sigma^2)")
    k_steps: int = opt(1, "number K of projected ascent steps (paper: 1); 0 = random perturbation only")
    projection: str = opt("linf", "projection after each ascent step: linf (paper: clamp to [-eps, eps]), "
                                  "l2 (per-token L2 ball), none (no projection)")
    perturb_at: str = opt("word", "where delta is added: word (word-embedding output, before position/"
                                  "segment embeddings and LayerNorm) or embedding_output (after the "
                                  "embedding LayerNorm, mt-dnn's placement)")
    start_step: int = opt(0, "optimizer step at which ALUM switches on (the paper's curriculum: "
                             "standard training first)")
    divergence: str = opt("sym_kl_ce", "form of the symmetric KL: sym_kl_ce = KL(sg(q)||p) + KL(sg(p)||q) "
                                       "(the authors' mt-dnn code, SMART, R-Drop: gradient p - q on the "
                                       "logits) or sym_kl = KL(p||sg(q)) + KL(q||sg(p)); same value, "
                                       "different gradient when dropout makes the passes differ")
    include_nsp: bool = opt(False, "also put the NSP distribution into R (the paper defines R on the MLM "
                                   "distributions only)")
    log_baseline: bool = opt(False, "also compute adv_dropout = R with delta = 0 under the same dropout "
                                    "masks as the real adversarial pass (one extra no-grad forward), so "
                                    "adv - adv_dropout is the adversarial share of R")

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"alum.{name}={getattr(self, name)!r}: {why}")

        for name in ("alpha", "epsilon", "step_size", "noise_std"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise bad(name, "must be a number")
            v = float(v)
            if v != v or v in (float("inf"), float("-inf")) or v < 0:
                raise bad(name, "must be a finite number >= 0")
            setattr(self, name, v)
        if self.projection != "none" and self.epsilon <= 0:
            raise bad("epsilon", f"must be > 0 with projection={self.projection!r} "
                                 "(use projection=none for an unconstrained step)")
        for name in ("k_steps", "start_step"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise bad(name, "must be an integer >= 0")
        if self.projection not in PROJECTIONS:
            raise bad("projection", f"must be one of {', '.join(PROJECTIONS)}")
        if self.perturb_at not in PERTURB_AT:
            raise bad("perturb_at", f"must be one of {', '.join(PERTURB_AT)}")
        if self.divergence not in DIVERGENCES:
            raise bad("divergence", f"must be one of {', '.join(DIVERGENCES)}")
        for name in ("include_nsp", "log_baseline"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false")

    def active(self, step: int) -> bool:
        """True when the adversarial term is on at optimizer step ``step`` (alpha > 0 and step >= start_step)."""
        return self.alpha > 0 and step >= self.start_step


# --------------------------------------------------------------------------------------------------
# Divergence
# --------------------------------------------------------------------------------------------------


def _row_log_probs(who: str, p_logits: torch.Tensor, q_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise log-softmax of two same-shape ``(..., C)`` logit tensors in the work dtype (float32 or
    float64): ``(N, C)`` each, N = the product of the leading dimensions."""
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"{who}: shapes differ: p {tuple(p_logits.shape)} vs q {tuple(q_logits.shape)}")
    if p_logits.dim() == 0:
        raise ValueError(f"{who}: logits need a class dimension (..., C)")
    c = p_logits.shape[-1]
    dt = _work_dtype(torch.promote_types(p_logits.dtype, q_logits.dtype))
    return (F.log_softmax(p_logits.to(dt).reshape(-1, c), dim=-1),
            F.log_softmax(q_logits.to(dt).reshape(-1, c), dim=-1))


def symmetric_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """SymKL(p, q) = KL(p || sg(q)) + KL(q || sg(p)), in float32, averaged over rows.

    ``p_logits``, ``q_logits``: ``(..., C)`` unnormalised logits of the same shape; every leading index
    is a row (a masked token for MLM, a batch item for NSP).  Returns a float32 scalar (float64 for float64
inputs).  The value is
    ``KL(p||q) + KL(q||p)``; the gradient reaches ``p`` only through the first term and ``q`` only
    through the second (``sg`` = stop-gradient), so with ``q`` detached only ``KL(p||q)`` drives ``p``.
    With zero rows (e.g. no masked token) the result is a differentiable 0, not NaN.
    """
    logp, logq = _row_log_probs("symmetric_kl", p_logits, q_logits)  # (N, C) each
    n = logp.shape[0]
    if n == 0:
        return (logp.sum() + logq.sum()) * 0.0
    lp_sg, lq_sg = logp.detach(), logq.detach()
    # KL(p || sg q) = sum_c p_c (log p_c - log q_c): gradient into p only.
    kl_pq = (logp.exp() * (logp - lq_sg)).sum(-1)  # (N,)
    # KL(q || sg p): gradient into q only.
    kl_qp = (logq.exp() * (logq - lp_sg)).sum(-1)  # (N,)
    return (kl_pq + kl_qp).sum() / n


def symmetric_kl_ce(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """SymKL in the cross-entropy form: KL(sg(q) || p) + KL(sg(p) || q), float32, averaged over rows.

    The form of the ALUM authors' code (mt-dnn ``SymKlCriterion``), SMART and R-Drop.  Same value as
    :func:`symmetric_kl`; the gradient w.r.t. ``p``'s logits is ``p - q`` (per row, before the mean), the
    softmax cross-entropy gradient, and symmetrically for ``q``.  Zero rows give a differentiable 0.
    """
    logp, logq = _row_log_probs("symmetric_kl_ce", p_logits, q_logits)  # (N, C) each
    n = logp.shape[0]
    if n == 0:
        return (logp.sum() + logq.sum()) * 0.0
    lp_sg, lq_sg = logp.detach(), logq.detach()
    kl_q_p = (lq_sg.exp() * (lq_sg - logp)).sum(-1)  # KL(sg q || p): gradient into p only, (N,)
    kl_p_q = (lp_sg.exp() * (lp_sg - logq)).sum(-1)  # KL(sg p || q): gradient into q only, (N,)
    return (kl_q_p + kl_p_q).sum() / n


def get_divergence(name: str) -> "Divergence":
    """``sym_kl`` -> :func:`symmetric_kl`, ``sym_kl_ce`` -> :func:`symmetric_kl_ce`."""
    if name == "sym_kl":
        return symmetric_kl
    if name == "sym_kl_ce":
        return symmetric_kl_ce
    raise ValueError(f"divergence={name!r}: must be one of {', '.join(DIVERGENCES)}")


# --------------------------------------------------------------------------------------------------
# Precision: scale-free input gradients and the 16-bit resolution check
# --------------------------------------------------------------------------------------------------

#: The largest |d loss / d output| the rescaled backward of :func:`scale_free_input_grad` starts from.
#: 2**10 leaves ~2**6 of fp16 headroom above it for the gain of the backward pass and ~2**34 below it
#: before fp16 gradients go subnormal; on overflow the pass is redone 2**8 smaller (fp16 only).
ASCENT_GRAD_TARGET = 2.0 ** 10
_FP16_RETRY_FACTOR = 2.0 ** -8
_FP16_RETRIES = 2


def scale_free_input_grad(
    outputs: Sequence[Optional[torch.Tensor]],
    loss_fn: Callable[[tuple], torch.Tensor],
    wrt: torch.Tensor,
    target: float = ASCENT_GRAD_TARGET,
    per_example: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``d loss_fn(outputs) / d wrt`` computed so that 16-bit backward passes cannot underflow it.

    ``outputs``: the model outputs (logits, any dtype; None entries are passed through) of a graph that
    depends on ``wrt``; ``loss_fn(outs)`` maps a tuple like ``outputs`` to a scalar.  Two stages:

    1. the loss and its gradient ``g_z`` w.r.t. float32 copies of the outputs (cheap: only the loss
       function is differentiated, in float32, so even a 1e-12 loss has an exact gradient);
    2. one backward through the model with ``grad_outputs = g_z * target / max|g_z|``: the largest
       output gradient is ``target`` whatever the loss scale (a per-token mean over 100k masked tokens,
       or a divergence of 1e-10), which is what GradScaler does for the final backward.  Under fp16
       autocast an overflow (non-finite result) redoes the pass with a 2**8 smaller target, at most
       twice (that check is a host sync, fp16 outputs only).

    ``per_example``: every output's dim 0 is the example axis of ``wrt`` and examples do not interact
    (a sequence classifier): each example gets its own scale, so a confidently classified example whose
    loss gradient is 1e-6 of its neighbours' is not flushed to zero; its direction is exact.

    Returns ``(grad, finite)``: ``grad`` in at least float32, divided back by the scale (so it equals the
    plain gradient up to rounding), ``finite`` a 0-dim bool tensor.  A loss whose output gradient is
    all zero gives a zero gradient; a non-finite one gives ``finite = False``.
    """
    outs = tuple(outputs)
    leaves = tuple(None if o is None else o.detach().to(_work_dtype(o.dtype)).requires_grad_(True) for o in outs)
    loss = loss_fn(leaves)
    used = [(o, leaf) for o, leaf in zip(outs, leaves) if o is not None]
    gz = torch.autograd.grad(loss, [leaf for _, leaf in used], allow_unused=True)
    pairs = [(o, g) for (o, _), g in zip(used, gz) if g is not None]
    wdt = _work_dtype(wrt.dtype)
    if not pairs:
        return torch.zeros(wrt.shape, dtype=wdt, device=wrt.device), torch.ones((), dtype=torch.bool, device=wrt.device)
    if per_example:
        b = wrt.shape[0]
        for o, _ in pairs:
            if o.dim() == 0 or o.shape[0] != b:
                raise ValueError(f"scale_free_input_grad(per_example=True): output shape {tuple(o.shape)} has no "
                                 f"leading example axis of size {b}")
        gmax = torch.stack([g.abs().reshape(b, -1).amax(1) if g.numel() else g.new_zeros(b)
                            for _, g in pairs]).amax(0)  # (B,)
    else:
        gmax = torch.stack([g.abs().amax() if g.numel() else g.new_zeros(()) for _, g in pairs]).amax()  # 0-dim
    finite_z = torch.isfinite(gmax).all()
    # A zero (or non-finite) output gradient: scale 1 (the result is 0, resp. flagged below).
    safe = torch.where(torch.isfinite(gmax) & (gmax > 0), gmax, torch.ones_like(gmax))
    half = any(o.dtype == torch.float16 for o, _ in pairs)
    tgt = float(target)
    for attempt in range(_FP16_RETRIES + 1 if half else 1):
        scale = tgt / safe  # 0-dim (or (B,) per example), float32 or float64

        def bcast(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            return x.reshape(x.shape + (1,) * (like.dim() - x.dim()))

        grads = [(g * bcast(scale, g)).to(o.dtype) for o, g in pairs]
        (gw,) = torch.autograd.grad([o for o, _ in pairs], wrt, grad_outputs=grads,
                                    retain_graph=half and attempt < _FP16_RETRIES)
        gw = gw.to(wdt) / bcast(scale.to(wdt), gw)
        finite = finite_z & torch.isfinite(gw).all()
        if not half or attempt == _FP16_RETRIES or bool(finite) or not bool(finite_z):
            break
        tgt *= _FP16_RETRY_FACTOR
    return gw, finite


def zero_grad_fraction(grad: torch.Tensor, pad_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Fraction of real tokens (``pad_mask`` True) whose gradient row (last dim) is entirely 0 (0-dim)."""
    zero = (grad == 0).all(-1)  # (B, T)
    if pad_mask is None:
        return zero.float().mean() if zero.numel() else zero.new_zeros((), dtype=torch.float32)
    w = pad_mask.to(device=grad.device).bool()
    return (zero & w).sum().float() / w.sum().clamp_min(1).float()


_MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7}


def check_perturbation_resolution(embeds: torch.Tensor, epsilon: float, noise_std: float,
                                  pad_mask: Optional[torch.Tensor] = None, where: str = "") -> None:
    """Refuse a 16-bit perturbation point whose resolution cannot hold the perturbation.

    When ``embeds`` (the tensor delta is added to) is float16/bfloat16 - a model cast to half precision,
    as fairseq's ``--fp16``/``--bf16`` without ``--amp`` do - ``embeds + delta`` is rounded back to 16
    bits.  If ``max(epsilon, noise_std)`` is below half the unit in the last place at the embeddings'
    typical (median absolute, over real tokens) magnitude, most coordinates of delta round away and the
    adversarial term silently measures nothing; raise a ``ValueError`` that says what to use instead.
    float32/float64 ``embeds``: no check (no host sync).
    """
    bits = _MANTISSA_BITS.get(embeds.dtype)
    if bits is None:
        return
    e = embeds.detach().float().abs()
    if pad_mask is not None:
        e = e[pad_mask.to(device=e.device).bool()]
    e = e.reshape(-1)
    e = e[e > 0]
    if e.numel() == 0:
        return
    typical = float(e.median())
    half_ulp = 2.0 ** (math.floor(math.log2(typical)) - bits) / 2
    size = max(float(epsilon), float(noise_std))
    if size < half_ulp:
        name = "float16" if embeds.dtype == torch.float16 else "bfloat16"
        raise ValueError(
            f"{where or 'ALUM'}: the perturbation point is {name} (a model cast to 16 bits), and at the embeddings' "
            f"typical magnitude {typical:.3g} half a {name} ulp is {half_ulp:.3g} > epsilon/noise_std {size:.3g}: "
            f"embeds + delta would round the perturbation away. Keep float32 weights and use mixed precision "
            f"instead (autocast: --train.precision/--run.precision bf16|fp16; fairseq: --amp, optionally with "
            f"--amp-dtype bfloat16), or raise epsilon above {half_ulp:.3g}.")


# --------------------------------------------------------------------------------------------------
# Perturbation building blocks (shared with fine-tuning methods)
# --------------------------------------------------------------------------------------------------


def _check_pad_mask(pad_mask: Optional[torch.Tensor], token_shape: torch.Size, who: str) -> Optional[torch.Tensor]:
    """Validate ``pad_mask`` ((B, T), True/1 = real token) and return it as a bool tensor (or None)."""
    if pad_mask is None:
        return None
    if tuple(pad_mask.shape) != tuple(token_shape):
        raise ValueError(f"{who}: pad_mask shape {tuple(pad_mask.shape)} must equal the token shape "
                         f"{tuple(token_shape)} (embeds without the hidden dim); True/1 = real token")
    return pad_mask.bool()


def _zero_padding(t: torch.Tensor, pad_mask: Optional[torch.Tensor]) -> torch.Tensor:
    if pad_mask is None:
        return t
    return t * pad_mask.to(device=t.device).unsqueeze(-1).to(t.dtype)


GeneratorArg = Union[None, torch.Generator, Sequence[torch.Generator]]  # one, or one per sample (dim 0)


def init_delta(
    embeds: torch.Tensor,
    pad_mask: Optional[torch.Tensor],
    noise_std: float,
    generator: GeneratorArg = None,
) -> torch.Tensor:
    """Initial perturbation delta ~ N(0, noise_std^2) (Algorithm 1 line 3), zero at padding.

    ``embeds``: ``(B, T, H)`` (or any ``(..., H)``); only its shape and device are used.
    ``pad_mask``: ``(B, T)`` bool/0-1, **True/1 = real token**, or None for no padding.
    ``generator``: drawn from (on the generator's own device, then moved to ``embeds.device``, so a CPU
    generator gives the same delta on any device); None = the global RNG; a list of B generators draws
    row b from generator b (per-sample noise, independent of how the batch is split).
    Returns a float32 tensor of ``embeds.shape`` that does not require grad (float32 regardless of
    ``embeds.dtype``: sigma = 1e-5 would be rounded away in fp16/bf16, see the module docstring).
    """
    mask = _check_pad_mask(pad_mask, embeds.shape[:-1], "init_delta")
    if isinstance(generator, (list, tuple)):
        # One generator per batch row (per-sample streams): a sample's noise then does not depend on how a
        # global batch is split over processes / micro-batches (the engine's DDP == 1-process property).
        if len(generator) != embeds.shape[0]:
            raise ValueError(f"init_delta: {len(generator)} generators for a batch of {embeds.shape[0]} rows")
        delta = torch.stack([torch.randn(embeds.shape[1:], generator=g, dtype=_work_dtype(embeds.dtype),
                                         device=g.device).to(embeds.device) for g in generator])
        return _zero_padding(delta * float(noise_std), mask)  # (B, T, H)
    gen_device = generator.device if generator is not None else embeds.device
    delta = torch.randn(embeds.shape, generator=generator, dtype=_work_dtype(embeds.dtype), device=gen_device)
    delta = (delta * float(noise_std)).to(embeds.device)  # (B, T, H)
    return _zero_padding(delta, mask)


def normalize_grad(grad: torch.Tensor, norm: str = "linf", level: str = "token") -> torch.Tensor:
    """``grad / ||grad||`` with the norm taken per token (last dim) or per sequence (last two dims).

    ``norm``: ``linf`` (max-abs, ALUM/mt-dnn/SiFT) or ``l2``.  ``level``: ``token`` (ALUM) or ``sequence``
    (FreeLB normalises per example).  All-zero slices (e.g. padding) stay zero: the guard is the
    smallest normal float, so the direction is scale-free (no mt-dnn-style +1e-6 that shrinks tiny
    gradients).  Computed in float32.
    """
    g = grad.to(_work_dtype(grad.dtype))
    if level == "token":
        dims: tuple[int, ...] = (-1,)
    elif level == "sequence":
        if g.dim() < 2:
            raise ValueError("normalize_grad: level='sequence' needs (..., T, H)")
        dims = (-2, -1)
    else:
        raise ValueError(f"normalize_grad: level={level!r} must be 'token' or 'sequence'")
    if norm == "linf":
        n = g.abs().amax(dim=dims, keepdim=True)
    elif norm == "l2":
        n = g.pow(2).sum(dim=dims, keepdim=True).sqrt()
    else:
        raise ValueError(f"normalize_grad: norm={norm!r} must be 'linf' or 'l2'")
    return g / n.clamp_min(torch.finfo(torch.float32).tiny)


def project(delta: torch.Tensor, epsilon: float, kind: str) -> torch.Tensor:
    """Per-token projection onto the epsilon ball (Algorithm 1 line 6: Pi_{||delta|| <= eps}).

    ``linf``: clamp every coordinate to [-eps, eps] (the Euclidean projection onto the L_inf ball).
    ``l2``: rescale each token vector (last dim) whose L2 norm exceeds eps onto the sphere of radius eps.
    ``none``: identity.
    """
    if kind == "linf":
        return delta.clamp(-epsilon, epsilon)
    if kind == "l2":
        norm = delta.pow(2).sum(-1, keepdim=True).sqrt()  # (B, T, 1)
        scale = (epsilon / norm.clamp_min(torch.finfo(torch.float32).tiny)).clamp(max=1.0)
        return delta * scale
    if kind == "none":
        return delta
    raise ValueError(f"project: kind={kind!r} must be one of {', '.join(PROJECTIONS)}")


def perturb(embeds: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``embeds + delta`` formed in float32, returned in ``embeds.dtype`` (differentiable in both)."""
    dt = _work_dtype(torch.promote_types(embeds.dtype, delta.dtype))
    return (embeds.to(dt) + delta.to(dt)).to(embeds.dtype)


def ascent_step(
    delta: torch.Tensor,
    grad: torch.Tensor,
    cfg: ALUMConfig,
    pad_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One ALUM ascent update: ``Proj_eps(delta + eta * g / ||g||_inf,token)``, padding re-zeroed.

    ``delta``, ``grad``: ``(B, T, H)``; ``pad_mask``: ``(B, T)``, True/1 = real token (None = none).
    Returns a float32 tensor (float64 for float64 inputs); callers detach it before the next step.
    """
    mask = _check_pad_mask(pad_mask, delta.shape[:-1], "ascent_step")
    if grad.shape != delta.shape:
        raise ValueError(f"ascent_step: grad shape {tuple(grad.shape)} != delta shape {tuple(delta.shape)}")
    new = delta.to(_work_dtype(delta.dtype)) + cfg.step_size * normalize_grad(grad, "linf", "token")  # (B, T, H)
    new = project(new, cfg.epsilon, cfg.projection)
    return _zero_padding(new, mask)


# --------------------------------------------------------------------------------------------------
# The regulariser
# --------------------------------------------------------------------------------------------------


def _as_tuple(x: LogitsTuple) -> tuple[Logits, ...]:
    if isinstance(x, torch.Tensor):
        return (x,)
    if isinstance(x, (list, tuple)):
        return tuple(x)
    raise TypeError(f"logits must be a tensor or a tuple/list of tensors (or None), got {type(x).__name__}")


def _sum_divergence(adv: LogitsTuple, clean: tuple[Logits, ...], divergence: Divergence,
                    detach_clean: bool, weights: Optional[Sequence[Optional[float]]] = None) -> torch.Tensor:
    """Sum over heads of divergence(adv_h, clean_h) (times ``weights[h]`` when given), skipping heads whose
    clean logits are None."""
    adv_t = _as_tuple(adv)
    if len(adv_t) != len(clean):
        raise ValueError(f"forward_fn returned {len(adv_t)} logits tensors but clean_logits has {len(clean)}; "
                         "forward_fn must return the same structure as clean_logits")
    total: Optional[torch.Tensor] = None
    for h, (a, c) in enumerate(zip(adv_t, clean)):
        if c is None:
            continue
        if a is None:
            raise ValueError(f"forward_fn returned None for head {h} whose clean logits are a tensor")
        d = divergence(a, c.detach() if detach_clean else c)
        if weights is not None:
            d = d * weights[h]
        total = d if total is None else total + d
    assert total is not None  # checked by the caller: at least one head
    return total


def alum_regularizer(
    forward_fn: ForwardFn,
    embeds: torch.Tensor,
    clean_logits: LogitsTuple,
    cfg: ALUMConfig,
    pad_mask: Optional[torch.Tensor] = None,
    generator: GeneratorArg = None,
    divergence: Optional[Divergence] = None,
    baseline: Optional[bool] = None,
    per_example_scale: bool = False,
    head_weights: Optional[Sequence[Optional[float]]] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The ALUM term R (Algorithm 1 lines 3-8), to be added as ``task_loss + cfg.alpha * R``.

    ``forward_fn(perturbed_embeds) -> logits``: runs the model from the perturbation point with the same
    batch as the clean pass and returns logits with the same structure as ``clean_logits`` - a tensor or
    a tuple whose entries may be None (e.g. ``(mlm_logits_at_masked (N, V), nsp_logits (B, 2) or None)``).
    It is called ``cfg.k_steps + 1`` times (+1 no-grad call with ``baseline``).  ``embeds``: ``(B, T, H)``
    the clean embeddings at the perturbation point, still attached to the graph of the embedding
    parameters (the final pass uses them undetached so R trains the embeddings).  ``clean_logits``: from
    the clean pass, attached to its graph (R back-propagates into them).  ``pad_mask``: ``(B, T)``,
    True/1 = real token.  ``generator``: for the random start (pass a per-step generator for exact resume,
    e.g. from ``masking.step_generator`` with its own stream), or a list of one generator per sample (see
    :func:`init_delta`).  ``divergence(adv_logits, clean_logits)``: per head; default
    ``get_divergence(cfg.divergence)``.  ``baseline``: also compute ``adv_dropout`` (default
    ``cfg.log_baseline``).  ``per_example_scale``: the logits' dim 0 is the batch axis of ``embeds``
    (sequence classification, not the flat masked tokens of MLM): rescale each example's backward on its
    own (see :func:`scale_free_input_grad`).  ``head_weights``: one factor per head (entries of heads whose
    clean logits are None are ignored): R = sum over heads of ``head_weights[h] * divergence_h``, e.g. to
    turn each head's row mean into a sum over its rows divided by a global count; the ascent uses the same
    weighted sum, so the weights also set the heads' relative share of the ascent direction.

    **Precision.** The ascent gradient is :func:`scale_free_input_grad` of the divergence: its backward
    starts from output gradients rescaled to a fixed maximum, so neither a tiny divergence nor the
    caller's normalisation (e.g. by the global masked-token count) can underflow it in fp16; the
    per-token normalisation of the update makes the scale irrelevant.  A 16-bit ``embeds`` whose
    resolution cannot hold ``epsilon`` is refused (:func:`check_perturbation_resolution`).

    Returns ``(R, metrics)``; R is a float32 scalar differentiable w.r.t. the parameters through both the
    adversarial forward and ``clean_logits``.  A non-finite R is replaced by a graph-free 0 (the step then
    trains on the task loss alone) and counted; this check is one host sync per call.  The ascent
    uses ``torch.autograd.grad`` w.r.t. delta only: no parameter ``.grad`` is written and no DDP hook
    fires.  ``metrics`` (0-dim tensors): ``adv`` (R detached, the non-finite value if it was dropped),
    ``delta_linf`` / ``delta_l2`` (mean over real tokens of the per-token L_inf / L2 norm of the final
    delta), ``ascent_grad_norm`` (L2 norm of the last ascent gradient; 0 if K=0, inf/nan if it was
    skipped), ``ascent_nonfinite`` (ascent steps skipped because their gradient was not finite),
    ``ascent_zero_grad_frac`` (fraction of real tokens whose ascent gradient was entirely 0, mean over
    the K steps: those tokens keep their random start), ``adv_nonfinite`` (1 if R was not finite and
    was not added), and with ``baseline`` ``adv_dropout``: R at delta = 0 with the *same* dropout masks
    as the adversarial pass (the RNG state is forked, so training draws are unchanged), hence
    ``adv - adv_dropout`` is the share of R due to delta rather than to dropout.

    Do not call this with ``cfg.alpha == 0``: alpha=0 means "standard training, no extra passes" and the
    caller skips the call.
    """
    clean = _as_tuple(clean_logits)
    if all(c is None for c in clean):
        raise ValueError("alum_regularizer: every clean_logits entry is None; nothing to regularise")
    if embeds.dim() < 2:
        raise ValueError(f"alum_regularizer: embeds must be (B, T, H) (or (..., H)), got {tuple(embeds.shape)}")
    mask = _check_pad_mask(pad_mask, embeds.shape[:-1], "alum_regularizer")
    if divergence is None:
        divergence = get_divergence(cfg.divergence)
    if baseline is None:
        baseline = cfg.log_baseline
    if head_weights is not None and len(head_weights) != len(clean):
        raise ValueError(f"alum_regularizer: {len(head_weights)} head_weights for {len(clean)} heads")
    check_perturbation_resolution(embeds, cfg.epsilon, cfg.noise_std, mask, "alum_regularizer")

    delta = init_delta(embeds, mask, cfg.noise_std, generator)  # (B, T, H) float32
    base = embeds.detach()  # the ascent must not build parameter gradients through the embedding lookup
    grad_norm = torch.zeros((), device=embeds.device)
    nonfinite = torch.zeros((), device=embeds.device)
    zero_frac = torch.zeros((), device=embeds.device)
    for _ in range(cfg.k_steps):
        delta.requires_grad_(True)
        adv = _as_tuple(forward_fn(perturb(base, delta)))
        if len(adv) != len(clean):
            raise ValueError(f"forward_fn returned {len(adv)} logits tensors but clean_logits has {len(clean)}; "
                             "forward_fn must return the same structure as clean_logits")
        # Line 5: g = grad_delta l(f(x), f(x + delta)) against the *detached* clean logits, from a
        # rescaled backward (fp16 cannot underflow it); input-only: no param .grad, no DDP sync.
        g, finite = scale_free_input_grad(
            [a if c is not None else None for a, c in zip(adv, clean)],
            lambda outs: _sum_divergence(outs, clean, divergence, detach_clean=True, weights=head_weights), delta,
            per_example=per_example_scale)
        # Line 6; a non-finite gradient skips this update (delta keeps its value) and is counted.
        stepped = ascent_step(delta.detach(), torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0), cfg, mask)
        delta = torch.where(finite, stepped, delta.detach()).detach()
        grad_norm = g.norm()  # inf/nan when the step was skipped
        nonfinite = nonfinite + (~finite).float()
        zero_frac = zero_frac + zero_grad_fraction(g, mask) / cfg.k_steps
        del adv, g

    # Baseline (diagnostic only): R at delta = 0 under the dropout masks the adversarial pass below will
    # draw - fork_rng restores the RNG afterwards, so both passes draw the same masks.
    adv_dropout = None
    if baseline:
        devices = [embeds.device] if embeds.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            adv_dropout = _sum_divergence(forward_fn(perturb(base, torch.zeros_like(delta))), clean, divergence,
                                          detach_clean=True, weights=head_weights).detach()

    # Lines 8: the adversarial pass on embeds + delta with embeds NOT detached, and R against the clean
    # logits NOT detached: gradients flow into both graphs.
    adv = forward_fn(perturb(embeds, delta.detach()))
    r = _sum_divergence(adv, clean, divergence, detach_clean=False, weights=head_weights)
    r_value = r.detach()
    adv_nonfinite = torch.zeros((), device=r.device)
    if not bool(torch.isfinite(r_value)):  # host sync: a NaN/inf R must not reach the backward at all
        r = torch.zeros((), dtype=r.dtype, device=r.device)
        adv_nonfinite = adv_nonfinite + 1.0

    with torch.no_grad():
        d = delta.detach()
        tok_linf = d.abs().amax(-1)  # (B, T)
        tok_l2 = d.pow(2).sum(-1).sqrt()  # (B, T)
        if mask is not None:
            w = mask.to(device=d.device, dtype=d.dtype)
            denom = w.sum().clamp_min(1.0)
            delta_linf = (tok_linf * w).sum() / denom
            delta_l2 = (tok_l2 * w).sum() / denom
        else:
            delta_linf, delta_l2 = tok_linf.mean(), tok_l2.mean()
    metrics = {
        "adv": r_value,
        "delta_linf": delta_linf,
        "delta_l2": delta_l2,
        "ascent_grad_norm": grad_norm,
        "ascent_nonfinite": nonfinite,
        "ascent_zero_grad_frac": zero_frac,
        "adv_nonfinite": adv_nonfinite,
    }
    if adv_dropout is not None:
        metrics["adv_dropout"] = adv_dropout
    return r, metrics

