"""RIFT: robust informative fine-tuning (Dong et al., NeurIPS 2021, "How Should Pre-Trained Language
Models Be Fine-Tuned Towards Adversarial Robustness?").

Method card
-----------
**What.** Adversarial fine-tuning that keeps the features of the pre-trained model: maximise
I(S; Y) + alpha I(S; T | Y), S = features of the model being fine-tuned, T = features of a FROZEN copy
of the pre-trained encoder.  As in the official code (dongxinshuai/RIFT-NeurIPS2021 ``rift_train.py``)::

    loss = w_clean CE(f(x), y) + w_adv CE(f(x_adv), y) + w_kl KL(p(x) || p(x_adv))
         + w_mi_adv InfoNCE_y(S(x_adv), T(x)) + w_mi_clean InfoNCE_y(S(x), T(x))

* S, T: the pooler output (tanh(W h_[CLS] + b), as the official code) of the student and of the frozen
  teacher where the model has a pooler (BERT); models without one (HF RoBERTa classifiers) use the last
  layer's first-token state.  Teacher on the clean input, under ``no_grad``, in eval mode,
  ``requires_grad=False``.
* InfoNCE_y ("conditioned on Y"): within each class c of the batch, both features go through their own
  class-specific trainable MLP (H -> proj_hidden -> proj_dim, ReLU), are L2-normalised, and
  ``-mean_i log softmax_j'(s_j' . t_i / tau)[i]`` (softmax over the students for each teacher
  feature, i.e. ``log_softmax(S T^T / tau, dim=0)`` diagonal); averaged over the classes present.
* KL(p(x) || p(x_adv)) is TRADES-style with gradient through both sides (official ``loss_kl``).

**Adversary.** ``ascc`` (default): the word-substitution adversary of ASCC (Dong et al., ICLR 2021):
each word is replaced by a convex combination of the embeddings of {word} U synonyms (WordNet here),
``e_adv = sum_s w_s E[cand_s]``, ``w = softmax(w_hat)`` over the valid candidates.  As the official
``ascc_attack``: w_hat is Kaiming-normal over a (B, T, S, 1) tensor (std sqrt(2 / (T * S)), so w starts
near uniform), optimised by Adam (lr ``ascc_lr``) for ``ascc_steps`` steps with the model in eval mode
to maximise ``KL_sum(p(x) || p(x_adv)) - ascc_sparse_weight * H_sum(w)`` - the KL summed over the batch
(``KLDivLoss(reduction="sum")``) and the entropy of w summed over the batch's positions, weighted
15 / (300 * 128) by default (it pushes w towards a vertex, i.e. a real word) - against the clean
prediction p(x) of the *eval-mode* model (no dropout, like the attack's passes).  The final w is
used (detached) in a train-mode forward whose gradient reaches the embedding matrix.  The attack's
gradient comes from a rescaled backward (fp16-safe, :func:`alum_pretrain.precision.scale_free_input_grad`);
Adam is invariant to the scale of the gradient, so this changes nothing in fp32.
Unlike the official code, any sub-word tokenizer works: the pieces of a word share one weight vector
and synonyms must tokenise into as many pieces (see :func:`..data.substitution_candidates`).
``embedding``: the embedding-space adversary instead (K per-example L2-normalised ascent steps on the
word embeddings maximising the same KL, input-only gradients, projected to ``emb_max_norm``).

**Defaults.** The official IMDB recipe: w_clean 1, w_kl 10, w_mi_adv 0.1 (SNLI: w_kl 5, w_mi_adv 0.7),
w_adv 0, w_mi_clean 0; tau 0.2; projection 768->512->256 (here H->512->256); ASCC 10 steps, Adam lr 1,
sparse weight 15, <= 10 candidates per word including the word.  Not reproduced: class-balanced
batches, mixout, the 768->256->C classifier head (the checkpoint's own head is used).

**Cost.** ascc_steps eval-mode forwards + input-only backwards, two train forwards, one teacher forward,
one backward: ~ (ascc_steps + 4) x plain.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...adversarial import perturb
from ...precision import scale_free_input_grad
from .base import Method, TrainContext, forward_from_embeds, task_loss, word_embeddings
from .embedding_adv import EmbeddingAdvConfig, guarded_update, init_uniform_delta, public_stats
from ...config import opt


@dataclass
class RIFTConfig:
    """RIFT (method=rift): frozen pre-trained teacher + class-conditional InfoNCE + substitution adversary."""

    adversary: str = opt("ascc", "ascc (convex combination of WordNet synonym embeddings) or embedding "
                                 "(L2 ball on the word embeddings)")
    weight_clean: float = opt(1.0, "weight of CE on clean inputs")
    weight_adv: float = opt(0.0, "weight of CE on adversarial inputs")
    weight_kl: float = opt(10.0, "weight of KL(p_clean || p_adv) (official IMDB 10, SNLI 5)")
    weight_mi_adv: float = opt(0.1, "weight of InfoNCE_y(student(x_adv), teacher(x)) (IMDB 0.1, SNLI 0.7)")
    weight_mi_clean: float = opt(0.0, "weight of InfoNCE_y(student(x), teacher(x))")
    temperature: float = opt(0.2, "InfoNCE temperature tau")
    proj_hidden: int = opt(512, "hidden size of the class-specific projection MLPs")
    proj_dim: int = opt(256, "output size of the projection MLPs")
    ascc_steps: int = opt(10, "Adam steps on the ASCC combination weights")
    ascc_lr: float = opt(1.0, "Adam learning rate of the ASCC weights")
    ascc_sparse_weight: float = opt(15.0 / (300 * 128), "weight of the entropy of the ASCC weights, summed over "
                                                        "the batch's positions, against KL(p_clean||p_adv) "
                                                        "summed over the batch (official: sparse weight 15 "
                                                        "over 300 x 128 = 3.90625e-4)")
    max_candidates: int = opt(10, "substitution candidates per word, the word included")
    substitute_in: str = opt("all", "which text may be substituted: all, a (first) or b (second, e.g. the "
                                    "NLI hypothesis)")
    wordnet_dir: str = opt("", "WordNet 3.0 database folder (default: $ALUM_WORDNET_DIR or /usr/share/wordnet)")
    emb_adv_lr: float = opt(0.1, "adversary=embedding: ascent step size")
    emb_adv_steps: int = opt(2, "adversary=embedding: ascent steps")
    emb_adv_init_mag: float = opt(0.6, "adversary=embedding: random-start magnitude")
    emb_max_norm: float = opt(0.6, "adversary=embedding: per-example L2 radius (0 = unbounded)")

    def __post_init__(self) -> None:
        if self.adversary not in ("ascc", "embedding"):
            raise ValueError(f"--rift.adversary={self.adversary!r} must be ascc or embedding")
        if self.substitute_in not in ("all", "a", "b"):
            raise ValueError(f"--rift.substitute_in={self.substitute_in!r} must be all, a or b")
        if self.temperature <= 0:
            raise ValueError(f"--rift.temperature={self.temperature} must be > 0")
        if self.max_candidates < 2:
            raise ValueError(f"--rift.max_candidates={self.max_candidates} must be >= 2 (the word + 1 synonym)")
        if self.ascc_steps < 0 or self.emb_adv_steps < 1:
            raise ValueError("--rift.ascc_steps must be >= 0 and --rift.emb_adv_steps >= 1")
        for n in ("weight_clean", "weight_adv", "weight_kl", "weight_mi_adv", "weight_mi_clean", "ascc_lr",
                  "ascc_sparse_weight"):
            if getattr(self, n) < 0:
                raise ValueError(f"--rift.{n} must be >= 0")

    def embedding_adv(self) -> EmbeddingAdvConfig:
        return _RIFTEmbeddingAdv(adv_lr=self.emb_adv_lr, adv_steps=self.emb_adv_steps,
                                  adv_init_mag=self.emb_adv_init_mag, adv_max_norm=self.emb_max_norm,
                                  norm_type="l2", reuse_dropout_masks=False)


@dataclass
class _RIFTEmbeddingAdv(EmbeddingAdvConfig):
    _flag = "rift.emb"


def kl_clean_adv(clean_logits: torch.Tensor, adv_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_clean || p_adv), summed over classes, mean over the batch; gradient into both (TRADES)."""
    lp = F.log_softmax(clean_logits.float(), -1)
    lq = F.log_softmax(adv_logits.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).mean()


