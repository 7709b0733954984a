"""The streaming pass (documents -> per-segment part files) and the merge of parts into shards.

Restart granularity is a *segment*: the input stream is cut by input byte position into segments of
``segment_mb``.  Each segment writes its own part files ``OUT/.parts/segJ/shardK/{train,valid}``
(atomically), saves the digests of its documents (for the duplicate filter) and its token counts, and
only then is recorded ``complete`` in the manifest.  When all segments are done, each shard's parts are
concatenated into ``OUT/shardK/{train,valid}.{bin,idx,doc.npy}``, whose sizes and SHA-256 are recorded.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alum_pretrain.atomic import atomic_file
from alum_pretrain.data.databin import FAIRSEQ_NSPECIAL
from alum_pretrain.data.indexed import IndexedDatasetBuilder, MMapIndexedDataset, merge

from . import engines, work
from .manifest import SPLITS, encoding_record, file_record, save_npy, split_files, verify_files
from .readers import Decoder

SALT_SHARD = b"alum-prep-shard"


def _hash_unit(digest: bytes, salt: bytes) -> float:
    return int.from_bytes(hashlib.blake2b(salt + digest, digest_size=8).digest(), "little") / 2.0**64


def shard_of(digest: bytes, shards: int) -> int:
    return int.from_bytes(hashlib.blake2b(SALT_SHARD + digest, digest_size=8).digest(), "little") % shards


@dataclass
class Segment:
    """The documents of one segment being written: part-file builders and counters."""

    j: int
    folder: Path
    dtype: np.dtype
    vocab_size: int
    builders: dict = field(default_factory=dict)
    digests: list = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    per_split: Counter = field(default_factory=Counter)
    pending: list = field(default_factory=list)
    token_counts: np.ndarray | None = None

    def __post_init__(self):
        self.token_counts = np.zeros(self.vocab_size, dtype=np.int64)

    def add(self, digest: bytes, k: int, split: str, tokens: np.ndarray, sizes: np.ndarray) -> None:
        key = (k, split)
        if key not in self.builders:
            self.builders[key] = IndexedDatasetBuilder(self.folder / f"shard{k}" / split, dtype=self.dtype)
        self.builders[key].add_items(tokens, sizes)
        self.builders[key].end_document()
        self.digests.append(digest)
        self.pending.append(tokens)
        self.per_split[f"shard{k}/{split}"] += 1

    def flush_counts(self) -> None:
        # Token frequencies for dict.txt: one bincount per chunk (not per document: a vocab-sized
        # array per document would cost more than the document).
        if self.pending:
            flat = np.concatenate(self.pending).astype(np.int64) - FAIRSEQ_NSPECIAL
            self.token_counts += np.bincount(flat, minlength=self.vocab_size)[: self.vocab_size]
            self.pending = []

    def close(self) -> dict:
        """Finalize the part files, save digests and token counts; -> the segment's manifest record."""
        self.flush_counts()
        self.folder.mkdir(parents=True, exist_ok=True)
        parts = {}
        for (k, split), b in sorted(self.builders.items()):
            b.finalize()
            parts[f"shard{k}/{split}"] = {n: file_record(self.folder / f"shard{k}" / n) for n in split_files(split)}
        save_npy(self.folder / "digests.npy", np.frombuffer(b"".join(self.digests), dtype=np.uint8).reshape(-1, 16))
        save_npy(self.folder / "token_counts.npy", self.token_counts)
        counts = dict(self.counts)
        counts["dropped"] = dict(self.dropped)
        return {"status": "complete", "counts": counts, "parts": parts, "per_split": dict(self.per_split)}

    def abort(self) -> None:
        for b in self.builders.values():
            b.abort()


