"""Corpus-preparation throughput: alum-prep with 1 and 2 workers vs. the fairseq recipe on the same text.

    python3 benchmarks/prep_throughput.py                       # 22 MB built from ../shared/data WikiText-2
    python3 benchmarks/prep_throughput.py --synth-mb 0          # the 2.4 MB WikiText-2 files as they are
    python3 benchmarks/prep_throughput.py --inputs a.raw b.raw --format wikitext --vocab vocab.txt

Input: by default a ``--synth-mb`` (20) MB (22 MB written: whole rounds) WikiText file built from the two shared WikiText-2 files
(:func:`synth_wikitext`): round 0 is every article unchanged; each further round re-issues every article
with its paragraphs in a new random order plus one paragraph borrowed from another article, under the
title ``Title (round r)``.  Every document is distinct (the exact-duplicate filter keeps them all) and
all text is real Wikipedia prose.  2.4 MB is too small to amortise starting a worker pool; 22 MB is not.

What is timed (wall clock inside one Python process, imports excluded on both sides; an untimed 2-worker
run on the first 256 KB of an uncompressed text input comes first, so that no timed run pays first-use
imports):

* **alum-prep** (``data_prep.prepare``, 1 shard, no valid split): read + decode, WikiText markup removal,
  cleaning (NFC, control characters), exact-duplicate filter, rule-based sentence splitting (the default ``rules``), WordPiece
  tokenization, binarization (+ manifest hashing, dict.txt).  With 2 workers the pool start-up is included.
  Runs with ``--tokenizer-engine auto`` (``--engine``; kitoken when its ids match HF's on the run's own
  sample, which each run checks on its workers and times) at 1 and 2 workers, plus one HF-only ``--workers 1`` run: every
  data-bin must equal the HF-only one byte for byte (``databins_identical_to_hf=True``, else exit 1).
  Each run prints its steps (the manifest's ``timing.phases``, wall seconds) and the share of its wall time
  outside the ``stream`` step, which is the serial part that caps the scaling (Amdahl: 2 workers reach
  1.6x only when it is at most 25 %).  ``--profile`` prints where a ``--workers 1`` run spends its time instead.
* **fairseq recipe** (what its RoBERTa/BERT instructions do, 1 process each):
  (a) a HuggingFace fast-tokenizer pass writing space-separated word pieces, one input line per output
  line (the role of fairseq's ``multiprocessing_bpe_encoder.py``), then
  (b) ``fairseq-preprocess --only-source --srcdict dict.txt --trainpref tokens.txt --workers 1``
  (``fairseq_cli.preprocess.main`` called in-process).  It does *less* work than alum-prep: no cleaning,
  no sentence splitting, no duplicate filter, no shards.
  The ids it writes equal ours (both are tokenizer id + 4); the script checks this on the token streams.

What is compared (all numbers are printed; the two ``key=value`` lines are the summary):

* ``prep_scaling_2_vs_1``: wall-clock rate of alum-prep ``--workers 2`` over ``--workers 1``.  A worker
  is one process on one core: the Rust tokenizer's own thread pool is off in every worker and, with
  ``--workers 1``, in the one process (otherwise ``--workers 1`` would already use every core).  Meaningful
  on an idle machine with >= 2 free cores; the CPU seconds printed beside each run (this process + its
  worker processes) show the work done, which machine load barely changes, and
  ``cpu_overhead_2_vs_1`` (CPU seconds of 2 workers / 1 worker) the cost of the parallel version.
* ``prep_speedup_vs_fairseq``: equal resources, one core each: alum-prep ``--workers 1`` over the fairseq
  recipe with ``--workers 1`` (wall clock; the CPU-second ratio is printed beside it);
  ``prep_speedup_vs_fairseq_hf_engine`` the same with HF encoding, ``engine_speedup_vs_hf`` the two alum-prep
  runs' ratio.  alum-prep
  ``--workers 2`` over the one-core fairseq recipe is printed too, for information only.

Default run: ~2.5 minutes on an idle 2-core machine (22 MB input, each configuration once).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ALUM_SHARED_DATA", ROOT.parent / "shared" / "data"))


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the worker pool is joined before prepare returns)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def run_ours(inputs, fmt, vocab, workers, out, engine="auto"):
    from data_prep import PrepConfig, prepare

    cfg = PrepConfig(inputs=inputs, format=fmt, out=out, vocab=vocab, shards=1, workers=workers, valid_fraction=0.0,
                     progress=False, tokenizer_engine=engine)
    c0, t0 = cpu_seconds(), time.perf_counter()
    m = prepare(cfg)
    return time.perf_counter() - t0, cpu_seconds() - c0, m


def run_fairseq(inputs, fmt, vocab, tok_dir, dict_txt, work):
    """(a) HF tokenization pass -> tokens.txt, (b) fairseq-preprocess; returns (seconds a, seconds b)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core, like fairseq --workers 1
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(tok_dir) / "tokenizer.json"))
    id_to_token = [None] * tok.get_vocab_size(with_added_tokens=True)
    for t, i in tok.get_vocab(with_added_tokens=True).items():
        id_to_token[i] = t
    tokens_txt = Path(work) / "tokens.txt"
    c0, t0 = cpu_seconds(), time.perf_counter()
    with open(tokens_txt, "w", encoding="utf-8") as out:
        for path in inputs:
            with open(path, encoding="utf-8", errors="replace") as fh:
                batch = []
                for line in fh:
                    line = line.strip()
                    if line:
                        batch.append(line)
                    if len(batch) == 1000:
                        for e in tok.encode_batch_fast(batch, add_special_tokens=False):
                            out.write(" ".join([id_to_token[i] for i in e.ids]) + "\n")
                        batch = []
                for e in tok.encode_batch_fast(batch, add_special_tokens=False) if batch else []:
                    out.write(" ".join([id_to_token[i] for i in e.ids]) + "\n")
    t_a = time.perf_counter() - t0

    from fairseq import options
    from fairseq_cli import preprocess

    dest = Path(work) / "fairseq-bin"
    args = options.get_preprocessing_parser().parse_args([
        "--only-source", "--srcdict", str(dict_txt), "--trainpref", str(tokens_txt), "--destdir", str(dest),
        "--workers", "1", "--dataset-impl", "mmap",
    ])
    import logging

    logging.getLogger("fairseq_cli.preprocess").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    preprocess.main(args)
    t_b = time.perf_counter() - t0
    return t_a, t_b, cpu_seconds() - c0, dest


