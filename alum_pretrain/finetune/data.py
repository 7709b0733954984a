"""Reading GLUE-style TSV and JSON-lines files into examples, tokenising them and batching.

TSV: the GLUE layouts (a header row naming the columns, tab-separated, no quoting - GLUE text contains
bare quotes), or header-less files for tasks that ship them (CoLA train/dev: ``source, label, mark,
sentence``).  JSONL: one JSON object per line with the fields named by the task spec (override them
with ``--data.text_a_field/--data.text_b_field/--data.label_field``).  Label values are matched as
strings against the task's label list (``0``/``1`` for SST-2, ``entailment``/``not_entailment`` for RTE
...); an unknown label is an error naming the file, the line and the allowed values.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from ..integrity import sha256_file
from .tasks import TaskSpec

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


@dataclass
class Example:
    text_a: str
    text_b: Optional[str]
    label: Optional[float | int]  # class id, float target (regression) or None (unlabelled)
    line: int                     # 1-based line number in the source file (for messages/predictions)


def _detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return "jsonl" if path.suffix.lower() in (".jsonl", ".json", ".ndjson") else "tsv"


def _convert_label(raw, spec: TaskSpec, where: str):
    if raw is None or (isinstance(raw, str) and raw.strip() == ""):
        return None
    if spec.is_regression:
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: label {raw!r} is not a number (task {spec.name} is a regression)") from None
    key = str(raw).strip()
    if isinstance(raw, float) and raw.is_integer():
        key = str(int(raw))
    if key not in spec.labels:
        raise ValueError(f"{where}: label {key!r} is not one of {list(spec.labels)} "
                         f"(fix the file or set --data.labels / --data.label_field)")
    return spec.labels.index(key)


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of every non-blank line of a JSON-lines file; ValueError naming the file
    and line for a line that is not JSON, or naming the file for bytes that are not UTF-8."""
    with open(path, encoding="utf-8", errors="strict") as fh:
        try:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{i}: not valid JSON ({exc.msg})") from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def read_examples(path: str | Path, spec: TaskSpec, *, fmt: str = "auto", require_labels: bool = True,
                  limit: int = 0) -> list[Example]:
    """All examples of ``path`` (``limit`` > 0: the first ``limit``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {path} not found")
    fmt = _detect_format(path, fmt)
    if fmt == "jsonl":
        return _jsonl_examples(path, spec, require_labels, limit)
    if fmt != "tsv":
        raise ValueError(f"--data.format={fmt!r}: use auto, tsv or jsonl")
    return _tsv_examples(path, spec, require_labels, limit)


def _jsonl_examples(path: Path, spec: TaskSpec, require_labels: bool, limit: int) -> list[Example]:
    out: list[Example] = []
    for i, obj in read_jsonl(path):
        if not isinstance(obj, dict) or spec.text_a not in obj:
            raise ValueError(f"{path}:{i}: missing field {spec.text_a!r} "
                             f"(set --data.text_a_field; fields here: {list(obj) if isinstance(obj, dict) else '-'})")
        if spec.text_b and spec.text_b not in obj:
            raise ValueError(f"{path}:{i}: missing field {spec.text_b!r} (set --data.text_b_field)")
        label = _convert_label(obj.get(spec.label), spec, f"{path}:{i}")
        if require_labels and label is None:
            raise ValueError(f"{path}:{i}: no label in field {spec.label!r} (set --data.label_field)")
        out.append(Example(str(obj[spec.text_a]), str(obj[spec.text_b]) if spec.text_b else None, label, i))
        if limit and len(out) >= limit:
            break
    return out


def _tsv_examples(path: Path, spec: TaskSpec, require_labels: bool, limit: int) -> list[Example]:
    out: list[Example] = []
    with open(path, encoding="utf-8", newline="") as fh:
        rows = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        first = next(rows, None)
        if first is None:
            raise ValueError(f"{path}: empty file")
        if spec.text_a in first:
            ia = first.index(spec.text_a)
            ib = None
            if spec.text_b:
                if spec.text_b not in first:
                    raise ValueError(f"{path}:1: header {first} has no column {spec.text_b!r} (set --data.text_b_field)")
                ib = first.index(spec.text_b)
            il = first.index(spec.label) if spec.label in first else None
            body_start, pending = 2, []
        elif spec.headerless_columns is not None:
            ia, ib, il = spec.headerless_columns
            body_start, pending = 1, [first]
        else:
            raise ValueError(f"{path}:1: header {first} has no column {spec.text_a!r} (task {spec.name}); "
                             "set --data.text_a_field/--data.text_b_field/--data.label_field or --data.task")
        if il is None and require_labels:
            raise ValueError(f"{path}:1: header {first} has no label column {spec.label!r} "
                             "(unlabelled files can only be used for prediction)")

        def rows_iter():
            yield from pending
            yield from rows

        for i, row in enumerate(rows_iter(), body_start):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            need = max(c for c in (ia, ib, il) if c is not None)
            if len(row) <= need:
                raise ValueError(f"{path}:{i}: {len(row)} columns, expected at least {need + 1} "
                                 "(GLUE TSV: tab-separated, no quoting)")
            label = _convert_label(row[il], spec, f"{path}:{i}") if il is not None else None
            if require_labels and label is None:
                raise ValueError(f"{path}:{i}: empty label")
            out.append(Example(row[ia], row[ib] if ib is not None else None, label, i))
            if limit and len(out) >= limit:
                break
    return out


@dataclass
class Encoded:
    input_ids: list[list[int]]
    token_type_ids: Optional[list[list[int]]]
    labels: list
    # per example: [(positions, [candidate piece ids, ...]), ...] for substitution adversaries (RIFT/ASCC)
    subs: Optional[list] = None


def encode(tokenizer, examples: Sequence[Example], max_length: int) -> Encoded:
    """Tokenise (with truncation, no padding - batches are padded dynamically by :func:`collate`)."""
    a = [e.text_a for e in examples]
    b = [e.text_b for e in examples] if examples and examples[0].text_b is not None else None
    enc = tokenizer(a, b, truncation=True, max_length=max_length, padding=False)
    tt = enc.get("token_type_ids")
    out = Encoded(enc["input_ids"], tt, [e.label for e in examples])
    out.batch_encoding = enc  # word alignment (fast tokenizers) for substitution candidates
    return out


def collate(items: Sequence[tuple], pad_id: int, regression: bool,
            num_candidates: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a list of (input_ids, token_type_ids, label[, subs]) to a batch dict of tensors.

    With substitution candidates (``num_candidates`` = S > 0, RIFT's ASCC adversary) the batch also holds
    ``sub_ids`` (B, T, S) - slot 0 the original token, slots 1.. the synonym pieces -, ``sub_mask``
    (B, T, S) bool - which slots are real candidates - and ``word_head`` (B, T) - the position whose
    combination weights a position uses, so all pieces of a multi-piece word share one weight vector.
    """
    t = max(len(it[0]) for it in items)
    b = len(items)
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)      # (B, T)
    attention = torch.zeros((b, t), dtype=torch.long)             # (B, T) 1 = real token
    types = torch.zeros((b, t), dtype=torch.long)                 # (B, T)
    for i, it in enumerate(items):
        ids, tt = it[0], it[1]
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention[i, :len(ids)] = 1
        if tt is not None:
            types[i, :len(tt)] = torch.tensor(tt)
    batch = {"input_ids": input_ids, "attention_mask": attention, "token_type_ids": types}
    labels = [it[2] for it in items]
    if all(lab is not None for lab in labels):
        batch["labels"] = torch.tensor(labels, dtype=torch.float32 if regression else torch.long)
    if num_candidates > 0:
        s = num_candidates
        sub_ids = input_ids.unsqueeze(-1).repeat(1, 1, s)           # (B, T, S)
        sub_mask = torch.zeros((b, t, s), dtype=torch.bool)         # (B, T, S)
        sub_mask[..., 0] = True
        head = torch.arange(t).unsqueeze(0).repeat(b, 1)            # (B, T)
        for i, it in enumerate(items):
            for positions, cands in (it[3] if len(it) > 3 and it[3] else []):
                for j, pos in enumerate(positions):
                    head[i, pos] = positions[0]
                    for c, pieces in enumerate(cands[:s - 1], 1):
                        sub_ids[i, pos, c] = pieces[j]
                        sub_mask[i, pos, c] = True
        batch.update(sub_ids=sub_ids, sub_mask=sub_mask, word_head=head)
    return batch


