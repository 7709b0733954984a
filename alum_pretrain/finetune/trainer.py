"""The ``alum-finetune`` training loop: load -> per epoch (train, evaluate, keep the best) -> predict.

Reads top to bottom: :func:`finetune` builds the model, data, optimizer/schedule and the method, then
loops over epochs calling ``method.train_step`` per minibatch; after each epoch it evaluates the dev set
with the task metric, saves the best model (an HF folder under ``OUT/best``) and its dev predictions,
and writes a resumable checkpoint (``OUT/checkpoint.pt``: model, optimizer, scheduler, method state,
RNG states, epoch, history, the SHA-256 of the training and dev files: a resume refuses other settings or
changed data, :func:`check_same_settings`).  Multi-process (``torchrun``): each process trains on its shard of every
epoch and gradients are averaged by ``TrainContext.optimizer_step``; rank 0 evaluates and writes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from pathlib import Path
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler
from tqdm.auto import tqdm

from ..atomic import atomic_dir, atomic_file, write_text
from ..compat import bad_value, check_alum, check_positions
from ..config import config_to_dict
from .config import FinetuneConfig, amp_dtype
from .data import (EncodedDataset, Example, check_same_data, collate, data_fingerprints, encode, read_examples,
                   substitution_candidates)
from ..integrity import (IntegrityError, first_nonfinite, previous_path, safe_torch_load, torch_save_verified,
                         verify_file)
from .methods import Method, TrainContext, build_method
from .methods.base import NonFiniteError
from .metrics import compute_metrics
from .tasks import TaskSpec

log = logging.getLogger("alum_pretrain.finetune")


# -------------------------------------------------------------------------------------------------
# building blocks
# -------------------------------------------------------------------------------------------------

def load_model(path: str, spec: TaskSpec, *, hidden_dropout=None, attention_dropout=None,
               classifier_dropout=None, device="cpu"):
    """An ``AutoModelForSequenceClassification`` for ``spec`` from an HF folder (a fresh head if needed)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    p = Path(path)
    if not (p / "config.json").is_file():
        raise ValueError(f"--model {p}: no config.json (expected a HuggingFace checkpoint folder, "
                         "e.g. the output of alum-export)")
    config = AutoConfig.from_pretrained(p)
    same_head = getattr(config, "num_labels", None) == spec.num_labels
    config.num_labels = spec.num_labels
    config.problem_type = "regression" if spec.is_regression else "single_label_classification"
    if not spec.is_regression:
        config.id2label = dict(enumerate(spec.labels))
        config.label2id = {l: i for i, l in enumerate(spec.labels)}
    for flag, attr, value in (("hidden_dropout", "hidden_dropout_prob", hidden_dropout),
                              ("attention_dropout", "attention_probs_dropout_prob", attention_dropout),
                              ("classifier_dropout", "classifier_dropout", classifier_dropout)):
        if value is not None:
            if not hasattr(config, attr):
                raise ValueError(f"--model.{flag}: model type {config.model_type} has no {attr}")
            setattr(config, attr, value)
    model = AutoModelForSequenceClassification.from_pretrained(
        p, config=config, ignore_mismatched_sizes=not same_head)
    model = model.float()  # float32 master weights: transformers loads a 16-bit checkpoint in its own dtype
    return model.to(device)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def make_optimizer(model, extra_modules, cfg) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    named = list(model.named_parameters()) + [(n, p) for m in extra_modules for n, p in m.named_parameters()]
    for n, p in named:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in n or "layer_norm" in n else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def linear_schedule(optimizer, warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


def encode_split(tokenizer, examples: list[Example], cfg: FinetuneConfig, method: Optional[Method],
                 synonyms=None):
    enc = encode(tokenizer, examples, cfg.data.max_length)
    if method is not None and getattr(method, "needs_substitutions", False):
        enc.subs = substitution_candidates(tokenizer, examples, enc, synonyms, cfg.rift.max_candidates,
                                           cfg.rift.substitute_in)
    return enc


@torch.no_grad()
def predict(model, enc, spec: TaskSpec, batch_size: int, device, pad_id: int, progress=False) -> np.ndarray:
    """Logits (N, C) of ``enc`` in eval mode (original order)."""
    model.eval()
    ds = EncodedDataset(enc)
    loader = DataLoader(ds, batch_size=batch_size, sampler=SequentialSampler(ds),
                        collate_fn=lambda items: collate(items, pad_id, spec.is_regression))
    out = []
    for batch in tqdm(loader, desc="eval", disable=not progress, leave=False):
        batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        kwargs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        if int(getattr(model.config, "type_vocab_size", 0) or 0) > 1:
            kwargs["token_type_ids"] = batch["token_type_ids"]
        out.append(model(**kwargs).logits.float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, spec.num_labels))


