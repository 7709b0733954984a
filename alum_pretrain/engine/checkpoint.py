"""Complete, atomic checkpoints in ``OUTPUT/checkpoints/step-N/`` and automatic resume (STYLE.md 10).

Layout (the contract with ``alum-export``)::

    OUTPUT/config.yaml                 the resolved run config (data.path -> the data-bin and its tokenizer/)
    OUTPUT/checkpoints/step-N/
        model/                         ``save_model`` output (HF save_pretrained: config.json + safetensors)
        train_state.pt                 step, optimizer, scheduler, GradScaler, per-rank data-loader
                                       positions and RNG states (python, numpy, torch, cuda), the config
    OUTPUT/COMPLETED                   {"step": N} once max_steps are done (the SLURM launcher's signal)

Atomicity: everything is written into ``step-N.tmp/``, every file is fsync'ed, then the folder is renamed
to ``step-N`` and the parent directory fsync'ed; a killed save leaves only a ``.tmp`` folder, which
:func:`latest_checkpoint` ignores and the next save removes.  Keep-last-k deletes older ``step-*``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

STATE_FILE = "train_state.pt"
MODEL_DIR = "model"
_STEP_RE = re.compile(r"^step-(\d+)$")


def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (``step-N`` with a train_state.pt), oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file() and (p / MODEL_DIR).is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    ck = list_checkpoints(output_dir)
    return ck[-1][1] if ck else None


def rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU, and CUDA when available)."""
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(output_dir: str | os.PathLike, step: int, save_model_fn: Callable[[Path], None],
                    state: dict[str, Any], keep_last: int) -> Path:
    """Write ``checkpoints/step-N`` atomically (rank 0 only) and prune to the newest ``keep_last``."""
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f"step-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model_fn(tmp / MODEL_DIR)
    torch.save(state, tmp / STATE_FILE)
    _fsync_tree(tmp)
    if final.exists():  # a re-save of the same step (e.g. a signal right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for _s, p in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob("step-*.tmp"):  # leftovers of killed saves
        shutil.rmtree(p, ignore_errors=True)
    return final


def load_state(ckpt: Path) -> dict[str, Any]:
    return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
