"""The output folder of ``alum-prep``: claim it before anything is written (resume the same command's
data-bin, replace another's only with ``overwrite``, refuse a folder that is not an alum-prep output), and
remove what a fresh run that failed created.  The folder's lock file (:mod:`alum_pretrain.runlock`, taken
before :func:`claim_output`) is never deleted while held.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Optional

from alum_pretrain.data.databin import MANIFEST
from alum_pretrain.runlock import LOCK_NAME

from .manifest import failed_start, read_existing_manifest


def claim_output(out: Path, fingerprint: str, overwrite: bool, warn: Callable[[str], None]) -> Optional[dict]:
    """Create/validate the output folder.  Returns the manifest to resume from, or None (fresh).

    ValueError for a non-folder, a non-empty folder without a manifest, or the data-bin of a different
    command (``fingerprint``) without ``overwrite``; PermissionError when the folder is not writable.
    The leftovers of a run that stopped before completing any work are replaced (``warn`` says so).
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder; choose another --out")
    mpath = out / MANIFEST
    if out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()):
        if not mpath.exists():
            raise ValueError(
                f"{out}: folder is not empty and has no {MANIFEST} (not an alum-prep output); "
                "refusing to write into it — choose an empty or new --out (--overwrite never deletes such a folder)"
            )
        old = read_existing_manifest(out)
        if old.get("fingerprint") == fingerprint:
            return old
        if failed_start(old):
            # Nothing of value (no completed segment or shard): the leftovers of a run that failed or
            # was killed at its start must not block the corrected command.
            warn(f"{out}: replacing the leftovers of an earlier run that stopped before completing any "
                 f"work ({' '.join(map(str, old.get('command', ['?'])))})")
            clear_folder(out)
        elif not overwrite:
            raise ValueError(
                f"{out}: holds a data-bin made by a different command or different inputs "
                f"({' '.join(map(str, old.get('command', ['?'])))}); re-run with --overwrite to replace it, "
                "or choose another --out"
            )
        else:
            clear_folder(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"{out}: output folder is not writable ({e.strerror or e}); choose another --out") from None
    return None


def clear_folder(out: Path) -> None:
    """Delete everything in ``out`` except this process's lock file (which must stay where it is)."""
    for p in out.iterdir():
        if p.name == LOCK_NAME:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def first_missing(out: Path) -> Optional[Path]:
    """The outermost of ``out`` and its parents that does not exist yet (None: ``out`` exists)."""
    return next((p for p in reversed([out, *out.parents]) if not p.exists()), None)


def remove_output(out: Path, existed: bool, created: Optional[Path]) -> None:
    """Undo a fresh run: delete ``out`` (left empty when it ``existed`` before), and the parent folders
    from ``created`` (:func:`first_missing` before the run) down, if still empty."""
    shutil.rmtree(out, ignore_errors=True)
    if existed:
        out.mkdir(exist_ok=True)
    elif created is not None:
        d = out.parent
        while d == created or created in d.parents:
            try:
                d.rmdir()
            except OSError:
                break
            d = d.parent
