"""``alum-eval-robust``: clean accuracy, accuracy under a PWWS-style WordNet synonym attack, and the
embedding-space maximum loss increase within epsilon (FreeLB Sec. 4.3 / Table 5), for a fine-tuned HF
classifier on a dev set or any TSV/JSONL file.  Prints a table and writes a JSON report.

    alum-eval-robust --model runs/x/best --task sst2 --data dev.tsv --out robust.json

Max loss increase: for every example the model classifies correctly, PGD on the word embeddings
(model in eval mode, delta = 0 start, ``steps`` L2-normalised ascent steps of ``step_size`` projected
onto the per-example Frobenius ball of radius ``epsilon``) maximises the cross-entropy;
``max_inc = max_t L(x + delta_t) - L(x)``.  FreeLB used 2000 steps and reports the median.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import stopping
from ..compat import check_positions
from ..atomic import write_text
from ..config import config_to_dict, opt, parse_config, section
from .data import EncodedDataset, collate, encode, read_examples
from .methods.base import forward_from_embeds, word_embeddings
from ..adversarial import perturb
from ..precision import scale_free_input_grad
from .config import PRECISIONS, TaskDataConfig, amp_dtype
from .methods.embedding_adv import EmbeddingAdvConfig, ascent_update

log = logging.getLogger("alum_pretrain.finetune.robust")


@dataclass
class RModelConfig:
    """Model: the fine-tuned HF classifier folder (e.g. OUT/best of alum-finetune)."""

    path: str = opt("", "fine-tuned HF sequence-classification folder (required); shorthand --model")
    tokenizer: str = opt("", "tokenizer folder if not inside the model folder")


@dataclass
class RDataConfig(TaskDataConfig):
    """Data: the labelled file to evaluate on."""

    file: str = opt("", "labelled TSV/JSONL file, e.g. the GLUE dev.tsv (required); shorthand --data")
    max_examples: int = opt(0, "evaluate the first N examples only (0 = all)")
    batch_size: int = opt(64, "examples per batch")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_examples < 0 or self.batch_size < 1:
            raise ValueError("--data.max_examples must be >= 0 and --data.batch_size >= 1")


@dataclass
class AttackConfig:
    """Word-substitution attack (PWWS-style greedy, WordNet synonyms)."""

    enabled: bool = opt(True, "run the attack")
    max_candidates: int = opt(20, "synonyms tried per word")
    max_change_fraction: float = opt(0.2, "at most this fraction of the words may be substituted")
    query_budget: int = opt(2000, "model queries per example (every evaluated text counts)")
    fields: str = opt("all", "which text may be changed: all, a (first) or b (second, e.g. the NLI hypothesis)")
    max_examples: int = opt(0, "attack only the first N examples (0 = all evaluated examples)")
    wordnet_dir: str = opt("", "WordNet 3.0 folder (default: $ALUM_WORDNET_DIR or /usr/share/wordnet)")

    def __post_init__(self) -> None:
        if not 0 < self.max_change_fraction <= 1:
            raise ValueError(f"--attack.max_change_fraction={self.max_change_fraction} must be in (0, 1]")
        if self.query_budget < 1 or self.max_candidates < 1 or self.max_examples < 0:
            raise ValueError("--attack.query_budget and --attack.max_candidates must be >= 1")
        if self.fields not in ("all", "a", "b"):
            raise ValueError(f"--attack.fields={self.fields!r} must be all, a or b")


@dataclass
class EmbeddingAttackConfig:
    """Embedding-space maximum loss increase (FreeLB Table 5): PGD with many steps."""

    enabled: bool = opt(True, "compute the maximum loss increase")
    epsilon: float = opt(1.0, "radius of the per-example Frobenius (L2) ball on the word embeddings")
    steps: int = opt(100, "PGD steps (FreeLB: 2000)")
    step_size: float = opt(0.1, "L2 length of each normalised ascent step")
    max_examples: int = opt(0, "use only the first N correctly classified examples (0 = all)")

    def __post_init__(self) -> None:
        if self.epsilon <= 0 or self.step_size <= 0 or self.steps < 1 or self.max_examples < 0:
            raise ValueError("--embedding.epsilon/step_size must be > 0 and --embedding.steps >= 1")


@dataclass
class RRunConfig:
    """Run: output and device."""

    out: str = opt("", "JSON report path (default: print only); shorthand --out")
    device: str = opt("auto", "auto, cpu or cuda")
    seed: int = opt(0, "random seed")
    progress: bool = opt(True, "show progress bars")
    precision: str = opt("fp32", "fp32, or bf16/fp16 autocast for the forwards and the embedding PGD "
                                 "(float32 weights; the PGD's input gradient is rescaled so fp16 cannot "
                                 "underflow it)")

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--run.device={self.device!r} must be auto, cpu or cuda")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--run.precision={self.precision!r} must be one of {', '.join(PRECISIONS)}")


@dataclass
class RobustConfig:
    model: RModelConfig = section(RModelConfig)
    data: RDataConfig = section(RDataConfig)
    attack: AttackConfig = section(AttackConfig)
    embedding: EmbeddingAttackConfig = section(EmbeddingAttackConfig)
    run: RRunConfig = section(RRunConfig)


ALIASES = {"--model": "model.path", "--task": "data.task", "--data": "data.file", "--out": "run.out"}


class Classifier:
    """A loaded HF classifier with a text -> probabilities function for the attack."""

    def __init__(self, model_dir: str, tokenizer_dir: str = "", device: str = "auto", max_length: int = 128,
                 batch_size: int = 64, precision: str = "fp32"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not (Path(model_dir) / "config.json").is_file():
            raise ValueError(f"--model {model_dir}: no config.json (expected a fine-tuned HF folder)")
        dev = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
        self.device = torch.device(dev)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or model_dir)
        # float32 whatever dtype the checkpoint was saved in (a 16-bit foreign checkpoint would otherwise run
        # in 16 bits on CPU and flip close predictions); probs() also runs outside any caller's autocast
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
        self.model = self.model.to(self.device).eval()
        self.max_length, self.batch_size = max_length, batch_size
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        if precision not in PRECISIONS:
            raise ValueError(f"--run.precision={precision!r} must be one of {', '.join(PRECISIONS)}")
        self.amp_dtype = amp_dtype(precision)

    def autocast(self):
        """The precision context of every forward (a no-op for fp32)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    @torch.no_grad()
    def probs(self, pairs) -> np.ndarray:
        out = []
        for i in range(0, len(pairs), self.batch_size):
            chunk = pairs[i:i + self.batch_size]
            a = [p[0] for p in chunk]
            b = [p[1] for p in chunk] if chunk[0][1] is not None else None
            enc = self.tokenizer(a, b, truncation=True, max_length=self.max_length, padding=True,
                                 return_tensors="pt").to(self.device)
            with self.autocast():
                logits = self.model(**enc).logits
            out.append(torch.softmax(logits.float(), -1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.config.num_labels))


