"""ALUM for ``transformers.Trainer``: masked-LM (continual) pre-training with ``loss = L_mlm + alpha * R``.

:class:`AlumTrainer` is a ``Trainer`` whose ``compute_loss`` runs the project's pre-training objective,
:func:`alum_pretrain.objective.pretrain_objective` - the function the native and DeepSpeed engines and the
fairseq criterion call - on the batch ``DataCollatorForLanguageModeling`` produced (``labels`` = the
original ids at the masked positions, -100 elsewhere).  The perturbation point, the masked-only LM head
and the NSP head come from :class:`alum_pretrain.models.PretrainModel` around the Trainer's model; the
knobs (alpha, epsilon, eta, sigma, K, start_step, divergence, perturbation point, baseline) are an
:class:`alum_pretrain.adversarial.ALUMConfig`, the dataclass the engines use.

**What it inherits from the core.** The ascent takes ``torch.autograd.grad`` w.r.t. delta only (no
parameter gradient, no DDP all-reduce); delta and ``e + delta`` are float32; the ascent gradient is
scale-free (:func:`alum_pretrain.precision.scale_free_input_grad`), so fp16 autocast cannot underflow it
while Trainer's GradScaler scales the final backward; R is the symmetric KL over the masked tokens only.

**Normalisation.** When Trainer counts the masked tokens of the whole accumulated (and, with
``average_tokens_across_devices``, global) batch (``num_items_in_batch``), the MLM sum and R are divided
by that count exactly as the engines divide by their global count; otherwise each micro-batch's mean is
divided by the accumulation steps (Trainer's default).  Either way the loss is already scaled for
gradient accumulation (``loss_is_scaled_for_ga``).

**Randomness.** The random start of delta for sample ``i`` of micro-batch ``m`` of optimizer step ``s``
is :func:`alum_pretrain.masking.sample_normals` of ``(args.seed, s, sample id)`` (as in both engines), so a
resumed run draws the delta an uninterrupted run would.

**DDP.** With Trainer's DDP the clean pass runs through the wrapped model (DDP's forward prepares the
reducer; the full HF forward, logits gathered at the masked positions) and the ascent and adversarial
passes through the unwrapped model: one reducer-prepared forward and one backward per micro-batch.

**Logs.** Every logging step adds to ``trainer.state.log_history`` (and the enabled reporters) the means
over the steps since the last log of ``mlm`` and ``adv`` (steps with ALUM on), ``adv_dropout`` and
``adv_share = (adv - adv_dropout) / adv`` (with ``alum.log_baseline``), ``alum`` (1 when ALUM was on at the
last step) and ``mask_rate`` (the scheduled rate of the last step: from a
:class:`~alum_pretrain.hf.curriculum.MaskingCurriculumCallback` if one is registered, else the
collator's ``mlm_probability``).  Evaluation uses the model's own MLM loss (``eval_loss``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from transformers import Trainer

from ..adversarial import ALUMConfig
from ..compat import check_alum
from ..masking import IGNORE_INDEX, SampleNoise
from ..models import PretrainModel
from ..objective import Normalizers, pretrain_objective
from ..passes import AdversarialPasses
from .curriculum import MaskingCurriculumCallback
from .logs import MetricLogMixin

__all__ = ["AlumTrainer"]

#: objective metrics averaged into the training logs
LOGGED = ("mlm", "nsp", "adv", "adv_dropout")


class AlumTrainer(MetricLogMixin, Trainer):
    """``transformers.Trainer`` with ALUM's adversarial term in the training loss (module docstring).

    ``alum``: an :class:`ALUMConfig` (default: the paper's pre-training knobs, alpha = 10 from step 0);
    every other argument is ``Trainer``'s.  The model must be an encoder-only HF masked-LM
    (``AutoModelForMaskedLM``, or ``*ForPreTraining`` with an NSP head when the batches carry
    ``next_sentence_label``).
    """

    def __init__(self, *args: Any, alum: Optional[ALUMConfig] = None, **kwargs: Any):
        if alum is not None and not isinstance(alum, ALUMConfig):
            raise ValueError(f"AlumTrainer: alum must be an alum_pretrain.adversarial.ALUMConfig, "
                             f"got {type(alum).__name__}")
        super().__init__(*args, **kwargs)
        self.alum = alum if alum is not None else ALUMConfig()
        max_steps = int(getattr(self.args, "max_steps", -1) or -1)
        # What would make the term meaningless, as warnings: in the Python API delta = 0 is a documented control.
        check_alum(self.alum, max_steps=max_steps if max_steps > 0 else None, strict=False)
        self._wrapper: Optional[PretrainModel] = None
        self._micro = (-1, 0)  # (global step, micro-batches seen at that step)
        self._alum_last = False

    # -- the model seen from the perturbation point -----------------------------------------------------
    def pretrain_model(self, model: torch.nn.Module) -> PretrainModel:
        """The :class:`PretrainModel` around the HF model inside ``model`` (built once; shares parameters)."""
        hf = self.accelerator.unwrap_model(model)
        if self._wrapper is None or self._wrapper.hf is not hf:
            self._wrapper = PretrainModel(hf, perturb_at=self.alum.perturb_at)
        return self._wrapper

    def _denominators(self, n_masked: int, batch: int, num_items_in_batch) -> tuple[Any, float]:
        ga = max(1, int(getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)))
        if num_items_in_batch is not None:
            world = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
            count = (num_items_in_batch.clamp_min(1) if isinstance(num_items_in_batch, torch.Tensor)
                     else max(int(num_items_in_batch), 1))
            mlm = count / world  # the global masked-token count of the step / world size
        else:
            mlm = max(n_masked, 1) * ga
        return mlm, float(batch * ga)

    def _generators(self, batch: int, step: int, device: torch.device) -> SampleNoise:
        gstep, seen = self._micro
        seen = seen if gstep == step else 0
        self._micro = (step, seen + 1)
        first = (seen * self.accelerator.num_processes + self.accelerator.process_index) * batch
        return SampleNoise(self.args.seed, step, torch.arange(first, first + batch, device=device))

    def _clean_pass(self, model, pm: PretrainModel, embeds, inputs: dict, masked_pos, use_nsp: bool):
        attn, tt = inputs["attention_mask"], inputs.get("token_type_ids")
        if model is pm.hf:  # single process: the engines' masked-only path
            return pm.heads_from_embeds(embeds, attn, tt, masked_pos, use_nsp)
        # wrapped (DDP): the reducer is prepared by this forward; logits gathered at the masked positions
        kw = {"input_ids": inputs["input_ids"], "attention_mask": attn}
        if tt is not None:
            kw["token_type_ids"] = tt
        out = model(**kw)
        logits = out.prediction_logits if hasattr(out, "prediction_logits") else out.logits  # (B, T, V)
        mlm = logits.reshape(-1, logits.shape[-1]).index_select(0, masked_pos)  # (N, V)
        return mlm, (out.seq_relationship_logits if use_nsp else None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """``L_mlm (+ L_nsp) + alpha * R`` in training; the model's own loss in evaluation."""
        if not model.training or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        pm = self.pretrain_model(model)
        ids, labels = inputs["input_ids"], inputs["labels"]  # (B, T) masked ids, (B, T) -100 = not masked
        inputs = {**inputs, "attention_mask": inputs.get("attention_mask", torch.ones_like(ids))}
        flat = labels.reshape(-1)
        masked_pos = (flat != IGNORE_INDEX).nonzero().squeeze(1)  # (N,) flat positions into B*T
        nsp_labels = inputs.get("next_sentence_label")
        use_nsp = nsp_labels is not None and pm.has_nsp
        mlm_denom, nsp_denom = self._denominators(int(masked_pos.numel()), ids.shape[0], num_items_in_batch)
        step = int(self.state.global_step)
        alum_on = self.alum.active(step)
        gens = self._generators(ids.shape[0], step, ids.device) if alum_on else None
        attn, tt = inputs["attention_mask"], inputs.get("token_type_ids")

        def heads(e: torch.Tensor, with_nsp: bool):
            return pm.heads_from_embeds(e, attn, tt, masked_pos, with_nsp)  # ((N, V), (B, 2) | None)

        with self.accelerator.autocast():
            embeds = pm.embed(ids, tt)  # (B, T, H) the perturbation point
            # the adversarial passes' dropout context (alum.adv_dropout), captured before the clean pass draws
            passes = AdversarialPasses.capture(self.alum.adv_dropout, pm, embeds.device) if alum_on else None
            clean = self._clean_pass(model, pm, embeds, inputs, masked_pos, use_nsp)
            loss, metrics = pretrain_objective(
                heads, embeds, clean, mlm_targets=flat.index_select(0, masked_pos),
                nsp_labels=nsp_labels if use_nsp else None, pad_mask=attn.bool(), alum=self.alum, alum_on=alum_on,
                norm=Normalizers(mlm=mlm_denom, nsp=nsp_denom), generators=gens, passes=passes)
        self.loss_is_scaled_for_ga = True
        self.accumulate_metrics(metrics, LOGGED)
        self._alum_last = alum_on
        return (loss, {"metrics": metrics}) if return_outputs else loss

    # -- logging -------------------------------------------------------------------------------------
    def alum_logs(self) -> dict[str, float]:
        """The ALUM metrics since the last call (means per optimizer step, averaged over processes)."""
        out = self.metric_means()
        if "adv" in out and "adv_dropout" in out:
            out["adv_share"] = (out["adv"] - out["adv_dropout"]) / out["adv"] if out["adv"] > 0 else 0.0
        out["alum"] = float(self._alum_last)
        rate = self._mask_rate()
        if rate is not None:
            out["mask_rate"] = rate
        return out

    def _mask_rate(self) -> Optional[float]:
        last = max(0, int(self.state.global_step) - 1)
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, MaskingCurriculumCallback):
                return cb.rate(last, self.state)
        rate = getattr(self.data_collator, "mlm_probability", None)
        return None if rate is None else float(rate)

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        """Trainer's ``log`` plus :meth:`alum_logs` on training logs (those that carry ``loss``)."""
        if "loss" in logs and "eval_loss" not in logs:
            logs = {**logs, **self.alum_logs()}
        super().log(logs, start_time)