def predictions_from_logits(logits: np.ndarray, spec: TaskSpec) -> np.ndarray:
    return logits[:, 0] if spec.is_regression else logits.argmax(-1)


def evaluate(model, enc, spec: TaskSpec, batch_size: int, device, pad_id: int, progress=False):
    logits = predict(model, enc, spec, batch_size, device, pad_id, progress)
    preds = predictions_from_logits(logits, spec)
    metrics = compute_metrics((spec.metric,) + tuple(m for m in spec.extra_metrics if m != spec.metric),
                              preds, np.asarray(enc.labels))
    return metrics, logits


def write_predictions(path: Path, examples: list[Example], logits: np.ndarray, spec: TaskSpec, fmt: str) -> None:
    """``line  prediction  [label]`` (TSV) or JSON lines with probabilities; written atomically."""
    preds = predictions_from_logits(logits, spec)
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        if fmt == "tsv":
            fh.write("line\tprediction\tlabel\n")
        for ex, lg, pr in zip(examples, logits, preds):
            pred = float(pr) if spec.is_regression else spec.labels[int(pr)]
            gold = "" if ex.label is None else (float(ex.label) if spec.is_regression else spec.labels[ex.label])
            if fmt == "tsv":
                fh.write(f"{ex.line}\t{pred}\t{gold}\n")
            else:
                rec = {"line": ex.line, "prediction": pred, "label": gold if ex.label is not None else None}
                if not spec.is_regression:
                    rec["probs"] = [round(float(x), 6) for x in torch.softmax(torch.from_numpy(lg), -1)]
                fh.write(json.dumps(rec) + "\n")


def save_hf(model, tokenizer, out: Path) -> None:
    """An HF folder written to a temp name and renamed (a crash never leaves a half-written best/)."""
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _rng_state() -> dict:
    # tensors and plain types only (numpy's key array as a tensor): checkpoint.pt loads with weights_only=True
    from ..engine.checkpoint import rng_state

    return rng_state()


def _set_rng_state(st: dict) -> None:
    from ..engine.checkpoint import set_rng_state

    set_rng_state(st)


def _atomic_torch_save(obj, path: Path) -> None:
    """Temp name + fsync + size/CRC-32 sidecar (``checkpoint.pt.json``); the previous file is kept as
    ``checkpoint.prev.pt`` until the next save, as the fallback when this one turns out damaged."""
    torch_save_verified(obj, path)


def load_resume_state(path: Path, device, trust: bool = False) -> Optional[dict]:
    """The newest intact of ``checkpoint.pt`` / ``checkpoint.prev.pt`` (verified: size, checksum, safe
    unpickling, finite weights), warning with the file and reason for a damaged one; None when neither
    exists, ValueError naming both when neither is usable."""
    problems = []
    for cand in (path, previous_path(path)):
        if not cand.is_file():
            continue
        try:
            verify_file(cand)
            state = safe_torch_load(cand, map_location=device, trust=trust, what="fine-tuning checkpoint",
                                    trust_flag="--run.trust_checkpoint=true")
            if not isinstance(state, dict) or "model" not in state:
                raise IntegrityError(f"{cand}: not an alum-finetune checkpoint (no 'model')")
            bad = first_nonfinite(state["model"])
            if bad is not None:
                raise IntegrityError(f"{cand}: weight {bad} holds NaN/Inf")
            return state
        except IntegrityError as e:
            problems.append(str(e))
            log.warning("checkpoint %s is unusable: %s; trying the previous one", cand, e)
    if problems:
        raise ValueError("no intact fine-tuning checkpoint to resume from:\n  " + "\n  ".join(problems)
                         + "\nremove them (or pass --run.resume=never) to start over")
    return None


