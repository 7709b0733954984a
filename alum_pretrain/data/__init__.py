"""Data: the fairseq-compatible mmap format, the data-bin layout and the pre-training loaders.

* :mod:`.indexed`  the ``.bin``/``.idx``/``.doc.npy`` files of one split
* :mod:`.databin`  a prepared corpus (``manifest.json``, ``tokenizer/``, ``shardK/``)
* :mod:`.tokens`   per-vocabulary tables of its tokenizer (specials, word continuations, random pool)
* :mod:`.plans`    epoch plans: which sentence pairs / blocks an epoch holds (sizes only, no tokens)
* :mod:`.samples`  plan rows -> token arrays -> batches
* :mod:`.loader`   :class:`PretrainLoader`: epochs, shards, ranks, workers, resume
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# The format layer (databin, indexed, plans) needs numpy only, so ``data_prep`` and its workers can read and
# write corpora without loading torch.  The modules that make tensors load on first use of their names.
from .databin import DataBin, load_manifest
from .indexed import IndexedDatasetBuilder, MMapIndexedDataset
from .plans import PlanStats

_TENSOR_MODULES = {
    "PretrainLoader": "loader",
    "build_loader": "loader",
    "SampleBuilder": "samples",
    "TokenTables": "tokens",
    "build_token_tables": "tokens",
}

if TYPE_CHECKING:
    from .loader import PretrainLoader, build_loader
    from .samples import SampleBuilder
    from .tokens import TokenTables, build_token_tables


def __getattr__(name: str):
    """Import a tensor-making module (and torch) when one of its names is first asked for."""
    if name in _TENSOR_MODULES:
        import importlib

        value = getattr(importlib.import_module(f".{_TENSOR_MODULES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DataBin",
    "IndexedDatasetBuilder",
    "MMapIndexedDataset",
    "PlanStats",
    "PretrainLoader",
    "SampleBuilder",
    "TokenTables",
    "build_loader",
    "build_token_tables",
    "load_manifest",
]
