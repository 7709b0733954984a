"""Rank-0 run logger: one object writes the console line, ``log.jsonl`` and TensorBoard.

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

from ..atomic import atomic_file

LOG = logging.getLogger("alum_pretrain.train")

# Dense peak FLOP/s per (GPU, math mode), from NVIDIA's datasheets (no sparsity), for MFU.  The first
# matching name fragment wins, so the specific variants come before the generic ones ("H100 PCIe" before
# "H100" = SXM).  Math modes: "bf16"/"fp16" tensor cores (autocast), "tf32" (fp32 weights with TF32
# matmuls allowed), "fp32" (plain fp32 FMA).  A missing entry means the GPU cannot run that mode at speed
# (V100: no bf16, no TF32) and no MFU is reported.  Unknown GPUs report no MFU.
_PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    ("H200 NVL", {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12}),  # SXM5 ("H100 80GB HBM3")
    ("H200", {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12}),  # SXM
    ("A100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("V100S", {"fp16": 130e12, "fp32": 16.4e12}),
    ("V100-PCIE", {"fp16": 112e12, "fp32": 14e12}),
    ("V100 PCIe", {"fp16": 112e12, "fp32": 14e12}),
    ("V100", {"fp16": 125e12, "fp32": 15.7e12}),  # SXM2 (DGX-2)
    ("L4", {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30e12}),
    ("A6000", {"bf16": 155e12, "fp16": 155e12, "tf32": 77e12, "fp32": 38.7e12}),
    ("4090", {"bf16": 165e12, "fp16": 165e12, "tf32": 82.6e12, "fp32": 82.6e12}),
)


def math_mode(precision: str, tf32: bool | None = None) -> str:
    """The tensor-core mode a run's matmuls use: ``bf16``/``fp16`` under autocast; for ``fp32``, ``tf32``
    when TF32 matmuls are allowed (``torch.get_float32_matmul_precision() != "highest"``), else ``fp32``."""
    if precision in ("bf16", "fp16"):
        return precision
    if precision != "fp32":
        raise ValueError(f"precision {precision!r}: expected fp32, bf16 or fp16")
    if tf32 is None:
        tf32 = torch.get_float32_matmul_precision() != "highest"
    return "tf32" if tf32 else "fp32"


def peak_flops_for(name: str, mode: str) -> float | None:
    """Dense peak FLOP/s of the GPU called ``name`` (``torch.cuda.get_device_name``) in ``mode``, or None."""
    for key, table in _PEAK_FLOPS:
        if key.lower() in name.lower():
            return table.get(mode)
    return None


def peak_flops(device: torch.device, precision: str = "bf16") -> float | None:
    """Peak FLOP/s of ``device`` for a run at ``precision`` (fp32 / bf16 / fp16); None on CPU or unknown GPUs."""
    if device.type != "cuda":
        return None
    mode = math_mode(precision)
    if mode == "tf32" and torch.cuda.get_device_capability(device) < (8, 0):
        mode = "fp32"  # TF32 needs Ampere or newer; the setting is ignored below
    return peak_flops_for(torch.cuda.get_device_name(device), mode)


def flops_per_token(n_params_non_embedding: int, num_layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token of one standard step (forward + backward = 3 forwards): 6N + attention.

    Counted per *padded* token: the encoder computes on every position of the (B, T) batch, padding
    included.  The tied MLM decoder (hidden x vocab, shared with the word embeddings and so not in N) runs
    on the masked positions only: see :func:`decoder_flops_per_masked_token`."""
    return 6.0 * n_params_non_embedding + 12.0 * num_layers * hidden * seq_len


def decoder_flops_per_masked_token(hidden: int, vocab: int) -> float:
    """Training FLOPs of the tied MLM decoder per masked token: 6 * hidden * vocab (forward 2HV, backward 4HV)."""
    return 6.0 * hidden * vocab


def mfu(padded_tokens: float, masked_tokens: float, seconds: float, *, flops_per_padded_token: float,
        decoder_flops_per_masked: float, step_units: float, peak: float, world_size: int) -> float:
    """Model FLOPs utilisation: executed model FLOPs / (elapsed time x peak x GPUs).

    ``padded_tokens``/``masked_tokens``: totals over all ranks in ``seconds``; ``step_units``: executed
    forward-equivalents relative to a standard step (1 = standard; ALUM K steps = (6 + 2K) / 3)."""
    flops = (padded_tokens * flops_per_padded_token + masked_tokens * decoder_flops_per_masked) * step_units
    return flops / (max(seconds, 1e-9) * peak * world_size)


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
        with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in kept)
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
