"""Padded share of pairs-mode training batches, before and after grouping pairs by length.

    python3 benchmarks/padding_waste.py                      # WikiText-2 from ../shared/data, seq 128 and 512
    python3 benchmarks/padding_waste.py --max-seq-len 128 --batch-size 64

The WikiText-2 text in ``../shared/data`` (``wiki.test.raw`` + ``valid.tokens``, 2.4 MB) is prepared with
alum-prep (BERT uncased vocab, 1 shard, no valid split) into a temporary folder; then one training epoch
of NSP pairs (seed 0, ``--batch-size`` 32 per batch, one rank, ``drop_last``) is built by the real loader
three ways, and the padded share is counted on the batches' attention masks
(padded positions / all positions):

* ``pairs_padded_fraction_before``: today's trainer batching — shuffled order, every batch padded to
  ``max_seq_len`` (``--data.group_by_length=false``);
* ``pairs_padded_fraction_longest``: shuffled order, each batch padded to its longest pair (multiple of 8);
* ``pairs_padded_fraction``: the trainer's batching with ``--data.group_by_length`` (default): global
  batches of similar-length pairs, each padded to its longest pair (multiple of 8).

The floor is 0 (a batch of equal lengths); rounding up to a multiple of 8 keeps a little padding.
A figure printed ``_<len>`` carries the sequence length; the unsuffixed lines are for 128.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("ALUM_SHARED_DATA", ROOT.parent / "shared" / "data"))


def padded_fraction(loader) -> tuple[float, int]:
    """Padded share of all positions of every batch of one epoch, and the number of batches."""
    real = total = n = 0
    for batch in loader:
        att = batch["attention_mask"]
        real += int(att.sum())
        total += att.numel()
        n += 1
    return 1.0 - real / max(total, 1), n


def measure(databin, max_seq_len: int, batch_size: int) -> dict[str, tuple[float, int]]:
    from alum_pretrain.data import build_loader

    common = dict(mode="pairs", nsp=True, max_seq_len=max_seq_len, batch_size=batch_size, seed=0, epochs=1,
                  shuffle=True, drop_last=True)
    return {
        "before": padded_fraction(build_loader(databin, "train", pad_to_max_len=True, **common)),
        "longest": padded_fraction(build_loader(databin, "train", pad_to_multiple_of=8, **common)),
        "grouped": padded_fraction(build_loader(databin, "train", pad_to_multiple_of=8, group_by_length=True,
                                                **common)),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", nargs="+", default=[str(SHARED / "wikitext-2-raw" / "wiki.test.raw"),
                                                   str(SHARED / "wikitext-2" / "valid.tokens")])
    p.add_argument("--vocab", default=str(SHARED / "vocab" / "bert-base-uncased-vocab.txt"))
    p.add_argument("--max-seq-len", type=int, nargs="+", default=[128, 512])
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    for f in args.inputs + [args.vocab]:
        if not Path(f).exists():
            print(f"missing {f} (needs ../shared/data or --inputs/--vocab)", file=sys.stderr)
            return 2
    from alum_pretrain.data import DataBin
    from data_prep import PrepConfig, prepare

    work = Path(tempfile.mkdtemp(prefix="padding_waste_"))
    try:
        out = work / "bin"
        prepare(PrepConfig(inputs=args.inputs, format="wikitext", out=out, vocab=args.vocab, shards=1,
                           valid_fraction=0.0, progress=False))
        databin = DataBin(out)
        for t in sorted(args.max_seq_len, key=lambda t: t == 128):  # the seq-128 summary lines last
            r = measure(databin, t, args.batch_size)
            print(f"seq {t}, batch {args.batch_size}: {r['grouped'][1]} batches/epoch; padded share: "
                  f"padded to max_seq_len {r['before'][0]:.3f}, to the batch's longest {r['longest'][0]:.3f}, "
                  f"grouped by length {r['grouped'][0]:.3f}")
            sfx = "" if t == 128 else f"_{t}"
            print(f"pairs_padded_fraction_before{sfx}={r['before'][0]:.4f}")
            print(f"pairs_padded_fraction_longest{sfx}={r['longest'][0]:.4f}")
            print(f"pairs_padded_fraction{sfx}={r['grouped'][0]:.4f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
