"""Disk space: tell "the disk is full" apart from other write errors and say it plainly.

A write that runs out of space fails deep inside a library (``OSError: [Errno 28]``, ``SafetensorError: ...
No space left on device``, a ``RuntimeError`` from ``torch.save``'s zip writer).  :func:`is_disk_full`
recognises all of them; the writer then removes its temporary files and raises :class:`DiskFullError`
(an ``OSError`` with ``errno.ENOSPC``) built by :func:`disk_full_error`: the folder, the bytes the write
needed, the bytes free, and what is still intact.  :func:`space_warning` is the early warning before a
write that will probably not fit.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Optional

__all__ = ["DiskFullError", "is_disk_full", "tree_bytes", "free_bytes", "human", "disk_full_error",
           "space_warning"]

_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_FULL_TEXT = ("no space left on device", "disk quota exceeded", "file too large for the file system")


class DiskFullError(OSError):
    """A write ran out of disk space; its temporary files are gone and the message says what is intact."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


def is_disk_full(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it was raised from) is an out-of-space / over-quota error."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return True
        if any(t in str(exc).lower() for t in _FULL_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def tree_bytes(path: str | os.PathLike) -> int:
    """Bytes of the files under ``path`` (a file: its size; missing: 0)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    total = 0
    for f in p.rglob("*") if p.is_dir() else ():
        try:
            if f.is_file() and not f.is_symlink():
                total += f.stat().st_size
        except OSError:
            pass
    return total


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes free for this user on the file system of ``path`` (or of its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def disk_full_error(folder: str | os.PathLike, what: str, needed: Optional[int], intact: str,
                    cause: Optional[BaseException] = None) -> DiskFullError:
    """The error of a write of ``what`` into ``folder`` that ran out of space (its temporaries removed).

    ``needed``: the bytes the write needs (an estimate, e.g. the previous checkpoint's size), None if
    unknown; ``intact``: a sentence naming what is still intact (the last checkpoint); ``cause``: the
    library's error, quoted briefly."""
    free = free_bytes(folder)
    need = (f"it needs about {human(needed)} ({needed} bytes), {human(free)} are free"
            if needed else f"{human(free)} are free")
    said = f" ({type(cause).__name__}: {str(cause)[:160]})" if cause is not None else ""
    return DiskFullError(f"{folder}: no space left on the device while writing {what}{said}; its temporary files "
                         f"were removed; {need}; {intact}. Free space (or move the folder) and re-run the same "
                         "command to resume")


def space_warning(folder: str | os.PathLike, what: str, needed: int) -> Optional[str]:
    """A warning when ``folder``'s file system has less than ``needed`` bytes free for ``what`` (else None)."""
    free = free_bytes(folder)
    if needed <= 0 or free >= needed:
        return None
    return (f"{folder}: only {human(free)} free but {what} needs about {human(needed)} (the size of the last "
            "one); the write will probably fail with 'no space left' - free space now")
