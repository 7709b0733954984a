"""The typed configuration of ``alum-train``: one dataclass per section, validated in ``__post_init__``.

Sections and keys (``alum-train --help`` lists every key with its default)::

    data.*      the data-bin and how sequences are built (pairs + NSP, or packed blocks)
    model.*     a size preset (from scratch) or an HF folder to continue from
    masking.*   :class:`alum_pretrain.masking.MaskingConfig` (curriculum 5 % -> 25 %, 80/10/10)
    alum.*      :class:`alum_pretrain.adversarial.ALUMConfig` (alpha, epsilon, step_size, ...)
    optim.*     AdamW (or LAMB under DeepSpeed on CUDA) + linear warm-up / linear decay + gradient clipping
    train.*     steps, batch, precision, engine (ddp | deepspeed), logging / evaluation / checkpoint cadence
    deepspeed.* ZeRO stage and offload when train.engine=deepspeed (see alum_pretrain.engine.deepspeed_engine)

Result-changing vs speed-only: :data:`SPEED_ONLY` names the keys that may differ when a
run resumes from a checkpoint (workers, compile, logging cadence, ...); every other key changes the
numbers and a mismatch on resume is an error naming the key, except the keys of
:data:`RESUME_OVERRIDABLE` (the learning rate, the number of steps) named explicitly in
``--train.resume_override``, which the resumed run applies and records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..adversarial import ALUMConfig
from ..config import opt, section
from ..families import check_model_choice
from ..masking import MaskingConfig


def _bad(key: str, value, why: str) -> ValueError:
    return ValueError(f"--{key}={value!r}: {why}")


@dataclass
class DataConfig:
    """The prepared corpus (a data-bin written by alum-prep) and how training sequences are built."""

    path: str = opt("", "data-bin folder written by `alum-prep` (manifest.json, tokenizer/, shardK/)")
    mode: Literal["pairs", "blocks"] = opt(
        "pairs", "pairs: BERT-style [CLS] A [SEP] B [SEP] segment pairs; blocks: RoBERTa-style packed "
        "MLM-only blocks")
    nsp: bool = opt(True, "next-sentence prediction (50 % true next segment, 50 % random); needs mode=pairs")
    max_seq_len: int = opt(128, "maximum sequence length in tokens, specials included (BERT phase 1: 128)")
    shard_mode: Literal["per_epoch", "interleave"] = opt(
        "per_epoch", "per_epoch: one shard per epoch (fairseq's DATA=shard0:shard1); interleave: all shards "
        "mixed every epoch")
    group_by_length: bool = opt(
        False, "mode=pairs: batch pairs of similar length together (a window of 64 global batches sorted by "
        "length, batch order shuffled; same samples per epoch, same resume) and pad each batch to its longest "
        "pair (multiple of 8) instead of max_seq_len (WikiText-2, seq 128: 4.2 % -> 1.1 % padding; seq 512: "
        "11.4 % -> 1.3 %); off by default: it changes the data order of a run")
    valid_split: str = opt("valid", "split used for the periodic validation MLM loss/accuracy")
    verify: Literal["size", "full"] = opt(
        "size", "data-bin check before training: size = every shard file has the byte count manifest.json "
        "records (instant); full = also its SHA-256 (reads the whole corpus once; catches bit flips)")

    def __post_init__(self) -> None:
        if self.nsp and self.mode != "pairs":
            raise _bad("data.nsp", self.nsp, "NSP needs --data.mode=pairs (set --data.nsp=false for blocks)")
        if self.max_seq_len < 8:
            raise _bad("data.max_seq_len", self.max_seq_len, "must be >= 8")


@dataclass
class ModelConfig:
    """Which model: a size preset trained from scratch, or an HF checkpoint folder (continual pre-training)."""

    preset: str = opt("base", "size preset for training from scratch: BERT tiny, mini, small, base, large; "
                              "modernbert-tiny, modernbert-base, deberta-tiny, deberta-base (MLM only: "
                              "--data.nsp=false); ignored when --model.init_from is set")
    init_from: str = opt("", "HF model folder to continue pre-training from ('' = from scratch with the "
                             "corpus vocabulary)")
    dropout: float = opt(-1.0, "override hidden and attention dropout (-1 = the preset's / checkpoint's value)")
    trust_remote_code: bool = opt(False, "allow a --model.init_from folder whose config.json maps to modelling "
                                         "code shipped in the folder (runs that code)")

    def __post_init__(self) -> None:
        if not (self.dropout == -1.0 or 0.0 <= self.dropout < 1.0):
            raise _bad("model.dropout", self.dropout, "must be -1 (keep) or in [0, 1)")


@dataclass
class OptimConfig:
    """AdamW with a linear warm-up then linear decay to 0 (the paper: peak 1e-4, 1 % warm-up)."""

    lr: float = opt(1e-4, "peak learning rate (paper: 1e-4 from scratch, 4e-5 continual)")
    weight_decay: float = opt(0.01, "AdamW decoupled weight decay (not applied to biases and LayerNorm weights)")
    warmup_ratio: float = opt(0.01, "fraction of train.max_steps with a linear warm-up from 0 to optim.lr")
    grad_clip: float = opt(1.0, "clip the global gradient L2 norm to this value (0 = no clipping)")
    betas: tuple[float, float] = opt((0.9, 0.999), "AdamW betas")
    eps: float = opt(1e-6, "AdamW epsilon (BERT: 1e-6)")
    name: Literal["adamw", "lamb"] = opt(
        "adamw", "optimizer: adamw (torch AdamW; DeepSpeed's FusedAdam under --train.engine=deepspeed on CUDA) "
                 "or lamb (DeepSpeed's FusedLamb: needs --train.engine=deepspeed on a CUDA device)")
    fresh_lr_mult: float = opt(1.0, "LR multiplier for tensors freshly initialised when loading model.init_from (e.g. "
                                    "the new MLM head of a checkpoint that has none): a random head needs far larger "
                                    "steps than the pre-trained body; 1 = one LR for all")

    def __post_init__(self) -> None:
        if self.name not in ("adamw", "lamb"):
            raise _bad("optim.name", self.name, "must be adamw or lamb")
        if not self.lr > 0:
            raise _bad("optim.lr", self.lr, "must be > 0")
        if self.weight_decay < 0:
            raise _bad("optim.weight_decay", self.weight_decay, "must be >= 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise _bad("optim.warmup_ratio", self.warmup_ratio, "must be in [0, 1)")
        if self.grad_clip < 0:
            raise _bad("optim.grad_clip", self.grad_clip, "must be >= 0 (0 = off)")
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise _bad("optim.betas", list(self.betas), "needs two numbers in [0, 1)")
        if not self.eps > 0:
            raise _bad("optim.eps", self.eps, "must be > 0")
        if not self.fresh_lr_mult > 0:
            raise _bad("optim.fresh_lr_mult", self.fresh_lr_mult, "must be > 0 (1 = the same LR as the rest)")


@dataclass
class LoopConfig:
    """Steps, batch, precision, devices and the cadence of logging, validation and checkpoints."""

    output_dir: str = opt("runs/alum", "run folder: config.yaml, log.jsonl, tb/, checkpoints/step-N/, plot.png, "
                                       "COMPLETED; an existing run there is resumed automatically")
    max_steps: int = opt(1000, "number of optimizer steps (the paper: 1,000,000 for BERT-base)")
    batch_size: int = opt(32, "sequences per process per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step (ignored when train.global_batch_size > 0)")
    global_batch_size: int = opt(0, "sequences per optimizer step over all processes (0 = batch_size x "
                                    "grad_accum x world size); when set, grad_accum = global / (batch_size "
                                    "x world size) and must divide exactly (the paper: 256)")
    precision: Literal["fp32", "bf16", "fp16"] = opt(
        "fp32", "fp32, or bf16/fp16 autocast (fp16 adds a dynamic GradScaler); float32 weights either way")
    seed: int = opt(1, "seed of the model init, data order, masking and ALUM noise")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "auto = cuda when available, else cpu")
    log_every: int = opt(10, "log (console, log.jsonl, TensorBoard) every N optimizer steps")
    eval_every: int = opt(500, "validation MLM loss/accuracy every N steps (0 = only at the end)")
    eval_batches: int = opt(20, "validation batches per evaluation (per process); 0 = no validation")
    smooth_every: int = opt(0, "also measure the eval-mode smoothness ALUM optimises (alum-smoothness: worst-case "
                               "vs random SymKL at masked positions in an epsilon-ball of the embeddings, dropout "
                               "off) at every N-th evaluation and the last one (0 = never); log keys "
                               "smooth_adv_kl_eps..., smooth_ratio_eps..., smooth_entropy")
    smooth_eps: str = opt("1e-5", "comma-separated epsilons of the smoothness measurement (L-inf per-token ball)")
    smooth_eps_mode: Literal["abs", "rel"] = opt("abs", "smoothness epsilon in embedding units (abs) or relative "
                                                        "to each token's embedding RMS (rel)")
    smooth_batches: int = opt(2, "validation batches (per process) of each smoothness measurement")
    save_every: int = opt(1000, "checkpoint every N steps (0 = only at the end and on SIGTERM/SIGUSR1)")
    keep_last: int = opt(3, "keep the newest K checkpoints (older ones are deleted)")
    num_workers: int = opt(-1, "DataLoader worker processes per rank (speed only); -1 = auto: 2 on CUDA (batches "
                               "are built while the GPU computes), 0 on CPU")
    compile: bool = opt(False, "torch.compile the transformer encoder (speed only)")
    progress: bool = opt(True, "tqdm progress bar on rank 0")
    engine: Literal["ddp", "deepspeed"] = opt(
        "ddp", "ddp: torch DistributedDataParallel (every rank holds the full fp32 AdamW state); deepspeed: "
               "DeepSpeed ZeRO (--deepspeed.zero_stage shards optimizer state / gradients / parameters; needs "
               "the [deepspeed] extra)")
    max_nonfinite: int = opt(5, "stop (exit code 3) after this many consecutive steps whose loss or gradient "
                                "norm is NaN/Inf; such steps are skipped: no optimizer or LR-schedule update "
                                "(fp16 loss-scale overflows with a finite loss are the GradScaler's and do not count)")
    trust_checkpoint: bool = opt(False, "resume checkpoints whose train_state.pt needs the full unpickler "
                                        "(written by versions before weights_only-safe states); only for "
                                        "checkpoints you wrote yourself: unpickling can run code")
    resume_from: str = opt("", "resume from this checkpoint (a RUN/checkpoints/step-N folder, or N) instead of "
                               "the newest, e.g. the one before a divergence; newer checkpoints are renamed "
                               "checkpoints/abandoned-step-N (kept, never resumed from)")
    resume_override: str = opt("", "result-changing keys this resume may change, space- or comma-separated: "
                                    "optim.lr (e.g. lower it after a divergence: the schedule keeps its shape, "
                                    "scaled to the new peak) and train.max_steps (the LR schedule and masking "
                                    "curriculum are re-planned for the new length); recorded in log.jsonl and "
                                    "the model card")

    def __post_init__(self) -> None:
        if self.engine not in ("ddp", "deepspeed"):
            raise _bad("train.engine", self.engine, "must be ddp or deepspeed")
        for key in ("max_steps", "batch_size", "grad_accum", "log_every", "keep_last", "max_nonfinite"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise _bad(f"train.{key}", v, "must be an integer >= 1")
        if not isinstance(self.num_workers, int) or isinstance(self.num_workers, bool) or self.num_workers < -1:
            raise _bad("train.num_workers", self.num_workers, "must be an integer >= 0, or -1 (auto)")
        for key in ("global_batch_size", "eval_every", "eval_batches", "save_every", "seed", "smooth_every",
                    "smooth_batches"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise _bad(f"train.{key}", v, "must be an integer >= 0")
        if not self.output_dir:
            raise _bad("train.output_dir", self.output_dir, "must name a folder")
        for key in resume_overrides(self):
            if key not in RESUME_OVERRIDABLE:
                raise _bad("train.resume_override", self.resume_override,
                           f"{key} cannot be overridden on resume (allowed: {', '.join(RESUME_OVERRIDABLE)})")
        try:
            eps = [float(x) for x in str(self.smooth_eps).split(",") if x.strip()]
        except ValueError:
            eps = []
        if not eps or any(not (e > 0 and e < float("inf")) for e in eps):
            raise _bad("train.smooth_eps", self.smooth_eps, "must be comma-separated positive numbers, e.g. 1e-5,1e-3")
        if self.smooth_eps_mode not in ("abs", "rel"):
            raise _bad("train.smooth_eps_mode", self.smooth_eps_mode, "must be abs or rel")


@dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO settings (used only with --train.engine=deepspeed; precision, batch, clipping, LR
    schedule and optimizer come from the train.* and optim.* keys, exactly as for DDP)."""

    zero_stage: int = opt(2, "ZeRO stage: 0 = plain data parallel, 1 = shard optimizer state, 2 = + gradients, "
                             "3 = + parameters")
    offload_optimizer: Literal["none", "cpu"] = opt(
        "none", "cpu: keep the optimizer state (and its step) in host memory (ZeRO-Offload; stage >= 1)")
    offload_param: Literal["none", "cpu"] = opt("none", "cpu: keep the parameters in host memory (stage 3 only)")
    reduce_bucket_size: int = opt(50_000_000, "elements per gradient reduce bucket (speed/memory only)")
    allgather_bucket_size: int = opt(50_000_000, "elements per parameter all-gather bucket, stages 1-2 "
                                                 "(speed/memory only)")
    param_persistence_threshold: int = opt(
        100_000, "ZeRO-3: parameters with fewer elements stay whole on every rank instead of being partitioned "
                 "(speed/memory only; 0 = partition everything)")

    def __post_init__(self) -> None:
        if isinstance(self.zero_stage, bool) or self.zero_stage not in (0, 1, 2, 3):
            raise _bad("deepspeed.zero_stage", self.zero_stage, "must be 0, 1, 2 or 3")
        if self.offload_optimizer not in ("none", "cpu"):
            raise _bad("deepspeed.offload_optimizer", self.offload_optimizer, "must be none or cpu")
        if self.offload_param not in ("none", "cpu"):
            raise _bad("deepspeed.offload_param", self.offload_param, "must be none or cpu")
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise _bad("deepspeed.offload_optimizer", self.offload_optimizer,
                       "optimizer offload needs --deepspeed.zero_stage >= 1")
        if self.offload_param != "none" and self.zero_stage != 3:
            raise _bad("deepspeed.offload_param", self.offload_param,
                       "parameter offload needs --deepspeed.zero_stage=3")
        for key in ("reduce_bucket_size", "allgather_bucket_size"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise _bad(f"deepspeed.{key}", v, "must be an integer >= 1")
        v = self.param_persistence_threshold
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise _bad("deepspeed.param_persistence_threshold", v, "must be an integer >= 0")


@dataclass
class TrainConfig:
    """alum-train: MLM (+NSP) pre-training with ALUM under the masking-rate curriculum."""

    data: DataConfig = section(DataConfig)
    model: ModelConfig = section(ModelConfig)
    masking: MaskingConfig = section(MaskingConfig)
    alum: ALUMConfig = section(ALUMConfig)
    optim: OptimConfig = section(OptimConfig)
    train: LoopConfig = section(LoopConfig)
    deepspeed: DeepSpeedConfig = section(DeepSpeedConfig)

    def __post_init__(self) -> None:  # what the model family cannot do, before anything runs
        check_model_choice(preset=self.model.preset, init_from=self.model.init_from, nsp=self.data.nsp,
                           trust_remote_code=self.model.trust_remote_code)


# Result-changing keys a user may change on resume, only when named in --train.resume_override.
RESUME_OVERRIDABLE = ("optim.lr", "train.max_steps")


def resume_overrides(cfg: LoopConfig) -> list[str]:
    """The keys named in ``--train.resume_override`` (space- or comma-separated)."""
    return [k for k in str(cfg.resume_override or "").replace(",", " ").split() if k]


# Keys that only change speed or bookkeeping, never the trained weights: they may differ on resume.
SPEED_ONLY = (
    "train.resume_override",
    "train.resume_from",
    "train.output_dir",
    "train.num_workers",
    "train.compile",
    "train.progress",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    # The smoothness measurement uses its own generators and restores the model's mode: no training number changes.
    "train.smooth_every",
    "train.smooth_eps",
    "train.smooth_eps_mode",
    "train.smooth_batches",
    "train.save_every",
    "train.keep_last",
    "train.device",
    "data.valid_split",
    "deepspeed.reduce_bucket_size",
    "deepspeed.allgather_bucket_size",
    "deepspeed.param_persistence_threshold",
    "data.verify",
    "train.max_nonfinite",
    "train.trust_checkpoint",
    "model.trust_remote_code",
    # How the global batch is split into micro-batches does not change the math (per-sample masking
    # and global loss normalisation, see engine/step.py); the resolved global batch is compared instead.
    "train.batch_size",
    "train.grad_accum",
    "train.global_batch_size",
    # The adv_dropout baseline pass runs under a forked RNG: it changes no training number.
    "alum.log_baseline",
)


def resolve_grad_accum(cfg: LoopConfig, world_size: int) -> tuple[int, int]:
    """``(grad_accum, global_batch)`` for this world size; ValueError naming the flags if it cannot divide."""
    if cfg.global_batch_size > 0:
        per_step = cfg.batch_size * world_size
        if cfg.global_batch_size % per_step != 0:
            raise ValueError(
                f"--train.global_batch_size={cfg.global_batch_size} is not a multiple of --train.batch_size="
                f"{cfg.batch_size} x world size {world_size} = {per_step}; change --train.global_batch_size "
                "or --train.batch_size (or the number of processes)")
        return cfg.global_batch_size // per_step, cfg.global_batch_size
    return cfg.grad_accum, cfg.batch_size * cfg.grad_accum * world_size
