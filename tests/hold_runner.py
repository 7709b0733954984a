"""``python tests/hold_runner.py prep|fairseq N HOLD_FILE -- ARGS``: a real ``alum-prep`` / ``fairseq-train``
that, once it has done real work, writes ``HOLD_FILE`` and sleeps until it is killed - a first process that is
provably running, for the two-process tests of ``tests/test_runlock.py``.

    prep      alum-prep (``data_prep.cli``) holds when it would merge its parts into shards (the corpus is
              read, tokenised and written as parts; N is unused)
    fairseq   fairseq-train (``python -m fairseq_cli.train``, the plugin loaded by ``--user-dir``) holds at
              its update N + 1, after N updates
"""

from __future__ import annotations

import runpy
import sys
import time
from pathlib import Path


def _hold(path: str) -> None:
    Path(path).write_text("holding\n")
    time.sleep(600)


def main() -> None:
    kind, n, hold_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    args = sys.argv[sys.argv.index("--") + 1:]
    if kind == "prep":
        from data_prep import pipeline

        pipeline.Preparer._merge_shards = lambda self: _hold(hold_file)
        from data_prep.cli import main as prep_main

        sys.exit(prep_main(args))
    from fairseq.trainer import Trainer

    original = Trainer.train_step
    count = [0]

    def train_step(self, *a, **kw):
        count[0] += 1
        if count[0] > n:
            _hold(hold_file)
        return original(self, *a, **kw)

    Trainer.train_step = train_step
    sys.argv = [sys.argv[0], *args]
    runpy.run_module("fairseq_cli.train", run_name="__main__", alter_sys=True)  # as `python -m fairseq_cli.train`


if __name__ == "__main__":
    main()
