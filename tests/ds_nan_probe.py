"""Run ``alum-train`` with a non-finite loss injected at chosen optimizer steps (fault injection).

``NAN_STEPS=3,4`` makes :class:`PretrainStep` return ``loss * nan`` for every micro-batch of those
(1-based) optimizer steps; ``OVERFLOW_STEPS=3`` returns ``loss * 1e30`` instead (a finite loss whose fp16
gradients overflow); everything else is the real run.  Every forward is counted, evaluations included,
unless ``PROBE_COUNT=train`` (then the numbers are training steps).  Used by tests/test_deepspeed.py."""

from __future__ import annotations

import os
import sys


def main() -> int:
    from alum_pretrain.engine import step as S
    from alum_pretrain.train import main as train_main

    bad = {int(s) for s in os.environ.get("NAN_STEPS", "").split(",") if s}
    over = {int(s) for s in os.environ.get("OVERFLOW_STEPS", "").split(",") if s}
    calls = {"n": 0}
    count_train_only = os.environ.get("PROBE_COUNT") == "train"
    per_step = int(os.environ.get("MICRO_PER_STEP", "1"))
    forward = S.PretrainStep.forward

    def poisoned(self, batch, **kw):
        import torch

        loss, metrics = forward(self, batch, **kw)
        if count_train_only and not torch.is_grad_enabled():  # an evaluation (the step-0 baseline included)
            return loss, metrics
        step = calls["n"] // per_step + 1  # optimizer step of this micro-batch (a forward per micro-batch)
        calls["n"] += 1
        if step in bad:
            loss = loss * float("nan")
        elif step in over:
            loss = loss * 1e30
        return loss, metrics

    S.PretrainStep.forward = poisoned
    return train_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
