"""Stop signals (SIGTERM, SIGUSR1, SIGINT) honoured in every phase of every command.

Two ways of honouring one, chosen by the command:

* **save, then stop** (``alum-train``): :func:`record` only notes the signal; the training loop saves and
  exits 0 between steps, and each long phase between steps (planning an epoch of data, an evaluation or
  smoothness pass) looks at the note at a fine grain - :func:`poll` per planning chunk, :func:`requested` per
  evaluation batch - and raises :class:`StopRequested`, which the loop turns into the same save-and-exit.
* **stop at once** (``alum-export``, ``alum-prep``, ``alum-finetune``, ``alum-bench``, ``alum-eval-robust``,
  ``alum-smoothness``): :func:`raising` installs a handler that raises :class:`StopRequested` wherever the
  program is; the command's ``finally`` / :func:`alum_pretrain.atomic.atomic_dir` clean-up removes its
  temporary folders,
  and ``main`` returns :attr:`StopRequested.exit_code` (128 + the signal number: 130 for SIGINT, 143 for
  SIGTERM, 138 for SIGUSR1, the shells' convention).

:class:`StopRequested` derives from ``BaseException`` (as ``KeyboardInterrupt`` does), so that no
``except Exception`` on the way turns a stop into another error.

Multi-process runs: :func:`poll` asks every rank (a collective all-reduce of the flag) when the command
installs a collective poll with :func:`set_poll`; call it only where every rank passes equally often (the
data plan is identical on every rank).
"""

from __future__ import annotations

import contextlib
import signal
from typing import Callable, Iterator, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

_STATE: dict = {"signal": None, "poll": None}


class StopRequested(BaseException):
    """A stop signal arrived (``signum``; None: on another rank); ``where`` names the phase it interrupted."""

    def __init__(self, signum: Optional[int], where: str = ""):
        self.signum = signum
        self.where = where
        what = signal_name(signum) if signum is not None else "another rank's stop signal"
        super().__init__(f"{what} received{f' during {where}' if where else ''}")

    @property
    def exit_code(self) -> int:
        """128 + the signal number (130 SIGINT, 143 SIGTERM, 138 SIGUSR1)."""
        return 128 + (self.signum if self.signum is not None else signal.SIGTERM)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def requested() -> Optional[int]:
    """The stop signal received by this process since :func:`reset`, or None."""
    return _STATE["signal"]


def reset() -> None:
    _STATE["signal"] = None


def set_poll(poll: Optional[Callable[[bool], bool]]) -> None:
    """``poll(flag) -> any rank's flag`` for :func:`poll` (None: this process only)."""
    _STATE["poll"] = poll


def poll(where: str) -> None:
    """Raise :class:`StopRequested` when a stop signal arrived (on any rank, with a collective poll)."""
    sig = _STATE["signal"]
    collective = _STATE["poll"]
    stop = collective(sig is not None) if collective is not None else sig is not None
    if stop:
        raise StopRequested(sig, where)


def record(signum, _frame) -> None:
    """Handler: note the signal (the command stops at its next check); a second Ctrl-C stops at once."""
    if signum == signal.SIGINT and _STATE["signal"] == signal.SIGINT:
        raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
    _STATE["signal"] = signum


def _raise(signum, _frame) -> None:
    _STATE["signal"] = signum
    raise StopRequested(signum)


@contextlib.contextmanager
def handlers(handler: Callable) -> Iterator[None]:
    """Install ``handler`` for :data:`STOP_SIGNALS`, restoring the previous ones on exit (the note is
    reset on entry and on exit: it never outlives the command that received it)."""
    reset()
    old = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        reset()


def raising() -> contextlib.AbstractContextManager:
    """Stop at once: every stop signal raises :class:`StopRequested` where the program is."""
    return handlers(_raise)


def child_defaults() -> None:
    """In a worker process forked from a command under :func:`raising`: SIGTERM/SIGUSR1 end it (the default
    action, as when its pool is terminated) and Ctrl-C is left to the parent, which stops the pool."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def report(prog: str, stop: StopRequested, then: str) -> int:
    """Print why ``prog`` stopped and what to do (``then``); returns the exit code (128 + signal)."""
    import sys

    print(f"{prog}: stopped: {stop}; {then}", file=sys.stderr)
    return stop.exit_code
