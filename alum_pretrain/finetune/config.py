"""The typed configuration of ``alum-finetune`` (sections ``model``, ``data``, ``optim``, ``run`` and one
per method).  Every field has a default and a help text; ``alum-finetune --help`` lists them all."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import opt, section
from .methods import METHOD_NAMES
from .methods.embedding_adv import FreeATConfig, FreeLBConfig, PGDConfig
from .methods.rift import RIFTConfig
from .methods.smart import SmartConfig
from .metrics import METRICS
from .tasks import TASK_NAMES, TaskSpec, get_task


PRECISIONS = ("fp32", "bf16", "fp16")


def amp_dtype(precision: str):
    """``fp32`` -> None (no autocast), ``bf16`` -> torch.bfloat16, ``fp16`` -> torch.float16."""
    import torch

    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _dropout(name: str, v: Optional[float]) -> None:
    if v is not None and not 0.0 <= v < 1.0:
        raise ValueError(f"--model.{name}={v} must be in [0, 1) (or none to keep the checkpoint's value)")


@dataclass
class ModelConfig:
    """Model: a HuggingFace checkpoint folder (alum-export output, bert-*, roberta-*, MiniLM ...)."""

    path: str = opt("", "HF checkpoint folder with config.json, weights and tokenizer files (required); "
                        "shorthand --model")
    tokenizer: str = opt("", "tokenizer folder if not inside --model.path")
    hidden_dropout: Optional[float] = opt(None, "hidden dropout for this task (config hidden_dropout_prob); "
                                                "none = keep the checkpoint's")
    attention_dropout: Optional[float] = opt(None, "attention-probability dropout (attention_probs_dropout_prob)")
    classifier_dropout: Optional[float] = opt(None, "dropout before the classification head (classifier_dropout)")

    def __post_init__(self) -> None:
        for n in ("hidden_dropout", "attention_dropout", "classifier_dropout"):
            _dropout(n, getattr(self, n))


DATA_FORMATS = ("auto", "tsv", "jsonl")


@dataclass
class TaskDataConfig:
    """The task and how its files are read (format, field names, labels, length), shared by fine-tuning
    (:class:`DataConfig`) and robustness evaluation (``robust.RDataConfig``); each adds its files and
    limits after these fields."""

    task: str = opt("sst2", f"task: {', '.join(TASK_NAMES)} (custom: give the fields and labels); shorthand --task")
    format: str = opt("auto", "file format: auto (.jsonl/.json = JSON lines, else TSV), tsv, jsonl")
    text_a_field: str = opt("", "column/field of the first text (default: the task's, e.g. 'sentence')")
    text_b_field: str = opt("", "column/field of the second text for pair tasks")
    label_field: str = opt("", "column/field of the label")
    labels: list[str] = opt([], "class names in class-id order (custom tasks; overrides the task's)")
    max_length: int = opt(128, "maximum tokens per example (longer inputs are truncated)")

    def __post_init__(self) -> None:
        if self.format not in DATA_FORMATS:
            raise ValueError(f"--data.format={self.format!r} must be auto, tsv or jsonl")
        if self.max_length < 8:
            raise ValueError(f"--data.max_length={self.max_length} must be >= 8")

    def task_spec(self, **extra) -> TaskSpec:
        """The :class:`TaskSpec` of ``task`` with the field and label overrides (``extra``: more of
        :func:`get_task`'s keywords, e.g. ``regression``, ``metric``)."""
        return get_task(self.task, text_a=self.text_a_field, text_b=self.text_b_field, label=self.label_field,
                        labels=tuple(self.labels), **extra)


@dataclass
class DataConfig(TaskDataConfig):
    """Data: a GLUE task (TSV layouts) or any TSV/JSONL file with named fields."""

    train: str = opt("", "training file (TSV or .jsonl); shorthand --train")
    dev: str = opt("", "dev file evaluated after every epoch (selects the best checkpoint); shorthand --dev")
    test: str = opt("", "optional file to predict with the best checkpoint at the end (labels not needed)")
    regression: bool = opt(False, "custom task is a regression (one float target)")
    metric: str = opt("", f"main metric for best-checkpoint selection: {', '.join(METRICS)} (default: the task's)")
    max_train_examples: int = opt(0, "use only the first N training examples (0 = all)")
    max_dev_examples: int = opt(0, "use only the first N dev examples (0 = all)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.metric and self.metric not in METRICS:
            raise ValueError(f"--data.metric={self.metric!r} must be one of {', '.join(METRICS)}")
        if self.max_train_examples < 0 or self.max_dev_examples < 0:
            raise ValueError("--data.max_train_examples/--data.max_dev_examples must be >= 0")

    def task_spec(self, **extra) -> TaskSpec:
        """The task with the field/label overrides, ``regression`` and ``metric`` of this section."""
        return super().task_spec(regression=self.regression, metric=self.metric, **extra)


@dataclass
class OptimConfig:
    """Optimisation: AdamW with linear warm-up then linear decay to 0."""

    lr: float = opt(2e-5, "peak learning rate")
    weight_decay: float = opt(0.01, "AdamW weight decay (not on biases and LayerNorm weights)")
    betas: tuple[float, float] = opt((0.9, 0.999), "AdamW betas")
    eps: float = opt(1e-6, "AdamW epsilon")
    warmup_ratio: float = opt(0.06, "fraction of the optimizer steps spent warming up linearly")
    grad_clip: float = opt(1.0, "clip the global gradient norm (0 = off)")
    batch_size: int = opt(32, "examples per minibatch (per process under torchrun)")
    eval_batch_size: int = opt(64, "examples per evaluation batch")
    epochs: int = opt(3, "training epochs")

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"--optim.lr={self.lr} must be > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"--optim.warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("--optim.batch_size and --optim.eval_batch_size must be >= 1")
        if self.epochs < 1:
            raise ValueError(f"--optim.epochs={self.epochs} must be >= 1")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("--optim.grad_clip and --optim.weight_decay must be >= 0")


@dataclass
class RunConfig:
    """Run: method, output folder, seed, resume, device."""

    method: str = opt("plain", f"fine-tuning method: {', '.join(METHOD_NAMES)}; shorthand --method")
    out: str = opt("", "output folder: best/ (HF model), predictions, results.json, checkpoint.pt (required); "
                       "shorthand --out")
    seed: int = opt(42, "random seed (data order, head init, perturbation starts, dropout)")
    resume: str = opt("auto", "auto: continue from OUT/checkpoint.pt if present; never: start over")
    device: str = opt("auto", "auto (cuda if available), cpu or cuda")
    predictions_format: str = opt("tsv", "format of the prediction files: tsv or jsonl")
    log_every: int = opt(50, "log training metrics every N minibatches")
    progress: bool = opt(True, "show tqdm progress bars")
    stop_after_epochs: int = opt(0, "leave after this many epochs in this invocation (0 = run to the end); "
                                    "the next invocation with the same --out resumes (time-limited jobs)")
    max_nonfinite: int = opt(5, "stop (exit code 3) after this many consecutive updates whose gradient norm "
                                "is NaN/Inf; such updates are skipped (no optimizer or LR-schedule step)")
    trust_checkpoint: bool = opt(False, "resume an OUT/checkpoint.pt that needs the full unpickler (written "
                                        "before weights_only-safe checkpoints); unpickling can run code")
    precision: str = opt("fp32", "fp32, or bf16/fp16 autocast (A100/H100: bf16; V100: fp16, which adds a "
                                 "dynamic GradScaler); float32 weights either way, so the 1e-5 perturbations "
                                 "of SMART/ALUM survive")

    def __post_init__(self) -> None:
        if self.method not in METHOD_NAMES:
            raise ValueError(f"--run.method={self.method!r} must be one of {', '.join(METHOD_NAMES)}")
        if self.resume not in ("auto", "never"):
            raise ValueError(f"--run.resume={self.resume!r} must be auto or never")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--run.device={self.device!r} must be auto, cpu or cuda")
        if self.predictions_format not in ("tsv", "jsonl"):
            raise ValueError(f"--run.predictions_format={self.predictions_format!r} must be tsv or jsonl")
        if self.stop_after_epochs < 0:
            raise ValueError("--run.stop_after_epochs must be >= 0")
        if self.log_every < 1:
            raise ValueError("--run.log_every must be >= 1")
        if not isinstance(self.max_nonfinite, int) or self.max_nonfinite < 1:
            raise ValueError(f"--run.max_nonfinite={self.max_nonfinite!r} must be an integer >= 1")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--run.precision={self.precision!r} must be one of {', '.join(PRECISIONS)}")


@dataclass
class FinetuneConfig:
    model: ModelConfig = section(ModelConfig)
    data: DataConfig = section(DataConfig)
    optim: OptimConfig = section(OptimConfig)
    run: RunConfig = section(RunConfig)
    smart: SmartConfig = section(SmartConfig)
    freelb: FreeLBConfig = section(FreeLBConfig)
    pgd: PGDConfig = section(PGDConfig)
    freeat: FreeATConfig = section(FreeATConfig)
    rift: RIFTConfig = section(RIFTConfig)

    def validate_required(self) -> None:
        missing = [f for f, v in (("--model", self.model.path), ("--train", self.data.train),
                                  ("--dev", self.data.dev), ("--out", self.run.out)) if not v]
        if missing:
            raise ValueError(f"missing required option(s): {', '.join(missing)} (see --help)")


ALIASES = {"--model": "model.path", "--task": "data.task", "--train": "data.train", "--dev": "data.dev",
           "--test": "data.test", "--method": "run.method", "--out": "run.out", "--seed": "run.seed"}
