"""``alum-smoothness``: the eval-mode smoothness of a model folder or training checkpoint on held-out data
(:func:`alum_pretrain.smoothness.measure_smoothness`), as a table and as JSON.

MODEL: an HF masked-LM folder (``alum-export`` output or any ``AutoModelForMaskedLM`` folder; a folder
without an MLM head gets a fresh one, logged), a training run folder, a ``checkpoints/step-N`` folder or its
``model/``.  Held-out data: ``--data DATA_BIN`` (the first blocks of ``--seq-len`` tokens of its ``--split``,
in order) or ``--text FILE`` (tokenised with the model's tokenizer).  ``--match-entropy REF`` fits a
temperature so the model's held-out predictive entropy equals REF's and reports the model at it beside the
raw figure.  See docs/smoothness.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

from . import stopping
from .compat import check_positions
from .masking import MaskingConfig, TokenMasker
from .smoothness import (BALLS, EPS_MODES, SmoothnessConfig, fit_temperature, format_table, measure_smoothness,
                         mlm_logits, mlm_stats, tokenizer_masker)

log = logging.getLogger("alum_pretrain.smoothness")

__all__ = ["build_parser", "databin_batches", "load_for_smoothness", "main", "run", "text_batches"]


_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model")


def _has_tokenizer(d: Optional[Path]) -> bool:
    return d is not None and d.is_dir() and any((d / f).is_file() for f in _TOKENIZER_FILES)


def load_for_smoothness(path: str | os.PathLike, *, perturb_at: Optional[str] = None,
                        tokenizer: Optional[str] = None) -> tuple[Any, dict]:
    """A :class:`~alum_pretrain.models.PretrainModel` for ``path`` and what was found: ``{"model_dir",
    "tokenizer_dir" (or None), "kind" ("hf" or "checkpoint"), "step", "perturb_at"}``.

    ``path``: an HF masked-LM folder (``alum-export`` output, any ``AutoModelForMaskedLM`` folder; a folder
    without an MLM head gets a fresh one — logged), a training run folder, a ``checkpoints/step-N`` folder or
    its ``model/``.  The tokenizer: ``tokenizer``, else the model folder's own, else the run's (data-bin
    ``tokenizer/`` or ``model.init_from``)."""
    from .export import ExportError, find_tokenizer, load_run_config, resolve_checkpoint
    from .models import PERTURB_AT, PretrainModel, load_continual_model

    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p}: does not exist — pass an HF masked-LM folder (alum-export output), a training run "
                         "folder or one of its checkpoints/step-N folders")
    if p.is_dir() and (p / "config.json").is_file() and not any(p.glob("*.safetensors")):
        model_dir, step, run = p, None, None  # an HF folder with pytorch_model.bin weights
    else:
        try:
            model_dir, step, run = resolve_checkpoint(p)
        except ExportError as e:
            raise ValueError(f"{p}: neither an HF model folder (config.json + weights) nor a training checkpoint: "
                             f"{e}") from e
    run_cfg = load_run_config(step, run) if (step is not None or run is not None) else {}
    if perturb_at is None:
        perturb_at = ((run_cfg.get("alum") or {}).get("perturb_at") if isinstance(run_cfg.get("alum"), dict)
                      else None) or "word"
        if perturb_at not in PERTURB_AT:
            log.warning("%s: perturb_at %r of the run is not a PretrainModel placement; measuring at 'word'", p,
                        perturb_at)
            perturb_at = "word"
    tok_dir: Optional[Path] = Path(tokenizer) if tokenizer else (model_dir if _has_tokenizer(model_dir) else None)
    if tokenizer and not _has_tokenizer(tok_dir):
        raise ValueError(f"--tokenizer {tokenizer}: no tokenizer files there ({', '.join(_TOKENIZER_FILES)})")
    if tok_dir is None and run_cfg:
        try:
            tok_dir = find_tokenizer(run_cfg, run, None)
        except ExportError:
            tok_dir = None
    hf = load_continual_model(model_dir, nsp=False)
    info = {"model_dir": str(model_dir), "tokenizer_dir": None if tok_dir is None else str(tok_dir),
            "kind": "checkpoint" if step is not None else "hf", "step": None, "perturb_at": perturb_at}
    if step is not None:
        from .engine.checkpoint import step_of

        info["step"] = step_of(step)
    return PretrainModel(hf, perturb_at=perturb_at), info


def _take(batches: Iterable[dict], max_batches: int, max_tokens: Optional[int]) -> list[dict]:
    out, tokens = [], 0
    for b in batches:
        if (max_batches and len(out) >= max_batches) or (max_tokens and tokens >= max_tokens):
            break
        out.append(b)
        tokens += int(b["attention_mask"].sum())
    return out


def databin_batches(data: str | os.PathLike, *, split: str = "valid", seq_len: int = 128, batch_size: int = 8,
                    max_batches: int = 8, max_tokens: Optional[int] = None, seed: int = 0):
    """``(batches, masker, databin)``: the first blocks of ``seq_len`` tokens of a data-bin's ``split`` (in
    order, no shuffling) and a :class:`TokenMasker` over its tokenizer (BERT 80/10/10)."""
    from .data.databin import DataBin
    from .data.loader import build_loader

    databin = DataBin(data)
    loader = build_loader(databin, split, mode="blocks", nsp=False, max_seq_len=seq_len, batch_size=batch_size,
                          seed=0, epochs=1, shuffle=False, drop_last=False)
    batches = _take(loader, max_batches, max_tokens)
    if not batches:
        raise ValueError(f"{databin.path}: the {split!r} split gave no sequence")
    t = loader.tables
    return batches, TokenMasker(MaskingConfig(), t.mask_id, t.random_pool, int(seed)), databin


def _special_wrap(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a single sequence (``[CLS]`` / ``[SEP]``, ``<s>`` / ``</s>``)."""
    probe = "a"
    core = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for k in range(len(full) - len(core) + 1):
        if full[k:k + len(core)] == core:
            return list(full[:k]), list(full[k + len(core):])
    raise ValueError(f"{getattr(tokenizer, 'name_or_path', 'the tokenizer')}: cannot tell its special-token template")


