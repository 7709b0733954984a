"""``alum-prep``: raw corpus -> sharded binarized data-bin (see ``alum-prep --help`` and README "Preparing corpora")."""

from __future__ import annotations

import argparse
import sys

from alum_pretrain import stopping
from alum_pretrain.config import add_dataclass_arguments, dataclass_from_args

from .config import PrepConfig

_EPILOG = """\
examples:
  alum-prep wiki.test.raw --format wikitext --vocab bert-base-uncased-vocab.txt --out data-bin --shards 2 --workers 2
  alum-prep enwiki-latest-pages-articles.xml.bz2 --format wiki-xml --vocab vocab.txt --out wiki-bin --shards 10 --workers 16
  alum-prep my_dataset/ --format hf-dataset --text-column text --vocab vocab.txt --out my-bin   # save_to_disk folder
  alum-prep wikipedia/20231101.en/ --format parquet --title-column title --vocab vocab.txt --out wiki-bin --shards 10 --workers 16
  alum-prep pile/train/ --format jsonl --vocab vocab.txt --out pile-bin --shards 10 --workers 16   # *.jsonl.zst/.gz/.xz
  alum-prep openwebtext/ --format owt --train-tokenizer spm-bpe --vocab-size 50000 --out owt-bin --shards 10 --workers 16

Output: OUT/manifest.json, OUT/dict.txt, OUT/tokenizer/ (HF), OUT/shardK/{train,valid}.{bin,idx,doc.npy} + a copy of dict.txt
(so stock fairseq reads DATA=OUT/shard0:OUT/shard1:...);
on-disk ids = tokenizer ids + 4 (fairseq dictionary). Re-running the same command resumes a killed run.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alum-prep",
        description="Clean, sentence-split, tokenize and binarize a corpus into a sharded fairseq-style data-bin.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dataclass_arguments(p, PrepConfig)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing data-bin made by a different command (only folders with a manifest.json are ever deleted)")
    return p


def main(argv: list[str] | None = None) -> int:
    from .hygiene import hygiene_report
    from .pipeline import prepare

    argv = sys.argv[1:] if argv is None else argv
    # --text-field (the datasets name) is --text-column
    argv = ["--text-column" + a[len("--text-field"):] if a == "--text-field" or a.startswith("--text-field=") else a
            for a in argv]
    args = build_parser().parse_args(argv)
    try:
        cfg = dataclass_from_args(PrepConfig, args)
        with stopping.raising():  # SIGTERM/SIGUSR1/SIGINT stop at once; the pool and *.tmp files are removed
            m = prepare(cfg, overwrite=args.overwrite, command=["alum-prep", *argv])
    except (ValueError, OSError) as e:
        print(f"alum-prep: error: {e}", file=sys.stderr)
        return 2
    except stopping.StopRequested as stop:
        return stopping.report("alum-prep", stop, "re-run the same command to resume")
    except KeyboardInterrupt:  # a Ctrl-C from before the handlers were installed
        print("alum-prep: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    c = m["counts"]
    print(
        f"alum-prep: wrote {cfg.out}: {c['documents']} documents, {c['sentences']} sentences, {c['tokens']} tokens "
        f"in {m['num_shards']} shard(s); dropped {sum(c['dropped'].values())} ({', '.join(f'{k} {v}' for k, v in c['dropped'].items() if v) or 'none'})",
        file=sys.stderr,
    )
    # Always printed (also with --no-progress), so that a corpus full of replacement characters is visible.
    print(f"alum-prep: input hygiene: {hygiene_report(c, m['config']['max_garbage_frac'])[0]}", file=sys.stderr)
    if m.get("warnings"):
        print(f"alum-prep: {len(m['warnings'])} warning(s), also kept in {cfg.out}/manifest.json ('warnings')", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
