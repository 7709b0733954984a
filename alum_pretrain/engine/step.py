"""The ALUM pre-training step as ONE module forward: masked-only MLM (+NSP) loss + alpha * R.

:class:`PretrainStep` is what DDP wraps.  Its ``forward`` runs, for one micro-batch,

1. the clean pass: ``e = E(x)`` (word embeddings, the perturbation point), masked-only MLM logits and
   NSP logits from ``e`` (the LM head runs on the N masked positions only);
2. the task loss ``L = CE_mlm + CE_nsp`` (DESIGN "The ALUM step" 1);
3. when ``alum.active(step)``: :func:`alum_pretrain.adversarial.alum_regularizer` (Algorithm 1 lines
   3-8: random start, K input-only ascent steps, adversarial pass) on the *unwrapped* model, so DDP sees
   exactly one forward (this one) and, in the loop, one backward per micro-batch; the ascent uses
   ``torch.autograd.grad`` w.r.t. delta only - no parameter gradients, no DDP all-reduce;
4. ``loss = L + alpha * R`` (Eq. 3).

**Same numbers for any number of processes.**  Two choices make a run with W processes x micro-batch B
x A accumulation steps compute the same loss (up to float rounding) as one process with the same
global batch:

* *Per-sample randomness.*  Masking and the ALUM random start of sample ``i`` of optimizer step ``s``
  are drawn from generators keyed by ``(seed, s, global sample index i)`` (:func:`sample_generators`),
  never by rank or micro-batch, so how the global batch is split does not change any draw.
* *Global normalisation.*  The MLM cross-entropy is a mean over the masked tokens of the WHOLE global
  batch and NSP a mean over its sequences: each micro-batch contributes ``sum / N_global`` where
  ``N_global`` (all-reduced once per step, before the first forward) counts the masked tokens of all
  micro-batches on all ranks.  DDP averages gradients over ranks, so the loss is multiplied by the world
  size.  The ALUM divergence is normalised the same way (sum over rows / N_global for MLM, / B_global for
  NSP) - also inside the ascent, so the relative weight of the MLM and NSP terms in the ascent direction
  does not depend on the split either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..adversarial import ALUMConfig, alum_regularizer, get_divergence
from ..masking import IGNORE_INDEX, MaskingConfig, mask_batch, step_generator

# step_generator streams (one consumer per stream id so draws never collide)
STREAM_MASK = 0
STREAM_ALUM = 1
STREAM_EVAL_MASK = 2


def sample_generators(seed: int, step: int, sample_ids: torch.Tensor, stream: int,
                      device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per sample, keyed by (seed, step, global sample index, stream)."""
    return [step_generator(seed, step, int(i), stream=stream, device=device) for i in sample_ids.tolist()]


@dataclass
class Masker:
    """Applies the masking-rate curriculum + 80/10/10 to an unmasked batch with per-sample randomness.

    :func:`alum_pretrain.masking.mask_batch` keys every draw by (seed, step, global sample index, stream),
    so the masks are independent of batch size, accumulation and world size (see the module docstring),
    and masks the whole micro-batch in a few vectorised tensor ops on the host.
    """

    cfg: MaskingConfig
    mask_id: int
    random_pool: torch.Tensor  # 1-D ids allowed as random replacements
    seed: int

    def __call__(self, batch: dict, rate: float, step: int, sample_ids: torch.Tensor,
                 stream: int = STREAM_MASK) -> dict:
        ids = batch["input_ids"]  # (B, T) unmasked
        special = batch["special_mask"].bool()  # (B, T) True = never mask (specials + padding)
        cont = batch.get("continuation") if self.cfg.whole_word else None
        masked, labels = mask_batch(
            ids, rate, mask_id=self.mask_id, special_mask=special, random_pool=self.random_pool,
            seed=self.seed, step=step, sample_ids=sample_ids, stream=stream,
            continuation=None if cont is None else cont.bool(),
            mask_prob=self.cfg.mask_prob, random_prob=self.cfg.random_prob)
        out = dict(batch)
        out["input_ids"] = masked  # (B, T)
        out["labels"] = labels  # (B, T), -100 where not selected
        # Flat masked positions and their targets, computed here on the host so that the device never
        # has to synchronise for a data-dependent shape (boolean indexing on GPU waits for the kernel).
        flat = out["labels"].reshape(-1)
        out["masked_pos"] = (flat != IGNORE_INDEX).nonzero().squeeze(1)  # (N,)
        out["mlm_targets"] = flat.index_select(0, out["masked_pos"])  # (N,)
        out["sample_ids"] = sample_ids
        # Host-side counts for the logs (no device sync later).
        out["n_tokens"] = int(batch["attention_mask"].sum())
        out["n_maskable"] = int((~special).sum())
        out["n_masked"] = int((out["labels"] != IGNORE_INDEX).sum())
        return out


