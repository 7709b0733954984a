"""Throughput of the fairseq plugin vs fairseq's stock masked LM, and the ALUM (K=1) cost under fairseq.

Three ``fairseq-train`` runs on the same data-bin, model, batch and masking rate (15 %, constant):

* ``stock``   ``--task masked_lm --criterion masked_lm`` (fairseq's own; masks in the data loader);
* ``alpha0``  ``--task alum_masked_lm --criterion alum_masked_lm --alum-alpha 0`` (masks per update);
* ``alum``    the same with ``--alum-alpha 10 --alum-k-steps 1`` (the paper's setting).

Each run does ``--warmup`` + ``--updates`` updates and logs once after the warm-up and once at the end;
updates/s and words/s are fairseq's own meters over the timed updates (the last ``train_inner`` line).
The three runs are repeated ``--repeats`` times round-robin and the fastest of each is reported (on a
shared machine the least-disturbed run is the measurement).
Prints a side-by-side table, then exactly these last two lines::

    alpha0_vs_fairseq_masked_lm=<updates/s of alpha0 / updates/s of stock>     (goal >= 0.95)
    fairseq_alum_over_standard=<seconds/update of alum / seconds/update of alpha0>  (floor 8/3 ~ 2.67)

Stock ``masked_lm`` reads ``dict.txt`` from every shard folder, so it runs on a view of the data-bin with
symlinked shards plus ``dict.txt`` (nothing is copied).  Usage::

    python3 benchmarks/fairseq_throughput.py                      # CPU, small model, WikiText-2 via alum-prep
    python3 benchmarks/fairseq_throughput.py --data DATA_BIN --arch roberta_base --tokens-per-sample 512 \\
        --batch-size 16 --gpu --fp16-mode amp --updates 50           # GPU, paper-size model
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
USER_DIR = ROOT / "alum_pretrain" / "fairseq_ext"
SHARED = Path(os.environ.get("ALUM_SHARED_DATA", ROOT.parent / "shared" / "data"))


def prepare_data(tmp: Path) -> Path:
    raw = SHARED / "wikitext-2-raw" / "wiki.test.raw"
    vocab = SHARED / "vocab" / "bert-base-uncased-vocab.txt"
    if not raw.exists() or not vocab.exists():
        sys.exit(f"fairseq_throughput: {raw} or {vocab} missing; pass --data DATA_BIN (an alum-prep output)")
    out = tmp / "bin"
    subprocess.run([sys.executable, "-m", "data_prep.cli", str(raw), "--format", "wikitext", "--vocab", str(vocab),
                    "--out", str(out), "--shards", "1", "--no-progress"], check=True, cwd=ROOT)
    return out


def stock_view(databin: Path, tmp: Path) -> str:
    """shardK folders with dict.txt for fairseq's masked_lm (symlinks only)."""
    manifest = json.loads((databin / "manifest.json").read_text())
    paths = []
    for k in range(int(manifest["num_shards"])):
        d = tmp / "stock" / f"shard{k}"
        d.mkdir(parents=True, exist_ok=True)
        for f in (databin / f"shard{k}").iterdir():
            (d / f.name).symlink_to(f.resolve())
        shutil.copy(databin / "dict.txt", d / "dict.txt")
        paths.append(str(d))
    return ":".join(paths)


