"""Process-group setup from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and small collectives.

The library reads only torchrun's variables; SLURM lives in the launcher (:mod:`launch`).  Without them
(plain ``python``/``alum-train``) it is a single process and every collective is a no-op.

Besides the training group (NCCL on GPU, gloo on CPU) a second **gloo group for control messages**
(the stop flag after SIGTERM, masked-token counts, gathered checkpoint state) keeps those small CPU
exchanges off the GPU stream, so they never force a host-device synchronisation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    control_group: Any = None  # gloo group for CPU control messages (None when single-process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name}={v!r} must be an integer (set by torchrun)") from None


def setup(device: str = "auto") -> DistEnv:
    """Initialise from torchrun's env vars; pick the device (``auto`` = cuda if available)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--train.device=cuda but no CUDA device is visible (use --train.device=cpu or auto)")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    env = DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev)
    if world > 1:
        if not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            kwargs = {"device_id": dev} if dev.type == "cuda" else {}
            dist.init_process_group(backend=backend, timeout=timedelta(minutes=30), **kwargs)
        env.control_group = dist.new_group(backend="gloo") if dev.type == "cuda" else dist.group.WORLD
    return env


def cleanup(env: DistEnv, failed: bool = False) -> None:
    """Tear the process groups down.

    After a normal end (``failed=False``) every rank is here: a barrier, then destroy.  On the exception
    path (``failed=True``: this rank raised - CUDA OOM, a data error, a bug) there must be NO collective:
    the other ranks are blocked inside a different one (an NCCL all-reduce in backward, the gloo stop-flag
    all-reduce), so a barrier would never match and every rank would wait for the 30-minute timeout.
    Instead the groups are aborted locally and the exception propagates: this process exits non-zero
    within seconds, torchrun sees the failure and stops the other workers (and gloo peers get a closed
    connection and raise at once).
    """
    if not (env.distributed and dist.is_initialized()):
        return
    if not failed:
        dist.barrier(group=env.control_group)
        dist.destroy_process_group()
        return
    abort_process_groups()


def abort_process_groups() -> None:
    """Abort every process group of this process without talking to the other ranks (never blocks)."""
    if not dist.is_initialized():
        return
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    try:
        if abort is not None:
            abort()  # ncclCommAbort on NCCL; closes gloo's pairs; local only
        else:  # older torch: destroying a gloo/NCCL group is local when nothing of ours is pending
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort on a path that is already failing; never mask the cause
        pass


def all_reduce_cpu(env: DistEnv, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce a small CPU tensor over the control group (in place; returned for chaining)."""
    if env.distributed:
        dist.all_reduce(t, op=op, group=env.control_group)
    return t


def all_reduce_device(env: DistEnv, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce a tensor on the training device (training group)."""
    if env.distributed:
        dist.all_reduce(t, op=op)
    return t


def any_rank(env: DistEnv, flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any rank (so all ranks agree to stop together)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    return bool(all_reduce_cpu(env, t, dist.ReduceOp.MAX).item())


def gather_objects(env: DistEnv, obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (on every rank); ``[obj]`` when single-process."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj, group=env.control_group)
    return out


def broadcast_object(env: DistEnv, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not env.distributed:
        return obj
    box = [obj if env.is_main else None]
    dist.broadcast_object_list(box, src=0, group=env.control_group)
    return box[0]


__all__ = ["DistEnv", "setup", "cleanup", "abort_process_groups", "all_reduce_cpu", "all_reduce_device", "any_rank",
           "gather_objects", "broadcast_object"]
