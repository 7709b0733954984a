"""Build models partitioned under ZeRO-3 (``alum_pretrain.engine.zero_init``) and compare them with plain builds.

Run under ``torchrun --nproc_per_node 2`` (gloo, DeepSpeed's CPU accelerator) by tests/test_deepspeed.py.
For each case the model is built twice with the same seed: partitioned (``zero3_scratch`` for a preset,
``zero3_loading`` for a checkpoint folder) and plainly; the gathered partitioned weights are compared with
the plain ones tensor by tensor.  ``$PROBE_CKPT`` holds the checkpoint folders ``full/`` (BERT with MLM and
NSP heads) and ``bare/`` (a ``BertModel``: the MLM head is fresh).  Writes ``$PROBE_OUT/rank{R}.json``:
``{case: {"unequal": [names], "tensors": n, "held": elements of whole tensors held, "partition": elements
of this rank's partitions, "whole": elements of the model, "tied": [decoder tied (partitioned, plain)],
"fresh": [names], "fresh_plain": [names]}}``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

SEED = 1234
DS_CONFIG = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": 2,
             "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
TINY = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128)


def _cases():
    from alum_pretrain.models import build_scratch_model, load_continual_model

    ck = Path(os.environ["PROBE_CKPT"])
    special = {"cls": 2, "sep": 3}
    return {
        "bert-nsp": (False, lambda: build_scratch_model(TINY, 500, 0, nsp=True)),
        "modernbert-tiny": (False, lambda: build_scratch_model("modernbert-tiny", 500, 0, nsp=False,
                                                               special_ids=special)),
        "deberta-tiny": (False, lambda: build_scratch_model("deberta-tiny", 500, 0, nsp=False, special_ids=special)),
        "continual-nsp": (True, lambda: load_continual_model(ck / "full", nsp=True)),
        "continual-fresh-head": (True, lambda: load_continual_model(ck / "bare", nsp=False)),
    }


def _fresh(model) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if getattr(p, "_alum_fresh", False))


def _tied(model) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def compare(continual: bool, build) -> dict:
    import deepspeed

    from alum_pretrain.engine.zero_init import sync_buffers, zero3_loading, zero3_scratch
    from alum_pretrain.models import param_numel

    torch.manual_seed(SEED)
    with (zero3_loading if continual else zero3_scratch)(DS_CONFIG):
        model = build()
    sync_buffers(model)
    torch.manual_seed(SEED)
    plain = build()
    params = list(model.parameters())
    out = {"held": sum(p.numel() for p in params),  # the whole tensors this rank holds: none
           "partition": sum(p.ds_tensor.numel() for p in params), "whole": sum(map(param_numel, params)),
           "tied": [_tied(model), _tied(plain)], "fresh": _fresh(model), "fresh_plain": _fresh(plain)}
    with deepspeed.zero.GatheredParameters(params):
        got, want = model.state_dict(), plain.state_dict()
        assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
        out["unequal"] = [k for k in want if not torch.equal(got[k], want[k])]
        out["tensors"] = len(want)
    return out


def main() -> int:
    torch.distributed.init_process_group("gloo")
    from alum_pretrain.engine import distributed as D
    from alum_pretrain.engine.deepspeed_engine import init_comm

    init_comm(D.DistEnv(rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"])))
    result = {name: compare(continual, build) for name, (continual, build) in _cases().items()}
    out = Path(os.environ["PROBE_OUT"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{torch.distributed.get_rank()}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
