"""Run ``alum-train`` (under torchrun) while counting collectives and ZeRO gradient-hook calls.

Used by tests/test_deepspeed.py to prove that the ALUM ascent (``torch.autograd.grad`` w.r.t. delta)
fires none of ZeRO's gradient hooks and reduces nothing.  Before anything builds a process group or a
DeepSpeed engine, this script wraps

* every torch.distributed collective DeepSpeed can reach (DeepSpeed's comm layer binds some of them when
  it starts, which is why the wrapping must come first),
* the ZeRO stage 1/2 and stage 3 optimizers' gradient-hook entry points (``reduce_ready_partitions_and_remove_grads``
  and ``reduce_independent_p_g_buckets_and_remove_grads``), which the per-parameter gradient hooks call,
* ``torch.autograd.grad`` (only ALUM's ascent calls it) to mark the ascent window,

then runs ``alum_pretrain.train.main`` with the command-line arguments and writes, per rank,
``$PROBE_OUT/rank{R}.json``: ``{"ascent": {name: calls}, "outside": {name: calls}, "ascent_calls": n}``.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

STATE = {"in_ascent": 0, "ascent_calls": 0}
COUNTS = {"ascent": collections.Counter(), "outside": collections.Counter()}

COLLECTIVES = ("all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all_single",
               "all_gather", "all_gather_into_tensor", "broadcast", "all_reduce_coalesced")


def _record(name: str) -> None:
    COUNTS["ascent" if STATE["in_ascent"] else "outside"][name] += 1


def _wrap(owner, name: str, label: str) -> None:
    fn = getattr(owner, name, None)
    if fn is None:
        return

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _record(label)
        return fn(*args, **kwargs)

    setattr(owner, name, wrapper)


def install() -> None:
    for name in COLLECTIVES:
        _wrap(dist, name, f"dist.{name}")
    grad = torch.autograd.grad

    @functools.wraps(grad)
    def ascent_grad(*args, **kwargs):
        STATE["in_ascent"] += 1
        STATE["ascent_calls"] += 1
        try:
            return grad(*args, **kwargs)
        finally:
            STATE["in_ascent"] -= 1

    torch.autograd.grad = ascent_grad
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    for cls, tag in ((DeepSpeedZeroOptimizer, "zero12"), (DeepSpeedZeroOptimizer_Stage3, "zero3")):
        for meth in ("reduce_ready_partitions_and_remove_grads", "reduce_independent_p_g_buckets_and_remove_grads"):
            _wrap(cls, meth, f"hook.{tag}.{meth}")


def main() -> int:
    install()
    from alum_pretrain.train import main as train_main

    rc = train_main(sys.argv[1:])
    out = Path(os.environ["PROBE_OUT"])
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    (out / f"rank{rank}.json").write_text(json.dumps(
        {"ascent": dict(COUNTS["ascent"]), "outside": dict(COUNTS["outside"]), "ascent_calls": STATE["ascent_calls"]}))
    return rc


if __name__ == "__main__":
    sys.exit(main())