def infonce_given_y(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                    heads_s: nn.ModuleList, heads_t: nn.ModuleList, tau: float) -> torch.Tensor:
    """Class-conditional InfoNCE lower bound of I(S; T | Y) (negated: a loss).  student/teacher (B, H)."""
    losses = []
    dt = next(heads_s.parameters()).dtype   # the heads' dtype (float32 unless the caller changed it)
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero(as_tuple=True)[0]
        s = F.normalize(heads_s[c](student[idx].to(dt)), dim=-1)       # (n_c, D)
        t = F.normalize(heads_t[c](teacher[idx].to(dt)), dim=-1)       # (n_c, D)
        f = s @ t.T / tau                                              # (n_c, n_c)
        losses.append(-torch.diagonal(F.log_softmax(f, dim=0)).mean())
    return torch.stack(losses).mean()


def kl_sum(clean_logits: torch.Tensor, adv_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_clean || p_adv) summed over classes and the batch (the official attack's KLDivLoss(sum))."""
    lp = F.log_softmax(clean_logits.float(), -1)
    lq = F.log_softmax(adv_logits.float(), -1)
    return (lp.exp() * (lp - lq)).sum()


def logits_and_features(model: nn.Module, embeds: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits (B, C), sentence features (B, H))`` from ``inputs_embeds``: the pooler output where the
    model's base has a pooler (BERT: tanh(W h_0 + b), the official RIFT feature), else the last layer's
    first-token state (HF RoBERTa classifiers are built without a pooler)."""
    logits, first = forward_from_embeds(model, embeds, batch, hidden=True)
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    pooler = getattr(base, "pooler", None) if base is not None else None
    if pooler is None:
        return logits, first
    return logits, pooler(first.unsqueeze(1))   # BertPooler reads position 0 of (B, T, H)


def _mlp(h: int, hidden: int, out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(h, hidden), nn.ReLU(), nn.Linear(hidden, out))


class RIFT(Method):
    name = "rift"

    def __init__(self, cfg: RIFTConfig, regression: bool = False):
        if regression:
            raise ValueError("--run.method=rift needs a classification task (its MI terms are conditioned on "
                             "the class); use smart/freelb/pgd/freeat for regression")
        super().__init__(cfg, regression)
        self.teacher: nn.Module | None = None
        self.heads: nn.ModuleDict | None = None
        self.needs_substitutions = cfg.adversary == "ascc"

    def setup(self, model: nn.Module) -> None:
        """Freeze a copy of the pre-trained model (call before any update) and build the MI heads."""
        self.teacher = copy.deepcopy(model).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        h, c = model.config.hidden_size, model.config.num_labels
        cfg = self.cfg
        self.heads = nn.ModuleDict({
            "student": nn.ModuleList(_mlp(h, cfg.proj_hidden, cfg.proj_dim) for _ in range(c)),
            "teacher": nn.ModuleList(_mlp(h, cfg.proj_hidden, cfg.proj_dim) for _ in range(c)),
        }).to(next(model.parameters()).device)

    def modules(self) -> list[nn.Module]:
        return [self.heads] if self.heads is not None else []

    # -- adversaries ---------------------------------------------------------------------------------
    def ascc_weights(self, model: nn.Module, batch, clean_logits: torch.Tensor, generator) -> torch.Tensor:
        """Optimised convex-combination weights w (B, T, S) over the substitution candidates.

        ``clean_logits`` is unused: the target is the eval-mode prediction, computed here (the attack's
        passes have no dropout, so neither has its reference)."""
        del clean_logits
        cfg = self.cfg
        valid = batch["sub_mask"]                                       # (B, T, S) bool
        head = batch["word_head"]                                       # (B, T)
        emb = model.get_input_embeddings().weight.detach()
        cand = emb[batch["sub_ids"]]                                    # (B, T, S, H), no grad
        b, t, s = valid.shape
        # the official init: kaiming_normal_ on a (B, T, S, 1) tensor -> N(0, 2 / (T * S)), near-uniform w
        w_hat = nn.init.kaiming_normal_(torch.empty((b, t, s, 1)), generator=generator).squeeze(-1).to(cand.device)
        w_hat.requires_grad_(True)
        opt = torch.optim.Adam([w_hat], lr=cfg.ascc_lr)
        was_training = model.training
        model.eval()                                                    # no dropout in the attack
        try:
            with torch.no_grad():
                target = forward_from_embeds(model, word_embeddings(model, batch), batch).float()  # eval-mode p(x)
            for _ in range(cfg.ascc_steps):
                w = self._weights(w_hat, valid, head)
                ent = -(w * torch.log(w.clamp_min(1e-12))).sum()          # entropy summed over positions
                (g_ent,) = torch.autograd.grad(cfg.ascc_sparse_weight * ent, w_hat, retain_graph=True)
                e_adv = (w.unsqueeze(-1) * cand).sum(2)                     # (B, T, H)
                logits = forward_from_embeds(model, e_adv.to(cand.dtype), batch)
                # d(-KL_sum)/d w_hat through the model, from a rescaled (fp16-safe) backward
                g_kl, _ = scale_free_input_grad([logits], lambda o: -kl_sum(target, o[0]), w_hat)
                w_hat.grad = torch.nan_to_num(g_kl + g_ent, nan=0.0, posinf=0.0, neginf=0.0)
                opt.step()                                              # minimise -KL + weight * entropy
        finally:
            model.train(was_training)
        return self._weights(w_hat.detach(), valid, head)

    @staticmethod
    def _weights(w_hat: torch.Tensor, valid: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(w_hat.masked_fill(~valid, float("-inf")), dim=-1)      # (B, T, S)
        # every piece of a word uses the weights of the word's first piece
        return torch.gather(w, 1, head.unsqueeze(-1).expand_as(w))

    def embedding_delta(self, model, embeds, batch, clean_logits, generator) -> torch.Tensor:
        cfg = self.cfg.embedding_adv()
        mask = batch["attention_mask"]
        base = embeds.detach()
        delta = init_uniform_delta(embeds, mask, cfg.adv_init_mag, "l2", generator)
        target = clean_logits.detach()
        for _ in range(cfg.adv_steps):
            delta.requires_grad_(True)
            logits = forward_from_embeds(model, perturb(base, delta), batch)
            g, _ = scale_free_input_grad([logits], lambda o: kl_sum(target, o[0]), delta, per_example=True)
            delta = guarded_update(delta.detach(), g, cfg, mask, self._stats)
        return delta.detach()

    # -- the update ----------------------------------------------------------------------------------
    def train_step(self, ctx: TrainContext, batch):
        if self.teacher is None:
            raise RuntimeError("RIFT.setup(model) must run before training (it freezes the teacher)")
        cfg, model, labels = self.cfg, ctx.model, batch["labels"]
        self._stats: dict = {}
        embeds = word_embeddings(model, batch)                                          # (B, T, H)
        clean_logits, s_clean = logits_and_features(model, embeds, batch)               # (B, C), (B, H)
        if cfg.adversary == "ascc":
            if "sub_ids" not in batch:
                raise ValueError("rift with adversary=ascc needs substitution candidates in the batch "
                                 "(the trainer builds them from WordNet)")
            w = self.ascc_weights(model, batch, clean_logits, ctx.generator(3))
            emb_matrix = model.get_input_embeddings().weight
            adv_embeds = (w.unsqueeze(-1) * emb_matrix[batch["sub_ids"]]).sum(2)         # (B, T, H)
        else:
            delta = self.embedding_delta(model, embeds, batch, clean_logits, ctx.generator(3))
            adv_embeds = perturb(word_embeddings(model, batch), delta)
        adv_logits, s_adv = logits_and_features(model, adv_embeds, batch)
        with torch.no_grad():
            _, t_clean = logits_and_features(self.teacher, word_embeddings(self.teacher, batch), batch)

        terms = {}
        if cfg.weight_clean:
            terms["clean"] = (cfg.weight_clean, task_loss(clean_logits, labels, False))
        if cfg.weight_adv:
            terms["adv"] = (cfg.weight_adv, task_loss(adv_logits, labels, False))
        if cfg.weight_kl:
            terms["kl"] = (cfg.weight_kl, kl_clean_adv(clean_logits, adv_logits))
        hs, ht = self.heads["student"], self.heads["teacher"]
        if cfg.weight_mi_adv:
            terms["mi_adv"] = (cfg.weight_mi_adv, infonce_given_y(s_adv, t_clean, labels, hs, ht, cfg.temperature))
        if cfg.weight_mi_clean:
            terms["mi_clean"] = (cfg.weight_mi_clean,
                                 infonce_given_y(s_clean, t_clean, labels, hs, ht, cfg.temperature))
        if not terms:
            raise ValueError("--rift: every loss weight is 0")
        loss = sum(wt * v for wt, v in terms.values())
        ctx.backward(loss)
        metrics = {k: v.detach() for k, (_, v) in terms.items()}
        metrics.update(public_stats(self._stats))
        metrics["grad_norm"] = ctx.optimizer_step()
        metrics["loss"] = loss.detach()
        return metrics
