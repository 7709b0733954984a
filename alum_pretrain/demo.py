"""``alum-demo``: the whole pipeline on a small real corpus, on any machine, with no downloads.

1. **Corpus.**  By default: the docstrings of the Python standard library installed with this Python
   (read with :mod:`ast` from the ``.py`` sources - nothing is imported or executed), one document per
   module, prose paragraphs only (code examples, tables and argument lists are dropped), de-duplicated.
   That is ~350 documents / ~190K words of real English on every machine.  ``--corpus FILE --format F``
   uses your own text instead (any ``alum-prep`` format).
2. **Prepare** it with :func:`data_prep.prepare` into ``OUT/data-bin`` (a WordPiece tokenizer trained on
   the corpus, one shard, 2 % validation documents).
3. **Pre-train** a tiny BERT (2 layers, hidden 128) with MLM + NSP under the 5 % -> 25 % masking-rate
   curriculum: standard steps for the first half, ALUM (alpha 10, K 1) from ``--steps // 2`` on
   (300 steps by default).
4. **Export** the final checkpoint to ``OUT/hf`` (a HuggingFace folder) with :mod:`alum_pretrain.export`.
5. **Show** ``transformers.pipeline("fill-mask")`` predictions of the exported model and the plot path.

Outputs in ``OUT``: ``corpus.txt`` (when built from the stdlib), ``data-bin/``, ``run/`` (``log.jsonl``,
``plot.png``, ``tb/``, ``checkpoints/``, ``config.yaml``), ``hf/``.  Re-running resumes/reuses what is done.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import logging
import os
import re
import sys
import sysconfig
import time
from pathlib import Path

log = logging.getLogger("alum_pretrain.demo")

# Standard-library folders that are not library documentation (tests, bundled tools, GUIs).
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "ensurepip",
              "turtledemo", "tkinter", "pydoc_data"}
_WORD = re.compile(r"[A-Za-z][a-z'-]*[,.;:)]?$")
_SENT = re.compile(r"(?<=[a-z0-9)][.?!])\s+(?=[A-Z])")

FILL_MASK_SENTENCES = [
    "Return the number of [MASK] in the list.",
    "This function returns a new [MASK] object.",
    "Raise an exception if the file does not [MASK].",
    "The default value of the [MASK] argument is None.",
]


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


def split_sentences(paragraph: str) -> list[str]:
    return [s for s in _SENT.split(paragraph) if s.strip()]


def write_text_corpus(docs: list[list[str]], path: Path) -> Path:
    """``alum-prep --format text``: documents separated by blank lines, one paragraph per line."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for doc in docs:
            fh.write("\n".join(doc) + "\n\n")
    os.replace(tmp, path)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alum-demo", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: alum-demo --out demo_out   (about 3-5 minutes on 2 CPU cores)")
    p.add_argument("--out", required=True, help="output folder (created; re-running reuses finished parts)")
    p.add_argument("--corpus", default=None,
                   help="your own corpus file/folder instead of the standard-library docstrings")
    p.add_argument("--format", default="text",
                   help="format of --corpus (alum-prep formats: text, jsonl, wikitext, wikiextractor, wiki-xml, "
                        "owt; default text = blank-line separated documents)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (ALUM from steps//2 on; default 300)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step (default 32)")
    p.add_argument("--seq-len", type=int, default=128, help="maximum sequence length (default 128)")
    p.add_argument("--vocab-size", type=int, default=4000, help="WordPiece vocabulary trained on the corpus")
    p.add_argument("--preset", default="tiny", help="model size preset (default tiny: 2 layers, hidden 128)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3: a tiny model)")
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


def run_demo(args: argparse.Namespace) -> str:
    if args.steps < 2:
        raise ValueError(f"--steps {args.steps}: needs at least 2 (standard steps, then ALUM)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    import torch

    ncpu = os.cpu_count() or 1
    if hasattr(os, "getloadavg") and os.getloadavg()[0] > ncpu and "OMP_NUM_THREADS" not in os.environ:
        # A busy machine: several OpenMP threads spinning on shared cores are many times slower than one.
        torch.set_num_threads(1)
        log.info("load average %.1f > %d CPUs: using one intra-op thread", os.getloadavg()[0], ncpu)

    # 1. corpus
    if args.corpus:
        corpus, fmt = Path(args.corpus), args.format
        if not corpus.exists():
            raise ValueError(f"--corpus {corpus}: not found")
    else:
        corpus, fmt = out / "corpus.txt", "text"
        if not corpus.exists():
            docs = stdlib_documents()
            write_text_corpus(docs, corpus)
            log.info("corpus: %d documents, %d paragraphs, %d words of standard-library docstrings -> %s",
                     len(docs), sum(len(d) for d in docs), sum(len(p.split()) for d in docs for p in d), corpus)

    # 2. prepare
    from data_prep import prepare

    databin = out / "data-bin"
    if not (databin / "manifest.json").exists():
        prepare([str(corpus)], fmt, databin, train_tokenizer="wordpiece", vocab_size=args.vocab_size,
                lowercase=True, shards=1, valid_fraction=0.02, seed=args.seed, progress=True,
                command=["alum-demo", "--out", str(out)])
    log.info("data-bin ready: %s (%.0fs)", databin, time.time() - t0)

    # 3. pre-train: standard steps, then ALUM from the middle on, under the masking curriculum
    from .engine.config import TrainConfig
    from .config import config_from_dict
    from .train import run_training

    run_dir = out / "run"
    cfg = config_from_dict(TrainConfig, {
        "data": {"path": str(databin), "mode": "pairs", "nsp": True, "max_seq_len": args.seq_len},
        "model": {"preset": args.preset},
        "masking": {"schedule": "curriculum"},
        "alum": {"alpha": 10.0, "start_step": args.steps // 2},
        "optim": {"lr": args.lr, "warmup_ratio": 0.05},
        "train": {"output_dir": str(run_dir), "max_steps": args.steps, "batch_size": args.batch_size,
                  "seed": args.seed, "device": args.device, "log_every": max(1, min(10, args.steps // 10)),
                  "eval_every": max(1, args.steps // 4), "eval_batches": 4, "save_every": 0, "keep_last": 1},
    })
    result = run_training(cfg)
    if not result["completed"]:
        raise ValueError(f"training stopped at step {result['step']} (signal); re-run the same command to resume")

    # 4. export the final checkpoint
    from .export import export

    hf_dir = out / "hf"
    export(run_dir, hf_dir, overwrite=True)  # the run folder -> its newest checkpoint

    # 5. fill-mask with the exported folder, through plain transformers
    from transformers import pipeline
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the pipeline loads BertForMaskedLM: the NSP head is (rightly) unused
    hf_logging.disable_progress_bar()
    fill = pipeline("fill-mask", model=str(hf_dir), tokenizer=str(hf_dir), device=-1)
    lines = [f"alum-demo finished in {time.time() - t0:.0f}s", "fill-mask predictions of the exported model:"]
    for s in FILL_MASK_SENTENCES:
        s = s.replace("[MASK]", fill.tokenizer.mask_token)
        preds = fill(s, top_k=5)
        lines.append(f"  {s}\n    -> " + ", ".join(f"{p['token_str']} ({p['score']:.2f})" for p in preds))
    lines += [f"data-bin:   {databin}", f"train log:  {run_dir / 'log.jsonl'}", f"plot:       {run_dir / 'plot.png'}",
              f"HF model:   {hf_dir}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