class EncodedDataset(torch.utils.data.Dataset):
    def __init__(self, enc: Encoded):
        self.enc = enc

    def __len__(self) -> int:
        return len(self.enc.input_ids)

    def __getitem__(self, i: int):
        tt = self.enc.token_type_ids[i] if self.enc.token_type_ids is not None else None
        subs = self.enc.subs[i] if self.enc.subs is not None else None
        return (self.enc.input_ids[i], tt, self.enc.labels[i], subs)


def substitution_candidates(tokenizer, examples: Sequence[Example], enc: Encoded, synonyms,
                            max_candidates: int, fields: str = "all") -> list:
    """Per example, the words that can be substituted and their synonyms as word-piece ids.

    Words come from the tokenizer's own pre-tokenisation (a fast tokenizer's ``word_ids``), so any
    sub-word tokenizer works (RIFT's official code forced one token per word).  A synonym is kept if it
    tokenises (with the word's capitalisation) into as many pieces as the word, so the convex
    combination is taken piece by piece; at most ``max_candidates - 1`` synonyms per word (slot 0 is
    the word itself).  ``fields``: all, a or b (e.g. only the hypothesis of an NLI pair).
    """
    from .synonyms import match_case

    be = getattr(enc, "batch_encoding", None)
    if be is None or not getattr(be, "is_fast", False):
        raise ValueError("substitution candidates need a fast tokenizer (tokenizer.json) for word alignment")
    piece_cache: dict[str, list[int]] = {}
    out = []
    for i, ex in enumerate(examples):
        words: dict[tuple[int, int], list[int]] = {}
        for pos, (seq, w) in enumerate(zip(be.sequence_ids(i), be.word_ids(i))):
            if seq is None or w is None:
                continue
            if (fields == "a" and seq != 0) or (fields == "b" and seq != 1):
                continue
            words.setdefault((seq, w), []).append(pos)
        subs = []
        for (seq, w), positions in words.items():
            span = be.word_to_chars(i, w, sequence_index=seq)
            text = (ex.text_a if seq == 0 else ex.text_b) or ""
            word = text[span.start:span.end]
            cands = []
            for syn in synonyms.synonyms(word):
                cand = match_case(word, syn)
                if cand not in piece_cache:
                    piece_cache[cand] = tokenizer(cand, add_special_tokens=False)["input_ids"]
                if len(piece_cache[cand]) == len(positions):
                    cands.append(piece_cache[cand])
                    if len(cands) >= max_candidates - 1:
                        break
            if cands:
                subs.append((positions, cands))
        out.append(subs)
    return out


