"""``alum-export CKPT OUT``: a training checkpoint -> a plain HuggingFace model folder.

CKPT may be (the contract with the native engine, :mod:`alum_pretrain.engine.checkpoint`)::

    RUN/                              a run's output folder -> its newest complete checkpoint
    RUN/checkpoints/step-N/           one checkpoint: model/ (save_model output) + train_state.pt
    RUN/checkpoints/step-N/model/     the model folder itself (config.json + model.safetensors)

The tokenizer shipped is the one the run trained with: ``RUN/tokenizer/``, copied into the run when it
started (:mod:`alum_pretrain.run_identity`).  Runs from before that copy existed fall back to the
``tokenizer/`` folder of ``data.path`` in ``RUN/config.yaml`` (or the ``config`` saved in
``train_state.pt``) when its fingerprint matches ``RUN/identity.json``, else to ``model.init_from``;
``--tokenizer DIR`` overrides them only when its vocabulary equals the run's.

OUT (written to a temporary folder beside it, renamed when complete)::

    config.json            HF config with ``architectures`` (BertForPreTraining / BertForMaskedLM /
                           RobertaForMaskedLM ...) so AutoModelForPreTraining / AutoModelForMaskedLM load it
    model.safetensors      the weights (tied LM decoder stored once)
    tokenizer files        tokenizer.json, tokenizer_config.json, vocab.txt / sentencepiece model, ...
    README.md              the model card (:mod:`alum_pretrain.model_card`): hub front matter, recipe, loading

Key map: the native engine trains HF modules and saves them with ``save_pretrained``, so the
checkpoint's tensor names ARE the HF names (``bert.encoder.layer.0...``, ``cls.predictions...``); the map is
the identity, and :func:`export` verifies it — every exported tensor equals the checkpoint tensor of the
same name, and nothing is missing or unexpected when HF loads the folder.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from . import stopping
from .atomic import atomic_dir
from .engine.checkpoint import CHECKPOINTS_DIR, MODEL_DIR, STATE_FILE, latest_checkpoint, list_checkpoints, step_of
from .integrity import (IntegrityError, check_structure, first_nonfinite, safe_torch_load,
                        verify_checksums)
from .export_target import ExportTargetError, check_export_target, write_export_marker
from .families import family_of
from .model_card import model_card
from .models import load_hf_model
from .run_identity import (IDENTITY_FILE, RUN_TOKENIZER, check_same_vocabulary, has_tokenizer,
                           tokenizer_sha256)

log = logging.getLogger("alum_pretrain.export")

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                    "sentencepiece.bpe.model", "spiece.model", "special_tokens_map.json")


class ExportError(ValueError):
    """Bad CKPT / OUT / tokenizer given to alum-export (a ValueError with a message saying what to do)."""


# --------------------------------------------------------------------------------------------------
# Resolving the checkpoint, the run config and the tokenizer
# --------------------------------------------------------------------------------------------------


def resolve_checkpoint(ckpt: str | os.PathLike) -> tuple[Path, Path | None, Path | None]:
    """``(model_dir, step_dir or None, run_dir or None)`` for any accepted form of CKPT."""
    p = Path(ckpt)
    if not p.exists():
        raise ExportError(f"{p}: does not exist — pass a run folder (alum-train --train.output_dir), "
                          "one of its checkpoints/step-N folders, or a step-N/model folder")
    if not p.is_dir():
        raise ExportError(f"{p}: is a file — pass a run folder or a checkpoints/step-N folder "
                          "(fairseq checkpoint files *.pt are exported by `alum-export CKPT.pt OUT`)")
    if (p / MODEL_DIR / "config.json").is_file():  # a step folder
        run = p.parent.parent if p.parent.name == CHECKPOINTS_DIR else None
        return p / MODEL_DIR, p, run
    if (p / "config.json").is_file() and any(p.glob("*.safetensors")):  # the model folder itself
        step = p.parent if (p.parent / STATE_FILE).is_file() else None
        run = step.parent.parent if step is not None and step.parent.name == CHECKPOINTS_DIR else None
        return p, step, run
    latest = latest_checkpoint(p)
    if latest is not None:
        return latest / MODEL_DIR, latest, p
    if (p / CHECKPOINTS_DIR).is_dir():
        raise ExportError(f"{p / CHECKPOINTS_DIR}: no complete step-N checkpoint (a step-N folder with {MODEL_DIR}/ "
                          f"and {STATE_FILE}); the run saved nothing yet, or only an interrupted step-N.tmp")
    raise ExportError(f"{p}: not a checkpoint — expected {p}/checkpoints/step-N/, {p}/model/config.json "
                      "(a step folder) or config.json + model.safetensors (a model folder)")


def load_run_config(step: Path | None, run: Path | None, trust: bool = False) -> dict[str, Any]:
    """The run's resolved config as a dict (``RUN/config.yaml``, else the one inside ``train_state.pt``)."""
    if run is not None and (run / "config.yaml").is_file():
        import yaml

        with open(run / "config.yaml", encoding="utf-8") as fh:
            return yaml.safe_load(fh) or {}
    if step is not None and (step / STATE_FILE).is_file():
        try:
            state = safe_torch_load(step / STATE_FILE, trust=trust, what="training state")
        except IntegrityError as e:
            raise ExportError(str(e)) from e
        cfg = state.get("config") if isinstance(state, dict) else None
        if isinstance(cfg, dict):
            return cfg
        if cfg is not None and hasattr(cfg, "__dataclass_fields__"):
            from .config import config_to_dict

            return config_to_dict(cfg)
    return {}


