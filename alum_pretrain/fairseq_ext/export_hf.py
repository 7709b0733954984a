"""fairseq RoBERTa checkpoint (``checkpoint_*.pt``) -> HuggingFace ``RobertaForMaskedLM`` folder.

Used by ``alum-export CKPT.pt OUT`` (:mod:`alum_pretrain.export` dispatches fairseq ``.pt`` files
here).  Needs torch + transformers (+ omegaconf,
which fairseq checkpoints pickle); it does **not** import fairseq.

Why not transformers' ``convert_roberta_original_pytorch_checkpoint_to_pytorch.py``: it needs fairseq's
hub interface (broken on current fairseq: ``roberta.args``, ``emb_layer_norm`` renamed), hard-codes
``max_position_embeddings=514``, does not remap the dictionary and writes no tokenizer.  This exporter
reads the state dict directly through an explicit key map:

=====================================================================  ==========================================
fairseq (``encoder.sentence_encoder.`` = ``S.``)                       HF ``RobertaForMaskedLM``
=====================================================================  ==========================================
``S.embed_tokens.weight`` rows ``id_offset + i``                       ``roberta.embeddings.word_embeddings`` row i
``S.embed_positions.weight`` row ``1 + k`` (fairseq pad = 1)           ``...position_embeddings`` row ``p + k``
``S.layernorm_embedding`` (old name ``emb_layer_norm``)                ``roberta.embeddings.LayerNorm``
(none)                                                                 ``...token_type_embeddings`` = zeros (1, H)
``S.layers.L.self_attn.{q,k,v}_proj``                                  ``roberta.encoder.layer.L.attention.self.{query,key,value}``
``S.layers.L.self_attn.out_proj`` / ``self_attn_layer_norm``           ``...attention.output.dense`` / ``.LayerNorm``
``S.layers.L.fc1`` / ``fc2`` / ``final_layer_norm``                    ``...intermediate.dense`` / ``output.dense`` / ``output.LayerNorm``
``encoder.lm_head.{dense,layer_norm}``, ``.bias`` rows ``id_offset+i``  ``lm_head.{dense,layer_norm}``, ``lm_head.bias``
``encoder.lm_head.weight`` (tied unless ``--untie-weights-roberta``)   ``lm_head.decoder.weight``
``classification_heads.nsp.{dense,out_proj}``                          ``nsp_head.safetensors``: ``classifier.{dense,out_proj}``
=====================================================================  ==========================================

* **Dictionary remap.**  The data-bin's fairseq ids are ``tokenizer id + id_offset`` (``manifest.json``,
  4 = fairseq's ``<s> <pad> </s> <unk>``); the exported vocabulary is the tokenizer's, so row ``i`` of every
  vocabulary-sized tensor is fairseq row ``id_offset + i``.  fairseq-only rows (the four specials, the
  ``<mask>`` the task appends, ``madeupword`` padding) are dropped - the ``alum_masked_lm`` task frames
  sequences with the tokenizer's own ``[CLS]/[SEP]/[MASK]``, so no trained row is lost.
* **Positions.**  fairseq numbers positions from ``padding_idx + 1 = 2``; HF RoBERTa from
  ``pad_token_id + 1`` with the tokenizer's pad id ``p``.  The table is shifted so HF row ``p + k`` =
  fairseq row ``1 + k``; ``max_position_embeddings = p + 1 + max_positions`` (derived, not 514).
* **NSP head.**  HF has no RoBERTa NSP model.  The head (``dense -> tanh -> out_proj`` on the first
  token, the same structure as HF's ``RobertaClassificationHead``) is saved as ``nsp_head.safetensors``
  with HF key names: ``RobertaForSequenceClassification.from_pretrained(OUT, num_labels=2)`` then
  ``model.load_state_dict(safetensors.torch.load_file(OUT/'nsp_head.safetensors'), strict=False)``
  gives the NSP classifier (label 0 = B follows A, 1 = random B); ``nsp_head.json`` documents it.
* **Architecture limits.**  HF RoBERTa is post-LN with an embedding LayerNorm and unscaled embeddings:
  checkpoints with ``--encoder-normalize-before`` (pre-LN), no embedding LayerNorm or scaled embeddings
  are refused with a clear error.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from argparse import Namespace
from pathlib import Path
from typing import Any, Optional

import torch

from ..atomic import atomic_dir
from ..export_target import ExportTargetError, check_export_target, write_export_marker
from ..data.databin import FAIRSEQ_NSPECIAL, MANIFEST, DataBin
from ..model_card import model_card

log = logging.getLogger("alum_pretrain.fairseq_export")

FAIRSEQ_PAD = 1  # fairseq Dictionary: <s>=0 <pad>=1 </s>=2 <unk>=3
ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "gelu_accurate": "gelu_new", "tanh": "tanh"}
SE = "encoder.sentence_encoder."


class FairseqExportError(ValueError):
    pass


def _plain(obj: Any) -> Any:
    """OmegaConf DictConfig / argparse Namespace / dict -> plain dict (recursively for DictConfigs)."""
    if obj is None:
        return {}
    if isinstance(obj, Namespace):
        return dict(vars(obj))
    if isinstance(obj, dict):
        return obj
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(obj, DictConfig):
            return OmegaConf.to_container(obj, resolve=False)
    except ImportError:  # pragma: no cover - omegaconf is needed to unpickle these anyway
        pass
    return dict(obj)


# What fairseq 0.12 pickles into checkpoints besides tensors and plain containers: argparse.Namespace
# (pre-Hydra ``args``), OmegaConf containers and their node/metadata classes (Hydra ``cfg``), fairseq's
# config enums, NumPy scalars and arrays (meters and best scores in ``extra_state``).  Each entry is a
# class whose reconstruction only stores data; nothing else is unpickled without --trust-checkpoint.
FAIRSEQ_SAFE_GLOBALS = (
    "argparse.Namespace",
    "typing.Any",
    "omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig", "omegaconf.base.ContainerMetadata",
    "omegaconf.base.Metadata", "omegaconf.nodes.AnyNode", "omegaconf.nodes.StringNode",
    "omegaconf.nodes.IntegerNode", "omegaconf.nodes.FloatNode", "omegaconf.nodes.BooleanNode",
    "omegaconf.nodes.EnumNode", "omegaconf.nodes.BytesNode", "omegaconf.nodes.PathNode",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.dtype",
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray",
)
FAIRSEQ_SAFE_PREFIXES = ("numpy.dtypes.", "fairseq.dataclass.constants.")


def _fairseq_global_allowed(name: str) -> bool:
    return name in FAIRSEQ_SAFE_GLOBALS or name.startswith(FAIRSEQ_SAFE_PREFIXES)


def _resolve_global(name: str):
    import importlib

    mod, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError):
        return None


def load_checkpoint_state(path: str | os.PathLike, trust: bool = False) -> dict:
    """The raw dict of a fairseq checkpoint file (``model``, ``cfg``/``args``, optimizer state ...).

    Loaded by torch's weights-only unpickler with :data:`FAIRSEQ_SAFE_GLOBALS` allowed; a checkpoint that
    names any other global is refused (naming them) unless ``trust`` (``--trust-checkpoint``)."""
    path = Path(path)
    if not path.is_file():
        raise FairseqExportError(f"{path}: not a file (expected a fairseq checkpoint such as checkpoint_last.pt)")
    try:
        if trust:
            state = torch.load(path, map_location="cpu", weights_only=False)
        else:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            refused = sorted(n for n in names if not _fairseq_global_allowed(n))
            if refused:
                raise FairseqExportError(
                    f"{path}: refused to load: its pickle names {', '.join(refused[:5])}"
                    f"{' ...' if len(refused) > 5 else ''}, which is not among the classes fairseq checkpoints "
                    "hold (tensors, plain types, argparse.Namespace, OmegaConf configs, NumPy scalars); unpickling "
                    "it could run arbitrary code. If you trust the file, pass --trust-checkpoint")
            allowed = [g for g in (_resolve_global(n) for n in names) if g is not None]
            if any(n.startswith("numpy") for n in names):  # a pickled dtype names its DType class at load time
                import numpy as np

                allowed += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
            with torch.serialization.safe_globals(allowed):
                state = torch.load(path, map_location="cpu", weights_only=True)
    except FairseqExportError:
        raise
    except ModuleNotFoundError as e:
        raise FairseqExportError(f"{path}: unpickling needs {e.name!r} (fairseq checkpoints store OmegaConf "
                                 "configs); install the [fairseq] extra: pip install -e '.[fairseq]'") from e
    except Exception as e:
        raise FairseqExportError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}); the file is truncated or damaged") from e
    if not isinstance(state, dict) or "model" not in state:
        raise FairseqExportError(f"{path}: no 'model' entry - not a fairseq checkpoint")
    bad = next((k for k, v in state["model"].items()
                if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise FairseqExportError(f"{path}: weight {bad} holds NaN/Inf (the run diverged or the file is damaged); "
                                 "export an earlier checkpoint")
    return state


def load_checkpoint(path: str | os.PathLike, trust: bool = False) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """``(model state dict, model cfg dict, task cfg dict)`` of a fairseq checkpoint file."""
    return split_checkpoint(load_checkpoint_state(path, trust=trust), path)


def split_checkpoint(state: dict, path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """``(model state dict, model cfg dict, task cfg dict)`` of a loaded checkpoint ``state``."""
    cfg = state.get("cfg")
    if cfg is not None:
        cfg = _plain(cfg)
        model_cfg = _plain(cfg.get("model"))
        task_cfg = _plain(cfg.get("task"))
    else:  # pre-Hydra checkpoints keep an argparse Namespace under "args"
        args = _plain(state.get("args"))
        model_cfg, task_cfg = args, args
    if not model_cfg:
        raise FairseqExportError(f"{path}: the checkpoint has no model configuration ('cfg' or 'args')")
    sd = {upgrade_key(k): v for k, v in state["model"].items()}
    return sd, model_cfg, task_cfg


def upgrade_key(k: str) -> str:
    """Old fairseq RoBERTa names -> current ones (as RobertaModel.upgrade_state_dict_named does)."""
    if k.startswith("decoder."):
        k = "encoder." + k[len("decoder."):]
    return k.replace(".emb_layer_norm.", ".layernorm_embedding.")


def find_databin(task_cfg: dict, tokenizer: Optional[str]) -> tuple[Optional[Path], Path]:
    """``(data-bin root or None, tokenizer folder)`` from ``--tokenizer`` or the checkpoint's task data."""
    cands: list[Path] = []
    if tokenizer:
        t = Path(tokenizer)
        if (t / MANIFEST).exists() and (t / "tokenizer").is_dir():
            return t, t / "tokenizer"  # a data-bin root
        root = t.parent if (t.parent / MANIFEST).exists() else None
        return root, t
    data = str(task_cfg.get("data") or "")
    for p in data.split(os.pathsep):
        if p:
            cands += [Path(p), Path(p).parent]
    for c in cands:
        if (c / MANIFEST).exists() and (c / "tokenizer").is_dir():
            return c, c / "tokenizer"
    raise FairseqExportError(f"the checkpoint's data path {data!r} has no data-bin with manifest.json and tokenizer/ "
                             "(moved?); pass --tokenizer DATA_BIN (the alum-prep output folder)")


