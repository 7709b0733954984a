"""``python tests/fault_runner.py FAULT -- ALUM-TRAIN-ARGS``: alum-train that SIGKILLs itself at one point.

The fault-injection tests run this in a subprocess; the kill is a real ``kill -9`` (no cleanup, no
``finally``), placed by wrapping one library function:

    forward:N          the N-th PretrainStep forward (N=1: before any checkpoint; later: mid-step)
    model:K            the K-th checkpoint save, after ``model/model.safetensors`` was half written
    state:K            the K-th save, after ``train_state.pt`` was half written
    checksums:K        the K-th save, after ``checksums.json`` was half written
    renamed:K          the K-th save, after ``step-N.tmp`` was renamed to ``step-N`` but before pruning
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def _die() -> None:
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _truncate_half(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)


def install(fault: str) -> None:
    from alum_pretrain import models as M
    from alum_pretrain.engine import checkpoint as C
    from alum_pretrain.engine import step as S

    kind, n = fault.split(":")
    n = int(n)
    count = {"forward": 0, "save": 0}

    if kind == "forward":
        orig_forward = S.PretrainStep.forward

        def forward(self, *a, **kw):
            count["forward"] += 1
            if count["forward"] == n:
                _die()
            return orig_forward(self, *a, **kw)

        S.PretrainStep.forward = forward
        return

    orig_save_model = M.save_model

    def save_model(model, directory):  # called once per checkpoint save (engine/checkpoint.py:save)
        count["save"] += 1
        out = orig_save_model(model, directory)
        if kind == "model" and count["save"] == n:
            _truncate_half(Path(directory) / "model.safetensors")
            _die()
        return out

    M.save_model = save_model

    if kind == "state":
        import torch

        orig_torch_save = torch.save

        def torch_save(obj, f, *a, **kw):
            orig_torch_save(obj, f, *a, **kw)
            if isinstance(f, (str, os.PathLike)) and Path(f).name == C.STATE_FILE and count["save"] == n:
                _truncate_half(Path(f))
                _die()

        C.torch.save = torch_save
    elif kind == "checksums":
        orig_write = C.write_checksums

        def write_checksums(root):
            rec = orig_write(root)
            if count["save"] == n:
                _truncate_half(Path(root) / "checksums.json")
                _die()
            return rec

        C.write_checksums = write_checksums
    elif kind == "renamed":
        orig_fsync_dir = C.fsync_dir

        def fsync_dir(path):
            orig_fsync_dir(path)
            if Path(path).name == "checkpoints" and count["save"] == n:
                _die()

        C.fsync_dir = fsync_dir
    elif kind != "model":
        raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
    fault, sep, *args = sys.argv[1:]
    assert sep == "--", "usage: fault_runner.py FAULT -- ARGS"
    import torch

    from engine_helpers import THREADS  # the thread count of the uninterrupted run it is compared with

    torch.set_num_threads(THREADS)
    install(fault)
    from alum_pretrain.train import main

    sys.exit(main(args))
