"""A run knows its data and tokenizer: checkpoints record the data-bin and tokenizer fingerprint, resume
refuses another one (naming both) and changes nothing on disk when it refuses, the export ships the
tokenizer the run trained with whatever happened to the data-bin, and a hand-edited manifest is refused."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from engine_helpers import make_stdlib_databin, run_train, train_args

pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)

SENTENCE = "the module returns a list of strings for each argument of the function."


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` with its SHA-256 (a byte-for-byte fingerprint of the tree)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("identity")
    db = make_stdlib_databin(root / "data-bin")
    out = root / "run"
    assert run_train(db, out, 4, "--train.save_every=1", "--train.eval_every=0", "--train.keep_last=5") == 0
    for p in (out / "checkpoints" / "step-3", out / "checkpoints" / "step-4"):  # as if stopped at step 2
        shutil.rmtree(p)
    (out / "COMPLETED").unlink()
    return db, out


@pytest.fixture
def copy(trained, tmp_path) -> tuple[Path, Path]:
    db, out = trained
    shutil.copytree(db, tmp_path / "data-bin")
    shutil.copytree(out, tmp_path / "run")
    return tmp_path / "data-bin", tmp_path / "run"


def _main(args, capsys) -> tuple[int, str]:
    from alum_pretrain.train import main

    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def _ids(folder: Path) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))(SENTENCE)["input_ids"]


def test_the_run_records_its_fingerprint_and_keeps_its_tokenizer(trained):
    import torch

    db, out = trained
    ident = json.loads((out / "identity.json").read_text())
    state = torch.load(out / "checkpoints" / "step-2" / "train_state.pt", weights_only=True)
    assert state["identity"] == ident and ident["vocab_size"] == 1000 and len(ident["manifest_sha256"]) == 64
    assert _ids(out / "tokenizer") == _ids(db / "tokenizer")


def test_a_re_prepared_data_bin_is_refused_naming_both_fingerprints_and_nothing_changes(copy, capsys):
    db, out = copy
    original = _ids(db / "tokenizer")
    shutil.rmtree(db)
    make_stdlib_databin(db, permute_seed=1)  # same path, same vocabulary size, other ids
    assert json.loads((db / "manifest.json").read_text())["tokenizer"]["vocab_size"] == 1000
    assert _ids(db / "tokenizer") != original
    before = snapshot(out)
    rc, err = _main(train_args(db, out, 4, "--train.eval_every=0", "--train.keep_last=5"), capsys)
    assert rc == 2 and "cannot resume" in err and "trained on: manifest sha256" in err, err
    saved = json.loads((out / "identity.json").read_text())
    assert saved["tokenizer_sha256"][:16] in err and f"--data.path {db}" in err
    assert snapshot(out) == before  # config.yaml, log.jsonl, tb/ and checkpoints untouched
    # the export ships the tokenizer the run trained with, not the data-bin's new one
    from alum_pretrain.export import main as export

    assert export([str(out), str(db.parent / "hf")]) == 0
    assert _ids(db.parent / "hf") == original
    marker = json.loads((db.parent / "hf" / "alum_export.json").read_text())
    assert marker["trained_on"] == saved and marker["tokenizer_from"] == str(out / "tokenizer")
    # a --tokenizer with another vocabulary is refused
    assert export([str(out), str(db.parent / "hf2"), "--tokenizer", str(db / "tokenizer")]) == 2
    assert "vocabulary differs" in capsys.readouterr().err and not (db.parent / "hf2").exists()


def test_a_moved_or_deleted_data_bin_changes_nothing(copy, capsys):
    db, out = copy
    original = _ids(db / "tokenizer")
    moved = db.parent / "elsewhere"
    db.rename(moved)  # the data-bin is compared by content: a moved one resumes
    assert _main(train_args(moved, out, 4, "--train.eval_every=0", "--train.keep_last=5"), capsys)[0] == 0
    shutil.rmtree(moved)
    from alum_pretrain.export import main as export

    assert export([str(out), str(db.parent / "hf")]) == 0
    assert _ids(db.parent / "hf") == original


def test_a_refused_config_change_leaves_the_run_byte_identical(copy, capsys):
    db, out = copy
    before = snapshot(out)
    rc, err = _main(train_args(db, out, 4, "--train.eval_every=0", "--train.keep_last=5", "--optim.lr=5e-4"), capsys)
    assert rc == 2 and "cannot resume" in err and "optim.lr" in err
    assert snapshot(out) == before


@pytest.mark.parametrize("edit, words", [
    (lambda m: m["tokenizer"]["special_ids"].update(mask=5000), "outside the vocabulary"),
    (lambda m: m["tokenizer"]["special_ids"].update(mask=3), "share an id"),
    (lambda m: m["tokenizer"]["special_ids"].update(mask=7), "the tokenizer's mask token has id 4"),
    (lambda m: m["tokenizer"].update(vocab_size=999), "has 1000 tokens"),
    (lambda m: m.update(id_offset=500), "outside the vocabulary"),
])
def test_a_hand_edited_manifest_is_refused_before_training(trained, tmp_path, capsys, edit, words):
    db = tmp_path / "data-bin"
    shutil.copytree(trained[0], db)
    m = json.loads((db / "manifest.json").read_text())
    edit(m)
    (db / "manifest.json").write_text(json.dumps(m))
    rc, err = _main(train_args(db, tmp_path / "run", 1), capsys)
    assert rc == 2 and words in err, err
    assert not (tmp_path / "run").exists()