def checkpoint_tokenizer(state: dict, task_cfg: dict, tokenizer: Optional[str], scratch: Path
                         ) -> tuple[Path, Optional[Path], Optional[dict], int, int]:
    """``(tokenizer folder, data-bin root or None, recorded fingerprint or None, id_offset, vocab_size)``.

    A checkpoint of the ``alum_masked_lm`` task holds its tokenizer files and fingerprint
    (:mod:`alum_pretrain.fairseq_ext.identity`): they are written to ``scratch`` and shipped, whatever
    happened to the data-bin since; ``--tokenizer`` must then map every token to the same id.  Older
    checkpoints fall back to ``--tokenizer`` or the data-bin the checkpoint's task names."""
    from ..run_identity import check_same_vocabulary, tokenizer_sha256
    from .identity import IDENTITY_KEY, TOKENIZER_KEY

    ts = state.get("task_state") or {}
    identity, files = ts.get(IDENTITY_KEY), ts.get(TOKENIZER_KEY)
    if not (identity and files):
        root, tok_dir = find_databin(task_cfg, tokenizer)
        if not tok_dir.is_dir():
            raise FairseqExportError(f"{tok_dir}: tokenizer folder not found")
        if root is not None:
            databin = DataBin(root)
            return tok_dir, root, None, databin.id_offset, databin.vocab_size
        return tok_dir, None, None, FAIRSEQ_NSPECIAL, -1
    own = scratch / "tokenizer"
    own.mkdir(parents=True)
    for name, content in files.items():
        (own / Path(name).name).write_bytes(bytes(content))
    if identity.get("tokenizer_sha256") not in (None, tokenizer_sha256(own)):
        raise FairseqExportError("the checkpoint's tokenizer files do not match its recorded sha256; the file is "
                                 "damaged")
    tok_dir = own
    if tokenizer:
        other = find_databin({}, tokenizer)[1]
        try:
            check_same_vocabulary(own, other)
        except ValueError as e:
            raise FairseqExportError(str(e)) from None
        tok_dir = other
    return tok_dir, None, identity, int(identity["id_offset"]), int(identity["vocab_size"])


