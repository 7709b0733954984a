"""Run ``alum-train`` with a non-finite loss injected at chosen optimizer steps (fault injection).

``NAN_STEPS=3,4`` makes :class:`PretrainStep` return ``loss * nan`` for every micro-batch of those
(1-based) optimizer steps; everything else is the real run.  Used by tests/test_deepspeed.py."""

from __future__ import annotations

import os
import sys


def main() -> int:
    from alum_pretrain.engine import step as S
    from alum_pretrain.train import main as train_main

    bad = {int(s) for s in os.environ["NAN_STEPS"].split(",")}
    calls = {"n": 0}
    per_step = int(os.environ.get("MICRO_PER_STEP", "1"))
    forward = S.PretrainStep.forward

    def poisoned(self, batch, **kw):
        loss, metrics = forward(self, batch, **kw)
        step = calls["n"] // per_step + 1  # optimizer step of this micro-batch (a forward per micro-batch)
        calls["n"] += 1
        if step in bad:
            loss = loss * float("nan")
        return loss, metrics

    S.PretrainStep.forward = poisoned
    return train_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
