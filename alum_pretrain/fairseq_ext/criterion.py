"""fairseq criterion ``alum_masked_lm``: masked-only MLM (+ NSP) loss + alpha * ALUM term.

Per micro-batch (Liu et al. 2020, Eq. 3 / Algorithm 1):

1. clean pass through the (possibly DDP-wrapped) model: ``model(src_tokens, masked_tokens=...)`` - the
   RoBERTa LM head projects only the masked positions.  A forward hook *captures* the perturbation
   point ``e`` (``--alum-perturb-at word``: the output of ``embed_tokens``, before positions and the
   embedding LayerNorm; ``embedding_output``: the output of ``layernorm_embedding``, mt-dnn's place)
   and, when NSP is on, the encoder features for the ``nsp`` classification head;
2. ``L = CE_mlm (sum over masked tokens) + w_nsp * CE_nsp``;
3. when ALUM is on (``alpha > 0``, ``update >= --alum-start-update``, training):
   :func:`alum_pretrain.adversarial.alum_regularizer` - the project's single implementation of the
   math - with a ``forward_fn`` that runs the *unwrapped* model with the hook *replacing* ``e`` by
   ``e + delta`` (so DDP's forward bookkeeping runs once, for the clean pass; the ascent uses
   ``torch.autograd.grad`` w.r.t. delta only: no parameter gradients, no all-reduce);
4. ``loss = L + alpha * R``.

**Normalisation.**  fairseq divides gradients by the summed ``sample_size`` (= masked tokens) of all
micro-batches and workers, like the stock ``masked_lm`` criterion.  Mean-type terms (NSP cross-entropy
averaged over sequences, and R, a symmetric KL averaged over masked tokens / sequences) are multiplied by
the micro-batch's ``sample_size`` so that the step optimises ``mean CE_mlm + w_nsp * mean CE_nsp +
alpha * R`` with every micro-batch weighted by its masked-token count.

**Logged** (``--log-format json`` shows them): ``loss``, ``mlm_loss``, ``nsp_loss`` (base 2, fairseq's
convention), ``nsp_acc``, ``adv`` (R in nats, the unweighted SymKL; 0 while ALUM is off),
``alum_on`` (fraction of the update's samples with ALUM on), ``mask_rate`` (the scheduled rate) and
``masked_frac`` (masked / maskable tokens actually drawn).

**Precision.**  Use ``--amp`` with ALUM: it keeps fp32 weights under fp16 autocast, so ``e + delta`` is
formed in fp32 and delta ~ 1e-5 survives, and the ascent gradient is taken from a rescaled backward that
fp16 cannot underflow (``alum_pretrain.adversarial.scale_free_input_grad``).  ``--fp16``/``--bf16`` (and
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

**Random start.**  Each sample's delta is drawn from ``step_generator(seed, update, sample id)``, so the
result does not depend on how a batch is split over workers or ``--update-freq``.  ``--alum-perturb-at
embedding_output`` perturbs the embedding block's output after its dropout (as the native engine).
"""


import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from omegaconf import II

from fairseq import utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.logging import metrics

from alum_pretrain.adversarial import ALUMConfig, alum_regularizer
from alum_pretrain.masking import step_generator

NSP_HEAD = "nsp"
STREAM_ALUM = 1  # step_generator stream of the ALUM random start (0 = masking, see task.py)


