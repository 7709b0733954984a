"""Complete, atomic checkpoints in ``OUTPUT/checkpoints/step-N/`` and automatic resume.

Layout (the contract with ``alum-export``)::

    OUTPUT/config.yaml                 the resolved run config (data.path -> the data-bin and its tokenizer/)
    OUTPUT/checkpoints/step-N/
        model/                         ``save_model`` output (HF save_pretrained: config.json + safetensors)
        train_state.pt                 step, optimizer, scheduler, GradScaler, per-rank data-loader
                                       positions and RNG states (python, numpy, torch, cuda), the config
    OUTPUT/COMPLETED                   {"step": N} once max_steps are done (the SLURM launcher's signal)

Atomicity: everything is written into ``step-N.tmp/``, every file is fsync'ed, then the folder is renamed
to ``step-N`` and the parent directory fsync'ed; a killed save leaves only a ``.tmp`` folder, which
:func:`latest_checkpoint` ignores and the next save removes.  Keep-last-k deletes older ``step-*``.

Self-verification: before the rename, each file is read back and its size and CRC-32 are recorded in
``step-N/checksums.json`` (and the safetensors header / torch zip directory are parsed); older checkpoints
are pruned only after that.  :func:`verify_checkpoint` re-checks the sums, loads ``train_state.pt`` with
``weights_only=True`` (RNG states, config and data positions are stored as tensors and plain types, so no
pickled code can run) and refuses NaN/Inf weights or optimizer moments; resume walks back from the newest
checkpoint to the newest one that passes (:func:`newest_intact_checkpoint`).  Files and folders follow the
umask (``0644``/``0755`` under umask 022).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..atomic import fsync_dir
from ..run_identity import check_same_identity
from ..config import config_from_dict, config_to_dict, diff_configs
from ..diskspace import disk_full_error, is_disk_full, space_warning, tree_bytes
from ..integrity import (IntegrityError, apply_umask, check_structure, first_nonfinite, safe_torch_load,
                         verify_checksums, write_checksums)
from . import distributed as D
from .config import SPEED_ONLY, TrainConfig, resume_overrides
from .metrics import LOG
from .step import NonFiniteError

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "train_state.pt"
MODEL_DIR = "model"
STEP_DIR_RE = re.compile(r"^step-(\d+)$")  # a complete checkpoint's folder; a save in progress is step-N.tmp


def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR


def step_of(path: str | os.PathLike) -> int | None:
    """The step of a ``step-N`` checkpoint folder (None for any other name, ``step-N.tmp`` included)."""
    m = STEP_DIR_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(dirpath)


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (``step-N`` folders with ``model/`` and ``train_state.pt``), oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        step = step_of(p)
        if step is not None and p.is_dir() and (p / STATE_FILE).is_file() and (p / MODEL_DIR).is_dir():
            out.append((step, p))
    return sorted(out)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of the run in ``output_dir`` (None when there is none)."""
    ck = list_checkpoints(output_dir)
    return ck[-1][1] if ck else None


def rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU, and CUDA when available).

    Plain types and tensors only (numpy's key array becomes a tensor), so ``weights_only=True`` loads it."""
    key, keys, pos, has_gauss, gauss = np.random.get_state()
    st = {"python": random.getstate(),
          "numpy": {"key": str(key), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                    "has_gauss": int(has_gauss), "gauss": float(gauss)},
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    npst = st["numpy"]
    if isinstance(npst, dict):
        npst = (npst["key"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["gauss"])
    np.random.set_state(npst)
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(output_dir: str | os.PathLike, step: int, save_model_fn: Callable[[Path], None],
                    state: dict[str, Any], keep_last: int) -> Path:
    """Write ``checkpoints/step-N`` atomically (rank 0 only) and prune to the newest ``keep_last``.

    Disk space: a warning comes before the write when less is free than the previous checkpoint's size, and
    after it when the next one will not fit; a write that runs out of space removes ``step-N.tmp`` and
    raises :class:`~alum_pretrain.diskspace.DiskFullError` naming the folder, the bytes needed and the last
    intact checkpoint (which a re-run resumes from)."""
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    prev = latest_checkpoint(output_dir)
    prev_bytes = tree_bytes(prev) if prev is not None else 0
    warning = space_warning(root, f"checkpoint step-{step}", prev_bytes)
    if warning:
        LOG.warning(warning)
    tmp = root / f"step-{step}.tmp"
    try:
        final = _write_checkpoint(root, step, save_model_fn, state)
    except Exception as e:
        if not is_disk_full(e):
            raise
        written = tree_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        intact = (f"the last intact checkpoint is {prev}" if prev is not None
                  else "no checkpoint was written before this one")
        raise disk_full_error(root, f"checkpoint step-{step}", max(prev_bytes, written) or None, intact,
                              e) from e
    for _s, p in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob("step-*.tmp"):  # leftovers of killed saves
        shutil.rmtree(p, ignore_errors=True)
    warning = space_warning(root, "the next checkpoint", tree_bytes(final))
    if warning:
        LOG.warning(warning)
    return final


def _write_checkpoint(root: Path, step: int, save_model_fn: Callable[[Path], None], state: dict[str, Any]) -> Path:
    """``step-N.tmp`` written, verified and renamed to ``step-N``."""
    final = root / f"step-{step}"
    tmp = root / f"step-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model_fn(tmp / MODEL_DIR)
    torch.save(state, tmp / STATE_FILE)
    apply_umask(tmp)
    _fsync_tree(tmp)
    # Verify before anything older is pruned: the files parse and their bytes are read back and recorded.
    for f in sorted(tmp.rglob("*")):
        if f.is_file():
            check_structure(f)
    write_checksums(tmp)
    apply_umask(tmp / "checksums.json")
    fsync_dir(tmp)
    if final.exists():  # a re-save of the same step (e.g. a signal right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    return final


def load_state(ckpt: Path, trust: bool = False) -> dict[str, Any]:
    """``train_state.pt`` through the safe loader (``trust`` = the full unpickler, for old checkpoints)."""
    return safe_torch_load(ckpt / STATE_FILE, trust=trust, what="training state",
                           trust_flag="--train.trust_checkpoint=true")


def model_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """The weights of ``ckpt/model`` (every ``*.safetensors`` file), IntegrityError naming a damaged file."""
    from safetensors.torch import load_file

    files = sorted((ckpt / MODEL_DIR).glob("*.safetensors"))
    if not files:
        raise IntegrityError(f"{ckpt / MODEL_DIR}: no *.safetensors weights")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            out.update(load_file(str(f)))
        except Exception as e:  # noqa: BLE001 - SafetensorError and friends: name the file
            raise IntegrityError(f"{f}: unreadable weights ({type(e).__name__}: {e})") from e
    return out


def _optimizer_tensors(state: dict) -> list[tuple[str, torch.Tensor]]:
    opt = state.get("optimizer") if isinstance(state, dict) else None
    out = []
    for pid, st in ((opt or {}).get("state") or {}).items():
        for k, v in st.items():
            out.append((f"optimizer state {pid}.{k}", v))
    return out


def verify_checkpoint(ckpt: Path, trust: bool = False) -> dict[str, Any]:
    """Check ``ckpt`` end to end and return its training state; IntegrityError naming the file and reason.

    Checks: the recorded sizes and checksums (checkpoints written before checksums existed are checked by
    loading only), ``train_state.pt`` loads safely, the weights load, and weights and optimizer moments are
    finite."""
    ckpt = Path(ckpt)
    if not verify_checksums(ckpt):
        for f in sorted(ckpt.rglob("*")):
            if f.is_file():
                check_structure(f)
    state = load_state(ckpt, trust=trust)
    if not isinstance(state, dict) or "step" not in state:
        raise IntegrityError(f"{ckpt / STATE_FILE}: not a training state (no 'step')")
    bad = first_nonfinite(model_tensors(ckpt))
    if bad is not None:
        raise IntegrityError(f"{ckpt / MODEL_DIR}: weight {bad} holds NaN/Inf; a diverged or damaged checkpoint")
    bad = first_nonfinite(_optimizer_tensors(state))
    if bad is not None:
        raise IntegrityError(f"{ckpt / STATE_FILE}: {bad} holds NaN/Inf")
    return state


def newest_intact_checkpoint(output_dir: str | os.PathLike, warn: Callable[[str], None], trust: bool = False
                             ) -> tuple[Path | None, dict | None, list[str]]:
    """``(path, state, problems)`` of the newest checkpoint that passes :func:`verify_checkpoint`.

    Each failing newer checkpoint is reported through ``warn`` (file and reason) and skipped; ``problems``
    lists them. ``(None, None, problems)`` when none passes (or there is none)."""
    problems: list[str] = []
    for _step, path in reversed(list_checkpoints(output_dir)):
        try:
            return path, verify_checkpoint(path, trust=trust), problems
        except IntegrityError as e:
            problems.append(str(e))
            warn(f"checkpoint {path} is unusable: {e}; falling back to the previous one")
    return None, None, problems


# ---- a run's save and resume (the engine's own part is its stepper's save/load) --------------------


def nan_remedy(run, first_bad_step: int | None = None) -> str:
    """The command that resumes a diverged run with a lower learning rate from the newest checkpoint whose
    weights were written before the divergence began (step ``first_bad_step - 2`` or earlier: the update of
    the step before the first non-finite one may already have produced the weights that overflow)."""
    lr = run.cfg.optim.lr / 10
    before = [(s, p) for s, p in list_checkpoints(run.out) if first_bad_step is None or s <= first_bad_step - 2]
    start = f" --train.resume_from={before[-1][0]}" if before and first_bad_step is not None else ""
    if not before:
        return (f"no checkpoint precedes the divergence: start again with a lower learning rate in a new run "
                f"folder: alum-train --config {run.out / 'config.yaml'} --optim.lr={lr:g} "
                f"--train.output_dir={run.out}-lr{lr:g}")
    where = f"from {before[-1][1].name}" if start else "from the newest checkpoint"
    return (f"resume it {where} with a lower learning rate (the same launcher, e.g. torchrun/sbatch, for several "
            f"processes): alum-train --config {run.out / 'config.yaml'} --optim.lr={lr:g} "
            f"--train.resume_override=optim.lr{start} (with fp16, --train.precision cannot change on resume: "
            "bf16/fp32 need a new --train.output_dir)")


def last_good_checkpoint(run) -> str:
    """A sentence naming the newest checkpoint of ``run.out`` (for the error that stops a diverged run)."""
    ck = latest_checkpoint(run.out)
    return (f"the last good checkpoint is {ck} (checkpoints are never written with non-finite weights)"
            if ck is not None else f"no checkpoint was written in {run.out}")


def first_nonfinite_weight(model: torch.nn.Module, env: D.DistEnv) -> str | None:
    """Name of the first parameter holding NaN/Inf, the same on every rank (collective under ZeRO-3).

    A ZeRO-3 parameter's own data is empty: the weight lives in the ranks' partitions (``ds_tensor``), so
    each rank checks its partitions and the ranks agree on the first name found."""
    named = [(n, getattr(p, "ds_tensor", p)) for n, p in model.named_parameters()]
    bad = first_nonfinite(named)
    if env.distributed and any(hasattr(p, "ds_tensor") for p in model.parameters()):
        bad = next((b for b in D.gather_objects(env, bad) if b is not None), None)
    return bad


def save(run, step: int) -> None:
    """Checkpoint ``step`` through the run's stepper (every rank takes part; rank 0 writes ``step-N``).

    Refuses (NonFiniteError, on every rank alike: the replicas are identical) to write NaN/Inf weights."""
    bad = first_nonfinite_weight(run.model, run.env)
    if bad is not None:
        raise NonFiniteError(f"step {step}: parameter {bad} holds NaN/Inf; no checkpoint written; "
                             f"{last_good_checkpoint(run)}; {nan_remedy(run)}")
    run.stepper.save(step)


def restore(run) -> int:
    """Resume from the newest complete checkpoint in ``train.output_dir``; returns the step (0 = fresh)."""
    env = run.env
    trust = run.cfg.train.trust_checkpoint
    found = (None, None, [])
    chosen = chosen_checkpoint(run.cfg, run.out)
    if env.is_main and chosen is not None:  # --train.resume_from: that one or an error
        try:
            found = (chosen, verify_checkpoint(chosen, trust=trust), [])
        except IntegrityError as e:
            raise ValueError(f"--train.resume_from={run.cfg.train.resume_from}: {e}") from e
    elif env.is_main:  # verify newest-first; damaged ones are named and skipped (verify_checkpoint)
        found = newest_intact_checkpoint(run.out, LOG.warning, trust=trust)
    ckpt, problems = D.broadcast_object(env, (found[0], found[2]))
    if ckpt is None:
        if problems:
            raise ValueError(
                f"{checkpoints_dir(run.out)}: no intact checkpoint to resume from:\n  " + "\n  ".join(problems)
                + "\nmove the damaged step-N folders away (or use a new --train.output_dir) to start over")
        return 0
    state = found[1] if env.is_main else load_state(ckpt, trust=trust)
    check_resumable(run, ckpt, state)
    run.stepper.load(ckpt, state)  # weights and optimizer state (DDP) or the DeepSpeed engine
    apply_resume_overrides(run, state)
    run.loader.load_state_dict(state["loader"])
    rngs = state["rng"]
    if len(rngs) == env.world_size:
        set_rng_state(rngs[env.rank])
    else:
        run.logger.info(f"world size changed ({len(rngs)} -> {env.world_size}): dropout RNG streams are re-seeded")
    note_thread_change(run, state)
    if chosen is not None and env.is_main:
        set_aside_newer(run, int(state["step"]))
    run.logger.resume_at(int(state["step"]))
    run.logger.info(f"resumed from {ckpt} at step {state['step']}")
    return int(state["step"])


def note_thread_change(run, state: dict) -> None:
    """Say so when a CPU run resumes with another intra-op thread count than its checkpoint was written with.

    The run continues correctly, but float reductions (matmuls, sums) split over another number of threads
    round differently, so it is no longer bit-identical to an uninterrupted run (1 vs 2 threads: up to ~1e-6
    in the weights of a 6-step tiny run); at the same count a resumed run is bit-identical."""
    saved = state.get("intra_op_threads")
    if run.env.device.type == "cpu" and saved is not None and int(saved) != torch.get_num_threads():
        run.logger.info(f"intra-op threads changed ({int(saved)} when saved -> {torch.get_num_threads()} now): the "
                        "resumed run matches an uninterrupted one to float rounding, not bit for bit (set "
                        "OMP_NUM_THREADS to the old count for bit-identity)")


def apply_resume_overrides(run, state: dict) -> None:
    """Apply and record the ``--train.resume_override`` keys whose value differs from the checkpoint's.

    ``optim.lr``: every parameter group's base and current learning rate are scaled by new/old, so the
    schedule keeps its shape at the new peak; ``train.max_steps``: the schedule (built for the new length)
    sets the current rate for the resumed step, and the masking curriculum follows the new length.
    Under DeepSpeed the same objects are changed after the engine restored them: ``run.optimizer`` is the
    optimizer that ZeRO wraps (whose parameter groups its step uses and ``engine.get_lr()`` reports) and
    ``run.scheduler`` is the engine's ``lr_scheduler``, saved with the new base rates at the next checkpoint."""
    saved = state["config"]
    changed = {k: (_get(saved, k), _get(config_to_dict(run.cfg), k)) for k in resume_overrides(run.cfg.train)}
    changed = {k: v for k, v in changed.items() if v[0] != v[1]}
    if not changed:
        return
    sched = run.scheduler
    if "optim.lr" in changed:
        ratio = float(changed["optim.lr"][1]) / float(changed["optim.lr"][0])
        for g in run.optimizer.param_groups:
            g["initial_lr"] = g.get("initial_lr", g["lr"]) * ratio
        sched.base_lrs = [b * ratio for b in sched.base_lrs]
    for g, base, fn in zip(run.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        g["lr"] = base * fn(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in run.optimizer.param_groups]  # what get_last_lr() reports
    for key, (was, now) in changed.items():
        run.logger.event({"step": int(state["step"]), "kind": "resume_override", "key": key, "was": was, "now": now})
        run.logger.info(f"resume override at step {state['step']}: --{key} {was} -> {now}")


def check_resumable(run, ckpt: Path, state: dict) -> None:
    """ValueError unless ``state`` (of ``ckpt``) was written with the same result-changing config, global
    batch, data-bin and tokenizer as ``run``."""
    check_state(run.cfg, run.global_batch, run.identity, ckpt, state)


def check_state(cfg: TrainConfig, global_batch: int, identity: dict | None, ckpt: Path, state: dict) -> None:
    """:func:`check_resumable` from the parts of a run (usable before the run is built)."""
    if identity is not None:  # first: another vocabulary makes every other comparison moot
        check_same_identity(state.get("identity"), identity, ckpt, cfg.data.path)
    saved = config_from_dict(TrainConfig, state["config"])
    # With a recorded fingerprint the data-bin is compared by content, so it may have moved.
    ignore = SPEED_ONLY + (("data.path",) if state.get("identity") and identity is not None else ())
    ignore += tuple(resume_overrides(cfg.train))
    bad = diff_configs(saved, cfg, ignore=ignore)
    if bad:
        key = bad[0]
        sv, nv = _get(config_to_dict(saved), key), _get(config_to_dict(cfg), key)
        raise ValueError(
            f"{ckpt}: cannot resume: --{key} was {sv!r} in the checkpointed run but is {nv!r} now "
            f"({len(bad)} result-changing key(s) differ: {', '.join(bad)}); restore the original value or use "
            "a new --train.output_dir")
    if state["global_batch"] != global_batch:
        raise ValueError(
            f"{ckpt}: cannot resume: the global batch was {state['global_batch']} sequences and is now "
            f"{global_batch} (--train.batch_size x --train.grad_accum x world size, or "
            "--train.global_batch_size); keep the global batch to resume")


def chosen_checkpoint(cfg: TrainConfig, out: Path) -> Path | None:
    """The checkpoint ``--train.resume_from`` names (None when unset); ValueError when it is not one of
    this run's complete checkpoints."""
    v = str(cfg.train.resume_from or "").strip()
    if not v:
        return None
    p = checkpoints_dir(out) / f"step-{v}" if v.isdigit() else Path(v)
    mine = {c.resolve(): c for _s, c in list_checkpoints(out)}
    if p.resolve() not in mine:
        have = ", ".join(c.name for _s, c in list_checkpoints(out)) or "none"
        raise ValueError(f"--train.resume_from={v}: not a complete checkpoint of {out} (its checkpoints: {have})")
    return mine[p.resolve()]


def set_aside_newer(run, step: int) -> None:
    """Rename the checkpoints newer than ``step`` to ``abandoned-step-N`` (kept; never resumed from)."""
    for s, p in list_checkpoints(run.out):
        if s > step:
            dst = p.with_name(f"abandoned-{p.name}")
            if dst.exists():
                shutil.rmtree(dst)
            os.replace(p, dst)
            run.logger.event({"step": step, "kind": "resume_from", "abandoned": str(dst)})
            run.logger.info(f"resuming from step {step}: {p} renamed {dst.name}")


def check_before_start(cfg: TrainConfig, out: Path, global_batch: int, identity: dict | None) -> None:
    """Refuse a resume that :func:`restore` would refuse, before the run folder is touched.

    Checks the newest complete checkpoint of ``out`` (a damaged one is left to :func:`restore`, which
    falls back past it and re-checks the one it takes)."""
    ckpt = chosen_checkpoint(cfg, out) or latest_checkpoint(out)
    if ckpt is None:
        return
    try:  # memory-mapped: the optimizer state is not read, only the config and fingerprint
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - damaged, or needs --train.trust_checkpoint: restore() decides
        return
    if isinstance(state, dict) and "config" in state and "global_batch" in state:
        check_state(cfg, global_batch, identity, ckpt, state)


def _get(d: dict, dotted: str):
    for p in dotted.split("."):
        d = d.get(p, {}) if isinstance(d, dict) else None
    return d