def run(name: str, data: str, args, extra: list[str], tmp: Path) -> dict:
    total = args.warmup + args.updates
    cmd = [sys.executable, "-m", "fairseq_cli.train", data, "--user-dir", str(USER_DIR),
           "--arch", args.arch, "--tokens-per-sample", str(args.tokens_per_sample),
           "--batch-size", str(args.batch_size), "--optimizer", "adam", "--lr", "1e-4",
           "--max-update", str(total), "--log-format", "json", "--log-interval", str(args.warmup),
           "--save-dir", str(tmp / name), "--no-save", "--disable-validation", "--num-workers", str(args.workers),
           "--seed", "1", "--sample-break-mode", "complete", *extra]
    if args.arch == "roberta":
        cmd += ["--encoder-layers", str(args.layers), "--encoder-embed-dim", str(args.dim),
                "--encoder-ffn-embed-dim", str(4 * args.dim), "--encoder-attention-heads", str(max(1, args.dim // 64))]
    if not args.gpu:
        cmd.append("--cpu")
    elif args.fp16_mode == "amp":
        cmd.append("--amp")
    elif args.fp16_mode == "fp16":
        cmd.append("--fp16")
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    out = p.stdout + p.stderr
    if p.returncode != 0:
        sys.exit(f"fairseq_throughput: run {name} failed:\n{out[-4000:]}")
    lines = [json.loads(line.split("| train_inner |", 1)[1]) for line in out.splitlines() if "| train_inner |" in line]
    if not lines or int(lines[-1]["num_updates"]) != total:
        sys.exit(f"fairseq_throughput: run {name}: no timed train_inner line (raise --updates?)\n{out[-2000:]}")
    last = lines[-1]
    # fairseq rounds "ups" to 2 decimals; words/s over words/update gives updates/s at full precision.
    wps, wpb = float(last["wps"]), float(last["wpb"])
    return {"ups": wps / wpb, "wps": wps, "loss": float(last["loss"])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None,
                   help="an alum-prep data-bin (default: WikiText-2 test from ../shared/data, prepared to a temp dir)")
    p.add_argument("--arch", default="roberta", help="fairseq arch (roberta = sized by --layers/--dim; or roberta_base)")
    p.add_argument("--layers", type=int, default=2, help="encoder layers for --arch roberta")
    p.add_argument("--dim", type=int, default=128, help="hidden size for --arch roberta (FFN 4x, heads dim/64)")
    p.add_argument("--tokens-per-sample", type=int, default=128, help="sequence length")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per update")
    p.add_argument("--warmup", type=int, default=5, help="updates before timing starts")
    p.add_argument("--updates", type=int, default=20, help="timed updates per run")
    p.add_argument("--workers", type=int, default=1, help="data loader workers (--num-workers)")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs per configuration, round-robin; the fastest of each is reported")
    p.add_argument("--gpu", action="store_true", help="run on the GPU (default: --cpu)")
    p.add_argument("--fp16-mode", choices=["fp32", "amp", "fp16"], default="fp32",
                   help="with --gpu: fp32, --amp (fp32 weights; recommended with ALUM) or --fp16")
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="fs_bench_"))
    try:
        databin = args.data or prepare_data(tmp)
        rate = ["--masking-schedule", "constant", "--masking-constant-rate", "0.15"]
        configs = {
            "stock": (stock_view(databin, tmp), ["--task", "masked_lm", "--criterion", "masked_lm",
                                                 "--mask-prob", "0.15"]),
            "alpha0": (str(databin), ["--task", "alum_masked_lm", "--criterion", "alum_masked_lm",
                                      "--alum-alpha", "0", *rate]),
            "alum": (str(databin), ["--task", "alum_masked_lm", "--criterion", "alum_masked_lm",
                                    "--alum-alpha", "10", "--alum-k-steps", "1", *rate]),
        }
        # Round-robin repeats, best of each: on a shared machine the least-disturbed run is the measurement.
        res: dict[str, dict] = {}
        for rep in range(args.repeats):
            for name, (data, extra) in configs.items():
                r = run(f"{name}{rep}", data, args, extra, tmp)
                print(f"  repeat {rep} {name}: {r['ups']:.4f} updates/s", flush=True)
                if name not in res or r["ups"] > res[name]["ups"]:
                    res[name] = r
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    dev = "GPU " + args.fp16_mode if args.gpu else "CPU"
    print(f"fairseq throughput ({dev}, arch {args.arch}, T={args.tokens_per_sample}, B={args.batch_size}, "
          f"{args.updates} timed updates after {args.warmup})")
    print(f"{'run':<8} {'updates/s':>10} {'words/s':>10} {'loss':>8}")
    for k, v in res.items():
        print(f"{k:<8} {v['ups']:>10.4f} {v['wps']:>10.1f} {v['loss']:>8.3f}")
    print(f"words/s alpha0/stock = {res['alpha0']['wps'] / res['stock']['wps']:.3f}")
    print(f"alpha0_vs_fairseq_masked_lm={res['alpha0']['ups'] / res['stock']['ups']:.4f}")
    print(f"fairseq_alum_over_standard={res['alpha0']['ups'] / res['alum']['ups']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
