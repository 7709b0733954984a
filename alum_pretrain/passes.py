"""How ALUM's adversarial passes see dropout, and the scale its epsilon is measured in (torch only).

**Dropout of the adversarial passes** (``alum.adv_dropout``).  ALUM's term is
``R = SymKL(f(e), f(e + delta))`` with both passes in training mode.  What ``R`` measures then depends on the
dropout masks of the two passes:

``independent`` (the paper, mt-dnn, SMART)
    every pass draws its own masks, so ``R`` mixes the sensitivity to ``delta`` with the disagreement of two
    dropout masks (R-Drop, Liang et al. 2021).  At the paper's ``epsilon = 1e-5`` the second part is almost
    all of ``R``;
``shared``
    every adversarial pass (ascent and final) replays the clean pass's dropout masks: the global RNG state
    captured right before the clean pass's first dropout draw is restored inside a forked RNG, so ``R`` is
    the effect of ``delta`` alone while the model still trains with dropout, and training's own random
    stream is left exactly as it was;
``off``
    the adversarial passes run with every module in eval mode (no dropout at all).

**R-Drop as the control arm** (``alum.objective: rdrop``): ``delta = 0``, no ascent, independent masks,
``R = SymKL(f(e), f'(e))`` through the same code path as ALUM, so an ablation differs in one thing only.

**Scale of epsilon** (``alum.scale``).  ``abs`` (the paper): ``epsilon``, ``step_size`` and ``noise_std`` are in
embedding units, so the same number means something else for every model (MiniLM's word embeddings have a
per-token RMS of ~0.05; ``epsilon = 1e-5`` is 2e-4 of it).  ``rel``: they are multiples of each token's own
scale at the perturbation point - its RMS over the hidden dimension for the L-inf ball, the noise and the
ascent step, and its L2 norm for the L2 ball - so ``epsilon = 1e-2`` always means "1 % of the token's
embedding" (the idea of DeBERTa's SiFT, which perturbs a parameter-free LayerNorm of the embeddings).
The scale is the detached clean embedding's: it is a constant of the ball, not a path for gradients.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

from .precision import work_dtype

__all__ = ["ADV_DROPOUT", "OBJECTIVES", "SCALES", "AdversarialPasses", "token_scale", "ball_radius"]

ADV_DROPOUT = ("independent", "shared", "off")
OBJECTIVES = ("alum", "rdrop")
SCALES = ("abs", "rel")


@dataclass
class AdversarialPasses:
    """The context every adversarial forward runs in (``alum.adv_dropout``); see the module docstring.

    Build it with :meth:`capture` immediately before the clean pass draws its first dropout mask (after
    any embedding lookup that the adversarial passes do not repeat), then call ``with passes(): ...``
    around each adversarial forward.
    """

    mode: str = "independent"
    module: Optional[nn.Module] = None
    cpu_state: Optional[torch.Tensor] = None
    cuda_device: Optional[torch.device] = None
    cuda_state: Optional[torch.Tensor] = None

    @classmethod
    def capture(cls, mode: str, module: Optional[nn.Module], device: torch.device | str) -> "AdversarialPasses":
        """``mode`` = ``alum.adv_dropout``; ``module``: the model run by the adversarial passes (for ``off``);
        ``device``: where the model runs (its CUDA generator is replayed too for ``shared``)."""
        if mode not in ADV_DROPOUT:
            raise ValueError(f"alum.adv_dropout={mode!r}: must be one of {', '.join(ADV_DROPOUT)}")
        if mode == "off" and module is None:
            raise ValueError("alum.adv_dropout=off: the module whose dropout is switched off is missing")
        device = torch.device(device)
        passes = cls(mode=mode, module=module)
        if mode == "shared":
            passes.cpu_state = torch.get_rng_state()
            if device.type == "cuda":  # the CUDA generator's seed/offset pair is host-side: no device sync
                passes.cuda_device = device
                passes.cuda_state = torch.cuda.get_rng_state(device)
        return passes

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        if self.mode == "shared":
            devices = [self.cuda_device] if self.cuda_device is not None else []
            with torch.random.fork_rng(devices=devices):  # training's own stream is restored afterwards
                torch.set_rng_state(self.cpu_state)
                if self.cuda_device is not None:
                    torch.cuda.set_rng_state(self.cuda_state, self.cuda_device)
                yield
        elif self.mode == "off":
            modes = [(m, m.training) for m in self.module.modules()]
            self.module.eval()
            try:
                yield
            finally:
                for m, training in modes:
                    m.training = training
        else:
            yield


def token_scale(embeds: torch.Tensor, scale: str) -> Optional[torch.Tensor]:
    """``(..., 1)`` per-token unit of ``noise_std`` and ``step_size`` for ``alum.scale=rel``: the token's RMS
    over the hidden dimension, float32, detached; None for ``abs`` (see :func:`ball_radius` for epsilon)."""
    if scale == "abs":
        return None
    if scale != "rel":
        raise ValueError(f"alum.scale={scale!r}: must be one of {', '.join(SCALES)}")
    e = embeds.detach().to(work_dtype(embeds.dtype))
    return e.pow(2).mean(-1, keepdim=True).sqrt()  # (..., 1)


def ball_radius(epsilon: float, rms: Optional[torch.Tensor], projection: str, hidden: int):
    """epsilon in embedding units: itself (``abs``), else epsilon x the token's RMS for the L-inf ball and
    epsilon x its L2 norm (RMS x sqrt(H)) for the L2 ball, so ``|delta| / |e| <= epsilon`` in the ball's norm."""
    if rms is None:
        return epsilon
    return epsilon * rms * (hidden ** 0.5 if projection == "l2" else 1.0)
