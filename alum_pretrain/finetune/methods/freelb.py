"""FreeLB: "free" large-batch adversarial training (Zhu et al., ICLR 2020, Algorithm 1).

Method card
-----------
**What.** For each minibatch: a random start delta_0 on the word embeddings (uniform, scaled by
adv_init_mag / sqrt(len * dim) per example for L2, zero at padding); then K ascent steps, each one
forward + backward of ``L(f(x + delta_{t-1}), y) / K`` that *accumulates the parameter gradients*
(line 8) and gives the input gradient g used for ``delta_t = Proj_eps(delta_{t-1} + adv_lr * g/||g||)``
(lines 10-12, per-example Frobenius norm for L2, per-example max-abs for L_inf); then ONE optimizer step
with the accumulated gradient (line 14) - i.e. descent on the average of the K adversarial losses, a
"K-times larger virtual batch".  No clean term (with adv_init_mag = 0 the first pass is the clean one).

**Dropout (Sec. 3.3).** The K passes share the same dropout masks (``reuse_dropout_masks``, default on):
every ascent pass runs under :func:`fixed_dropout` with one seed per minibatch, so each pass optimises
the same sub-network theta(m).  This works with any stock HF model (no ``dp_masks`` plumbing, cf. FreeLB
issues #2/#13/#14) and covers every dropout site, including attention-probability dropout.

**Defaults.** Paper Table 6 (RoBERTa-large, eps / adv_lr / K): MNLI 2e-1/1e-1/2, QNLI 1.5e-1/1e-1/2,
QQP 4.5e-1/1.5e-1/2, RTE 1.5e-1/3e-2/3, SST-2 6e-1/1e-1/2, MRPC 4e-1/4e-2/3, CoLA 2e-1/2.5e-2/3,
STS-B 3e-1/1e-1/3.  Our defaults: adv_lr 0.1, K 2, adv_init_mag 0.6, adv_max_norm 0 (unbounded,
the HF code's default; pass 0.6 for the paper's SST-2 ball), L2.

**Cost.** K forward+backward passes per optimizer step: ~K x plain.
"""

from __future__ import annotations

from ...adversarial import perturb
from .base import Method, TrainContext, fixed_dropout, forward_from_embeds, task_loss, word_embeddings
from .embedding_adv import EmbeddingAdvConfig, guarded_update, init_uniform_delta, public_stats


class FreeLB(Method):
    name = "freelb"

    def __init__(self, cfg: EmbeddingAdvConfig, regression: bool = False):
        super().__init__(cfg, regression)

    def train_step(self, ctx: TrainContext, batch):
        cfg, mask, k_steps = self.cfg, batch["attention_mask"], self.cfg.adv_steps
        seed = ctx.dropout_seed() if cfg.reuse_dropout_masks else None
        delta = None
        total = 0.0
        stats: dict = {}
        for t in range(k_steps):
            embeds = word_embeddings(ctx.model, batch)   # (B, T, H) fresh graph: E's grads accumulate too
            if delta is None:
                delta = init_uniform_delta(embeds, mask, cfg.adv_init_mag, cfg.norm_type, ctx.generator(2))
            delta.requires_grad_(True)
            with fixed_dropout(seed, ctx.device):
                logits = forward_from_embeds(ctx.model, perturb(embeds, delta), batch)
            loss = task_loss(logits, batch["labels"], self.regression) / k_steps
            ctx.backward(loss)                           # line 8: accumulate parameter gradients (scaled: fp16)
            total = total + loss.detach()
            if t == k_steps - 1:
                break                                    # the last delta update would be unused
            delta = guarded_update(delta.detach(), delta.grad.detach(), cfg, mask, stats)   # lines 10-12
        gnorm = ctx.optimizer_step()                     # line 14: one step on the accumulated gradient
        return {"loss": total, "grad_norm": gnorm,
                "delta_l2": delta.detach().flatten(1).norm(dim=1).mean(), **public_stats(stats)}
