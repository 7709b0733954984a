"""Disk full while checkpointing (alum_pretrain/diskspace.py, engine/checkpoint.py), with an injected ENOSPC.

The model write of checkpoint step-4 fails the way safetensors reports a full disk after writing part of
its file: ``alum-train`` exits 4 with one message (the folder, the bytes needed, the last intact checkpoint),
leaves no ``step-4.tmp``, and the same command resumes from step-2 once space is back.  A run with less free
space than its last checkpoint's size is warned before the next write.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from alum_pretrain import diskspace
from alum_pretrain import models as M
from alum_pretrain.diskspace import DiskFullError, is_disk_full
from engine_helpers import make_stdlib_databin, read_log, run_train

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 6
ARGS = ("--train.save_every=2", "--train.eval_every=0", "--train.keep_last=3")
SAFETENSORS_ENOSPC = ('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left '
                      'on device" })')


@pytest.fixture(scope="module")
def databin(tmp_path_factory) -> Path:
    return make_stdlib_databin(tmp_path_factory.mktemp("full") / "data-bin")


def test_is_disk_full_recognises_the_library_errors():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(RuntimeError(SAFETENSORS_ENOSPC))
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError as e:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0") from e
    except RuntimeError as e:
        assert is_disk_full(e)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert isinstance(DiskFullError("x"), OSError) and DiskFullError("x").errno == errno.ENOSPC


def test_checkpoint_into_a_full_disk_exits_4_cleans_up_and_resumes(databin, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_save = M.save_model

    def full_at_step_4(model, d):
        if Path(d).parent.name == "step-4.tmp":
            Path(d).mkdir(parents=True, exist_ok=True)
            (Path(d) / "model.safetensors").write_bytes(b"\0" * 4096)  # a partial file, as a full disk leaves
            raise RuntimeError(SAFETENSORS_ENOSPC)
        return real_save(model, d)

    monkeypatch.setattr(M, "save_model", full_at_step_4)
    assert run_train(databin, out, STEPS, *ARGS) == 4
    err = capsys.readouterr().err
    ck = out / "checkpoints"
    line = next(x for x in err.splitlines() if x.startswith("alum-train: error:"))
    step2 = sum(f.stat().st_size for f in (ck / "step-2").rglob("*") if f.is_file())
    assert f"{ck}: no space left on the device while writing checkpoint step-4" in line
    assert f"({step2} bytes)" in line and f"the last intact checkpoint is {ck / 'step-2'}" in line
    assert "re-run the same command to resume" in line
    assert sorted(p.name for p in ck.iterdir()) == ["step-2"]  # no step-4.tmp left behind

    monkeypatch.setattr(M, "save_model", real_save)  # space is back
    assert run_train(databin, out, STEPS, *ARGS) == 0
    assert "resumed from" in capsys.readouterr().err
    assert json.loads((out / "COMPLETED").read_text())["step"] == STEPS
    assert [r["step"] for r in read_log(out)] == list(range(1, STEPS + 1))


def test_low_free_space_is_warned_before_the_next_checkpoint(databin, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(diskspace, "free_bytes", lambda path: 1000)
    assert run_train(databin, tmp_path / "run", 4, *ARGS) == 0
    err = capsys.readouterr().err
    assert "only 1000 B free but checkpoint step-4 needs about" in err  # before the write
    assert "only 1000 B free but the next checkpoint needs about" in err  # right after step-2's
