"""Everything the training loop needs, built from a :class:`TrainConfig` (so ``train.py`` stays a loop).

:func:`build_run` -> :class:`Run` (model, DDP-wrapped :class:`PretrainStep`, AdamW, schedule, scaler,
loaders, masker, logger, and the engine's :class:`~alum_pretrain.engine.stepper.Stepper`).  The rest of a
run lives beside what it works on: save/resume in :mod:`.checkpoint`, evaluation and the non-finite guard
in :mod:`.step`, the metric accumulation in :mod:`.metrics`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import models as M
from ..compat import check_pretrain_values
from ..config import config_from_dict, config_to_dict, save_yaml
from ..data.databin import DataBin, verify_databin
from ..data.loader import build_loader
from ..data.tokens import build_token_tables
from ..run_identity import data_identity, record_identity, validate_databin
from ..runlock import FolderBusyError, RunLock, lock_folder
from . import distributed as D
from .checkpoint import check_before_start
from .config import TrainConfig, resolve_grad_accum
from .gpu import check_device
from .metrics import LOG, Accumulator, RunLogger, decoder_flops_per_masked_token, flops_per_token, peak_flops
from .optim import build_optimizer, build_scheduler
from .step import Masker, PretrainStep
from .stepper import Stepper, make_stepper
from .zero_init import is_partitioned, sync_buffers


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
    stepper: Optional[Stepper] = None  # the engine's half of each optimizer step and checkpoint
    identity: Optional[dict] = None  # fingerprint of the data-bin and tokenizer (alum_pretrain.run_identity)

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

    def new_accumulator(self) -> Accumulator:
        return Accumulator(self)


def _resolved_config(cfg: TrainConfig, grad_accum: int) -> TrainConfig:
    """The config as run: absolute paths, the grad_accum in effect."""
    d = config_to_dict(cfg)
    d["data"]["path"] = str(Path(cfg.data.path).resolve())
    if cfg.model.init_from:
        d["model"]["init_from"] = str(Path(cfg.model.init_from).resolve())
    d["train"]["grad_accum"] = grad_accum
    return config_from_dict(TrainConfig, d)


@dataclass
class Checked:
    """What :func:`check_inputs` established: the resolved config and the data-bin it may train on."""

    cfg: TrainConfig
    grad_accum: int
    global_batch: int
    databin: DataBin
    tokenizer: Any
    identity: dict
    validation: bool = True  # the run evaluates (a validation split exists and --train.eval_batches > 0)


def check_inputs(cfg: TrainConfig, env: D.DistEnv) -> Checked:
    """Everything that can refuse a start or a resume, run before the run folder (or its lock) is touched."""
    tc = cfg.train
    if not cfg.data.path:
        raise ValueError("--data.path is required: the data-bin folder written by `alum-prep`")
    if cfg.optim.name != "adamw" and tc.engine != "deepspeed":
        raise ValueError(f"--optim.name={cfg.optim.name}: LAMB comes from DeepSpeed; use --train.engine=deepspeed "
                         "(on a GPU) or --optim.name=adamw")
    grad_accum, global_batch = resolve_grad_accum(tc, env.world_size)
    check_device(env.device, tc.precision)  # kernels for this GPU; no bf16 below compute capability 8.0
    cfg = _resolved_config(cfg, grad_accum)
    databin = DataBin(cfg.data.path)
    # Sizes (default, every rank: instant) or SHA-256 (--data.verify=full: once per node, each node may
    # read its own copy) of every shard file against manifest.json.
    if cfg.data.verify == "size" or env.local_rank == 0:
        verify_databin(databin, cfg.data.verify, log=LOG.info if env.is_main else None)
    tokenizer = databin.tokenizer()
    validate_databin(databin, tokenizer, full=cfg.data.verify == "full" and env.local_rank == 0)
    identity = data_identity(databin, databin.tokenizer_dir)
    check_before_start(cfg, Path(tc.output_dir), global_batch, identity)
    hf_config = None
    if cfg.model.init_from:  # its vocabulary, NSP head and position table, without loading its weights
        hf_config = M.check_continual_model(cfg.model.init_from, nsp=cfg.data.nsp, databin=databin,
                                            trust_remote_code=cfg.model.trust_remote_code)
    validation = check_pretrain_values(cfg, databin, global_batch=global_batch, hf_config=hf_config,
                                       model_source=f"--model.init_from={cfg.model.init_from}")
    return Checked(cfg, grad_accum, global_batch, databin, tokenizer, identity, validation)


def build_run(cfg: TrainConfig, env: D.DistEnv, checked: Optional[Checked] = None) -> Run:
    """The run of ``cfg``; ``checked``: :func:`check_inputs`'s result when the caller ran it (before locking)."""
    checked = checked if checked is not None else check_inputs(cfg, env)
    cfg, grad_accum, global_batch = checked.cfg, checked.grad_accum, checked.global_batch
    databin, tokenizer, identity = checked.databin, checked.tokenizer, checked.identity
    tc = cfg.train
    out = Path(tc.output_dir)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    tables = build_token_tables(databin, tokenizer)

    # Same init on every rank (DDP also broadcasts rank 0's weights); then per-rank dropout streams.
    # Under ZeRO-3 the model is partitioned as it is built, rank 0 drawing the same init (engine/zero_init.py).
    torch.manual_seed(tc.seed)
    with _build_context(cfg, env, grad_accum):
        model = M.build_model(databin=databin, preset=cfg.model.preset, init_from=cfg.model.init_from,
                              nsp=cfg.data.nsp, perturb_at=cfg.alum.perturb_at,
                              dropout=None if cfg.model.dropout < 0 else cfg.model.dropout,
                              max_position_embeddings=max(512, cfg.data.max_seq_len),
                              trust_remote_code=cfg.model.trust_remote_code)
    if is_partitioned(model):
        sync_buffers(model)  # buffers stay whole under ZeRO-3: every rank gets rank 0's
    # Training mode explicitly: HF from_pretrained returns a model in eval mode, so a continual run would
    # otherwise train without dropout until (and unless) an evaluation restored train mode.
    model.to(env.device).train()
    torch.manual_seed(tc.seed + 1 + env.rank)
    if tc.compile:  # speed only: the encoder has static shapes (B, max_seq_len, H) -> one graph
        M.compile_encoder(model.hf)

    step_module: torch.nn.Module = PretrainStep(model, cfg.alum, cfg.data.nsp,
                                                unmasked_when_unpadded=cfg.data.mode == "blocks")
    if env.distributed and tc.engine == "ddp":
        step_module = DDP(step_module, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                          broadcast_buffers=False)
    if tc.engine == "deepspeed":
        from . import deepspeed_engine as DS
        optimizer = DS.build_optimizer(model, cfg.optim, env.device)
    else:  # (check_inputs refused LAMB without DeepSpeed)
        optimizer = build_optimizer(model, cfg.optim, env.device)
    scheduler = build_scheduler(optimizer, cfg.optim, tc.max_steps)
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[tc.precision]
    scaler = torch.amp.GradScaler(env.device.type, enabled=tc.precision == "fp16" and tc.engine == "ddp")
    engine = None
    if tc.engine == "deepspeed":  # DeepSpeed owns loss scaling, reduction, clipping, the step and the schedule
        engine = step_module = DS.initialize(cfg, env, step_module, optimizer, scheduler, grad_accum)

    common = dict(mode=cfg.data.mode, nsp=cfg.data.nsp, max_seq_len=cfg.data.max_seq_len, batch_size=tc.batch_size,
                  seed=tc.seed, rank=env.rank, world_size=env.world_size, shard_mode=cfg.data.shard_mode,
                  num_workers=resolve_num_workers(tc.num_workers, env.device), tables=tables)
    grouped = cfg.data.group_by_length and cfg.data.mode == "pairs"
    common.update(group_by_length=grouped, pad_to_max_len=not grouped)
    loader = build_loader(databin, "train", **common)
    valid = valid_state0 = None
    if checked.validation:
        valid = build_loader(databin, cfg.data.valid_split, epochs=1, **{**common, "num_workers": 0})
        valid_state0 = valid.state_dict()
    masker = Masker(cfg.masking, tables.mask_id, tables.random_pool, tc.seed)

    logger = RunLogger(out, env.is_main)
    if env.is_main:
        save_yaml(cfg, out / "config.yaml")
        record_identity(out, identity, databin.tokenizer_dir)
    n_params = sum(map(M.param_numel, model.parameters()))
    built = " (built partitioned (ZeRO-3): deepspeed.zero.Init)" if is_partitioned(model) else ""
    logger.info(f"model: {n_params / 1e6:.2f}M parameters{built}; world size {env.world_size}; device {env.device}; "
                f"global batch {global_batch} = {tc.batch_size} x {grad_accum} accum x {env.world_size} ranks; "
                f"precision {tc.precision}")
    if valid is None:
        logger.info("--train.eval_batches=0: validation is off" if tc.eval_batches == 0 else
                    f"no {cfg.data.valid_split!r} split in {databin.path}: validation is off")
    run = Run(cfg=cfg, env=env, out=out, model=model, step_module=step_module, optimizer=optimizer,
              scheduler=scheduler, scaler=scaler, amp_dtype=amp_dtype, loader=loader, valid=valid,
              valid_state0=valid_state0, masker=masker, grad_accum=grad_accum, global_batch=global_batch,
              logger=logger, gen_device=env.device, engine=engine, identity=identity)
    run.stepper = make_stepper(run)
    run.peak_flops = peak_flops(env.device, tc.precision)
    if run.peak_flops:
        run.flops_per_token = _flops_per_token(model, cfg.data.max_seq_len)
        emb = model.word_embeddings().weight
        rows, width = M.param_shape(emb)
        run.decoder_flops = decoder_flops_per_masked_token(width, rows)
    return run


