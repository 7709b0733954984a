"""``prepare()``: raw corpus -> cleaned documents -> sentences -> token ids -> sharded data-bin.

Design (streaming, parallel, restartable)
-----------------------------------------
* The main process streams documents out of the inputs (:mod:`data_prep.readers`) and sends chunks of
  them to ``workers`` processes (at most ``2 * workers + 2`` chunks in flight, so memory stays flat however
  big the corpus).  A worker (:mod:`data_prep.work`) cleans, splits sentences and tokenizes a chunk;
  results come back in input order.
* The main process drops exact duplicates (a set of 16-byte BLAKE2b digests of the cleaned text, kept in
  memory: about 100 bytes per *document* in a Python set, i.e. ~1 GB for 10M documents), then assigns
  each document to a shard and a split **by a hash of its text**: ``shard = h(text) mod shards``,
  ``valid if h(seed, text) < valid_fraction``.  So every shard is a uniform sample of the whole corpus
  (fairseq trains one shard per epoch) and the assignment does not depend on worker count or timing.
* Restart granularity is a *segment* of the input stream (:mod:`data_prep.segments`): each writes its
  own part files and is recorded ``complete`` in ``manifest.json`` (:mod:`data_prep.manifest`) only when
  they are; when all segments are done, each shard's parts are concatenated into
  ``OUT/shardK/{train,valid}.{bin,idx,doc.npy}`` and the shard is marked complete.
* Re-running the same command (same inputs, same result-changing options) resumes: complete shards are
  verified (size + SHA-256) and skipped; complete segments are verified and skipped (their documents are
  still read, to find the stream position, but not processed); leftover ``*.tmp`` files are deleted.
  A different command on an existing data-bin is refused unless ``overwrite=True``.  Nothing is ever
  published under a final name before it is complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np

from alum_pretrain.data.databin import FAIRSEQ_NSPECIAL
from alum_pretrain.data.indexed import best_dtype
from alum_pretrain.diskspace import disk_full_error, is_disk_full, tree_bytes
from alum_pretrain.runlock import lock_folder

from . import tokenizer as toks
from .config import PrepConfig
from .corpus_tokenizer import databin_tokenizer, given_tokenizer
from .hygiene import EmptyCorpusError, check_not_mostly_garbage, hygiene_report, sniff_inputs
from .manifest import DROP_REASONS, FORMAT_VERSION, SPLITS, file_record, shard_dicts, verify_files, write_manifest
from .manifest import fingerprint as manifest_fingerprint
from .outdir import claim_output, first_missing, remove_output
from .readers import Decoder, Reader, list_inputs
from .segments import Streamer, merge_shards

def prepare(cfg: PrepConfig, *, overwrite: bool = False, command: list[str] | None = None) -> dict:
    """Prepare a data-bin (see the module docstring); returns the final manifest (``OUT/manifest.json``).

    ``cfg`` holds every option (:class:`data_prep.config.PrepConfig`, checked when it is built;
    ``alum-prep --help`` explains each).  ``overwrite`` replaces a data-bin made by a different command,
    ``command`` is what the manifest records as the command line (the CLI passes its argv).

    Raises ``FileNotFoundError`` (missing input or tokenizer file), ``PermissionError`` (unwritable
    output), ``ValueError`` (bad input, an existing output of a different command without ``overwrite``,
    an empty corpus, a mostly garbled one: :class:`data_prep.hygiene.GarbledCorpusError`).
    Inputs' first bytes and tokenizer files are checked before anything is written; a fresh run that
    fails leaves nothing behind (see :meth:`Preparer.run`).  Warnings go to stderr whatever
    ``progress`` says and are kept in the manifest's ``warnings``.
    """
    if not isinstance(cfg, PrepConfig):
        raise TypeError(f"prepare() takes a data_prep.PrepConfig, got {type(cfg).__name__}: "
                        "prepare(PrepConfig(inputs=[...], format=..., out=..., vocab=...))")
    return Preparer(cfg, overwrite=overwrite, command=command).run()


class Preparer:
    """One ``prepare()`` run: its options, output folder and the manifest it writes (:class:`Streamer` and
    :func:`merge_shards` work through it: ``docs``, ``initargs``, ``save``, ``log``, ``warn``)."""

    def __init__(self, cfg: PrepConfig, *, overwrite: bool = False, command: list[str] | None = None):
        self.cfg = cfg
        self.overwrite = overwrite
        self.command = command if command is not None else ["data_prep.prepare", *map(str, cfg.inputs)]
        self.out = Path(cfg.out)
        self.parts = self.out / ".parts"
        self.warnings: list[str] = []
        self.manifest: dict = {}
        self.given = None  # (hf tokenizer, info) of --vocab/--spm-model/--tokenizer-json, loaded up front
        self._saved: str | None = None  # the manifest as last written by save()
        self.phases: dict[str, float] = {}  # wall seconds of each step (mark())
        self._mark = time.perf_counter()

    # -- main ----------------------------------------------------------------------------------------------

    def run(self) -> dict:
        """Validate everything that can be validated before writing (arguments — already by
        :class:`PrepConfig` —, inputs, their first bytes, the tokenizer files, the output folder), then run.

        A fresh run that fails on bad input (any ``ValueError``: empty or garbled corpus, corrupt file, ...)
        or before completing any segment leaves nothing behind, not even the folders it created.  An
        interrupted run (KeyboardInterrupt, a stop signal, kill) and a fresh run that fails for another reason
        (disk full) after completing segments keep them for the resume, and so does a resumed run; an
        interrupt also removes its ``*.tmp`` files (those of a kill are removed by the next run).
        """
        cfg = self.cfg
        files = list_inputs(cfg.inputs, cfg.format)
        for w in sniff_inputs(files, cfg.format, cfg.max_garbage_frac):
            self.warn(w)
        self.given = given_tokenizer(cfg)  # loaded (and so validated) before anything is written
        fingerprint, inputs, tok_src = manifest_fingerprint(cfg, files)
        self.mark("inputs")
        existed = self.out.exists()
        created = first_missing(self.out)
        # One alum-prep per --out (alum_pretrain.runlock): a second one stops here, before touching anything.
        with lock_folder(self.out, tool="alum-prep", command=" ".join(map(str, self.command))):
            return self._claimed_run(files, fingerprint, inputs, tok_src, existed, created)

    def _claimed_run(self, files, fingerprint, inputs, tok_src, existed, created) -> dict:
        resume = claim_output(self.out, fingerprint, self.overwrite, self.warn)
        try:
            return self._run(files, fingerprint, inputs, tok_src, resume)
        except Exception as e:
            done = [j for j, r in self.manifest.get("segments", {}).items() if r.get("status") == "complete"]
            if resume is None and (isinstance(e, ValueError) or not done):
                remove_output(self.out, existed, created)
            elif resume is None:
                self.warn(f"{len(done)} completed segment(s) kept in {self.out}; fix the cause and re-run the same "
                           "command to resume")
            if is_disk_full(e):
                raise self._disk_full(e, len(done)) from e
            raise
        except BaseException:  # stopped (a signal, Ctrl-C): completed segments stay for the resume
            if self.out.is_dir():
                self._remove_tmp()
            raise

    def _disk_full(self, exc: BaseException, n_done: int) -> Exception:
        """The disk-full error: temporaries removed, the space needed estimated from the parts written so far
        (the parts and the merged shards coexist until the end), what is kept for the resume."""
        parts = tree_bytes(self.parts)
        nseg = max(1, int(self.manifest.get("num_segments") or 1))
        needed = int(2 * parts * nseg / max(1, n_done)) if parts else None
        if self.out.is_dir():
            self._remove_tmp()
        intact = (f"{n_done} of {nseg} completed segment(s) are kept for the resume" if self.out.is_dir() and n_done
                  else "nothing was kept")
        return disk_full_error(self.out, "the data-bin", needed, intact, exc)

    def _run(self, files, fingerprint, inputs, tok_src, resume) -> dict:
        cfg = self.cfg
        t0 = time.time()
        self._remove_tmp()
        if resume is not None and resume.get("status") == "complete":
            return self._verified(resume)
        m = self._start_manifest(resume, fingerprint, inputs)

        # 1. tokenizer (kept from a previous attempt when its file is intact)
        hf = databin_tokenizer(self, files, tok_src)
        self.mark("tokenizer")
        # len(get_vocab(with_added_tokens=True)) of this very file (recorded by databin_tokenizer)
        vocab_size = m["tokenizer"].get("vocab_size") or len(hf.backend_tokenizer.get_vocab(with_added_tokens=True))
        dtype = best_dtype(vocab_size + FAIRSEQ_NSPECIAL)
        m["dtype"] = dtype.name

        # 2. stream -> segments of part files
        total = sum(i["bytes"] for i in inputs)
        seg_bytes = max(1, int(cfg.segment_mb * (1 << 20)))
        nseg = max(1, math.ceil(total / seg_bytes))
        m["num_segments"] = nseg
        self.save()
        merged_all = len(m["shards"]) == cfg.shards and all(s.get("status") == "complete" for s in m["shards"])
        if not merged_all:
            Streamer(self, files, dtype, vocab_size, seg_bytes, nseg, total).run()
        totals, dropped = self._totals()
        check_not_mostly_garbage({**totals, "dropped": dropped}, cfg.max_garbage_frac, cfg.inputs)

        # 3. merge parts into shards
        self._merge_shards()
        self.mark("merge")

        # 4. totals, dict.txt, done
        if totals["documents"] == 0:
            raise EmptyCorpusError(
                f"empty corpus: no documents left in {', '.join(cfg.inputs)} after cleaning "
                f"({totals['documents_read']} read; dropped {dict(dropped) or 'none'}); check --format and the inputs"
            )
        counts = self._write_dict(hf, vocab_size, nseg)
        m["counts"] = corpus_counts(totals, dropped, int(counts[m["tokenizer"]["special_ids"]["unk"]]))
        self.mark("dict")
        elapsed = time.time() - t0
        m["timing"] = {"seconds": round(elapsed, 3), "input_mb_per_s": round(total / 1e6 / max(elapsed, 1e-9), 3),
                       "docs_per_s": round(totals["documents_read"] / max(elapsed, 1e-9), 1), "workers": cfg.workers,
                       "phases": {k: round(v, 3) for k, v in self.phases.items()}}
        for w in hygiene_report(m["counts"], cfg.max_garbage_frac)[1]:
            self.warn(w)
        for w in empty_shard_warnings(m["shards"], cfg, totals["documents"]):
            self.warn(w)
        m["status"] = "complete"
        self.save()
        shutil.rmtree(self.parts, ignore_errors=True)
        return m

    def _remove_tmp(self) -> None:
        """Delete the leftovers of a killed run (``*.tmp``: never final names)."""
        for tmp in self.out.rglob("*.tmp"):
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()

    def _verified(self, resume: dict) -> dict:
        """A complete data-bin whose files all verify (size + SHA-256) is the result; else ValueError."""
        problems = [p for s in resume["shards"] for sp in SPLITS
                    if (p := verify_files(self.out / f"shard{s['shard']}", s[sp]["files"]))]
        if problems:
            raise ValueError(f"{self.out}: complete data-bin fails verification ({problems[0]}); "
                             "re-run with --overwrite to rebuild it")
        shutil.rmtree(self.parts, ignore_errors=True)  # killed just before its clean-up
        shard_dicts(self.out, len(resume["shards"]))  # a data-bin written before shards carried dict.txt
        self.log(f"{self.out}: already complete and verified; nothing to do")
        self.manifest = resume
        return resume

    def _start_manifest(self, resume: dict | None, fingerprint: str, inputs: list) -> dict:
        """The manifest of this attempt (``resume``'s segments and shards kept), saved as ``running``."""
        from alum_pretrain import __version__

        m = resume or {}
        m.update({
            "format_version": FORMAT_VERSION,
            "status": "running",
            "package": "alum-pretrain",
            "version": __version__,
            "command": list(self.command),
            "fingerprint": fingerprint,
            "config": self.cfg.result_options(),
            "inputs": inputs,
            "format": self.cfg.format,
            "id_offset": FAIRSEQ_NSPECIAL,
            "num_shards": self.cfg.shards,
            "splits": list(SPLITS),
            "owner": {"host": socket.gethostname(), "pid": os.getpid()},
        })
        m.setdefault("segments", {})
        m.setdefault("shards", [])
        m["warnings"] = list(dict.fromkeys([*m.get("warnings", []), *self.warnings]))  # an earlier attempt's too
        self.manifest = m
        self.save()
        return m

    def _write_dict(self, hf, vocab_size: int, nseg: int) -> np.ndarray:
        """``OUT/dict.txt`` (and each shard's copy) with the token counts summed over the segments; returns
        the counts (vocab_size,)."""
        counts = np.zeros(vocab_size, dtype=np.int64)
        for j in range(nseg):
            counts += np.load(self.parts / f"seg{j:05d}" / "token_counts.npy")[:vocab_size]
        toks.write_dict(toks.tokens_in_id_order(hf), counts, self.out / "dict.txt")
        self.manifest["dict"] = file_record(self.out / "dict.txt")
        shard_dicts(self.out, self.cfg.shards)
        return counts

    def _totals(self) -> tuple[Counter, Counter]:
        """Counters summed over the segments of the manifest: (totals, dropped by reason)."""
        totals, dropped = Counter(), Counter()
        for rec in self.manifest["segments"].values():
            for k, v in rec["counts"].items():
                if k != "dropped":
                    totals[k] += v
            dropped.update(rec["counts"]["dropped"])
        return totals, dropped

    def warn(self, msg: str) -> None:
        """A warning: printed whatever --no-progress says, and kept in the manifest's ``warnings``."""
        self.warnings.append(msg)
        if "warnings" in self.manifest and msg not in self.manifest["warnings"]:
            self.manifest["warnings"].append(msg)  # saved with the manifest's next write
        print(f"alum-prep: warning: {msg}", file=sys.stderr)

    def save(self) -> None:
        """Write the manifest (atomically, durably) unless it is unchanged since the last write."""
        state = json.dumps(self.manifest, sort_keys=True, default=str)
        if state != self._saved:
            write_manifest(self.out, self.manifest)
            self._saved = state

    def mark(self, step: str) -> None:
        """Add the wall time since the previous mark to ``step`` (the manifest's ``timing.phases``: ``inputs``
        (listing, sniffing, hashing the inputs, loading the tokenizer), ``tokenizer`` (claiming the folder,
        saving the tokenizer), ``workers_start`` (verifying completed segments on a resume,
        starting the pool), ``stream`` (reading, cleaning,
        splitting, encoding, writing the parts: the part the workers share), ``stream_end`` (the last
        segment's files, stopping the pool), ``merge`` (publishing the shards), ``dict`` (``dict.txt``))."""
        now = time.perf_counter()
        self.phases[step] = self.phases.get(step, 0.0) + now - self._mark
        self._mark = now

    def log(self, msg: str) -> None:
        if self.cfg.progress:
            print(f"alum-prep: {msg}", file=sys.stderr)

    def docs(self, files) -> Iterator:
        c = self.cfg
        return iter(Reader(files, c.format, Decoder(c.on_decode_error), c.json_key, text_column=c.text_column,
                           title_column=c.title_column, keep_headings=c.keep_headings))

    def initargs(self, tokenizer_file, dtype, engine: str = "hf"):
        c = self.cfg
        return (c.format, c.keep_headings, c.min_doc_chars, tokenizer_file, c.max_tokens, dtype, c.sentence_splitter,
                c.max_garbage_frac, engine)

    def _merge_shards(self):
        merge_shards(self)


def corpus_counts(totals: Counter, dropped: Counter, unk_tokens: int) -> dict:
    """The manifest's ``counts``: the segments' totals (:meth:`Preparer._totals`), drops by reason."""
    keys = ("documents_read", "documents", "sentences", "items", "tokens")
    later = ("decode_replacements", "control_chars_removed", "chars_read", "garbled_chars", "empty_sentences",
             "overlong_sentences", "overlong_extra_items")
    return {**{k: totals[k] for k in keys}, "dropped": {r: dropped.get(r, 0) for r in DROP_REASONS},
            **{k: totals[k] for k in later}, "unk_tokens": unk_tokens}


def empty_shard_warnings(shards: list[dict], cfg: PrepConfig, documents: int) -> list[str]:
    """Warnings for empty train shards and empty valid splits (neither engine can load them)."""
    out = []
    empty = [s["shard"] for s in shards if s["train"]["items"] == 0]
    if empty:
        out.append(f"{len(empty)} of {cfg.shards} train shards are empty (shard{', shard'.join(map(str, empty))}): "
                   f"{documents} documents for --shards {cfg.shards}; alum-train refuses empty shards "
                   f"and fairseq cannot load them — re-run with --shards {max(1, min(cfg.shards - len(empty), documents))} "
                   "or fewer")
    for s in shards:
        if s["valid"]["items"] == 0 and cfg.valid_fraction > 0:
            out.append(f"shard{s['shard']}/valid is empty (corpus too small for --valid-fraction "
                       f"{cfg.valid_fraction}); fairseq cannot load an empty split — raise --valid-fraction")
    return out
