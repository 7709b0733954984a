"""Models for pre-training: HF BERT from a size preset, continual pre-training of any HF folder, and
:class:`PretrainModel`, the wrapper the ALUM step drives.

* :func:`build_scratch_model` — ``BertForPreTraining`` (MLM + NSP) or ``BertForMaskedLM`` (MLM only) with a
  size preset (:data:`PRESETS`) and the corpus vocabulary of the data-bin.
* :func:`load_continual_model` — any HF checkpoint folder: ``AutoModelForPreTraining`` when NSP is asked for
  and the checkpoint has an NSP head, else ``AutoModelForMaskedLM``. A checkpoint without an MLM head
  (e.g. MiniLM, a plain ``BertModel``) gets a fresh head whose decoder is tied to the word embeddings
  (HF ``tie_word_embeddings``); the missing keys are logged. The vocabulary must match the data-bin's
  tokenizer (ValueError otherwise).
* :class:`PretrainModel` — ``embed`` (the ALUM perturbation point) and ``heads_from_embeds`` (encoder, then
  the LM head on the masked positions ONLY — the LM head is the largest matmul of a step at 30k-50k
  vocabularies — and the NSP head on the pooled ``[CLS]``).
* :func:`save_model` / :func:`load_model` — ``save_pretrained`` (safetensors) folders shared by the
  checkpoints and ``alum-export``.

Where the perturbation enters (``perturb_at``; see :mod:`alum_pretrain.objective`):

``"word"``: ``embed`` returns the word-embedding lookup E(x) (B, T, H); ``heads_from_embeds`` feeds
    ``E(x) + δ`` back through HF's ``inputs_embeds``, so position/segment embeddings, LayerNorm and dropout
    are applied after the perturbation (FreeLB's choice; the paper's "embedding").
``"embedding_output"``: ``embed`` returns the output of the whole embeddings module (incl. LayerNorm and
    dropout); ``heads_from_embeds`` replaces that module's output with the given tensor and runs the
    encoder on it (mt-dnn's placement).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger("alum_pretrain.models")

PERTURB_AT = ("word", "embedding_output")

# Size presets for training from scratch (BERT paper Table / Turc et al. 2019 "well-read students" sizes).
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512),
    "mini": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024),
    "small": dict(num_hidden_layers=4, hidden_size=512, num_attention_heads=8, intermediate_size=2048),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
    "large": dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, intermediate_size=4096),
}

# Model families whose position ids derive from the padding id (RoBERTa counts positions from pad + 1).
_PADDING_POSITION_TYPES = {"roberta", "xlm-roberta", "camembert", "roberta-prelayernorm", "xlm-roberta-xl"}


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
    **overrides: Any,
):
    """A freshly initialised ``BertForPreTraining`` (``nsp=True``) or ``BertForMaskedLM`` (``nsp=False``).

    ``preset``: a name in :data:`PRESETS` or a dict of BertConfig sizes. ``vocab_size``/``pad_token_id``:
    from the data-bin (``DataBin.vocab_size``, ``DataBin.special_ids["pad"]``). ``pad_vocab_to_multiple_of``
    rounds the embedding/LM-head rows up (e.g. 8 for tensor cores); the extra rows are never input ids, but
    they are part of the softmax, so the default is 1 (exactly the tokenizer's vocabulary).
    ``dropout``: override hidden and attention dropout. ``overrides``: any further BertConfig field.
    """
    from transformers import BertConfig, BertForMaskedLM, BertForPreTraining

    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"--model.preset={preset!r}: unknown size preset; choose one of {sorted(PRESETS)}")
        sizes = dict(PRESETS[preset])
    else:
        sizes = dict(preset)
    if vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size} must be positive")
    if not 0 <= pad_token_id < vocab_size:
        raise ValueError(f"pad_token_id={pad_token_id} is outside the vocabulary of {vocab_size}")
    if pad_vocab_to_multiple_of < 1:
        raise ValueError(f"pad_vocab_to_multiple_of={pad_vocab_to_multiple_of} must be >= 1")
    m = pad_vocab_to_multiple_of
    padded = -(-vocab_size // m) * m
    kw = dict(sizes)
    kw.update(vocab_size=padded, pad_token_id=pad_token_id, max_position_embeddings=max_position_embeddings,
              type_vocab_size=2, tie_word_embeddings=True)
    if dropout is not None:
        kw.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    kw.update(overrides)
    config = BertConfig(**kw)
    cls = BertForPreTraining if nsp else BertForMaskedLM
    model = cls(config)
    log.info("built %s from scratch: preset %s, %d layers, hidden %d, vocab %d (%.1fM parameters)", cls.__name__,
             preset if isinstance(preset, str) else "custom", config.num_hidden_layers, config.hidden_size, padded,
             sum(p.numel() for p in model.parameters()) / 1e6)
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
        if getattr(config, "model_type", "") in _PADDING_POSITION_TYPES:
            raise ValueError(msg + f"; {config.model_type} derives position ids from the pad id, so this would shift "
                                   "every position — use the model's own tokenizer for alum-prep")
        log.warning("%s (only the embedding's padding row is affected)", msg)


def load_continual_model(path: str | os.PathLike, *, nsp: bool, databin=None, dropout: float | None = None):
    """Load an HF checkpoint folder for continual pre-training (see the module docstring).

    ``nsp=True`` needs an NSP head in the checkpoint (``cls.seq_relationship``); otherwise ValueError.
    ``databin``: when given, the vocabulary is checked against its tokenizer (:func:`check_vocab`).
    """
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForPreTraining

    path = Path(path)
    if not (path / "config.json").exists():
        raise ValueError(f"--model.init_from={str(path)!r}: no config.json there — expected a HuggingFace model folder")
    config = AutoConfig.from_pretrained(str(path))
    if databin is not None:
        check_vocab(path, config, databin)
    if nsp and not _has_nsp_head(path, config):
        raise ValueError(
            f"--model.init_from={str(path)!r} has no next-sentence-prediction head (no cls.seq_relationship weights); "
            "continue with MLM only (--data.nsp=false) or start from a checkpoint that has one"
        )
    kw = {}
    if dropout is not None:
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if hasattr(config, key):
                kw[key] = dropout
    auto = AutoModelForPreTraining if nsp else AutoModelForMaskedLM
    model, info = auto.from_pretrained(str(path), output_loading_info=True, **kw)
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
    if out is None:
        return
    tie = getattr(model.config, "tie_word_embeddings", True)
    if tie and out.weight.data_ptr() != inp.weight.data_ptr():
        raise ValueError(f"{type(model).__name__}: the LM decoder is not tied to the word embeddings although "
                         "config.tie_word_embeddings is true")


def build_model(*, databin, preset: str = "base", init_from: str = "", nsp: bool = True, perturb_at: str = "word",
                dropout: float | None = None, pad_vocab_to_multiple_of: int = 1,
                max_position_embeddings: int = 512) -> "PretrainModel":
    """The model of a run: from scratch (``init_from=""``) with ``preset``, or continual from ``init_from``."""
    if init_from:
        hf = load_continual_model(init_from, nsp=nsp, databin=databin, dropout=dropout)
    else:
        hf = build_scratch_model(preset, databin.vocab_size, databin.special_ids["pad"], nsp=nsp,
                                 max_position_embeddings=max_position_embeddings,
                                 pad_vocab_to_multiple_of=pad_vocab_to_multiple_of, dropout=dropout)
    return PretrainModel(hf, perturb_at=perturb_at)


# --------------------------------------------------------------------------------------------------
# The wrapper the ALUM step drives
# --------------------------------------------------------------------------------------------------


class PretrainModel(nn.Module):
    """``embed`` + ``heads_from_embeds`` around an HF masked-LM / pre-training model.

    ``masked_index`` (both methods): either a (B, T) bool mask of the positions to predict, or a 1-D
    LongTensor of flat positions into B*T (``(labels.view(-1) != -100).nonzero().squeeze(1)``). The MLM
    logits come back in row-major order of those positions, i.e. aligned with ``labels[labels != -100]``.

    Fast path (BERT ``cls.predictions``, RoBERTa/XLM-R ``lm_head``): the encoder runs once, its hidden
    states are gathered at the masked positions, and only those N rows go through the LM head. Unknown
    architectures fall back to the full HF forward and a gather of the full logits (correct, slower; one
    warning).
    """

    def __init__(self, hf_model: nn.Module, perturb_at: str = "word"):
        super().__init__()
        if perturb_at not in PERTURB_AT:
            raise ValueError(f"--alum.perturb_at={perturb_at!r}: choose one of {PERTURB_AT}")
        self.hf = hf_model
        self.perturb_at = perturb_at
        config = hf_model.config
        self.config = config
        base = getattr(hf_model, "base_model", None)
        self._base_name = getattr(hf_model, "base_model_prefix", "")
        if base is None or base is hf_model or not hasattr(base, "embeddings"):
            raise ValueError(f"{type(hf_model).__name__}: no base model with an `embeddings` module; "
                             "PretrainModel needs an encoder-only HF model (BERT, RoBERTa, XLM-R, ...)")
        # LM head on hidden states (N, H) -> (N, V), and the NSP head on the pooled [CLS].
        self._lm_head = None
        self._nsp_head = None
        cls = getattr(hf_model, "cls", None)
        if cls is not None and hasattr(cls, "predictions"):  # BertForPreTraining / BertForMaskedLM
            self._lm_head = cls.predictions
            self._nsp_head = getattr(cls, "seq_relationship", None)
        elif isinstance(getattr(hf_model, "lm_head", None), nn.Module) and config.model_type in (
                _PADDING_POSITION_TYPES | {"bert"}):
            self._lm_head = hf_model.lm_head  # RobertaLMHead: dense -> gelu -> LN -> decoder
        self.fast = self._lm_head is not None
        self._warned = False
        self._type_vocab = int(getattr(config, "type_vocab_size", 2) or 1)
        self._padding_positions = config.model_type in _PADDING_POSITION_TYPES
        self._override: torch.Tensor | None = None
        if perturb_at == "embedding_output":
            self.base.embeddings.register_forward_hook(self._replace_embedding_output)

    # HF submodules (not registered twice: properties, not attributes)
    @property
    def base(self) -> nn.Module:
        return self.hf.base_model

    @property
    def has_nsp(self) -> bool:
        return self._nsp_head is not None and getattr(self.base, "pooler", None) is not None

    def word_embeddings(self) -> nn.Embedding:
        return self.hf.get_input_embeddings()

    def _replace_embedding_output(self, module, args, output):
        return self._override if self._override is not None else output

    def _token_types(self, token_type_ids: torch.Tensor | None) -> torch.Tensor | None:
        # Models with one segment type (RoBERTa) have no segment B embedding: feed zeros.
        if token_type_ids is not None and self._type_vocab < 2:
            return None
        return token_type_ids

    def _position_ids(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        # RoBERTa numbers positions from padding_idx + 1 and gives padding the padding_idx; with inputs_embeds
        # HF cannot see the padding and numbers every position, so pass the ids HF would derive from input_ids.
        if not self._padding_positions or attention_mask is None:
            return None
        pad = int(self.config.pad_token_id)
        m = attention_mask.long()
        return torch.cumsum(m, dim=1) * m + pad  # (B, T)

    # -- the two halves ---------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The perturbation point: (B, T) ids -> (B, T, H) (see the module docstring for ``perturb_at``)."""
        if self.perturb_at == "word":
            return self.word_embeddings()(input_ids)  # (B, T, H)
        attention_mask = input_ids.ne(int(self.config.pad_token_id)) if self._padding_positions else None
        emb = self.base.embeddings
        kw = dict(token_type_ids=self._token_types(token_type_ids), position_ids=self._position_ids(attention_mask))
        accepted = inspect.signature(emb.forward).parameters
        kw = {k: v for k, v in kw.items() if v is not None and k in accepted}
        return emb(input_ids=input_ids, **kw)  # (B, T, H)

    def _model_mask(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The attention mask handed to HF, built so that HF never reads it on the host.

        With a 2-D mask and SDPA attention, HF checks ``padding_mask.all()`` in every forward to decide
        whether it may drop the mask - a device->host synchronisation per forward (1 per standard step,
        K + 2 per ALUM step) that stalls the CPU's kernel queue on a GPU.  A 4-D mask is passed through
        as-is, so the (B, 1, T, T) boolean mask SDPA would build from the 2-D one is handed over directly
        (an expanded view: no memory).  Other attention implementations keep the 2-D mask."""
        if (attention_mask is None or attention_mask.dim() != 2
                or getattr(self.config, "_attn_implementation", None) != "sdpa"):
            return attention_mask
        B, T = attention_mask.shape
        return attention_mask.bool()[:, None, None, :].expand(B, 1, T, T)  # True = attend

    def _encode(self, embeds, attention_mask, token_type_ids):
        kw = dict(attention_mask=self._model_mask(attention_mask), token_type_ids=self._token_types(token_type_ids),
                  position_ids=self._position_ids(attention_mask))
        if self.perturb_at == "word":
            return self.base(inputs_embeds=embeds, **kw)
        # embedding_output: the hook swaps the embeddings module's output for `embeds`.
        self._override = embeds
        try:
            return self.base(inputs_embeds=embeds, **kw)
        finally:
            self._override = None

    @staticmethod
    def _flat_index(masked_index: torch.Tensor, B: int, T: int) -> torch.Tensor:
        if masked_index.dtype == torch.bool:
            if masked_index.shape != (B, T):
                raise ValueError(f"masked_index bool mask has shape {tuple(masked_index.shape)}, expected {(B, T)}")
            return masked_index.reshape(-1).nonzero().squeeze(1)  # (N,)
        return masked_index.reshape(-1)

    def heads_from_embeds(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                          token_type_ids: torch.Tensor | None, masked_index: torch.Tensor,
                          need_nsp: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encoder + heads from ``embeds`` (B, T, H) -> (mlm_logits (N, V), nsp_logits (B, 2) or None)."""
        B, T, H = embeds.shape
        if need_nsp and not self.has_nsp and self.fast:
            raise ValueError(f"{type(self.hf).__name__} has no NSP head; set --data.nsp=false")
        idx = self._flat_index(masked_index, B, T)  # (N,)
        if not self.fast:
            return self._fallback(embeds, attention_mask, token_type_ids, idx, need_nsp)
        out = self._encode(embeds, attention_mask, token_type_ids)
        hidden = out.last_hidden_state  # (B, T, H)
        picked = hidden.reshape(B * T, H).index_select(0, idx)  # (N, H) — the LM head sees only these rows
        mlm_logits = self._lm_head(picked)  # (N, V)
        nsp_logits = None
        if need_nsp:
            pooled = out.pooler_output  # (B, H) tanh(W h_[CLS])
            nsp_logits = self._nsp_head(pooled)  # (B, 2)
        return mlm_logits, nsp_logits

    def _fallback(self, embeds, attention_mask, token_type_ids, idx, need_nsp):
        if not self._warned:
            log.warning("%s: no masked-only LM head path for this architecture; running the full HF forward and "
                        "gathering the masked positions (correct, slower)", type(self.hf).__name__)
            self._warned = True
        kw = dict(attention_mask=self._model_mask(attention_mask), token_type_ids=self._token_types(token_type_ids),
                  position_ids=self._position_ids(attention_mask))
        accepted = inspect.signature(self.hf.forward).parameters
        kw = {k: v for k, v in kw.items() if v is not None and k in accepted}  # e.g. DistilBERT: no token types
        if self.perturb_at == "word":
            out = self.hf(inputs_embeds=embeds, **kw)
        else:
            self._override = embeds
            try:
                out = self.hf(inputs_embeds=embeds, **kw)
            finally:
                self._override = None
        logits = out.prediction_logits if hasattr(out, "prediction_logits") else out.logits  # (B, T, V)
        mlm_logits = logits.reshape(-1, logits.shape[-1]).index_select(0, idx)  # (N, V)
        nsp_logits = None
        if need_nsp:
            nsp_logits = getattr(out, "seq_relationship_logits", None)
            if nsp_logits is None:
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


def load_hf_model(directory: str | os.PathLike):
    """The HF model class named in ``config.json`` (ForPreTraining -> AutoModelForPreTraining, else MLM)."""
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForPreTraining

    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise ValueError(f"{directory}: no config.json — not a model folder written by save_model")
    config = AutoConfig.from_pretrained(str(directory))
    archs = getattr(config, "architectures", None) or []
    auto = AutoModelForPreTraining if any(a.endswith("ForPreTraining") for a in archs) else AutoModelForMaskedLM
    model, info = auto.from_pretrained(str(directory), output_loading_info=True)
    if info.get("missing_keys") or info.get("mismatched_keys"):
        raise ValueError(f"{directory}: incomplete model folder — missing {sorted(info.get('missing_keys', []))[:5]}, "
                         f"mismatched {info.get('mismatched_keys', [])[:5]}")
    return model


def load_model(directory: str | os.PathLike, perturb_at: str = "word") -> PretrainModel:
    """Inverse of :func:`save_model`: a :class:`PretrainModel` around the saved HF model."""
    return PretrainModel(load_hf_model(directory), perturb_at=perturb_at)


__all__ = [
    "PRESETS",
    "PERTURB_AT",
    "PretrainModel",
    "build_model",
    "build_scratch_model",
    "check_vocab",
    "load_continual_model",
    "load_hf_model",
    "load_model",
    "save_model",
]