def text_batches(path: str | os.PathLike, tokenizer, *, seq_len: int = 128, batch_size: int = 8,
                 max_batches: int = 8, max_tokens: Optional[int] = None) -> list[dict]:
    """Non-empty lines of a UTF-8 text file, tokenised, concatenated and cut into sequences of ``seq_len``
    tokens with the tokenizer's special tokens (``[CLS] … [SEP]``); batches with ``special_mask``."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--text {p}: not a file")
    head, tail = _special_wrap(tokenizer)
    body_len = seq_len - len(head) - len(tail)
    if body_len < 1:
        raise ValueError(f"--seq-len {seq_len}: too short for the tokenizer's special tokens")
    limit = (max_batches * batch_size * body_len) if max_batches else None
    stream: list[int] = []
    with open(p, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                stream.extend(tokenizer(line.strip(), add_special_tokens=False)["input_ids"])
            if (limit and len(stream) >= limit) or (max_tokens and len(stream) >= max_tokens):
                break
    seqs = [head + stream[i:i + body_len] + tail for i in range(0, len(stream), body_len)]
    if not seqs:
        raise ValueError(f"--text {p}: no text (every line is empty)")
    special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    batches = []
    for s in range(0, len(seqs), batch_size):
        rows = seqs[s:s + batch_size]
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), int(tokenizer.pad_token_id or 0), dtype=torch.long)
        att = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)], att[i, :len(r)] = torch.tensor(r), 1
        special = torch.isin(ids, special_ids) | att.eq(0)
        special[:, :len(head)] = True
        batches.append({"input_ids": ids, "attention_mask": att, "token_type_ids": torch.zeros_like(ids),
                        "special_mask": special})
    return _take(batches, max_batches, max_tokens)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers, e.g. 1e-5,1e-4") from e


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="alum-smoothness",
        description="Eval-mode smoothness of a masked LM: adversarial vs random SymKL of its masked-token "
                    "predictions within an ε-ball of the embeddings (what ALUM minimises).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("model", help="HF masked-LM folder (alum-export output), training run folder or "
                                  "checkpoints/step-N folder")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="data-bin (alum-prep output): its --split is the held-out data")
    src.add_argument("--text", help="UTF-8 text file, tokenised with the model's tokenizer")
    ap.add_argument("--split", default="valid", help="data-bin split to read")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per sequence, special tokens included")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per batch")
    ap.add_argument("--batches", type=int, default=8, help="use the first N batches (0 = no limit)")
    ap.add_argument("--max-tokens", type=int, default=None, help="stop once this many tokens are taken")
    ap.add_argument("--eps", type=_floats, default=(1e-5, 1e-4, 1e-3), help="ball radii, comma-separated")
    ap.add_argument("--norm", default="linf", help="linf (ALUM), l2, or linf,l2")
    ap.add_argument("--eps-mode", default="abs", choices=EPS_MODES,
                    help="abs: radius ε; rel: ε × each token's embedding RMS (L∞) or L2 norm (L2)")
    ap.add_argument("--ball", default="token", choices=BALLS, help="one ball per token (ALUM) or per sequence (L2)")
    ap.add_argument("--steps", type=int, default=3, help="K projected-ascent steps")
    ap.add_argument("--step-scale", type=float, default=10.0, help="ascent step = this × the ball radius")
    ap.add_argument("--mask-rate", type=float, default=0.15, help="evaluation masking rate")
    ap.add_argument("--seed", type=int, default=0, help="masks and random δ")
    ap.add_argument("--match-entropy", metavar="REF", default=None,
                    help="also report the model at the temperature that gives REF's held-out predictive entropy")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's or the run's)")
    ap.add_argument("--perturb-at", default=None, choices=("word", "embedding_output"),
                    help="perturbation point (default: the run's alum.perturb_at, else word)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"), help="model precision")
    ap.add_argument("--json", default=None, metavar="PATH", help="write the figures as JSON ('-' = stdout)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def _held_out(args, info: dict) -> tuple[list[dict], TokenMasker, dict, Any]:
    """Batches, masker, a description of the data, and the data-bin (or None)."""
    if args.data:
        batches, masker, databin = databin_batches(args.data, split=args.split, seq_len=args.seq_len,
                                                   batch_size=args.batch_size, max_batches=args.batches,
                                                   max_tokens=args.max_tokens, seed=args.seed)
        desc = {"kind": "data-bin", "path": str(args.data), "split": args.split}
        return batches, masker, desc, databin
    if info["tokenizer_dir"] is None:
        raise ValueError(f"{args.model}: no tokenizer found for --text; pass --tokenizer DIR")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(info["tokenizer_dir"])
    batches = text_batches(args.text, tok, seq_len=args.seq_len, batch_size=args.batch_size,
                           max_batches=args.batches, max_tokens=args.max_tokens)
    return batches, tokenizer_masker(tok, args.seed), {"kind": "text", "path": str(args.text)}, None


def _check_data_vocab(model, info: dict, databin, what: str) -> None:
    """With a data-bin, the model's tokenizer must be the corpus's (token ids mean the same words)."""
    from .models import check_vocab

    if databin is not None:
        try:
            check_vocab(info["tokenizer_dir"] or info["model_dir"], model.config, databin)
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from e


def _prepare_model(path: str, args, dtype: torch.dtype, device: torch.device):
    torch.manual_seed(args.seed)  # a fresh (missing) MLM head is initialised from the global RNG: repeatable
    model, info = load_for_smoothness(path, perturb_at=args.perturb_at, tokenizer=args.tokenizer)
    return model.to(device=device, dtype=dtype), info


def _match(args, model, info, batches, masker, databin, dtype, device) -> dict:
    """Fit the temperature that gives the model REF's held-out entropy (same batches, same masks)."""
    ref, ref_info = _prepare_model(args.match_entropy, args, dtype, device)
    check_positions("--seq-len", args.seq_len, ref.config, f"--match-entropy {args.match_entropy}")
    _check_data_vocab(ref, ref_info, databin, args.match_entropy)
    if databin is None and info["tokenizer_dir"] and ref_info["tokenizer_dir"]:
        from transformers import AutoTokenizer

        if (AutoTokenizer.from_pretrained(info["tokenizer_dir"]).get_vocab()
                != AutoTokenizer.from_pretrained(ref_info["tokenizer_dir"]).get_vocab()):
            raise ValueError(f"--match-entropy {args.match_entropy}: its tokenizer differs from {args.model}'s; "
                             "entropies are comparable only on the same tokens")
    z_ref, t_ref = mlm_logits(ref, batches, masker, args.mask_rate)
    ref_stats = mlm_stats(z_ref, t_ref)
    del ref, z_ref
    z, _t = mlm_logits(model, batches, masker, args.mask_rate)
    T = fit_temperature(z, ref_stats["entropy"])
    return {"reference": str(args.match_entropy), "temperature": T,
            **{f"reference_{k}": v for k, v in ref_stats.items()}}


