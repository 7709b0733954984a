"""fairseq plugin: task ``alum_masked_lm`` and criterion ``alum_masked_lm`` (ALUM pre-training).

Load it with ``fairseq-train DATA --user-dir alum_pretrain/fairseq_ext --task alum_masked_lm
--criterion alum_masked_lm --arch roberta_base ...`` or import it (``import alum_pretrain.fairseq_ext``):
both register the task and criterion exactly once, under the module names
``alum_pretrain.fairseq_ext.task`` / ``.criterion``.  This is the only package of the project that imports
fairseq; when fairseq is not installed, importing it registers nothing (the exporter
:mod:`alum_pretrain.fairseq_ext.export_hf` needs only torch + transformers).  Inside fairseq-train it also
makes SIGUSR1/SIGTERM save a checkpoint at the current update and end the run with status 0
(:mod:`alum_pretrain.fairseq_ext.preemption`), and refuses to resume a checkpoint onto another data-bin or
tokenizer (:mod:`alum_pretrain.fairseq_ext.identity`).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

if __name__ != "alum_pretrain.fairseq_ext":
    # Imported by fairseq's --user-dir as a top-level package named after the folder: delegate to the
    # canonical package so the registrations happen once even if both names get imported.
    _root = str(Path(__file__).resolve().parents[2])
    if importlib.util.find_spec("alum_pretrain") is None and _root not in sys.path:
        sys.path.insert(0, _root)
    import alum_pretrain.fairseq_ext  # noqa: F401,E402
elif importlib.util.find_spec("fairseq") is not None:
    import argparse

    import torch

    # fairseq-fixed calls torch.load(path) without weights_only; torch >= 2.6 defaults to weights_only=True
    # and refuses the argparse.Namespace that fairseq pickles into every checkpoint, which breaks
    # --restore-file (resume, continual pre-training).  Allow exactly that plain attribute container.
    torch.serialization.add_safe_globals([argparse.Namespace])

    from . import criterion, preemption, task  # noqa: F401,E402  (register_task / register_criterion)

    # Save-on-signal (SIGUSR1/SIGTERM -> checkpoint at the current update, exit 0); a no-op unless this
    # process is fairseq-train itself.
    preemption.install()
