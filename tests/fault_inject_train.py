"""``alum-train`` with one injected fault, for the multi-rank failure tests (run under torchrun).

``ALUM_FAULT_RANK`` / ``ALUM_FAULT_STEP``: that rank raises ``RuntimeError`` while masking the batch of that
optimizer step (as a corrupt batch or a CUDA OOM would), after writing the wall-clock time of the fault to
``ALUM_FAULT_STAMP``.  Every other rank is then blocked in the next collective of the step.
"""

from __future__ import annotations

import os
import sys
import time

from alum_pretrain.engine import step as S
from alum_pretrain.masking import STREAM_MASK
from alum_pretrain.train import main

RANK, STEP = int(os.environ["ALUM_FAULT_RANK"]), int(os.environ["ALUM_FAULT_STEP"])
_orig = S.Masker.__call__


def _faulty(self, batch, rate, step, sample_ids, stream=STREAM_MASK):
    if int(os.environ.get("RANK", "0")) == RANK and step == STEP and stream == STREAM_MASK:
        with open(os.environ["ALUM_FAULT_STAMP"], "w") as fh:
            fh.write(repr(time.time()))
        raise RuntimeError(f"injected fault on rank {RANK} at step {STEP}")
    return _orig(self, batch, rate, step, sample_ids, stream)


S.Masker.__call__ = _faulty

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
