"""fairseq criterion ``alum_masked_lm``: masked-only MLM (+ NSP) loss + alpha * ALUM term.

Per micro-batch (Liu et al. 2020, Eq. 3 / Algorithm 1):

1. clean pass through the (possibly DDP-wrapped) model: ``model(src_tokens, masked_tokens=...)`` - the
   RoBERTa LM head projects only the masked positions.  A forward hook *captures* the perturbation
   point ``e`` (``--alum-perturb-at word``: the output of ``embed_tokens``, before positions and the
   embedding LayerNorm; ``embedding_output``: the output of ``layernorm_embedding``, mt-dnn's place)
   and, when NSP is on, the encoder features for the ``nsp`` classification head;
2. :func:`alum_pretrain.objective.pretrain_objective` - the objective shared with the native engine:
   ``L = CE_mlm (sum over masked tokens) + w_nsp * CE_nsp`` and, when ALUM is on (``alpha > 0``,
   ``update >= --alum-start-step``, training), ``loss = L + alpha * R`` with ``heads`` running the
   *unwrapped* model with the hook *replacing* ``e`` by ``e + delta`` (so DDP's forward bookkeeping runs
   once, for the clean pass; the ascent uses ``torch.autograd.grad`` w.r.t. delta only: no parameter
   gradients, no all-reduce).

**Options.**  ``--alum-<field>`` for every ``alum.<field>`` of alum-train, with its default and help
(:mod:`alum_pretrain.knobs`: ``--alum-k-steps``, ``--alum-start-step``, ...); the old spellings
``--alum-k`` and ``--alum-start-update`` still work for one release (with a warning).

**Normalisation.**  fairseq divides gradients by the summed ``sample_size`` (= masked tokens) of all
micro-batches and workers, like the stock ``masked_lm`` criterion.  Mean-type terms (NSP cross-entropy
averaged over sequences, and R, a symmetric KL averaged over masked tokens / sequences) are multiplied by
the micro-batch's ``sample_size`` (the objective's normalisers: MLM / 1, NSP / (B / sample_size)) so that
the step optimises ``mean CE_mlm + w_nsp * mean CE_nsp +
alpha * R`` with every micro-batch weighted by its masked-token count.

**Logged** (``--log-format json`` shows them): ``loss``, ``mlm_loss``, ``nsp_loss`` (base 2, fairseq's
convention), ``nsp_acc``, ``adv`` (R in nats, the unweighted SymKL; 0 while ALUM is off),
``alum_on`` (fraction of the update's samples with ALUM on), ``mask_rate`` (the scheduled rate) and
``masked_frac`` (masked / maskable tokens actually drawn).

**Precision.**  Use ``--amp`` with ALUM: it keeps fp32 weights under fp16 autocast, so ``e + delta`` is
formed in fp32 and delta ~ 1e-5 survives, and the ascent gradient is taken from a rescaled backward that
fp16 cannot underflow (``alum_pretrain.precision.scale_free_input_grad``).  ``--fp16``/``--bf16`` (and
their memory-efficient variants) cast the whole model to 16 bits: the embeddings are then 16-bit and a
perturbation of 1e-5 is below their resolution (one bf16 ulp at 0.05 is ~2e-4), so the criterion refuses
them when ALUM is on (``--alum-alpha 0`` runs plain MLM in any precision).  fairseq 0.12 has no bf16
autocast: for bf16 on A100/H100 use the native engine (``alum-train --train.precision bf16``).
Divergences are always computed in fp32.

**Diagnostics** (also logged): ``ascent_nonfinite`` (ascent updates skipped for a non-finite
gradient), ``ascent_zero_grad_frac`` (fraction of real tokens whose ascent gradient was entirely 0),
``adv_nonfinite`` (micro-batches whose non-finite R was not added) and, with ``--alum-log-baseline``,
``adv_dropout`` (R at delta = 0 under the same dropout masks: ``adv - adv_dropout`` is the adversarial
share).

**Random start.**  Each sample's delta is ``sample_normals(seed, update, sample id)``
(:class:`alum_pretrain.masking.SampleNoise`, the native engine's definition), computed on the batch's device
from the batch's ``id`` tensor with integer tensor ops: no device-to-host read, and the result does not depend
on how a batch is split over workers or ``--update-freq``, nor on a sample's place in its batch.  ``--alum-perturb-at
embedding_output`` perturbs the embedding block's output after its dropout (as the native engine).
"""


