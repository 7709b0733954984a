"""What the integrity checks cost: ``name=value`` lines (no timed assertions anywhere).

    python benchmarks/integrity_cost.py [--mb 512]

* ``crc32_gb_per_s`` / ``sha256_gb_per_s``: zlib CRC-32 (checkpoint checksums, computed when a checkpoint
  is written and checked when it is resumed/exported) and hashlib SHA-256 (``--data.verify=full`` against
  the data-bin manifest) throughput on this CPU, data in memory;
* ``bert_large_checkpoint_gb`` / ``bert_large_crc32_s`` / ``bert_large_sha256_s``: a BERT-large checkpoint
  (335M fp32 weights + AdamW's two moments = 4.0 GB) and the seconds one pass over it takes;
* ``save_overhead_ratio``: a checkpoint save of the ``mini`` preset with checksums + format checks versus
  a plain ``torch.save`` + ``save_pretrained`` of the same state (>= 1; the extra read-back and hash);
* ``verify_s_mini``: :func:`verify_checkpoint` (sums + safe load + finiteness) on that checkpoint;
* ``range_check_ratio``: reading items through the token-id range check versus without it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _best(fn, reps=3):
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=256, help="buffer hashed for the throughput figure (MB)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    import zlib

    buf = os.urandom(args.mb << 20)
    sha = len(buf) / _best(lambda: hashlib.sha256(buf).hexdigest()) / 1e9
    crc = len(buf) / _best(lambda: zlib.crc32(buf)) / 1e9
    print(f"sha256_gb_per_s={sha:.3f}")
    print(f"crc32_gb_per_s={crc:.3f}")
    large = 335e6 * 4 * 3 / 1e9
    print(f"bert_large_checkpoint_gb={large:.2f}")
    print(f"bert_large_crc32_s={large / crc:.2f}")
    print(f"bert_large_sha256_s={large / sha:.2f}")

    from transformers import BertConfig, BertForPreTraining

    from alum_pretrain.engine import checkpoint as C
    from alum_pretrain.models import save_model

    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(vocab_size=30522, hidden_size=256, num_hidden_layers=4,
                                          num_attention_heads=4, intermediate_size=1024))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 8, dtype=torch.long)).prediction_logits.sum().backward()
    opt.step()
    state = {"step": 1, "optimizer": opt.state_dict(), "rng": [C.rng_state()]}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        n = {"i": 0}

        def plain():
            n["i"] += 1
            out = d / f"plain{n['i']}"
            out.mkdir()
            model.save_pretrained(str(out / "model"), safe_serialization=True)
            torch.save(state, out / "train_state.pt")

        def verified():
            n["i"] += 1
            C.save_checkpoint(d / "run", n["i"], lambda p: save_model(model, p), state, keep_last=1)

        tp, tv = _best(plain), _best(verified)
        print(f"save_overhead_ratio={tv / tp:.3f}")
        ck = C.latest_checkpoint(d / "run")
        print(f"verify_s_mini={_best(lambda: C.verify_checkpoint(ck)):.3f}")
        size = sum(p.stat().st_size for p in ck.rglob('*') if p.is_file())
        print(f"mini_checkpoint_mb={size / 1e6:.1f}")

        from alum_pretrain.data.databin import OffsetDataset
        from alum_pretrain.data.indexed import IndexedDatasetBuilder, MMapIndexedDataset

        rng = np.random.default_rng(0)
        b = IndexedDatasetBuilder(d / "ds", vocab_size=30522)
        for _ in range(5000):
            b.add_item(rng.integers(4, 30522, size=int(rng.integers(10, 40))))
        b.finalize()
        ds = MMapIndexedDataset(d / "ds")
        checked, unchecked = OffsetDataset(ds, 4, 30522), OffsetDataset(ds, 4)
        t1 = _best(lambda: [checked[i] for i in range(len(ds))])
        t0 = _best(lambda: [unchecked[i] for i in range(len(ds))])
        print(f"range_check_ratio={t1 / t0:.3f}")
        print(f"range_check_us_per_item={(t1 - t0) / len(ds) * 1e6:.2f}")


if __name__ == "__main__":
    main()
