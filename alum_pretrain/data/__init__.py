"""Data: the fairseq-compatible mmap format, the data-bin layout and the pre-training loaders.

* :mod:`.indexed`  the ``.bin``/``.idx``/``.doc.npy`` files of one split
* :mod:`.databin`  a prepared corpus (``manifest.json``, ``tokenizer/``, ``shardK/``)
* :mod:`.tokens`   per-vocabulary tables of its tokenizer (specials, word continuations, random pool)
* :mod:`.plans`    epoch plans: which sentence pairs / blocks an epoch holds (sizes only, no tokens)
* :mod:`.samples`  plan rows -> token arrays -> batches
* :mod:`.loader`   :class:`PretrainLoader`: epochs, shards, ranks, workers, resume
"""

from .databin import DataBin, load_manifest
from .indexed import IndexedDatasetBuilder, MMapIndexedDataset
from .loader import PretrainLoader, build_loader
from .plans import PlanStats
from .samples import SampleBuilder
from .tokens import TokenTables, build_token_tables

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