class Streamer:
    """One streaming pass of a :class:`data_prep.pipeline.Preparer` over the segments not yet complete."""

    def __init__(self, prep, files, dtype, vocab_size: int, seg_bytes: int, nseg: int, total: int):
        self.prep, self.cfg, self.manifest = prep, prep.cfg, prep.manifest
        self.files, self.dtype, self.vocab_size = files, dtype, vocab_size
        self.seg_bytes, self.nseg, self.total = seg_bytes, nseg, total
        self.done: set[int] = set()
        self.seen: set[bytes] = set()  # digests of the documents kept so far (the duplicate filter)
        self.cur: Segment | None = None
        self.bar = None
        self.seg = -1  # segment of the last document read
        self.pos = 0  # input position shown by the progress bar
        self.docs = 0
        self.choice: dict | None = None  # the engine choice (engines.IdentityCheck.decide), once made

    def folder(self, j: int) -> Path:
        return self.prep.parts / f"seg{j:05d}"

    def run(self) -> None:
        self.resume()
        if len(self.done) == self.nseg:
            return
        salt_split = f"alum-prep-split-{self.cfg.seed}".encode()
        tokenizer_file = str(self.prep.out / "tokenizer" / "tokenizer.json")
        check = engines.IdentityCheck(self.cfg.tokenizer_engine)
        if check.requested == "hf":
            self.decide(check)
        t0 = time.time()
        try:
            initargs = self.prep.initargs(tokenizer_file, self.dtype.name, check.requested)
            with work.Runner(self.cfg.workers, initargs) as runner:
                self.prep.mark("workers_start")
                if self.cfg.progress:  # created after the pool: no thread exists when the workers fork
                    from tqdm import tqdm

                    self.bar = tqdm(total=self.total, unit="B", unit_scale=True, unit_divisor=1024, desc="alum-prep",
                                    file=sys.stderr, smoothing=0.1)
                for (metas, last), res in runner.map_calls(self.calls(check.requested)):
                    if "check" in res:
                        check.add(res["check"])
                        if last:  # every sample chunk is in (results come in input order)
                            self.decide(check)
                    self.take(metas, res, salt_split)
                    if self.bar is not None:
                        el = max(time.time() - t0, 1e-9)
                        self.bar.set_postfix(docs=self.docs, docs_s=f"{self.docs / el:.0f}", refresh=False)
                self.prep.mark("stream")
                if self.choice is None:  # a corpus smaller than the sample
                    self.decide(check)
                if self.cur is not None:
                    self.close_segment()
            if self.bar is not None:
                self.bar.update(self.total - self.pos)
        except BaseException:
            if self.cur is not None:
                self.cur.abort()
            raise
        finally:
            if self.bar is not None:
                self.bar.close()
        # Segments that got no document at all (possible with tiny segments) are complete and empty.
        m = self.manifest
        for j in range(self.nseg):
            if str(j) not in m["segments"]:
                save_npy(self.folder(j) / "digests.npy", np.zeros((0, 16), dtype=np.uint8))
                save_npy(self.folder(j) / "token_counts.npy", np.zeros(self.vocab_size, dtype=np.int64))
                m["segments"][str(j)] = {"status": "complete", "counts": {"dropped": {}}, "parts": {}, "per_split": {}}
        self.prep.save()
        self.prep.mark("stream_end")

    def calls(self, requested: str):
        """The worker calls of the pass, ``((metas, last sample chunk?), fn, args)``: the chunks that start
        within the first :data:`~data_prep.engines.SAMPLE_CHARS` characters (at most
        :data:`~data_prep.engines.SAMPLE_CHUNKS`) are the identity check's sample (:func:`work.work_check`;
        none for ``--tokenizer-engine hf``), the others plain :func:`work.work_encode` calls."""
        chars, k = 0, 0
        sampling = requested != "hf"
        for metas, texts in work.chunks(self.items()):
            if not sampling:
                yield (metas, False), work.work_encode, (texts,)
                continue
            chars += sum(map(len, texts))
            last = chars >= engines.SAMPLE_CHARS or k + 1 == engines.SAMPLE_CHUNKS
            yield (metas, last), work.work_check, (texts, k, last)
            k += 1
            sampling = not last

    def decide(self, check: "engines.IdentityCheck") -> None:
        """Record the engine choice (``encoding`` in the manifest, written with the next segment's record)
        and say it (ValueError for a failed ``--tokenizer-engine kitoken``)."""
        self.choice = choice = check.decide()
        self.manifest["encoding"] = encoding_record(choice)
        if choice["engine"] == "kitoken":
            self.note(f"encoding with kitoken ({choice['reason']})")
        elif check.requested != "hf":
            self.note(f"encoding with HF tokenizers: {choice['reason']}")

    def note(self, msg: str) -> None:
        """:meth:`Preparer.log`, above the progress bar when there is one."""
        if self.bar is not None:
            self.bar.write(f"alum-prep: {msg}", file=sys.stderr)
        else:
            self.prep.log(msg)

    def resume(self) -> None:
        """Keep the verified prefix of complete segments (and their digests); delete the rest.

        Only a prefix is kept: the duplicate filter keeps a document's first occurrence, so redoing a
        segment means redoing every segment after it."""
        segments = self.manifest["segments"]
        for j in range(self.nseg):
            rec = segments.get(str(j))
            sdir = self.folder(j)
            if rec and rec.get("status") == "complete" and len(self.done) == j:
                problem = None
                for part, files_rec in rec["parts"].items():
                    problem = problem or verify_files(sdir / part.rsplit("/", 1)[0], files_rec)
                if not (sdir / "digests.npy").exists() or not (sdir / "token_counts.npy").exists():
                    problem = problem or f"{sdir}: digests/token counts missing"
                if problem is None:
                    self.done.add(j)
                    self.seen.update(bytes(r) for r in np.load(sdir / "digests.npy"))
                    continue
                self.prep.warn(f"segment {j} fails verification ({problem}); redoing it")
            segments.pop(str(j), None)
            shutil.rmtree(sdir, ignore_errors=True)
        if self.done:
            self.prep.log(f"resuming: {len(self.done)} of {self.nseg} segments already complete")

    def items(self):
        """Documents of segments not yet complete, as ((segment, skip reason, replacements), text)."""
        last = Decoder.replacements()
        for doc in self.prep.docs(self.files):
            # Positions only grow; max() guards the invariant for readers with coarse positions.
            j = min(max(doc.pos // self.seg_bytes, self.seg, 0), self.nseg - 1)
            self.seg = j
            now = Decoder.replacements()
            delta, last = now - last, now
            if self.bar is not None and doc.pos > self.pos:
                self.bar.update(doc.pos - self.pos)
                self.pos = doc.pos
            if j in self.done:
                continue
            yield (j, doc.skip, delta), (doc.text if doc.text is not None else "")

    def close_segment(self) -> None:
        self.manifest["segments"][str(self.cur.j)] = self.cur.close()
        self.prep.save()

    def take(self, metas: list, res: dict, salt_split: bytes) -> None:
        """File the documents of one worker result into their segment, shard and split (in input order)."""
        item_lo = tok_lo = 0
        for i, (j, skip, delta) in enumerate(metas):
            if self.cur is None or self.cur.j != j:
                if self.cur is not None:
                    self.close_segment()
                self.cur = Segment(j, self.folder(j), self.dtype, self.vocab_size)
            seg, c = self.cur, self.cur.counts
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
            if reason is None and digest in self.seen:
                reason = "duplicate"
            if reason is not None:
                seg.dropped[reason] += 1
                continue
            self.seen.add(digest)
            split = "valid" if _hash_unit(digest, salt_split) < self.cfg.valid_fraction else "train"
            seg.add(digest, shard_of(digest, self.cfg.shards), split, tokens, sizes)
            c["documents"] += 1
            c["items"] += n
            c["tokens"] += ntok
            c["sentences"] += n - res["extra"][i]
            c["overlong_sentences"] += res["overlong"][i]
            c["overlong_extra_items"] += res["extra"][i]
            self.docs += 1
        if self.cur is not None:
            self.cur.flush_counts()


def merge_shards(prep) -> None:
    """Concatenate each shard's part files into ``OUT/shardK`` (shards already complete and intact are kept)."""
    cfg, m = prep.cfg, prep.manifest
    old = {s["shard"]: s for s in m.get("shards", [])}
    shards = []
    for k in range(cfg.shards):
        sdir = prep.out / f"shard{k}"
        rec = old.get(k)
        if rec and rec.get("status") == "complete":
            problems = [p for sp in SPLITS if (p := verify_files(sdir, rec[sp]["files"]))]
            if not problems:
                shards.append(rec)
                continue
            if not prep.parts.exists():
                raise ValueError(f"{prep.out}: shard{k} fails verification ({problems[0]}) and its parts are gone; "
                                 "re-run with --overwrite to rebuild")
            # A one-part shard shares its files with the part (publish_part): check the parts before using them.
            bad = [p for j, seg in m["segments"].items() for part, files in seg.get("parts", {}).items()
                   if part.startswith(f"shard{k}/") and (p := verify_files(prep.parts / f"seg{int(j):05d}" / f"shard{k}", files))]
            if bad:
                raise ValueError(f"{prep.out}: shard{k} fails verification ({problems[0]}) and so do its parts "
                                 f"({bad[0]}); re-run with --overwrite to rebuild")
            prep.warn(f"shard{k} fails verification ({problems[0]}); rebuilding it")
        rec = {"shard": k, "status": "running"}
        for split in SPLITS:
            parts = [str(prep.parts / f"seg{j:05d}" / f"shard{k}" / split) for j in range(m["num_segments"])
                     if (prep.parts / f"seg{j:05d}" / f"shard{k}" / f"{split}.idx").exists()]
            prefix = sdir / split
            if len(parts) == 1:  # one segment: the part's files are the shard's files
                publish_part(parts[0], prefix)
            elif parts:
                merge(parts, prefix)
            else:  # no document of this corpus landed here: an empty (valid, readable) dataset
                IndexedDatasetBuilder(prefix, dtype=np.dtype(m["dtype"])).finalize()
            ds = MMapIndexedDataset(prefix)
            rec[split] = {
                "documents": ds.num_docs,
                "items": len(ds),
                "tokens": int(np.asarray(ds.sizes, dtype=np.int64).sum()),
                "files": {n: file_record(sdir / n) for n in split_files(split)},
            }
        rec["status"] = "complete"
        shards.append(rec)
        m["shards"] = shards + [old[i] for i in range(k + 1, cfg.shards) if i in old]
        prep.save()
    m["shards"] = shards
    prep.save()


def publish_part(part: str, prefix: Path) -> None:
    """Publish the one part of a shard under ``prefix``: its ``.bin``, ``.doc.npy`` and ``.idx`` (in this order,
    ``.idx`` last as :func:`~alum_pretrain.data.indexed.merge` does) are exactly what a merge of that part
    alone writes, so each is hard-linked (copied where the file system has no hard links) through a
    temporary name, durably.  The part folder is deleted when the data-bin is complete; until then a
    resumed run verifies the parts against their recorded SHA-256 before using them."""
    for ext in (".bin", ".doc.npy", ".idx"):
        src = Path(part + ext)
        with atomic_file(f"{prefix}{ext}", durable=True) as tmp:
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)
