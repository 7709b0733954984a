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

from alum_pretrain.data.databin import FAIRSEQ_NSPECIAL, MANIFEST
from alum_pretrain.data.indexed import best_dtype
from alum_pretrain.integrity import sha256_file

from . import tokenizer as toks
from . import work
from .config import PrepConfig
from .hygiene import check_not_mostly_garbage, hygiene_report, sniff_inputs
from .manifest import (DROP_REASONS, FORMAT_VERSION, SPLITS, failed_start, file_record, read_existing_manifest,
                       shard_dicts, verify_files, write_manifest)
from .manifest import fingerprint as manifest_fingerprint
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
    def __init__(self, cfg: PrepConfig, *, overwrite: bool = False, command: list[str] | None = None):
        self.cfg = cfg
        self.overwrite = overwrite
        self.command = command if command is not None else ["data_prep.prepare", *map(str, cfg.inputs)]
        self.out = Path(cfg.out)
        self.parts = self.out / ".parts"
        self.warnings: list[str] = []
        self.manifest: dict = {}
        self.given = None  # (hf tokenizer, info) of --vocab/--spm-model/--tokenizer-json, loaded up front

    # -- setup ---------------------------------------------------------------------------------------------

    def _check_output(self, fingerprint: str) -> dict | None:
        """Create/validate the output folder.  Returns the manifest to resume from, or None (fresh)."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise ValueError(f"{out}: exists and is not a folder; choose another --out")
        mpath = out / MANIFEST
        if out.is_dir() and any(out.iterdir()):
            if not mpath.exists():
                raise ValueError(
                    f"{out}: folder is not empty and has no {MANIFEST} (not an alum-prep output); "
                    "refusing to write into it — choose an empty or new --out (--overwrite never deletes such a folder)"
                )
            old = read_existing_manifest(out)
            if old.get("fingerprint") == fingerprint:
                return old
            if failed_start(old):
                # Nothing of value (no completed segment or shard): the leftovers of a run that failed or
                # was killed at its start must not block the corrected command.
                self.warn(f"{out}: replacing the leftovers of an earlier run that stopped before completing any "
                           f"work ({' '.join(map(str, old.get('command', ['?'])))})")
                shutil.rmtree(out)
            elif not self.overwrite:
                raise ValueError(
                    f"{out}: holds a data-bin made by a different command or different inputs "
                    f"({' '.join(map(str, old.get('command', ['?'])))}); re-run with --overwrite to replace it, "
                    "or choose another --out"
                )
            else:
                shutil.rmtree(out)
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".write_test.tmp"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise PermissionError(f"{out}: output folder is not writable ({e.strerror or e}); choose another --out") from None
        return None

    # -- main ----------------------------------------------------------------------------------------------

    def run(self) -> dict:
        """Validate everything that can be validated before writing (arguments — already by
        :class:`PrepConfig` —, inputs, their first bytes, the tokenizer files, the output folder), then run.

        A fresh run that fails on bad input (any ``ValueError``: empty or garbled corpus, corrupt file, ...)
        or before completing any segment leaves nothing behind, not even the folders it created.  An
        interrupted run (KeyboardInterrupt, kill) and a fresh run that fails for another reason (disk full)
        after completing segments keep them for the resume, and so does a resumed run.
        """
        cfg = self.cfg
        files = list_inputs(cfg.inputs, cfg.format)
        for w in sniff_inputs(files, cfg.format, cfg.max_garbage_frac):
            self.warn(w)
        self.given = self._given_tokenizer()
        fingerprint, inputs, tok_src = manifest_fingerprint(cfg, files)
        existed = self.out.exists()
        created = next((p for p in reversed([self.out, *self.out.parents]) if not p.exists()), None)
        resume = self._check_output(fingerprint)
        try:
            return self._run(files, fingerprint, inputs, tok_src, resume)
        except Exception as e:
            done = [j for j, r in self.manifest.get("segments", {}).items() if r.get("status") == "complete"]
            if resume is None and (isinstance(e, ValueError) or not done):
                shutil.rmtree(self.out, ignore_errors=True)
                if existed:
                    self.out.mkdir(exist_ok=True)
                elif created is not None:
                    d = self.out.parent  # parent folders this run created, if still empty
                    while d == created or created in d.parents:
                        try:
                            d.rmdir()
                        except OSError:
                            break
                        d = d.parent
            elif resume is None:
                self.warn(f"{len(done)} completed segment(s) kept in {self.out}; fix the cause and re-run the same "
                           "command to resume")
            raise

    def _given_tokenizer(self):
        """Load (and so validate) a given tokenizer file before anything is written; None when training."""
        cfg = self.cfg
        mml = cfg.max_tokens + 2
        if cfg.vocab:
            return toks.from_vocab(cfg.vocab, cfg.lowercase, mml)
        if cfg.spm_model:
            return toks.from_spm(cfg.spm_model, mml)
        if cfg.tokenizer_json:
            return toks.from_tokenizer_json(cfg.tokenizer_json, mml)
        return None

    def _run(self, files, fingerprint, inputs, tok_src, resume) -> dict:
        cfg = self.cfg
        t0 = time.time()
        for tmp in self.out.rglob("*.tmp"):  # leftovers of a killed run (never final names)
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
        from alum_pretrain import __version__

        m = resume or {}
        if resume is not None and resume.get("status") == "complete":
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
        m.update({
            "format_version": FORMAT_VERSION,
            "status": "running",
            "package": "alum-pretrain",
            "version": __version__,
            "command": list(self.command),
            "fingerprint": fingerprint,
            "config": cfg.result_options(),
            "inputs": inputs,
            "format": cfg.format,
            "id_offset": FAIRSEQ_NSPECIAL,
            "num_shards": cfg.shards,
            "splits": list(SPLITS),
            "owner": {"host": socket.gethostname(), "pid": os.getpid()},
        })
        m.setdefault("segments", {})
        m.setdefault("shards", [])
        m["warnings"] = list(dict.fromkeys([*m.get("warnings", []), *self.warnings]))  # an earlier attempt's too
        self.manifest = m
        self.save()

        # 1. tokenizer (kept from a previous attempt when its file is intact)
        hf = self._tokenizer(files, tok_src)
        vocab_size = len(hf.backend_tokenizer.get_vocab(with_added_tokens=True))
        dtype = best_dtype(vocab_size + FAIRSEQ_NSPECIAL)
        m["dtype"] = dtype.name
        self.save()

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

        # 4. totals, dict.txt, done
        if totals["documents"] == 0:
            raise EmptyCorpusError(
                f"empty corpus: no documents left in {', '.join(cfg.inputs)} after cleaning "
                f"({totals['documents_read']} read; dropped {dict(dropped) or 'none'}); check --format and the inputs"
            )
        counts = np.zeros(vocab_size, dtype=np.int64)
        for j in range(nseg):
            counts += np.load(self.parts / f"seg{j:05d}" / "token_counts.npy")[:vocab_size]
        toks.write_dict(toks.tokens_in_id_order(hf), counts, self.out / "dict.txt")
        m["dict"] = file_record(self.out / "dict.txt")
        shard_dicts(self.out, cfg.shards)
        m["counts"] = {
            "documents_read": totals["documents_read"],
            "documents": totals["documents"],
            "sentences": totals["sentences"],
            "items": totals["items"],
            "tokens": totals["tokens"],
            "dropped": {r: dropped.get(r, 0) for r in DROP_REASONS},
            "decode_replacements": totals["decode_replacements"],
            "control_chars_removed": totals["control_chars_removed"],
            "chars_read": totals["chars_read"],
            "garbled_chars": totals["garbled_chars"],
            "empty_sentences": totals["empty_sentences"],
            "overlong_sentences": totals["overlong_sentences"],
            "overlong_extra_items": totals["overlong_extra_items"],
            "unk_tokens": int(counts[m["tokenizer"]["special_ids"]["unk"]]),
        }
        elapsed = time.time() - t0
        m["timing"] = {"seconds": round(elapsed, 3), "input_mb_per_s": round(total / 1e6 / max(elapsed, 1e-9), 3),
                       "docs_per_s": round(totals["documents_read"] / max(elapsed, 1e-9), 1), "workers": cfg.workers}
        for w in hygiene_report(m["counts"], cfg.max_garbage_frac)[1]:
            self.warn(w)
        empty = [s["shard"] for s in m["shards"] if s["train"]["items"] == 0]
        if empty:
            self.warn(f"{len(empty)} of {cfg.shards} train shards are empty (shard{', shard'.join(map(str, empty))}): "
                       f"{totals['documents']} documents for --shards {cfg.shards}; alum-train refuses empty shards "
                       f"and fairseq cannot load them — re-run with --shards {max(1, min(cfg.shards - len(empty), totals['documents']))} "
                       "or fewer")
        for s in m["shards"]:
            if s["valid"]["items"] == 0 and cfg.valid_fraction > 0:
                self.warn(f"shard{s['shard']}/valid is empty (corpus too small for --valid-fraction "
                           f"{cfg.valid_fraction}); fairseq cannot load an empty split — raise --valid-fraction")
        m["status"] = "complete"
        self.save()
        shutil.rmtree(self.parts, ignore_errors=True)
        return m

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
        write_manifest(self.out, self.manifest)

    def log(self, msg: str) -> None:
        if self.cfg.progress:
            print(f"alum-prep: {msg}", file=sys.stderr)

    def docs(self, files) -> Iterator:
        c = self.cfg
        return iter(Reader(files, c.format, Decoder(c.on_decode_error), c.json_key, text_column=c.text_column,
                           title_column=c.title_column, keep_headings=c.keep_headings))

    def initargs(self, tokenizer_file, dtype):
        c = self.cfg
        return (c.format, c.keep_headings, c.min_doc_chars, tokenizer_file, c.max_tokens, dtype, c.sentence_splitter,
                c.max_garbage_frac)

    # -- tokenizer -----------------------------------------------------------------------------------------

    def _tokenizer(self, files, tok_src):
        cfg, m = self.cfg, self.manifest
        tdir = self.out / "tokenizer"
        rec = m.get("tokenizer")
        if rec and (tdir / "tokenizer.json").exists() and sha256_file(tdir / "tokenizer.json") == rec.get("sha256"):
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(tdir))
        mml = cfg.max_tokens + 2
        if self.given is not None:
            hf, info = self.given
        else:
            self.log(f"training a {cfg.train_tokenizer} tokenizer (vocab {cfg.vocab_size}) on the corpus")
            workdir = self.out / "tokenizer_train.tmp"
            sent_file = self._write_sentences(files, workdir / "sentences.txt", cfg.tokenizer_train_sentences)
            hf, info = toks.train(cfg.train_tokenizer, lambda: _read_lines(sent_file), cfg.vocab_size,
                                  cfg.lowercase, mml, workdir, cfg.tokenizer_train_sentences, cfg.seed,
                                  byte_fallback=cfg.spm_byte_fallback)
            got = len(hf.backend_tokenizer.get_vocab(with_added_tokens=True))
            info["requested_vocab_size"] = cfg.vocab_size
            if got < cfg.vocab_size:
                self.warn(f"--vocab-size {cfg.vocab_size} was not reached: the corpus supports only {got} tokens "
                           f"(special tokens included), so the vocabulary has {got}; the trainer found no more "
                           "pieces to add — use a larger corpus or a smaller --vocab-size")
        toks.save(hf, tdir)
        if cfg.train_tokenizer and cfg.train_tokenizer.startswith("spm"):
            shutil.copy(self.out / "tokenizer_train.tmp" / "spm.model", tdir / "spm.model")
        elif cfg.spm_model:
            shutil.copy(cfg.spm_model, tdir / "spm.model")
        shutil.rmtree(self.out / "tokenizer_train.tmp", ignore_errors=True)
        m["tokenizer"] = {
            **info,
            "source": tok_src.get("path") or f"trained on the corpus ({cfg.train_tokenizer})",
            "vocab_size": len(hf.backend_tokenizer.get_vocab(with_added_tokens=True)),
            "special_tokens": toks.special_tokens(hf),
            "special_ids": toks.special_ids(hf),
            "sha256": sha256_file(tdir / "tokenizer.json"),
        }
        self.save()
        return hf

    def _write_sentences(self, files, path: Path, cap: int) -> Path:
        """The first ``cap`` cleaned sentences of the corpus, one per line, for tokenizer training.

        Written to a file by the worker pool first, so that the (multi-threaded) trainers never run while
        worker processes are being forked.  Sentences hold no newline (they come from one paragraph).
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        items = ((None, d.text) for d in self.docs(files) if d.text is not None)
        n = 0
        bar = None
        stats = Counter()
        with open(path, "w", encoding="utf-8") as fh, work.Runner(self.cfg.workers, self.initargs(None, None)) as runner:
            if self.cfg.progress:
                from tqdm import tqdm

                bar = tqdm(desc="sentences for tokenizer training", unit="sent", file=sys.stderr)
            for _, res in runner.map(work.work_sentences, work.chunks(items)):
                stats.update(res["stats"])
                k = n
                for sents in res["sents"]:
                    for sent in sents:
                        fh.write(sent + "\n")
                        n += 1
                if bar is not None:
                    bar.update(n - k)
                if n >= cap:
                    break
        if bar is not None:
            bar.close()
        if n == 0:  # nothing to train on: say why (garbage first, it has the more useful message)
            check_not_mostly_garbage({**stats, "dropped": {"garbled": stats["garbled"]}}, self.cfg.max_garbage_frac,
                                     self.cfg.inputs)
            raise EmptyCorpusError(
                f"empty corpus: no sentence to train a tokenizer on in {', '.join(self.cfg.inputs)} "
                f"({stats['documents_read']} documents read, all empty, too short or garbled); check --format and the inputs"
            )
        return path

    def _merge_shards(self):
        merge_shards(self)


def _read_lines(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            yield line.rstrip("\n")


class EmptyCorpusError(ValueError):
    """No document survived reading and cleaning."""
