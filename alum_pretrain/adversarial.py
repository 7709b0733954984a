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

**SymKL** (``cfg.divergence``): ``sym_kl_ce`` (default, the authors' form) or ``sym_kl``; both, and
why the default, are in :mod:`alum_pretrain.divergence`.

**Mixed precision.** ``delta`` is created, updated and projected in float32, the sum ``embeds + delta``
is formed in float32 (:func:`perturb`) and only then cast to ``embeds.dtype`` (a 16-bit delta or sum would
round sigma = epsilon = 1e-5 away).  Under autocast with float32 parameters the embedding lookup returns
float32, the cast is a no-op and the perturbed embeddings enter the model in float32 (the embedding sum
and LayerNorm also run in float32 under autocast); later low-precision matmuls quantise what they
receive, which is inherent to 16-bit training.  A model cast to bf16/fp16 whose perturbation point is too
coarse for epsilon is refused by :func:`alum_regularizer`; divergences are always computed in float32;
the ascent gradient comes from a rescaled backward that fp16 cannot underflow, and without dropout it is
partly rounding noise - see :mod:`alum_pretrain.precision`.  "float32" means "at least float32" (float64
inputs stay float64).

**Sharing with fine-tuning (FreeLB, SMART).** The building blocks are public and separate:
:func:`init_delta` (Gaussian start, padding zeroed), :func:`normalize_grad` (per-token or per-sequence
L_inf/L2 normalisation), :func:`project` (per-token L_inf/L2 ball), :func:`perturb` (float32 add), and
:func:`ascent_step` (ALUM's update = normalise + step + project + re-zero padding).

``pad_mask`` convention everywhere in this module: a ``(B, T)`` bool (or 0/1) tensor, **True/1 = real
token**, False/0 = padding (the HF ``attention_mask`` convention).  ``None`` = no padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from .config import opt
from .masking import SampleNoise
from .passes import ADV_DROPOUT, OBJECTIVES, SCALES, AdversarialPasses, ball_radius, token_scale
from .divergence import (DIVERGENCES, Divergence, LogitsTuple, as_heads, get_divergence, sum_over_heads,
                         symmetric_kl, symmetric_kl_ce)
from .precision import (ASCENT_GRAD_TARGET, check_perturbation_resolution, scale_free_input_grad, work_dtype,
                        zero_grad_fraction)

# The divergences and the precision helpers live in .divergence and .precision; they are re-exported here.
__all__ = [
    "ALUMConfig", "PROJECTIONS", "PERTURB_AT", "init_delta", "normalize_grad", "project", "perturb", "ascent_step",
    "alum_regularizer", "AdversarialPasses", "GeneratorArg",
    "DIVERGENCES", "symmetric_kl", "symmetric_kl_ce", "get_divergence",
    "ASCENT_GRAD_TARGET", "scale_free_input_grad", "zero_grad_fraction", "check_perturbation_resolution",
]

PROJECTIONS = ("linf", "l2", "none")
PERTURB_AT = ("word", "embedding_output")

ForwardFn = Callable[[torch.Tensor], LogitsTuple]


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
                                    "adv_share = (adv - adv_dropout) / adv is the adversarial share of R")
    adv_dropout: str = opt("independent", "dropout of the adversarial passes: independent (the paper: own "
                                          "masks, so R mixes delta-sensitivity with dropout disagreement), "
                                          "shared (replay the clean pass's masks: R is delta's effect alone) "
                                          "or off (no dropout in the adversarial passes)")
    objective: str = opt("alum", "alum (the paper: R at the adversarial delta) or rdrop (R-Drop, the control "
                                 "arm: delta = 0, no ascent, R = SymKL of two independent dropout passes)")
    scale: str = opt("abs", "unit of epsilon, step_size and noise_std: abs (embedding units, the paper) or "
                            "rel (per token, relative to that token's embedding RMS - its L2 norm for the "
                            "l2 ball - so epsilon means the same for every model; DeBERTa SiFT's idea)")

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
        for name, choices in (("adv_dropout", ADV_DROPOUT), ("objective", OBJECTIVES), ("scale", SCALES)):
            if getattr(self, name) not in choices:
                raise bad(name, f"must be one of {', '.join(choices)}")
        if self.objective == "rdrop" and self.adv_dropout != "independent":
            raise bad("adv_dropout", "alum.objective=rdrop compares two independent dropout passes; with "
                                     f"{self.adv_dropout!r} masks its R would be {'0' if self.adv_dropout == 'shared' else 'train vs eval mode'} "
                                     "(use alum.adv_dropout=independent)")

    def active(self, step: int) -> bool:
        """True when the adversarial term is on at optimizer step ``step`` (alpha > 0 and step >= start_step)."""
        return self.alpha > 0 and step >= self.start_step




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


# one generator, one per sample (dim 0), or a per-sample noise key computed on the batch's device
GeneratorArg = Union[None, torch.Generator, Sequence[torch.Generator], SampleNoise]


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
    row b from generator b (per-sample noise, independent of how the batch is split); a
    :class:`~alum_pretrain.masking.SampleNoise` gives row b :func:`~alum_pretrain.masking.sample_normals` of
    sample b, computed where its ids live with no device-to-host read (what the engines pass).
    Returns a float32 tensor of ``embeds.shape`` that does not require grad (float32 regardless of
    ``embeds.dtype``: sigma = 1e-5 would be rounded away in fp16/bf16, see the module docstring).
    """
    mask = _check_pad_mask(pad_mask, embeds.shape[:-1], "init_delta")
    if isinstance(generator, SampleNoise):
        if generator.sample_ids.shape[0] != embeds.shape[0]:
            raise ValueError(f"init_delta: {generator.sample_ids.shape[0]} sample ids for a batch of "
                             f"{embeds.shape[0]} rows")
        z = generator.normal(embeds.shape[1:]).to(device=embeds.device, dtype=work_dtype(embeds.dtype))
        return _zero_padding(z * float(noise_std), mask)  # (B, T, H)
    if isinstance(generator, (list, tuple)):
        # One generator per batch row (per-sample streams): a sample's noise then does not depend on how a
        # global batch is split over processes / micro-batches (the engine's DDP == 1-process property).
        if len(generator) != embeds.shape[0]:
            raise ValueError(f"init_delta: {len(generator)} generators for a batch of {embeds.shape[0]} rows")
        delta = torch.stack([torch.randn(embeds.shape[1:], generator=g, dtype=work_dtype(embeds.dtype),
                                         device=g.device).to(embeds.device) for g in generator])
        return _zero_padding(delta * float(noise_std), mask)  # (B, T, H)
    gen_device = generator.device if generator is not None else embeds.device
    delta = torch.randn(embeds.shape, generator=generator, dtype=work_dtype(embeds.dtype), device=gen_device)
    delta = (delta * float(noise_std)).to(embeds.device)  # (B, T, H)
    return _zero_padding(delta, mask)


def normalize_grad(grad: torch.Tensor, norm: str = "linf", level: str = "token") -> torch.Tensor:
    """``grad / ||grad||`` with the norm taken per token (last dim) or per sequence (last two dims).

    ``norm``: ``linf`` (max-abs, ALUM/mt-dnn/SiFT) or ``l2``.  ``level``: ``token`` (ALUM) or ``sequence``
    (FreeLB normalises per example).  All-zero slices (e.g. padding) stay zero: the guard is the
    smallest normal float, so the direction is scale-free (no mt-dnn-style +1e-6 that shrinks tiny
    gradients).  Computed in float32.
    """
    g = grad.to(work_dtype(grad.dtype))
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


def project(delta: torch.Tensor, epsilon, kind: str) -> torch.Tensor:
    """Per-token projection onto the epsilon ball (Algorithm 1 line 6: Pi_{||delta|| <= eps}).

    ``epsilon``: a number, or a ``(..., 1)`` tensor of per-token radii (``alum.scale=rel``).
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
    dt = work_dtype(torch.promote_types(embeds.dtype, delta.dtype))
    return (embeds.to(dt) + delta.to(dt)).to(embeds.dtype)


def ascent_step(
    delta: torch.Tensor,
    grad: torch.Tensor,
    cfg: ALUMConfig,
    pad_mask: Optional[torch.Tensor] = None,
    rms: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One ALUM ascent update: ``Proj_eps(delta + eta * g / ||g||_inf,token)``, padding re-zeroed.

    ``delta``, ``grad``: ``(B, T, H)``; ``pad_mask``: ``(B, T)``, True/1 = real token (None = none).
    ``rms``: ``(B, T, 1)`` per-token unit for ``alum.scale=rel`` (:func:`alum_pretrain.passes.token_scale`;
    None = absolute units).  Returns a float32 tensor (float64 for float64 inputs); callers detach it.
    """
    mask = _check_pad_mask(pad_mask, delta.shape[:-1], "ascent_step")
    if grad.shape != delta.shape:
        raise ValueError(f"ascent_step: grad shape {tuple(grad.shape)} != delta shape {tuple(delta.shape)}")
    step = normalize_grad(grad, "linf", "token") * (cfg.step_size if rms is None else cfg.step_size * rms)
    new = delta.to(work_dtype(delta.dtype)) + step  # (B, T, H)
    new = project(new, ball_radius(cfg.epsilon, rms, cfg.projection, delta.shape[-1]), cfg.projection)
    return _zero_padding(new, mask)


# --------------------------------------------------------------------------------------------------
# The regulariser
# --------------------------------------------------------------------------------------------------


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
    passes: Optional[AdversarialPasses] = None,
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
    e.g. from ``masking.step_generator`` with its own stream), a list of one generator per sample, or a
    :class:`~alum_pretrain.masking.SampleNoise` (see :func:`init_delta`).  ``divergence(adv_logits, clean_logits)``: per head; default
    ``get_divergence(cfg.divergence)``.  ``baseline``: also compute ``adv_dropout`` (default
    ``cfg.log_baseline``).  ``per_example_scale``: the logits' dim 0 is the batch axis of ``embeds``
    (sequence classification, not the flat masked tokens of MLM): rescale each example's backward on its
    own (see :func:`scale_free_input_grad`).  ``head_weights``: one factor per head (entries of heads whose
    clean logits are None are ignored): R = sum over heads of ``head_weights[h] * divergence_h``, e.g. to
    turn each head's row mean into a sum over its rows divided by a global count; the ascent uses the same
    weighted sum, so the weights also set the heads' relative share of the ascent direction.
    ``passes``: the dropout context of the adversarial forwards (:class:`alum_pretrain.passes.AdversarialPasses`,
    captured by the caller right before its clean pass); needed for ``alum.adv_dropout`` shared/off, None
    = independent masks.  ``alum.objective=rdrop``: delta = 0 and no ascent (R-Drop through this same path);
    ``alum.scale=rel``: epsilon, eta and sigma are per-token multiples of the clean embedding's RMS.

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
    clean = as_heads(clean_logits)
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
    if passes is None:
        if cfg.adv_dropout != "independent":
            raise ValueError(f"alum.adv_dropout={cfg.adv_dropout}: this caller does not capture the clean pass's "
                             "dropout state (AdversarialPasses.capture); use alum.adv_dropout=independent")
        passes = AdversarialPasses()
    rdrop = cfg.objective == "rdrop"
    rms = token_scale(embeds, cfg.scale)  # (B, T, 1) or None (absolute units)
    if not rdrop:
        unit = 1.0 if rms is None or embeds.dtype not in (torch.float16, torch.bfloat16) else float(
            rms[mask].median() if mask is not None else rms.median())  # only 16-bit embeds are checked
        check_perturbation_resolution(embeds, cfg.epsilon * unit, cfg.noise_std * unit, mask, "alum_regularizer")

    if rdrop:  # R-Drop: delta = 0, no ascent
        delta = torch.zeros(embeds.shape, dtype=work_dtype(embeds.dtype), device=embeds.device)
    else:
        delta = init_delta(embeds, mask, cfg.noise_std, generator)  # (B, T, H) float32
        if rms is not None:
            delta = delta * rms
    base = embeds.detach()  # the ascent must not build parameter gradients through the embedding lookup
    grad_norm = torch.zeros((), device=embeds.device)
    nonfinite = torch.zeros((), device=embeds.device)
    zero_frac = torch.zeros((), device=embeds.device)
    for _ in range(0 if rdrop else cfg.k_steps):
        delta.requires_grad_(True)
        with passes():
            adv = as_heads(forward_fn(perturb(base, delta)))
        if len(adv) != len(clean):
            raise ValueError(f"forward_fn returned {len(adv)} logits tensors but clean_logits has {len(clean)}; "
                             "forward_fn must return the same structure as clean_logits")
        # Line 5: g = grad_delta l(f(x), f(x + delta)) against the *detached* clean logits, from a
        # rescaled backward (fp16 cannot underflow it); input-only: no param .grad, no DDP sync.
        g, finite = scale_free_input_grad(
            [a if c is not None else None for a, c in zip(adv, clean)],
            lambda outs: sum_over_heads(outs, clean, divergence, detach_clean=True, weights=head_weights), delta,
            per_example=per_example_scale)
        # Line 6; a non-finite gradient skips this update (delta keeps its value) and is counted.
        stepped = ascent_step(delta.detach(), torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0), cfg, mask, rms)
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
        with torch.no_grad(), torch.random.fork_rng(devices=devices), passes():
            adv_dropout = sum_over_heads(forward_fn(perturb(base, torch.zeros_like(delta))), clean, divergence,
                                          detach_clean=True, weights=head_weights).detach()

    # Lines 8: the adversarial pass on embeds + delta with embeds NOT detached, and R against the clean
    # logits NOT detached: gradients flow into both graphs.
    with passes():
        adv = forward_fn(perturb(embeds, delta.detach()))
    r = sum_over_heads(adv, clean, divergence, detach_clean=False, weights=head_weights)
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