class PretrainStep(nn.Module):
    """forward(batch, ...) -> (loss, metrics); wraps a ``PretrainModel`` (``embed`` + ``heads_from_embeds``).

    ``batch``: ``input_ids`` (B, T) masked, ``labels`` (B, T) with -100 off the masked positions,
    ``attention_mask`` (B, T), ``token_type_ids`` (B, T), ``next_sentence_label`` (B,) when NSP is on.
    ``mlm_denom`` / ``nsp_denom``: the global masked-token and sequence counts of the optimizer step
    divided by the world size (the factor that turns DDP's gradient average into a global mean).
    ``alum_generators``: per-sample generators for the ALUM random start (or None = global RNG).

    Returned ``metrics`` (detached 0-dim tensors, no host sync) are this micro-batch's contributions to
    the global step means, like the loss scaled by the world size: summing them over micro-batches and
    averaging over ranks gives the step's mlm / nsp / adv.
    """

    def __init__(self, model: nn.Module, alum: ALUMConfig, nsp: bool):
        super().__init__()
        self.model = model
        self.alum = alum
        self.nsp = nsp

    def forward(self, batch: dict, *, alum_on: bool, mlm_denom: float, nsp_denom: float,
                alum_generators: Optional[list] = None) -> tuple[torch.Tensor, dict]:
        model = self.model
        input_ids = batch["input_ids"]  # (B, T)
        attn = batch["attention_mask"]  # (B, T)
        tt = batch.get("token_type_ids")  # (B, T) or None
        masked_index = batch["masked_pos"]  # (N,) flat positions into B*T (row-major)
        targets = batch["mlm_targets"]  # (N,) original ids at those positions

        # 1. clean pass from the word embeddings (the ALUM perturbation point).
        embeds = model.embed(input_ids, tt)  # (B, T, H)

        def heads(e: torch.Tensor):
            return model.heads_from_embeds(e, attn, tt, masked_index, self.nsp)  # ((N, V), (B, 2)|None)

        mlm_logits, nsp_logits = heads(embeds)

        # 2. task loss, globally normalised (module docstring): sum / (N_global / world).
        mlm = F.cross_entropy(mlm_logits.float(), targets, reduction="sum") / mlm_denom
        loss = mlm
        metrics = {"mlm": mlm.detach()}
        if self.nsp:
            nsp = F.cross_entropy(nsp_logits.float(), batch["next_sentence_label"], reduction="sum") / nsp_denom
            loss = loss + nsp
            metrics["nsp"] = nsp.detach()

        # 3. ALUM term R (Algorithm 1 lines 3-8), same global normalisation per head.
        # R is on the MLM distributions (the paper); NSP only with alum.include_nsp.
        if alum_on:
            nsp_in_r = self.nsp and self.alum.include_nsp
            nsp_ptr = nsp_logits.data_ptr() if nsp_in_r else None
            base_div = get_divergence(self.alum.divergence)

            def divergence(adv: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
                rows = adv.numel() // adv.shape[-1]
                denom = nsp_denom if clean.data_ptr() == nsp_ptr else mlm_denom
                return base_div(adv, clean) * (rows / denom)

            def adv_heads(e: torch.Tensor):
                mlm_adv, nsp_adv = model.heads_from_embeds(e, attn, tt, masked_index, nsp_in_r)
                return mlm_adv, nsp_adv

            r, alum_metrics = alum_regularizer(
                adv_heads, embeds, (mlm_logits, nsp_logits if nsp_in_r else None), self.alum,
                pad_mask=attn.bool(), generator=alum_generators, divergence=divergence)
            loss = loss + self.alum.alpha * r  # Eq. 3 (a non-finite R arrives as 0, counted in adv_nonfinite)
            metrics["adv"] = alum_metrics["adv"]
            for k in ("delta_linf", "ascent_nonfinite", "ascent_zero_grad_frac", "adv_nonfinite", "adv_dropout"):
                if k in alum_metrics:
                    metrics[k] = alum_metrics[k]
        return loss, metrics


@torch.no_grad()
def mlm_eval_batch(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of MLM cross-entropy, number correct, number of masked tokens) on one masked batch."""
    masked_index, targets = batch["masked_pos"], batch["mlm_targets"]  # (N,), (N,)
    embeds = model.embed(batch["input_ids"], batch.get("token_type_ids"))
    mlm_logits, _ = model.heads_from_embeds(embeds, batch["attention_mask"], batch.get("token_type_ids"),
                                            masked_index, False)
    ce = F.cross_entropy(mlm_logits.float(), targets, reduction="sum")
    correct = (mlm_logits.argmax(-1) == targets).sum()
    return ce, correct.float(), torch.tensor(float(targets.numel()), device=ce.device)
