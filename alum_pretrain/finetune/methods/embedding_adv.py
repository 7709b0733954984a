"""The embedding-space adversary of FreeLB, PGD and FreeAT (Zhu et al. 2020, Sec. 3 and Algorithm 1).

Shared by the three methods and by ``alum-eval-robust``'s maximum-loss-increase measure.  The
perturbation ``delta`` (B, T, H) lives on the word embeddings; its norm is taken **per example**
(over the whole sequence: the Frobenius norm of FreeLB's ``||delta||_F <= eps``), unlike ALUM's per-token
ball.  The per-example L2 normalisation and projection reuse :func:`alum_pretrain.adversarial.normalize_grad`
(``level="sequence"``) and :func:`alum_pretrain.adversarial.project` applied to the flattened sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ...adversarial import normalize_grad, project
from ...precision import zero_grad_fraction
from ...config import opt

NORM_TYPES = ("l2", "linf", "sign")


@dataclass
class EmbeddingAdvConfig:
    """Embedding-space adversary (FreeLB/PGD/FreeAT knobs; FreeLB's names)."""

    adv_lr: float = opt(1e-1, "ascent step size alpha: delta += adv_lr * g / ||g|| (FreeLB Table 6, SST-2: 1e-1)")
    adv_steps: int = opt(2, "ascent steps K (FreeLB Table 6, SST-2: 2); FreeAT: replays per minibatch")
    adv_init_mag: float = opt(6e-1, "magnitude of the uniform random start: l2: U(-1,1)*mag/sqrt(len*dim), "
                                    "linf: U(-mag,mag); 0 = start at delta=0 (FreeLB HF SST-2 recipe: 0.6)")
    adv_max_norm: float = opt(0.0, "radius epsilon of the per-example ball delta is projected onto after every "
                                   "ascent step (l2: Frobenius norm over the sequence; linf: clamp); 0 = no projection "
                                   "(FreeLB HF default; the paper's Table 6 uses 0.6 for SST-2)")
    norm_type: str = opt("l2", "ascent direction: l2 (g / per-example Frobenius norm), linf (g / per-example "
                               "max-abs, as the FreeLB code) or sign (sign(g), FGSM-style as in FreeAT); the "
                               "projection is the L2 ball for l2 and a clamp for linf/sign")
    reuse_dropout_masks: bool = opt(True, "use the same dropout masks in every ascent step of a minibatch "
                                          "(FreeLB Sec. 3.3; false = fresh masks each pass, the ablation)")

    _flag = "adv"   # the config section that holds these knobs (named in error messages)

    def __post_init__(self) -> None:
        f = self._flag
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"--{f}.norm_type={self.norm_type!r} must be one of {', '.join(NORM_TYPES)}")
        for name in ("adv_lr", "adv_init_mag", "adv_max_norm"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"--{f}.{name}={v!r} must be a finite number >= 0")
        if not isinstance(self.adv_steps, int) or self.adv_steps < 1:
            raise ValueError(f"--{f}.adv_steps={self.adv_steps!r} must be an integer >= 1")


@dataclass
class FreeLBConfig(EmbeddingAdvConfig):
    """FreeLB (method=freelb): K ascent steps, parameter gradients accumulated, one optimizer step."""

    _flag = "freelb"


@dataclass
class PGDConfig(EmbeddingAdvConfig):
    """K-PGD (method=pgd): K input-only ascent steps, then one step on the adversarial loss."""

    _flag = "pgd"


@dataclass
class FreeATConfig(EmbeddingAdvConfig):
    """FreeAT (method=freeat): K replays per minibatch, each one optimizer step and one ascent step."""

    _flag = "freeat"


def init_uniform_delta(embeds: torch.Tensor, pad_mask: torch.Tensor, init_mag: float, norm_type: str,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """FreeLB's random start, zero at padding, float32.

    l2:   delta = U(-1, 1) * mask * init_mag / sqrt(len_b * H), len_b = real tokens of example b, so that
          E||delta_b||_F is O(init_mag) whatever the length;
    linf, sign: delta = U(-init_mag, init_mag) * mask.
    The uniform draw is ``torch.rand(B, T, H, generator=generator)`` on the CPU (device-independent).
    """
    b, t, h = embeds.shape
    mask = pad_mask.to(device=embeds.device, dtype=torch.float32).unsqueeze(-1)  # (B, T, 1)
    if init_mag == 0:
        return torch.zeros((b, t, h), dtype=torch.float32, device=embeds.device)
    u = (torch.rand((b, t, h), generator=generator) * 2 - 1).to(embeds.device)  # U(-1, 1), (B, T, H)
    if norm_type == "l2":
        lengths = pad_mask.to(device=embeds.device, dtype=torch.float32).sum(1)     # (B,)
        mag = init_mag / torch.sqrt(lengths * h)                                     # (B,)
        return u * mask * mag.view(-1, 1, 1)
    return u * init_mag * mask


def ascent_update(delta: torch.Tensor, grad: torch.Tensor, cfg: EmbeddingAdvConfig,
                  pad_mask: torch.Tensor) -> torch.Tensor:
    """``Proj_eps(delta + adv_lr * g / ||g||)`` with per-example norms (FreeLB Algorithm 1 lines 10-12);
    ``sign``: ``clamp(delta + adv_lr * sign(g), -eps, eps)``."""
    b = delta.shape[0]
    if cfg.norm_type == "sign":
        step = torch.sign(grad).to(torch.promote_types(grad.dtype, torch.float32))
    else:
        step = normalize_grad(grad, cfg.norm_type, "sequence")             # (B, T, H), unit per example
    new = delta.to(torch.promote_types(delta.dtype, torch.float32)) + cfg.adv_lr * step
    if cfg.adv_max_norm > 0:
        if cfg.norm_type == "l2":
            # per-example Frobenius ball = per-"token" L2 ball of the flattened sequence (B, 1, T*H)
            new = project(new.reshape(b, 1, -1), cfg.adv_max_norm, "l2").reshape(new.shape)
        else:
            new = project(new, cfg.adv_max_norm, "linf")
    return new * pad_mask.to(device=new.device, dtype=new.dtype).unsqueeze(-1)


def guarded_update(delta: torch.Tensor, grad: torch.Tensor, cfg: EmbeddingAdvConfig, pad_mask: torch.Tensor,
                   stats: dict) -> torch.Tensor:
    """:func:`ascent_update` that keeps ``delta`` when ``grad`` is not finite (an fp16 overflow, or a scaled
    gradient from a GradScaler step that will be skipped) and records, in ``stats`` (0-dim tensors, no host
    sync), ``ascent_nonfinite`` (+1 per skipped update) and ``ascent_zero_grad_frac`` (mean over the
    calls of the fraction of real tokens whose gradient row was entirely 0).  ``grad`` may be scaled
    by any positive factor (the update normalises it)."""
    finite = torch.isfinite(grad).all()
    stepped = ascent_update(delta, torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0), cfg, pad_mask)
    new = torch.where(finite, stepped, delta.to(stepped.dtype))
    n = stats.get("_n", 0) + 1
    zf = zero_grad_fraction(grad, pad_mask)
    stats["ascent_zero_grad_frac"] = stats.get("ascent_zero_grad_frac", zf * 0) * ((n - 1) / n) + zf / n
    stats["ascent_nonfinite"] = stats.get("ascent_nonfinite", zf * 0) + (~finite).float()
    stats["_n"] = n
    return new


def public_stats(stats: dict) -> dict:
    """The metrics of :func:`guarded_update` without its private counter."""
    return {k: v for k, v in stats.items() if not k.startswith("_")}