def run(args) -> dict:
    """``alum-smoothness`` without the printing: the JSON document."""
    cfg = SmoothnessConfig(epsilons=args.eps, norms=tuple(n.strip() for n in args.norm.split(",") if n.strip()),
                           eps_mode=args.eps_mode, ball=args.ball, steps=args.steps, step_scale=args.step_scale,
                           mask_rate=args.mask_rate, seed=args.seed)
    for flag, v in (("--seq-len", args.seq_len), ("--batch-size", args.batch_size)):
        if v < 1:
            raise ValueError(f"{flag} {v}: must be >= 1")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    model, info = _prepare_model(args.model, args, dtype, device)
    batches, masker, data_desc, databin = _held_out(args, info)
    check_positions("--seq-len", args.seq_len, model.config, str(args.model))  # before any forward pass
    _check_data_vocab(model, info, databin, args.model)
    data_desc.update(seq_len=args.seq_len, batch_size=args.batch_size, batches=len(batches),
                     sequences=sum(int(b["input_ids"].shape[0]) for b in batches))
    doc: dict[str, Any] = {"model": str(args.model), **info, "data": data_desc, "device": str(device),
                           "dtype": args.dtype, "seed": args.seed, "matched": None}
    matched = _match(args, model, info, batches, masker, databin, dtype, device) if args.match_entropy else None
    progress = not args.no_progress
    doc["raw"] = measure_smoothness(model, batches, masker, cfg, progress=progress)
    if matched is not None:
        matched["result"] = measure_smoothness(model, batches, masker, cfg, temperature=matched["temperature"],
                                               progress=progress)
        doc["matched"] = matched
    return doc


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        with stopping.raising():  # a stop signal ends the measurement at once (nothing is written)
            doc = run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"alum-smoothness: error: {e}", file=sys.stderr)
        return 2
    except stopping.StopRequested as stop:
        return stopping.report("alum-smoothness", stop, "nothing was written")
    screen = sys.stderr if args.json == "-" else sys.stdout
    print(format_table(doc["raw"], f"{args.model} on {doc['data']['path']} (dropout off, {doc['device']}, "
                                   f"{doc['dtype']}, seed {args.seed})"), file=screen)
    m = doc["matched"]
    if m is not None:
        print(f"\nentropy matched to {m['reference']} (entropy {m['reference_entropy']:.4f} nats, NLL "
              f"{m['reference_mlm_nll']:.4f}): temperature T = {m['temperature']:.4f}", file=screen)
        print(format_table(m["result"], "logits / T:"), file=screen)
    if args.json:
        text = json.dumps(doc, indent=2, sort_keys=False)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
