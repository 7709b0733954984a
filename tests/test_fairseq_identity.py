"""The fairseq plugin knows its data and tokenizer: every checkpoint records the data-bin and tokenizer
fingerprint (and the tokenizer files); a resume onto a data-bin re-prepared with another vocabulary of the
same size is refused naming both fingerprints, before any update and with ``--save-dir`` byte-identical;
``alum-export`` ships the tokenizer the checkpoint holds and refuses a ``--tokenizer`` with other ids."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from conftest import requires_fairseq
from engine_helpers import make_stdlib_databin
from test_faults_fairseq import _fairseq_train

pytestmark = [pytest.mark.fairseq, requires_fairseq]
SENTENCE = "the module returns a list of strings for each argument of the function."


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` with its SHA-256 (a byte-for-byte fingerprint of the tree)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _ids(folder: Path) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))(SENTENCE)["input_ids"]


def _train_two_updates(root: Path) -> tuple[Path, Path]:
    db = make_stdlib_databin(root / "data-bin", n_docs=40)
    rc, out = _fairseq_train(db, root / "ck", "--lr", "1e-3", "--max-update", "2")
    assert rc == 0, out[-3000:]
    return db, root / "ck"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    return _train_two_updates(tmp_path_factory.mktemp("fs-identity"))


@pytest.fixture
def copy(trained, tmp_path) -> tuple[Path, Path]:
    db, ck = trained
    shutil.copytree(db, tmp_path / "data-bin")
    shutil.copytree(ck, tmp_path / "ck")
    return tmp_path / "data-bin", tmp_path / "ck"


def test_every_checkpoint_records_the_fingerprint_and_the_tokenizer(trained):
    from alum_pretrain.data.databin import DataBin
    from alum_pretrain.fairseq_ext.export_hf import load_checkpoint_state
    from alum_pretrain.run_identity import data_identity, tokenizer_sha256

    db, ck = trained
    assert not (ck / ".alum.lock").exists()  # a clean exit removes the lock file
    state = load_checkpoint_state(ck / "checkpoint_last.pt")  # the safe loader reads the record
    ts = state["task_state"]
    assert ts["alum_identity"] == data_identity(DataBin(db), db / "tokenizer")
    assert ts["alum_identity"]["vocab_size"] == 1000 and ts["alum_identity"]["tokenizer_sha256"] == tokenizer_sha256(
        db / "tokenizer")
    assert ts["alum_tokenizer"] == {p.name: p.read_bytes() for p in (db / "tokenizer").iterdir()}


def test_a_re_prepared_data_bin_is_refused_naming_both_fingerprints_and_nothing_changes(tmp_path):
    from alum_pretrain.export import main as export

    db, ck = _train_two_updates(tmp_path)  # (the data path the checkpoint names is the one re-prepared)
    original = _ids(db / "tokenizer")
    saved = torch.load(ck / "checkpoint_last.pt", weights_only=False)["task_state"]["alum_identity"]
    shutil.rmtree(db)
    make_stdlib_databin(db, n_docs=40, permute_seed=1)  # same path, same vocabulary size, other ids
    assert _ids(db / "tokenizer") != original
    before = snapshot(ck)
    rc, out = _fairseq_train(db, ck, "--lr", "1e-3", "--max-update", "4")
    assert rc == 2, out[-3000:]
    assert "cannot resume" in out and "trained on: manifest sha256" in out and f"DATA {db}: manifest" in out, out[-3000:]
    assert saved["tokenizer_sha256"][:16] in out and saved["manifest_sha256"][:16] in out
    assert "another --save-dir" in out and "Traceback" not in out
    assert '"num_updates": "3"' not in out  # no update ran
    assert snapshot(ck) == before  # checkpoints untouched, no lock file left
    # continual pre-training (--reset-dataloader) on it is refused too: the vocabulary differs
    rc, out = _fairseq_train(db, tmp_path / "ck2", "--lr", "1e-3", "--max-update", "4", "--restore-file",
                             ck / "checkpoint_last.pt", "--reset-dataloader", "--reset-optimizer")
    assert rc == 2 and "tokenizer_sha256" in out and "manifest_sha256" not in out.split("differ)")[0], out[-3000:]

    # the export ships the tokenizer the checkpoint holds, not the data-bin's new one
    assert export([str(ck / "checkpoint_last.pt"), str(tmp_path / "hf")]) == 0
    assert _ids(tmp_path / "hf") == original
    import json

    marker = json.loads((tmp_path / "hf" / "alum_export.json").read_text())
    assert marker["trained_on"] == saved
    # a --tokenizer with another vocabulary is refused, and nothing is written
    assert export([str(ck / "checkpoint_last.pt"), str(tmp_path / "hf2"), "--tokenizer", str(db)]) == 2
    assert not (tmp_path / "hf2").exists()


def _another_corpus(tokenizer: Path, out: Path) -> Path:
    """A data-bin of other sentences encoded with the tokenizer in ``tokenizer`` (its files kept as they are)."""
    from transformers import AutoTokenizer

    from databin_factory import make_databin

    docs = [[f"the module returns a list of {w} for each argument.", f"the function takes {w} as input."]
            for w in ("strings", "numbers", "files", "names", "lines", "paths", "values", "keys") * 3]
    make_databin(out, [{"train": docs, "valid": docs[:4]}], None, tokenizer=AutoTokenizer.from_pretrained(str(tokenizer)))
    for f in tokenizer.iterdir():  # byte-identical files: the same tokenizer_sha256
        shutil.copyfile(f, out / "tokenizer" / f.name)
    return out


def test_the_same_data_bin_moved_resumes_and_continual_on_another_corpus_is_allowed(copy, tmp_path):
    db, ck = copy
    moved = db.parent / "elsewhere"
    db.rename(moved)  # compared by content, not by path
    rc, out = _fairseq_train(moved, ck, "--lr", "1e-3", "--max-update", "3")
    assert rc == 0 and "Loaded checkpoint" in out and "@ 2 updates" in out, out[-3000:]
    # another corpus, same tokenizer: a resume of the data position is refused, continual pre-training is not
    other = _another_corpus(moved / "tokenizer", tmp_path / "other")
    rc, out = _fairseq_train(other, ck, "--lr", "1e-3", "--max-update", "4")
    assert rc == 2 and "(manifest_sha256 differ)" in out, out[-3000:]
    rc, out = _fairseq_train(other, tmp_path / "ck3", "--lr", "1e-3", "--max-update", "4", "--restore-file",
                             ck / "checkpoint_last.pt", "--reset-dataloader", "--reset-optimizer",
                             "--reset-lr-scheduler", "--reset-meters")
    assert rc == 0 and "Loaded checkpoint" in out, out[-3000:]
