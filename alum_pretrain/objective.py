"""The pre-training objective of every engine: masked-only MLM (+ NSP) + alpha * R (ALUM, Eq. 3).

:func:`pretrain_objective` is the one place where the loss is assembled.  The engines only adapt their
batch and model to its inputs: the native/DeepSpeed step (:class:`alum_pretrain.engine.step.PretrainStep`)
and the fairseq criterion (``alum_pretrain.fairseq_ext.criterion``) each run the clean pass, hand over the
clean logits, the embeddings at the perturbation point and a ``heads`` function that re-runs the model from
perturbed embeddings, and turn the returned metrics into their logs.

**Terms** (per micro-batch)::

    loss = sum_masked CE_mlm / norm.mlm + nsp_weight * sum_seq CE_nsp / norm.nsp + alpha * R
    R    = sum_rows D_mlm / norm.mlm [+ sum_seq D_nsp / norm.nsp with alum.include_nsp]

where ``D`` is the symmetric KL of :mod:`alum_pretrain.adversarial` (``alum.divergence``) between the
adversarial and the clean output distribution of a row.  :class:`Normalizers` hold the engine's divisors:
the native engine divides by the *global* masked-token / sequence counts of the optimizer step over the
world size (so the step optimises the global means whatever the batch split); fairseq divides the MLM sums
by 1 (it divides gradients by the summed masked-token count itself) and the NSP sums by ``B / N`` (the
mean over sequences weighted by the micro-batch's masked-token count ``N``).  R uses the same divisors per
head, also inside the ascent, so the relative weight of the MLM and NSP parts of the ascent direction is
the same as in the loss.

**When R is added.** ``alum_on`` (the caller's ``ALUMConfig.active(step)``, and training mode), ``alpha >
0`` and at least one masked token; otherwise no extra pass runs at all and no ALUM metric is returned.

**Metrics** (detached 0-dim tensors, no host sync): ``mlm`` and ``nsp`` (the normalised terms, ``nsp``
before ``nsp_weight``), ``nsp_correct`` (correct NSP predictions), and when R is added ``adv`` (R, same
normalisation), ``delta_linf``, ``ascent_nonfinite``, ``ascent_zero_grad_frac``, ``adv_nonfinite`` and with
``alum.log_baseline`` ``adv_dropout`` (R at delta = 0 under the same dropout masks, normalised like R).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from .adversarial import ALUMConfig, GeneratorArg, alum_regularizer
from .passes import AdversarialPasses

__all__ = ["Normalizers", "Heads", "ALUM_METRICS", "pretrain_objective"]

Number = Union[float, torch.Tensor]
#: ``heads(embeds (B, T, H), with_nsp) -> (mlm logits at the masked positions (N, V), nsp logits (B, 2) or None)``
Heads = Callable[[torch.Tensor, bool], tuple[torch.Tensor, Optional[torch.Tensor]]]
#: the metrics of R passed on from :func:`alum_pretrain.adversarial.alum_regularizer`
ALUM_METRICS = ("adv", "delta_linf", "ascent_nonfinite", "ascent_zero_grad_frac", "adv_nonfinite", "adv_dropout")


@dataclass(frozen=True)
class Normalizers:
    """Divisors of the summed terms: MLM (and R's MLM part) by ``mlm``, NSP (and R's NSP part) by ``nsp``."""

    mlm: Number
    nsp: Number


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Cross-entropies in float32 (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def pretrain_objective(
    heads: Heads,
    embeds: torch.Tensor,
    clean: tuple[torch.Tensor, Optional[torch.Tensor]],
    *,
    mlm_targets: torch.Tensor,
    nsp_labels: Optional[torch.Tensor],
    pad_mask: torch.Tensor,
    alum: ALUMConfig,
    alum_on: bool,
    norm: Normalizers,
    nsp_weight: float = 1.0,
    generators: GeneratorArg = None,
    passes: Optional[AdversarialPasses] = None,
    baseline: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss, metrics)`` of one micro-batch (module docstring).

    ``heads``: runs the model from embeddings at the perturbation point (used for the adversarial passes
    only).  ``embeds``: ``(B, T, H)`` the clean pass's embeddings at that point, attached to the graph.
    ``clean``: the clean pass's ``(mlm logits (N, V), nsp logits (B, 2) or None)``.  ``mlm_targets``:
    ``(N,)`` original ids at the masked positions.  ``nsp_labels``: ``(B,)`` or None (no NSP).
    ``pad_mask``: ``(B, T)`` bool, True = real token.  ``generators``: the random start's per-sample noise key
    (:class:`~alum_pretrain.masking.SampleNoise`) or generators (one, or one per sample; None = the global RNG).  ``passes``: the adversarial passes' dropout context, captured right
    before the clean pass (:meth:`alum_pretrain.passes.AdversarialPasses.capture`; needed for
    ``alum.adv_dropout`` shared/off).  ``baseline``: also measure ``adv_dropout`` when ``alum.log_baseline`` is
    off (the engines probe it over the first ALUM log intervals; it changes no training number).
    """
    mlm_logits, nsp_logits = clean
    mlm = F.cross_entropy(_at_least_fp32(mlm_logits), mlm_targets, reduction="sum") / norm.mlm
    loss = mlm
    metrics = {"mlm": mlm.detach()}
    use_nsp = nsp_labels is not None
    if use_nsp:
        if nsp_logits is None:
            raise ValueError("pretrain_objective: NSP labels were given but the clean pass has no NSP logits")
        nsp = F.cross_entropy(_at_least_fp32(nsp_logits), nsp_labels, reduction="sum") / norm.nsp
        loss = loss + nsp_weight * nsp
        metrics["nsp"] = nsp.detach()
        metrics["nsp_correct"] = (nsp_logits.detach().argmax(-1) == nsp_labels).sum()

    n_masked = mlm_targets.numel()  # shape metadata: no device sync
    if alum_on and alum.alpha > 0 and n_masked > 0:
        # R is on the MLM distributions (the paper); NSP only with alum.include_nsp.
        nsp_in_r = use_nsp and alum.include_nsp
        weights = (n_masked / norm.mlm, nsp_logits.shape[0] / norm.nsp if nsp_in_r else None)
        r, m = alum_regularizer(lambda e: heads(e, nsp_in_r), embeds, (mlm_logits, nsp_logits if nsp_in_r else None),
                                alum, pad_mask=pad_mask, generator=generators, head_weights=weights,
                                passes=passes, baseline=alum.log_baseline or baseline)
        loss = loss + alum.alpha * r  # Eq. 3 (a non-finite R arrives as 0, counted in adv_nonfinite)
        metrics.update({k: m[k] for k in ALUM_METRICS if k in m})
    return loss, metrics
