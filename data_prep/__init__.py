"""Corpus preparation for alum-pretrain: raw Wikipedia / OpenWebText / text -> sharded binarized data-bin.

Python API::

    from data_prep import PrepConfig, prepare
    cfg = PrepConfig(inputs=["wiki.test.raw"], format="wikitext", out="data-bin", vocab="vocab.txt",
                     shards=2, workers=2)
    manifest = prepare(cfg)

Command line: ``alum-prep`` (:mod:`data_prep.cli`).  Design and layout: :mod:`data_prep.pipeline`,
:mod:`alum_pretrain.data.databin`.
"""

from .config import PrepConfig
from .hygiene import GarbledCorpusError
from .pipeline import EmptyCorpusError, prepare

__all__ = ["prepare", "PrepConfig", "EmptyCorpusError", "GarbledCorpusError"]
