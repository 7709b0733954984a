"""fairseq-train as strict as ``alum-train``: non-finite updates are skipped and counted, bad data is one line.

Installed by :func:`alum_pretrain.fairseq_ext.preemption.install` (inside a fairseq-train process only):

* ``Trainer.clip_grad_norm`` is wrapped.  fairseq 0.12 raises ``FloatingPointError("gradients are Nan/Inf")``
  at the first non-finite gradient norm of an fp32/bf16 run and stops.  Here the norm (all-reduced, so every
  rank decides alike) is checked instead: when it is NaN/Inf the gradients are zeroed, a finite 0 is returned
  and the task's ``optimizer_step`` skips ``optimizer.step()`` - no update; ``nonfinite_skipped`` counts it
  in the log.  ``--max-nonfinite`` (5, like ``--train.max_nonfinite``) of them in a row stop the run with
  the native engine's message naming the last good checkpoint, exit 3.  fp16/AMP overflows keep fairseq's
  own loss-scaler handling.  fairseq's learning rate is a function of the update number, which advances
  on a skipped update (the native engine's step counter advances too, its schedule does not).
* ``fairseq_cli.train.main`` is wrapped: the native engine's data errors (an id outside the vocabulary:
  :class:`~alum_pretrain.data.databin.DataIntegrityError`) and a resume refused for another data-bin or
  tokenizer (:class:`~alum_pretrain.fairseq_ext.identity.ResumeRefused`) print one line and exit 2, a run stopped by the
  non-finite rule exits 3 - the codes of ``alum-train``.
"""

from __future__ import annotations

import logging
import os
import sys

import torch

from ..data.databin import DataIntegrityError
from ..engine.step import NonFiniteError
from .identity import ResumeRefused

logger = logging.getLogger(__name__)
SKIP_FLAG = "alum_skip_update"  # set on the fairseq optimizer for the update being skipped

__all__ = ["install_strict", "SKIP_FLAG", "nonfinite_message"]


def nonfinite_message(update: int, run: int, limit: int, last_good: str) -> str:
    """The native engine's stop message (``alum_pretrain.train``), with fairseq's flag names."""
    return (f"step {update}: the loss or gradient norm was NaN/Inf for {run} consecutive steps "
            f"(--max-nonfinite={limit}); those updates were skipped; {last_good} - resume from it with a lower "
            "--lr (or fp32 / bf16 instead of fp16)")


def _last_good(save_dir: str) -> str:
    last = os.path.join(save_dir, "checkpoint_last.pt")
    return (f"the last good checkpoint is {last} (skipped updates never reach the weights)"
            if os.path.exists(last) else f"no checkpoint was written in {save_dir}")


def _wrap_clip(original):
    def clip_grad_norm(self, clip_norm):
        norm = original(self, clip_norm)
        from fairseq.logging import metrics

        if self.cfg.common.amp or bool(torch.isfinite(norm).all()):
            self.alum_nonfinite_run = 0
            metrics.log_scalar_sum("nonfinite_skipped", 0)
            return norm
        run = getattr(self, "alum_nonfinite_run", 0) + 1
        self.alum_nonfinite_run = run
        metrics.log_scalar_sum("nonfinite_skipped", 1)
        update = self.get_num_updates() + 1
        limit = int(getattr(self.task.cfg, "max_nonfinite", 5))
        logger.warning(f"update {update}: NaN/Inf gradient norm; update skipped ({run} in a row, "
                       f"--max-nonfinite={limit})")
        if run >= limit:
            raise NonFiniteError(nonfinite_message(update, run, limit, _last_good(self.cfg.checkpoint.save_dir)))
        self.optimizer.zero_grad()
        setattr(self.optimizer, SKIP_FLAG, True)
        return torch.zeros_like(norm)

    clip_grad_norm.__wrapped__ = original
    return clip_grad_norm


def _wrap_main(original):
    def main(cfg, *args, **kwargs):
        try:
            return original(cfg, *args, **kwargs)
        except (DataIntegrityError, ResumeRefused) as exc:
            print(f"fairseq-train: error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        except NonFiniteError as exc:
            print(f"fairseq-train: error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(3) from None

    main.__wrapped__ = original
    return main


def install_strict(train_modules: list) -> None:
    """Wrap ``Trainer.clip_grad_norm`` and the ``main`` of each fairseq-train module (once)."""
    from fairseq.trainer import Trainer

    if not hasattr(Trainer.clip_grad_norm, "__wrapped__"):
        Trainer.clip_grad_norm = _wrap_clip(Trainer.clip_grad_norm)
    for mod in train_modules:
        if hasattr(mod, "main") and not hasattr(mod.main, "__wrapped__"):
            mod.main = _wrap_main(mod.main)
