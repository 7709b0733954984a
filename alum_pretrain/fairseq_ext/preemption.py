"""Save-on-signal for ``fairseq-train``: SIGUSR1 / SIGTERM -> checkpoint at the current update, then exit 0.

fairseq 0.12 has no handler of its own: a stop signal (SLURM's ``--signal=USR1@180`` before the time limit,
SIGTERM at the limit or on preemption) either is ignored or kills the run, and every update since the last
``--save-interval-updates`` is lost.  This module gives it the native engine's behaviour:

* the handlers only set a flag (nothing unsafe happens inside a signal handler);
* ``fairseq_cli.train.validate_and_save`` -- which ``train()`` looks up as a module global at every update,
  after ``trainer.train_step`` -- is wrapped: after the original has run, the flag is max-all-reduced over
  all ranks (every rank calls ``validate_and_save`` once per update, so the collective is matched and all
  ranks stop at the same update even when the signal reached only some of them); when it is set, the
  wrapper saves with fairseq's own ``checkpoint_utils.save_checkpoint(cfg.checkpoint, trainer, epoch_itr,
  valid_loss)`` (on every rank: the save consolidates sharded optimizer state collectively) unless the
  original already saved at this update, and returns ``should_stop=True``.  fairseq-train then leaves its
  loops, exits 0, and the same command resumes from ``checkpoint_last.pt`` (fairseq's iterator state makes
  it skip the batches already trained on in the epoch);
* when the environment variable ``ALUM_FAIRSEQ_STOP_FILE`` names a file, the saving rank writes a small JSON
  there ({"signal", "num_updates", "checkpoint"}) after the checkpoint, atomically.  It tells a job script
  that an exit status 0 means "stopped on a signal, resume me", not "reached --max-update"
  (``launch/templates/job.sbatch`` removes it before the step and requeues when it exists);
* ``--save-dir`` is locked for the process (:mod:`alum_pretrain.runlock`) when fairseq first checks it
  (``checkpoint_utils.verify_checkpoint_directory``, master process only): a second fairseq-train on the
  same folder exits 2 at once naming the first; a killed run's lock is released by the kernel, a clean exit
  removes the lock file;
* the checkpoint a run resumes from is checked against the data-bin and tokenizer it was trained on
  (:mod:`alum_pretrain.fairseq_ext.identity`) before the first update: another one is refused, exit 2;
* ``checkpoint_last.pt`` is made atomic: fairseq writes the first checkpoint file of a save through a
  ``.tmp`` file + rename (``torch_persistent_save``) but *copies* it onto the others (``checkpoint_last.pt``
  after ``checkpoint_E_U.pt``) with ``PathManager.copy`` = ``shutil.copyfile`` in place, so a kill during
  the copy leaves a truncated ``checkpoint_last.pt`` that the resume then loads.  The copy now goes to
  ``DST.tmp`` and is renamed over ``DST`` (local paths only; others keep fairseq's copy).

All of this is installed only inside a fairseq-train process (``fairseq-train`` / ``fairseq-hydra-train``
console scripts, ``python -m fairseq_cli.train``, and the per-GPU processes fairseq spawns from them), when
the plugin is imported by ``--user-dir``: importing the plugin anywhere else (tests, exporters, notebooks)
changes no signal handler and patches nothing.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import sys

from ..atomic import atomic_file, write_json

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
STOP_FILE_ENV = "ALUM_FAIRSEQ_STOP_FILE"
_TRAIN_MODULE = "fairseq_cli.train"
_TRAIN_SCRIPTS = ("fairseq-train", "fairseq-hydra-train")

_requested = 0  # number of the last stop signal received by this process (0 = none)
_installed = False


def requested_signal() -> int:
    """The stop signal this process received (0 when none)."""
    return _requested


def _on_signal(signum, frame):  # noqa: ARG001  (signal handler signature)
    global _requested
    _requested = signum


def _train_modules() -> list:
    """The loaded module object(s) holding fairseq-train's ``train``/``validate_and_save`` globals.

    ``python -m fairseq_cli.train`` runs the module as ``__main__`` (and fairseq's spawned workers re-run it
    as ``__mp_main__``), without a ``fairseq_cli.train`` entry in ``sys.modules``; the console script
    imports ``fairseq_cli.train``.  Patch whichever of them exist.
    """
    mods = []
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None) == _TRAIN_MODULE:
        mods.append(main)
    mod = sys.modules.get(_TRAIN_MODULE)
    if mod is not None and all(mod is not m for m in mods):
        mods.append(mod)
    return [m for m in mods if callable(getattr(m, "validate_and_save", None))]


def _in_fairseq_train() -> bool:
    """True in a fairseq-train process (the CLI or its spawned workers), False when merely imported."""
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None) in (_TRAIN_MODULE, "fairseq_cli.hydra_train"):
        return True
    argv0 = sys.argv[0] if sys.argv else ""  # spawned workers get the parent's sys.argv back
    return bool(_train_modules()) and (
        os.path.basename(argv0).startswith(_TRAIN_SCRIPTS)
        or argv0.replace(os.sep, "/").endswith(("fairseq_cli/train.py", "fairseq_cli/hydra_train.py")))


def _saved_by_original(cfg, trainer, epoch_itr, end_of_epoch: bool) -> bool:
    """Whether fairseq 0.12's ``validate_and_save`` already saved at this update, given should_stop=False.

    Mirrors its ``do_save`` (fairseq_cli/train.py); computed from the config, the update count and the
    epoch only, so every rank reaches the same answer (they must all call save_checkpoint, or none).
    """
    ck, num_updates = cfg.checkpoint, trainer.get_num_updates()
    return bool(
        (end_of_epoch and epoch_itr.epoch % ck.save_interval == 0)
        or (ck.save_interval_updates > 0 and num_updates > 0 and num_updates % ck.save_interval_updates == 0
            and num_updates >= cfg.dataset.validate_after_updates))


def _any_rank(signum: int, trainer) -> int:
    """Max of the ranks' stop-signal numbers (so all ranks agree); local value when not distributed."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return signum
    device = trainer.device if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([signum], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # default (global) group: every rank calls validate_and_save
    return int(flag.item())


def _write_stop_file(path: str, info: dict) -> None:
    write_json(path, info, indent=None)


def _wrap_validate_and_save(original):
    def validate_and_save(cfg, trainer, task, epoch_itr, valid_subsets, end_of_epoch):
        valid_losses, should_stop = original(cfg, trainer, task, epoch_itr, valid_subsets, end_of_epoch)
        signum = _any_rank(_requested, trainer)  # every call, every rank: the collective stays matched
        if not signum or should_stop:
            # No signal, or fairseq stops here anyway (--max-update, patience, --stop-time-hours): it has
            # saved, and the run has reached its own end -> no stop file (the job is complete).
            return valid_losses, should_stop
        from fairseq import checkpoint_utils

        num_updates = trainer.get_num_updates()
        cp_path = None
        if not _saved_by_original(cfg, trainer, epoch_itr, end_of_epoch):
            cp_path = checkpoint_utils.save_checkpoint(cfg.checkpoint, trainer, epoch_itr, valid_losses[0])
            if cp_path is not None and hasattr(task, "post_save"):
                task.post_save(cp_path, num_updates)
        name = signal.Signals(signum).name
        if trainer.should_save_checkpoint_on_current_rank:
            last = os.path.join(cfg.checkpoint.save_dir, f"checkpoint_last{trainer.checkpoint_suffix}.pt")
            what = "nothing saved (--no-save)" if cfg.checkpoint.no_save else f"saved {last}"
            logger.info(f"{name} received: {what} at update {num_updates}; stopping (exit 0) -- run the same "
                        "command again to resume from it")
            stop_file = os.environ.get(STOP_FILE_ENV)
            if stop_file:
                _write_stop_file(stop_file, {"signal": name, "num_updates": num_updates,
                                             "checkpoint": None if cfg.checkpoint.no_save else last})
        return valid_losses, True

    validate_and_save.__wrapped__ = original
    validate_and_save.__doc__ = original.__doc__
    return validate_and_save


class _AtomicCopyPathManager:
    """fairseq's PathManager for ``checkpoint_utils`` only, with a copy that never leaves a partial file."""

    def __init__(self, base):
        self._base = base

    def __getattr__(self, name):
        return getattr(self._base, name)

    def copy(self, src_path: str, dst_path: str, overwrite: bool = False) -> bool:
        if not self._base.supports_rename(dst_path):
            return self._base.copy(src_path, dst_path, overwrite=overwrite)
        if not overwrite and os.path.exists(dst_path):
            return False
        with atomic_file(dst_path) as tmp:  # readers see the old file or the complete new one
            shutil.copyfile(src_path, tmp)
        return True


_locks: list = []  # the --save-dir lock of this process, held until it exits


def _locking_verify(original):
    """``verify_checkpoint_directory`` (called by the master process only, before anything is saved) that
    first locks ``--save-dir`` for this process (:mod:`alum_pretrain.runlock`); a second fairseq-train on
    the same folder prints why and exits 2."""
    def verify_checkpoint_directory(save_dir: str) -> None:
        from ..runlock import FolderBusyError, lock_folder

        if not _locks:
            try:
                _locks.append(lock_folder(save_dir, tool="fairseq-train"))
                atexit.register(_locks[-1].release)  # a clean exit (0, 2, 3) leaves no lock file
            except FolderBusyError as exc:
                print(f"fairseq-train: error: {exc}", file=sys.stderr, flush=True)
                raise SystemExit(2) from None
        return original(save_dir)

    verify_checkpoint_directory.__wrapped__ = original
    return verify_checkpoint_directory


def install() -> bool:
    """Install the handlers and patches once, in a fairseq-train process only; True when installed."""
    global _installed
    if _installed:
        return True
    if not _in_fairseq_train():
        return False
    mods = _train_modules()
    if not mods:  # plugin imported before fairseq_cli.train: nothing to wrap (not how fairseq-train loads it)
        return False
    for mod in mods:
        if not hasattr(mod.validate_and_save, "__wrapped__"):
            mod.validate_and_save = _wrap_validate_and_save(mod.validate_and_save)
    from fairseq import checkpoint_utils

    from .identity import install_identity_check
    from .strict import install_strict

    install_strict(mods)  # non-finite updates skipped and counted; data errors one line (exit 2 / 3)
    install_identity_check()  # a resume refuses another data-bin or tokenizer (exit 2)
    if not hasattr(checkpoint_utils.verify_checkpoint_directory, "__wrapped__"):
        checkpoint_utils.verify_checkpoint_directory = _locking_verify(checkpoint_utils.verify_checkpoint_directory)
    if not isinstance(checkpoint_utils.PathManager, _AtomicCopyPathManager):
        checkpoint_utils.PathManager = _AtomicCopyPathManager(checkpoint_utils.PathManager)
    for sig in STOP_SIGNALS:
        try:
            # Replaces SIG_IGN inherited from the job script's `trap '' USR1` (only the launcher ignores it).
            signal.signal(sig, _on_signal)
        except ValueError:  # not the main thread: the signal cannot be handled here
            logger.warning(f"cannot install a {sig.name} handler outside the main thread: no save on {sig.name}")
    _installed = True
    return True


__all__ = ["install", "requested_signal", "STOP_SIGNALS", "STOP_FILE_ENV"]
