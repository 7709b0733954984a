"""Fault injection, alum-export and loading: damaged and NaN checkpoints, malicious pickles, the umask.

Damaged or NaN checkpoints are refused with the file and the reason (no raw reader traceback, no
misleading "tensor differs"); a pickle that would run code is refused and the code does not run (native
train_state.pt and fairseq .pt); exports and checkpoints follow the umask.
"""

from __future__ import annotations

import os
import shutil
import stat
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from engine_helpers import make_stdlib_databin, run_train


pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults-export")
    db = make_stdlib_databin(root / "data-bin")
    out = root / "run"
    assert run_train(db, out, 2, "--train.save_every=1", "--train.eval_every=0") == 0
    return out


@pytest.fixture
def run(trained, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _export(args, capsys) -> tuple[int, str]:
    from alum_pretrain.export import main

    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def _truncate(p: Path) -> None:
    with open(p, "r+b") as fh:
        fh.truncate(p.stat().st_size // 2)


def _bitflip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) * 2 // 3] ^= 0x10
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
@pytest.mark.parametrize("rel", ["model/model.safetensors", "model/config.json", "train_state.pt"])
def test_export_of_a_damaged_checkpoint_names_the_file_and_reason(run, tmp_path, capsys, rel, damage):
    bad = run / "checkpoints" / "step-2" / rel
    (_truncate if damage == "truncate" else _bitflip)(bad)
    rc, err = _export([run, tmp_path / "hf"], capsys)
    assert rc == 2
    assert f"alum-export: error: cannot export: {bad}: " in err
    assert ("bytes" in err) if damage == "truncate" else ("CRC-32 recorded in checksums.json does not match" in err)
    assert "other checkpoints: step-1" in err
    assert "Traceback" not in err and not (tmp_path / "hf").exists()
    # the intact previous checkpoint exports
    rc, err = _export([run / "checkpoints" / "step-1", tmp_path / "hf"], capsys)
    assert rc == 0, err


def test_export_without_checksums_still_names_a_truncated_file(run, tmp_path, capsys):
    step = run / "checkpoints" / "step-2"
    (step / "checksums.json").unlink()
    _truncate(step / "model" / "model.safetensors")
    rc, err = _export([step, tmp_path / "hf"], capsys)
    assert rc == 2 and f"{step / 'model' / 'model.safetensors'}: unreadable" in err


def test_export_refuses_nan_weights_with_the_reason(run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from alum_pretrain.integrity import write_checksums

    step = run / "checkpoints" / "step-2"
    f = step / "model" / "model.safetensors"
    w = load_file(str(f))
    key = sorted(w)[-1]
    w[key][..., 0] = float("nan")
    save_file(w, str(f), metadata={"format": "pt"})
    write_checksums(step)  # consistent sums: the NaN itself must be the reason
    rc, err = _export([step, tmp_path / "hf"], capsys)
    assert rc == 2
    assert f"{f}: tensor {key} holds NaN/Inf" in err and "differs" not in err


def test_export_refuses_a_malicious_train_state_and_does_not_run_it(run, tmp_path, capsys):
    from alum_pretrain.integrity import write_checksums

    step = run / "checkpoints" / "step-2"
    marker = tmp_path / "PWNED"
    state = torch.load(step / "train_state.pt", weights_only=True)
    state["evil"] = _Evil(str(marker))
    torch.save(state, step / "train_state.pt")
    write_checksums(step)
    (run / "config.yaml").unlink()  # export now reads the config inside train_state.pt
    rc, err = _export([step, tmp_path / "hf"], capsys)
    assert rc == 2 and not marker.exists()
    assert f"{step / 'train_state.pt'}: refused to load" in err and "--trust-checkpoint" in err
    # with the explicit trust flag the full unpickler runs it (which is why it is off by default)
    rc, err = _export([step, tmp_path / "hf", "--trust-checkpoint"], capsys)
    assert rc == 0, err
    assert marker.exists()


def test_train_state_loads_with_weights_only(run):
    """The project's own state file holds tensors and plain types only (RNG, config, data position)."""
    from alum_pretrain.engine.checkpoint import set_rng_state

    state = torch.load(run / "checkpoints" / "step-2" / "train_state.pt", weights_only=True)
    assert state["step"] == 2 and isinstance(state["config"], dict)
    np_before = np.random.get_state()[1].copy()
    set_rng_state(state["rng"][0])  # round trip of the tensor-encoded numpy state
    assert isinstance(np.random.get_state()[1], np.ndarray) and np.random.get_state()[1].dtype == np.uint32
    assert np_before.shape == np.random.get_state()[1].shape


# ------------------------------------------------------------------------------------------------
# fairseq checkpoints: the allow-list
# ------------------------------------------------------------------------------------------------

def _fairseq_like(path: Path, extra=None, nan=False) -> Path:
    w = torch.zeros(4, 3)
    if nan:
        w[0, 0] = float("nan")
    state = {"model": {"encoder.sentence_encoder.embed_tokens.weight": w},
             "args": Namespace(arch="roberta_base", data="x"), "cfg": None,
             "extra_state": {"best": np.float64(1.5), "train_iterator": {"epoch": 1}},
             "optimizer_history": [{"num_updates": 3}]}
    if extra:
        state.update(extra)
    torch.save(state, path)
    return path


def test_fairseq_checkpoint_allow_list(tmp_path):
    from alum_pretrain.fairseq_ext.export_hf import FairseqExportError, load_checkpoint_state

    ok = load_checkpoint_state(_fairseq_like(tmp_path / "ok.pt"))
    assert ok["args"].arch == "roberta_base" and float(ok["extra_state"]["best"]) == 1.5
    marker = tmp_path / "PWNED"
    evil = _fairseq_like(tmp_path / "evil.pt", {"extra_state": {"x": _Evil(str(marker))}})
    with pytest.raises(FairseqExportError, match=r"evil\.pt: refused to load: its pickle names .*pathlib.*"
                                                 r"--trust-checkpoint"):
        load_checkpoint_state(evil)
    assert not marker.exists()
    with pytest.raises(FairseqExportError, match="holds NaN/Inf"):
        load_checkpoint_state(_fairseq_like(tmp_path / "nan.pt", nan=True))
    trunc = _fairseq_like(tmp_path / "trunc.pt")
    _truncate(trunc)
    with pytest.raises(FairseqExportError, match=r"trunc\.pt: not a readable torch checkpoint"):
        load_checkpoint_state(trunc)
    load_checkpoint_state(evil, trust=True)
    assert marker.exists()


def test_alum_export_cli_refuses_a_malicious_fairseq_checkpoint(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    evil = _fairseq_like(tmp_path / "checkpoint_last.pt", {"extra_state": {"x": _Evil(str(marker))}})
    rc, err = _export([evil, tmp_path / "hf"], capsys)
    assert rc == 2 and "refused to load" in err and "--trust-checkpoint" in err and not marker.exists()


# ------------------------------------------------------------------------------------------------
# the umask
# ------------------------------------------------------------------------------------------------

def _modes(root: Path) -> set[tuple[str, int]]:
    return {("d" if p.is_dir() else "f", stat.S_IMODE(p.stat().st_mode)) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("umask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_exports_and_checkpoints_follow_the_umask(trained, tmp_path, capsys, umask, dir_mode, file_mode):
    old = os.umask(umask)
    try:
        rc, err = _export([trained, tmp_path / "hf"], capsys)
        assert rc == 0, err
        assert _modes(tmp_path / "hf") == {("d", dir_mode), ("f", file_mode)}
        from alum_pretrain.engine.checkpoint import save_checkpoint
        from alum_pretrain.models import load_model, save_model

        model = load_model(trained / "checkpoints" / "step-2" / "model")
        step = save_checkpoint(tmp_path / "r", 7, lambda d: save_model(model, d), {"step": 7}, keep_last=1)
        assert _modes(step) == {("d", dir_mode), ("f", file_mode)}
    finally:
        os.umask(old)