def max_loss_increase(clf: Classifier, enc, cfg: EmbeddingAttackConfig, progress: bool = False) -> np.ndarray:
    """Per example ``max_t CE(x + delta_t) - CE(x)`` (PGD on word embeddings, see the module docstring)."""
    model = clf.model
    adv = EmbeddingAdvConfig(adv_lr=cfg.step_size, adv_steps=cfg.steps, adv_init_mag=0.0,
                             adv_max_norm=cfg.epsilon, norm_type="l2")
    ds = EncodedDataset(enc)
    out = []
    for p in model.parameters():
        p.requires_grad_(False)
    for start in tqdm(range(0, len(ds), clf.batch_size), desc="max-loss-increase", disable=not progress):
        batch = collate([ds[i] for i in range(start, min(len(ds), start + clf.batch_size))], clf.pad_id, False)
        batch = {k: v.to(clf.device) for k, v in batch.items()}
        y, mask = batch["labels"], batch["attention_mask"]
        with torch.no_grad(), clf.autocast():
            embeds = word_embeddings(model, batch)                                       # (B, T, H)
            clean = F.cross_entropy(forward_from_embeds(model, embeds, batch).float(), y, reduction="none")
        delta = torch.zeros_like(embeds, dtype=torch.float32)
        best = clean.clone()
        for _ in range(cfg.steps):
            delta.requires_grad_(True)
            with clf.autocast():
                logits = forward_from_embeds(model, perturb(embeds, delta), batch)
            loss = F.cross_entropy(logits.float(), y, reduction="none")                  # (B,)
            best = torch.maximum(best, loss.detach())
            # per-example losses: independent gradients, each rescaled on its own (no fp16 underflow of a
            # confidently classified example's gradient)
            g, _ = scale_free_input_grad([logits], lambda o: F.cross_entropy(o[0], y, reduction="sum"), delta,
                                         per_example=True)
            delta = ascent_update(delta.detach(), torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0), adv, mask)
        with torch.no_grad(), clf.autocast():
            loss = F.cross_entropy(forward_from_embeds(model, perturb(embeds, delta), batch).float(), y,
                                   reduction="none")
            best = torch.maximum(best, loss)
        out.append((best - clean).cpu().numpy())
    for p in model.parameters():
        p.requires_grad_(True)
    return np.concatenate(out) if out else np.zeros(0)


