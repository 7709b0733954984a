"""Everything the training loop needs, built from a :class:`TrainConfig` (so ``train.py`` stays a loop).

:func:`build_run` -> :class:`Run` (model, DDP-wrapped :class:`PretrainStep`, AdamW, schedule, scaler,
loaders, masker, logger); :func:`restore` resumes from the latest checkpoint; :func:`save` writes one;
:func:`evaluate` computes the validation MLM loss/accuracy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import models as M
from ..config import config_from_dict, config_to_dict, diff_configs, save_yaml
from ..data.databin import DataBin, verify_databin
from ..data.loader import build_loader
from ..data.tokens import build_token_tables
from ..integrity import first_nonfinite
from ..masking import STREAM_EVAL_MASK
from . import checkpoint as C
from . import distributed as D
from .config import SPEED_ONLY, TrainConfig, resolve_grad_accum
from .gpu import check_device
from .metrics import LOG, RunLogger, decoder_flops_per_masked_token, flops_per_token, mfu, peak_flops
from .optim import build_optimizer, build_scheduler
from .step import Masker, PretrainStep, mlm_eval_batch


HOST_ONLY_KEYS = ("sample_ids",)  # batch entries the step module never sees (kept on the host)


@dataclass
class Run:
    cfg: TrainConfig
    env: D.DistEnv
    out: Path
    model: torch.nn.Module  # the PretrainModel (unwrapped)
    step_module: torch.nn.Module  # PretrainStep, DDP-wrapped when world_size > 1
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    amp_dtype: Optional[torch.dtype]
    loader: Any
    valid: Any
    valid_state0: Optional[dict]
    masker: Masker
    grad_accum: int
    global_batch: int
    logger: RunLogger
    gen_device: torch.device
    flops_per_token: float = 0.0  # per padded token (encoder)
    peak_flops: Optional[float] = None  # of this GPU at this precision
    decoder_flops: float = 0.0  # per masked token (tied MLM decoder)
    engine: Any = None  # the DeepSpeed engine (= step_module) under --train.engine=deepspeed, else None

    def sample_ids(self, micro: int) -> torch.Tensor:
        """Global index, within the optimizer step, of each row of this rank's micro-batch ``micro``.

        The loader's layout (``data/loader.py``): global batch g = plan[g*B*W:(g+1)*B*W], rank r takes its
        r-th B rows; micro-batches of one step are consecutive global batches.  So row i of (micro m,
        rank r) is sample (m*W + r)*B + i of the step - the same sample, hence the same index, for any
        split of the global batch into processes and micro-batches.
        """
        B, W = self.cfg.train.batch_size, self.env.world_size
        return (micro * W + self.env.rank) * B + torch.arange(B)

    def batches(self):
        """The training batches, drawn without touching the global torch RNG.

        Starting DataLoader workers draws a seed from the global RNG, which would shift the dropout
        stream depending on ``num_workers`` and on where a resumed run restarts; the loader's own
        randomness comes from its sample plan, so forking the RNG around it keeps ``num_workers``
        speed-only and resume bit-exact."""
        it = iter(self.loader)
        while True:
            with torch.random.fork_rng(devices=[]):
                batch = next(it)
            yield batch

    def to_device(self, batch: dict) -> dict:
        """The batch on the training device, without a host-device synchronisation.

        On CUDA each tensor is copied from pinned (page-locked) memory with ``non_blocking=True``: a copy
        from ordinary pageable memory would make the host wait for it.  Host-only entries (``sample_ids``,
        used to key the random streams) are dropped: DDP moves every tensor argument of ``forward`` to the
        device with a blocking copy."""
        cuda = self.env.device.type == "cuda"
        out = {}
        for k, v in batch.items():
            if k in HOST_ONLY_KEYS:
                continue
            if isinstance(v, torch.Tensor):
                if cuda and v.device.type == "cpu":
                    v = v.pin_memory()
                v = v.to(self.env.device, non_blocking=cuda)
            out[k] = v
        return out

    def new_accumulator(self) -> "Accumulator":
        return Accumulator(self)


class NonFiniteError(RuntimeError):
    """Training cannot continue: NaN/Inf losses or gradients for too many steps, or non-finite weights."""


def last_good_checkpoint(run: "Run") -> str:
    ck = C.latest_checkpoint(run.out)
    return (f"the last good checkpoint is {ck} (checkpoints are never written with non-finite weights)"
            if ck is not None else f"no checkpoint was written in {run.out}")


def step_is_finite(run: "Run", loss_sum: torch.Tensor, grad_norm: torch.Tensor) -> tuple[bool, bool]:
    """``(loss finite, gradient norm finite)`` on every rank: the one host sync of an optimizer step.

    The gradient norm is computed after DDP's all-reduce, hence global; the loss is per rank, so the flags
    are summed over ranks (any rank's NaN skips the step everywhere and the replicas stay identical)."""
    bad = (~torch.isfinite(torch.stack([loss_sum.detach().float().reshape(()),
                                         grad_norm.detach().float().reshape(())]))).float()
    if run.env.distributed:
        bad = D.all_reduce_device(run.env, bad)
    loss_bad, grad_bad = bad.tolist()
    return loss_bad == 0, grad_bad == 0


class Accumulator:
    """Sums the step metrics on the device between log steps; :meth:`flush` does the one host sync.

    Averages count only steps whose value is finite: the loss terms of steps skipped for a NaN/Inf loss and
    the gradient norm of steps skipped for a NaN/Inf gradient (fp16 loss-scale overflows included) stay out
    of the means; ``nonfinite_skipped`` (and with fp16 ``overflow_skipped`` / ``loss_scale``) count them.
    """

    #: adv_dropout (with alum.log_baseline) is a contribution to the step mean like adv, so it is averaged
    #: like adv: over the steps with a finite loss.
    KEYS = ("mlm", "nsp", "adv", "delta_linf", "adv_dropout")
    #: ALUM diagnostics logged as they are, skipped steps included (that is when they matter): counts summed
    #: over the interval's ALUM micro-batches and ranks (ascent_nonfinite, adv_nonfinite) or fractions
    #: averaged over them (ascent_zero_grad_frac).
    ALUM_SUMS = ("ascent_nonfinite", "adv_nonfinite")
    ALUM_MEANS = ("ascent_zero_grad_frac",)

    def __init__(self, run: Run):
        self.run = run
        self._reset()

    def _reset(self) -> None:
        dev = self.run.env.device
        self.sums = torch.zeros(len(self.KEYS) + 1, device=dev)  # + grad-norm sum
        self.step_sums = torch.zeros(len(self.KEYS), device=dev)  # this step's micro-batches
        self.loss_steps = 0  # steps with a finite loss (the denominator of mlm/nsp/adv)
        self.grad_steps = 0  # steps with a finite gradient norm
        self.nonfinite = 0
        self.overflow = 0
        self.diag = torch.zeros(len(self.ALUM_SUMS) + len(self.ALUM_MEANS), device=dev)
        self.diag_micro = 0  # ALUM micro-batches of the interval, skipped steps included (diag's denominator)
        self.baseline_micro = 0
        self.tokens = 0
        self.padded = 0  # B x T per micro-batch: the encoder computes on padding too (MFU)
        self.masked = 0
        self.maskable = 0
        self.steps = 0
        self.alum_micro = 0
        self.alum_steps = 0
        self.t0 = time.perf_counter()

    def add(self, metrics: dict, batch: dict) -> None:
        for i, k in enumerate(self.KEYS):
            if k in metrics:
                self.step_sums[i] += metrics[k].to(self.sums.device)
        if "adv" in metrics:
            self.alum_micro += 1
            self.diag_micro += 1
            for i, k in enumerate(self.ALUM_SUMS + self.ALUM_MEANS):
                if k in metrics:
                    self.diag[i] += metrics[k].to(self.diag.device, torch.float32)
            self.baseline_micro += int("adv_dropout" in metrics)
        self.tokens += int(batch["n_tokens"])
        self.padded += batch["input_ids"].numel()  # shape metadata: no device sync
        self.masked += int(batch["n_masked"])
        self.maskable += int(batch["n_maskable"])

    def end_step(self, grad_norm: torch.Tensor, rate: float, alum_on: bool, lr: float, *, loss_ok: bool = True,
                 grad_ok: bool = True, skipped: bool = False) -> None:
        if loss_ok:
            self.sums[:-1] += self.step_sums
            self.loss_steps += 1
        elif alum_on:
            self.alum_micro -= self.run.grad_accum  # delta_linf is averaged over the kept micro-batches
        self.step_sums.zero_()
        if grad_ok:
            self.sums[-1] += grad_norm.detach().float()
            self.grad_steps += 1
        self.nonfinite += int(skipped)
        self.overflow += int(not grad_ok and not skipped)  # fp16: the GradScaler skipped the update
        self.steps += 1
        self.alum_steps += int(alum_on)
        self.rate, self.alum_on, self.lr = rate, alum_on, lr

    def flush(self, step: int) -> dict:
        run, env = self.run, self.run.env
        sums = D.all_reduce_device(env, self.sums.clone())  # mlm/nsp/adv contributions sum over ranks
        counts = D.all_reduce_cpu(env, torch.tensor([self.tokens, self.masked, self.maskable, self.alum_micro,
                                                     self.padded, self.diag_micro], dtype=torch.float64))
        s = sums.tolist()  # the host sync of this log interval
        tokens, masked, maskable, alum_micro, padded, diag_micro = counts.tolist()
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        n = max(self.steps, 1)
        nl = self.loss_steps
        # Each rank's contributions carry the factor W (DDP averages over ranks): sum / W = the global mean.
        mlm, nsp, adv = ((x / (nl * env.world_size) if nl else None) for x in s[:3])
        rec = {
            "step": step,
            "loss": mlm + nsp + run.cfg.alum.alpha * adv if nl else None,  # None (null): every step was NaN/Inf
            "mlm": mlm,
            "nsp": nsp,
            "adv": adv,
            "mask_rate": self.rate,
            "mask_frac": masked / max(maskable, 1.0),
            "lr": self.lr,
            # identical on every rank after the all-reduce; the mean over steps with a finite norm
            "grad_norm": s[-1] / (self.grad_steps * env.world_size) if self.grad_steps else None,
            "nonfinite_skipped": self.nonfinite,
            "alum": float(self.alum_on),
            "tokens_per_s": tokens / elapsed,
            "steps_per_s": self.steps / elapsed,
        }
        if run.scaler.is_enabled():
            rec["overflow_skipped"] = self.overflow
            rec["loss_scale"] = float(run.scaler.get_scale())
        if alum_micro > 0:
            rec["delta_linf"] = s[3] / alum_micro
        if diag_micro > 0:
            diag = D.all_reduce_device(env, self.diag.clone()).tolist()
            n_sum = len(self.ALUM_SUMS)
            for i, k in enumerate(self.ALUM_SUMS):
                rec[k] = diag[i]
            for i, k in enumerate(self.ALUM_MEANS):
                rec[k] = diag[n_sum + i] / diag_micro  # diag_micro is already summed over ranks
            if self.baseline_micro:
                rec["adv_dropout"] = s[4] / (nl * env.world_size) if nl else None
        if run.peak_flops:
            # executed FLOPs: a standard step = 3 forward-units; ALUM = 6 + 2K (module docstring of adversarial)
            k = run.cfg.alum.k_steps
            units = (3 * (self.steps - self.alum_steps) + (6 + 2 * k) * self.alum_steps) / (3 * n)
            rec["mfu"] = mfu(padded, masked, elapsed, flops_per_padded_token=run.flops_per_token,
                             decoder_flops_per_masked=run.decoder_flops, step_units=units,
                             peak=run.peak_flops, world_size=env.world_size)
        self._reset()
        return rec


def _resolved_config(cfg: TrainConfig, grad_accum: int) -> TrainConfig:
    """The config as run: absolute paths, the grad_accum in effect."""
    d = config_to_dict(cfg)
    d["data"]["path"] = str(Path(cfg.data.path).resolve())
    if cfg.model.init_from:
        d["model"]["init_from"] = str(Path(cfg.model.init_from).resolve())
    d["train"]["grad_accum"] = grad_accum
    return config_from_dict(TrainConfig, d)


def build_run(cfg: TrainConfig, env: D.DistEnv) -> Run:
    tc = cfg.train
    if not cfg.data.path:
        raise ValueError("--data.path is required: the data-bin folder written by `alum-prep`")
    grad_accum, global_batch = resolve_grad_accum(tc, env.world_size)
    check_device(env.device, tc.precision)  # kernels for this GPU; no bf16 below compute capability 8.0
    cfg = _resolved_config(cfg, grad_accum)
    out = Path(tc.output_dir)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    databin = DataBin(cfg.data.path)
    # Sizes (default, every rank: instant) or SHA-256 (--data.verify=full: once per node, each node may
    # read its own copy) of every shard file against manifest.json.
    if cfg.data.verify == "size" or env.local_rank == 0:
        verify_databin(databin, cfg.data.verify, log=LOG.info if env.is_main else None)
    tables = build_token_tables(databin)

    # Same init on every rank (DDP also broadcasts rank 0's weights); then per-rank dropout streams.
    torch.manual_seed(tc.seed)
    model = M.build_model(databin=databin, preset=cfg.model.preset, init_from=cfg.model.init_from,
                          nsp=cfg.data.nsp, perturb_at=cfg.alum.perturb_at,
                          dropout=None if cfg.model.dropout < 0 else cfg.model.dropout,
                          max_position_embeddings=max(512, cfg.data.max_seq_len))
    # Training mode explicitly: HF from_pretrained returns a model in eval mode, so a continual run would
    # otherwise train without dropout until (and unless) an evaluation restored train mode.
    model.to(env.device).train()
    torch.manual_seed(tc.seed + 1 + env.rank)
    if tc.compile:  # speed only: the encoder has static shapes (B, max_seq_len, H) -> one graph
        model.base.encoder.compile()

    step_module: torch.nn.Module = PretrainStep(model, cfg.alum, cfg.data.nsp)
    if env.distributed and tc.engine == "ddp":
        step_module = DDP(step_module, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                          broadcast_buffers=False)
    if tc.engine == "deepspeed":
        from . import deepspeed_engine as DS
        optimizer = DS.build_optimizer(model, cfg.optim, env.device)
    elif cfg.optim.name != "adamw":
        raise ValueError(f"--optim.name={cfg.optim.name}: LAMB comes from DeepSpeed; use --train.engine=deepspeed "
                         "(on a GPU) or --optim.name=adamw")
    else:
        optimizer = build_optimizer(model, cfg.optim, env.device)
    scheduler = build_scheduler(optimizer, cfg.optim, tc.max_steps)
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[tc.precision]
    scaler = torch.amp.GradScaler(env.device.type, enabled=tc.precision == "fp16" and tc.engine == "ddp")
    engine = None
    if tc.engine == "deepspeed":  # DeepSpeed owns loss scaling, reduction, clipping, the step and the schedule
        engine = step_module = DS.initialize(cfg, env, step_module, optimizer, scheduler, grad_accum)

    common = dict(mode=cfg.data.mode, nsp=cfg.data.nsp, max_seq_len=cfg.data.max_seq_len, batch_size=tc.batch_size,
                  seed=tc.seed, rank=env.rank, world_size=env.world_size, shard_mode=cfg.data.shard_mode,
                  pad_to_max_len=True, num_workers=resolve_num_workers(tc.num_workers, env.device), tables=tables)
    loader = build_loader(databin, "train", **common)
    valid = valid_state0 = None
    if any(databin.has_split(k, cfg.data.valid_split) for k in range(databin.num_shards)):
        valid = build_loader(databin, cfg.data.valid_split, epochs=1, **{**common, "num_workers": 0})
        valid_state0 = valid.state_dict()
    masker = Masker(cfg.masking, tables.mask_id, tables.random_pool, tc.seed)

    logger = RunLogger(out, env.is_main)
    if env.is_main:
        save_yaml(cfg, out / "config.yaml")
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(f"model: {n_params / 1e6:.2f}M parameters; world size {env.world_size}; device {env.device}; "
                f"global batch {global_batch} = {tc.batch_size} x {grad_accum} accum x {env.world_size} ranks; "
                f"precision {tc.precision}")
    if valid is None:
        logger.info(f"no {cfg.data.valid_split!r} split in {databin.path}: validation is off")
    run = Run(cfg=cfg, env=env, out=out, model=model, step_module=step_module, optimizer=optimizer,
              scheduler=scheduler, scaler=scaler, amp_dtype=amp_dtype, loader=loader, valid=valid,
              valid_state0=valid_state0, masker=masker, grad_accum=grad_accum, global_batch=global_batch,
              logger=logger, gen_device=env.device, engine=engine)
    run.peak_flops = peak_flops(env.device, tc.precision)
    if run.peak_flops:
        run.flops_per_token = _flops_per_token(model, cfg.data.max_seq_len)
        emb = model.word_embeddings().weight
        run.decoder_flops = decoder_flops_per_masked_token(emb.shape[1], emb.shape[0])
    return run


def resolve_num_workers(num_workers: int, device: torch.device) -> int:
    """``--train.num_workers``: -1 (auto) = 2 loader workers per process on CUDA, 0 on CPU (where workers
    would compete with the training threads for the same cores)."""
    if num_workers >= 0:
        return num_workers
    return 2 if device.type == "cuda" else 0


def _flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    hf_cfg = getattr(model, "config", None)
    emb = model.word_embeddings().weight.numel()
    n = sum(p.numel() for p in model.parameters()) - emb
    L = getattr(hf_cfg, "num_hidden_layers", 0)
    H = getattr(hf_cfg, "hidden_size", 0)
    return flops_per_token(n, L, H, seq_len)


def _train_state(run: Run, step: int) -> dict:
    return {
        "step": step,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "loader": run.loader.state_dict(),  # global sample offset: identical on every rank
        "global_batch": run.global_batch,
        "world_size": run.env.world_size,
        "config": config_to_dict(run.cfg),
    }


def save(run: Run, step: int) -> None:
    """Checkpoint ``step`` (every rank takes part in gathering RNG states; rank 0 writes).

    Refuses (NonFiniteError, on every rank alike: the replicas are identical) to write NaN/Inf weights."""
    bad = first_nonfinite(run.model.named_parameters())
    if bad is not None:
        raise NonFiniteError(f"step {step}: parameter {bad} holds NaN/Inf; no checkpoint written; "
                             f"{last_good_checkpoint(run)} - resume from it with a lower --optim.lr")
    if run.engine is not None:  # DeepSpeed: every rank also writes its ZeRO shard into the same step-N folder
        from .deepspeed_engine import save as ds_save
        return ds_save(run, step)
    rngs = D.gather_objects(run.env, C.rng_state())
    if run.env.is_main:
        state = _train_state(run, step)
        state["rng"] = rngs
        path = C.save_checkpoint(run.out, step, lambda d: M.save_model(run.model, d), state,
                                 run.cfg.train.keep_last)
        run.logger.info(f"saved {path}")
    if run.env.distributed:
        torch.distributed.barrier(group=run.env.control_group)


def restore(run: Run) -> int:
    """Resume from the newest complete checkpoint in ``train.output_dir``; returns the step (0 = fresh)."""
    env = run.env
    trust = run.cfg.train.trust_checkpoint
    found = (None, None, [])
    if env.is_main:  # verify newest-first; damaged ones are named and skipped (checkpoint.verify_checkpoint)
        found = C.newest_intact_checkpoint(run.out, LOG.warning, trust=trust)
    ckpt, problems = D.broadcast_object(env, (found[0], found[2]))
    if ckpt is None:
        if problems:
            raise ValueError(
                f"{C.checkpoints_dir(run.out)}: no intact checkpoint to resume from:\n  " + "\n  ".join(problems)
                + "\nmove the damaged step-N folders away (or use a new --train.output_dir) to start over")
        return 0
    state = found[1] if env.is_main else C.load_state(ckpt, trust=trust)
    saved = config_from_dict(TrainConfig, state["config"])
    bad = diff_configs(saved, run.cfg, ignore=SPEED_ONLY)
    if bad:
        key = bad[0]
        sv, nv = _get(config_to_dict(saved), key), _get(config_to_dict(run.cfg), key)
        raise ValueError(
            f"{ckpt}: cannot resume: --{key} was {sv!r} in the checkpointed run but is {nv!r} now "
            f"({len(bad)} result-changing key(s) differ: {', '.join(bad)}); restore the original value or use "
            "a new --train.output_dir")
    if state["global_batch"] != run.global_batch:
        raise ValueError(
            f"{ckpt}: cannot resume: the global batch was {state['global_batch']} sequences and is now "
            f"{run.global_batch} (--train.batch_size x --train.grad_accum x world size, or "
            "--train.global_batch_size); keep the global batch to resume")
    if run.engine is not None:  # DeepSpeed: weights, ZeRO optimizer shards, schedule, fp16 loss scale
        from .deepspeed_engine import load as ds_load
        ds_load(run, ckpt, state)
    elif state.get("engine") == "deepspeed":
        raise ValueError(f"{ckpt}: written by the DeepSpeed engine; resume it with --train.engine=deepspeed")
    else:
        loaded = M.load_model(ckpt / C.MODEL_DIR)
        run.model.load_state_dict(loaded.state_dict())
        del loaded
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        run.scaler.load_state_dict(state["scaler"])
    run.loader.load_state_dict(state["loader"])
    rngs = state["rng"]
    if len(rngs) == env.world_size:
        C.set_rng_state(rngs[env.rank])
    else:
        run.logger.info(f"world size changed ({len(rngs)} -> {env.world_size}): dropout RNG streams are re-seeded")
    run.logger.resume_at(int(state["step"]))
    run.logger.info(f"resumed from {ckpt} at step {state['step']}")
    return int(state["step"])


def _get(d: dict, dotted: str):
    for p in dotted.split("."):
        d = d.get(p, {}) if isinstance(d, dict) else None
    return d


@torch.no_grad()
def evaluate(run: Run, step: int) -> dict:
    """Validation MLM loss and accuracy at the constant rate (masking.constant_rate), same masks every time."""
    cfg, env, model = run.cfg, run.env, run.model
    run.valid.load_state_dict(run.valid_state0)
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, device=env.device)
    autocast = torch.autocast(env.device.type, dtype=run.amp_dtype) if run.amp_dtype is not None else None
    B, W = cfg.train.batch_size, env.world_size
    for j, batch in enumerate(run.valid):
        if j >= cfg.train.eval_batches:
            break
        ids = (j * W + env.rank) * B + torch.arange(batch["input_ids"].shape[0])
        batch = run.to_device(run.masker(batch, cfg.masking.constant_rate, 0, ids, stream=STREAM_EVAL_MASK))
        if autocast is not None:
            with autocast:
                ce, correct, n = mlm_eval_batch(model, batch)
        else:
            ce, correct, n = mlm_eval_batch(model, batch)
        totals += torch.stack([ce.float(), correct.float(), n.float()])
    model.train(was_training)
    ce, correct, n = D.all_reduce_device(env, totals).tolist()
    n = max(n, 1.0)
    return {"step": step, "kind": "valid", "valid_mlm": ce / n, "valid_acc": correct / n,
            "valid_masked_tokens": n}
