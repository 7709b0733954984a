"""Integrity helpers shared by checkpoints, export and fine-tuning: checksums, safe loading, finiteness, umask.

* :func:`write_checksums` / :func:`verify_checksums` — a ``checksums.json`` beside the files of a
  checkpoint folder: ``{"format": 1, "files": {"model/model.safetensors": {"bytes": N, "crc32": H}, ...}}``.
  The CRC-32 (zlib; several times faster than SHA-256 where the CPU lacks SHA instructions) is computed once
  when the checkpoint is written, from the bytes read back after ``fsync``, and once when it is resumed or
  exported (``sha256`` entries are verified too).  A truncated or bit-flipped file is named with the reason
  (size or checksum) instead of surfacing as a reader traceback.
* :func:`safe_torch_load` — ``torch.load(weights_only=True)`` with errors that name the file: a pickle that
  would import anything but tensors and plain containers is refused, and its code never runs.
* :func:`first_nonfinite` — the name of the first tensor holding NaN/Inf (checkpoints are never written,
  resumed or exported with non-finite weights).
* :func:`apply_umask` — folders made by ``tempfile.mkdtemp`` are ``0700`` whatever the umask; exports and
  checkpoints are meant to be shared, so their files and folders get ``0666``/``0777`` minus the umask.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from .atomic import apply_umask, atomic_file, write_json  # noqa: F401  (apply_umask re-exported)

if TYPE_CHECKING:
    import torch

# torch is imported inside the three functions that load, save or inspect tensors: hashing and checking
# files (what corpus preparation uses) stays torch-free.

CHECKSUMS = "checksums.json"
_BUF = 1 << 22


class IntegrityError(ValueError):
    """A damaged or unsafe file: the message names the file and the reason."""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(_BUF)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def crc32_file(path: str | os.PathLike) -> str:
    """zlib CRC-32 of a file as 8 hex digits (5-10x faster than SHA-256 on CPUs without SHA extensions)."""
    c = 0
    with open(path, "rb") as fh:
        while True:
            b = fh.read(_BUF)
            if not b:
                break
            c = zlib.crc32(b, c)
    return f"{c & 0xFFFFFFFF:08x}"


# What checksums.json / X.pt.json record per file: a CRC-32 catches truncation, torn writes and bit rot
# (every burst error up to 32 bits, random corruption with probability 1 - 2^-32); it is not a defence
# against a crafted file - that is what weights_only loading and the finiteness checks are for.
_DIGESTS = {"crc32": (crc32_file, "CRC-32"), "sha256": (sha256_file, "SHA-256")}
DIGEST = "crc32"


def _check_digest(p: Path, want: dict, where: str) -> None:
    for key, (fn, label) in _DIGESTS.items():
        if key in want:
            if fn(p) != want[key]:
                raise IntegrityError(f"{p}: content differs from when it was written ({label} recorded in {where} "
                                     "does not match: bit rot, a torn write or a partial copy)")
            return
    raise IntegrityError(f"{p}: {where} records no checksum for it")


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def write_checksums(root: str | os.PathLike) -> dict:
    """Record size + CRC-32 of every file under ``root`` in ``root/checksums.json`` (fsync'ed)."""
    root = Path(root)
    files = {p.relative_to(root).as_posix(): {"bytes": p.stat().st_size, DIGEST: _DIGESTS[DIGEST][0](p)}
             for p in _files(root)}
    rec = {"format": 1, "files": files}
    write_json(root / CHECKSUMS, rec, durable=True)
    return rec


def verify_checksums(root: str | os.PathLike, *, require: bool = False) -> bool:
    """Check every file listed in ``root/checksums.json``; IntegrityError naming the first bad file.

    Returns False when there is no ``checksums.json`` (a checkpoint written before checksums existed),
    or raises when ``require``.
    """
    root = Path(root)
    path = root / CHECKSUMS
    if not path.is_file():
        if require:
            raise IntegrityError(f"{path}: missing — the checkpoint cannot be verified")
        return False
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
        files = rec["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise IntegrityError(f"{path}: unreadable ({e})") from e
    for rel, want in files.items():
        p = root / rel
        if not p.is_file():
            raise IntegrityError(f"{p}: missing (listed in {path})")
        size = p.stat().st_size
        if size != want["bytes"]:
            raise IntegrityError(f"{p}: {size} bytes, {want['bytes']} when written (recorded in {CHECKSUMS}; "
                                 "truncated or overwritten)")
        _check_digest(p, want, CHECKSUMS)
    return True


def check_structure(path: str | os.PathLike) -> None:
    """Cheap format-level check of one file (headers / central directory only, no full read)."""
    p = Path(path)
    try:
        if p.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(p), "pt") as fh:
                list(fh.keys())
        elif p.suffix in (".pt", ".pth", ".bin") and zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as z:
                z.namelist()
        elif p.suffix == ".pt":
            raise IntegrityError(f"{p}: not a torch zip archive (truncated or not written by torch.save)")
    except IntegrityError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader error means a damaged file
        raise IntegrityError(f"{p}: unreadable ({type(e).__name__}: {e})") from e


def safe_torch_load(path: str | os.PathLike, *, map_location: Any = "cpu", trust: bool = False,
                    what: str = "checkpoint", trust_flag: str = "--trust-checkpoint") -> Any:
    """``torch.load`` that only unpickles tensors and plain containers unless ``trust``.

    A file whose pickle names any other global (a class, a function such as ``os.system``) is refused
    with :class:`IntegrityError` naming the file, the global and ``trust_flag``; nothing in it runs.
    """
    import torch

    p = Path(path)
    try:
        return torch.load(p, map_location=map_location, weights_only=not trust)
    except pickle.UnpicklingError as e:
        if trust:
            raise IntegrityError(f"{p}: unreadable {what} ({e})") from e
        msg = str(e).strip().splitlines()
        why = next((ln.strip() for ln in msg if "GLOBAL" in ln or "Unsupported" in ln), msg[0] if msg else "")
        raise IntegrityError(
            f"{p}: refused to load: its pickle needs more than tensors and plain types ({why}). Loading it "
            f"could run arbitrary code; if you wrote this {what} yourself or trust its source, pass "
            f"{trust_flag}") from e
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise IntegrityError(f"{p}: unreadable {what} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                             "the file is truncated or damaged") from e


def first_nonfinite(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """Name of the first floating tensor with a NaN or Inf, else None."""
    import torch

    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    for name, t in items:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def previous_path(path: str | os.PathLike) -> Path:
    """Where :func:`torch_save_verified` keeps the previous version of ``path`` (``X.prev.pt``)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def torch_save_verified(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temp name, fsync, record size + CRC-32 in ``PATH.json``, keep the previous
    version as ``X.prev.pt`` (+ its ``.json``), then rename into place; files follow the umask."""
    import torch

    path = Path(path)
    with atomic_file(path, durable=True) as tmp:
        torch.save(obj, tmp)
        check_structure(tmp)
        rec = {"bytes": tmp.stat().st_size, DIGEST: _DIGESTS[DIGEST][0](tmp)}
        prev = previous_path(path)
        if path.exists():  # the new file verified: only now does the old one become the fallback
            os.replace(path, prev)
            if _sidecar(path).exists():
                os.replace(_sidecar(path), _sidecar(prev))
        write_json(_sidecar(path), rec, indent=None, durable=True)  # then the file itself, as the block ends
    return path


def verify_file(path: str | os.PathLike) -> None:
    """Check ``path`` against its ``PATH.json`` (size, CRC-32 or SHA-256), or its format when there is none."""
    path = Path(path)
    side = _sidecar(path)
    if side.is_file():
        try:
            want = json.loads(side.read_text(encoding="utf-8"))
            size = want["bytes"]
        except (ValueError, KeyError, TypeError) as e:
            raise IntegrityError(f"{side}: unreadable ({e})") from e
        if path.stat().st_size != size:
            raise IntegrityError(f"{path}: {path.stat().st_size} bytes, {size} when written (recorded in "
                                 f"{side.name}; truncated or overwritten)")
        _check_digest(path, want, side.name)
    check_structure(path)