def _has_tokenizer(d: Path) -> bool:
    return has_tokenizer(d)


def run_identity_of(run: Path | None) -> dict | None:
    """The fingerprint ``RUN/identity.json`` records (None for runs written before it existed)."""
    import json

    try:
        return json.loads((run / IDENTITY_FILE).read_text(encoding="utf-8")) if run is not None else None
    except (OSError, ValueError):
        return None


def _checked_override(d: Path, run_tok: Path | None) -> Path:
    if not _has_tokenizer(d):
        raise ExportError(f"--tokenizer {d}: no tokenizer files there (tokenizer.json, vocab.txt, ...)")
    if run_tok is not None:
        try:
            check_same_vocabulary(run_tok, d)
        except ValueError as e:
            raise ExportError(str(e)) from e
    return d


def find_tokenizer(cfg: dict[str, Any], run: Path | None, override: str | None) -> Path:
    """Where the tokenizer comes from: the run's own copy ``RUN/tokenizer`` (what it trained with), else
    data.path/tokenizer when its fingerprint is the run's, else model.init_from; ``--tokenizer`` must have
    the same vocabulary as the run's copy."""
    run_tok = run / RUN_TOKENIZER if run is not None and has_tokenizer(run / RUN_TOKENIZER) else None
    if override:
        return _checked_override(Path(override), run_tok)
    if run_tok is not None:
        return run_tok
    identity = run_identity_of(run)
    tried = []
    data_path = (cfg.get("data") or {}).get("path") if isinstance(cfg.get("data"), dict) else None
    init_from = (cfg.get("model") or {}).get("init_from") if isinstance(cfg.get("model"), dict) else None
    for base in (data_path, init_from):
        if not base:
            continue
        cands = [Path(base)]
        if run is not None and not Path(base).is_absolute():
            cands.append(run / base)
        for c in cands:
            for d in (c / "tokenizer", c) if base == data_path else (c,):
                tried.append(str(d))
                if not _has_tokenizer(d):
                    continue
                if identity and identity.get("tokenizer_sha256") not in (None, tokenizer_sha256(d)):
                    raise ExportError(f"{d}: not the tokenizer this run was trained with (its sha256 "
                                      f"{tokenizer_sha256(d)[:16]}, the run's {identity['tokenizer_sha256'][:16]}); "
                                      "pass --tokenizer with the original tokenizer folder")
                return d
    raise ExportError("cannot find the tokenizer for this checkpoint (tried: "
                      + (", ".join(tried) if tried else "nothing — the run config has no data.path")
                      + "); pass --tokenizer DIR (the data-bin's tokenizer/ folder)")


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def _verify_identity_map(src_dir: Path, out_dir: Path) -> int:
    """Every tensor of the exported folder equals the checkpoint tensor of the same name (identity map)."""
    from safetensors import safe_open

    def tensors(d: Path) -> dict[str, torch.Tensor]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as fh:
                for k in fh.keys():
                    out[k] = fh.get_tensor(k)
        return out

    a, b = tensors(src_dir), tensors(out_dir)
    if set(a) != set(b):
        raise ExportError(f"exported tensor names differ from {src_dir}: only in checkpoint "
                          f"{sorted(set(a) - set(b))[:5]}, only in export {sorted(set(b) - set(a))[:5]}")
    for k in a:
        if a[k].shape != b[k].shape or not torch.equal(a[k], b[k]):
            raise ExportError(f"exported tensor {k} differs from the checkpoint's")
    return len(a)


