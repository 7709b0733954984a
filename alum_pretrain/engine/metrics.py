"""Rank-0 run logger (STYLE.md 12): one object writes the console line, ``log.jsonl`` and TensorBoard.

``log.jsonl``: one JSON object per log step, at least ``step, loss, mlm, nsp, adv, mask_rate, lr`` (plus
``grad_norm, tokens_per_s, alum`` and, on GPU, ``mfu``); validation records carry ``"kind": "valid"``
with ``valid_mlm`` / ``valid_acc``.  Values are plain floats: the caller does the (single) host sync.
Ranks other than 0 get a logger whose methods do nothing.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

LOG = logging.getLogger("alum_pretrain.train")

# Dense bf16/fp16 peak FLOP/s of common training GPUs (for MFU); unknown devices report no MFU.
_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12, "V100": 125e12,
               "A6000": 155e12, "4090": 165e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, v in _PEAK_FLOPS.items():
        if key in name:
            return v
    return None


def flops_per_token(n_params_non_embedding: int, num_layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token of one standard step (forward + backward = 3 forwards): 6N + attention."""
    return 6.0 * n_params_non_embedding + 12.0 * num_layers * hidden * seq_len


class RunLogger:
    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.output_dir = Path(output_dir)
        self._fh = None
        self._tb = None
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.output_dir / "log.jsonl", "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.output_dir / "tb"))
            except ImportError:  # tensorboard is a dependency; keep training if it is broken
                LOG.warning("tensorboard not importable; TensorBoard logging is off")
        self._t0 = time.time()

    def resume_at(self, step: int) -> None:
        """Drop records logged after ``step`` by a run that was killed after its last checkpoint, so a
        resumed run's log has every step exactly once; TensorBoard purges them too."""
        if not self.enabled:
            return
        path = self.output_dir / "log.jsonl"
        self._fh.close()
        kept = [r for r in read_log(path) if int(r.get("step", 0)) <= step]
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, path)
        self._fh = open(path, "a", encoding="utf-8")
        if self._tb is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb.close()
            self._tb = SummaryWriter(log_dir=str(self.output_dir / "tb"), purge_step=step + 1)

    def info(self, msg: str) -> None:
        if self.enabled:
            LOG.info(msg)

    def log(self, record: dict[str, Any], console: bool = True, write=None) -> None:
        if not self.enabled:
            return
        record = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" else v)
                  for k, v in record.items()}
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        step = int(record["step"])
        prefix = "valid/" if record.get("kind") == "valid" else "train/"
        if self._tb is not None:
            for k, v in record.items():
                if k in ("step", "kind") or not isinstance(v, float):
                    continue
                self._tb.add_scalar(prefix + k, v, step)
        if console:
            parts = [f"step {step}"] + [f"{k} {_fmt(v)}" for k, v in record.items()
                                        if k not in ("step", "kind") and isinstance(v, float)]
            line = ("valid | " if record.get("kind") == "valid" else "") + " | ".join(parts)
            (write or LOG.info)(line)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def _fmt(v: float) -> str:
    if v == 0 or 1e-3 <= abs(v) < 1e5:
        return f"{v:.4g}"
    return f"{v:.3e}"


def read_log(path: str | os.PathLike) -> list[dict]:
    """All records of a ``log.jsonl`` (skips a torn last line of a killed run)."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
