"""Atomic file and folder writes: the one place that writes to a temporary name and renames when complete.

A reader (or a process restarted after ``kill -9``) sees either the old content or the new, never half of
it; a failed write removes its temporary and leaves the old content in place.

* :func:`atomic_file` — a context manager yielding ``PATH.tmp`` (or ``PATH.tmp<suffix>`` with
  ``keep_suffix``, for libraries that choose a format by the file's extension); renamed onto ``PATH`` when
  the block succeeds.
* :func:`write_text`, :func:`write_bytes`, :func:`write_json` — whole-file writes built on it.
* :func:`atomic_dir` — the same for a folder: a fresh ``mkdtemp`` folder beside ``OUT`` that replaces
  ``OUT`` when the block succeeds.  Its permissions follow the umask like a plain ``mkdir`` (``mkdtemp``
  alone makes ``0700``; exports and checkpoints are meant to be shared).
* ``durable=True`` also ``fsync``s the file and the parent folder, so the rename survives a power loss
  (checkpoints); the default only guarantees atomicity against a killed process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_file", "atomic_dir", "write_text", "write_bytes", "write_json", "fsync_dir",
           "current_umask", "apply_umask", "clean_stale_temps"]


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(root: str | os.PathLike) -> None:
    """Give ``root`` and everything under it the permissions a plain ``open``/``mkdir`` would have."""
    mask = current_umask()
    root = Path(root)
    paths = [root] + (list(root.rglob("*")) if root.is_dir() else [])
    for p in paths:
        if p.is_symlink():
            continue
        try:
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
        except OSError:
            pass


def fsync_dir(path: str | os.PathLike) -> None:
    """``fsync`` a folder so that a rename inside it is on disk (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, durable: bool = False, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield the temporary path to write ``path`` through; rename it onto ``path`` when the block succeeds.

    ``keep_suffix``: the temporary keeps ``path``'s extension last (``plot.tmp.png``), for writers that pick
    the format from it.  On an exception the temporary is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix) if keep_suffix else path.with_name(path.name + ".tmp")
    try:
        yield tmp
        if durable:
            _fsync_file(tmp)
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = False) -> Path:
    with atomic_file(path, durable=durable) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, *, durable: bool = False) -> Path:
    return write_bytes(path, text.encode("utf-8"), durable=durable)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1, durable: bool = False) -> Path:
    return write_text(path, json.dumps(obj, indent=indent) + "\n", durable=durable)


def _owner_tag() -> str:
    """``host-pid`` of this process, as it appears in the name of its temporary folders."""
    import re
    import socket

    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', socket.gethostname())}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def clean_stale_temps(out: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders of earlier :func:`atomic_dir` writes of ``out`` that were killed before
    they could clean up (``.OUT.HOST-PID.*.tmp`` of a process of this host that no longer runs, and the
    ``.OUT.old`` left between the two renames while ``OUT`` exists); returns what was removed."""
    out = Path(out)
    host = _owner_tag().rsplit("-", 1)[0]
    removed = []
    for p in out.parent.glob(f".{out.name}.*.tmp") if out.parent.is_dir() else ():
        tag = p.name[len(out.name) + 2:].split(".", 1)[0]
        h, _, pid = tag.rpartition("-")
        if p.is_dir() and h == host and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    old = out.with_name(f".{out.name}.old")
    if old.is_dir() and out.exists():
        shutil.rmtree(old, ignore_errors=True)
        removed.append(old)
    return removed


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, *, durable: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``out``; it replaces ``out`` (an existing folder is removed)
    when the block succeeds and is removed when it fails, so ``out`` is never half-written.

    The temporary is named ``.OUT.HOST-PID.XXXX.tmp``: one left by a killed process (``kill -9``, a node
    lost) is removed by the next write of ``out`` (:func:`clean_stale_temps`)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{_owner_tag()}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        apply_umask(tmp)
        if durable:
            for p in tmp.rglob("*"):
                if p.is_file() and not p.is_symlink():
                    _fsync_file(p)
            fsync_dir(tmp)
        if out.is_symlink() or out.is_file():
            out.unlink()
        elif out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)  # two renames: `out` is missing for an instant, never half-written
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
            if durable:
                fsync_dir(out.parent)
            return
        os.replace(tmp, out)
        if durable:
            fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