def _verify_against(state: dict[str, torch.Tensor], out_dir: Path) -> int:
    """Every exported tensor equals the consolidated ZeRO tensor of the same name."""
    from safetensors.torch import load_file

    n = 0
    for f in sorted(out_dir.glob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            if k not in state or state[k].shape != v.shape or not torch.equal(state[k].to(v.dtype), v):
                raise ExportError(f"exported tensor {k} differs from the ZeRO shards' consolidated weights")
            n += 1
    return n


def verify_source(model_dir: Path, step: Path | None) -> None:
    """The checkpoint is intact and finite, or ExportError naming the bad file and the reason.

    A step folder's ``checksums.json`` (sizes + CRC-32, written by alum-train) is checked first; then every
    file's format (safetensors header, torch zip directory) and, finally, every weight for NaN/Inf."""
    from safetensors.torch import load_file

    try:
        if step is None or not verify_checksums(step):
            for f in sorted((step or model_dir).rglob("*")):
                if f.is_file() and f.suffix in (".safetensors", ".pt"):
                    check_structure(f)
        for f in sorted(model_dir.glob("*.safetensors")):
            try:
                weights = load_file(str(f))
            except Exception as e:  # noqa: BLE001 - name the damaged file
                raise IntegrityError(f"{f}: unreadable weights ({type(e).__name__}: {e})") from e
            bad = first_nonfinite(weights)
            if bad is not None:
                raise IntegrityError(f"{f}: tensor {bad} holds NaN/Inf (the run diverged or the file is "
                                     "damaged); export an earlier checkpoint (RUN/checkpoints/step-N)")
    except IntegrityError as e:
        others = []
        if step is not None and step.parent.name == CHECKPOINTS_DIR:
            others = [p for _, p in list_checkpoints(step.parent.parent) if p != step]
        hint = f"; other checkpoints: {', '.join(p.name for p in others)}" if others else ""
        raise ExportError(f"cannot export: {e}{hint}") from e


def export(ckpt: str | os.PathLike, out: str | os.PathLike, *, tokenizer: str | None = None,
           overwrite: bool = False, trust: bool = False, from_zero_shards: bool = False) -> Path:
    """Export CKPT (see the module docstring) to the HF folder OUT; returns OUT."""
    from transformers import AutoTokenizer

    model_dir, step, run = resolve_checkpoint(ckpt)
    out = Path(out)
    try:
        check_export_target(out, ckpt, overwrite)  # (before anything is loaded or written)
    except ExportTargetError as e:
        raise ExportError(str(e)) from e
    if not from_zero_shards:  # (the ZeRO-shard path rebuilds and checks the weights from the shards itself)
        verify_source(model_dir, step)
    cfg = load_run_config(step, run, trust=trust)
    tok_src = find_tokenizer(cfg, run, tokenizer)
    zero_sd = None
    if from_zero_shards:  # a DeepSpeed checkpoint: the weights from every rank's ZeRO shard (zero_to_fp32)
        from .engine.deepspeed_engine import hf_model_from_zero_shards

        model, zero_sd = hf_model_from_zero_shards(step if step is not None else model_dir.parent, model_dir)
        bad = first_nonfinite(zero_sd)
        if bad is not None:
            raise ExportError(f"{step}: the ZeRO shards' tensor {bad} holds NaN/Inf; export an earlier checkpoint")
    else:
        try:
            model = load_hf_model(model_dir)  # raises on missing / mismatched tensors
        except (OSError, ValueError, RuntimeError) as e:
            raise ExportError(f"{model_dir}: cannot load the model ({type(e).__name__}: {e})") from e
    tok = AutoTokenizer.from_pretrained(str(tok_src))
    if len(tok) > model.config.vocab_size:
        raise ExportError(f"tokenizer {tok_src} has {len(tok)} tokens but the model's vocabulary is "
                          f"{model.config.vocab_size}; pass --tokenizer with the data-bin's tokenizer/ folder")
    if tok.mask_token is None:
        log.warning("tokenizer %s has no mask token; pipeline('fill-mask') will not work", tok_src)
    # Positions the model can take (RoBERTa reserves pad + 1 slots before the first position).
    max_pos = int(getattr(model.config, "max_position_embeddings", 512))
    if family_of(model).padding_positions:
        max_pos -= int(model.config.pad_token_id) + 1
    if not tok.model_max_length or tok.model_max_length > max_pos:
        tok.model_max_length = max_pos

    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        n = _verify_identity_map(model_dir, tmp) if zero_sd is None else _verify_against(zero_sd, tmp)
        card = model_card(model, cfg, step=step_of(step) if step is not None else None, run=run,
                          source=f"a {(cfg.get('train') or {}).get('engine', 'native')} checkpoint")
        (tmp / "README.md").write_text(card, encoding="utf-8")
        write_export_marker(tmp, str(ckpt), step=step_of(step) if step is not None else None,
                            trained_on=run_identity_of(run), tokenizer_from=str(tok_src))
    log.info("exported %s (%s, %d tensors) with tokenizer %s -> %s", model_dir, type(model).__name__, n, tok_src, out)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alum-export",
        description="Export an alum-train checkpoint to a HuggingFace folder (model.safetensors, config.json, "
                    "tokenizer files, README.md) that AutoModelForPreTraining / AutoModelForMaskedLM / "
                    "AutoTokenizer and pipeline('fill-mask') load with no custom code.",
    )
    p.add_argument("ckpt", metavar="CKPT",
                   help="a run folder (its newest checkpoint is used), a RUN/checkpoints/step-N folder, a "
                        "step-N/model folder, or a fairseq checkpoint file (*.pt, exported as RobertaForMaskedLM "
                        "by alum_pretrain.fairseq_ext.export_hf; --tokenizer may then name the data-bin)")
    p.add_argument("out", metavar="OUT", help="output folder (written to a temporary name, renamed when complete)")
    p.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="tokenizer folder to ship with the model (default: the run's data.path/tokenizer, else "
                        "model.init_from)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it is an earlier export (a folder holding alum_export.json, or only an "
                        "export's files); a run, a checkpoint, a data-bin or any other folder is never replaced")
    p.add_argument("--from-zero-shards", action="store_true",
                   help="DeepSpeed checkpoints (--train.engine=deepspeed): rebuild the fp32 weights from every "
                        "rank's ZeRO shard in step-N/deepspeed/ with DeepSpeed's zero_to_fp32 instead of reading "
                        "step-N/model/ (e.g. when model/model.safetensors is missing or damaged)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle CKPT's train_state.pt / fairseq .pt with the full unpickler even when it holds "
                        "more than tensors, plain types and fairseq's known config classes; unpickling can run "
                        "arbitrary code, so only for files you wrote yourself or trust")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        with stopping.raising():  # a stop signal ends the export at once; its temporary folder is removed
            if Path(args.ckpt).is_file() and args.ckpt.endswith(".pt"):  # a fairseq checkpoint (fairseq engine)
                from .fairseq_ext.export_hf import export_fairseq

                out = export_fairseq(args.ckpt, args.out, tokenizer=args.tokenizer, overwrite=args.overwrite,
                                     trust=args.trust_checkpoint)
            else:
                out = export(args.ckpt, args.out, tokenizer=args.tokenizer, overwrite=args.overwrite,
                             from_zero_shards=args.from_zero_shards, trust=args.trust_checkpoint)
    except ValueError as e:
        print(f"alum-export: error: {e}", file=sys.stderr)
        return 2
    except stopping.StopRequested as stop:
        return stopping.report("alum-export", stop, f"{args.out} was not written (an existing one is unchanged); "
                               "run the same command again")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
