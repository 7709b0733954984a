"""Data: the fairseq-compatible mmap format, the data-bin layout and the pre-training loaders."""

from .databin import DataBin
from .indexed import IndexedDatasetBuilder, MMapIndexedDataset
from .pretrain import PretrainLoader, TokenTables, build_loader, build_token_tables, random_pool

__all__ = [
    "DataBin",
    "IndexedDatasetBuilder",
    "MMapIndexedDataset",
    "PretrainLoader",
    "TokenTables",
    "build_loader",
    "build_token_tables",
    "random_pool",
]