def _get(cfg: dict, key: str, default=None):
    v = cfg.get(key, default)
    return default if v is None else v


def convert_state_dict(sd: dict[str, torch.Tensor], model_cfg: dict, *, id_offset: int, vocab_size: int,
                       pad_token_id: int) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor]]:
    """fairseq RoBERTa state dict -> (HF RobertaForMaskedLM state dict, RobertaConfig kwargs, NSP head tensors)."""
    if _get(model_cfg, "encoder_normalize_before", False):
        raise FairseqExportError("the checkpoint is pre-LN (--encoder-normalize-before / roberta_prenorm); HF "
                                 "RobertaForMaskedLM is post-LN and cannot represent it")
    if not _get(model_cfg, "layernorm_embedding", True) or f"{SE}layernorm_embedding.weight" not in sd:
        raise FairseqExportError("the checkpoint has no embedding LayerNorm; HF RoBERTa always applies one")
    if not _get(model_cfg, "no_scale_embedding", True):
        raise FairseqExportError("the checkpoint scales token embeddings by sqrt(dim) (no_scale_embedding=False); "
                                 "HF RoBERTa does not")
    act = str(_get(model_cfg, "activation_fn", "gelu"))
    if act not in ACTIVATIONS:
        raise FairseqExportError(f"activation_fn {act!r} has no HF equivalent here (supported: {', '.join(ACTIVATIONS)})")
    need = [f"{SE}embed_tokens.weight", f"{SE}embed_positions.weight", "encoder.lm_head.dense.weight"]
    for k in need:
        if k not in sd:
            raise FairseqExportError(f"state dict has no {k!r}: not a fairseq RoBERTa (masked LM) checkpoint")
    emb = sd[f"{SE}embed_tokens.weight"]  # (V_fs, H)
    nrows, hidden = emb.shape
    if id_offset + vocab_size > nrows:
        raise FairseqExportError(f"the model's dictionary has {nrows} rows but the tokenizer needs rows "
                                 f"{id_offset}..{id_offset + vocab_size - 1}: wrong data-bin/tokenizer for this checkpoint")
    rows = slice(id_offset, id_offset + vocab_size)
    layers = sorted({int(k.split(".")[3]) for k in sd if k.startswith(f"{SE}layers.")})
    if layers != list(range(len(layers))) or not layers:
        raise FairseqExportError(f"unexpected encoder layer indices {layers}")
    heads = int(_get(model_cfg, "encoder_attention_heads", 0))
    if heads <= 0 or hidden % heads:
        raise FairseqExportError(f"encoder_attention_heads={heads} does not divide the hidden size {hidden}")

    # Positions: fairseq row 1 + k (k >= 1 real positions, k = 0 padding) -> HF row p + k.
    pos = sd[f"{SE}embed_positions.weight"]  # (max_positions + 2, H)
    max_positions = pos.shape[0] - (FAIRSEQ_PAD + 1)
    p = int(pad_token_id)
    hf_pos = torch.zeros(p + 1 + max_positions, hidden, dtype=pos.dtype)
    hf_pos[p:p + max_positions + 1] = pos[FAIRSEQ_PAD:FAIRSEQ_PAD + max_positions + 1]

    out: dict[str, torch.Tensor] = {
        "roberta.embeddings.word_embeddings.weight": emb[rows].clone(),
        "roberta.embeddings.position_embeddings.weight": hf_pos,
        "roberta.embeddings.token_type_embeddings.weight": torch.zeros(1, hidden, dtype=emb.dtype),
        "roberta.embeddings.LayerNorm.weight": sd[f"{SE}layernorm_embedding.weight"],
        "roberta.embeddings.LayerNorm.bias": sd[f"{SE}layernorm_embedding.bias"],
    }
    lmap = {
        "self_attn.q_proj": "attention.self.query",
        "self_attn.k_proj": "attention.self.key",
        "self_attn.v_proj": "attention.self.value",
        "self_attn.out_proj": "attention.output.dense",
        "self_attn_layer_norm": "attention.output.LayerNorm",
        "fc1": "intermediate.dense",
        "fc2": "output.dense",
        "final_layer_norm": "output.LayerNorm",
    }
    for i in layers:
        for fs, hf in lmap.items():
            for wb in ("weight", "bias"):
                key = f"{SE}layers.{i}.{fs}.{wb}"
                if key not in sd:
                    raise FairseqExportError(f"state dict has no {key!r}")
                out[f"roberta.encoder.layer.{i}.{hf}.{wb}"] = sd[key]
    for fs, hf in (("dense", "dense"), ("layer_norm", "layer_norm")):
        for wb in ("weight", "bias"):
            out[f"lm_head.{hf}.{wb}"] = sd[f"encoder.lm_head.{fs}.{wb}"]
    out["lm_head.bias"] = sd["encoder.lm_head.bias"][rows].clone()
    tied = not _get(model_cfg, "untie_weights_roberta", False)
    lm_w = sd.get("encoder.lm_head.weight", emb)
    if tied and not torch.equal(lm_w, emb):
        raise FairseqExportError("untie_weights_roberta is False but lm_head.weight differs from embed_tokens")
    out["lm_head.decoder.weight"] = lm_w[rows].clone()

    nsp = {}
    pre = "classification_heads.nsp."
    if f"{pre}dense.weight" in sd:
        for fs in ("dense", "out_proj"):
            for wb in ("weight", "bias"):
                nsp[f"classifier.{fs}.{wb}"] = sd[f"{pre}{fs}.{wb}"].clone()

    config = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=len(layers),
        num_attention_heads=heads,
        intermediate_size=sd[f"{SE}layers.0.fc1.weight"].shape[0],
        hidden_act=ACTIVATIONS[act],
        hidden_dropout_prob=float(_get(model_cfg, "dropout", 0.1)),
        attention_probs_dropout_prob=float(_get(model_cfg, "attention_dropout", 0.1)),
        max_position_embeddings=p + 1 + max_positions,
        type_vocab_size=1,
        layer_norm_eps=1e-5,  # fairseq LayerNorm default
        pad_token_id=p,
        tie_word_embeddings=tied,
    )
    return out, config, nsp


