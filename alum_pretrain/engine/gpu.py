"""What this GPU and this torch build can really do, checked before any work is spent on them.

* **bf16 needs compute capability >= 8.0** (A100, H100, L4, RTX 30xx/40xx).  ``torch.cuda.is_bf16_supported()``
  says True on a V100 (sm_70) because it counts *emulation*: bf16 autocast then runs without tensor cores,
  several times slower than fp16, for days.  :func:`check_precision` refuses it and names the flag to use.
* **The torch build must ship kernels for the card.**  A CUDA wheel lists the architectures it was compiled
  for (``torch.cuda.get_arch_list()``: ``sm_80``, ..., ``compute_90`` for PTX); recent wheels have dropped
  older ones (sm_70 = V100).  Without a matching SASS (same major, minor <= the card's) or a PTX the driver
  can JIT (``compute_XY`` with XY <= the card's capability) the first kernel fails with "no kernel image is
  available".  :func:`arch_support` says which case applies.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import torch

__all__ = ["capability", "real_bf16_support", "arch_support", "check_precision", "check_device"]


def capability(device: torch.device) -> Optional[tuple[int, int]]:
    """(major, minor) compute capability of a CUDA device; None for CPU."""
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


def real_bf16_support(cap: Optional[tuple[int, int]]) -> bool:
    """bf16 tensor cores: compute capability 8.0 or newer (emulation does not count)."""
    return cap is not None and tuple(cap) >= (8, 0)


def arch_support(cap: tuple[int, int], arch_list: Sequence[str]) -> tuple[bool, str]:
    """Whether a build with ``arch_list`` (``torch.cuda.get_arch_list()``) runs on capability ``cap``.

    Returns ``(ok, how)``: ``how`` is ``sass sm_XY`` (binary-compatible cubin: same major, minor <= the
    card's), ``ptx compute_XY`` (JIT-compiled by the driver at start-up: slow first run, works) or the
    reason it cannot run."""
    major, minor = cap
    sass, ptx = [], []
    for a in arch_list:
        m = re.fullmatch(r"(sm|compute)_(\d+)(\d)[a-z]?", a)
        if not m:
            continue
        (sass if m.group(1) == "sm" else ptx).append((int(m.group(2)), int(m.group(3)), a))
    fits = [a for (ma, mi, a) in sass if ma == major and mi <= minor and not a.endswith(("a", "f"))]
    if fits:
        return True, f"sass {fits[-1]}"
    jit = [a for (ma, mi, a) in ptx if (ma, mi) <= (major, minor)]
    if jit:
        return True, f"ptx {jit[-1]}"
    have = ", ".join(arch_list) or "none"
    return False, (f"this torch build has no kernels for compute capability {major}.{minor} (sm_{major}{minor}); "
                   f"it was built for: {have}. Install a torch build for this GPU (for V100: a CUDA 12.x wheel "
                   "that still lists sm_70)")


def check_precision(precision: str, device: torch.device, flag: str = "--train.precision") -> None:
    """ValueError naming ``flag`` when ``precision`` cannot run at speed on ``device``."""
    cap = capability(device)
    if precision == "bf16" and cap is not None and not real_bf16_support(cap):
        name = torch.cuda.get_device_name(device)
        raise ValueError(
            f"{flag}=bf16: {name} (compute capability {cap[0]}.{cap[1]}) has no bf16 tensor cores - torch "
            "would emulate bf16 (torch.cuda.is_bf16_supported() counts emulation), many times slower than fp16; "
            f"use {flag}=fp16 (autocast + dynamic loss scaling; ALUM's perturbation stays in float32)")


def check_device(device: torch.device, precision: str, flag: str = "--train.precision") -> None:
    """The start-up checks of a training run on ``device``: kernels for this card, then the precision."""
    cap = capability(device)
    if cap is None:
        return
    ok, how = arch_support(cap, torch.cuda.get_arch_list())
    if not ok:
        raise ValueError(f"{torch.cuda.get_device_name(device)}: {how}")
    check_precision(precision, device, flag)
