"""ALUM under fp32 / bf16 / fp16 autocast on the demo corpus: the adversarial share of the term and the
health of the ascent gradient.  Prints ``name=value`` lines (no timing assertions anywhere).

The corpus is ``alum-demo``'s (the standard library's docstrings), prepared with ``alum-prep``'s
:func:`data_prep.prepare` into a WordPiece data-bin; then, per precision, ``alum-train`` (native engine,
``--model.preset tiny``, NSP pairs, ALUM from step 0, ``--alum.log_baseline true``) runs ``--steps``
optimizer steps and the log is averaged over the logged steps:

* ``adv`` - the ALUM term R with the adversarial delta; ``adv_dropout`` - R with delta = 0 under the
  same dropout masks; ``adv_share = (adv - adv_dropout) / adv`` - the part of R that the perturbation
  (not dropout) is responsible for;
* ``ascent_zero_grad_frac`` (fraction of real tokens whose ascent gradient was entirely 0),
  ``ascent_nonfinite``, ``adv_nonfinite``;
* ``plain_fp16_zero_grad_frac`` - for comparison, the fraction of real tokens whose gradient is 0 when
  the same ascent loss is differentiated with a plain ``torch.autograd.grad`` under fp16 autocast (the
  behaviour before the scale-free ascent), on one batch of the same data and model.

    python benchmarks/alum_precision.py --out /tmp/alum-prec --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prepare_databin(out: Path, vocab_size: int) -> Path:
    from alum_pretrain.demo import stdlib_documents, write_text_corpus
    from data_prep import PrepConfig, prepare

    corpus, databin = out / "corpus.txt", out / "data-bin"
    if not corpus.exists():
        write_text_corpus(stdlib_documents(), corpus)
    if not (databin / "manifest.json").exists():
        cfg = PrepConfig(inputs=[str(corpus)], format="text", out=databin, train_tokenizer="wordpiece",
                         vocab_size=vocab_size, lowercase=True, shards=1, valid_fraction=0.02, seed=1, progress=False)
        prepare(cfg, command=["benchmarks/alum_precision.py"])
    return databin


def train(databin: Path, run: Path, precision: str, steps: int, batch: int, seq: int) -> list[dict]:
    from alum_pretrain.train import main

    args = [f"--data.path={databin}", f"--train.output_dir={run}", "--model.preset=tiny", "--data.mode=pairs",
            f"--data.max_seq_len={seq}", f"--train.batch_size={batch}", f"--train.max_steps={steps}",
            f"--train.precision={precision}", "--train.device=cpu", "--alum.start_step=0",
            "--alum.log_baseline=true", "--train.log_every=1", "--train.progress=false", "--optim.lr=1e-3",
            "--train.eval_every=0", "--train.save_every=0"]
    if main(args) != 0:
        raise SystemExit(f"alum-train failed for {precision}")
    recs = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in recs if r.get("kind", "train") == "train" and r.get("alum") == 1.0]


def plain_fp16_zero_frac(databin: Path, seq: int, batch: int) -> float:
    """The pre-fix ascent: autograd.grad of the globally normalised divergence under fp16 autocast."""
    import torch

    from alum_pretrain.adversarial import init_delta, perturb
    from alum_pretrain.divergence import symmetric_kl_ce
    from alum_pretrain.data.databin import DataBin
    from alum_pretrain.models import build_model

    torch.manual_seed(0)
    db = DataBin(str(databin))
    model = build_model(databin=db, preset="tiny", nsp=False).train()
    g = torch.Generator().manual_seed(0)
    # random ids over the data-bin's vocabulary: the numerics, not the text, decide underflow here
    ids = torch.randint(5, db.vocab_size, (batch, seq), generator=g)
    attn = torch.ones_like(ids)
    masked = (torch.rand(batch, seq, generator=g) < 0.15).reshape(-1).nonzero().squeeze(1)
    with torch.autocast("cpu", dtype=torch.float16):
        e = model.embed(ids)
        clean = model.heads_from_embeds(e, attn, None, masked, False)[0]
        delta = init_delta(e, attn.bool(), 1e-5, torch.Generator().manual_seed(1)).requires_grad_(True)
        adv = model.heads_from_embeds(perturb(e.detach(), delta), attn, None, masked, False)[0]
        loss = symmetric_kl_ce(adv, clean.detach()) * (masked.numel() / (8.0 * masked.numel()))  # 8 ranks
        (gr,) = torch.autograd.grad(loss, delta)
    return float(((gr == 0).all(-1)).float().mean())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="work folder (corpus, data-bin, runs)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per precision (ALUM on from step 0)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=4000)
    p.add_argument("--precisions", default="fp32,bf16,fp16")
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    databin = prepare_databin(out, a.vocab_size)
    for prec in a.precisions.split(","):
        recs = train(databin, out / f"run-{prec}", prec, a.steps, a.batch_size, a.seq_len)
        mean = lambda k: sum(r[k] for r in recs) / len(recs)  # noqa: E731
        adv, base = mean("adv"), mean("adv_dropout")
        print(f"{prec}.adv={adv:.6g}")
        print(f"{prec}.adv_dropout={base:.6g}")
        print(f"{prec}.adv_share={(adv - base) / adv:.4g}")
        print(f"{prec}.ascent_zero_grad_frac_max={max(r['ascent_zero_grad_frac'] for r in recs):.4g}")
        print(f"{prec}.ascent_nonfinite={sum(r['ascent_nonfinite'] for r in recs):.0f}")
        print(f"{prec}.adv_nonfinite={sum(r['adv_nonfinite'] for r in recs):.0f}")
        print(f"{prec}.alum_log_steps={len(recs)}")
    print(f"plain_fp16_zero_grad_frac={plain_fp16_zero_frac(databin, a.seq_len, a.batch_size):.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
