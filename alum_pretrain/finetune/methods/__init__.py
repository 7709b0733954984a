"""Fine-tuning methods: a tiny registry name -> (class, config section)."""

from __future__ import annotations

from .base import Method, Plain, TrainContext
from .embedding_adv import EmbeddingAdvConfig, FreeATConfig, FreeLBConfig, PGDConfig
from .freeat import FreeAT
from .freelb import FreeLB
from .pgd import PGD
from .smart import Smart, SmartConfig

METHOD_NAMES = ("plain", "smart", "alum", "freelb", "pgd", "freeat", "rift")


def build_method(name: str, cfg, regression: bool) -> Method:
    """``cfg`` is the root fine-tuning config (its per-method sections are read here)."""
    if name == "plain":
        return Plain(None, regression)
    if name in ("smart", "alum"):
        return Smart(cfg.smart, regression)
    if name == "freelb":
        return FreeLB(cfg.freelb, regression)
    if name == "pgd":
        return PGD(cfg.pgd, regression)
    if name == "freeat":
        return FreeAT(cfg.freeat, regression)
    if name == "rift":
        from .rift import RIFT
        return RIFT(cfg.rift, regression)
    raise ValueError(f"--method={name!r}: unknown method (choose one of {', '.join(METHOD_NAMES)})")


__all__ = ["Method", "Plain", "TrainContext", "EmbeddingAdvConfig", "FreeLBConfig", "PGDConfig", "FreeATConfig", "SmartConfig", "Smart", "FreeLB", "PGD",
           "FreeAT", "build_method", "METHOD_NAMES"]