def _setup_distributed(device_pref: str) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise ValueError("--run.device=cuda but no CUDA device is available")
    if world > 1 and not dist.is_initialized():
        # collectives (and the barrier after each epoch) fail after 30 min instead of waiting forever on a dead rank
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30))
    rank = dist.get_rank() if dist.is_initialized() else 0
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        torch.set_float32_matmul_precision("high")  # TF32 tensor cores for fp32 matmuls (sm_80+; no-op on V100)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -------------------------------------------------------------------------------------------------
# the run: its parts, built once
# -------------------------------------------------------------------------------------------------

@dataclass
class _Job:
    """What every epoch of one fine-tuning run uses (built by :func:`_build_job`)."""

    cfg: FinetuneConfig
    rank: int
    world: int
    device: torch.device
    out: Path
    show: bool                      # progress bars (rank 0 only)
    spec: TaskSpec
    tokenizer: Any
    pad_id: int
    model: Any
    method: Method
    dev_ex: list[Example]
    dev_enc: Any
    sampler: Any                    # DistributedSampler, or a RandomSampler with its own generator
    loader: DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ctx: TrainContext
    amp: Optional[torch.dtype]      # autocast dtype; None = fp32

    @property
    def ckpt_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def autocast(self):
        """Mixed precision: autocast around each update and evaluation (float32 weights)."""
        return torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None)


class Inputs(NamedTuple):
    """What :func:`check_finetune_inputs` read and checked before the output folder is touched."""

    spec: TaskSpec
    tokenizer: Any
    train_ex: list[Example]
    dev_ex: list[Example]


def check_finetune_inputs(cfg: FinetuneConfig) -> Inputs:
    """Every value checked against the model and the data before ``--out`` is created or touched.

    ``--data.max_length`` against the model's position table, the tokenizer's vocabulary against the model's
    embedding rows, the training and dev files (readable, at least one example: a dev metric over no example
    would select the best checkpoint from nothing), and the SMART/ALUM knobs that would make its term
    meaningless (:func:`alum_pretrain.compat.check_alum`)."""
    from transformers import AutoConfig

    spec = cfg.data.task_spec()
    config = AutoConfig.from_pretrained(cfg.model.path)
    check_positions("data.max_length", cfg.data.max_length, config, f"--model {cfg.model.path}")
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    rows = getattr(config, "vocab_size", None)
    if rows is not None and len(tokenizer) > int(rows):
        flag = "model.tokenizer" if cfg.model.tokenizer else "model.path"
        raise bad_value(flag, cfg.model.tokenizer or cfg.model.path,
                        f"the tokenizer has {len(tokenizer)} tokens but the model {cfg.model.path} embeds only "
                        f"{rows}: higher ids would index past its embedding table",
                        "use the tokenizer the model was trained with")
    train_ex = read_examples(cfg.data.train, spec, fmt=cfg.data.format, limit=cfg.data.max_train_examples)
    dev_ex = read_examples(cfg.data.dev, spec, fmt=cfg.data.format, limit=cfg.data.max_dev_examples)
    if not train_ex:
        raise bad_value("data.train", cfg.data.train, "the file holds no example", "give a training file with "
                                                                                   "labelled examples")
    if not dev_ex:
        raise bad_value("data.dev", cfg.data.dev, "the file holds no example, so the dev metric that selects the "
                                                  "best checkpoint would be computed over nothing",
                        "give a dev file with labelled examples")
    if cfg.run.method in ("smart", "alum"):
        check_alum(cfg.smart, section="smart")
    if cfg.run.method in ("freelb", "pgd", "freeat"):
        adv = getattr(cfg, cfg.run.method)
        if adv.adv_lr == 0 and adv.adv_init_mag == 0:
            raise bad_value(f"{cfg.run.method}.adv_lr", adv.adv_lr,
                            f"with --{cfg.run.method}.adv_init_mag=0 too, delta stays 0 in every ascent step, so "
                            f"{cfg.run.method} would be plain fine-tuning at {adv.adv_steps}x the cost",
                            "give a step size > 0 (or use --method plain)")
    return Inputs(spec, tokenizer, train_ex, dev_ex)


