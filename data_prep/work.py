"""Worker side of alum-prep: one chunk of raw documents -> cleaned sentences -> token ids.

A worker converts markup to text (WikiText markers, wikitext via ``wikiextractor``), cleans
(:func:`data_prep.clean.clean_text`), splits sentences (:mod:`data_prep.clean`) and encodes all sentences
of a chunk with one ``encode_batch`` call of an encoding engine (:mod:`data_prep.engines`).  The identity
check of the engines runs here too: a *sample* chunk (:func:`work_check`) is encoded with both engines and
HF's ids are kept; each sample chunk's outcome is published on a small shared board (:class:`Board`), and
a worker encodes with kitoken only once the board says that every sample chunk matched, with HF
``tokenizers`` before that or when one differed.  :class:`Runner` maps functions over chunks in input
order, in this process (``workers=1``) or in a pool of worker processes; each worker is one process on one
core (the tokenizer's own thread pool is off, :data:`SINGLE_THREAD_ENV`).
"""

from __future__ import annotations

import hashlib
import html
import multiprocessing as mp
import os
import sys
from collections import Counter, deque
from itertools import chain
from typing import Iterator

import numpy as np

from alum_pretrain import stopping
from alum_pretrain.data.databin import FAIRSEQ_NSPECIAL

from . import engines
from .clean import SPLITTERS, clean_text
from .hygiene import is_garbled
from .readers import WIKITEXT_HEADING_RE, WIKITEXT_TITLE_RE

# A chunk (the unit sent to a worker) closes at this many documents or characters, whichever first:
# big enough to amortise inter-process traffic, small enough to keep every worker busy.
CHUNK_DOCS = 256
CHUNK_CHARS = 1 << 17
# Set in every worker (and in this process while it encodes with workers=1): the Rust tokenizer's
# encode_batch otherwise spreads over all cores, so that "--workers N" would use more than N cores.
SINGLE_THREAD_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}


_W: dict = {}


class Board:
    """The identity check's outcome, shared by the main process and the workers (a byte array in shared
    memory, so fork and spawn workers see it): slot 0 holds the number of sample chunks once the last one
    is known, slot ``1 + k`` the outcome of sample chunk ``k`` (0 pending, 1 same ids, 2 different or
    kitoken unavailable).  Each slot has one writer, the worker that checked that chunk."""

    def __init__(self, ctx=mp):
        self.slots = ctx.RawArray("b", engines.SAMPLE_CHUNKS + 1)

    def report(self, k: int, same: bool, last: bool) -> None:
        self.slots[1 + k] = 1 if same else 2
        if last:
            self.slots[0] = k + 1

    def kitoken_verified(self) -> bool:
        n = self.slots[0]
        return n > 0 and all(self.slots[1 + k] == 1 for k in range(n))


def _init_worker(fmt: str, keep_headings: bool, min_doc_chars: int, tokenizer_file: str | None,
                 max_tokens: int, dtype: str | None, splitter: str = "rules", max_garbage_frac: float = 1.0,
                 engine: str = "hf", board: Board | None = None) -> None:
    """Per-process state.  ``engine`` is the run's ``--tokenizer-engine``: HF is always loaded (it encodes
    the sample and everything before the check is through), kitoken too unless ``engine`` is ``hf``."""
    # One worker = one core: the Rust tokenizer must not run its own thread pool beside the workers.
    os.environ.update(SINGLE_THREAD_ENV)
    _W.clear()
    _W.update(fmt=fmt, keep_headings=keep_headings, min_doc_chars=min_doc_chars, max_tokens=max_tokens,
              splitter=SPLITTERS[splitter](), dtype=np.dtype(dtype) if dtype else None, hf=None, kt=None,
              kt_error=None, board=board, verified=False, checking=None, max_garbage_frac=max_garbage_frac)
    if tokenizer_file is not None:
        _W["hf"] = engines.load("hf", tokenizer_file)
        if engine != "hf":
            try:
                _W["kt"] = engines.load("kitoken", tokenizer_file)
            except engines.EngineUnavailable as e:
                _W["kt_error"] = str(e)


