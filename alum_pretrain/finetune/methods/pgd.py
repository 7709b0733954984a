"""K-PGD adversarial training (Madry et al. 2018) on word embeddings, FreeLB's baseline ("vanilla PGD").

Method card
-----------
**What.** ``min_theta E max_{||delta||_F <= eps} L(f(x + delta), y)``: K projected ascent steps on
delta using the *input gradient only* (``torch.autograd.grad(loss, delta)``, no parameter gradients),
then one training step on the adversarial loss ``L(f(x + delta_K), y)`` (no clean term).  Same random
start, per-example normalisation and projection as FreeLB (:mod:`.embedding_adv`), and by default the
same dropout masks in all K+1 passes (FreeLB's fairseq code reuses them for every method).

**Defaults.** As FreeLB (the paper compares PGD, FreeAT and FreeLB with "the same step size and number
of steps"): adv_lr 0.1, K 2, adv_init_mag 0.6; set adv_max_norm (e.g. 0.6) for a bounded adversary.

**Cost.** K+1 forwards, K input-only backwards and one full backward: ~(K+1) x plain.
"""

from __future__ import annotations

from ...adversarial import perturb
from ...precision import scale_free_input_grad
from .base import Method, TrainContext, fixed_dropout, forward_from_embeds, task_loss, word_embeddings
from .embedding_adv import EmbeddingAdvConfig, guarded_update, init_uniform_delta, public_stats


class PGD(Method):
    name = "pgd"

    def __init__(self, cfg: EmbeddingAdvConfig, regression: bool = False):
        super().__init__(cfg, regression)

    def train_step(self, ctx: TrainContext, batch):
        cfg, mask = self.cfg, batch["attention_mask"]
        seed = ctx.dropout_seed() if cfg.reuse_dropout_masks else None
        embeds = word_embeddings(ctx.model, batch)                                     # (B, T, H)
        base = embeds.detach()            # the inner max must not touch parameter gradients
        delta = init_uniform_delta(embeds, mask, cfg.adv_init_mag, cfg.norm_type, ctx.generator(2))
        stats: dict = {}
        labels = batch["labels"]
        for _ in range(cfg.adv_steps):
            delta.requires_grad_(True)
            with fixed_dropout(seed, ctx.device):
                logits = forward_from_embeds(ctx.model, perturb(base, delta), batch)
            # input-only, from a rescaled backward: a 16-bit backward cannot underflow it
            g, _ = scale_free_input_grad([logits], lambda o: task_loss(o[0], labels, self.regression), delta,
                                         per_example=True)
            delta = guarded_update(delta.detach(), g, cfg, mask, stats)
        with fixed_dropout(seed, ctx.device):
            logits = forward_from_embeds(ctx.model, perturb(embeds, delta.detach()), batch)
        loss = task_loss(logits, batch["labels"], self.regression)
        ctx.backward(loss)
        gnorm = ctx.optimizer_step()
        return {"loss": loss.detach(), "grad_norm": gnorm,
                "delta_l2": delta.detach().flatten(1).norm(dim=1).mean(), **public_stats(stats)}