def _load_splits(cfg: FinetuneConfig, inputs: Inputs, method: Method):
    """-> (train encoding, dev examples, dev encoding); substitution candidates when the method needs them."""
    tokenizer, train_ex, dev_ex = inputs.tokenizer, inputs.train_ex, inputs.dev_ex
    synonyms = None
    if getattr(method, "needs_substitutions", False):
        from .synonyms import SynonymSource
        synonyms = SynonymSource(cfg.rift.wordnet_dir)
    train_enc = encode_split(tokenizer, train_ex, cfg, method, synonyms)
    dev_enc = encode_split(tokenizer, dev_ex, cfg, None)
    return train_enc, dev_ex, dev_enc


def _train_loader(cfg: FinetuneConfig, train_enc, spec: TaskSpec, method: Method, pad_id: int, rank: int,
                  world: int):
    """-> (sampler, loader) of the training split: this process's shard of a seeded shuffle."""
    train_ds = EncodedDataset(train_enc)
    sampler = (DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.run.seed)
               if world > 1 else RandomSampler(train_ds, generator=torch.Generator()))
    num_candidates = cfg.rift.max_candidates if getattr(method, "needs_substitutions", False) else 0
    loader = DataLoader(train_ds, batch_size=cfg.optim.batch_size, sampler=sampler,
                        collate_fn=lambda items: collate(items, pad_id, spec.is_regression, num_candidates))
    return sampler, loader