import math
from contextlib import contextmanager
from dataclasses import dataclass, make_dataclass
from typing import Optional

import torch
from omegaconf import II

from fairseq import utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.logging import metrics

from alum_pretrain import knobs
from alum_pretrain.compat import check_alum
from alum_pretrain.masking import SampleNoise
from alum_pretrain.objective import Normalizers, pretrain_objective
from alum_pretrain.passes import AdversarialPasses

NSP_HEAD = "nsp"

# --alum-<field> for every alum.<field> of the native config (+ the deprecated spellings)
_AlumOptions = make_dataclass("_AlumOptions", knobs.dataclass_fields("alum", ChoiceEnum), bases=(FairseqDataclass,))


@dataclass
class AlumMaskedLMCriterionConfig(_AlumOptions):
    seed: int = II("common.seed")
    fp16: bool = II("common.fp16")
    bf16: bool = II("common.bf16")
    memory_efficient_fp16: bool = II("common.memory_efficient_fp16")
    memory_efficient_bf16: bool = II("common.memory_efficient_bf16")


def refuse_pure_half(cfg, alpha: float) -> None:
    """ALUM cannot work on a model cast to 16 bits (--fp16/--bf16 and the memory-efficient variants):
    stop before training and say what to use instead."""
    if alpha <= 0:
        return
    flags = [f"--{n.replace('_', '-')}" for n in ("fp16", "bf16", "memory_efficient_fp16", "memory_efficient_bf16")
             if bool(getattr(cfg, n, False) or False)]
    if flags:
        raise ValueError(
            f"--criterion alum_masked_lm with {' '.join(flags)}: these cast the whole model to 16 bits, so "
            f"embeds + delta is rounded to 16 bits and the 1e-5 ALUM perturbation disappears (half a bf16 ulp at "
            f"|e| = 0.05 is ~1e-4). Use --amp instead (fp32 weights, fp16 autocast; V100), or the native engine "
            f"with --train.precision bf16 for bf16 (A100/H100); --alum-alpha 0 trains plain MLM in any precision.")


def sample_ids(sample: dict, src: torch.Tensor) -> torch.Tensor:
    """The batch's sample ids ``(B,)`` where the batch lives (fairseq's ``id``, else ``0..B-1``)."""
    ids = sample.get("id")
    return ids.to(src.device) if ids is not None else torch.arange(src.shape[0], device=src.device)