def claim_output_dir(cfg: TrainConfig, env: D.DistEnv) -> Optional[RunLock]:
    """Lock ``train.output_dir`` for this job before anything in it is touched (:mod:`alum_pretrain.runlock`).

    Only rank 0 takes the lock; its verdict is broadcast so that every rank of a refused job raises the same
    :class:`~alum_pretrain.runlock.FolderBusyError` (exit 2) instead of waiting in a collective.  Returns
    the lock on rank 0 (release it when the run ends), None elsewhere.
    """
    lock, busy = None, None
    if env.is_main:
        try:
            lock = lock_folder(cfg.train.output_dir, tool="alum-train")
        except FolderBusyError as exc:
            busy = str(exc)
    busy = D.broadcast_object(env, busy)
    if busy:
        raise FolderBusyError(busy)
    return lock


def _build_context(cfg: TrainConfig, env: D.DistEnv, grad_accum: int):
    """Where the model is built: ZeRO-3 partitions it during construction (DeepSpeed engine), else nothing."""
    if cfg.train.engine != "deepspeed":
        return contextlib.nullcontext()
    from . import deepspeed_engine as DS

    return DS.build_context(cfg, env, grad_accum)


def resolve_num_workers(num_workers: int, device: torch.device) -> int:
    """``--train.num_workers``: -1 (auto) = 2 loader workers per process on CUDA, 0 on CPU (where workers
    would compete with the training threads for the same cores)."""
    if num_workers >= 0:
        return num_workers
    return 2 if device.type == "cuda" else 0


def _flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    hf_cfg = getattr(model, "config", None)
    emb = M.param_numel(model.word_embeddings().weight)
    n = sum(map(M.param_numel, model.parameters())) - emb
    L = getattr(hf_cfg, "num_hidden_layers", 0)
    H = getattr(hf_cfg, "hidden_size", 0)
    return flops_per_token(n, L, H, seq_len)
