"""A run's identity: the fingerprint of the data-bin and tokenizer it was trained on.

:func:`data_identity` is written into every checkpoint (``train_state.pt["identity"]``) and into
``RUN/identity.json``; the tokenizer itself is copied into ``RUN/tokenizer/`` when the run starts, so a
data-bin moved, deleted or re-prepared later cannot change what the run's ids mean.  Every consumer
compares fingerprints, never paths: resume refuses a data-bin or tokenizer that differs
(:func:`check_same_identity`), ``alum-export`` ships ``RUN/tokenizer/`` and refuses a ``--tokenizer`` whose
vocabulary differs (:func:`check_same_vocabulary`).

The fingerprint::

    manifest_sha256   SHA-256 of the data-bin's manifest.json content (what it holds: shards and their
                      files' sizes and SHA-256, splits, id offset, tokenizer record, the prep fingerprint;
                      not who wrote it or when)
    tokenizer_sha256  SHA-256 over the tokenizer folder's files (names and contents)
    vocab_size, special_ids, id_offset   from the manifest

:func:`validate_databin` checks a manifest against what it describes before training starts: special ids
inside the vocabulary and equal to the tokenizer's, the vocabulary size equal to the tokenizer's, and the
token ids of the shard files inside ``[0, vocab_size)``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable


__all__ = ["IDENTITY_FIELDS", "IDENTITY_FILE", "RUN_TOKENIZER", "TOKENIZER_FILES", "VOCABULARY_FIELDS",
           "check_same_identity", "check_same_vocabulary", "copy_run_tokenizer", "data_identity", "describe",
           "has_tokenizer", "manifest_sha256", "read_tokenizer_files", "record_identity", "tokenizer_sha256",
           "validate_databin"]

IDENTITY_FILE = "identity.json"  # RUN/identity.json
RUN_TOKENIZER = "tokenizer"  # RUN/tokenizer/
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                   "sentencepiece.bpe.model", "spiece.model", "special_tokens_map.json", "added_tokens.json")
# manifest keys that say who wrote the data-bin, when and how far it got, not what it holds
_VOLATILE = ("owner", "command", "status", "started", "finished", "elapsed_s", "timings", "host", "segments",
             "hygiene", "progress")


def has_tokenizer(d: str | os.PathLike | None) -> bool:
    return d is not None and Path(d).is_dir() and any(
        (Path(d) / f).is_file() for f in ("tokenizer.json", "vocab.txt", "vocab.json", "sentencepiece.bpe.model",
                                          "spiece.model"))


def manifest_sha256(manifest: dict) -> str:
    content = {k: v for k, v in manifest.items() if k not in _VOLATILE}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def tokenizer_sha256(d: str | os.PathLike) -> str:
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        p = Path(d) / name
        if p.is_file():
            h.update(name.encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def read_tokenizer_files(d: str | os.PathLike) -> dict[str, bytes]:
    """The tokenizer files of ``d`` (:data:`TOKENIZER_FILES` that exist) as ``{name: content}``: what
    :func:`tokenizer_sha256` hashes, small enough (~1 MB) to travel inside a checkpoint."""
    return {name: (Path(d) / name).read_bytes() for name in TOKENIZER_FILES if (Path(d) / name).is_file()}


def data_identity(databin, tokenizer_dir: str | os.PathLike | None) -> dict[str, Any]:
    """The fingerprint of ``databin`` (a :class:`~alum_pretrain.data.databin.DataBin`) and its tokenizer."""
    return {"manifest_sha256": manifest_sha256(databin.manifest),
            "tokenizer_sha256": tokenizer_sha256(tokenizer_dir) if has_tokenizer(tokenizer_dir) else None,
            "vocab_size": int(databin.vocab_size), "id_offset": int(databin.id_offset),
            "special_ids": {k: int(v) for k, v in sorted(databin.special_ids.items())}}


def describe(identity: dict, where: str = "") -> str:
    tok = identity.get("tokenizer_sha256") or "none"
    return (f"{where + ': ' if where else ''}manifest sha256 {identity.get('manifest_sha256', '?')[:16]}, "
            f"tokenizer sha256 {tok[:16]}, vocab {identity.get('vocab_size')}, id offset "
            f"{identity.get('id_offset')}, special ids {identity.get('special_ids')}")


IDENTITY_FIELDS = ("manifest_sha256", "tokenizer_sha256", "vocab_size", "id_offset", "special_ids")
VOCABULARY_FIELDS = IDENTITY_FIELDS[1:]  # what gives the ids their meaning (not which corpus they encode)
_REMEDY = ("Point --data.path at the data-bin the run was trained on (re-prepare it with the run's tokenizer, "
           "RUN/tokenizer/, if it was replaced), or start a new run with another --train.output_dir")


def check_same_identity(saved: dict | None, now: dict, ckpt: str | os.PathLike, data_path: str, *,
                        fields: tuple[str, ...] = IDENTITY_FIELDS, data_flag: str = "--data.path",
                        remedy: str = _REMEDY) -> None:
    """ValueError naming both fingerprints unless the checkpoint's data-bin and tokenizer are ``now``'s.

    ``fields``: what must agree (:data:`VOCABULARY_FIELDS` when only the vocabulary matters, e.g. continual
    pre-training on another corpus); ``data_flag`` / ``remedy``: the calling command's spelling of the data
    flag and what to do.  A checkpoint written before fingerprints existed (``saved`` None) is not checked."""
    if not saved:
        return
    differ = [k for k in fields
              if saved.get(k) != now.get(k) and not (k == "tokenizer_sha256" and saved.get(k) is None)]
    if not differ:
        return
    raise ValueError(
        f"{ckpt}: cannot resume: the data-bin or tokenizer differs from the one this run was trained on "
        f"({', '.join(differ)} differ); its token ids would mean other words.\n"
        f"  trained on: {describe(saved)}\n  {data_flag} {data_path}: {describe(now)}\n{remedy}")


def check_same_vocabulary(run_tok: str | os.PathLike, other: str | os.PathLike) -> None:
    """ValueError unless the tokenizers in the two folders map every token to the same id."""
    from transformers import AutoTokenizer

    a = AutoTokenizer.from_pretrained(str(run_tok)).get_vocab()
    b = AutoTokenizer.from_pretrained(str(other)).get_vocab()
    if a != b:
        diff = sorted(set(a.items()) ^ set(b.items()))[:3]
        raise ValueError(f"--tokenizer {other}: its vocabulary differs from the one the checkpoint was trained "
                         f"with ({run_tok}: {len(a)} tokens, {other}: {len(b)} tokens; e.g. {diff}); the model "
                         "would read other words. Leave --tokenizer out to ship the run's own tokenizer")


def copy_run_tokenizer(src: str | os.PathLike, run_dir: str | os.PathLike) -> Path | None:
    """Copy the tokenizer files of ``src`` into ``RUN/tokenizer/`` (once: an existing copy is kept)."""
    from .atomic import atomic_dir

    dst = Path(run_dir) / RUN_TOKENIZER
    if has_tokenizer(dst) or not has_tokenizer(src):
        return dst if has_tokenizer(dst) else None
    with atomic_dir(dst, durable=True) as tmp:
        for name in TOKENIZER_FILES:
            if (Path(src) / name).is_file():
                (tmp / name).write_bytes((Path(src) / name).read_bytes())
    return dst


def record_identity(run_dir: str | os.PathLike, identity: dict, tokenizer_dir: str | os.PathLike) -> None:
    """``RUN/identity.json`` (the fingerprint, rewritten only when it changes) and ``RUN/tokenizer/``."""
    from .atomic import write_json

    path = Path(run_dir) / IDENTITY_FILE
    try:
        same = json.loads(path.read_text(encoding="utf-8")) == identity
    except (OSError, ValueError):
        same = False
    if not same:
        write_json(path, identity, durable=True)
    copy_run_tokenizer(tokenizer_dir, run_dir)


def _check_ids(ds, sample: int | None) -> None:
    """Token ids of one split inside ``[0, vocab_size)`` (an :class:`OffsetDataset`, which names the shard,
    split and item): every id (``sample`` None, one vectorised pass) or the first and last ``sample`` items."""
    n = len(ds)
    if sample is None:
        raw = ds.ds.all_tokens()
        step = 1 << 24  # bounded memory: 16M tokens at a time
        if all(int(raw[j:j + step].min()) >= ds.offset and int(raw[j:j + step].max()) - ds.offset < ds.vocab_size
               for j in range(0, raw.size, step)):
            return
        sample = n  # find and name the first bad item
    for i in (range(n) if n <= 2 * sample else [*range(sample), *range(n - sample, n)]):
        ds[i]  # raises DataIntegrityError naming the item


def validate_databin(databin, tokenizer, full: bool = False, log: Callable[[str], None] | None = None) -> None:
    """The manifest agrees with the tokenizer and the shard files (see the module docstring); ValueError."""
    m = databin.path / "manifest.json"
    V = databin.vocab_size
    bad = {k: v for k, v in databin.special_ids.items() if not 0 <= v < V}
    if bad:
        raise ValueError(f"{m}: special ids {bad} are outside the vocabulary [0, {V}); re-run alum-prep")
    if len(set(databin.special_ids.values())) != len(databin.special_ids):
        raise ValueError(f"{m}: two special tokens share an id ({databin.special_ids}); re-run alum-prep")
    if tokenizer is not None:
        if len(tokenizer) != V:
            raise ValueError(f"{m}: vocab_size {V}, but the tokenizer in {databin.tokenizer_dir} has "
                             f"{len(tokenizer)} tokens; the manifest or the tokenizer was changed: re-run alum-prep")
        for k, v in databin.special_ids.items():
            tid = getattr(tokenizer, f"{k}_token_id", None)
            if tid is not None and int(tid) != v:
                raise ValueError(f"{m}: special id {k}={v}, but the tokenizer's {k} token has id {tid}; the "
                                 "manifest or the tokenizer was changed: re-run alum-prep")
    for k in range(databin.num_shards):
        for split in ("train", "valid"):
            if databin.has_split(k, split):
                _check_ids(databin.split(k, split), None if full else 64)
    if log is not None:
        log(f"{databin.path}: manifest agrees with the tokenizer and the shard files' token ids")
