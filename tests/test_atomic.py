"""alum_pretrain.atomic: the one module that writes files and folders under a temporary name."""

import json
import os

import pytest

from alum_pretrain.atomic import atomic_dir, atomic_file, write_json, write_text


def test_atomic_file_replaces_only_on_success(tmp_path):
    p = tmp_path / "a" / "x.json"
    write_json(p, {"v": 1})
    assert json.loads(p.read_text()) == {"v": 1}
    with pytest.raises(RuntimeError):
        with atomic_file(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert json.loads(p.read_text()) == {"v": 1}  # old content kept
    assert sorted(q.name for q in p.parent.iterdir()) == ["x.json"]  # no temporary left
    write_text(p, "new", durable=True)
    assert p.read_text() == "new"


def test_atomic_file_keep_suffix(tmp_path):
    with atomic_file(tmp_path / "plot.png", keep_suffix=True) as tmp:
        assert tmp.name == "plot.tmp.png"
        tmp.write_bytes(b"png")
    assert (tmp_path / "plot.png").read_bytes() == b"png"


def test_atomic_dir_replaces_folder_and_follows_umask(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "old.txt").write_text("old")
    old_mask = os.umask(0o022)
    try:
        with atomic_dir(out, durable=True) as tmp:
            assert tmp.parent == tmp_path and tmp != out
            (tmp / "new.txt").write_text("new")
    finally:
        os.umask(old_mask)
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o755)
    assert oct((out / "new.txt").stat().st_mode & 0o777) == oct(0o644)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no .tmp / .old left


def test_atomic_dir_failure_keeps_old_folder(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ValueError):
        with atomic_dir(out) as tmp:
            (tmp / "half.txt").write_text("half")
            raise ValueError("verification failed")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
