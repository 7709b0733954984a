"""Fine-tuning methods: a tiny registry, ``METHODS``: name -> (method class, config section or None).

Adding a method: a :class:`Method` subclass with a config dataclass, one entry here, and its section in
:class:`alum_pretrain.finetune.config.FinetuneConfig`.
"""

from __future__ import annotations

from typing import Optional

from .base import Method, Plain, TrainContext
from .embedding_adv import EmbeddingAdvConfig, FreeATConfig, FreeLBConfig, PGDConfig
from .freeat import FreeAT
from .freelb import FreeLB
from .pgd import PGD
from .rift import RIFT, RIFTConfig
from .smart import Smart, SmartConfig

# name -> (class, the section of the fine-tuning config it reads; None: no settings).
# ``smart`` and ``alum`` are one method (ALUM fine-tuning = SMART's smoothness term).
METHODS: dict[str, tuple[type[Method], Optional[str]]] = {
    "plain": (Plain, None),
    "smart": (Smart, "smart"),
    "alum": (Smart, "smart"),
    "freelb": (FreeLB, "freelb"),
    "pgd": (PGD, "pgd"),
    "freeat": (FreeAT, "freeat"),
    "rift": (RIFT, "rift"),
}
METHOD_NAMES = tuple(METHODS)


def build_method(name: str, cfg, regression: bool) -> Method:
    """The method ``name`` built from its section of ``cfg``, the root fine-tuning config."""
    if name not in METHODS:
        raise ValueError(f"--method={name!r}: unknown method (choose one of {', '.join(METHOD_NAMES)})")
    cls, section = METHODS[name]
    return cls(getattr(cfg, section) if section else None, regression)


__all__ = ["Method", "Plain", "TrainContext", "EmbeddingAdvConfig", "FreeLBConfig", "PGDConfig", "FreeATConfig",
           "RIFTConfig", "SmartConfig", "Smart", "FreeLB", "PGD", "FreeAT", "RIFT", "build_method", "METHODS",
           "METHOD_NAMES"]
