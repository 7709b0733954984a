"""alum-prep's ``manifest.json``: what the data-bin holds, how it was made, and how far a run got.

The manifest records the command, the result-changing options and the inputs (their ``fingerprint``
decides whether a re-run resumes or is refused), the tokenizer, the encoding engine of the last run
(:func:`encoding_record`), every segment's counters and part files,
and every shard's files with their sizes and SHA-256.  It is rewritten atomically after each step, so a
killed run leaves the last consistent state.  :func:`read_existing_manifest` is the one place that reads
an existing manifest back (to resume).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
from pathlib import Path

import numpy as np

from alum_pretrain.atomic import atomic_file, write_bytes, write_json
from alum_pretrain.data.databin import FORMAT_VERSION, MANIFEST, load_manifest  # noqa: F401  (FORMAT_VERSION re-exported)
from alum_pretrain.integrity import sha256_file

from .config import PrepConfig

SPLITS = ("train", "valid")
DROP_REASONS = ("empty", "too_short", "duplicate", "no_tokens", "redirect", "non_article_page", "garbled")


def write_manifest(out: Path, manifest: dict) -> None:
    write_json(out / MANIFEST, manifest, durable=True)


def read_existing_manifest(out: Path) -> dict:
    """The manifest of an earlier run in ``out``; ``{}`` when it is missing or unreadable (never resumed)."""
    try:
        return load_manifest(out)
    except (OSError, ValueError):
        return {}


def fingerprint(cfg: PrepConfig, files: list[Path]) -> tuple[str, list[dict], dict]:
    """-> (fingerprint, input records, tokenizer source record) of a run with ``cfg`` on ``files``."""
    inputs = []
    it = files
    if cfg.progress and sum(f.stat().st_size for f in files) > (64 << 20):
        from tqdm import tqdm

        it = tqdm(files, desc="hashing inputs", unit="file", file=sys.stderr)
    for f in it:
        try:
            digest = sha256_file(f)
        except OSError as e:  # a read error (bad disk, vanished network file) names the file
            raise OSError(e.errno, f"{f}: cannot be read ({e.strerror or e})") from None
        inputs.append({"path": str(f.resolve()), "bytes": f.stat().st_size, "sha256": digest})
    tok_src = {}
    for name in ("vocab", "spm_model", "tokenizer_json"):
        v = getattr(cfg, name)
        if v is not None and Path(v).is_file():
            tok_src = {"path": str(Path(v).resolve()), "sha256": sha256_file(Path(v))}
    blob = json.dumps({"format_version": FORMAT_VERSION, "options": cfg.result_options(), "tokenizer_source": tok_src,
                       "inputs": [(i["bytes"], i["sha256"]) for i in inputs]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest(), inputs, tok_src


def file_record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def verify_files(folder: Path, files: dict) -> str | None:
    """None when every recorded file exists with its size and hash, else what is wrong."""
    for name, rec in files.items():
        p = folder / name
        if not p.exists():
            return f"{p} missing"
        if p.stat().st_size != rec["bytes"]:
            return f"{p} has {p.stat().st_size} bytes, the manifest says {rec['bytes']}"
        if sha256_file(p) != rec["sha256"]:
            return f"{p} content differs from the manifest (sha256)"
    return None


def split_files(split: str) -> list[str]:
    return [f"{split}.bin", f"{split}.idx", f"{split}.doc.npy"]


def save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_file(path, durable=True) as tmp, open(tmp, "wb") as fh:
        np.save(fh, arr)


def failed_start(old: dict) -> bool:
    """True when a parsed manifest belongs to a run that completed nothing and is not running now (its
    process, recorded in ``owner``, is gone from this host).  A run recorded on another host is never
    assumed gone; a live one on this host is an error."""
    if not old.get("fingerprint") or old.get("status") == "complete":
        return False
    if any(r.get("status") == "complete" for r in old.get("segments", {}).values()):
        return False
    if any(s.get("status") == "complete" for s in old.get("shards", [])):
        return False
    owner = old.get("owner") or {}
    if not isinstance(owner.get("pid"), int) or owner["pid"] == os.getpid() and owner.get("host") == socket.gethostname():
        return True  # written by this process (a caught interrupt) or by a version that did not record it
    if owner.get("host") != socket.gethostname():  # cannot tell whether it still runs: only --overwrite
        return False
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    raise ValueError(f"another alum-prep (pid {owner['pid']}) seems to be writing this folder; wait for it or "
                     "stop it, or choose another --out")


def shard_dicts(out: Path, num_shards: int) -> None:
    """Put a copy of ``OUT/dict.txt`` in every ``OUT/shardK/`` folder (atomically).

    Stock fairseq tasks (``masked_lm``) load the dictionary from the *first* path of a colon-separated
    ``DATA=OUT/shard0:OUT/shard1:...`` list, so each shard must be a complete fairseq data folder on its
    own.  A copy (not a link) keeps that true after ``cp -r``, ``rsync`` or copying a single shard.
    Copies that already match the root file are left alone.
    """
    data = (out / "dict.txt").read_bytes()
    for k in range(num_shards):
        dst = out / f"shard{k}" / "dict.txt"
        if dst.is_file() and not dst.is_symlink() and dst.read_bytes() == data:
            continue
        write_bytes(dst, data, durable=True)


def encoding_record(choice: dict) -> dict:
    """The manifest's ``encoding``: the engine that encoded the data-bin's tokens and why it was chosen
    (``choice`` from :meth:`data_prep.engines.IdentityCheck.decide`).  The ids are HF ``tokenizers``' ids either way."""
    keep = ("engine", "requested", "reason", "sample_sentences", "kitoken_version", "source")
    return {k: choice[k] for k in keep if k in choice}