def warm_up(first_input: str, fmt: str, vocab: str, work: Path) -> None:
    """An untimed 2-worker run on the first 256 KB of the input, so that the first timed run does not pay the
    modules imported on first use (tokenizers, kitoken, transformers' tokenizer classes, the pool).  Only
    for uncompressed line-based inputs (a cut compressed or columnar file would not read)."""
    if (fmt not in ("wikitext", "text", "jsonl") or not Path(first_input).is_file()
            or Path(first_input).suffix in (".gz", ".bz2", ".xz", ".zst")):
        return
    with open(first_input, "rb") as fh:
        head = fh.read(256 << 10)
    small = work / ("warm_up" + Path(first_input).suffix)
    small.write_bytes(head[: head.rfind(b"\n") + 1])
    run_ours([str(small)], fmt, vocab, 2, work / "warm_up_out")
    shutil.rmtree(work / "warm_up_out", ignore_errors=True)


def phase_line(manifest: dict, seconds: float) -> str:
    """The run's steps (the manifest's ``timing.phases``, wall seconds) and the share of the run outside the
    ``stream`` step, the part the workers share: what caps the scaling (Amdahl)."""
    phases = manifest["timing"].get("phases", {})
    serial = seconds - phases.get("stream", 0.0)
    return ("phases (wall s): " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()) +
            f"; outside the stream {serial:.2f} s = {serial / seconds:.0%} of {seconds:.2f} s")


def databin_files(out: Path) -> dict[str, bytes]:
    """Every file of a data-bin but its manifest (which holds timings and the engine)."""
    return {str(f.relative_to(out)): f.read_bytes() for f in sorted(out.rglob("*"))
            if f.is_file() and f.name != "manifest.json"}


