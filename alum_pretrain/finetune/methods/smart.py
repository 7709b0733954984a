"""SMART / ALUM fine-tuning: task loss + alpha * the virtual-adversarial smoothness term R_s.

Method card
-----------
**What.** ``loss = L(f(x), y) + alpha * max_{||delta||_inf <= eps} D(f(x + delta), f(x))`` with D the
symmetric KL for classification and the mean squared difference for regression (Jiang et al. 2020,
SMART's R_s; Liu et al. 2020, ALUM fine-tuning).  The inner max is ALUM's Algorithm 1 and is computed by
the project's single implementation, :func:`alum_pretrain.adversarial.alum_regularizer` (Gaussian start
sigma, K per-token L_inf-normalised ascent steps of size eta, per-token projection onto the eps ball).
``smart`` and ``alum`` are the same method (ALUM fine-tuning = mt-dnn's ``SmartPerturbation``, issue #176).
Only SMART's smoothness term is implemented; its Bregman proximal-point (momentum teacher) half is not
(neither is it in the authors' released code).

**Defaults.** alpha = 1 (fine-tuning), eps = 1e-5, eta = 1e-3, sigma = 1e-5, K = 1, linf projection.
Dropout masks are independent across the clean, ascent and adversarial passes (as mt-dnn).

**Cost.** K = 1: three forwards, one input-only backward, one backward through two graphs: ~2.7x plain.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...adversarial import ALUMConfig, alum_regularizer, symmetric_kl
from .base import Method, TrainContext, forward_from_embeds, mse_divergence, task_loss, word_embeddings
from ...config import opt


@dataclass
class SmartConfig:
    """SMART/ALUM fine-tuning (method=smart or alum): virtual adversarial smoothness term."""

    alpha: float = opt(1.0, "weight of the adversarial term (ALUM/SMART fine-tuning: 1)")
    epsilon: float = opt(1e-5, "per-token perturbation radius")
    step_size: float = opt(1e-3, "ascent step size eta")
    noise_std: float = opt(1e-5, "std of the Gaussian random start")
    k_steps: int = opt(1, "ascent steps K")
    projection: str = opt("linf", "projection after each ascent step: linf | l2 | none")

    def __post_init__(self) -> None:
        self.alum()  # validates (ALUMConfig raises ValueError naming the field)

    def alum(self) -> ALUMConfig:
        return ALUMConfig(alpha=self.alpha, epsilon=self.epsilon, step_size=self.step_size,
                          noise_std=self.noise_std, k_steps=self.k_steps, projection=self.projection,
                          perturb_at="word")


class Smart(Method):
    name = "smart"

    def __init__(self, cfg: SmartConfig, regression: bool = False):
        super().__init__(cfg, regression)
        self.alum_cfg = cfg.alum()
        self.divergence = mse_divergence if regression else symmetric_kl

    def train_step(self, ctx: TrainContext, batch):
        embeds = word_embeddings(ctx.model, batch)                       # (B, T, H)
        logits = forward_from_embeds(ctx.model, embeds, batch)           # (B, C) clean pass
        loss = task_loss(logits, batch["labels"], self.regression)
        metrics = {"task": loss.detach()}
        if self.alum_cfg.alpha > 0:
            r, m = alum_regularizer(lambda e: forward_from_embeds(ctx.model, e, batch), embeds, logits,
                                    self.alum_cfg, pad_mask=batch["attention_mask"],
                                    generator=ctx.generator(1), divergence=self.divergence)
            loss = loss + self.alum_cfg.alpha * r
            metrics.update(adv=m["adv"], delta_linf=m["delta_linf"])
        loss.backward()
        metrics["grad_norm"] = ctx.optimizer_step()
        metrics["loss"] = loss.detach()
        return metrics
