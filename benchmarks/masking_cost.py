"""Host cost of masking one training batch: the old per-sample loop vs the vectorised ``mask_batch``.

    python benchmarks/masking_cost.py                     # 256 x 128 (BERT phase 1 global batch, one GPU)
    python benchmarks/masking_cost.py --batch 32 --seq 512 --threads 4

Both give every sample a mask that depends only on (seed, step, global sample index), which is what the
resume and split-invariance tests need:

(a) ``loop``   what the engines did before: one ``step_generator`` (a numpy ``SeedSequence`` hash and a
               ``torch.Generator``) and one ``mask_tokens`` call per sample, then a concatenation;
(b) ``batch``  :func:`alum_pretrain.masking.mask_batch`: counter-based per-sample uniforms and one
               vectorised selection over the whole ``(B, T)`` batch.

Each is timed in interleaved rounds (machine-load drift hits both alike); the minimum over rounds is
reported (the least disturbed run).  Output: ``name=value`` lines, milliseconds per batch and the ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alum_pretrain.masking import mask_batch, mask_tokens, step_generator  # noqa: E402


def make_batch(B: int, T: int, V: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] A [SEP] B [SEP] + 10 % padding at the end of every other row (special = specials + padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, V, (B, T), generator=g)
    ids[:, 0] = 2
    ids[:, T // 2] = 3
    ids[:, -1] = 3
    ids[::2, T - T // 10:] = 0
    special = (ids == 0) | (ids == 2) | (ids == 3)
    return ids, special


def loop_masking(ids, special, pool, seed, step, sample_ids, rate=0.15):
    masked, labels = [], []
    for i, sid in enumerate(sample_ids.tolist()):
        m, lab = mask_tokens(ids[i:i + 1], rate, mask_id=4, special_mask=special[i:i + 1], random_pool=pool,
                             generator=step_generator(seed, step, int(sid)))
        masked.append(m)
        labels.append(lab)
    return torch.cat(masked), torch.cat(labels)


def batch_masking(ids, special, pool, seed, step, sample_ids, rate=0.15):
    return mask_batch(ids, rate, mask_id=4, special_mask=special, random_pool=pool, seed=seed, step=step,
                      sample_ids=sample_ids)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256, help="sequences per batch (default 256)")
    p.add_argument("--seq", type=int, default=128, help="sequence length (default 128)")
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (default 7)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: the training "
                                                            "thread masks while the device computes)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ids, special = make_batch(args.batch, args.seq, args.vocab)
    pool = torch.arange(10, args.vocab)
    sids = torch.arange(args.batch)
    times = {"loop": [], "batch": []}
    fns = {"loop": loop_masking, "batch": batch_masking}
    for name, fn in fns.items():  # warm-up
        fn(ids, special, pool, 1, 0, sids)
    for r in range(args.rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(ids, special, pool, 1, r, sids)
            times[name].append(time.perf_counter() - t0)
    loop_ms, batch_ms = min(times["loop"]) * 1e3, min(times["batch"]) * 1e3
    print(f"batch_shape={args.batch}x{args.seq}")
    print(f"threads={args.threads}")
    print(f"loop_ms={loop_ms:.2f}")
    print(f"batch_ms={batch_ms:.2f}")
    print(f"loop_us_per_sample={loop_ms * 1e3 / args.batch:.1f}")
    print(f"batch_us_per_sample={batch_ms * 1e3 / args.batch:.1f}")
    print(f"speedup={loop_ms / batch_ms:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
