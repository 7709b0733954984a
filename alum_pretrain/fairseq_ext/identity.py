"""A fairseq checkpoint knows its data-bin and tokenizer, and a resume refuses another one.

The ``alum_masked_lm`` task puts into every checkpoint it saves (fairseq stores ``task.state_dict()`` as the
checkpoint's ``task_state``, inside the one ``.pt`` file, so the record cannot be separated from the
weights)::

    task_state["alum_identity"]   run_identity.data_identity: manifest content hash, tokenizer files' hash,
                                  vocabulary size, id offset, special ids
    task_state["alum_tokenizer"]  {file name: bytes} of the tokenizer files (~1 MB), read when the task starts

Inside ``fairseq-train`` (installed by :mod:`alum_pretrain.fairseq_ext.preemption`), the checkpoint that
``checkpoint_utils.load_checkpoint`` restores - ``SAVE_DIR/checkpoint_last.pt`` or ``--restore-file`` - is
checked by :func:`check_resume` right after it is read, before the first update and before anything is
written to ``--save-dir``: a data-bin or tokenizer that differs is refused with
:func:`alum_pretrain.run_identity.check_same_identity`'s message (both fingerprints and what to do), exit 2.
With ``--reset-dataloader`` (continual pre-training: the data position is not restored, another corpus is
allowed) only the vocabulary must agree (tokenizer hash, vocabulary size, id offset, special ids).
Checkpoints without the record (``--task masked_lm``, written before it existed, remapped releases) are
not checked.  ``alum-export CKPT.pt OUT`` ships ``alum_tokenizer`` (:mod:`.export_hf`).
"""

from __future__ import annotations

import os

from ..run_identity import IDENTITY_FIELDS, VOCABULARY_FIELDS, check_same_identity

__all__ = ["IDENTITY_KEY", "TOKENIZER_KEY", "ResumeRefused", "check_resume", "install_identity_check"]

IDENTITY_KEY = "alum_identity"
TOKENIZER_KEY = "alum_tokenizer"
_REMEDY = ("Point DATA at the data-bin the run was trained on (re-prepare it with the checkpoint's tokenizer - "
           "`alum-export CKPT.pt OUT` writes it to OUT - if it was replaced), or start a new run with another "
           "--save-dir")


class ResumeRefused(ValueError):
    """The checkpoint to resume was trained on another data-bin or tokenizer (fairseq-train exits 2)."""


def check_resume(state: dict, task, path: str | os.PathLike, reset_dataloader: bool) -> None:
    """:class:`ResumeRefused` unless the checkpoint ``state`` was trained on ``task``'s data-bin (its
    vocabulary only, with ``reset_dataloader``)."""
    saved = (state.get("task_state") or {}).get(IDENTITY_KEY) if isinstance(state, dict) else None
    now = getattr(task, "identity", None)
    if not saved or now is None:
        return
    try:
        check_same_identity(saved, now, path, task.cfg.data, data_flag="DATA", remedy=_REMEDY,
                            fields=VOCABULARY_FIELDS if reset_dataloader else IDENTITY_FIELDS)
    except ValueError as exc:
        raise ResumeRefused(str(exc)) from None


_loading: list = []  # (task, reset_dataloader) while checkpoint_utils.load_checkpoint runs


def _wrap_load_checkpoint(original):
    def load_checkpoint(cfg, trainer, **passthrough_args):
        _loading.append((trainer.task, bool(cfg.reset_dataloader)))
        try:
            return original(cfg, trainer, **passthrough_args)
        finally:
            _loading.pop()

    load_checkpoint.__wrapped__ = original
    return load_checkpoint


def _wrap_load_to_cpu(original):
    def load_checkpoint_to_cpu(path, *args, **kwargs):
        state = original(path, *args, **kwargs)
        if _loading:  # the training checkpoint (not a model loaded for other purposes)
            task, reset_dataloader = _loading[-1]
            check_resume(state, task, path, reset_dataloader)
        return state

    load_checkpoint_to_cpu.__wrapped__ = original
    return load_checkpoint_to_cpu


def install_identity_check() -> None:
    """Wrap ``checkpoint_utils.load_checkpoint`` / ``load_checkpoint_to_cpu`` (once)."""
    from fairseq import checkpoint_utils

    if not hasattr(checkpoint_utils.load_checkpoint, "__wrapped__"):
        checkpoint_utils.load_checkpoint = _wrap_load_checkpoint(checkpoint_utils.load_checkpoint)
    if not hasattr(checkpoint_utils.load_checkpoint_to_cpu, "__wrapped__"):
        checkpoint_utils.load_checkpoint_to_cpu = _wrap_load_to_cpu(checkpoint_utils.load_checkpoint_to_cpu)
