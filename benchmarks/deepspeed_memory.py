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
"""

from __future__ import annotations

import argparse


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, nargs="+", default=[16, 32], help="data-parallel GPU counts (DGX-2: 16 per node)")
    args = p.parse_args(argv)
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
