"""Adversarial fine-tuning for ``transformers.Trainer``: the ``alum-finetune`` methods, one code path.

:class:`AdversarialTrainer` runs a method of :mod:`alum_pretrain.finetune.methods` - built by
:func:`~alum_pretrain.finetune.methods.build_method` exactly as ``alum-finetune`` builds it - on each
micro-batch of a sequence classifier (``AutoModelForSequenceClassification``; ``num_labels == 1`` =
regression).  Methods: ``plain``, ``smart``/``alum`` (ALUM's virtual adversarial term R,
:func:`alum_pretrain.adversarial.alum_regularizer`), ``freelb`` (K accumulated adversarial backwards, one
optimizer step), ``pgd`` (K input-only ascent steps, one step on the adversarial loss) and ``freeat``
(K replays per minibatch, each an optimizer step).  The knobs are the sections of
:class:`alum_pretrain.finetune.config.FinetuneConfig` (``smart``, ``freelb``, ``pgd``, ``freeat``).

**How a method meets Trainer's loop.** A method owns its update through a
:class:`~alum_pretrain.finetune.methods.TrainContext`; here the context's ``backward`` is Trainer's
(``accelerator.backward``: fp16 loss scaling, division by the accumulation steps) and its
``optimizer_step`` leaves the step to Trainer (clipping, optimizer, LR schedule, ``global_step``) - except
FreeAT's first K-1 replays, which clip and step the optimizer at once (without an LR-schedule step:
the schedule counts minibatches), so FreeAT needs ``gradient_accumulation_steps == 1``.

**DDP.** The methods run several forwards per backward (or input-only backwards), which DDP's reducer
does not support uniformly, so they run the unwrapped model and the gradients are averaged over the
processes by one fixed-order all-reduce before each optimizer step (as ``alum-finetune`` does).

**Randomness.** Each micro-batch's random starts and shared dropout seeds come from a step seed that is a
pure function of ``(args.seed, global_step, micro-batch, process)``, so a resumed run repeats them.

**Logs.** ``adv`` (SMART/ALUM), ``adv_dropout``, ``delta_l2``/``delta_linf``, ``ascent_nonfinite`` and
``ascent_zero_grad_frac`` are averaged per step into ``trainer.state.log_history``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from transformers import Trainer

from ..finetune.config import FinetuneConfig
from ..finetune.methods import METHOD_NAMES, TrainContext, build_method
from ..finetune.methods.base import sync_grads_fixed_order
from .logs import MetricLogMixin

__all__ = ["AdversarialTrainer", "TRAINER_METHODS"]

#: the methods that fit Trainer's loop (RIFT needs its own data pipeline: synonym candidates per example)
TRAINER_METHODS = tuple(m for m in METHOD_NAMES if m != "rift")
LOGGED = ("adv", "adv_dropout", "delta_l2", "delta_linf", "ascent_nonfinite", "ascent_zero_grad_frac")


@dataclass
class TrainerContext(TrainContext):
    """A :class:`TrainContext` whose backward and optimizer step are the Trainer's (module docstring)."""

    trainer: Any = None
    steps_in_batch: int = 1   # optimizer steps the method takes per minibatch (FreeAT: K)
    _calls: int = 0

    def backward(self, loss: torch.Tensor) -> None:
        ga = max(1, int(self.trainer.current_gradient_accumulation_steps))
        self.trainer.accelerator.backward(loss / ga)

    def sync_grads(self) -> None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        if self.trainer.accelerator.sync_gradients:  # once per accumulated step, before Trainer's step
            sync_grads_fixed_order(self.params(), dist.get_world_size())

    def optimizer_step(self) -> torch.Tensor:
        """FreeAT's intermediate replays step here; the last (and every other method's) is Trainer's."""
        self._calls += 1
        self.sync_grads()
        if self._calls >= self.steps_in_batch:
            return torch.zeros(())  # Trainer clips, steps and logs grad_norm
        params = self.params()
        max_norm = self.trainer.args.max_grad_norm
        norm = self.trainer.accelerator.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1
        return torch.as_tensor(norm).detach()


class AdversarialTrainer(MetricLogMixin, Trainer):
    """``transformers.Trainer`` for sequence classification with an ``alum-finetune`` method.

    ``method``: one of :data:`TRAINER_METHODS` (``smart``/``alum``, ``freelb``, ``pgd``, ``freeat``,
    ``plain``).  ``finetune``: a :class:`FinetuneConfig` whose method sections hold the knobs (default:
    ``FinetuneConfig()``, the ``alum-finetune`` defaults).  Every other argument is ``Trainer``'s.
    """

    def __init__(self, *args: Any, method: str = "smart", finetune: Optional[FinetuneConfig] = None, **kwargs: Any):
        if method not in TRAINER_METHODS:
            raise ValueError(f"AdversarialTrainer: method={method!r}; choose one of {', '.join(TRAINER_METHODS)} "
                             "(rift needs alum-finetune's synonym pipeline)")
        if finetune is not None and not isinstance(finetune, FinetuneConfig):
            raise ValueError("AdversarialTrainer: finetune must be an alum_pretrain.finetune.config.FinetuneConfig")
        super().__init__(*args, **kwargs)
        hf = self.accelerator.unwrap_model(self.model)
        regression = int(getattr(hf.config, "num_labels", 2)) == 1
        self.method = build_method(method, finetune if finetune is not None else FinetuneConfig(), regression)
        self.method.setup(hf)
        if self.method.optimizer_steps_per_batch > 1 and self.args.gradient_accumulation_steps != 1:
            raise ValueError(f"AdversarialTrainer: method={method!r} takes {self.method.optimizer_steps_per_batch} "
                             "optimizer steps per minibatch and needs gradient_accumulation_steps=1")
        self._micro = (-1, 0)

    def _step_seed(self) -> int:
        step = int(self.state.global_step)
        gstep, seen = self._micro
        seen = seen if gstep == step else 0
        self._micro = (step, seen + 1)
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        return ((self.args.seed * 1_000_003 + step * 100_003 + seen) * world + rank) % (2**62)

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """One micro-batch through ``method.train_step``; returns the loss divided by the accumulation steps."""
        model.train()
        inputs = self._prepare_inputs(inputs)
        if "labels" not in inputs:
            raise ValueError("AdversarialTrainer: the batch has no 'labels' (name the label column 'labels' or "
                             "'label' and use DataCollatorWithPadding)")
        hf = self.accelerator.unwrap_model(model)
        ctx = TrainerContext(model=hf, optimizer=self.optimizer, grad_clip=self.args.max_grad_norm,
                             regression=self.method.regression, step_seed=self._step_seed(), trainer=self,
                             steps_in_batch=self.method.optimizer_steps_per_batch,
                             extra_params=[p for m in self.method.modules() for p in m.parameters()])
        batch = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        if "attention_mask" not in batch:
            batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        with self.accelerator.autocast():
            metrics = self.method.train_step(ctx, batch)
        self.accumulate_metrics(metrics, LOGGED)
        ga = max(1, int(self.current_gradient_accumulation_steps))
        return metrics["loss"].detach() / ga

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        """Trainer's ``log`` plus the method's metrics on training logs (those that carry ``loss``)."""
        if "loss" in logs and "eval_loss" not in logs:
            logs = {**logs, **self.metric_means()}
        super().log(logs, start_time)
