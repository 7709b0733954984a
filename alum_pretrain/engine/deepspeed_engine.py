"""DeepSpeed ZeRO as the engine of ``alum-train`` (``--train.engine=deepspeed``): same loop, same checkpoints.

Why: under DDP every GPU holds the fp32 weights (4 B/param), the fp32 gradients (4 B) and AdamW's two
fp32 moments (8 B) - 16 bytes per parameter before activations.  ZeRO shards that state over the N
data-parallel ranks: stage 1 the optimizer state, stage 2 also the gradients, stage 3 also the weights
(per GPU ~ 4 + 4 + 8/N, 4 + (4 + 8)/N and 16/N bytes per parameter).

What stays exactly as in the DDP engine (:mod:`alum_pretrain.engine.stepper`, ``train.py``):

* the step module (:class:`~alum_pretrain.engine.step.PretrainStep`: masked-only MLM + NSP + alpha * R),
  the per-sample masking and ALUM noise, the global loss normalisation and the loop;
* precision: float32 weights and ``torch.autocast`` in bf16/fp16 (DeepSpeed's ``torch_autocast`` mode,
  *not* its pure-16-bit ``fp16``/``bf16`` modes, which would put the ALUM perturbation of ~1e-5 below the
  resolution of 16-bit embeddings); fp16 adds dynamic loss scaling with GradScaler's policy
  (:func:`use_dynamic_loss_scaler`): an overflow skips the update and halves the scale, as under DDP;
* gradient reduction in float32 (``lower_precision_safe_modules: []``: no layer's gradients are
  communicated in 16 bits), averaged over ranks like DDP, so the same loss gives the same update;
* the global batch arithmetic (``train_micro_batch_size_per_gpu`` = ``train.batch_size``,
  ``gradient_accumulation_steps`` from :func:`~alum_pretrain.engine.config.resolve_grad_accum`); the loss
  is already normalised over the global batch, so ``backward(..., scale_wrt_gas=False)``;
* gradient clipping (``gradient_clipping`` = ``optim.grad_clip``), AdamW with the same parameter groups
  and the same warm-up/decay ``LambdaLR`` (stepped by DeepSpeed at each accumulation boundary);
* the checkpoint folder ``checkpoints/step-N/`` written through
  :func:`alum_pretrain.engine.checkpoint.save_checkpoint`'s temp-folder-then-rename path: ``model/`` holds
  the consolidated HF weights (gathered from the ranks under ZeRO-3), so ``alum-export`` and
  ``--model.init_from`` read it as any other checkpoint; ``deepspeed/`` holds DeepSpeed's own files (the
  ZeRO optimizer shards of every rank), from which a resumed run restores the optimizer exactly and from
  which DeepSpeed's ``zero_to_fp32`` rebuilds the fp32 weights.

Under ZeRO-3 the model is built already partitioned (``deepspeed.zero.Init``, :mod:`.zero_init`): no
process holds the whole model at once, and the partitioned weights are, gathered, those of the DDP build
with the same seed (from scratch: rank 0 draws the plain build's initialisation; continual: rank 0 reads the
checkpoint and broadcasts it layer by layer).

The ALUM ascent (``torch.autograd.grad`` w.r.t. delta only, inside the forward) writes no parameter
gradient, so none of ZeRO's gradient hooks fires and nothing is reduced; under ZeRO-3 the ascent backward
only all-gathers the (partitioned) weights it needs, as every ZeRO-3 backward does.

Optimizers: ``optim.name=adamw`` is torch's AdamW on CPU, DeepSpeed's FusedAdam (AdamW mode) on CUDA;
``optim.name=lamb`` is DeepSpeed's FusedLamb, a CUDA kernel: elsewhere it is refused with a message.
With ``deepspeed.offload_optimizer=cpu`` the update runs on the host with torch's AdamW over the
offloaded fp32 partition (no compiled DeepSpeed op needed).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as C
from . import distributed as D
from . import zero_init
from .config import OptimConfig, TrainConfig
from .optim import param_groups

log = logging.getLogger("alum_pretrain.engine.deepspeed")

DS_DIR = "deepspeed"  # inside checkpoints/step-N/: DeepSpeed's own files (one tag folder, below)
DS_TAG = "zero"  # DeepSpeed's tag sub-folder name (fixed: the step is in the step-N folder name)


def require_deepspeed():
    """Import deepspeed or raise a ValueError saying how to install it."""
    try:
        import deepspeed  # noqa: F401  (0.19: picks the CPU accelerator + gloo when there is no GPU)
    except ImportError as exc:
        raise ValueError(
            "--train.engine=deepspeed needs the deepspeed package, which is not installed: "
            "pip install 'alum-pretrain[deepspeed]' (or `bash scripts/setup.sh`), or use --train.engine=ddp"
        ) from exc
    return deepspeed


def ds_config(cfg: TrainConfig, grad_accum: int, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict equivalent to ``cfg`` (see the module docstring for each mapping)."""
    tc, dc = cfg.train, cfg.deepspeed
    zero: dict[str, Any] = {
        "stage": dc.zero_stage,
        "reduce_bucket_size": dc.reduce_bucket_size,
        "allgather_bucket_size": dc.allgather_bucket_size,
        "contiguous_gradients": True,
        "overlap_comm": False,
    }
    if dc.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = dc.param_persistence_threshold
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # model/ is gathered by save() below
    if dc.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if dc.offload_param == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": tc.batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": tc.batch_size * grad_accum * world_size,
        "gradient_clipping": float(cfg.optim.grad_clip),  # 0 = off
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch AdamW is a client optimizer ZeRO wraps fine
        "zero_force_ds_cpu_optimizer": False,  # offload with torch AdamW: no compiled cpu_adam op needed
        "steps_per_print": 2**62,  # alum-train logs itself
        "wall_clock_breakdown": False,
    }
    if tc.precision != "fp32":
        out["torch_autocast"] = {"enabled": True, "dtype": {"bf16": "bfloat16", "fp16": "float16"}[tc.precision],
                                 "lower_precision_safe_modules": []}  # reduce every gradient in fp32
    return out


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (torch on CPU / with offload, DeepSpeed FusedAdam on CUDA) or DeepSpeed FusedLamb (CUDA only)."""
    groups = param_groups(model, cfg.weight_decay)
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "lamb":
        if device.type != "cuda":
            raise ValueError(
                "--optim.name=lamb: DeepSpeed provides LAMB only as FusedLamb, a CUDA kernel; this run is on "
                f"{device.type}. Use --optim.name=adamw, or run on a GPU")
        try:
            from deepspeed.ops.lamb import FusedLamb

            return FusedLamb(groups, **kw)
        except Exception as exc:  # noqa: BLE001 - the op is JIT-compiled and may be unbuildable here
            raise ValueError(f"--optim.name=lamb: DeepSpeed's FusedLamb kernel could not be built or loaded "
                             f"({type(exc).__name__}: {exc}); install a CUDA toolkit matching torch, or use "
                             "--optim.name=adamw") from exc
    if device.type == "cuda":
        try:
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(groups, adam_w_mode=True, **kw)
        except Exception as exc:  # noqa: BLE001
            log.warning("DeepSpeed FusedAdam unavailable (%s: %s); using torch's fused AdamW (same update rule)",
                        type(exc).__name__, exc)
            return torch.optim.AdamW(groups, fused=True, **kw)
    return torch.optim.AdamW(groups, **kw)


def init_comm(env: D.DistEnv):
    """DeepSpeed's communication on the run's process group (made here for one process); returns deepspeed."""
    deepspeed = require_deepspeed()
    _no_shm_comm_build()
    if not torch.distributed.is_initialized():
        # DeepSpeed needs a process group even for one process; torchrun's variables are absent here
        # (distributed.setup() initialises the group whenever WORLD_SIZE > 1).
        assert not env.distributed, "distributed.setup() initialises the process group when WORLD_SIZE > 1"
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))  # DeepSpeed asserts that a launcher set it
    # DeepSpeed reuses the existing (gloo / NCCL) process group; init_distributed is then a no-op.
    deepspeed.init_distributed(dist_backend="nccl" if env.device.type == "cuda" else "gloo",
                               auto_mpi_discovery=False, verbose=False)
    return deepspeed


def build_context(cfg: TrainConfig, env: D.DistEnv, grad_accum: int):
    """The context to build the model in: under ZeRO-3 its parameters are partitioned as it is constructed
    (:mod:`alum_pretrain.engine.zero_init`, the DDP build's weights); a no-op for stages 0-2."""
    if cfg.deepspeed.zero_stage != 3:
        return contextlib.nullcontext()
    init_comm(env)
    return zero_init.build_context(ds_config(cfg, grad_accum, env.world_size), continual=bool(cfg.model.init_from))


def initialize(cfg: TrainConfig, env: D.DistEnv, step_module: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: Any, grad_accum: int):
    """``deepspeed.initialize`` around the (unwrapped) step module; returns the engine.

    The engine takes the place of the DDP-wrapped step module in the loop; it owns the optimizer step,
    loss scaling (fp16), clipping and the LR schedule (see :func:`backward` / :func:`optimizer_step`)."""
    deepspeed = init_comm(env)
    engine, _opt, _loader, _sched = deepspeed.initialize(
        model=step_module, optimizer=optimizer, lr_scheduler=scheduler,
        config=ds_config(cfg, grad_accum, env.world_size))
    if cfg.train.precision == "fp16" and cfg.deepspeed.zero_stage >= 1:
        use_dynamic_loss_scaler(engine)
    return engine


# torch.amp.GradScaler's policy: start at 2**16, halve and skip the step on inf/nan, double after 2000
# consecutive good steps (no hysteresis).
LOSS_SCALE_ARGS = {"init_scale": 2.0**16, "scale_window": 2000, "min_scale": 2.0**-24, "delayed_shift": 1,
                   "consecutive_hysteresis": False, "raise_error_at_min_scale": False}


def use_dynamic_loss_scaler(engine) -> None:
    """fp16 under ZeRO 1-3: scale the loss with DeepSpeed's dynamic loss scaler, not the engine's GradScaler.

    In ``torch_autocast`` fp16 mode DeepSpeed 0.19's ZeRO optimizers scale the loss with a
    ``torch.amp.GradScaler`` but compute the gradient norm, and clip, as if the loss were unscaled (their
    own ``loss_scale`` stays 1): the logged norm is ~65536x too large and clipping shrinks every update
    by that factor.  Their dynamic loss scaler is the path that ZeRO's norm, clipping, overflow skip and
    checkpoint all account for, so it is installed instead, with GradScaler's policy (LOSS_SCALE_ARGS);
    a non-finite gradient norm then skips the step and halves the scale, as with DDP's GradScaler."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    opt = engine.optimizer
    for attr in ("torch_autocast_gradscaler", "loss_scaler", "dynamic_loss_scale", "custom_loss_scaler"):
        if not hasattr(opt, attr):
            raise RuntimeError(f"{type(opt).__name__} has no {attr!r}: this DeepSpeed version's ZeRO optimizer "
                               "differs from 0.19; pin deepspeed==0.19.8 or use --train.precision=bf16")
    opt.torch_autocast_gradscaler = None
    opt.loss_scaler = DynamicLossScaler(dtype=torch.float16, **LOSS_SCALE_ARGS)
    opt.dynamic_loss_scale = True
    opt.custom_loss_scaler = False


def _no_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory CPU all-reduce op at start-up.

    On a CPU-only machine DeepSpeed's comm backend compiles that C++ op the first time it starts (minutes
    with g++, and a failure where no compiler is installed); it only speeds up small CPU all-reduces, and
    gloo does the same job.  DeepSpeed caches its op-compatibility table in ``deepspeed.ops``, so marking
    the op incompatible there makes the backend fall back to torch.distributed."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


# --------------------------------------------------------------------------------------------------
# The two places where the loop differs from DDP
# --------------------------------------------------------------------------------------------------


def backward(engine, loss: torch.Tensor) -> None:
    """One micro-batch's backward (fp16: scaled by the engine's GradScaler; ZeRO: reduce at the boundary).

    The loss is already normalised over the global batch (engine/step.py), hence ``scale_wrt_gas=False``.
    DeepSpeed counts micro-batches in ``step()``: it is called here for every micro-batch but the last,
    where it only advances the counter; :func:`optimizer_step` makes the real one."""
    engine.backward(loss, scale_wrt_gas=False)
    if not engine.is_gradient_accumulation_boundary():
        engine.step()


def optimizer_step(engine) -> tuple[torch.Tensor, float]:
    """Unscale, clip, update, schedule, zero the gradients; returns ``(grad_norm before clipping, lr used)``."""
    assert engine.is_gradient_accumulation_boundary(), "optimizer_step() must follow the last micro-batch"
    lr = float(engine.get_lr()[0])
    stage0_norm = None
    if not engine.zero_optimization():  # stage 0 does not report the norm: take it from the reduced .grad
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        stage0_norm = torch.nn.utils.get_total_norm(grads).float() if grads else torch.zeros(())
        scaler = grad_scaler(engine)
        if scaler is not None and scaler.is_enabled():  # fp16: the gradients are still scaled here
            stage0_norm = stage0_norm / scaler.get_scale()
    engine.step()
    norm = engine.get_global_grad_norm() if stage0_norm is None else stage0_norm
    if norm is None:
        norm = float("nan")
    return torch.as_tensor(norm, dtype=torch.float32).detach().reshape(()), lr


def schedule_after_overflow(engine) -> bool:
    """Step the LR schedule for an update that DeepSpeed skipped as an fp16 overflow; True when it did.

    DeepSpeed skips the schedule together with the update, while DDP's GradScaler skips only the update and
    its schedule steps on (``DDPStepper.update``); stepping it here gives both engines the same LR sequence.
    Call it only for an update the run does not skip itself (finite loss)."""
    if engine.was_step_applied() or engine.lr_scheduler is None:
        return False
    engine.lr_scheduler.step()
    return True


def grad_scaler(engine):
    """The fp16 GradScaler inside the ZeRO optimizer (torch_autocast mode), or None."""
    opt = engine.optimizer
    return getattr(opt, "torch_autocast_gradscaler", None) or getattr(engine, "torch_autocast_z0_gradscaler", None)


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def save(run, step: int) -> None:
    """Checkpoint ``step``: every rank writes its ZeRO shard into the same ``step-N.tmp`` folder that rank 0
    fills and renames through :func:`checkpoint.save_checkpoint`; ``model/`` gets the consolidated weights."""
    from .. import models as M
    from ..config import config_to_dict

    env, engine = run.env, run.engine
    rngs = D.gather_objects(env, C.rng_state())
    scaler = grad_scaler(engine)

    def write_ds(tmp: Path) -> None:  # collective: every rank, same folder
        engine.save_checkpoint(str(tmp / DS_DIR), tag=DS_TAG, save_latest=False)
        if env.distributed:
            torch.distributed.barrier(group=env.control_group)  # all shards on disk before rank 0 renames

    if run.cfg.deepspeed.zero_stage == 3:
        # Gather the weights on rank 0 before the save (collective), then write model/ inside the callback.
        import deepspeed

        gathered = {}
        with deepspeed.zero.GatheredParameters(list(run.model.parameters()), modifier_rank=None):
            if env.is_main:
                gathered = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    if env.is_main:
        def save_model_and_shards(model_dir: Path) -> None:
            if run.cfg.deepspeed.zero_stage == 3:
                save_gathered(run.model, gathered, model_dir)
            else:
                M.save_model(run.model, model_dir)
            D.broadcast_object(env, str(model_dir.parent))  # tell the other ranks where the temp folder is
            write_ds(model_dir.parent)

        state = {
            "step": step,
            "engine": "deepspeed",
            "zero_stage": run.cfg.deepspeed.zero_stage,
            "scaler": scaler.state_dict() if scaler is not None else {},
            "loader": run.loader.state_dict(),
            "global_batch": run.global_batch,
            "world_size": env.world_size,
            "config": config_to_dict(run.cfg),
            "identity": run.identity,
            "rng": rngs,
        }
        path = C.save_checkpoint(run.out, step, save_model_and_shards, state, run.cfg.train.keep_last)
        run.logger.info(f"saved {path} (DeepSpeed ZeRO-{run.cfg.deepspeed.zero_stage}, {env.world_size} shard(s))")
    else:
        tmp = Path(D.broadcast_object(env, None))
        write_ds(tmp)
    if env.distributed:
        torch.distributed.barrier(group=env.control_group)


def save_gathered(model: torch.nn.Module, state: dict, model_dir: Path) -> None:
    """``save_model`` of ``model`` with its parameters replaced by the gathered full ``state`` (ZeRO-3)."""
    import copy

    from .. import models as M

    hf = M._unwrap(model)
    # A structural copy on the meta device would not survive save_pretrained; a shallow module copy whose
    # tensors are the gathered ones does: load them into a fresh deep copy of the config-built model.
    with torch.random.fork_rng(devices=[]):  # the clone's throw-away init must not move rank 0's RNG
        clone = type(hf)(copy.deepcopy(hf.config))
    prefix = _prefix_of(model, hf)
    clone.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    M.save_model(clone, model_dir)


def _prefix_of(model: torch.nn.Module, hf: torch.nn.Module) -> str:
    for name, mod in model.named_modules():
        if mod is hf:
            return f"{name}." if name else ""
    raise AssertionError("the HF model is not inside the training model")


def load(run, ckpt: Path, state: dict) -> None:
    """Restore the engine (weights, ZeRO optimizer shards, LR schedule) and the fp16 loss scale."""
    env = run.env
    if state.get("engine") != "deepspeed":
        raise ValueError(f"{ckpt}: written by the DDP engine; it cannot resume under --train.engine=deepspeed "
                         "(use --train.engine=ddp, or start a new --train.output_dir with --model.init_from="
                         f"{ckpt / C.MODEL_DIR})")
    if state["world_size"] != env.world_size:
        raise ValueError(
            f"{ckpt}: the ZeRO optimizer state was sharded over {state['world_size']} processes and this run has "
            f"{env.world_size}; resume with {state['world_size']} processes (or continue from the weights with a "
            f"new --train.output_dir and --model.init_from={ckpt / C.MODEL_DIR})")
    ds_dir = ckpt / DS_DIR
    if not (ds_dir / DS_TAG).is_dir():
        raise ValueError(f"{ckpt}: no {DS_DIR}/{DS_TAG}/ folder (DeepSpeed's shards); the checkpoint is incomplete")
    load_path, _client = run.engine.load_checkpoint(str(ds_dir), tag=DS_TAG, load_optimizer_states=True,
                                                    load_lr_scheduler_states=True, load_module_strict=True)
    if load_path is None:
        raise ValueError(f"{ds_dir}: DeepSpeed could not load the checkpoint (see its log above)")
    scaler = grad_scaler(run.engine)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])


def is_deepspeed_checkpoint(step_dir: Path) -> bool:
    return (Path(step_dir) / DS_DIR / DS_TAG).is_dir()


def consolidate_zero(step_dir: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights rebuilt from a checkpoint's ZeRO shards by DeepSpeed's ``zero_to_fp32``.

    Keys are those of the HF model (``bert.encoder...``), i.e. the names in ``model/model.safetensors``."""
    require_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(Path(step_dir) / DS_DIR), tag=DS_TAG)
    prefix = "model.hf."  # PretrainStep.model (PretrainModel) .hf (the HF model)
    return {k[len(prefix):]: v.detach() for k, v in sd.items() if k.startswith(prefix)}


