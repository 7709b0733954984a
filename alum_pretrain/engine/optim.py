"""AdamW with decoupled weight decay (not on biases/LayerNorm) and the paper's LR schedule.

The schedule (Liu et al. 2020, Sec. 4.2, following BERT): "increases linearly from zero to the peak rate
of 1e-4 in first one percent of steps, and then decays linearly to zero in the remaining 99 %".
``lr_factor(s)`` is the multiplier used by optimizer step ``s`` (0-based): ``(s+1)/W`` during the
``W = ceil(warmup_ratio * max_steps)`` warm-up steps (so the first update is not wasted at lr 0), then
``(max_steps - s) / (max_steps - W)`` down to ``1/(max_steps - W)`` at the last step.
"""

from __future__ import annotations

import math

import torch

from ..models import param_shape
from .config import OptimConfig


FRESH_ATTR = "_alum_fresh"  # set on parameters that a checkpoint load initialised randomly (models.py)


def param_groups(model: torch.nn.Module, weight_decay: float, fresh_lr: float | None = None) -> list[dict]:
    """Two groups: matrices/embeddings decay; biases and LayerNorm weights (1-D) do not (BERT's rule).

    ``fresh_lr``: when given, parameters marked fresh (``FRESH_ATTR``: e.g. a new MLM head on a checkpoint
    without one) form two more groups with this LR; the schedule scales every group's LR alike.
    """
    decay, no_decay, fresh_decay, fresh_no_decay, seen = [], [], [], [], set()
    for _name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        if fresh_lr is not None and getattr(p, FRESH_ATTR, False):
            (fresh_decay if len(param_shape(p)) >= 2 else fresh_no_decay).append(p)
        else:  # (param_shape: the data of a ZeRO-3 partitioned parameter is an empty 1-D tensor)
            (decay if len(param_shape(p)) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if fresh_decay or fresh_no_decay:
        groups += [{"params": fresh_decay, "weight_decay": weight_decay, "lr": fresh_lr},
                   {"params": fresh_no_decay, "weight_decay": 0.0, "lr": fresh_lr}]
    return groups


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    kwargs = {}
    if device.type == "cuda":
        kwargs["fused"] = True  # one kernel for all parameters
    fresh_lr = cfg.lr * cfg.fresh_lr_mult if cfg.fresh_lr_mult != 1.0 else None
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay, fresh_lr), lr=cfg.lr, betas=tuple(cfg.betas),
                             eps=cfg.eps, **kwargs)


def warmup_steps(max_steps: int, warmup_ratio: float) -> int:
    return int(math.ceil(warmup_ratio * max_steps))


def lr_factor(step: int, max_steps: int, warmup: int) -> float:
    """Multiplier of the peak LR for optimizer step ``step`` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (max_steps - step) / max(1, max_steps - warmup))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    w = warmup_steps(max_steps, cfg.warmup_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, max_steps, w))
