"""One optimizer step of the native loop, per engine: the loop asks a :class:`Stepper`, never the engine.

The loop (:func:`alum_pretrain.train.train`) calls, per optimizer step,

* :meth:`Stepper.forward_backward` once per micro-batch (autocast forward of the step module, backward);
* :meth:`Stepper.optimizer_step` once: clip (the gradient norm before clipping and the LR of the update),
  the non-finite guard (:func:`~alum_pretrain.engine.step.step_is_finite`, the step's one host sync), then
  the update and the schedule unless the step is skipped;

and, through :func:`alum_pretrain.engine.checkpoint.save` / ``restore``, :meth:`Stepper.save` and
:meth:`Stepper.load` for the engine's own part of a checkpoint.

:class:`DDPStepper` (``--train.engine=ddp``, also one process without DDP): torch's GradScaler (fp16 only),
``clip_grad_norm_``, AdamW and the LR schedule driven here; gradients are all-reduced on the last
micro-batch only (``no_sync`` on the others).  :class:`DeepSpeedStepper` (``--train.engine=deepspeed``):
the DeepSpeed engine owns loss scaling, ZeRO reduction, clipping, the update and the schedule
(:mod:`alum_pretrain.engine.deepspeed_engine`), and itself skips a non-finite update.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import models as M
from ..config import config_to_dict
from ..diskspace import DiskFullError
from . import checkpoint as C
from . import deepspeed_engine as DS
from . import distributed as D
from .step import step_is_finite


@dataclass
class StepOutcome:
    """What :meth:`Stepper.optimizer_step` did: the norm and LR for the log, the guard's flags."""

    grad_norm: torch.Tensor  # global gradient norm before clipping (0-dim, on the device)
    lr: float  # the learning rate of this update
    loss_ok: bool  # the summed loss was finite on every rank
    grad_ok: bool  # the gradient norm was finite
    skipped: bool  # no update and no schedule step (NaN/Inf; an fp16 overflow is the scaler's skip instead)


def clip_value(grad_clip: float) -> float:
    """``--optim.grad_clip`` as a max norm: 0 = no clipping (inf: ``clip_grad_norm_`` still returns the norm)."""
    return grad_clip if grad_clip > 0 else float("inf")


class Stepper:
    """The engine-specific half of an optimizer step; ``run`` is the :class:`~alum_pretrain.engine.setup.Run`."""

    def __init__(self, run: Any):
        self.run = run
        self.autocast = (torch.autocast(run.env.device.type, dtype=run.amp_dtype) if run.amp_dtype is not None
                         else contextlib.nullcontext())

    def forward_backward(self, batch: dict, *, last: bool, **step_kwargs) -> tuple[torch.Tensor, dict]:
        """Forward one micro-batch through the step module under autocast, then backward; ``last``: the last
        micro-batch of the optimizer step.  Returns the step module's ``(loss, metrics)``."""
        with self.grad_sync(last):
            with self.autocast:
                loss, metrics = self.run.step_module(batch, **step_kwargs)
            self.backward(loss)
        return loss, metrics

    def optimizer_step(self, loss_sum: torch.Tensor) -> StepOutcome:
        """Clip, check for NaN/Inf, and (unless skipped) update and schedule; zero the gradients."""
        run = self.run
        grad_norm, lr = self.clip()
        loss_ok, grad_ok = step_is_finite(run, loss_sum, grad_norm)  # the step's one host sync
        # NaN/Inf loss, or NaN/Inf gradient without fp16 loss scaling (bf16/fp32): skip the update and the LR
        # schedule.  fp16 with a finite loss: an overflow, which the loss scaler skips and handles.
        skip = not loss_ok or (not grad_ok and run.amp_dtype != torch.float16)
        self.update(skip)
        return StepOutcome(grad_norm, lr, loss_ok, grad_ok, skip)

    # ---- what each engine does -------------------------------------------------------------------------

    def grad_sync(self, last: bool):
        """Context of one micro-batch's forward and backward (e.g. DDP's ``no_sync`` before the last)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def clip(self) -> tuple[torch.Tensor, float]:
        """``(gradient norm before clipping, LR of the update)``, after the last micro-batch's backward."""
        raise NotImplementedError

    def update(self, skip: bool) -> None:
        """The optimizer and schedule step (none when ``skip``), the loss-scale update, zeroing the grads."""
        raise NotImplementedError

    def save(self, step: int) -> None:
        """Write ``checkpoints/step-N`` (collective: every rank calls it; the weights are known finite)."""
        raise NotImplementedError

    def load(self, ckpt: Path, state: dict) -> None:
        """Restore the weights and the optimizer state from ``ckpt`` (whose ``train_state.pt`` is ``state``)."""
        raise NotImplementedError


