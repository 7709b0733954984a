"""alum-export never destroys: ``--overwrite`` replaces only an earlier export, never a run, a checkpoint or
a data-bin (the run is compared byte for byte afterwards), and a killed export's temporary folder is
removed by the next export."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine_helpers import make_stdlib_databin, run_train, subprocess_env

pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export-target")
    db = make_stdlib_databin(root / "data-bin")
    out = root / "run"
    assert run_train(db, out, 2, "--train.save_every=1", "--train.eval_every=0") == 0
    return out


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` with its SHA-256 (a byte-for-byte fingerprint of the tree)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _export(args, capsys) -> tuple[int, str]:
    from alum_pretrain.export import main

    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("target", ["run", "checkpoints", "step", "databin", "above-databin", "inside-run",
                                    "inside-databin"])
def test_export_refuses_to_replace_a_run_or_a_data_bin(trained, tmp_path, capsys, target):
    root = trained.parent
    if target == "inside-run":  # a run's own folder that is not an export (a new RUN/hf export is fine)
        (trained / "hf").mkdir(exist_ok=True)
        (trained / "hf" / "config.json").write_text("{}")
        (trained / "hf" / "model.safetensors").write_bytes(b"")
    before = snapshot(root)
    out = {"run": trained, "checkpoints": trained / "checkpoints", "step": trained / "checkpoints" / "step-1",
           "databin": root / "data-bin", "above-databin": root, "inside-run": trained / "hf",
           "inside-databin": root / "data-bin" / "hf"}[target]
    rc, err = _export([trained, out, "--overwrite"], capsys)
    assert rc != 0
    assert "refusing to export here" in err or "replaces only an earlier export" in err, err
    assert snapshot(root) == before  # the run and the data-bin are byte-identical
    shutil.rmtree(trained / "hf", ignore_errors=True)


def test_a_new_export_may_go_inside_the_run_folder(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    assert _export([run, run / "hf"], capsys)[0] == 0
    assert _export([run, run / "hf", "--overwrite"], capsys)[0] == 0  # holds the marker
    (run / "hf" / "alum_export.json").unlink()  # inside a run only the marker counts
    assert _export([run, run / "hf", "--overwrite"], capsys)[0] != 0


def test_overwrite_replaces_an_export_and_only_an_export(trained, tmp_path, capsys):
    out = tmp_path / "hf"
    assert _export([trained, out], capsys)[0] == 0
    marker = json.loads((out / "alum_export.json").read_text())
    assert marker["format"] == "alum-export" and "model.safetensors" in marker["files"]
    assert _export([trained, out], capsys)[0] != 0  # exists, no --overwrite
    assert _export([trained, out, "--overwrite"], capsys)[0] == 0
    (out / "alum_export.json").unlink()  # an export written before the marker existed: known by its files
    assert _export([trained, out, "--overwrite"], capsys)[0] == 0
    assert (out / "alum_export.json").is_file()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    rc, err = _export([trained, mine, "--overwrite"], capsys)
    assert rc != 0 and "notes.txt" in err and (mine / "notes.txt").read_text() == "keep me"
    (out / "extra").mkdir()  # an export that now holds a folder: replacing it would delete the folder
    rc, err = _export([trained, out, "--overwrite"], capsys)
    assert rc != 0 and "extra/" in err


_KILLED_WRITE = """
import os, sys
from alum_pretrain.atomic import atomic_dir
with atomic_dir(sys.argv[1]) as tmp:
    (tmp / "config.json").write_text("{}")
    os._exit(9)  # killed mid-export
"""


def test_a_killed_export_leaves_a_temp_folder_the_next_export_removes(trained, tmp_path, capsys):
    out = tmp_path / "hf"
    subprocess.run([sys.executable, "-c", _KILLED_WRITE, str(out)], env=subprocess_env(), check=False, timeout=300)
    left = list(tmp_path.glob(".hf.*.tmp"))
    assert len(left) == 1 and not out.exists()
    assert _export([trained, out], capsys)[0] == 0
    assert list(tmp_path.glob(".hf.*")) == []
    assert (out / "model.safetensors").is_file()


def test_a_temp_folder_of_a_live_process_is_left_alone(tmp_path):
    from alum_pretrain.atomic import atomic_dir, clean_stale_temps

    out = tmp_path / "x"
    with atomic_dir(out) as tmp:
        assert clean_stale_temps(out) == [] and tmp.is_dir()  # this process still writes it
    assert out.is_dir()
