"""The symmetric KL divergences of the ALUM term R (engine-independent, torch only).

**SymKL and its stop-gradients** (``ALUMConfig.divergence``).  Both forms are computed in float32 via
``log_softmax`` (float64 inputs stay float64), averaged over rows (masked tokens for MLM, batch items for
NSP), and have the value KL(p||q) + KL(q||p).  ``sym_kl_ce`` (default): :func:`symmetric_kl_ce` =
``KL(sg(q) || p) + KL(sg(p) || q)``, the cross-entropy form of the authors' mt-dnn code, SMART, SiFT and
R-Drop, whose gradient w.r.t. p's logits is ``p - q``.  ``sym_kl``: :func:`symmetric_kl` = ``KL(p ||
sg(q)) + KL(q || sg(p))``.  The gradient reaches ``p`` through the first term and ``q`` through the
second, so the final term trains both the adversarial and the clean graph; in the ascent ``clean`` is
detached, so only the first term drives delta.  At ``p ~= q`` both gradients equal the Fisher metric
times ``(p - q)`` to first order; they differ when dropout and confident predictions make the two passes
far apart (per-token cosine of the two ascent gradients ~0.9 at logits x10 of an untrained tiny BERT,
~0.6 at x30), hence the authors' form by default.  ``alum_regularizer(divergence=)`` accepts any other
choice.  :func:`sum_over_heads` adds a divergence over the model's output heads (MLM, NSP).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .precision import work_dtype

__all__ = [
    "DIVERGENCES",
    "Divergence",
    "symmetric_kl",
    "symmetric_kl_ce",
    "get_divergence",
    "as_heads",
    "sum_over_heads",
]

DIVERGENCES = ("sym_kl", "sym_kl_ce")

Divergence = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Logits = Optional[torch.Tensor]
LogitsTuple = Union[torch.Tensor, Sequence[Logits]]  # one head, or a tuple of heads (None = head absent)


def _row_log_probs(who: str, p_logits: torch.Tensor, q_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise log-softmax of two same-shape ``(..., C)`` logit tensors in the work dtype (float32 or
    float64): ``(N, C)`` each, N = the product of the leading dimensions."""
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"{who}: shapes differ: p {tuple(p_logits.shape)} vs q {tuple(q_logits.shape)}")
    if p_logits.dim() == 0:
        raise ValueError(f"{who}: logits need a class dimension (..., C)")
    c = p_logits.shape[-1]
    dt = work_dtype(torch.promote_types(p_logits.dtype, q_logits.dtype))
    return (F.log_softmax(p_logits.to(dt).reshape(-1, c), dim=-1),
            F.log_softmax(q_logits.to(dt).reshape(-1, c), dim=-1))


def symmetric_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """SymKL(p, q) = KL(p || sg(q)) + KL(q || sg(p)), in float32, averaged over rows.

    ``p_logits``, ``q_logits``: ``(..., C)`` unnormalised logits of the same shape; every leading index
    is a row (a masked token for MLM, a batch item for NSP).  Returns a float32 scalar (float64 for float64
    inputs).  The value is ``KL(p||q) + KL(q||p)``; the gradient reaches ``p`` only through the first term
    and ``q`` only through the second (``sg`` = stop-gradient), so with ``q`` detached only ``KL(p||q)`` drives ``p``.
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


def as_heads(x: LogitsTuple) -> tuple[Logits, ...]:
    """A model output as a tuple of per-head logits (a single tensor is one head)."""
    if isinstance(x, torch.Tensor):
        return (x,)
    if isinstance(x, (list, tuple)):
        return tuple(x)
    raise TypeError(f"logits must be a tensor or a tuple/list of tensors (or None), got {type(x).__name__}")


def sum_over_heads(adv: LogitsTuple, clean: tuple[Logits, ...], divergence: Divergence,
                   detach_clean: bool, weights: Optional[Sequence[Optional[float]]] = None) -> torch.Tensor:
    """Sum over heads of divergence(adv_h, clean_h) (times ``weights[h]`` when given), skipping heads whose
    clean logits are None."""
    adv_t = as_heads(adv)
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
