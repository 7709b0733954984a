"""The ALUM pre-training step as ONE module forward: masked-only MLM (+NSP) loss + alpha * R.

:class:`PretrainStep` is what DDP wraps.  Its ``forward`` runs, for one micro-batch,

1. the clean pass: ``e = E(x)`` (word embeddings, the perturbation point), masked-only MLM logits and
   NSP logits from ``e`` (the LM head runs on the N masked positions only);
2. :func:`alum_pretrain.objective.pretrain_objective` (the objective shared with the fairseq criterion):
   ``L = CE_mlm + CE_nsp`` and, when ``alum.active(step)``, ``loss = L + alpha * R`` (Eq. 3) with R from
   Algorithm 1 lines 3-8 (random start, K input-only ascent steps, adversarial pass) on the *unwrapped*
   model, so DDP sees exactly one forward (this one) and, in the loop, one backward per micro-batch; the
   ascent uses ``torch.autograd.grad`` w.r.t. delta only - no parameter gradients, no DDP all-reduce.

**Same numbers for any number of processes.**  Two choices make a run with W processes x micro-batch B
x A accumulation steps compute the same loss (up to float rounding) as one process with the same
global batch:

* *Per-sample randomness.*  Masking and the ALUM random start of sample ``i`` of optimizer step ``s``
  are pure functions of ``(seed, s, global sample index i)`` (:func:`alum_pretrain.masking.mask_batch`,
  :class:`alum_pretrain.masking.SampleNoise`),
  never by rank or micro-batch, so how the global batch is split does not change any draw.
* *Global normalisation.*  The MLM cross-entropy is a mean over the masked tokens of the WHOLE global
  batch and NSP a mean over its sequences: each micro-batch contributes ``sum / N_global`` where
  ``N_global`` (all-reduced once per step, before the first forward) counts the masked tokens of all
  micro-batches on all ranks.  DDP averages gradients over ranks, so the loss is multiplied by the world
  size.  The ALUM divergence is normalised the same way (sum over rows / N_global for MLM, / B_global for
  NSP) - also inside the ascent, so the relative weight of the MLM and NSP terms in the ascent direction
  does not depend on the split either.

Beside the step: :func:`evaluate` (the validation MLM loss/accuracy at ``masking.eval_rate`` with fixed
masks, through :func:`mlm_eval_batch`) and the non-finite guard (:func:`step_is_finite`, the one host sync of
an optimizer step; :class:`NonFiniteError` stops a diverged run).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from ..adversarial import ALUMConfig
from ..masking import IGNORE_INDEX, STREAM_EVAL_MASK, STREAM_MASK, TokenMasker
from ..objective import Normalizers, pretrain_objective
from ..passes import AdversarialPasses
from .. import stopping
from . import distributed as D


class Masker(TokenMasker):
    """Masks an unmasked native batch (:class:`alum_pretrain.masking.TokenMasker` keyed by the global sample
    index, so the masks are independent of batch size, accumulation and world size) and adds the flat
    masked positions, their targets and the host-side counts the step and the logs use."""

    def __call__(self, batch: dict, rate: float, step: int, sample_ids: torch.Tensor,
                 stream: int = STREAM_MASK) -> dict:
        special = batch["special_mask"].bool()  # (B, T) True = never mask (specials + padding)
        cont = batch.get("continuation")
        masked, labels = self.mask(batch["input_ids"], special, rate, step, sample_ids, stream,
                                   None if cont is None else cont.bool())
        flat = labels.reshape(-1)
        # Flat masked positions and their targets, computed here on the host so that the device never has
        # to synchronise for a data-dependent shape (boolean indexing on GPU waits for the kernel).
        masked_pos = (flat != IGNORE_INDEX).nonzero().squeeze(1)  # (N,)
        return {**batch, "input_ids": masked, "labels": labels,  # (B, T), labels -100 where not selected
                "masked_pos": masked_pos, "mlm_targets": flat.index_select(0, masked_pos), "sample_ids": sample_ids,
                # host-side counts for the logs (no device sync later)
                "n_tokens": int(batch["attention_mask"].sum()), "n_maskable": int((~special).sum()),
                "n_masked": int(masked_pos.numel()),
                # no padding (every blocks batch but a stream's last block): the encoder gets no mask at all
                "padded": bool(int(batch["attention_mask"].sum()) < batch["attention_mask"].numel())}


class PretrainStep(nn.Module):
    """forward(batch, ...) -> (loss, metrics); wraps a ``PretrainModel`` (``embed`` + ``heads_from_embeds``).

    ``batch``: ``input_ids`` (B, T) masked, ``masked_pos`` / ``mlm_targets`` (N,) from :class:`Masker`,
    ``attention_mask`` (B, T), ``token_type_ids`` (B, T), ``next_sentence_label`` (B,) when NSP is on;
    ``padded`` (host bool from :class:`Masker`): with ``unmasked_when_unpadded`` (alum-train sets it in
    blocks mode) a batch without padding reaches the encoder with no attention mask (the same logits up to
    float rounding; on GPU SDPA may then use its flash kernel).
    ``mlm_denom`` / ``nsp_denom``: the global masked-token and sequence counts of the optimizer step
    divided by the world size (the factor that turns DDP's gradient average into a global mean).
    ``alum_generators``: the per-sample noise key of the ALUM random start (a
    :class:`~alum_pretrain.masking.SampleNoise`, or per-sample generators; None = global RNG).

    Returned ``metrics`` (detached 0-dim tensors, no host sync; see :mod:`alum_pretrain.objective`) are this
    micro-batch's contributions to the global step means, like the loss scaled by the world size: summing
    them over micro-batches and averaging over ranks gives the step's mlm / nsp / adv.
    """

    def __init__(self, model: nn.Module, alum: ALUMConfig, nsp: bool, unmasked_when_unpadded: bool = False):
        super().__init__()
        self.model = model
        self.alum = alum
        self.nsp = nsp
        self.unmasked_when_unpadded = unmasked_when_unpadded

    def forward(self, batch: dict, *, alum_on: bool, mlm_denom: float, nsp_denom: float,
                alum_generators=None, baseline: bool = False) -> tuple[torch.Tensor, dict]:
        model = self.model
        attn = batch["attention_mask"]  # (B, T)
        tt = batch.get("token_type_ids")  # (B, T) or None
        masked_index = batch["masked_pos"]  # (N,) flat positions into B*T (row-major)

        enc_mask = None if self.unmasked_when_unpadded and not batch.get("padded", True) else attn

        def heads(e: torch.Tensor, with_nsp: bool):
            return model.heads_from_embeds(e, enc_mask, tt, masked_index, with_nsp)  # ((N, V), (B, 2)|None)

        # clean pass from the word embeddings (the ALUM perturbation point); the adversarial passes' dropout
        # context (alum.adv_dropout) is captured right before its first dropout draw
        embeds = model.embed(batch["input_ids"], tt)  # (B, T, H)
        passes = AdversarialPasses.capture(self.alum.adv_dropout, model, embeds.device) if alum_on else None
        return pretrain_objective(
            heads, embeds, heads(embeds, self.nsp), mlm_targets=batch["mlm_targets"],
            nsp_labels=batch["next_sentence_label"] if self.nsp else None, pad_mask=attn.bool(), alum=self.alum,
            alum_on=alum_on, norm=Normalizers(mlm=mlm_denom, nsp=nsp_denom), generators=alum_generators,
            passes=passes, baseline=baseline)


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


@torch.no_grad()
def evaluate(run, step: int) -> dict:
    """Validation MLM loss and accuracy at ``masking.eval_rate``, the same masks every time.

    A stop signal (:mod:`alum_pretrain.stopping`) is looked at before every batch: the evaluation is cut
    short and :class:`~alum_pretrain.stopping.StopRequested` raised on every rank (its record is not
    logged; the loop then saves as between steps)."""
    cfg, env, model = run.cfg, run.env, run.model
    run.valid.load_state_dict(run.valid_state0)
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, device=env.device)
    autocast = torch.autocast(env.device.type, dtype=run.amp_dtype) if run.amp_dtype is not None else None
    B, W = cfg.train.batch_size, env.world_size
    for j, batch in enumerate(run.valid):
        if j >= cfg.train.eval_batches or stop_seen(run):
            break
        ids = (j * W + env.rank) * B + torch.arange(batch["input_ids"].shape[0])
        batch = run.to_device(run.masker(batch, cfg.masking.eval_rate, 0, ids, stream=STREAM_EVAL_MASK))
        if autocast is not None:
            with autocast:
                ce, correct, n = mlm_eval_batch(model, batch)
        else:
            ce, correct, n = mlm_eval_batch(model, batch)
        totals += torch.stack([ce.float(), correct.float(), n.float()])
    model.train(was_training)
    ce, correct, n = D.all_reduce_device(env, totals).tolist()
    stopping.poll("evaluation")  # every rank, once: a rank that stopped early stops them all
    if n > 0:
        rec = {"step": step, "kind": "valid", "valid_mlm": ce / n, "valid_acc": correct / n, "valid_masked_tokens": n}
    else:  # a mean over no token is no number: null in log.jsonl, never a loss of 0 or an accuracy of 0
        run.logger.warning(f"step {step}: validation masked no token, so valid_mlm and valid_acc are not "
                           "reported", step)
        rec = {"step": step, "kind": "valid", "valid_mlm": None, "valid_acc": None, "valid_masked_tokens": 0.0}
    if smoothness_due(cfg.train, step):
        rec.update(smoothness(run))
    return rec


def stop_seen(run) -> bool:
    """Whether to cut an evaluation pass short: this rank's stop flag; under ZeRO-3, whose forwards gather
    weights from every rank, any rank's (a collective per batch, so every rank stops at the same one)."""
    flag = stopping.requested() is not None
    if run.engine is not None and run.cfg.deepspeed.zero_stage == 3:
        return D.any_rank(run.env, flag)
    return flag


def smoothness_due(tc, step: int) -> bool:
    """``train.smooth_every``: at every N-th evaluation (step 0 counts as the first) and at the last one."""
    if not tc.smooth_every:
        return False
    if step == tc.max_steps:
        return True
    k = step // tc.eval_every if tc.eval_every else 0  # the index of this evaluation (step 0 is the 0th)
    return k % tc.smooth_every == 0


def smoothness(run) -> dict:
    """Eval-mode smoothness (:func:`alum_pretrain.smoothness.measure_smoothness`) on the first
    ``train.smooth_batches`` validation batches of every rank, averaged over the ranks (every rank runs the
    same passes, so ZeRO-3's gathers stay in step)."""
    from ..smoothness import SmoothnessConfig, flat_metrics, measure_smoothness

    tc, env = run.cfg.train, run.env
    run.valid.load_state_dict(run.valid_state0)
    batches = []
    for j, batch in enumerate(run.valid):
        if j >= tc.smooth_batches:
            break
        batches.append({k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "special_mask")
                        if k in batch})  # on the host: measure_smoothness moves what it uses
    scfg = SmoothnessConfig(epsilons=tuple(float(x) for x in tc.smooth_eps.split(",") if x.strip()),
                            eps_mode=tc.smooth_eps_mode, mask_rate=run.cfg.masking.eval_rate, seed=tc.seed)
    # The stop flag per batch, on every rank at once when every rank measures as many batches.
    same = len(set(D.gather_objects(env, len(batches)))) == 1
    check = (lambda: stopping.poll("smoothness evaluation")) if same else None
    flat = flat_metrics(measure_smoothness(run.model, batches, run.masker, scfg,  # the run's masker, eval stream
                                           check=check))
    stopping.poll("smoothness evaluation")
    keys = sorted(flat)
    mean = D.all_reduce_device(env, torch.tensor([flat[k] for k in keys], dtype=torch.float64,
                                                 device=env.device)).tolist()
    return {k: v / env.world_size for k, v in zip(keys, mean)}


# ---- the non-finite guard -------------------------------------------------------------------------


class NonFiniteError(RuntimeError):
    """Training cannot continue: NaN/Inf losses or gradients for too many steps, or non-finite weights."""


def step_is_finite(run, loss_sum: torch.Tensor, grad_norm: torch.Tensor) -> tuple[bool, bool]:
    """``(loss finite, gradient norm finite)`` on every rank: the one host sync of an optimizer step.

    The gradient norm is computed after DDP's all-reduce, hence global; the loss is per rank, so the flags
    are summed over ranks (any rank's NaN skips the step everywhere and the replicas stay identical)."""
    bad = (~torch.isfinite(torch.stack([loss_sum.detach().float().reshape(()),
                                         grad_norm.detach().float().reshape(())]))).float()
    if run.env.distributed:
        bad = D.all_reduce_device(run.env, bad)
    loss_bad, grad_bad = bad.tolist()
    return loss_bad == 0, grad_bad == 0
