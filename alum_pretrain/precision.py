"""Mixed precision for the adversarial ascent: scale-free input gradients and the 16-bit resolution check.

Engine-independent (torch only); used by ALUM (:mod:`alum_pretrain.adversarial`) and the fine-tuning
adversaries.

**Why.** sigma = epsilon = 1e-5 is below the resolution of fp16/bf16 for O(0.01-1) activations (bf16 has
8 mantissa bits: one ulp at 0.05 is ~2e-4), so a half-precision ``delta`` or a half-precision ``embeds +
delta`` would round the perturbation away before the model sees it; the perturbation building blocks of
:mod:`alum_pretrain.adversarial` therefore keep delta and ``embeds + delta`` in float32.  If the whole
model is in bf16/fp16 (``model.half()``, fairseq ``--fp16``/``--bf16``), the perturbed input is
necessarily rounded to that dtype: a 16-bit perturbation point too coarse for epsilon (epsilon below half
an ulp) is refused (:func:`check_perturbation_resolution`) - use autocast.

**The ascent gradient** is taken from a rescaled backward (:func:`scale_free_input_grad`): GradScaler only
scales the final backward, and the ascent loss (a divergence of ~1e-3 with dropout, ~1e-10 without,
further divided by the global masked-token count in the native engine) would otherwise be flushed to
zero by fp16 on most tokens.  :func:`zero_grad_fraction` measures how many real tokens still got an
all-zero gradient.  Note that with the paper's sigma = eps = 1e-5 and no dropout (eval mode) the SymKL
between the clean and the perturbed pass is ~1e-10, at the float32 rounding floor of log-softmax, so the
ascent direction is partly rounding noise; in training mode the independent dropout masks of the passes
make them differ far more and dominate the ascent direction, as in every public implementation.

"float32" in these modules means "at least float32" (:func:`work_dtype`): float64 inputs are kept in
float64 (the tests compare against a float64 reference).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

__all__ = [
    "ASCENT_GRAD_TARGET",
    "work_dtype",
    "scale_free_input_grad",
    "zero_grad_fraction",
    "check_perturbation_resolution",
]


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: float16/bfloat16 -> float32, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


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
    leaves = tuple(None if o is None else o.detach().to(work_dtype(o.dtype)).requires_grad_(True) for o in outs)
    loss = loss_fn(leaves)
    used = [(o, leaf) for o, leaf in zip(outs, leaves) if o is not None]
    gz = torch.autograd.grad(loss, [leaf for _, leaf in used], allow_unused=True)
    pairs = [(o, g) for (o, _), g in zip(used, gz) if g is not None]
    wdt = work_dtype(wrt.dtype)
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
        gmax = torch.stack([torch.linalg.vector_norm(g, float("inf")) if g.numel() else g.new_zeros(())
                            for _, g in pairs]).amax()  # 0-dim (max |g|)
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
