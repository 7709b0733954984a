"""Encoder families: where each HF masked-LM architecture keeps what ALUM needs, in one registry.

A :class:`Family` says, for one architecture (keyed by ``config.model_type``):

* the **word** perturbation point — the word-embedding lookup ``hf.get_input_embeddings()`` (every family;
  ``word_path`` names it) whose output is fed back through HF's ``inputs_embeds``;
* the **embedding_output** point — the module whose output :class:`alum_pretrain.models.PretrainModel`
  replaces with a forward hook (``embedding_path``, always ``base_model.embeddings``): ELECTRA and ALBERT
  produce ``embedding_size``-wide outputs there, so δ lives in the embedding space and the projection to the
  hidden size (``embeddings_project`` / ``embedding_hidden_mapping_in``) follows it;
* the **LM head on hidden states** (``lm_head``: hf -> callable (N, H) -> (N, V)) that the fast path runs on
  the masked rows only, and the NSP head on the pooled ``[CLS]`` (BERT only);
* **position handling** (``padding_positions``: RoBERTa/XLM-R number positions from ``pad + 1``), whether
  HF may receive a prebuilt 4-D SDPA mask (``mask_4d``: not ModernBERT, whose sliding-window layers build
  their own), whether the embeddings module zeroes padding with the mask (``embed_mask``: DeBERTa);
* the config keys that ``--model.dropout`` overrides, the module stack ``--train.compile`` compiles, and
  the from-scratch presets (``presets``) with the config class they build.

:func:`family_of` looks a model (or config) up; an unknown ``model_type`` gets :data:`GENERIC`: the full HF
forward with the masked rows gathered afterwards (correct, V x T instead of V x N logits).  Adding a family
is one entry in :data:`FAMILIES` plus one row of the test matrix (``tests/test_families.py``), which also
renders the support table of ``docs/families.md`` (:func:`support_table`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from torch import nn

__all__ = ["Family", "FAMILIES", "GENERIC", "family_of", "scratch_presets", "preset_family",
           "check_model_choice", "compile_encoder", "needs_remote_code", "support_table"]

LMHead = Callable[[nn.Module], Callable]


@dataclass(frozen=True)
class Family:
    """What PretrainModel, the scratch builder and the docs need to know about one architecture."""

    name: str  # display name (docs, errors)
    model_types: tuple[str, ...]  # config.model_type values covered
    masked_lm: str  # the HF class of the MLM model (AutoModelForMaskedLM loads it)
    lm_head: Optional[LMHead]  # hf -> fn(hidden (N, H)) -> logits (N, V); None = no fast path
    lm_head_path: str  # for the docs: which modules the fast path runs
    word_path: str  # hf.get_input_embeddings(), relative to the HF model
    embedding_path: str  # the module whose output is the embedding_output point
    after_embedding: str = ""  # what follows that module before the first layer (docs)
    nsp: bool = False  # pooler + cls.seq_relationship (BertForPreTraining)
    padding_positions: bool = False  # position ids derive from the padding id (RoBERTa numbering)
    mask_4d: bool = True  # the SDPA path may take a prebuilt (B, 1, T, T) boolean mask
    embed_mask: bool = False  # the embeddings module takes ``mask`` (zeroes padding rows)
    encoder: str = "encoder"  # base-model attribute holding the layer stack (--train.compile)
    dropout_keys: tuple[str, ...] = ("hidden_dropout_prob", "attention_probs_dropout_prob")
    fairseq: str = ""  # what the fairseq engine trains of this family ("" = nothing: native engine only)
    pretraining: str = ""  # the HF class with MLM + NSP heads (from scratch with --data.nsp=true)
    config_class: str = ""  # transformers config class of the scratch presets
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)  # --model.preset name -> config sizes
    scratch_defaults: dict[str, Any] = field(default_factory=dict)  # config fields every preset gets
    notes: str = ""


def _roberta_head(hf):
    return hf.lm_head  # dense -> gelu -> LayerNorm -> decoder (tied)


def _deberta_head(hf):
    if hf.config.legacy:  # cls.predictions: transform -> decoder (tied) + bias
        return hf.cls.predictions
    emb = hf.deberta.embeddings.word_embeddings  # non-legacy: the head multiplies by E itself
    return lambda h: hf.lm_predictions.lm_head(h, emb)


def _distilbert_head(hf):
    return lambda h: hf.vocab_projector(hf.vocab_layer_norm(hf.activation(hf.vocab_transform(h))))


_MODERNBERT_TINY = dict(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, intermediate_size=96,
                        local_attention=16, global_attn_every_n_layers=3)
# answerdotai/ModernBERT-base: HF's intermediate_size is one GLU half (Wi: 768 -> 2 x 1152 = 2,304).
_MODERNBERT_BASE = dict(num_hidden_layers=22, hidden_size=768, num_attention_heads=12, intermediate_size=1152,
                        local_attention=128, global_attn_every_n_layers=3, max_position_embeddings=8192,
                        mlp_bias=False, attention_bias=False, norm_bias=False)
# DeBERTa-v3 attention (relative positions, no absolute ones, shared keys, log buckets); MLM head = legacy.
_DEBERTA_V3 = dict(relative_attention=True, pos_att_type=["p2c", "c2p"], position_biased_input=False,
                   max_relative_positions=-1, norm_rel_ebd="layer_norm", share_att_key=True, layer_norm_eps=1e-7,
                   hidden_act="gelu", type_vocab_size=0, legacy=True)
_BERT_PRESETS = {
    "tiny": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512),
    "mini": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024),
    "small": dict(num_hidden_layers=4, hidden_size=512, num_attention_heads=8, intermediate_size=2048),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
    "large": dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, intermediate_size=4096),
}

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("BERT", ("bert",), "BertForMaskedLM", lambda hf: hf.cls.predictions, "cls.predictions",
           "bert.embeddings.word_embeddings", "bert.embeddings", nsp=True,
           fairseq="BERT size presets as fairseq's `roberta` arch (pairs + NSP head)",
           pretraining="BertForPreTraining", config_class="BertConfig", presets=_BERT_PRESETS,
           scratch_defaults=dict(type_vocab_size=2, tie_word_embeddings=True)),
    Family("RoBERTa", ("roberta", "camembert", "roberta-prelayernorm"), "RobertaForMaskedLM", _roberta_head,
           "lm_head", "roberta.embeddings.word_embeddings", "roberta.embeddings", padding_positions=True,
           fairseq="fairseq `roberta` checkpoints (`model.pt`), not HF folders"),
    Family("XLM-R", ("xlm-roberta", "xlm-roberta-xl"), "XLMRobertaForMaskedLM", _roberta_head, "lm_head",
           "roberta.embeddings.word_embeddings", "roberta.embeddings", padding_positions=True),
    Family("ModernBERT", ("modernbert",), "ModernBertForMaskedLM", lambda hf: lambda h: hf.decoder(hf.head(h)),
           "head -> decoder", "model.embeddings.tok_embeddings", "model.embeddings", mask_4d=False,
           encoder="layers", dropout_keys=("embedding_dropout", "mlp_dropout", "attention_dropout"),
           config_class="ModernBertConfig",
           presets={"modernbert-tiny": _MODERNBERT_TINY, "modernbert-base": _MODERNBERT_BASE},
           notes="no position embeddings (RoPE in attention); MLM only (the published recipe masks 30 %)"),
    Family("DeBERTa-v2", ("deberta-v2",), "DebertaV2ForMaskedLM", _deberta_head,
           "cls.predictions (legacy) / lm_predictions.lm_head", "deberta.embeddings.word_embeddings",
           "deberta.embeddings", embed_mask=True, mask_4d=False, config_class="DebertaV2Config",
           presets={"deberta-tiny": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2,
                                         intermediate_size=512, position_buckets=64, **_DEBERTA_V3),
                    "deberta-base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12,
                                         intermediate_size=3072, position_buckets=256, **_DEBERTA_V3)},
           notes="DeBERTa-v3 checkpoints load as deberta-v2; relative positions live inside attention"),
    Family("ELECTRA", ("electra",), "ElectraForMaskedLM",
           lambda hf: lambda h: hf.generator_lm_head(hf.generator_predictions(h)),
           "generator_predictions -> generator_lm_head", "electra.embeddings.word_embeddings",
           "electra.embeddings", after_embedding="electra.embeddings_project",
           notes="the generator (ElectraForMaskedLM); delta is embedding_size wide"),
    Family("ALBERT", ("albert",), "AlbertForMaskedLM", lambda hf: hf.predictions, "predictions",
           "albert.embeddings.word_embeddings", "albert.embeddings",
           after_embedding="albert.encoder.embedding_hidden_mapping_in",
           notes="delta is embedding_size wide; its sentence-order head is not NSP"),
    Family("DistilBERT", ("distilbert",), "DistilBertForMaskedLM", _distilbert_head,
           "vocab_transform -> activation -> vocab_layer_norm -> vocab_projector",
           "distilbert.embeddings.word_embeddings", "distilbert.embeddings", encoder="transformer",
           dropout_keys=("dropout", "attention_dropout"), notes="no token types, no pooler"),
)}

GENERIC = Family("other AutoModelForMaskedLM", (), "its own *ForMaskedLM", None, "(full HF forward)",
                 "get_input_embeddings()", "base_model.embeddings", mask_4d=False,
                 notes="one warning names the missing fast path; a folder with its own modelling code needs "
                       "`--model.trust_remote_code=true`")

_BY_TYPE = {t: f for f in FAMILIES.values() for t in f.model_types}


def family_of(model_or_config) -> Family:
    """The family of an HF model or config (:data:`GENERIC` for an unknown ``model_type``)."""
    config = getattr(model_or_config, "config", model_or_config)
    return _BY_TYPE.get(getattr(config, "model_type", ""), GENERIC)


def scratch_presets() -> dict[str, Family]:
    """Every ``--model.preset`` name -> the family it builds."""
    return {p: f for f in FAMILIES.values() for p in f.presets}


def preset_family(preset: str | dict) -> Family:
    """The family of a scratch preset (a dict of sizes is a BERT configuration); ValueError if unknown."""
    if isinstance(preset, dict):
        return FAMILIES["BERT"]
    names = scratch_presets()
    if preset not in names:
        raise ValueError(f"--model.preset={preset!r}: unknown size preset; choose one of {sorted(names)}")
    return names[preset]


def needs_remote_code(config_json: dict) -> bool:
    """True when an HF folder's config.json points at modelling code shipped in the folder (``auto_map``)."""
    return bool(config_json.get("auto_map"))