def evaluate_robustness(cfg: RobustConfig) -> dict:
    if not cfg.model.path or not cfg.data.file:
        raise ValueError("missing required option(s): --model and --data (see --help)")
    torch.manual_seed(cfg.run.seed)
    d = cfg.data
    spec = d.task_spec()
    if spec.is_regression:
        raise ValueError(f"--task {spec.name} is a regression: robustness evaluation needs a classification task")
    examples = read_examples(d.file, spec, fmt=d.format, limit=d.max_examples)
    if not examples:
        raise ValueError(f"--data {d.file}: no examples")
    clf = Classifier(cfg.model.path, cfg.model.tokenizer, cfg.run.device, d.max_length, d.batch_size,
                     cfg.run.precision)
    check_positions("data.max_length", d.max_length, clf.model.config, f"--model {cfg.model.path}")
    if clf.model.config.num_labels != spec.num_labels:
        raise ValueError(f"--model has {clf.model.config.num_labels} labels but task {spec.name} has {spec.num_labels}")
    labels = np.array([e.label for e in examples])
    probs = clf.probs([(e.text_a, e.text_b) for e in examples])
    preds = probs.argmax(-1)
    correct = preds == labels
    report: dict = {"model": cfg.model.path, "data": d.file, "task": spec.name, "examples": len(examples),
                    "clean_accuracy": float(correct.mean())}

    if cfg.attack.enabled:
        from .attack import pwws_attack
        from .synonyms import SynonymSource

        syn = SynonymSource(cfg.attack.wordnet_dir)
        n = len(examples) if not cfg.attack.max_examples else min(cfg.attack.max_examples, len(examples))
        results = []
        for e in tqdm(examples[:n], desc="attack", disable=not cfg.run.progress):
            results.append(pwws_attack(clf.probs, (e.text_a, e.text_b), int(e.label), syn,
                                       unk_token=clf.tokenizer.unk_token or "[UNK]",
                                       max_candidates=cfg.attack.max_candidates,
                                       max_change_fraction=cfg.attack.max_change_fraction,
                                       query_budget=cfg.attack.query_budget, fields=cfg.attack.fields))
        attacked_ok = [r for r in results if not r.skipped]
        robust = [(not r.skipped) and not r.success for r in results]
        report["attack"] = {
            "examples": n,
            "clean_accuracy": float(np.mean([not r.skipped for r in results])),
            "attacked_accuracy": float(np.mean(robust)),
            # rates over no attacked (or no successful) example are no number: null, never 0
            "attack_success_rate": float(np.mean([r.success for r in attacked_ok])) if attacked_ok else None,
            "mean_words_changed_successful": (float(np.mean([r.changed / max(1, r.words) for r in results
                                                             if r.success])) if any(r.success for r in results)
                                              else None),
            "mean_queries": float(np.mean([r.queries for r in results])),
            "settings": config_to_dict(cfg.attack),
            "examples_detail": [{"line": e.line, "label": r.label, "clean_pred": r.clean_pred, "adv_pred": r.adv_pred,
                                 "success": r.success, "changed": r.changed, "queries": r.queries,
                                 "adversarial": list(r.adversarial)} for e, r in zip(examples, results)],
        }
    if cfg.embedding.enabled:
        idx = np.nonzero(correct)[0]
        if cfg.embedding.max_examples:
            idx = idx[:cfg.embedding.max_examples]
        sub = [examples[i] for i in idx]
        inc = max_loss_increase(clf, encode(clf.tokenizer, sub, d.max_length), cfg.embedding, cfg.run.progress) \
            if sub else np.zeros(0)
        report["embedding"] = {"examples": int(len(sub)), "median_max_loss_increase": float(np.median(inc)) if len(inc) else None,
                               "mean_max_loss_increase": float(np.mean(inc)) if len(inc) else None,
                               "settings": config_to_dict(cfg.embedding)}
    return report


def format_table(rows: list[dict]) -> str:
    """A Markdown table of reports (one row each; ``name`` column if given)."""
    head = "| model | clean acc | attacked acc | attack success | max-loss-inc (median) |"
    lines = [head, "|---|---|---|---|---|"]

    def num(v) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    for r in rows:
        att = r.get("attack") or {}
        emb = r.get("embedding") or {}
        m = emb.get("median_max_loss_increase")
        lines.append(f"| {r.get('name', r['model'])} | {r['clean_accuracy']:.3f} | "
                     f"{num(att.get('attacked_accuracy'))} | {num(att.get('attack_success_rate'))} | "
                     f"{'n/a' if m is None else f'{m:.4f}'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = parse_config(RobustConfig, argv, prog="alum-eval-robust", description=__doc__.split("\n\n")[0]
                       + "\n\nShorthands: --model = --model.path, --task = --data.task, --data = --data.file, "
                         "--out = --run.out.", aliases=ALIASES)
    try:
        with stopping.raising():  # a stop signal ends the evaluation at once
            report = evaluate_robustness(cfg)
    except stopping.StopRequested as stop:
        return stopping.report("alum-eval-robust", stop, "the same command evaluates again")
    except ValueError as exc:
        print(f"alum-eval-robust: error: {exc}", file=sys.stderr)
        return 2
    print(format_table([report]))
    if cfg.run.out:
        out = write_text(cfg.run.out, json.dumps(report, indent=2))
        print(f"report written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
