"""``prepare()``: raw corpus -> cleaned documents -> sentences -> token ids -> sharded data-bin.

Design (streaming, parallel, restartable)
-----------------------------------------
* The main process streams documents out of the inputs (:mod:`data_prep.readers`) and sends chunks of
  them to ``workers`` processes (at most ``2 * workers + 2`` chunks in flight, so memory stays flat however
  big the corpus).  A worker converts markup to text (WikiText markers, wikitext via ``wikiextractor``),
  cleans (:func:`data_prep.clean.clean_text`), splits sentences (:mod:`data_prep.clean`), and encodes all sentences of
  the chunk with one ``encode_batch`` call of the fast tokenizer.  Results come back in input order.
* The main process drops exact duplicates (a set of 16-byte BLAKE2b digests of the cleaned text, kept in
  memory: about 100 bytes per *document* in a Python set, i.e. ~1 GB for 10M documents), then assigns
  each document to a shard and a split **by a hash of its text**: ``shard = h(text) mod shards``,
  ``valid if h(seed, text) < valid_fraction``.  So every shard is a uniform sample of the whole corpus
  (fairseq trains one shard per epoch) and the assignment does not depend on worker count or timing.
* Restart granularity is a *segment*: the input stream is cut by input byte position into segments of
  ``segment_mb``.  Each segment writes its own part files ``OUT/.parts/segJ/shardK/{train,valid}``
  (atomically: temp names, renamed at the end), saves the digests of its documents (for the duplicate
  filter) and its token counts, and only then is recorded ``complete`` in ``manifest.json``.  When all
  segments are done, each shard's parts are merged into ``OUT/shardK/{train,valid}.{bin,idx,doc.npy}``
  (temp + rename), the files' sizes and SHA-256 are recorded, and the shard is marked complete.
* Re-running the same command (same inputs, same result-changing options) resumes: complete shards are
  verified (size + SHA-256) and skipped; complete segments are verified and skipped (their documents are
  still read, to find the stream position, but not processed); leftover ``*.tmp`` files are deleted.
  A different command on an existing data-bin is refused unless ``overwrite=True``.  Nothing is ever
  published under a final name before it is complete.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import multiprocessing as mp
import os
import shutil
import socket
import sys
import time
from collections import Counter, deque
from itertools import chain
from pathlib import Path
from typing import Iterator

import numpy as np

from alum_pretrain.data.databin import FAIRSEQ_NSPECIAL, MANIFEST
from alum_pretrain.data.indexed import IndexedDatasetBuilder, MMapIndexedDataset, best_dtype, merge
from alum_pretrain.integrity import sha256_file

from . import tokenizer as toks
from .clean import SPLITTERS, clean_text
from .config import PrepConfig
from .hygiene import check_not_mostly_garbage, hygiene_report, is_garbled, sniff_inputs
from .readers import WIKITEXT_HEADING_RE, WIKITEXT_TITLE_RE, Decoder, Reader, list_inputs

FORMAT_VERSION = 1
SPLITS = ("train", "valid")
# A chunk (the unit sent to a worker) closes at this many documents or characters, whichever first:
# big enough to amortise inter-process traffic, small enough to keep every worker busy.
CHUNK_DOCS = 256
CHUNK_CHARS = 1 << 17
# Set in every worker (and in this process while it encodes with workers=1): the Rust tokenizer's
# encode_batch otherwise spreads over all cores, so that "--workers N" would use more than N cores.
SINGLE_THREAD_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}
DROP_REASONS = ("empty", "too_short", "duplicate", "no_tokens", "redirect", "non_article_page", "garbled")


# ----------------------------------------------------------------------------------------------------------
# Worker side
# ----------------------------------------------------------------------------------------------------------

_W: dict = {}


def _init_worker(fmt: str, keep_headings: bool, min_doc_chars: int, tokenizer_file: str | None,
                 max_tokens: int, dtype: str | None, splitter: str = "rules", max_garbage_frac: float = 1.0) -> None:
    # One worker = one core: the Rust tokenizer must not run its own thread pool beside the workers.
    os.environ.update(SINGLE_THREAD_ENV)
    _W.clear()
    _W.update(fmt=fmt, keep_headings=keep_headings, min_doc_chars=min_doc_chars, max_tokens=max_tokens,
              splitter=SPLITTERS[splitter](), dtype=np.dtype(dtype) if dtype else None, tok=None,
              max_garbage_frac=max_garbage_frac)
    if tokenizer_file is not None:
        from tokenizers import Tokenizer

        _W["tok"] = Tokenizer.from_file(tokenizer_file)


def to_plain_text(fmt: str, raw: str, keep_headings: bool) -> str:
    """Format-specific markup -> plain text with one paragraph per line (before :func:`clean_text`)."""
    if fmt == "wikitext":
        lines = []
        for line in raw.split("\n"):
            s = line.rstrip("\r")
            m = WIKITEXT_TITLE_RE.match(s) or WIKITEXT_HEADING_RE.match(s)
            if m:
                if keep_headings:
                    lines.append(m.group(1))
                continue
            lines.append(s)
        text = "\n".join(lines)
        # WikiText escapes in-word hyphens and number separators as " @-@ ", " @,@ ", " @.@ ".
        return text.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    if fmt == "wiki-xml":
        from wikiextractor.extract import Extractor

        paragraphs = Extractor("0", "0", "", "", []).clean_text(raw, mark_headers=True, html_safe=False)
        out = []
        for p in paragraphs:
            if p.startswith("#"):  # a "## Heading." line (mark_headers=True)
                if keep_headings:
                    out.append(p.lstrip("#").strip())
                continue
            out.append(p)
        return "\n".join(out)
    if fmt == "wikiextractor":
        # WikiExtractor writes HTML-escaped text ("&amp;", "&lt;"; its default html_safe output).
        return html.unescape(raw)
    return raw


def _clean_doc(raw: str) -> tuple[str | None, str | None, int, list[str]]:
    """-> (drop reason or None, cleaned text, control chars removed, sentences)."""
    if is_garbled(raw, _W["max_garbage_frac"])[0]:  # judged on the text as decoded, before any cleaning
        return "garbled", "", 0, []
    text = to_plain_text(_W["fmt"], raw, _W["keep_headings"])
    cleaned, n_ctrl = clean_text(text)
    if not cleaned:
        return "empty", cleaned, n_ctrl, []
    if len(cleaned) < _W["min_doc_chars"]:
        return "too_short", cleaned, n_ctrl, []
    return None, cleaned, n_ctrl, _W["splitter"].split_document(cleaned)


def work_sentences(texts: list[str]) -> dict:
    """Tokenizer-training pass: cleaned sentences of each kept document (``sents``) and counters."""
    out = []
    stats = Counter()
    for raw in texts:
        reason, _, _, sents = _clean_doc(raw)
        out.append([] if reason else sents)
        stats["documents_read"] += 1
        stats["chars_read"] += len(raw)
        if reason == "garbled":
            stats["garbled"] += 1
            stats["garbled_chars"] += len(raw)
    return {"sents": out, "stats": dict(stats)}


def work_encode(texts: list[str]) -> dict:
    """Binarization pass for one chunk of raw documents.

    Returns per document: ``reason`` (None = kept), ``digest`` (16 bytes of the cleaned text), ``nitems``;
    for all kept documents together: ``sizes`` (items' lengths) and ``tokens`` (flat, disk ids =
    tokenizer ids + 4, in the output dtype); and per document its counters ``stats`` (control characters removed,
    characters read, characters of a garbled document, empty sentences;
    per document, so that they land in the document's segment however the documents were chunked).
    """
    tok = _W["tok"]
    max_tokens = _W["max_tokens"]
    reasons, digests, per_doc_sents = [], [], []
    stats: list[Counter] = []
    for raw in texts:
        reason, cleaned, n_ctrl, sents = _clean_doc(raw)
        st = Counter(control_chars_removed=n_ctrl, chars_read=len(raw))
        if reason == "garbled":
            st["garbled_chars"] = len(raw)
        stats.append(st)
        reasons.append(reason)
        digests.append(hashlib.blake2b(cleaned.encode("utf-8"), digest_size=16).digest())
        per_doc_sents.append(sents)
    flat = [s for sents in per_doc_sents for s in sents]
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    ids = [e.ids for e in encode(flat, add_special_tokens=False)] if flat else []
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    # Items never split the flat token stream differently: an empty sentence adds no item, an overlong one
    # is cut into consecutive chunks of max_tokens, so only the item sizes need a per-sentence rule.
    tokens = np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    sizes: list[int] = []
    nitems, overlong, extra = [], [], []
    k = 0
    for i, sents in enumerate(per_doc_sents):
        doc_len = lengths[k : k + len(sents)]
        k += len(sents)
        n_empty = int((doc_len == 0).sum())
        if n_empty:
            stats[i]["empty_sentences"] += n_empty  # e.g. only characters the tokenizer drops
        n_before = len(sizes)
        long = doc_len > max_tokens
        if long.any():  # too long for one sequence: cut into consecutive chunks rather than dropping text
            for n in doc_len[doc_len > 0].tolist():
                sizes.extend([max_tokens] * (n // max_tokens) + ([n % max_tokens] if n % max_tokens else []))
        else:
            sizes.extend(doc_len[doc_len > 0].tolist())
        n_over = int(long.sum())
        n_extra = int((-(-doc_len[long] // max_tokens) - 1).sum())
        n = len(sizes) - n_before
        if reasons[i] is None and n == 0:
            reasons[i] = "no_tokens"
        nitems.append(n)
        overlong.append(n_over)
        extra.append(n_extra)
    tokens = (tokens + FAIRSEQ_NSPECIAL).astype(_W["dtype"])
    return {"reasons": reasons, "digests": digests, "nitems": nitems, "overlong": overlong, "extra": extra,
            "sizes": np.asarray(sizes, dtype=np.int32), "tokens": tokens, "stats": [dict(st) for st in stats]}


class _Runner:
    """Ordered map over chunks, in this process (workers=1) or a bounded-window process pool."""

    def __init__(self, workers: int, initargs: tuple):
        self.workers = workers
        self.initargs = initargs
        self.pool = None

    def __enter__(self):
        # Both cases run with SINGLE_THREAD_ENV; this process's environment is restored on exit.
        self.saved = {k: os.environ.get(k) for k in SINGLE_THREAD_ENV}
        if self.workers > 1:
            # fork (Linux): workers inherit the imported modules, so a pool starts in milliseconds
            # instead of re-importing nltk/tokenizers/numpy per worker.  The pool is created before any
            # progress-bar thread exists, and the Rust tokenizer in the children never touches a thread
            # pool inherited from this process.
            method = "fork" if sys.platform.startswith("linux") else "spawn"
            os.environ.update(SINGLE_THREAD_ENV)
            self.pool = mp.get_context(method).Pool(self.workers, initializer=_init_worker, initargs=self.initargs)
        else:
            _init_worker(*self.initargs)
        return self

    def __exit__(self, *exc):
        try:
            if self.pool is not None:
                if exc[0] is None:
                    self.pool.close()
                else:
                    self.pool.terminate()
                self.pool.join()
        finally:
            for k, v in self.saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def map(self, fn, chunks: Iterator[tuple[object, list[str]]]):
        """Yields ``(meta, fn(texts))`` in order; ``chunks`` yields ``(meta, texts)``."""
        if self.pool is None:
            for meta, texts in chunks:
                yield meta, fn(texts)
            return
        window: deque = deque()
        for meta, texts in chunks:
            window.append((meta, self.pool.apply_async(fn, (texts,))))
            if len(window) >= 2 * self.workers + 2:
                m, r = window.popleft()
                yield m, r.get()
        while window:
            m, r = window.popleft()
            yield m, r.get()


def _chunks(items: Iterator[tuple[object, str]]) -> Iterator[tuple[list, list[str]]]:
    metas, texts, chars = [], [], 0
    for meta, text in items:
        metas.append(meta)
        texts.append(text)
        chars += len(text)
        if len(texts) >= CHUNK_DOCS or chars >= CHUNK_CHARS:
            yield metas, texts
            metas, texts, chars = [], [], 0
    if texts:
        yield metas, texts


# ----------------------------------------------------------------------------------------------------------
# Manifest helpers
# ----------------------------------------------------------------------------------------------------------


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1, sort_keys=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _file_record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _verify_files(folder: Path, files: dict) -> str | None:
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


def _split_files(split: str) -> list[str]:
    return [f"{split}.bin", f"{split}.idx", f"{split}.doc.npy"]


def _hash_unit(digest: bytes, salt: bytes) -> float:
    return int.from_bytes(hashlib.blake2b(salt + digest, digest_size=8).digest(), "little") / 2.0**64


# ----------------------------------------------------------------------------------------------------------
# prepare()
# ----------------------------------------------------------------------------------------------------------


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

    def _fingerprint(self, files: list[Path]) -> tuple[str, list[dict], dict]:
        inputs = []
        it = files
        if self.cfg.progress and sum(f.stat().st_size for f in files) > (64 << 20):
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
            v = getattr(self.cfg, name)
            if v is not None and Path(v).is_file():
                tok_src = {"path": str(Path(v).resolve()), "sha256": sha256_file(Path(v))}
        opts = self.cfg.result_options()
        blob = json.dumps({"format_version": FORMAT_VERSION, "options": opts, "tokenizer_source": tok_src,
                           "inputs": [(i["bytes"], i["sha256"]) for i in inputs]}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest(), inputs, tok_src

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
            try:
                with open(mpath, encoding="utf-8") as fh:
                    old = json.load(fh)
            except (OSError, json.JSONDecodeError):
                old = {}
            if old.get("fingerprint") == fingerprint:
                return old
            if _failed_start(old):
                # Nothing of value (no completed segment or shard): the leftovers of a run that failed or
                # was killed at its start must not block the corrected command.
                self._warn(f"{out}: replacing the leftovers of an earlier run that stopped before completing any "
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
            self._warn(w)
        self.given = self._given_tokenizer()
        fingerprint, inputs, tok_src = self._fingerprint(files)
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
                self._warn(f"{len(done)} completed segment(s) kept in {self.out}; fix the cause and re-run the same "
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
                        if (p := _verify_files(self.out / f"shard{s['shard']}", s[sp]["files"]))]
            if problems:
                raise ValueError(f"{self.out}: complete data-bin fails verification ({problems[0]}); "
                                 "re-run with --overwrite to rebuild it")
            shutil.rmtree(self.parts, ignore_errors=True)  # killed just before its clean-up
            _shard_dicts(self.out, len(resume["shards"]))  # a data-bin written before shards carried dict.txt
            self._log(f"{self.out}: already complete and verified; nothing to do")
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
        self._save()

        # 1. tokenizer (kept from a previous attempt when its file is intact)
        hf = self._tokenizer(files, tok_src)
        vocab_size = len(hf.backend_tokenizer.get_vocab(with_added_tokens=True))
        dtype = best_dtype(vocab_size + FAIRSEQ_NSPECIAL)
        m["dtype"] = dtype.name
        self._save()

        # 2. stream -> segments of part files
        total = sum(i["bytes"] for i in inputs)
        seg_bytes = max(1, int(cfg.segment_mb * (1 << 20)))
        nseg = max(1, math.ceil(total / seg_bytes))
        m["num_segments"] = nseg
        self._save()
        merged_all = len(m["shards"]) == cfg.shards and all(s.get("status") == "complete" for s in m["shards"])
        if not merged_all:
            self._stream(files, dtype, vocab_size, seg_bytes, nseg, total)
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
        m["dict"] = _file_record(self.out / "dict.txt")
        _shard_dicts(self.out, cfg.shards)
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
            self._warn(w)
        empty = [s["shard"] for s in m["shards"] if s["train"]["items"] == 0]
        if empty:
            self._warn(f"{len(empty)} of {cfg.shards} train shards are empty (shard{', shard'.join(map(str, empty))}): "
                       f"{totals['documents']} documents for --shards {cfg.shards}; alum-train refuses empty shards "
                       f"and fairseq cannot load them — re-run with --shards {max(1, min(cfg.shards - len(empty), totals['documents']))} "
                       "or fewer")
        for s in m["shards"]:
            if s["valid"]["items"] == 0 and cfg.valid_fraction > 0:
                self._warn(f"shard{s['shard']}/valid is empty (corpus too small for --valid-fraction "
                           f"{cfg.valid_fraction}); fairseq cannot load an empty split — raise --valid-fraction")
        m["status"] = "complete"
        self._save()
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

    def _warn(self, msg: str) -> None:
        """A warning: printed whatever --no-progress says, and kept in the manifest's ``warnings``."""
        self.warnings.append(msg)
        if "warnings" in self.manifest and msg not in self.manifest["warnings"]:
            self.manifest["warnings"].append(msg)  # saved with the manifest's next write
        print(f"alum-prep: warning: {msg}", file=sys.stderr)

    def _save(self) -> None:
        _write_json(self.out / MANIFEST, self.manifest)

    def _log(self, msg: str) -> None:
        if self.cfg.progress:
            print(f"alum-prep: {msg}", file=sys.stderr)

    def _docs(self, files) -> Iterator:
        c = self.cfg
        return iter(Reader(files, c.format, Decoder(c.on_decode_error), c.json_key, text_column=c.text_column,
                           title_column=c.title_column, keep_headings=c.keep_headings))

    def _initargs(self, tokenizer_file, dtype):
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
            self._log(f"training a {cfg.train_tokenizer} tokenizer (vocab {cfg.vocab_size}) on the corpus")
            workdir = self.out / "tokenizer_train.tmp"
            sent_file = self._write_sentences(files, workdir / "sentences.txt", cfg.tokenizer_train_sentences)
            hf, info = toks.train(cfg.train_tokenizer, lambda: _read_lines(sent_file), cfg.vocab_size,
                                  cfg.lowercase, mml, workdir, cfg.tokenizer_train_sentences, cfg.seed,
                                  byte_fallback=cfg.spm_byte_fallback)
            got = len(hf.backend_tokenizer.get_vocab(with_added_tokens=True))
            info["requested_vocab_size"] = cfg.vocab_size
            if got < cfg.vocab_size:
                self._warn(f"--vocab-size {cfg.vocab_size} was not reached: the corpus supports only {got} tokens "
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
        self._save()
        return hf

    def _write_sentences(self, files, path: Path, cap: int) -> Path:
        """The first ``cap`` cleaned sentences of the corpus, one per line, for tokenizer training.

        Written to a file by the worker pool first, so that the (multi-threaded) trainers never run while
        worker processes are being forked.  Sentences hold no newline (they come from one paragraph).
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        items = ((None, d.text) for d in self._docs(files) if d.text is not None)
        n = 0
        bar = None
        stats = Counter()
        with open(path, "w", encoding="utf-8") as fh, _Runner(self.cfg.workers, self._initargs(None, None)) as runner:
            if self.cfg.progress:
                from tqdm import tqdm

                bar = tqdm(desc="sentences for tokenizer training", unit="sent", file=sys.stderr)
            for _, res in runner.map(work_sentences, _chunks(items)):
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

    # -- streaming pass ------------------------------------------------------------------------------------

    def _stream(self, files, dtype, vocab_size, seg_bytes, nseg, total):
        cfg, m = self.cfg, self.manifest
        done = set()
        seen: set[bytes] = set()
        for j in range(nseg):
            # Only a prefix of complete segments is kept: the duplicate filter keeps a document's first
            # occurrence, so redoing a segment means redoing every segment after it.
            rec = m["segments"].get(str(j))
            if rec and rec.get("status") == "complete" and len(done) == j:
                sdir = self.parts / f"seg{j:05d}"
                problem = None
                for part, files_rec in rec["parts"].items():
                    problem = problem or _verify_files(sdir / part.rsplit("/", 1)[0], files_rec)
                if not (sdir / "digests.npy").exists() or not (sdir / "token_counts.npy").exists():
                    problem = problem or f"{sdir}: digests/token counts missing"
                if problem is None:
                    done.add(j)
                    seen.update(bytes(r) for r in np.load(sdir / "digests.npy"))
                    continue
                self._warn(f"segment {j} fails verification ({problem}); redoing it")
            m["segments"].pop(str(j), None)
            shutil.rmtree(self.parts / f"seg{j:05d}", ignore_errors=True)
        if done:
            self._log(f"resuming: {len(done)} of {nseg} segments already complete")
        if len(done) == nseg:
            return

        salt_shard = b"alum-prep-shard"
        salt_split = f"alum-prep-split-{cfg.seed}".encode()
        tokenizer_file = str(self.out / "tokenizer" / "tokenizer.json")
        state = {"seg": -1, "docs": 0, "t0": time.time(), "pos": 0}
        cur: dict = {}

        def open_segment(j):
            cur.clear()
            cur.update(j=j, builders={}, digests=[], counts=Counter(), dropped=Counter(), pending=[],
                       token_counts=np.zeros(vocab_size, dtype=np.int64), per_split=Counter())

        def builder(k, split):
            key = (k, split)
            if key not in cur["builders"]:
                prefix = self.parts / f"seg{cur['j']:05d}" / f"shard{k}" / split
                cur["builders"][key] = IndexedDatasetBuilder(prefix, dtype=dtype)
            return cur["builders"][key]

        def flush_counts():
            # Token frequencies for dict.txt: one bincount per chunk (not per document: a vocab-sized
            # array per document would cost more than the document).
            if cur and cur["pending"]:
                flat = np.concatenate(cur["pending"]).astype(np.int64) - FAIRSEQ_NSPECIAL
                cur["token_counts"] += np.bincount(flat, minlength=vocab_size)[:vocab_size]
                cur["pending"] = []

        def close_segment():
            flush_counts()
            j = cur["j"]
            sdir = self.parts / f"seg{j:05d}"
            sdir.mkdir(parents=True, exist_ok=True)
            parts = {}
            for (k, split), b in sorted(cur["builders"].items()):
                b.finalize()
                folder = sdir / f"shard{k}"
                parts[f"shard{k}/{split}"] = {n: _file_record(folder / n) for n in _split_files(split)}
            _save_npy(sdir / "digests.npy", np.frombuffer(b"".join(cur["digests"]), dtype=np.uint8).reshape(-1, 16))
            _save_npy(sdir / "token_counts.npy", cur["token_counts"])
            counts = dict(cur["counts"])
            counts["dropped"] = dict(cur["dropped"])
            m["segments"][str(j)] = {"status": "complete", "counts": counts, "parts": parts,
                                     "per_split": {f"{k}": v for k, v in cur["per_split"].items()}}
            self._save()

        def items():
            """Documents of segments not yet complete, as ((segment, skip reason, replacements), text)."""
            last = Decoder.replacements()
            for doc in self._docs(files):
                # Positions only grow; max() guards the invariant for readers with coarse positions.
                j = min(max(doc.pos // seg_bytes, state["seg"], 0), nseg - 1)
                state["seg"] = j
                now = Decoder.replacements()
                delta, last = now - last, now
                if bar is not None and doc.pos > state["pos"]:
                    bar.update(doc.pos - state["pos"])
                    state["pos"] = doc.pos
                if j in done:
                    continue
                yield (j, doc.skip, delta), (doc.text if doc.text is not None else "")

        bar = None
        try:
            with _Runner(cfg.workers, self._initargs(tokenizer_file, dtype.name)) as runner:
                if cfg.progress:  # created after the pool: no thread exists when the workers fork
                    from tqdm import tqdm

                    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="alum-prep",
                               file=sys.stderr, smoothing=0.1)
                for metas, res in runner.map(work_encode, _chunks(items())):
                    item_lo = tok_lo = 0
                    for i, (j, skip, delta) in enumerate(metas):
                        if not cur or cur["j"] != j:
                            if cur:
                                close_segment()
                            open_segment(j)
                        c = cur["counts"]
                        c["decode_replacements"] += delta
                        c["documents_read"] += 1
                        c.update(res["stats"][i])
                        n = res["nitems"][i]
                        sizes = res["sizes"][item_lo : item_lo + n]
                        ntok = int(sizes.sum())
                        tokens = res["tokens"][tok_lo : tok_lo + ntok]
                        item_lo += n
                        tok_lo += ntok
                        reason = skip or res["reasons"][i]
                        digest = res["digests"][i]
                        if reason is None and digest in seen:
                            reason = "duplicate"
                        if reason is not None:
                            cur["dropped"][reason] += 1
                            continue
                        seen.add(digest)
                        cur["digests"].append(digest)
                        k = int.from_bytes(hashlib.blake2b(salt_shard + digest, digest_size=8).digest(), "little") % cfg.shards
                        split = "valid" if _hash_unit(digest, salt_split) < cfg.valid_fraction else "train"
                        b = builder(k, split)
                        b.add_items(tokens, sizes)
                        b.end_document()
                        cur["pending"].append(tokens)
                        c["documents"] += 1
                        c["items"] += n
                        c["tokens"] += ntok
                        c["sentences"] += n - res["extra"][i]
                        c["overlong_sentences"] += res["overlong"][i]
                        c["overlong_extra_items"] += res["extra"][i]
                        cur["per_split"][f"shard{k}/{split}"] += 1
                        state["docs"] += 1
                    flush_counts()
                    if bar is not None:
                        el = max(time.time() - state["t0"], 1e-9)
                        bar.set_postfix(docs=state["docs"], docs_s=f"{state['docs'] / el:.0f}", refresh=False)
                if cur:
                    close_segment()
            if bar is not None:
                bar.update(total - state["pos"])
        except BaseException:
            for b in cur.get("builders", {}).values():
                b.abort()
            raise
        finally:
            if bar is not None:
                bar.close()
        # Segments that got no document at all (possible with tiny segments) are complete and empty.
        for j in range(nseg):
            if str(j) not in m["segments"]:
                sdir = self.parts / f"seg{j:05d}"
                sdir.mkdir(parents=True, exist_ok=True)
                _save_npy(sdir / "digests.npy", np.zeros((0, 16), dtype=np.uint8))
                _save_npy(sdir / "token_counts.npy", np.zeros(vocab_size, dtype=np.int64))
                m["segments"][str(j)] = {"status": "complete", "counts": {"dropped": {}}, "parts": {}, "per_split": {}}
        self._save()

    # -- merge ---------------------------------------------------------------------------------------------

    def _merge_shards(self):
        cfg, m = self.cfg, self.manifest
        old = {s["shard"]: s for s in m.get("shards", [])}
        shards = []
        for k in range(cfg.shards):
            sdir = self.out / f"shard{k}"
            rec = old.get(k)
            if rec and rec.get("status") == "complete":
                problems = [p for sp in SPLITS if (p := _verify_files(sdir, rec[sp]["files"]))]
                if not problems:
                    shards.append(rec)
                    continue
                if not self.parts.exists():
                    raise ValueError(f"{self.out}: shard{k} fails verification ({problems[0]}) and its parts are gone; "
                                     "re-run with --overwrite to rebuild")
                self._warn(f"shard{k} fails verification ({problems[0]}); rebuilding it")
            rec = {"shard": k, "status": "running"}
            for split in SPLITS:
                parts = [str(self.parts / f"seg{j:05d}" / f"shard{k}" / split) for j in range(m["num_segments"])
                         if (self.parts / f"seg{j:05d}" / f"shard{k}" / f"{split}.idx").exists()]
                prefix = sdir / split
                if parts:
                    merge(parts, prefix)
                else:  # no document of this corpus landed here: an empty (valid, readable) dataset
                    IndexedDatasetBuilder(prefix, dtype=np.dtype(m["dtype"])).finalize()
                ds = MMapIndexedDataset(prefix)
                rec[split] = {
                    "documents": ds.num_docs,
                    "items": len(ds),
                    "tokens": int(np.asarray(ds.sizes, dtype=np.int64).sum()),
                    "files": {n: _file_record(sdir / n) for n in _split_files(split)},
                }
            rec["status"] = "complete"
            shards.append(rec)
            m["shards"] = shards + [old[i] for i in range(k + 1, cfg.shards) if i in old]
            self._save()
        m["shards"] = shards
        self._save()


def _failed_start(old: dict) -> bool:
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


def _shard_dicts(out: Path, num_shards: int) -> None:
    """Put a copy of ``OUT/dict.txt`` in every ``OUT/shardK/`` folder (temp name, then rename).

    Stock fairseq tasks (``masked_lm``) load the dictionary from the *first* path of a colon-separated
    ``DATA=OUT/shard0:OUT/shard1:...`` list, so each shard must be a complete fairseq data folder on its
    own.  A copy (not a link) keeps that true after ``cp -r``, ``rsync`` or copying a single shard.
    Copies that already match the root file are left alone.
    """
    src = out / "dict.txt"
    data = src.read_bytes()
    for k in range(num_shards):
        dst = out / f"shard{k}" / "dict.txt"
        if dst.is_file() and not dst.is_symlink() and dst.read_bytes() == data:
            continue
        tmp = dst.with_name("dict.txt.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if dst.is_symlink():
            dst.unlink()
        os.replace(tmp, dst)


def _read_lines(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            yield line.rstrip("\n")


class EmptyCorpusError(ValueError):
    """No document survived reading and cleaning."""


def _save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, arr)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