def profile_workers(inputs, fmt, vocab, engine, out, top=14):
    """cProfile of one ``--workers 1`` run (everything in this process): where a worker's time goes."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    run_ours(inputs, fmt, vocab, 1, out, engine)
    prof.disable()
    st = pstats.Stats(prof)
    total = sum(v[2] for v in st.stats.values())
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]
    print(f"profile (--workers 1, --tokenizer-engine {engine}; self time, {total:.2f} s in all):")
    for (fn, line, name), v in rows:
        print(f"  {v[2]:7.2f} s  {v[2] / total:6.1%}  {name}  ({Path(fn).name}:{line})")


def synth_wikitext(sources: list[Path], target_bytes: int, path: Path, seed: int = 0) -> Path:
    """A WikiText-format file of at least ``target_bytes`` distinct articles from ``sources`` (see the top)."""
    import random
    import re

    title_re = re.compile(r"^= (?!=)(.*?[^=]) =$")
    articles: list[tuple[str, list[str]]] = []
    for src in sources:
        title, paras = None, []
        for line in src.read_text(encoding="utf-8", errors="replace").splitlines():
            m = title_re.match(line.strip())
            if m:
                if title is not None and paras:
                    articles.append((title, paras))
                title, paras = m.group(1), []
            elif line.strip() and title is not None:
                paras.append(line.rstrip())
        if title is not None and paras:
            articles.append((title, paras))
    if not articles:
        raise ValueError(f"no WikiText articles (' = Title = ' lines) in {', '.join(map(str, sources))}")
    rng = random.Random(seed)
    body = [p for _, ps in articles for p in ps if not p.lstrip().startswith("=")]
    tmp = path.with_name(path.name + ".tmp")
    written, rnd = 0, 0
    with open(tmp, "w", encoding="utf-8") as fh:
        while written < target_bytes:
            for title, paras in articles:
                if rnd == 0:
                    out, head = paras, title
                else:
                    out = paras[:]
                    rng.shuffle(out)
                    out.append(rng.choice(body))
                    head = f"{title} (round {rnd})"
                text = f" = {head} = \n" + "".join(f"{p}\n" for p in out) + "\n"
                fh.write(text)
                written += len(text.encode("utf-8"))
            rnd += 1
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", nargs="+", default=[str(SHARED / "wikitext-2-raw" / "wiki.test.raw"),
                                                   str(SHARED / "wikitext-2" / "valid.tokens")],
                   help="input files (default: the WikiText-2 files in ../shared/data)")
    p.add_argument("--synth-mb", type=float, default=20.0,
                   help="build a WikiText input of this many MB of distinct articles from --inputs and time that "
                        "(default 20, which gives 22 MB; 0 = time --inputs as they are)")
    p.add_argument("--format", default="wikitext", help="alum-prep --format of the inputs (default wikitext)")
    p.add_argument("--vocab", default=str(SHARED / "vocab" / "bert-base-uncased-vocab.txt"), help="WordPiece vocab.txt")
    p.add_argument("--repeats", type=int, default=1, help="time each configuration this many times, keep the best")
    p.add_argument("--engine", default="auto", choices=("auto", "kitoken", "hf"),
                   help="alum-prep --tokenizer-engine of the timed runs (an HF-only --workers 1 run is always added: "
                        "the reference the data-bins must equal byte for byte)")
    p.add_argument("--profile", action="store_true", help="only profile one --workers 1 run (cProfile, self time)")
    args = p.parse_args(argv)
    for f in args.inputs + [args.vocab]:
        if not Path(f).exists():
            print(f"missing {f} (needs ../shared/data or --inputs/--vocab)", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="prep_bench_"))
    if args.synth_mb > 0:
        if args.format != "wikitext":
            print("--synth-mb builds WikiText from WikiText inputs; pass --synth-mb 0 for other formats", file=sys.stderr)
            return 2
        args.inputs = [str(synth_wikitext([Path(f) for f in args.inputs], int(args.synth_mb * 1e6),
                                          work / "synth.wikitext.raw"))]
    nbytes = sum(Path(f).stat().st_size for f in args.inputs)
    print(f"input: {nbytes / 1e6:.2f} MB in {len(args.inputs)} file(s), format {args.format}, cpus {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    import transformers  # noqa: F401  (imports are excluded from the timings on both sides)
    import data_prep.pipeline  # noqa: F401

    try:
        warm_up(args.inputs[0], args.format, args.vocab, work)
        if args.profile:
            profile_workers(args.inputs, args.format, args.vocab, args.engine, work / "profile")
            return 0
        rates, cpus, outs = {}, {}, {}
        for key in ((args.engine, 1), (args.engine, 2), ("hf", 1)):
            engine, w = key
            best = None
            for r in range(args.repeats):
                out = work / f"ours_{engine}_w{w}_{r}"
                secs, cpu, m = run_ours(args.inputs, args.format, args.vocab, w, out, engine)
                if best is None or secs < best:
                    best, best_cpu, manifest = secs, cpu, m
            docs = manifest["counts"]["documents_read"]
            rates[key], cpus[key], outs[key] = nbytes / best, best_cpu, out
            used = manifest["encoding"]["engine"]
            print(f"alum-prep --workers {w} --tokenizer-engine {engine} (encoded with {used}): {best:.2f} s  "
                  f"{nbytes / best / 1e6:.3f} MB/s  {docs / best:.1f} docs/s  (CPU {best_cpu:.2f} s = "
                  f"{nbytes / best_cpu / 1e6:.3f} MB per CPU-s; {manifest['counts']['tokens']} tokens, "
                  f"{manifest['counts']['sentences']} sentences)")
            if engine != "hf":
                print(f"  engine choice: {manifest['encoding']['reason']}")
            print(f"  {phase_line(manifest, best)}")
        ref_files = databin_files(outs[("hf", 1)])
        same = all(databin_files(outs[k]) == ref_files for k in outs)
        print(f"databins_identical_to_hf={same}")
        if not same:
            print("FAIL: a data-bin differs from the HF-only run", file=sys.stderr)
            return 1
        one, two, hf1 = (args.engine, 1), (args.engine, 2), ("hf", 1)
        print(f"alum-prep scaling 2 vs 1 workers: {rates[two] / rates[one]:.2f}x (wall clock; CPU seconds above show "
              "the work done, which a loaded machine does not change)")
        print(f"engine_speedup_vs_hf={rates[one] / rates[hf1]:.3f}")
        print(f"cpu_overhead_2_vs_1={cpus[two] / cpus[one]:.3f}")
        print(f"prep_scaling_2_vs_1={rates[two] / rates[one]:.3f}")
        rates = {1: rates[one], 2: rates[two], "hf": rates[hf1]}
        cpus = {1: cpus[one], 2: cpus[two], "hf": cpus[hf1]}
        ref = outs[hf1]
        if importlib.util.find_spec("fairseq") is None:
            print("fairseq not installed: no fairseq-preprocess comparison (bash scripts/setup.sh installs it)")
            print("prep_speedup_vs_fairseq=nan")
            return 0
        best_total = None
        for r in range(args.repeats):
            fw = work / f"fairseq_{r}"
            fw.mkdir()
            t_a, t_b, cpu, dest = run_fairseq(args.inputs, args.format, args.vocab, ref / "tokenizer", ref / "dict.txt", fw)
            if best_total is None or t_a + t_b < best_total:
                best_total, best_a, best_b, best_cpu, best_dest = t_a + t_b, t_a, t_b, cpu, dest
        fr = nbytes / best_total
        print(f"fairseq recipe --workers 1: {best_total:.2f} s  {fr / 1e6:.3f} MB/s  (CPU {best_cpu:.2f} s)  "
              f"(HF tokenization pass {best_a:.2f} s + fairseq-preprocess {best_b:.2f} s; "
              f"fairseq-preprocess alone {nbytes / best_b / 1e6:.3f} MB/s)")
        # Same ids: fairseq's stream (minus the EOS it appends per line) vs ours, as multisets of tokens.
        import numpy as np

        from alum_pretrain.data.indexed import MMapIndexedDataset

        fs = MMapIndexedDataset(best_dest / "train")
        ours = MMapIndexedDataset(ref / "shard0" / "train")
        f_ids = np.asarray(fs.all_tokens(), dtype=np.int64)
        o_ids = np.asarray(ours.all_tokens(), dtype=np.int64)
        f_ids = f_ids[f_ids != 2]
        same_vocab_ids = np.intersect1d(np.unique(f_ids), np.unique(o_ids)).size / max(np.unique(f_ids).size, 1)
        print(f"id check: fairseq {f_ids.size} tokens, alum-prep {o_ids.size} tokens (alum-prep drops WikiText titles/"
              f"headings and undoes @-@ escapes); {same_vocab_ids:.1%} of fairseq's distinct ids also occur in ours")
        ours_cpu = {w: c for w, c in cpus.items()}
        print(f"speedup, equal resources (alum-prep --workers 1 / fairseq recipe --workers 1, one core each): "
              f"{rates[1] / fr:.2f}x wall, {best_cpu / ours_cpu[1]:.2f}x CPU seconds")
        print(f"for information: alum-prep --workers 2 / fairseq recipe --workers 1: {rates[2] / fr:.2f}x wall")
        print(f"prep_speedup_vs_fairseq_hf_engine={rates['hf'] / fr:.3f}")
        print(f"prep_speedup_vs_fairseq={rates[1] / fr:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
