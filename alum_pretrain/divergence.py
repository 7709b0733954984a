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
from torch.autograd.function import once_differentiable

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


def _check_pair(who: str, p_logits: torch.Tensor, q_logits: torch.Tensor) -> None:
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"{who}: shapes differ: p {tuple(p_logits.shape)} vs q {tuple(q_logits.shape)}")
    if p_logits.dim() == 0:
        raise ValueError(f"{who}: logits need a class dimension (..., C)")


class _SymKL(torch.autograd.Function):
    """Both SymKL forms as one autograd node with their closed-form gradients.

    Forward, per row (P = softmax(p), Q = softmax(q), D = log P - log Q): ``sum_c (P - Q) D`` =
    KL(P||Q) + KL(Q||P), averaged over rows.  Backward (``g`` = upstream gradient / rows):

    * ``ce`` (KL(sg Q || P) + KL(sg P || Q)): ``dp = (P - Q) g``, ``dq = (Q - P) g``;
    * ``kl`` (KL(P || sg Q) + KL(Q || sg P)): ``dp = P (D - KL(P||Q)) g``, ``dq = Q (-D - KL(Q||P)) g``.

    Autograd through the unfused expression (two log-softmaxes, exps, differences, products and their
    backwards) made about 20 passes over the ``(N, V)`` masked-token logits per divergence; this makes 8
    forward and 1-2 backward, and keeps one ``(N, V)`` tensor for the backward (three for ``kl``).  Not twice
    differentiable (nothing here needs it)."""

    @staticmethod
    def forward(ctx, p_logits: torch.Tensor, q_logits: torch.Tensor, ce_form: bool) -> torch.Tensor:
        c = p_logits.shape[-1]
        dt = work_dtype(torch.promote_types(p_logits.dtype, q_logits.dtype))
        logp = F.log_softmax(p_logits.to(dt).reshape(-1, c), dim=-1)  # (N, C)
        logq = F.log_softmax(q_logits.to(dt).reshape(-1, c), dim=-1)  # (N, C)
        n = logp.shape[0]
        P = logp.exp()
        D = logp.sub_(logq)  # log P - log Q (logp's storage)
        Q = logq.exp_()  # (logq's storage)
        ctx.ce_form, ctx.n, ctx.shapes = ce_form, n, (p_logits.shape, q_logits.shape)
        ctx.dtypes = (p_logits.dtype, q_logits.dtype)
        if ce_form:
            pmq = P.sub_(Q)  # P - Q
            ctx.save_for_backward(pmq)
            return (pmq * D).sum(-1).sum() / n
        kl_pq = (P * D).sum(-1, keepdim=True)  # (N, 1) KL(P||Q) per row
        kl_qp = -(Q * D).sum(-1, keepdim=True)  # (N, 1) KL(Q||P) per row
        ctx.save_for_backward(P, Q, D, kl_pq, kl_qp)
        return (kl_pq + kl_qp).sum() / n

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        s = grad / ctx.n
        need_p, need_q = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dp = dq = None
        if ctx.ce_form:
            (pmq,) = ctx.saved_tensors
            if need_p:
                dp = pmq * s
            if need_q:
                dq = pmq * -s
        else:
            P, Q, D, kl_pq, kl_qp = ctx.saved_tensors
            if need_p:
                dp = P * (D - kl_pq) * s
            if need_q:
                dq = Q * (D.neg() - kl_qp) * s
        if dp is not None:
            dp = dp.reshape(ctx.shapes[0]).to(ctx.dtypes[0])
        if dq is not None:
            dq = dq.reshape(ctx.shapes[1]).to(ctx.dtypes[1])
        return dp, dq, None


def _sym_kl(who: str, p_logits: torch.Tensor, q_logits: torch.Tensor, ce_form: bool) -> torch.Tensor:
    _check_pair(who, p_logits, q_logits)
    if p_logits.numel() == 0:  # zero rows: a differentiable 0 in the work dtype, not NaN
        dt = work_dtype(torch.promote_types(p_logits.dtype, q_logits.dtype))
        return (p_logits.to(dt).sum() + q_logits.to(dt).sum()) * 0.0
    return _SymKL.apply(p_logits, q_logits, ce_form)


def symmetric_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """SymKL(p, q) = KL(p || sg(q)) + KL(q || sg(p)), in float32, averaged over rows.

    ``p_logits``, ``q_logits``: ``(..., C)`` unnormalised logits of the same shape; every leading index
    is a row (a masked token for MLM, a batch item for NSP).  Returns a float32 scalar (float64 for float64
    inputs).  The value is ``KL(p||q) + KL(q||p)``; the gradient reaches ``p`` only through the first term
    and ``q`` only through the second (``sg`` = stop-gradient), so with ``q`` detached only ``KL(p||q)`` drives ``p``.
    With zero rows (e.g. no masked token) the result is a differentiable 0, not NaN.
    """
    return _sym_kl("symmetric_kl", p_logits, q_logits, ce_form=False)


def symmetric_kl_ce(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """SymKL in the cross-entropy form: KL(sg(q) || p) + KL(sg(p) || q), float32, averaged over rows.

    The form of the ALUM authors' code (mt-dnn ``SymKlCriterion``), SMART and R-Drop.  Same value as
    :func:`symmetric_kl`; the gradient w.r.t. ``p``'s logits is ``p - q`` (per row, before the mean), the
    softmax cross-entropy gradient, and symmetrically for ``q``.  Zero rows give a differentiable 0.
    """
    return _sym_kl("symmetric_kl_ce", p_logits, q_logits, ce_form=True)


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