class DDPStepper(Stepper):
    """torch DDP (or a single process): GradScaler, clip_grad_norm_, the optimizer and schedule here."""

    def grad_sync(self, last: bool):
        module = self.run.step_module  # all-reduce gradients only on the last micro-batch
        return contextlib.nullcontext() if (last or not isinstance(module, DDP)) else module.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        self.run.scaler.scale(loss).backward()

    def clip(self) -> tuple[torch.Tensor, float]:
        run = self.run
        run.scaler.unscale_(run.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), clip_value(run.cfg.optim.grad_clip))
        return grad_norm, run.optimizer.param_groups[0]["lr"]  # the LR of this update

    def update(self, skip: bool) -> None:
        run = self.run
        if not skip:
            run.scaler.step(run.optimizer)
        run.scaler.update()
        if not skip:
            run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)

    def save(self, step: int) -> None:
        run = self.run
        rngs = D.gather_objects(run.env, C.rng_state())
        full = None  # rank 0's disk-full message, shared so that every rank stops with it
        if run.env.is_main:
            state = self.train_state(step)
            state["rng"] = rngs
            try:
                path = C.save_checkpoint(run.out, step, lambda d: M.save_model(run.model, d), state,
                                         run.cfg.train.keep_last)
                run.logger.info(f"saved {path}")
            except DiskFullError as exc:
                if not run.env.distributed:
                    raise
                full = str(exc)
        if run.env.distributed:  # also the barrier: every rank leaves after rank 0's write
            full = D.broadcast_object(run.env, full)
            if full:
                raise DiskFullError(full)

    def train_state(self, step: int) -> dict:
        """``train_state.pt`` of a DDP checkpoint, without the RNG states."""
        run = self.run
        return {
            "step": step,
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(),
            "loader": run.loader.state_dict(),  # global sample offset: identical on every rank
            "global_batch": run.global_batch,
            "world_size": run.env.world_size,
            "config": config_to_dict(run.cfg),
            "identity": run.identity,  # the data-bin and tokenizer fingerprint (alum_pretrain.run_identity)
            "intra_op_threads": torch.get_num_threads(),  # CPU float reductions round per thread count
        }

    def load(self, ckpt: Path, state: dict) -> None:
        run = self.run
        if state.get("engine") == "deepspeed":
            raise ValueError(f"{ckpt}: written by the DeepSpeed engine; resume it with --train.engine=deepspeed")
        loaded = M.load_model(ckpt / C.MODEL_DIR, trust_remote_code=run.cfg.model.trust_remote_code)
        run.model.load_state_dict(loaded.state_dict())
        del loaded
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        run.scaler.load_state_dict(state["scaler"])


class DeepSpeedStepper(Stepper):
    """DeepSpeed ZeRO: ``run.engine`` scales, reduces, clips, steps, schedules and skips non-finite updates."""

    def backward(self, loss: torch.Tensor) -> None:  # fp16 scaling and ZeRO reduction inside the engine
        DS.backward(self.run.engine, loss)

    def clip(self) -> tuple[torch.Tensor, float]:
        return DS.optimizer_step(self.run.engine)  # unscale, clip, step, schedule, zero_grad in engine.step()

    def update(self, skip: bool) -> None:
        """The engine's step (in :meth:`clip`) already updated, or skipped a non-finite update; an fp16
        overflow (finite loss: not ``skip``) still steps the LR schedule, as under DDP."""
        if not skip:
            DS.schedule_after_overflow(self.run.engine)

    def save(self, step: int) -> None:  # every rank also writes its ZeRO shard into the same step-N folder
        DS.save(self.run, step)

    def load(self, ckpt: Path, state: dict) -> None:  # weights, ZeRO optimizer shards, schedule, fp16 scale
        DS.load(self.run, ckpt, state)


def make_stepper(run: Any) -> Stepper:
    """The stepper of ``run.cfg.train.engine``."""
    return DeepSpeedStepper(run) if run.engine is not None else DDPStepper(run)
