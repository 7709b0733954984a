"""Models for pre-training: an encoder from a size preset, continual pre-training of any HF folder, and
:class:`PretrainModel`, the wrapper the ALUM step drives.  What differs between encoder families (BERT,
RoBERTa, XLM-R, ModernBERT, DeBERTa-v2, ELECTRA, ALBERT, DistilBERT) lives in :mod:`alum_pretrain.families`.

* :func:`build_scratch_model` — ``BertForPreTraining`` (MLM + NSP) or ``BertForMaskedLM`` (MLM only) with a
  BERT size preset (:data:`PRESETS`), or ``ModernBertForMaskedLM`` / ``DebertaV2ForMaskedLM`` with a
  ``modernbert-*`` / ``deberta-*`` preset, and the corpus vocabulary of the data-bin.
* :func:`load_continual_model` — any HF checkpoint folder: ``AutoModelForPreTraining`` when NSP is asked for
  and the checkpoint has an NSP head, else ``AutoModelForMaskedLM``. A checkpoint without an MLM head
  (e.g. MiniLM, a plain ``BertModel``) gets a fresh head whose decoder is tied to the word embeddings
  (HF ``tie_word_embeddings``); the missing keys are logged. The vocabulary must match the data-bin's
  tokenizer (ValueError otherwise). Folders with their own modelling code need ``trust_remote_code``.
* :class:`PretrainModel` — ``embed`` (the ALUM perturbation point) and ``heads_from_embeds`` (encoder, then
  the family's LM head on the masked positions ONLY — the LM head is the largest matmul of a step at
  30k-50k vocabularies — and the NSP head on the pooled ``[CLS]``).
* :func:`save_model` / :func:`load_model` — ``save_pretrained`` (safetensors) folders shared by the
  checkpoints and ``alum-export``.

Where the perturbation enters (``perturb_at``; see :mod:`alum_pretrain.objective`; per family:
``docs/families.md``):

``"word"``: ``embed`` returns the word-embedding lookup E(x) (B, T, E); ``heads_from_embeds`` feeds
    ``E(x) + δ`` back through HF's ``inputs_embeds``, so position/segment embeddings, LayerNorm and dropout
    are applied after the perturbation (FreeLB's choice; the paper's "embedding").
``"embedding_output"``: ``embed`` returns the output of the whole embeddings module (incl. LayerNorm and
    dropout); ``heads_from_embeds`` replaces that module's output with the given tensor and runs the
    encoder on it (mt-dnn's placement).  E = the embedding width: the hidden size, except ELECTRA and
    ALBERT, whose projection to the hidden size follows the embeddings module.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import nn

from .families import FAMILIES, GENERIC, compile_encoder, family_of, needs_remote_code, preset_family

log = logging.getLogger("alum_pretrain.models")

PERTURB_AT = ("word", "embedding_output")

# BERT size presets for training from scratch (BERT paper / Turc et al. 2019 "well-read students" sizes); the
# presets of the other families (modernbert-*, deberta-*) are in alum_pretrain.families.FAMILIES.
PRESETS: dict[str, dict[str, int]] = FAMILIES["BERT"].presets


def param_numel(p: torch.Tensor) -> int:
    """Elements of a parameter, whole also when ZeRO-3 has partitioned it (DeepSpeed's ``ds_numel``)."""
    return int(getattr(p, "ds_numel", p.numel()))


def param_shape(p: torch.Tensor) -> torch.Size:
    """Shape of a parameter, whole also when ZeRO-3 has partitioned it (DeepSpeed's ``ds_shape``)."""
    return torch.Size(getattr(p, "ds_shape", p.shape))


def _unwrap(model: nn.Module) -> nn.Module:
    """The HF model inside DDP / torch.compile / PretrainModel wrappers."""
    while True:
        if isinstance(model, PretrainModel):
            model = model.hf
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP / FSDP
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


# --------------------------------------------------------------------------------------------------
# Building and loading
# --------------------------------------------------------------------------------------------------


def build_scratch_model(
    preset: str | dict,
    vocab_size: int,
    pad_token_id: int,
    *,
    nsp: bool = True,
    max_position_embeddings: int = 512,
    pad_vocab_to_multiple_of: int = 1,
    dropout: float | None = None,
    special_ids: dict[str, int] | None = None,
    **overrides: Any,
):
    """A freshly initialised model of ``preset``'s family: ``BertForPreTraining`` (BERT preset, ``nsp=True``)
    or the family's masked LM (``BertForMaskedLM``, ``ModernBertForMaskedLM``, ``DebertaV2ForMaskedLM``).

    ``preset``: a name of :func:`alum_pretrain.families.scratch_presets` (BERT: :data:`PRESETS`) or a dict of
    BertConfig sizes. ``vocab_size``/``pad_token_id``: from the data-bin (``DataBin.vocab_size``,
    ``DataBin.special_ids["pad"]``); ``special_ids`` (the data-bin's) replace config token ids that fall
    outside the vocabulary (ModernBERT's defaults name its own 50k tokenizer). ``pad_vocab_to_multiple_of``
    rounds the embedding/LM-head rows up (e.g. 8 for tensor cores); the extra rows are never input ids, but
    they are part of the softmax, so the default is 1 (exactly the tokenizer's vocabulary).
    ``max_position_embeddings``: at least this many (a preset may have more: ModernBERT-base 8,192).
    ``dropout``: override the family's dropout probabilities. ``overrides``: any further config field.
    """
    import transformers

    fam = preset_family(preset)
    sizes = dict(fam.presets[preset] if isinstance(preset, str) else preset)
    if vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size} must be positive")
    if not 0 <= pad_token_id < vocab_size:
        raise ValueError(f"pad_token_id={pad_token_id} is outside the vocabulary of {vocab_size}")
    if pad_vocab_to_multiple_of < 1:
        raise ValueError(f"pad_vocab_to_multiple_of={pad_vocab_to_multiple_of} must be >= 1")
    if nsp and not fam.nsp:
        raise ValueError(f"--model.preset={preset}: {fam.name} has no next-sentence-prediction head; "
                         "set --data.nsp=false")
    m = pad_vocab_to_multiple_of
    padded = -(-vocab_size // m) * m
    kw = {**fam.scratch_defaults, **sizes}
    kw.update(vocab_size=padded, pad_token_id=pad_token_id, tie_word_embeddings=True,
              max_position_embeddings=max(max_position_embeddings, sizes.get("max_position_embeddings", 0)))
    if dropout is not None:
        kw.update({k: dropout for k in fam.dropout_keys})
    kw.update(overrides)
    config_class = getattr(transformers, fam.config_class)
    for key, name in (("cls_token_id", "cls"), ("sep_token_id", "sep"), ("bos_token_id", "cls"),
                      ("eos_token_id", "sep")):
        value = kw.get(key, getattr(config_class, key, None))  # (class-level defaults of the config)
        if isinstance(value, int) and value >= padded:
            kw[key] = (special_ids or {}).get(name)
    config = config_class(**kw)
    model = getattr(transformers, fam.pretraining if nsp else fam.masked_lm)(config)
    log.info("built %s from scratch: preset %s, %d layers, hidden %d, vocab %d (%.1fM parameters)",
             type(model).__name__, preset if isinstance(preset, str) else "custom", config.num_hidden_layers,
             config.hidden_size, padded, sum(map(param_numel, model.parameters())) / 1e6)
    return model


def _checkpoint_keys(path: Path) -> set[str] | None:
    """Tensor names stored in an HF folder (safetensors, sharded or not), or None when unreadable."""
    from safetensors import safe_open

    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    try:
        if single.exists():
            with safe_open(str(single), "pt") as f:
                return set(f.keys())
        if index.exists():
            return set(json.loads(index.read_text())["weight_map"])
    except Exception:  # noqa: BLE001 - fall back to the config's architectures
        return None
    return None


def _has_nsp_head(path: Path, config) -> bool:
    keys = _checkpoint_keys(path)
    if keys is not None:
        return any("seq_relationship" in k for k in keys)
    return any(a.endswith("ForPreTraining") for a in (getattr(config, "architectures", None) or []))


def check_vocab(model_dir: str | os.PathLike, config, databin) -> None:
    """Raise ValueError unless the checkpoint's vocabulary is the data-bin's tokenizer vocabulary."""
    model_dir = Path(model_dir)
    V = int(databin.vocab_size)
    mv = int(config.vocab_size)
    tok_files = [f for f in ("tokenizer.json", "vocab.txt", "sentencepiece.bpe.model", "spiece.model", "vocab.json")
                 if (model_dir / f).exists()]
    if tok_files:
        from transformers import AutoTokenizer

        mine = AutoTokenizer.from_pretrained(str(model_dir)).get_vocab()
        theirs = databin.tokenizer().get_vocab()
        if mine != theirs:
            diff = sorted(set(mine.items()) ^ set(theirs.items()), key=lambda kv: kv[1])[:5]
            raise ValueError(
                f"{model_dir}: its tokenizer ({len(mine)} tokens) differs from the data-bin's "
                f"{databin.tokenizer_dir} ({len(theirs)} tokens), e.g. {diff}; prepare the corpus with this "
                f"model's tokenizer (alum-prep --tokenizer {model_dir}) so token ids mean the same words"
            )
        if mv < V:
            raise ValueError(f"{model_dir}: config vocab_size {mv} is smaller than the tokenizer's {V}")
    elif mv != V:
        raise ValueError(
            f"{model_dir}: config vocab_size {mv} != data-bin vocab_size {V} ({databin.path}/manifest.json) and the "
            "folder has no tokenizer files to compare; prepare the corpus with this model's tokenizer"
        )
    pad = databin.special_ids.get("pad")
    cfg_pad = getattr(config, "pad_token_id", None)
    if pad is not None and cfg_pad is not None and int(cfg_pad) != int(pad):
        msg = (f"{model_dir}: config pad_token_id {cfg_pad} != the data-bin's pad id {pad}")
        if family_of(config).padding_positions:
            raise ValueError(msg + f"; {config.model_type} derives position ids from the pad id, so this would shift "
                                   "every position — use the model's own tokenizer for alum-prep")
        log.warning("%s (only the embedding's padding row is affected)", msg)


def _read_config(path: Path, flag: str, trust_remote_code: bool):
    """The AutoConfig of an HF folder; modelling code shipped in the folder (``auto_map``) needs the flag."""
    from transformers import AutoConfig

    if not (path / "config.json").exists():
        raise ValueError(f"{flag}={str(path)!r}: no config.json there — expected a HuggingFace model folder")
    raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if needs_remote_code(raw) and not trust_remote_code:
        raise ValueError(f"{flag}={str(path)!r}: config.json maps the model to code in that folder (auto_map); "
                         "running it executes that code — pass --model.trust_remote_code=true only for a folder "
                         "you trust")
    return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def check_continual_model(path: str | os.PathLike, *, nsp: bool, databin=None, trust_remote_code: bool = False):
    """The HF config of a ``--model.init_from`` folder, after every check that needs no weights: readable
    config (remote code only when trusted), the vocabulary against ``databin``'s tokenizer
    (:func:`check_vocab`), an NSP head when ``nsp``.  ValueError naming the flag otherwise."""
    path = Path(path)
    config = _read_config(path, "--model.init_from", trust_remote_code)
    fam = family_of(config)
    if databin is not None:
        try:
            check_vocab(path, config, databin)
        except ValueError as e:
            raise ValueError(f"--model.init_from={str(path)!r}: {e}") from e
    if nsp and fam is not GENERIC and not fam.nsp:
        raise ValueError(f"--model.init_from={str(path)!r} is a {fam.name} model: it has no next-sentence-"
                         "prediction head; continue with MLM only (--data.nsp=false)")
    if nsp and not _has_nsp_head(path, config):
        raise ValueError(
            f"--model.init_from={str(path)!r} has no next-sentence-prediction head (no cls.seq_relationship weights); "
            "continue with MLM only (--data.nsp=false) or start from a checkpoint that has one"
        )
    return config


def load_continual_model(path: str | os.PathLike, *, nsp: bool, databin=None, dropout: float | None = None,
                         trust_remote_code: bool = False):
    """Load an HF checkpoint folder for continual pre-training (see the module docstring).

    ``nsp=True`` needs an NSP head in the checkpoint (``cls.seq_relationship``); otherwise ValueError.
    ``databin``: when given, the vocabulary is checked against its tokenizer (:func:`check_vocab`).
    ``trust_remote_code``: allow a folder whose config.json maps to its own modelling code.
    """
    from transformers import AutoModelForMaskedLM, AutoModelForPreTraining

    path = Path(path)
    config = check_continual_model(path, nsp=nsp, databin=databin, trust_remote_code=trust_remote_code)
    fam = family_of(config)
    kw = {k: dropout for k in fam.dropout_keys if dropout is not None and hasattr(config, k)}
    auto = AutoModelForPreTraining if nsp else AutoModelForMaskedLM
    model, info = auto.from_pretrained(str(path), output_loading_info=True, trust_remote_code=trust_remote_code,
                                       **kw)
    missing = sorted(info.get("missing_keys", []))
    unexpected = sorted(info.get("unexpected_keys", []))
    mismatched = info.get("mismatched_keys", [])
    if mismatched:
        raise ValueError(f"{path}: tensors with mismatched shapes: {mismatched[:5]}")
    _check_tied(model)
    if missing:
        log.warning("%s -> %s: %d tensors not in the checkpoint, freshly initialised: %s", path,
                    type(model).__name__, len(missing), ", ".join(missing))
        # Marked so that the optimizer can give them their own LR (--optim.fresh_lr_mult).
        params = dict(model.named_parameters(remove_duplicate=False))
        emb = model.get_input_embeddings().weight  # a tied decoder "missing" is the loaded embedding
        for name in missing:
            if name in params and params[name] is not emb:
                setattr(params[name], "_alum_fresh", True)
    else:
        log.info("%s -> %s: all tensors loaded", path, type(model).__name__)
    if unexpected:
        log.info("%s: %d checkpoint tensors unused by %s: %s", path, len(unexpected), type(model).__name__,
                 ", ".join(unexpected[:10]) + (" ..." if len(unexpected) > 10 else ""))
    return model


def _check_tied(model) -> None:
    """The LM decoder must share the word-embedding matrix (fresh heads rely on it; export keeps it)."""
    out = model.get_output_embeddings()
    inp = model.get_input_embeddings()
    if out is None or param_shape(out.weight) != param_shape(inp.weight):
        return  # no separate decoder (DeBERTa-v2's non-legacy head multiplies by the embedding matrix itself)
    tie = getattr(model.config, "tie_word_embeddings", True)
    # one Parameter object, or one storage; ZeRO-3 partitions are empty, so only the identity tells there
    shared = out.weight is inp.weight or (not hasattr(out.weight, "ds_id")
                                          and out.weight.data_ptr() == inp.weight.data_ptr())
    if tie and not shared:
        raise ValueError(f"{type(model).__name__}: the LM decoder is not tied to the word embeddings although "
                         "config.tie_word_embeddings is true")


def build_model(*, databin, preset: str | dict = "base", init_from: str = "", nsp: bool = True,
                perturb_at: str = "word", dropout: float | None = None, pad_vocab_to_multiple_of: int = 1,
                max_position_embeddings: int = 512, trust_remote_code: bool = False) -> "PretrainModel":
    """The model of a run: from scratch (``init_from=""``) with ``preset``, or continual from ``init_from``."""
    if init_from:
        hf = load_continual_model(init_from, nsp=nsp, databin=databin, dropout=dropout,
                                  trust_remote_code=trust_remote_code)
    else:
        hf = build_scratch_model(preset, databin.vocab_size, databin.special_ids["pad"], nsp=nsp,
                                 max_position_embeddings=max_position_embeddings,
                                 pad_vocab_to_multiple_of=pad_vocab_to_multiple_of, dropout=dropout,
                                 special_ids=dict(databin.special_ids))
    return PretrainModel(hf, perturb_at=perturb_at)


# --------------------------------------------------------------------------------------------------
# The wrapper the ALUM step drives
# --------------------------------------------------------------------------------------------------


class _Heads(NamedTuple):
    """The family's heads as callables (a tuple attribute: not registered as submodules a second time)."""

    lm: Optional[Callable[[torch.Tensor], torch.Tensor]]  # hidden (N, H) -> logits (N, V)
    nsp: Optional[nn.Module]  # pooled (B, H) -> (B, 2)


def flat_masked_index(masked_index: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """A (B, T) bool mask or flat positions -> flat positions (N,) into B*T, row-major."""
    if masked_index.dtype == torch.bool:
        if masked_index.shape != (B, T):
            raise ValueError(f"masked_index bool mask has shape {tuple(masked_index.shape)}, expected {(B, T)}")
        return masked_index.reshape(-1).nonzero().squeeze(1)  # (N,)
    return masked_index.reshape(-1)


class PretrainModel(nn.Module):
    """``embed`` + ``heads_from_embeds`` around an HF masked-LM / pre-training model of any family.

    ``masked_index`` (both methods): either a (B, T) bool mask of the positions to predict, or a 1-D
    LongTensor of flat positions into B*T (``(labels.view(-1) != -100).nonzero().squeeze(1)``). The MLM
    logits come back in row-major order of those positions, i.e. aligned with ``labels[labels != -100]``.

    Fast path (every family of :data:`alum_pretrain.families.FAMILIES`): the encoder runs once, its hidden
    states are gathered at the masked positions, and only those N rows go through the family's LM head.
    Other architectures run the full HF forward and gather the masked rows of its logits (correct, slower;
    one warning naming the missing fast path).  Where the perturbation enters: the module docstring.
    """

    def __init__(self, hf_model: nn.Module, perturb_at: str = "word"):
        super().__init__()
        if perturb_at not in PERTURB_AT:
            raise ValueError(f"--alum.perturb_at={perturb_at!r}: choose one of {PERTURB_AT}")
        self.hf, self.perturb_at, self.config = hf_model, perturb_at, hf_model.config
        base = getattr(hf_model, "base_model", None)
        if base is None or base is hf_model or not hasattr(base, "embeddings"):
            raise ValueError(f"{type(hf_model).__name__}: no base model with an `embeddings` module; "
                             "PretrainModel needs an encoder-only HF model (BERT, RoBERTa, XLM-R, ...)")
        self.family = family_of(hf_model)
        cls = getattr(hf_model, "cls", None)
        nsp = getattr(cls, "seq_relationship", None) if self.family.nsp else None
        self._heads = _Heads(self.family.lm_head(hf_model) if self.family.lm_head else None, nsp)
        self.fast = self._heads.lm is not None
        self._warned = False
        accepted = inspect.signature(base.forward).parameters
        self._token_types_ok = "token_type_ids" in accepted and int(getattr(self.config, "type_vocab_size", 0) or 0) > 1
        self._override: torch.Tensor | None = None
        if perturb_at == "embedding_output":
            base.embeddings.register_forward_hook(self._replace_embedding_output)

    # HF submodules (not registered twice: properties, not attributes)
    @property
    def base(self) -> nn.Module:
        return self.hf.base_model

    @property
    def has_nsp(self) -> bool:
        return self._heads.nsp is not None and getattr(self.base, "pooler", None) is not None

    def word_embeddings(self) -> nn.Embedding:
        return self.hf.get_input_embeddings()

    def _replace_embedding_output(self, module, args, output):
        return self._override if self._override is not None else output

    def _kwargs(self, attention_mask: torch.Tensor | None, token_type_ids: torch.Tensor | None) -> dict:
        """What HF gets besides the embeddings: mask, segment ids (families with 2+ types), position ids."""
        kw: dict[str, Any] = {"attention_mask": self._model_mask(attention_mask)}
        if token_type_ids is not None and self._token_types_ok:  # one-type models (RoBERTa): no segment B
            kw["token_type_ids"] = token_type_ids
        if self.family.padding_positions and attention_mask is not None:
            # RoBERTa numbers positions from pad + 1 and gives padding the pad id; from inputs_embeds HF cannot
            # see the padding and numbers every position, so pass the ids HF would derive from input_ids.
            m = attention_mask.long()
            kw["position_ids"] = torch.cumsum(m, dim=1) * m + int(self.config.pad_token_id)  # (B, T)
        return kw

    def _model_mask(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The attention mask handed to HF, built so that HF never reads it on the host.

        With a 2-D mask and SDPA attention, HF checks ``padding_mask.all()`` in every forward to decide
        whether it may drop the mask - a device->host synchronisation per forward (1 per standard step,
        K + 2 per ALUM step) that stalls the CPU's kernel queue on a GPU.  A 4-D mask is passed through
        as-is, so the (B, 1, T, T) boolean mask SDPA would build from the 2-D one is handed over directly
        (an expanded view: no memory).  Families that build more than a padding mask (ModernBERT's sliding
        windows) and other attention implementations keep the 2-D mask."""
        if (attention_mask is None or attention_mask.dim() != 2 or not self.family.mask_4d
                or getattr(self.config, "_attn_implementation", None) != "sdpa"):
            return attention_mask
        B, T = attention_mask.shape
        return attention_mask.bool()[:, None, None, :].expand(B, 1, T, T)  # True = attend

    # -- the two halves ---------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The perturbation point: (B, T) ids -> (B, T, E) (see the module docstring for ``perturb_at``)."""
        if self.perturb_at == "word":
            return self.word_embeddings()(input_ids)  # (B, T, E)
        real = input_ids.ne(int(self.config.pad_token_id)) if self.config.pad_token_id is not None else None
        kw = self._kwargs(real, token_type_ids)
        kw["mask"] = real if self.family.embed_mask else None  # DeBERTa zeroes padding rows here
        accepted = inspect.signature(self.base.embeddings.forward).parameters
        kw = {k: v for k, v in kw.items() if v is not None and k in accepted}
        return self.base.embeddings(input_ids=input_ids, **kw)  # (B, T, E)

    def _run(self, module: nn.Module, embeds, attention_mask, token_type_ids):
        """``module`` (the base model or the whole HF model) from ``embeds`` at the perturbation point."""
        if self.perturb_at == "embedding_output":
            self._override = embeds  # the hook swaps the embeddings module's output for `embeds`
        try:
            return module(inputs_embeds=embeds, **self._kwargs(attention_mask, token_type_ids))
        finally:
            self._override = None

    def heads_from_embeds(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                          token_type_ids: torch.Tensor | None, masked_index: torch.Tensor,
                          need_nsp: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encoder + heads from ``embeds`` (B, T, E) -> (mlm_logits (N, V), nsp_logits (B, 2) or None)."""
        B, T = embeds.shape[:2]
        if need_nsp and not self.has_nsp and self.fast:
            raise ValueError(f"{type(self.hf).__name__} has no NSP head; set --data.nsp=false")
        idx = flat_masked_index(masked_index, B, T)  # (N,)
        if not self.fast:
            return self._fallback(embeds, attention_mask, token_type_ids, idx, need_nsp)
        out = self._run(self.base, embeds, attention_mask, token_type_ids)
        hidden = out.last_hidden_state  # (B, T, H)
        picked = hidden.reshape(B * T, hidden.shape[-1]).index_select(0, idx)  # (N, H): the LM head sees only these
        mlm_logits = self._heads.lm(picked)  # (N, V)
        nsp_logits = self._heads.nsp(out.pooler_output) if need_nsp else None  # (B, 2) from tanh(W h_[CLS])
        return mlm_logits, nsp_logits

    def _fallback(self, embeds, attention_mask, token_type_ids, idx, need_nsp):
        if not self._warned:
            log.warning("%s (model_type %r): no masked-only LM head path for this architecture (fast paths: %s); "
                        "running the full HF forward and gathering the masked positions (correct, slower)",
                        type(self.hf).__name__, self.config.model_type, ", ".join(FAMILIES))
            self._warned = True
        out = self._run(self.hf, embeds, attention_mask, token_type_ids)
        logits = out.prediction_logits if hasattr(out, "prediction_logits") else out.logits  # (B, T, V)
        mlm_logits = logits.reshape(-1, logits.shape[-1]).index_select(0, idx)  # (N, V)
        nsp_logits = getattr(out, "seq_relationship_logits", None) if need_nsp else None
        if need_nsp and nsp_logits is None:
            raise ValueError(f"{type(self.hf).__name__} has no NSP head; set --data.nsp=false")
        return mlm_logits, nsp_logits

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, masked_index: torch.Tensor | None = None,
                need_nsp: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``heads_from_embeds(embed(input_ids), ...)``; ``masked_index=None`` = every position."""
        if masked_index is None:
            masked_index = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
        return self.heads_from_embeds(self.embed(input_ids, token_type_ids), attention_mask, token_type_ids,
                                      masked_index, need_nsp)


# --------------------------------------------------------------------------------------------------
# Saving and loading (checkpoints and export share this)
# --------------------------------------------------------------------------------------------------


def save_model(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the HF model (``config.json`` + ``model.safetensors``) to ``directory`` atomically.

    Accepts a :class:`PretrainModel`, an HF model, or either inside DDP / ``torch.compile``. The folder is
    written under a temporary name beside ``directory`` and renamed when complete (an existing folder is
    replaced).
    """
    from .atomic import atomic_dir

    hf = _unwrap(model)
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        hf.save_pretrained(str(tmp), safe_serialization=True)
    return directory


def load_hf_model(directory: str | os.PathLike, trust_remote_code: bool = False):
    """The HF model class named in ``config.json`` (ForPreTraining -> AutoModelForPreTraining, else MLM)."""
    from transformers import AutoModelForMaskedLM, AutoModelForPreTraining

    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise ValueError(f"{directory}: no config.json — not a model folder written by save_model")
    config = _read_config(directory, "model folder", trust_remote_code)
    archs = getattr(config, "architectures", None) or []
    auto = AutoModelForPreTraining if any(a.endswith("ForPreTraining") for a in archs) else AutoModelForMaskedLM
    model, info = auto.from_pretrained(str(directory), output_loading_info=True,
                                       trust_remote_code=trust_remote_code)
    if info.get("missing_keys") or info.get("mismatched_keys"):
        raise ValueError(f"{directory}: incomplete model folder — missing {sorted(info.get('missing_keys', []))[:5]}, "
                         f"mismatched {info.get('mismatched_keys', [])[:5]}")
    return model


def load_model(directory: str | os.PathLike, perturb_at: str = "word",
               trust_remote_code: bool = False) -> PretrainModel:
    """Inverse of :func:`save_model`: a :class:`PretrainModel` around the saved HF model."""
    return PretrainModel(load_hf_model(directory, trust_remote_code), perturb_at=perturb_at)


__all__ = [
    "PRESETS",
    "PERTURB_AT",
    "PretrainModel",
    "build_model",
    "build_scratch_model",
    "check_continual_model",
    "check_vocab",
    "compile_encoder",
    "flat_masked_index",
    "load_continual_model",
    "load_hf_model",
    "load_model",
    "param_numel",
    "param_shape",
    "save_model",
]