def check_model_choice(*, preset: str, init_from: str, nsp: bool, trust_remote_code: bool) -> None:
    """Config-time checks of ``--model.*`` against ``--data.nsp``: ValueError naming the alternative.

    From scratch: the preset must exist and its family must have an NSP head when NSP is on.  Continual:
    when ``init_from``'s config.json is readable, its family must support NSP if asked, and modelling code
    shipped in the folder needs ``--model.trust_remote_code=true``."""
    if not init_from:
        fam = preset_family(preset)
        if nsp and not fam.nsp:
            raise ValueError(f"--model.preset={preset} builds {fam.name}, which has no next-sentence-prediction "
                             "head (MLM only): set --data.nsp=false (and --data.mode=blocks for packed blocks)")
        return
    cfg_file = Path(init_from) / "config.json"
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # not readable here (e.g. a path on the cluster): load_continual_model checks it at start
    if needs_remote_code(config) and not trust_remote_code:
        raise ValueError(f"--model.init_from={init_from}: config.json maps the model to code in that folder "
                         f"(auto_map: {sorted(config['auto_map'])}); running it executes that code — pass "
                         "--model.trust_remote_code=true only for a folder you trust")
    fam = _BY_TYPE.get(config.get("model_type", ""), GENERIC)
    if nsp and fam is not GENERIC and not fam.nsp:
        raise ValueError(f"--model.init_from={init_from} is a {fam.name} model, which has no next-sentence-"
                         "prediction head: set --data.nsp=false (MLM only; --data.mode=blocks for packed blocks)")