def _build_job(cfg: FinetuneConfig, inputs: Inputs) -> _Job:
    """Processes, model, method, data, optimizer and schedule, in this order (the seeded RNG stream
    depends on it: the head's initialisation, then the method's set-up)."""
    rank, world, device = _setup_distributed(cfg.run.device)
    out = Path(cfg.run.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    spec, tokenizer = inputs.spec, inputs.tokenizer
    _seed_all(cfg.run.seed)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model = load_model(cfg.model.path, spec, hidden_dropout=cfg.model.hidden_dropout,
                       attention_dropout=cfg.model.attention_dropout,
                       classifier_dropout=cfg.model.classifier_dropout, device=device)
    method = build_method(cfg.run.method, cfg, spec.is_regression)
    method.setup(model)  # before any update: RIFT's teacher is the pre-trained model

    train_enc, dev_ex, dev_enc = _load_splits(cfg, inputs, method)
    sampler, loader = _train_loader(cfg, train_enc, spec, method, pad_id, rank, world)

    steps_per_epoch = len(loader) * method.optimizer_steps_per_batch
    total_steps = steps_per_epoch * cfg.optim.epochs
    optimizer = make_optimizer(model, method.modules(), cfg.optim)
    scheduler = linear_schedule(optimizer, int(math.ceil(cfg.optim.warmup_ratio * total_steps)), total_steps)
    ctx = TrainContext(model=model, optimizer=optimizer, scheduler=scheduler, grad_clip=cfg.optim.grad_clip,
                       regression=spec.is_regression,
                       extra_params=[p for m in method.modules() for p in m.parameters()],
                       max_nonfinite=cfg.run.max_nonfinite)
    dtype = amp_dtype(cfg.run.precision)
    if dtype == torch.float16:  # fp16 needs a GradScaler (bf16 and fp32 do not)
        ctx.scaler = torch.amp.GradScaler(device.type)
    return _Job(cfg, rank, world, device, out, cfg.run.progress and rank == 0, spec, tokenizer, pad_id, model,
                method, dev_ex, dev_enc, sampler, loader, optimizer, scheduler, ctx, dtype)


# -------------------------------------------------------------------------------------------------
# the steps of the loop
# -------------------------------------------------------------------------------------------------

# Keys that change no trained number: they may differ when a run resumes from OUT/checkpoint.pt.
RESUME_FREE = ("run.out", "run.resume", "run.device", "run.predictions_format", "run.log_every", "run.progress",
               "run.stop_after_epochs", "run.max_nonfinite", "run.trust_checkpoint", "optim.eval_batch_size",
               "data.test")
_PATH_KEYS = ("model.path", "model.tokenizer", "data.train", "data.dev", "rift.wordnet_dir")


def check_same_settings(saved: dict, cfg: FinetuneConfig, ckpt_path: Path) -> None:
    """ValueError naming every result-changing key (learning rate, training file, ...) whose value differs
    from the one ``checkpoint.pt`` was written with: a resume never uses one value and records another."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    def norm(k: str, v: Any) -> Any:
        if k in _PATH_KEYS and isinstance(v, str) and v:
            return str(Path(v).resolve())
        return list(v) if isinstance(v, tuple) else v

    was, now = flat(saved), flat(json.loads(json.dumps(config_to_dict(cfg))))
    diff = sorted(k for k in set(was) | set(now)
                  if k not in RESUME_FREE and norm(k, was.get(k)) != norm(k, now.get(k)))
    if diff:
        shown = "; ".join(f"--{k} was {was.get(k)!r}, now {now.get(k)!r}" for k in diff[:5])
        raise ValueError(f"{ckpt_path}: cannot resume: {shown} ({len(diff)} result-changing setting(s) differ); "
                         "restore the original values to resume, or start over with another --out or "
                         "--run.resume=never")


def _resume(job: _Job) -> tuple[int, list, Optional[dict]]:
    """-> (first epoch to run, history, best) restored from ``OUT/checkpoint.pt`` (``resume=auto``), or a
    fresh start; ValueError when the checkpoint belongs to another method, task or model."""
    cfg, ckpt_path = job.cfg, job.ckpt_path
    state = load_resume_state(ckpt_path, job.device, cfg.run.trust_checkpoint) if cfg.run.resume == "auto" else None
    if state is None:
        return 0, [], None
    was = {"method": state["config"]["run"]["method"], "task": state["config"]["data"]["task"],
           "path": state["config"]["model"]["path"]}
    now = {"method": cfg.run.method, "task": cfg.data.task, "path": cfg.model.path}
    for key in ("method", "task", "path"):
        if was[key] != now[key]:
            raise ValueError(f"{ckpt_path} was written by a run with {key}={was[key]!r}, this run has "
                             f"{now[key]!r}: use another --out or --run.resume=never")
    check_same_settings(state["config"], cfg, ckpt_path)
    check_same_data(state.get("data_fingerprints"), data_fingerprints(cfg), ckpt_path)
    job.model.load_state_dict(state["model"])
    job.optimizer.load_state_dict(state["optimizer"])
    job.scheduler.load_state_dict(state["scheduler"])
    job.method.load_state_dict(state["method"])
    _set_rng_state(state["rng"])
    job.ctx.optimizer_steps = state["optimizer_steps"]
    if job.ctx.scaler is not None and state.get("scaler"):
        job.ctx.scaler.load_state_dict(state["scaler"])
    start_epoch = state["epoch"] + 1
    if job.rank == 0:
        log.info("resumed from %s at epoch %d", ckpt_path, start_epoch)
    return start_epoch, state["history"], state["best"]


def _train_epoch(job: _Job, epoch: int, step_times: list[float]) -> dict[str, float]:
    """One pass over this process's shard (``method.train_step`` per minibatch); returns the metrics
    last logged (every ``log_every`` minibatches and at the end); appends each step's seconds."""
    cfg, ctx, loader = job.cfg, job.ctx, job.loader
    if isinstance(job.sampler, DistributedSampler):
        job.sampler.set_epoch(epoch)
    else:
        job.sampler.generator.manual_seed(cfg.run.seed * 1000 + epoch)   # data order = f(seed, epoch)
    job.model.train()
    last_logged: dict[str, float] = {}
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.optim.epochs} [{cfg.run.method}]", disable=not job.show)
    for i, batch in enumerate(bar):
        batch = {k: v.to(job.device) for k, v in batch.items()}
        ctx.step_seed = (cfg.run.seed * 1_000_003 + epoch * 100_003 + i) * job.world + job.rank
        t0 = time.perf_counter()
        with job.autocast():
            metrics = job.method.train_step(ctx, batch)
        if (i + 1) % cfg.run.log_every == 0 or i + 1 == len(loader):
            vals = {k: float(v) for k, v in metrics.items()}     # host sync only when logging
            last_logged = vals
            if job.show:
                bar.set_postfix(loss=f"{vals['loss']:.4f}", lr=f"{job.scheduler.get_last_lr()[0]:.2e}")
        step_times.append(time.perf_counter() - t0)
    return last_logged


