"""SMART / ALUM fine-tuning: task loss + alpha * the virtual-adversarial smoothness term R_s.

Method card
-----------
**What.** ``loss = L(f(x), y) + alpha * max_{||delta||_inf <= eps} D(f(x + delta), f(x))`` with D the
symmetric KL for classification and the mean squared difference for regression (Jiang et al. 2020,
SMART's R_s; Liu et al. 2020, ALUM fine-tuning).  The inner max is ALUM's Algorithm 1 and is computed by
the project's single implementation, :func:`alum_pretrain.adversarial.alum_regularizer` (Gaussian start
sigma, K per-token L_inf-normalised ascent steps of size eta, per-token projection onto the eps ball).
``smart`` and ``alum`` are the same method (ALUM fine-tuning = mt-dnn's ``SmartPerturbation``).
Only SMART's smoothness term is implemented; its Bregman proximal-point (momentum teacher) half is not
(neither is it in the authors' released code).

**Defaults.** alpha = 1 (fine-tuning), eps = 1e-5, eta = 1e-3, sigma = 1e-5, K = 1, linf projection,
divergence sym_kl_ce (the authors' stop-gradient form).  The ascent gradient is scale-free (see
:func:`alum_pretrain.precision.scale_free_input_grad`), so it survives fp16 autocast.
Dropout masks are independent across the clean, ascent and adversarial passes (as mt-dnn).

**Cost.** K = 1: three forwards, one input-only backward, one backward through two graphs: ~2.7x plain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...adversarial import ALUMConfig, alum_regularizer
from ...divergence import get_divergence
from ...passes import AdversarialPasses
from .base import Method, TrainContext, forward_from_embeds, mse_divergence, task_loss, word_embeddings
from ...config import opt


@dataclass
class SmartConfig(ALUMConfig):
    """SMART/ALUM fine-tuning (method=smart or alum): virtual adversarial smoothness term (regression: MSE)."""

    # ALUM's knobs and checks (alum.* names in its errors), with the fine-tuning weight as the default.
    # The divergence applies to classification; regression always uses the mean squared difference.
    alpha: float = opt(1.0, "weight of the adversarial term (ALUM/SMART fine-tuning: 1); 0 = plain fine-tuning")
    # Pre-training knobs that fine-tuning fixes (class constants, so no --smart.* option): delta on the word
    # embeddings, on from the first step, no NSP head.
    perturb_at: ClassVar[str] = "word"
    start_step: ClassVar[int] = 0
    include_nsp: ClassVar[bool] = False


class Smart(Method):
    name = "smart"

    def __init__(self, cfg: SmartConfig, regression: bool = False):
        super().__init__(cfg, regression)
        self.alum_cfg = cfg  # a SmartConfig is the ALUMConfig that alum_regularizer takes
        self.divergence = mse_divergence if regression else get_divergence(cfg.divergence)

    def train_step(self, ctx: TrainContext, batch):
        embeds = word_embeddings(ctx.model, batch)                       # (B, T, H)
        passes = AdversarialPasses.capture(self.alum_cfg.adv_dropout, ctx.model, embeds.device)  # alum.adv_dropout
        logits = forward_from_embeds(ctx.model, embeds, batch)           # (B, C) clean pass
        loss = task_loss(logits, batch["labels"], self.regression)
        metrics = {"task": loss.detach()}
        if self.alum_cfg.alpha > 0:
            r, m = alum_regularizer(lambda e: forward_from_embeds(ctx.model, e, batch), embeds, logits,
                                    self.alum_cfg, pad_mask=batch["attention_mask"],
                                    generator=ctx.generator(1), divergence=self.divergence,
                                    per_example_scale=True, passes=passes)
            loss = loss + self.alum_cfg.alpha * r        # a non-finite term arrives as 0 (adv_nonfinite)
            metrics.update({k: m[k] for k in ("adv", "delta_linf", "ascent_nonfinite", "ascent_zero_grad_frac",
                                               "adv_nonfinite", "adv_dropout") if k in m})
        ctx.backward(loss)
        metrics["grad_norm"] = ctx.optimizer_step()
        metrics["loss"] = loss.detach()
        return metrics