def hf_model_from_zero_shards(step_dir: Path, model_dir: Path):
    """The HF model of ``model_dir/config.json`` with the fp32 weights rebuilt from the step's ZeRO shards.

    For ``alum-export --from-zero-shards``: the shards (every rank's fp32 partition) are the weights the
    optimizer holds, independent of the consolidated ``model/`` safetensors (which may be missing or damaged).
    Returns ``(model, state_dict)``; raises ValueError naming the file when the shards are incomplete."""
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForPreTraining

    step_dir, model_dir = Path(step_dir), Path(model_dir)
    if not is_deepspeed_checkpoint(step_dir):
        raise ValueError(f"{step_dir}: no {DS_DIR}/{DS_TAG}/ folder: only --train.engine=deepspeed checkpoints "
                         "have ZeRO shards (export this one without --from-zero-shards)")
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir}/config.json missing: the architecture of the shards is unknown")
    config = AutoConfig.from_pretrained(str(model_dir))
    archs = getattr(config, "architectures", None) or []
    auto = AutoModelForPreTraining if any(a.endswith("ForPreTraining") for a in archs) else AutoModelForMaskedLM
    model = auto.from_config(config)
    try:
        sd = consolidate_zero(step_dir)
    except (OSError, RuntimeError, ValueError, KeyError, AssertionError) as exc:
        raise ValueError(f"{step_dir / DS_DIR / DS_TAG}: the ZeRO shards cannot be consolidated "
                         f"({type(exc).__name__}: {exc}); the checkpoint is damaged or incomplete") from exc
    missing, unexpected = model.load_state_dict(sd, strict=False)
    really_missing = [k for k in missing if not _is_tied(model, k)]  # a tied copy is loaded via its twin
    if unexpected or really_missing:
        raise ValueError(f"{step_dir / DS_DIR}: the ZeRO shards do not match {model_dir}/config.json: missing "
                         f"{really_missing[:5]}, unexpected {unexpected[:5]}")
    return model, sd


def _is_tied(model: torch.nn.Module, key: str) -> bool:
    """True when parameter ``key`` shares its storage with another parameter that is not ``key``."""
    p = model.get_parameter(key)
    return any(q is p and name != key for name, q in model.named_parameters(remove_duplicate=False))