def _init_pool_worker(*initargs) -> None:
    """A pool worker: the parent's stop-signal handlers are not inherited (it stops the pool itself)."""
    stopping.child_defaults()
    _init_worker(*initargs)


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
    ids, check = _encode(flat)
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
    out = {"reasons": reasons, "digests": digests, "nitems": nitems, "overlong": overlong, "extra": extra,
           "sizes": np.asarray(sizes, dtype=np.int32), "tokens": tokens, "stats": [dict(st) for st in stats]}
    if check is not None:
        out["check"] = check
    return out


def work_check(texts: list[str], k: int, last: bool) -> dict:
    """:func:`work_encode` for sample chunk ``k`` of the identity check (``last``: the final one): the
    sentences are encoded with both engines, HF's ids are kept, and the result's ``check`` holds the
    comparison (:func:`data_prep.engines.compare`), also published on the board."""
    _W["checking"] = (k, last)
    try:
        return work_encode(texts)
    finally:
        _W["checking"] = None


def _encode(sentences: list[str]) -> tuple[list, dict | None]:
    """-> (ids of ``sentences``, the identity-check record of a sample chunk or None)."""
    if _W["checking"] is None:
        if not _W["verified"] and _W["kt"] is not None and _W["board"] is not None:
            _W["verified"] = _W["board"].kitoken_verified()  # once every sample chunk has matched, for good
        return (_W["kt"] if _W["verified"] else _W["hf"]).encode_batch(sentences), None
    k, last = _W["checking"]
    ids = _W["hf"].encode_batch(sentences)
    rec = engines.compare(ids, _W["kt"], sentences, _W["kt_error"])
    if _W["board"] is not None:
        _W["board"].report(k, rec["diff"] is None and rec["unavailable"] is None, last)
    return ids, rec


class Runner:
    """Ordered map over chunks, in this process (workers=1) or a bounded-window process pool."""

    def __init__(self, workers: int, initargs: tuple):
        self.workers = workers
        self.initargs = initargs
        self.pool = None
        self.board: Board | None = None  # the identity check's board, shared with the workers

    def __enter__(self):
        # Both cases run with SINGLE_THREAD_ENV; this process's environment is restored on exit.
        self.saved = {k: os.environ.get(k) for k in SINGLE_THREAD_ENV}
        if self.workers > 1:
            # fork (Linux): workers inherit the imported modules, so a pool starts in milliseconds
            # instead of re-importing nltk/tokenizers/numpy per worker.  The pool is created before any
            # progress-bar thread exists, and the Rust tokenizer in the children never touches a thread
            # pool inherited from this process.
            ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            os.environ.update(SINGLE_THREAD_ENV)
            self.board = Board(ctx)
            self.pool = ctx.Pool(self.workers, initializer=_init_pool_worker,
                                 initargs=(*self.initargs, self.board))
        else:
            self.board = Board()
            _init_worker(*self.initargs, self.board)
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
        return self.map_calls((meta, fn, (texts,)) for meta, texts in chunks)

    def map_calls(self, calls: Iterator[tuple[object, object, tuple]]):
        """Yields ``(meta, fn(*args))`` in order; ``calls`` yields ``(meta, fn, args)`` (``fn`` a module-level
        function of this module, so that a pool worker can find it)."""
        if self.pool is None:
            for meta, fn, args in calls:
                yield meta, fn(*args)
            return
        window: deque = deque()
        for meta, fn, args in calls:
            window.append((meta, self.pool.apply_async(fn, args)))
            if len(window) >= 2 * self.workers + 2:
                m, r = window.popleft()
                yield m, _result(r)
        while window:
            m, r = window.popleft()
            yield m, _result(r)


#: The longest wait for one chunk's result from a pool worker.  A chunk is at most CHUNK_DOCS documents /
#: CHUNK_CHARS characters (seconds of work); a worker killed from outside (the OOM killer) loses its chunk
#: and the pool never answers, so the wait is bounded and then a clear error instead of a hang.
CHUNK_TIMEOUT_S = 3600.0


def _result(r):
    try:
        return r.get(timeout=CHUNK_TIMEOUT_S)
    except mp.TimeoutError:
        raise TimeoutError(f"a worker gave no result for one chunk of documents in {CHUNK_TIMEOUT_S:.0f} s (killed, "
                           "e.g. out of memory?); re-run the same command to resume, with fewer --workers") from None


def chunks(items: Iterator[tuple[object, str]]) -> Iterator[tuple[list, list[str]]]:
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