@dataclass
class AlumMaskedLMCriterionConfig(FairseqDataclass):
    alum_alpha: float = field(default=10.0, metadata={
        "help": "weight of the adversarial SymKL term (paper: 10 for pre-training); 0 = standard MLM, no extra passes"})
    alum_epsilon: float = field(default=1e-5, metadata={
        "help": "radius of the per-token perturbation ball (Algorithm 1 line 6)"})
    alum_step_size: float = field(default=1e-3, metadata={
        "help": "ascent step size eta: delta += eta * g / max|g| per token"})
    alum_noise_std: float = field(default=1e-5, metadata={
        "help": "std sigma of the Gaussian initial perturbation"})
    alum_k: int = field(default=1, metadata={"help": "number K of projected ascent steps (paper: 1)"})
    alum_start_update: int = field(default=0, metadata={
        "help": "update at which ALUM switches on (standard MLM before; the paper's curriculum; 0 for "
                "continual pre-training)"})
    alum_projection: ChoiceEnum(["linf", "l2", "none"]) = field(default="linf", metadata={
        "help": "projection after each ascent step: linf (paper), l2, none (unconstrained step)"})
    alum_perturb_at: ChoiceEnum(["word", "embedding_output"]) = field(default="word", metadata={
        "help": "word: output of the token-embedding lookup (before positions and the embedding LayerNorm); "
                "embedding_output: after the embedding LayerNorm (mt-dnn)"})
    alum_divergence: ChoiceEnum(["sym_kl_ce", "sym_kl"]) = field(default="sym_kl_ce", metadata={
        "help": "symmetric KL form: sym_kl_ce = KL(sg(q)||p) + KL(sg(p)||q) (the authors' code, R-Drop) or "
                "sym_kl = KL(p||sg(q)) + KL(q||sg(p)); same value, different gradient under dropout"})
    alum_include_nsp: bool = field(default=False, metadata={
        "help": "also put the NSP distribution into the ALUM term (the paper: MLM only)"})
    alum_log_baseline: bool = field(default=False, metadata={
        "help": "log adv_dropout: the ALUM term at delta = 0 under the same dropout masks (one extra no-grad "
                "forward), so adv - adv_dropout is the adversarial share"})
    nsp_loss_weight: float = field(default=1.0, metadata={
        "help": "weight of the NSP cross-entropy (only with --sample-mode pairs)"})
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
        self.alum = ALUMConfig(alpha=cfg.alum_alpha, epsilon=cfg.alum_epsilon, step_size=cfg.alum_step_size,
                               noise_std=cfg.alum_noise_std, k_steps=cfg.alum_k, projection=str(cfg.alum_projection),
                               perturb_at=str(cfg.alum_perturb_at), start_step=cfg.alum_start_update)
        if cfg.nsp_loss_weight < 0:
            raise ValueError(f"--nsp-loss-weight {cfg.nsp_loss_weight}: must be >= 0")
        self.alum.divergence = str(cfg.alum_divergence)
        self.alum.include_nsp = bool(cfg.alum_include_nsp)
        self.alum.log_baseline = bool(cfg.alum_log_baseline)
        self.alum.__post_init__()
        refuse_pure_half(cfg, self.alum.alpha)
        self.nsp_weight = float(cfg.nsp_loss_weight)
        self.seed = int(cfg.seed)

    def forward(self, model, sample, reduce=True):
        src = sample["net_input"]["src_tokens"]  # (B, T) masked
        target = sample["target"]  # (B, T) original ids at masked positions, pad elsewhere
        masked = target.ne(self.padding_idx)  # (B, T) bool
        sample_size = masked.int().sum()
        targets = target[masked]  # (N,)
        nsp_target = sample.get("nsp_target")  # (B,) or None
        use_nsp = nsp_target is not None
        inner = unwrap(model)
        if use_nsp and NSP_HEAD not in getattr(inner, "classification_heads", {}):
            raise ValueError("the batch has NSP labels but the model has no 'nsp' classification head; "
                             "use --task alum_masked_lm --sample-mode pairs (it registers the head)")
        tap = EmbeddingTap(inner, self.alum.perturb_at)

        # 1. clean pass through the wrapper (DDP bookkeeping), LM head on masked positions only.
        with tap.capture():
            mlm_logits, _ = model(src, masked_tokens=masked)  # (N, V)
        nsp_logits = inner.classification_heads[NSP_HEAD](tap.features) if use_nsp else None  # (B, 2)

        # 2. task loss; sums, normalised by fairseq with the summed sample_size (masked tokens).
        mlm_loss = F.cross_entropy(mlm_logits.float(), targets, reduction="sum")
        loss = mlm_loss
        n = sample_size.float()
        nsp_loss = nsp_correct = None
        if use_nsp:
            nsp_loss = F.cross_entropy(nsp_logits.float(), nsp_target, reduction="sum")
            loss = loss + self.nsp_weight * nsp_loss * (n / nsp_target.numel())
            nsp_correct = (nsp_logits.argmax(-1) == nsp_target).sum()

        # 3. ALUM term (Algorithm 1 lines 3-8) from the shared core.
        update = sample.get("update_num")  # set by the alum_masked_lm task; None with other tasks
        if update is None and self.alum.start_step > 0 and self.training:
            raise ValueError("--alum-start-update > 0 needs --task alum_masked_lm (it passes the update number "
                             "to the criterion); with other tasks use --alum-start-update 0")
        alum_on = self.training and self.alum.active(int(update or 0)) and targets.numel() > 0
        adv = torch.zeros((), device=src.device)
        diag: dict = {}
        if alum_on:
            nsp_in_r = use_nsp and self.alum.include_nsp  # the paper's R is on the MLM distributions only

            def forward_fn(perturbed: torch.Tensor):
                with tap.replace(perturbed):
                    lg, _ = inner(src, masked_tokens=masked)  # (N, V); unwrapped: no DDP bookkeeping
                nl = inner.classification_heads[NSP_HEAD](tap.features) if nsp_in_r else None
                return (lg, nl)

            # Random start keyed per sample by (seed, update, sample id), as the native engine: identical
            # after resume and whatever the batch split.  Without the update number (other tasks) use the
            # global RNG, which fairseq reseeds every update.
            ids = sample.get("id")
            gen = None
            if update is not None:
                sids = ids.tolist() if ids is not None else list(range(src.shape[0]))
                gen = [step_generator(self.seed, int(update), int(i), stream=STREAM_ALUM) for i in sids]
            r, m = alum_regularizer(forward_fn, tap.embeds, (mlm_logits, nsp_logits if nsp_in_r else None),
                                    self.alum, pad_mask=src.ne(self.padding_idx), generator=gen)
            loss = loss + self.alum.alpha * r * n  # Eq. 3, scaled like the summed MLM loss (0 if R non-finite)
            adv = m["adv"]
            diag = m

        logging_output = {
            "loss": loss.data,
            "mlm_loss": mlm_loss.data,
            "adv": (adv * n).data,  # summed over micro-batches, divided by sample_size in reduce_metrics
            "alum_n": int(alum_on),
            "alum_on": int(alum_on) * sample["nsentences"],
            "masked": sample_size.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["nsentences"],
            "sample_size": sample_size,
        }
        if alum_on:
            logging_output["ascent_nonfinite"] = diag["ascent_nonfinite"].data
            logging_output["adv_nonfinite"] = diag["adv_nonfinite"].data
            logging_output["ascent_zero_grad_frac"] = diag["ascent_zero_grad_frac"].data
            if "adv_dropout" in diag:
                logging_output["adv_dropout"] = (diag["adv_dropout"] * n).data
        if "mask_rate" in sample:  # set by the alum_masked_lm task (absent with --task masked_lm)
            logging_output["mask_rate"] = float(sample["mask_rate"]) * sample["nsentences"]
            logging_output["mask_rate_n"] = sample["nsentences"]
            logging_output["maskable"] = int(sample["n_maskable"])
        if use_nsp:
            logging_output["nsp_loss"] = nsp_loss.data
            logging_output["nsp_correct"] = nsp_correct.data
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