# ---- what a run was trained on -----------------------------------------------------------------------

#: The data files whose content defines a fine-tuning result (the dev set picks the best epoch).
FINGERPRINTED = ("data.train", "data.dev")


def data_fingerprints(cfg) -> dict[str, str]:
    """``{"data.train": "sha256:…", "data.dev": …}``: the SHA-256 of each data file's bytes (of every file,
    by relative name, for a folder), recorded in ``OUT/checkpoint.pt`` and ``results.json`` so that a resume
    can tell a file changed under the same path."""
    out = {}
    for key in FINGERPRINTED:
        section, name = key.split(".")
        path = Path(str(getattr(getattr(cfg, section), name) or ""))
        if path.is_file():
            out[key] = "sha256:" + sha256_file(path)
        elif path.is_dir():
            h = hashlib.sha256()
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                h.update(f"{f.relative_to(path).as_posix()}\0{sha256_file(f)}\n".encode())
            out[key] = "sha256-tree:" + h.hexdigest()
    return out


def changed_data(saved: Optional[dict], now: dict[str, str]) -> list[str]:
    """The keys of :func:`data_fingerprints` whose file has other content ``now`` than when ``saved`` was
    recorded (none for a record without fingerprints)."""
    return [key for key in (saved or {}) if key in now and now[key] != saved[key]]


def check_same_data(saved: Optional[dict], now: dict[str, str], where) -> None:
    """ValueError naming the file, both fingerprints and the way out when a data file that a checkpoint
    (``where``) was trained on has other content now; nothing to compare for a checkpoint without them."""
    changed = changed_data(saved, now)
    if changed:
        key = changed[0]
        raise ValueError(
            f"{where}: cannot resume: --{key} has changed since the checkpoint was written (its content was "
            f"{saved[key]}, it is {now[key]} now); restore the original file to resume, or start over with another "
            "--out or --run.resume=never")
