"""Multi-process fine-tuning gradient sync (``finetune.methods.base.sync_grads_fixed_order``), 2 gloo ranks.

The case that used to hang or misalign: RIFT's per-class heads get ``grad=None`` on a rank whose
minibatch lacks that class, so ranks held gradients for different parameter sets.  Reference: the
average over ranks written out by hand (absent = zero contribution), and ``None`` where no rank touched.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.multirank

# rank -> which of (shared, head_a, head_b, head_c) get a gradient, and its value
TOUCHED = {0: {"shared": 1.0, "head_a": 2.0}, 1: {"shared": 3.0, "head_b": 5.0}}
SHAPES = {"shared": (3, 2), "head_a": (4,), "head_b": (2, 2), "head_c": (5,)}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from alum_pretrain.finetune.methods.base import TrainContext

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        params = {k: torch.nn.Parameter(torch.zeros(s)) for k, s in SHAPES.items()}
        model = torch.nn.Module()
        model.shared = params["shared"]
        for name, v in TOUCHED[rank].items():
            params[name].grad = torch.full(SHAPES[name], v) * (1 + torch.arange(params[name].numel()).view(SHAPES[name]))
        heads = [params["head_a"], params["head_b"], params["head_c"]]
        ctx = TrainContext(model=model, optimizer=torch.optim.SGD(list(params.values()), lr=0.1),
                           extra_params=heads)
        ctx.sync_grads()
        torch.save({k: (None if p.grad is None else p.grad.clone()) for k, p in params.items()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ranks_with_different_grad_sets_average_by_parameter():
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(2, init, tmp), nprocs=2, join=True)
        got = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    for name, shape in SHAPES.items():
        ramp = 1 + torch.arange(torch.Size(shape).numel()).view(shape).float()
        contrib = [TOUCHED[r].get(name) for r in range(2)]
        if all(c is None for c in contrib):
            assert got[0][name] is None and got[1][name] is None, name  # untouched everywhere: skipped
            continue
        want = sum((c or 0.0) * ramp for c in contrib) / 2
        for r in range(2):
            assert torch.allclose(got[r][name], want), (name, r, got[r][name], want)