def _end_epoch(job: _Job, epoch: int, last_logged: dict, history: list, best: Optional[dict]) -> Optional[dict]:
    """Rank 0 after an epoch: evaluate the dev set, keep the best model (``OUT/best``) and its predictions,
    add the epoch to ``history`` and write the checkpoint; returns the (new) best."""
    cfg, spec, out = job.cfg, job.spec, job.out
    with job.autocast():
        dev_metrics, dev_logits = evaluate(job.model, job.dev_enc, spec, cfg.optim.eval_batch_size, job.device,
                                           job.pad_id, job.show)
    score = dev_metrics[spec.metric]
    improved = best is None or score > best["score"]
    if improved:
        best = {"epoch": epoch, "score": score, "metrics": dev_metrics}
        save_hf(job.model, job.tokenizer, out / "best")
        write_predictions(out / f"predictions_dev.{cfg.run.predictions_format}", job.dev_ex, dev_logits, spec,
                          cfg.run.predictions_format)
    history.append({"epoch": epoch, "train": last_logged, "dev": dev_metrics,
                    "optimizer_steps": job.ctx.optimizer_steps, "nonfinite_skipped": job.ctx.nonfinite_skipped})
    log.info("epoch %d dev %s%s", epoch + 1, json.dumps(dev_metrics), " (best)" if improved else "")
    if job.show:
        tqdm.write(f"epoch {epoch + 1}: dev {spec.metric}={score:.4f}{' (best)' if improved else ''}")
    bad = first_nonfinite(job.model.state_dict())
    if bad is not None:  # never checkpoint a diverged model (the skip guard should make this unreachable)
        raise NonFiniteError(f"epoch {epoch + 1}: weight {bad} holds NaN/Inf; {job.ckpt_path} keeps the "
                             "previous epoch")
    _atomic_torch_save({"model": job.model.state_dict(), "optimizer": job.optimizer.state_dict(),
                        "scheduler": job.scheduler.state_dict(), "method": job.method.state_dict(),
                        "rng": _rng_state(), "epoch": epoch, "history": history, "best": best,
                        "optimizer_steps": job.ctx.optimizer_steps, "config": config_to_dict(cfg),
                        "data_fingerprints": data_fingerprints(cfg),
                        "scaler": job.ctx.scaler.state_dict() if job.ctx.scaler is not None else None},
                       job.ckpt_path)
    return best


def _predict_test(job: _Job) -> None:
    """Predictions of the best model (``OUT/best``) on ``--data.test`` (labels optional)."""
    cfg, spec = job.cfg, job.spec
    best_model = load_model(str(job.out / "best"), spec, device=job.device)
    test_ex = read_examples(cfg.data.test, spec, fmt=cfg.data.format, require_labels=False)
    test_logits = predict(best_model, encode(job.tokenizer, test_ex, cfg.data.max_length), spec,
                          cfg.optim.eval_batch_size, job.device, job.pad_id, job.show)
    write_predictions(job.out / f"predictions_test.{cfg.run.predictions_format}", test_ex, test_logits, spec,
                      cfg.run.predictions_format)


# -------------------------------------------------------------------------------------------------
# the loop
# -------------------------------------------------------------------------------------------------

def finetune(cfg: FinetuneConfig) -> dict:
    """Run a fine-tuning job; returns the results dict also written to ``OUT/results.json``."""
    cfg.validate_required()
    if not (Path(cfg.model.path) / "config.json").is_file():
        raise ValueError(f"--model {cfg.model.path}: no config.json (expected a HuggingFace checkpoint folder, "
                         "e.g. the output of alum-export)")
    job = _build_job(cfg, check_finetune_inputs(cfg))
    start_epoch, history, best = _resume(job)
    step_times: list[float] = []
    end_epoch = cfg.optim.epochs
    if cfg.run.stop_after_epochs:
        end_epoch = min(end_epoch, start_epoch + cfg.run.stop_after_epochs)
    for epoch in range(start_epoch, end_epoch):
        last_logged = _train_epoch(job, epoch, step_times)
        if job.rank == 0:
            best = _end_epoch(job, epoch, last_logged, history, best)
        if dist.is_initialized():
            dist.barrier()

    results = {"task": job.spec.name, "method": cfg.run.method, "metric": job.spec.metric, "best": best,
               "history": history, "optimizer_steps": job.ctx.optimizer_steps,
               "median_step_seconds": float(np.median(step_times)) if step_times else None,
               "config": config_to_dict(cfg), "data_fingerprints": data_fingerprints(cfg)}
    finished = end_epoch == cfg.optim.epochs
    results["finished"] = finished
    if job.rank == 0:
        if cfg.data.test and finished and best is not None:
            _predict_test(job)
        write_text(job.out / "results.json", json.dumps(results, indent=2))
    return results
