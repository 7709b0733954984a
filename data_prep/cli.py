"""``alum-prep``: raw corpus -> sharded binarized data-bin (see ``alum-prep --help`` and README "Preparing corpora")."""

from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, fields

from .config import PrepConfig

_EPILOG = """\
examples:
  alum-prep wiki.test.raw --format wikitext --vocab bert-base-uncased-vocab.txt --out data-bin --shards 2 --workers 2
  alum-prep enwiki-latest-pages-articles.xml.bz2 --format wiki-xml --vocab vocab.txt --out wiki-bin --shards 10 --workers 16
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
    for f in fields(PrepConfig):
        help_ = f.metadata["help"]
        default = f.default if f.default is not MISSING else None
        if f.name == "inputs":
            p.add_argument("inputs", nargs="+", metavar="INPUT", help=help_)
            continue
        flag = "--" + f.name.replace("_", "-")
        kw = {"help": f"{help_} (default: {default})" if default is not None else help_, "dest": f.name}
        if f.name in ("format", "out"):
            kw["required"] = True
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        if f.name in ("lowercase", "progress", "spm_byte_fallback"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, **kw)
        elif f.name == "keep_headings":
            p.add_argument(flag, action="store_true", **kw)
        else:
            typ = {"shards": int, "workers": int, "seed": int, "min_doc_chars": int, "max_tokens": int,
                   "vocab_size": int, "tokenizer_train_sentences": int, "valid_fraction": float,
                   "segment_mb": float, "max_garbage_frac": float}.get(f.name, str)
            p.add_argument(flag, type=typ, default=default, **kw)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing data-bin made by a different command (only folders with a manifest.json are ever deleted)")
    return p


def main(argv: list[str] | None = None) -> int:
    from .hygiene import hygiene_report
    from .pipeline import prepare

    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    opts = vars(args)
    inputs, fmt, out = opts.pop("inputs"), opts.pop("format"), opts.pop("out")
    try:
        m = prepare(PrepConfig(inputs=inputs, format=fmt, out=out, **{k: v for k, v in opts.items()
                                                                  if k != "overwrite"}),
                    overwrite=opts["overwrite"], command=["alum-prep", *argv])
    except (ValueError, OSError) as e:
        print(f"alum-prep: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("alum-prep: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    c = m["counts"]
    print(
        f"alum-prep: wrote {out}: {c['documents']} documents, {c['sentences']} sentences, {c['tokens']} tokens "
        f"in {m['num_shards']} shard(s); dropped {sum(c['dropped'].values())} ({', '.join(f'{k} {v}' for k, v in c['dropped'].items() if v) or 'none'})",
        file=sys.stderr,
    )
    # Always printed (also with --no-progress), so that a corpus full of replacement characters is visible.
    print(f"alum-prep: input hygiene: {hygiene_report(c, m['config']['max_garbage_frac'])[0]}", file=sys.stderr)
    if m.get("warnings"):
        print(f"alum-prep: {len(m['warnings'])} warning(s), also kept in {out}/manifest.json ('warnings')", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