def export_fairseq(ckpt: str | os.PathLike, out: str | os.PathLike, *, tokenizer: Optional[str] = None,
                   overwrite: bool = False, trust: bool = False) -> Path:
    """Write the HF folder OUT for the fairseq checkpoint CKPT; returns OUT."""
    out = Path(out)
    try:
        check_export_target(out, ckpt, overwrite)  # (before anything is loaded or written)
    except ExportTargetError as e:
        raise FairseqExportError(str(e)) from e
    state = load_checkpoint_state(ckpt, trust=trust)
    scratch = Path(tempfile.mkdtemp(prefix="alum-export-"))  # the checkpoint's own tokenizer, until saved
    try:
        return _export(ckpt, out, state, tokenizer, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _export(ckpt, out: Path, state: dict, tokenizer: Optional[str], scratch: Path) -> Path:
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, RobertaConfig, RobertaForMaskedLM

    sd, model_cfg, task_cfg = split_checkpoint(state, ckpt)
    tok_dir, root, identity, id_offset, vocab_size = checkpoint_tokenizer(state, task_cfg, tokenizer, scratch)
    tok = AutoTokenizer.from_pretrained(str(tok_dir), model_input_names=["input_ids", "attention_mask"])
    if vocab_size < 0:
        vocab_size = len(tok)
        log.warning("no %s beside %s: assuming id_offset=%d (fairseq id = tokenizer id + %d)", MANIFEST, tok_dir,
                    id_offset, id_offset)
    if tok.pad_token_id is None:
        raise FairseqExportError(f"tokenizer {tok_dir} has no pad token; HF RoBERTa needs one for positions")
    if task_cfg.get("_name") == "masked_lm":
        log.warning("checkpoint trained with fairseq's --task masked_lm: it used fairseq's <s>/</s>/<mask> rows, "
                    "which are dropped; the tokenizer's [CLS]/[SEP]/[MASK] rows were never trained")
    hf_sd, config_kw, nsp = convert_state_dict(sd, model_cfg, id_offset=id_offset, vocab_size=vocab_size,
                                               pad_token_id=tok.pad_token_id)
    config = RobertaConfig(bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                           architectures=["RobertaForMaskedLM"], **config_kw)
    model = RobertaForMaskedLM(config)
    missing, unexpected = model.load_state_dict(hf_sd, strict=False)
    missing = [k for k in missing if k not in ("lm_head.decoder.bias", "roberta.embeddings.position_ids")]
    if config.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.decoder.weight"]
    if missing or unexpected:
        raise FairseqExportError(f"key map incomplete: missing {missing}, unexpected {unexpected}")
    model.eval()
    tok.model_max_length = config.max_position_embeddings - tok.pad_token_id - 1

    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        if nsp:
            save_file({k: v.contiguous() for k, v in nsp.items()}, str(tmp / "nsp_head.safetensors"))
            (tmp / "nsp_head.json").write_text(json.dumps({
                "what": "next-sentence-prediction head of the fairseq 'nsp' classification head",
                "load": "RobertaForSequenceClassification.from_pretrained(OUT, num_labels=2); "
                        "model.load_state_dict(safetensors.torch.load_file('nsp_head.safetensors'), strict=False)",
                "input": "tokenizer(sentence_a, sentence_b) -> [CLS] A [SEP] B [SEP]",
                "labels": {"0": "B follows A", "1": "B is a random segment"},
                "activation": str(_get(model_cfg, "pooler_activation_fn", "tanh")),
            }, indent=2) + "\n", encoding="utf-8")
        data = str(root) if root is not None else str(task_cfg.get("data") or "")
        card = model_card(model, {"data": {"path": data}, "train": {"engine": "fairseq"}},
                          step=None, run=None, source=f"the fairseq checkpoint `{Path(ckpt).name}`")
        card += (f"\nFairseq token id = tokenizer id + {id_offset}; max positions {tok.model_max_length}."
                 + (" NSP head: `nsp_head.safetensors` (see `nsp_head.json`)." if nsp else "") + "\n")
        (tmp / "README.md").write_text(card, encoding="utf-8")
        write_export_marker(tmp, str(ckpt), engine="fairseq", trained_on=identity,
                            tokenizer_from=str(tok_dir) if tokenizer or identity is None else f"{ckpt} (task_state)")
    log.info("exported fairseq checkpoint %s -> %s (RobertaForMaskedLM%s)", ckpt, out, " + NSP head" if nsp else "")
    return out
