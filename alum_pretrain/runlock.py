"""One process per output folder: an OS-level lock on ``FOLDER/.alum.lock``, held for the life of the process.

``alum-train`` (its ``train.output_dir``), ``alum-prep --out``, ``alum-bench --out`` and ``fairseq-train
--save-dir`` with the plugin take it before they touch anything in the folder.  A second process on the
same folder stops at once with :class:`FolderBusyError` (a ``ValueError``: the commands print it as one
line and exit non-zero) naming the folder, the holder's PID, host and start time, and what to do.

* **flock** (the default): ``fcntl.flock(LOCK_EX | LOCK_NB)`` on the lock file.  The kernel releases it when
  the holder exits for any reason, ``kill -9`` included, so a re-run (a SLURM requeue of the same job) takes
  it without any clean-up.  The file records ``{"pid", "host", "started", "command", "mode"}`` for the
  message.  Processes forked later (data-loader and prep workers) close their copy of the descriptor, so
  an orphaned worker never keeps the lock of a killed run.
* **O_EXCL + heartbeat** (fallback, said in a warning): where ``flock`` is unsupported (some NFS/Lustre
  mounts answer ``ENOLCK``/``EOPNOTSUPP``), the lock file is created with ``O_CREAT | O_EXCL`` and the holder
  touches it every ``HEARTBEAT_S`` seconds from a daemon thread.  A newcomer that finds the file watches
  its modification time: when it changes, the holder is alive (refused); when it has not changed for
  ``STALE_S`` seconds, the holder is gone (killed, node lost) and the lock is taken over.  No clock is
  compared across hosts.  A clean exit removes the file.

Ranks of one distributed job share the lock through rank 0: only rank 0 calls :func:`lock_folder`
(``alum_pretrain.engine.setup.claim_output_dir`` broadcasts its verdict so every rank stops together).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Optional

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: only the O_EXCL fallback exists
    fcntl = None

__all__ = ["LOCK_NAME", "HEARTBEAT_S", "STALE_S", "FolderBusyError", "RunLock", "lock_folder", "holder_info"]

LOCK_NAME = ".alum.lock"
HEARTBEAT_S = 5.0
STALE_S = 30.0
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENOTSUP}
log = logging.getLogger(__name__)
_HELD: list["RunLock"] = []  # locks of this process (closed in forked children)


class FolderBusyError(ValueError):
    """Another live process holds the folder's lock."""


def holder_info(path: Path) -> dict:
    """What the lock file says about its holder ({} while it is being written, or unreadable)."""
    try:
        return json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _busy_message(folder: Path, tool: str, info: dict, mode: str, stale_s: float = STALE_S) -> str:
    if info:
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(info.get("started", 0)))
        who = (f"PID {info.get('pid', '?')} on host {info.get('host', '?')}, started {started}"
               f" ({info.get('command', '?')})")
    else:
        who = "a process that is still starting (its lock file is empty)"
    how = ("the lock is released when that process exits, kill -9 included"
           if mode == "flock" else
           f"the lock is taken over {stale_s:.0f} s after that process stops refreshing it")
    return (f"{folder} is in use by {who}; {how}. Wait for it to finish, stop it, or choose another "
            f"output folder - two processes in one folder would interleave their writes")


def _record(command: str, mode: str) -> bytes:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                       "command": command, "mode": mode}).encode()


class RunLock:
    """A held folder lock; :meth:`release` (or the process's exit) gives it up."""

    def __init__(self, folder: Path, fd: int, mode: str):
        self.folder, self.path, self.mode = folder, folder / LOCK_NAME, mode
        self._fd: Optional[int] = fd
        self._pid = os.getpid()
        self._stop = threading.Event()
        if mode == "excl":
            threading.Thread(target=self._beat, name="alum-lock-heartbeat", daemon=True).start()
        _HELD.append(self)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Remove the lock file and unlock (idempotent; a no-op in a forked child)."""
        if self._fd is None or os.getpid() != self._pid:
            return
        self._stop.set()
        try:  # unlinked while still locked: a newcomer that opened the old file re-checks the inode
            self.path.unlink()
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        if self in _HELD:
            _HELD.remove(self)

    def _close_in_child(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _after_fork_in_child() -> None:
    for lk in list(_HELD):
        lk._close_in_child()
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _try_flock(folder: Path, path: Path, tool: str, command: str) -> Optional[RunLock]:
    """The flock lock, or None when the file system does not support flock; FolderBusyError when held."""
    while True:
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise FolderBusyError(_busy_message(folder, tool, holder_info(path), "flock")) from None
            if e.errno in _NO_FLOCK:
                if created:  # the O_EXCL fallback must find no file of ours
                    path.unlink(missing_ok=True)
                return None
            raise
        try:  # the holder may have removed the file between our open and our lock: lock the new one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, _record(command, "flock"), 0)
        return RunLock(folder, fd, "flock")


def _try_excl(folder: Path, path: Path, tool: str, command: str, stale_s: float) -> RunLock:
    """The O_EXCL lock with heartbeat; waits at most ``stale_s`` to tell a dead holder from a live one."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pass
        else:
            os.write(fd, _record(command, "excl"))
            return RunLock(folder, fd, "excl")
        info = holder_info(path)
        try:
            seen = os.stat(path).st_mtime_ns
        except FileNotFoundError:
            continue
        deadline = time.monotonic() + stale_s
        while time.monotonic() < deadline:
            time.sleep(min(1.0, stale_s / 10))
            try:
                now = os.stat(path).st_mtime_ns
            except FileNotFoundError:
                break  # released meanwhile: try again
            if now != seen:
                raise FolderBusyError(_busy_message(folder, tool, info, "excl", stale_s))
        else:  # no heartbeat for stale_s: the holder is gone; only one of several newcomers wins the rename
            log.warning("%s: taking over the lock of %s (no heartbeat for %.0f s: %s)", tool, folder, stale_s, info)
            stale = path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
            try:
                os.replace(path, stale)
                stale.unlink()
            except FileNotFoundError:
                pass


def lock_folder(folder, *, tool: str, command: Optional[str] = None, mode: str = "auto",
                stale_s: float = STALE_S) -> RunLock:
    """Create ``folder`` if needed and lock it for this process; :class:`FolderBusyError` when in use.

    ``mode``: ``auto`` (flock, falling back to ``excl`` with a warning where flock is unsupported),
    ``flock`` or ``excl``.  ``command`` is recorded for the message of a refused second process (default:
    this process's command line).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder}: exists and is not a folder; choose another output folder")
    command = command if command is not None else " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:500]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return _acquire(folder, folder / LOCK_NAME, tool, command, mode, stale_s)
    except (PermissionError, NotADirectoryError, FileExistsError) as e:  # read-only, or under a file
        raise PermissionError(f"{folder}: output folder is not writable ({e.strerror or e}); choose another "
                              "output folder") from None


def _acquire(folder: Path, path: Path, tool: str, command: str, mode: str, stale_s: float) -> RunLock:
    if mode in ("auto", "flock") and fcntl is not None:
        lk = _try_flock(folder, path, tool, command)
        if lk is not None:
            return lk
        if mode == "flock":
            raise OSError(errno.ENOLCK, f"{folder}: the file system does not support flock")
        log.warning("%s: %s does not support flock (shared file system?): using an O_EXCL lock file with a "
                    "heartbeat instead; a killed run's lock is taken over after %.0f s", tool, folder, stale_s)
    return _try_excl(folder, path, tool, command, stale_s)
