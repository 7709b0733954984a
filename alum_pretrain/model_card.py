"""The model card (``README.md``) of an exported model, in the hub's format, free of local paths.

Front matter (YAML): ``library_name: transformers``, ``pipeline_tag: fill-mask``, ``tags``, ``base_model``
(continual runs: the name of ``model.init_from``), ``datasets`` (the corpus names the data-bin's
``manifest.json`` records) and ``model-index`` with the run's last held-out MLM figures from ``log.jsonl``
(``valid_mlm`` cross-entropy, its perplexity, ``valid_acc``).  Body: what the model is, the training recipe
(steps, batch, masking curriculum, ALUM knobs, precision, engine) and how to load it.

Paths of the exporting machine never appear: a local path becomes its last component (a hub-style id
``org/name`` is kept), and the training configuration is summarised, not dumped.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Optional

__all__ = ["model_card", "public_name", "final_validation", "corpus_names"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def public_name(ref: Any) -> str:
    """A shareable name for a model or file reference: a hub-style ``org/name`` id as is, else the last path
    component of a local path (never an absolute path)."""
    s = str(ref or "").strip().rstrip("/\\")
    if not s:
        return ""
    if _HUB_ID.match(s) and not Path(s).exists():
        return s
    return re.split(r"[/\\]", s)[-1]


def _log_records(run: Optional[Path]) -> list[dict]:
    """The records of ``RUN/log.jsonl`` (none without one; a torn last line of a killed run is skipped)."""
    if run is None or not (Path(run) / "log.jsonl").is_file():
        return []
    out = []
    with open(Path(run) / "log.jsonl", encoding="utf-8") as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


def final_validation(run: Optional[Path]) -> dict[str, float]:
    """The last ``"kind": "valid"`` record of ``RUN/log.jsonl`` (``step``, ``valid_mlm``, ``valid_acc``), or {}."""
    valid = [r for r in _log_records(run) if r.get("kind") == "valid" and "valid_mlm" in r]
    last = valid[-1] if valid else {}
    return {k: float(last[k]) for k in ("step", "valid_mlm", "valid_acc") if isinstance(last.get(k), (int, float))}


def delta_share(run: Optional[Path]) -> Optional[float]:
    """The mean ``adv_share`` (the part of ALUM's R due to delta rather than dropout) over the training records
    of ``RUN/log.jsonl`` that carry it, or None."""
    shares = [float(r["adv_share"]) for r in _log_records(run) if isinstance(r.get("adv_share"), (int, float))]
    return sum(shares) / len(shares) if shares else None


def resume_overrides_of(run: Optional[Path]) -> list[dict]:
    """The ``"kind": "resume_override"`` records of ``RUN/log.jsonl`` (result-changing keys a resume changed)."""
    return [r for r in _log_records(run) if r.get("kind") == "resume_override"]


def corpus_names(data_path: Any, limit: int = 10) -> list[str]:
    """Names of the corpus files a data-bin was prepared from (``manifest.json`` inputs), basenames only."""
    if not data_path:
        return []
    manifest = Path(str(data_path)) / "manifest.json"
    try:
        inputs = json.loads(manifest.read_text(encoding="utf-8")).get("inputs", [])
    except (OSError, ValueError):
        return []
    names: list[str] = []
    for rec in inputs:
        name = public_name(rec.get("path", "")) if isinstance(rec, dict) else ""
        if name and name not in names:
            names.append(name)
    return names[:limit] + ([f"and {len(names) - limit} more"] if len(names) > limit else [])


def _get(cfg: dict, dotted: str, default: Any = None) -> Any:
    cur: Any = cfg
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return default
        cur = cur[part]
    return cur


def _recipe(cfg: dict, run: Optional[Path] = None) -> list[str]:
    if not _get(cfg, "train.max_steps"):
        engine = _get(cfg, "train.engine")
        return [f"- engine: {engine}" if engine else "- (no training configuration was found beside the checkpoint)"]
    gb = _get(cfg, "train.global_batch_size", 0) or None
    batch = (f"{gb} sequences per step" if gb else
             f"{_get(cfg, 'train.batch_size', '?')} sequences per process x {_get(cfg, 'train.grad_accum', 1)} "
             "accumulation steps")
    m = _get(cfg, "masking", {}) or {}
    masking = (f"curriculum {m.get('start_rate')} -> {m.get('end_rate')} in {m.get('num_phases')} phases"
               if m.get("schedule", "curriculum") == "curriculum" else f"constant {m.get('constant_rate')}")
    a = _get(cfg, "alum", {}) or {}
    alum = ("off (alpha = 0)" if not a.get("alpha") else
            f"alpha {a.get('alpha')}, epsilon {a.get('epsilon')}, step size {a.get('step_size')}, noise "
            f"{a.get('noise_std')}, K {a.get('k_steps')}, projection {a.get('projection')}, perturbation at "
            f"{a.get('perturb_at')}, divergence {a.get('divergence')}, from step {a.get('start_step')}; "
            f"objective {a.get('objective', 'alum')}, adversarial-pass dropout {a.get('adv_dropout', 'independent')}, "
            f"epsilon scale {a.get('scale', 'abs')}")
    share = delta_share(run) if a.get("alpha") else None
    if share is not None:
        alum += f"; measured share of the ALUM term due to delta (not dropout): {100 * share:.3g} %"
    return [
        f"- steps: {_get(cfg, 'train.max_steps', '?')}; batch: {batch}; max sequence length "
        f"{_get(cfg, 'data.max_seq_len', '?')}; NSP: {_get(cfg, 'data.nsp', '?')}",
        f"- masking: {masking} ({m.get('mask_prob', 0.8)}/{m.get('random_prob', 0.1)} mask/random)",
        f"- ALUM: {alum}",
        f"- optimizer: {_get(cfg, 'optim.name', 'adamw')}, lr {_get(cfg, 'optim.lr', '?')}, warm-up "
        f"{_get(cfg, 'optim.warmup_ratio', '?')}, weight decay {_get(cfg, 'optim.weight_decay', '?')}",
        f"- precision: {_get(cfg, 'train.precision', '?')}; engine: {_get(cfg, 'train.engine', '?')}; "
        f"seed {_get(cfg, 'train.seed', '?')}",
    ]


def _yaml_list(items: Iterable[str]) -> str:
    return "[" + ", ".join(json.dumps(str(i)) for i in items) + "]"


def model_card(model, cfg: dict, *, step: Optional[int], run: Optional[Path], source: str = "alum-train") -> str:
    """The README.md text for an exported ``model`` (module docstring).  ``cfg``: the run's resolved config
    as a dict ({} when unknown); ``run``: the run folder (for ``log.jsonl``) or None; ``source``: the engine
    or tool that produced the checkpoint."""
    c = model.config
    base = public_name(_get(cfg, "model.init_from", ""))
    data = corpus_names(_get(cfg, "data.path", ""))
    valid = final_validation(run)
    front = ["---", "library_name: transformers", "pipeline_tag: fill-mask",
             f"tags: {_yaml_list(['alum', 'adversarial-pretraining', 'fill-mask', c.model_type])}"]
    if base:
        front.append(f"base_model: {json.dumps(base)}")
    if data:
        front.append(f"datasets: {_yaml_list(data)}")
    if valid.get("valid_mlm") is not None:
        metrics = [("mlm_cross_entropy", "held-out MLM cross-entropy", valid["valid_mlm"]),
                   ("perplexity", "held-out MLM perplexity", math.exp(min(valid["valid_mlm"], 50.0)))]
        if "valid_acc" in valid:
            metrics.append(("accuracy", "held-out masked-token accuracy", valid["valid_acc"]))
        front += ["model-index:", f"- name: {json.dumps(c.model_type + '-alum')}", "  results:",
                  "  - task: {type: fill-mask, name: Masked language modeling}", "    metrics:"]
        front += [f"    - {{type: {t}, name: {json.dumps(n)}, value: {v:.6g}}}" for t, n, v in metrics]
    front.append("---")
    params = sum(p.numel() for p in model.parameters()) / 1e6
    body = [
        f"# {c.model_type} pre-trained with ALUM (alum-pretrain)", "",
        f"`{type(model).__name__}`: {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
        f"{c.num_attention_heads} heads, vocabulary {c.vocab_size}, {params:.1f}M parameters. "
        + (f"Continued from `{base}`. " if base else "Trained from scratch. ")
        + f"Exported by `alum-export` from {source}" + (f" at step {step}." if step is not None else "."),
        "", "## Training recipe", "", *_recipe(cfg, run), "",
    ]
    overrides = resume_overrides_of(run)
    if overrides:
        body += ["Changed on resume (`--train.resume_override`; the recipe above gives the final values): "
                 + "; ".join(f"at step {r.get('step')}, `{r.get('key')}` {r.get('was')} → {r.get('now')}"
                             for r in overrides) + ".", ""]
    if data:
        body += [f"Corpus files: {', '.join(data)}.", ""]
    if valid:
        body += [f"Held-out MLM at step {int(valid.get('step', 0))}: cross-entropy {valid['valid_mlm']:.4f}"
                 + (f", masked-token accuracy {valid['valid_acc']:.4f}" if "valid_acc" in valid else "") + ".", ""]
    body += ["## How to load", "", "```python", "from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline",
             "", 'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER_OR_HUB_ID")',
             'model = AutoModelForMaskedLM.from_pretrained("THIS_FOLDER_OR_HUB_ID")',
             'fill = pipeline("fill-mask", model=model, tokenizer=tokenizer)', "```", "",
             "Fine-tune it with `alum-finetune` or `alum_pretrain.hf.AdversarialTrainer`."]
    return "\n".join(front + body) + "\n"
