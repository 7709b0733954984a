"""FreeAT: "free" adversarial training (Shafahi et al., NeurIPS 2019), as compared in FreeLB Sec. 3.2.

Method card
-----------
**What.** Each minibatch is replayed K times.  Every replay is ONE forward/backward of
``L(f(x + delta), y)`` whose backward gives both the parameter gradient - used at once for an optimizer
step - and the input gradient g - used for ``delta <- Proj_eps(delta + adv_lr * g/||g||)``; delta is
carried from one replay to the next (so each ascent step is based on the previous parameters: FreeLB's
"stale gradient" remark).  delta restarts for every minibatch (token sequences differ in shape, unlike
the images of the original).  Same random start, normalisation, projection and dropout-mask reuse as
FreeLB (:mod:`.embedding_adv`).

**Defaults.** adv_lr 0.1, K 2 replays, adv_init_mag 0.6 (FreeLB compares all methods at equal step size
and steps).  Shafahi et al. divide the number of epochs by K to keep the cost of plain training; here
the LR schedule counts K optimizer steps per minibatch, and you choose the epochs.

**Cost.** K forward+backward passes and K optimizer steps per minibatch: ~K x plain per minibatch.
"""

from __future__ import annotations

from ...adversarial import perturb
from .base import Method, TrainContext, fixed_dropout, forward_from_embeds, task_loss, word_embeddings
from .embedding_adv import EmbeddingAdvConfig, guarded_update, init_uniform_delta, public_stats


class FreeAT(Method):
    name = "freeat"

    def __init__(self, cfg: EmbeddingAdvConfig, regression: bool = False):
        super().__init__(cfg, regression)
        self.optimizer_steps_per_batch = cfg.adv_steps

    def train_step(self, ctx: TrainContext, batch):
        cfg, mask = self.cfg, batch["attention_mask"]
        seed = ctx.dropout_seed() if cfg.reuse_dropout_masks else None
        delta = None
        total = 0.0
        stats: dict = {}
        for t in range(cfg.adv_steps):
            embeds = word_embeddings(ctx.model, batch)                                   # (B, T, H)
            if delta is None:
                delta = init_uniform_delta(embeds, mask, cfg.adv_init_mag, cfg.norm_type, ctx.generator(2))
            delta.requires_grad_(True)
            with fixed_dropout(seed, ctx.device):
                logits = forward_from_embeds(ctx.model, perturb(embeds, delta), batch)
            loss = task_loss(logits, batch["labels"], self.regression)
            ctx.backward(loss)                   # one backward: parameter AND input gradients (scaled: fp16)
            g = delta.grad.detach()
            gnorm = ctx.optimizer_step()         # descent step on theta with this replay's gradient
            total = total + loss.detach() / cfg.adv_steps
            if t < cfg.adv_steps - 1:
                delta = guarded_update(delta.detach(), g, cfg, mask, stats)              # ascent on delta
        return {"loss": total, "grad_norm": gnorm,
                "delta_l2": delta.detach().flatten(1).norm(dim=1).mean(), **public_stats(stats)}