def unwrap(model):
    """The bare fairseq model under DDP / other wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


class EmbeddingTap:
    """Forward hooks at the ALUM perturbation point (and, for NSP, on the encoder's output).

    ``capture()``: records the perturbation point's output ``e`` (B, T, H) and the encoder features.
    ``replace(x)``: makes the perturbation point return ``x`` instead (the hook's return value replaces
    the module output), i.e. the rest of the network runs on ``x``.
    """

    def __init__(self, model, perturb_at: str):
        encoder = getattr(getattr(model, "encoder", None), "sentence_encoder", None)
        if encoder is None or not hasattr(encoder, "embed_tokens"):
            raise ValueError(f"--criterion alum_masked_lm needs a fairseq RoBERTa-style model (encoder."
                             f"sentence_encoder.embed_tokens); got {type(model).__name__}")
        if perturb_at == "word":
            self.point = encoder.embed_tokens
        else:
            if getattr(encoder, "layernorm_embedding", None) is None:
                raise ValueError("--alum-perturb-at embedding_output needs an embedding LayerNorm "
                                 "(the model has layernorm_embedding=False); use --alum-perturb-at word")
            # The embedding block's output after its LayerNorm AND dropout (forward_embedding applies
            # encoder.dropout_module there only; the layers have their own): the native engine's point.
            self.point = encoder.dropout_module
        self.encoder = encoder
        self.embeds: Optional[torch.Tensor] = None
        self.features: Optional[torch.Tensor] = None
        self._replacement: Optional[torch.Tensor] = None

    def _point_hook(self, module, inputs, output):
        if self._replacement is not None:
            if self._replacement.shape != output.shape:
                raise ValueError(f"perturbed embeddings {tuple(self._replacement.shape)} != {tuple(output.shape)}")
            return self._replacement
        self.embeds = output
        return None

    def _encoder_hook(self, module, inputs, output):
        self.features = output["encoder_out"][0].transpose(0, 1)  # T x B x C -> (B, T, C)

    @contextmanager
    def _hooks(self):
        h1 = self.point.register_forward_hook(self._point_hook)
        h2 = self.encoder.register_forward_hook(self._encoder_hook)
        try:
            yield self
        finally:
            h1.remove()
            h2.remove()

    @contextmanager
    def capture(self):
        self._replacement = None
        with self._hooks():
            yield self

    @contextmanager
    def replace(self, x: torch.Tensor):
        self._replacement = x
        try:
            with self._hooks():
                yield self
        finally:
            self._replacement = None


@register_criterion("alum_masked_lm", dataclass=AlumMaskedLMCriterionConfig)
class AlumMaskedLMCriterion(FairseqCriterion):
    """MLM (+NSP) + alpha * ALUM (symmetric KL under a worst-case embedding perturbation)."""

    def __init__(self, cfg: AlumMaskedLMCriterionConfig, task):
        super().__init__(task)
        self.alum = knobs.from_flat("alum", cfg)
        refuse_pure_half(cfg, self.alum.alpha)
        tcfg = getattr(task, "cfg", None)  # the alum_masked_lm task: its length and whether it has NSP
        check_alum(self.alum, section=lambda key: knobs.flag_of(f"alum.{key}"),
                   max_steps=int(getattr(tcfg, "max_update", 0) or 0) or None,
                   nsp=getattr(tcfg, "sample_mode", "pairs") == "pairs" if tcfg is not None else None)
        self.seed = int(cfg.seed)

    def forward(self, model, sample, reduce=True):
        src = sample["net_input"]["src_tokens"]  # (B, T) masked
        target = sample["target"]  # (B, T) original ids at masked positions, pad elsewhere
        masked = target.ne(self.padding_idx)  # (B, T) bool
        sample_size = masked.int().sum()
        nsp_target = sample.get("nsp_target")  # (B,) or None
        use_nsp = nsp_target is not None
        inner = unwrap(model)
        if use_nsp and NSP_HEAD not in getattr(inner, "classification_heads", {}):
            raise ValueError("the batch has NSP labels but the model has no 'nsp' classification head; "
                             "use --task alum_masked_lm --sample-mode pairs (it registers the head)")
        update = sample.get("update_num")  # set by the alum_masked_lm task; None with other tasks
        if update is None and self.alum.start_step > 0 and self.training:
            raise ValueError("--alum-start-step > 0 needs --task alum_masked_lm (it passes the update number "
                             "to the criterion); with other tasks use --alum-start-step 0")
        tap = EmbeddingTap(inner, self.alum.perturb_at)

        alum_on = self.training and self.alum.active(int(update or 0))
        # the adversarial passes' dropout context (alum.adv_dropout), captured before the clean pass draws
        passes = AdversarialPasses.capture(self.alum.adv_dropout, inner, src.device) if alum_on else None
        # clean pass through the wrapper (DDP bookkeeping), LM head on masked positions only
        with tap.capture():
            mlm_logits, _ = model(src, masked_tokens=masked)  # (N, V)
        nsp_logits = inner.classification_heads[NSP_HEAD](tap.features) if use_nsp else None  # (B, 2)

        def heads(perturbed: torch.Tensor, with_nsp: bool):
            with tap.replace(perturbed):
                lg, _ = inner(src, masked_tokens=masked)  # (N, V); unwrapped: no DDP bookkeeping
            return lg, inner.classification_heads[NSP_HEAD](tap.features) if with_nsp else None

        # Random start keyed per sample by (seed, update, sample id), as the native engine: identical after
        # resume and whatever the batch split, computed on the device from the ids tensor (no host read).
        # Without the update number (other tasks) the global RNG, which fairseq reseeds every update.
        gens = None if update is None else SampleNoise(self.seed, int(update), sample_ids(sample, src))
        # fairseq divides by the summed sample_size (masked tokens): sums for MLM, NSP mean x sample_size
        n = sample_size.float()
        norm = Normalizers(mlm=1.0, nsp=(nsp_target.numel() / n) if use_nsp else 1.0)
        loss, m = pretrain_objective(
            heads, tap.embeds, (mlm_logits, nsp_logits), mlm_targets=target[masked], nsp_labels=nsp_target,
            pad_mask=src.ne(self.padding_idx), alum=self.alum,
            alum_on=alum_on, norm=norm, generators=gens, passes=passes)
        alum_on = "adv" in m

        logging_output = {
            "loss": loss.data,
            "mlm_loss": m["mlm"].data,
            "adv": m["adv"].data if alum_on else torch.zeros((), device=src.device),  # R x sample_size, summed
            "alum_n": int(alum_on),
            "alum_on": int(alum_on) * sample["nsentences"],
            "masked": sample_size.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["nsentences"],
            "sample_size": sample_size,
        }
        if alum_on:
            for key in ("ascent_nonfinite", "adv_nonfinite", "ascent_zero_grad_frac", "adv_dropout"):
                if key in m:
                    logging_output[key] = m[key].data
        if "mask_rate" in sample:  # set by the alum_masked_lm task (absent with --task masked_lm)
            logging_output["mask_rate"] = float(sample["mask_rate"]) * sample["nsentences"]
            logging_output["mask_rate_n"] = sample["nsentences"]
            logging_output["maskable"] = sample["n_maskable"]  # a device tensor: summed, read when logged
        if use_nsp:
            logging_output["nsp_loss"] = (m["nsp"] * norm.nsp).data  # the summed cross-entropy
            logging_output["nsp_correct"] = m["nsp_correct"].data
            logging_output["nsp_n"] = nsp_target.numel()
        return loss, sample_size, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        def total(key):
            return sum(float(log.get(key, 0)) for log in logging_outputs)

        sample_size = total("sample_size")
        nsent = total("nsentences")
        if sample_size > 0:
            metrics.log_scalar("loss", total("loss") / sample_size / math.log(2), sample_size, round=3)
            metrics.log_scalar("mlm_loss", total("mlm_loss") / sample_size / math.log(2), sample_size, round=3)
            metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["mlm_loss"].avg))
            metrics.log_scalar("adv", total("adv") / sample_size, sample_size)
            if any("adv_dropout" in log for log in logging_outputs):
                metrics.log_scalar("adv_dropout", total("adv_dropout") / sample_size, sample_size)
                # the part of R due to delta rather than to dropout disagreement (as the native log's adv_share)
                metrics.log_derived("adv_share", lambda m: (m["adv"].avg - m["adv_dropout"].avg) / m["adv"].avg
                                    if m["adv"].avg > 0 else 0.0)
        alum_n = total("alum_n")
        if alum_n > 0:
            metrics.log_scalar("ascent_nonfinite", total("ascent_nonfinite"), 1, round=0)
            metrics.log_scalar("adv_nonfinite", total("adv_nonfinite"), 1, round=0)
            metrics.log_scalar("ascent_zero_grad_frac", total("ascent_zero_grad_frac") / alum_n, alum_n, round=4)
        nsp_n = total("nsp_n")
        if nsp_n > 0:
            metrics.log_scalar("nsp_loss", total("nsp_loss") / nsp_n / math.log(2), nsp_n, round=3)
            metrics.log_scalar("nsp_acc", total("nsp_correct") / nsp_n, nsp_n, round=4)
        if nsent > 0:
            metrics.log_scalar("alum_on", total("alum_on") / nsent, nsent, round=3)
        rate_n = total("mask_rate_n")
        if rate_n > 0:
            metrics.log_scalar("mask_rate", total("mask_rate") / rate_n, rate_n, round=4)
        maskable = total("maskable")
        if maskable > 0:
            metrics.log_scalar("masked_frac", total("masked") / maskable, maskable, round=4)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