def compile_encoder(hf: nn.Module) -> None:
    """``torch.compile`` the layer stack of an HF encoder (a ModuleList is compiled layer by layer)."""
    base = hf.base_model
    stack = getattr(base, family_of(hf).encoder, None)
    if not isinstance(stack, nn.Module):
        raise ValueError(f"--train.compile: {type(base).__name__} has no `{family_of(hf).encoder}` layer stack to "
                         "compile; run without --train.compile (speed only)")
    for m in (stack if isinstance(stack, nn.ModuleList) else [stack]):
        m.compile()


def support_table() -> str:
    """The Markdown support table of docs/families.md, rendered from :data:`FAMILIES`."""
    cols = ["family (`model_type`)", "`perturb_at=word`: δ on the output of", "`perturb_at=embedding_output`: "
            "hooked module", "fast path: LM head on masked rows only", "NSP", "from scratch (`--model.preset`)",
            "native engine (DDP, DeepSpeed)", "fairseq engine", "notes"]
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for f in (*FAMILIES.values(), GENERIC):
        emb = f"`{f.embedding_path}`" + (f", then `{f.after_embedding}`" if f.after_embedding else "")
        fast = f"yes: `{f.lm_head_path}`" if f.lm_head else "no: full forward, masked rows gathered"
        types = ", ".join(f"`{t}`" for t in f.model_types) or "any other"
        rows.append("| " + " | ".join([
            f"{f.name} ({types})", f"`{f.word_path}`", emb, fast,
            "yes" if f.nsp else "if the model returns it" if f is GENERIC else "no: `--data.nsp=false`",
            ", ".join(f"`{p}`" for p in f.presets) or "—", "continual" + (" + scratch" if f.presets else ""),
            f.fairseq or "no: native engine", f.notes or ""]) + " |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # python3 -m alum_pretrain.families: the table of docs/families.md
    print(support_table(), end="")
