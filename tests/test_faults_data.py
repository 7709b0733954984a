"""Fault injection, data-bin at train time: out-of-range token ids, bit flips, size changes.

Each case asserts the error names the file (or shard, split and item) and that nothing was trained on it.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from engine_helpers import make_stdlib_databin, run_train


pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


@pytest.fixture(scope="module")
def clean_databin(tmp_path_factory) -> Path:
    """The stdlib data-bin with per-file byte counts and SHA-256 in its manifest, as alum-prep records them."""
    db = make_stdlib_databin(tmp_path_factory.mktemp("faults-data") / "data-bin")
    m = json.loads((db / "manifest.json").read_text())
    shards = []
    for k in range(int(m["num_shards"])):
        rec = {"shard": k, "status": "complete"}
        for split in ("train", "valid"):
            files = {}
            for name in (f"{split}.bin", f"{split}.idx", f"{split}.doc.npy"):
                p = db / f"shard{k}" / name
                if p.exists():
                    files[name] = {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
            rec[split] = {"files": files}
        shards.append(rec)
    m["shards"] = shards
    (db / "manifest.json").write_text(json.dumps(m))
    return db


@pytest.fixture
def databin(clean_databin, tmp_path) -> Path:
    import shutil

    db = tmp_path / "data-bin"
    shutil.copytree(clean_databin, db)
    return db


def _bin(db: Path, split: str = "train") -> Path:
    return db / "shard0" / f"{split}.bin"


def _dtype(db: Path) -> np.dtype:
    from alum_pretrain.data.indexed import MMapIndexedDataset

    return MMapIndexedDataset(db / "shard0" / "train").dtype


def test_out_of_range_ids_name_shard_split_and_item(databin, tmp_path, capsys):
    """A .bin overwritten by another tool (ids past the vocabulary): a clear error, not an IndexError."""
    p = _bin(databin)
    dt = _dtype(databin)
    # keep the size (so the cheap size check passes) but fill with an id no 1000-token vocabulary has
    arr = np.full(p.stat().st_size // dt.itemsize, 40000, dtype=dt)
    p.write_bytes(arr.tobytes())
    rc = run_train(databin, tmp_path / "run", 3, "--train.eval_every=0")
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert re.search(r"shard 0 split 'train' \(.*shard0/train\.bin\) item \d+: token id 39996 is outside the "
                     r"vocabulary \[0, 1000\)", err), err[-2000:]
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_out_of_range_id_in_a_dataloader_worker_is_the_same_clear_error(databin, tmp_path, capsys):
    p = _bin(databin)
    dt = _dtype(databin)
    arr = np.fromfile(p, dtype=dt)
    arr[:] = np.iinfo(dt).max  # every item bad: whichever the worker reads first
    arr.tofile(p)
    rc = run_train(databin, tmp_path / "run", 3, "--train.eval_every=0", "--train.num_workers=1")
    err = capsys.readouterr().err
    assert rc == 2 and "is outside the vocabulary" in err and "shard 0 split 'train'" in err


def test_bit_flip_is_caught_by_verify_full_and_named(databin, tmp_path, capsys):
    p = _bin(databin)
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01  # lowest bit: the id stays in range, so only the checksum can tell
    p.write_bytes(bytes(data))
    rc = run_train(databin, tmp_path / "run", 2, "--train.eval_every=0", "--data.verify=full")
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{p}: SHA-256 differs from manifest.json (shard 0 split 'train')" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_size_change_is_caught_by_the_default_check(databin, tmp_path, capsys):
    p = _bin(databin, "valid")
    with open(p, "ab") as fh:
        fh.write(b"\0\0")
    rc = run_train(databin, tmp_path / "run", 2, "--train.eval_every=0")
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{p}: {p.stat().st_size} bytes but manifest.json records {p.stat().st_size - 2}" in err


def test_verify_full_passes_on_an_intact_databin_and_needs_sums(databin, clean_databin, tmp_path):
    from alum_pretrain.data.databin import DataBin, DataIntegrityError, verify_databin

    assert verify_databin(DataBin(databin), "full") == 6  # train + valid: .bin .idx .doc.npy
    m = json.loads((databin / "manifest.json").read_text())
    m.pop("shards")
    (databin / "manifest.json").write_text(json.dumps(m))
    assert verify_databin(DataBin(databin), "size") == 0  # nothing recorded: the reader's checks remain
    with pytest.raises(DataIntegrityError, match="records no per-file SHA-256"):
        verify_databin(DataBin(databin), "full")


def test_data_verify_flag_is_validated():
    from alum_pretrain.engine.config import DataConfig

    with pytest.raises((ValueError, SystemExit)):
        from alum_pretrain.config import parse_config
        from alum_pretrain.engine.config import TrainConfig

        parse_config(TrainConfig, ["--data.verify=sha"], prog="t")
    assert DataConfig().verify == "size"


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ('{"format_version": 1, "num_sh', "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"num_shards": 1}', "format_version None"),
    ('{"format_version": 99}', "format_version 99"),
])
def test_unreadable_manifest_is_named_by_every_reader(tmp_path, content, message):
    from alum_pretrain.data import DataBin, load_manifest
    from alum_pretrain.fairseq_ext.remap_checkpoint import remap_checkpoint

    db = tmp_path / "data-bin"
    db.mkdir()
    if content is not None:
        (db / "manifest.json").write_text(content)
    for read in (load_manifest, DataBin, lambda p: remap_checkpoint(tmp_path / "ck.pt", p, tmp_path / "out.pt")):
        with pytest.raises((ValueError, FileNotFoundError), match=message) as e:
            read(db)
        assert str(db / "manifest.json") in str(e.value)


def test_manifest_of_a_running_prep_loads_but_is_not_a_databin(databin):
    from alum_pretrain.data import DataBin, load_manifest

    m = load_manifest(databin)
    (databin / "manifest.json").write_text(json.dumps(dict(m, status="running")))
    assert load_manifest(databin)["status"] == "running"
    with pytest.raises(ValueError, match="preparation did not finish"):
        DataBin(databin)
    del m["tokenizer"]
    (databin / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"manifest.json: missing or malformed entry .*'tokenizer'"):
        DataBin(databin)
