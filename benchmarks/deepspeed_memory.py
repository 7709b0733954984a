"""Model-state memory per GPU under DDP and DeepSpeed ZeRO 1/2/3 with AdamW (computed, no GPU needed).

The models are built on the meta device from their published configurations (BERT-base/large with the MLM +
NSP heads, RoBERTa-large with the MLM head; tied decoder counted once), so the parameter counts are exact.

Bytes per parameter with float32 weights and 16-bit autocast (what alum-train does under both engines):
weights 4, gradients 4, AdamW moments 8 (two float32 tensors).  Over N data-parallel GPUs:

    DDP      4 + 4 + 8          = 16
    ZeRO-1   4 + 4 + 8 / N              (optimizer state sharded)
    ZeRO-2   4 + (4 + 8) / N            (+ gradients sharded)
    ZeRO-3   (4 + 4 + 8) / N            (+ weights sharded; gathered layer by layer when used)

Not included: activations (they depend on the micro-batch and sequence length, and ZeRO does not change
them), ZeRO's communication buckets (``deepspeed.reduce_bucket_size`` / ``allgather_bucket_size`` elements
x 4 B each, 0.2 GB each at the default), the CUDA context and the allocator's fragmentation.

    python benchmarks/deepspeed_memory.py [--gpus 16 32]

prints one ``name=value`` line per model / engine / GPU count (GB = 1e9 bytes) and the saving ratios.

Measured, not computed: ``--build-rss`` starts ``torchrun --nproc_per_node 2`` (CPU, gloo; about a minute
of CPU per build) twice and prints the host memory per rank (``VmHWM`` = peak, ``VmRSS`` = resident;
MB = 2**20 bytes) of the ZeRO-3 start-up of BERT-base (``--model.preset=base``, 30,522-token vocabulary,
MLM + NSP heads, from its config).  ``before`` builds the whole model in every process and lets
``deepspeed.initialize`` partition it (what alum-train did); ``after`` builds it under
``deepspeed.zero.Init`` (``alum_pretrain.engine.zero_init``, what alum-train does).  Per rank and mode:
``build_peak`` (the peak up to the built model), ``build_rss_increase`` (that peak above the memory after
the imports and the process-group start; the peak is reset there through ``/proc/self/clear_refs``),
``built_resident_increase`` (what the built model keeps) and ``startup_peak`` (the peak once AdamW and
``deepspeed.initialize``, whose ZeRO-3 buffers are the same in both modes, are done too).

    python benchmarks/deepspeed_memory.py --build-rss [--nproc 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def param_count(name: str) -> int:
    import torch
    from transformers import BertConfig, BertForPreTraining, RobertaConfig, RobertaForMaskedLM

    large = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    builders = {
        "bert_base": lambda: BertForPreTraining(BertConfig()),
        "bert_large": lambda: BertForPreTraining(BertConfig(**large)),
        "roberta_large": lambda: RobertaForMaskedLM(RobertaConfig(vocab_size=50265, max_position_embeddings=514,
                                                                  type_vocab_size=1, **large)),
    }
    with torch.device("meta"):
        model = builders[name]()
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


def bytes_per_param(engine: str, n_gpus: int) -> float:
    w, g, opt = 4.0, 4.0, 8.0
    return {"ddp": w + g + opt, "zero1": w + g + opt / n_gpus, "zero2": w + (g + opt) / n_gpus,
            "zero3": (w + g + opt) / n_gpus}[engine]


def _rss_mb(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` (peak) of this process from /proc/self/status, in MB (2**20 bytes)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def build_worker(mode: str, out: Path) -> None:
    """One torchrun process: the ZeRO-3 start-up of BERT-base, plain (``before``) or partitioned (``after``)."""
    import torch

    torch.distributed.init_process_group("gloo")
    from transformers import BertForPreTraining  # noqa: F401  (before the baseline: measure the build only)

    from alum_pretrain.config import parse_config
    from alum_pretrain.engine import deepspeed_engine as DS
    from alum_pretrain.engine import distributed as D
    from alum_pretrain.engine.config import TrainConfig
    from alum_pretrain.engine.zero_init import zero3_scratch
    from alum_pretrain.models import build_scratch_model

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    deepspeed = DS.init_comm(D.DistEnv(rank=rank, world_size=world))
    cfg = parse_config(TrainConfig, ["--train.engine=deepspeed", "--deepspeed.zero_stage=3", "--train.batch_size=1"],
                       prog="bench")
    ds_cfg = DS.ds_config(cfg, 1, world)
    base = _rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here on
    torch.manual_seed(0)
    with zero3_scratch(ds_cfg) if mode == "after" else contextlib.nullcontext():
        model = build_scratch_model("base", 30522, 0, nsp=True)
    built, resident = _rss_mb("VmHWM"), _rss_mb("VmRSS")
    optimizer = DS.build_optimizer(model, cfg.optim, torch.device("cpu"))
    deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)
    (out / f"{mode}-rank{rank}.json").write_text(json.dumps(
        {"base": base, "built": built, "resident": resident, "startup": _rss_mb("VmHWM")}))


def build_rss(nproc: int = 2) -> dict[str, float]:
    """Run :func:`build_worker` under torchrun for both modes; ``name=value`` figures per rank (MB)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("before", "after"):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                   str(Path(__file__).resolve()), "--build-worker", mode, "--out", tmp]
            r = subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"{mode}: torchrun exited {r.returncode}:\n{r.stderr[-3000:]}")
        for rank in range(nproc):
            got = {m: json.loads((Path(tmp) / f"{m}-rank{rank}.json").read_text()) for m in ("before", "after")}
            for m, v in got.items():
                figures[f"zero3_build_peak_rss_mb_{m}_rank{rank}"] = round(v["built"], 1)
                figures[f"zero3_build_rss_increase_mb_{m}_rank{rank}"] = round(v["built"] - v["base"], 1)
                figures[f"zero3_built_resident_increase_mb_{m}_rank{rank}"] = round(v["resident"] - v["base"], 1)
                figures[f"zero3_startup_peak_rss_mb_{m}_rank{rank}"] = round(v["startup"], 1)
            b, a = got["before"], got["after"]
            figures[f"zero3_build_increase_after_vs_before_ratio_rank{rank}"] = round(
                (a["built"] - a["base"]) / (b["built"] - b["base"]), 3)
            figures[f"zero3_startup_peak_after_vs_before_ratio_rank{rank}"] = round(a["startup"] / b["startup"], 3)
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, nargs="+", default=[16, 32], help="data-parallel GPU counts (DGX-2: 16 per node)")
    p.add_argument("--build-rss", action="store_true",
                   help="measure the peak host memory per rank of a ZeRO-3 BERT-base start-up, 2 CPU processes, "
                        "before/after deepspeed.zero.Init (CPU heavy: a few minutes)")
    p.add_argument("--nproc", type=int, default=2, help="processes of the --build-rss measurement")
    p.add_argument("--build-worker", choices=("before", "after"), help=argparse.SUPPRESS)  # one torchrun process
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.build_worker:
        build_worker(args.build_worker, args.out)
        return 0
    if args.build_rss:
        for k, v in build_rss(args.nproc).items():
            print(f"{k}={v}")
        return 0
    for model in ("bert_base", "bert_large", "roberta_large"):
        n = param_count(model)
        print(f"{model}_params_M={n / 1e6:.1f}")
        ddp = n * bytes_per_param("ddp", 1) / 1e9
        print(f"{model}_ddp_GB_per_gpu={ddp:.2f}")
        for gpus in args.gpus:
            for engine in ("zero1", "zero2", "zero3"):
                gb = n * bytes_per_param(engine, gpus) / 1e9
                print(f"{model}_{engine}_{gpus}gpus_GB_per_gpu={gb:.2f}")
                print(f"{model}_{engine}_{gpus}gpus_vs_ddp_ratio={gb / ddp:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
