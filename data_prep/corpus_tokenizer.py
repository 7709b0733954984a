"""The data-bin's tokenizer: a given one (``--vocab``, ``--spm-model``, ``--tokenizer-json``), loaded and so
checked before anything is written, or one trained on the corpus's first cleaned sentences.  Either way it
is saved under ``OUT/tokenizer/`` and recorded (with its SHA-256) in the manifest, so a resumed run reuses
it when the file is intact.
"""

from __future__ import annotations

import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator

from alum_pretrain.integrity import sha256_file

from . import work
from . import tokenizer as toks
from .config import PrepConfig
from .hygiene import EmptyCorpusError, check_not_mostly_garbage


def given_tokenizer(cfg: PrepConfig):
    """``(hf tokenizer, info)`` of the given tokenizer file, or None when one is to be trained."""
    mml = cfg.max_tokens + 2
    if cfg.vocab:
        return toks.from_vocab(cfg.vocab, cfg.lowercase, mml)
    if cfg.spm_model:
        return toks.from_spm(cfg.spm_model, mml)
    if cfg.tokenizer_json:
        return toks.from_tokenizer_json(cfg.tokenizer_json, mml)
    return None


def databin_tokenizer(prep, files, tok_src: dict):
    """The tokenizer of the data-bin ``prep`` (a :class:`data_prep.pipeline.Preparer`) writes: the one in
    ``OUT/tokenizer`` when the manifest vouches for it, else ``prep.given`` or one trained on ``files``;
    saved to ``OUT/tokenizer`` and recorded in the manifest's ``tokenizer``."""
    cfg, m = prep.cfg, prep.manifest
    tdir = prep.out / "tokenizer"
    rec = m.get("tokenizer")
    if rec and (tdir / "tokenizer.json").exists() and sha256_file(tdir / "tokenizer.json") == rec.get("sha256"):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tdir))
    try:  # the training folder goes whether training ends, fails or is stopped by a signal
        hf, info = prep.given if prep.given is not None else _train(prep, files)
        toks.save(hf, tdir)
        if cfg.train_tokenizer and cfg.train_tokenizer.startswith("spm"):
            shutil.copy(prep.out / "tokenizer_train.tmp" / "spm.model", tdir / "spm.model")
        elif cfg.spm_model:
            shutil.copy(cfg.spm_model, tdir / "spm.model")
    finally:
        shutil.rmtree(prep.out / "tokenizer_train.tmp", ignore_errors=True)
    m["tokenizer"] = {
        **info,
        "source": tok_src.get("path") or f"trained on the corpus ({cfg.train_tokenizer})",
        "vocab_size": len(hf.backend_tokenizer.get_vocab(with_added_tokens=True)),
        "special_tokens": toks.special_tokens(hf),
        "special_ids": toks.special_ids(hf),
        "sha256": sha256_file(tdir / "tokenizer.json"),
    }
    prep.save()
    return hf


def _train(prep, files):
    """``(hf tokenizer, info)`` trained on the first ``tokenizer_train_sentences`` sentences of the corpus."""
    cfg = prep.cfg
    prep.log(f"training a {cfg.train_tokenizer} tokenizer (vocab {cfg.vocab_size}) on the corpus")
    workdir = prep.out / "tokenizer_train.tmp"
    sent_file = training_sentences(prep, files, workdir / "sentences.txt", cfg.tokenizer_train_sentences)
    hf, info = toks.train(cfg.train_tokenizer, lambda: _read_lines(sent_file), cfg.vocab_size,
                          cfg.lowercase, cfg.max_tokens + 2, workdir, cfg.tokenizer_train_sentences, cfg.seed,
                          byte_fallback=cfg.spm_byte_fallback)
    got = len(hf.backend_tokenizer.get_vocab(with_added_tokens=True))
    info["requested_vocab_size"] = cfg.vocab_size
    if got < cfg.vocab_size:
        prep.warn(f"--vocab-size {cfg.vocab_size} was not reached: the corpus supports only {got} tokens "
                  f"(special tokens included), so the vocabulary has {got}; the trainer found no more "
                  "pieces to add — use a larger corpus or a smaller --vocab-size")
    return hf, info


def training_sentences(prep, files, path: Path, cap: int) -> Path:
    """The first ``cap`` cleaned sentences of the corpus, one per line, for tokenizer training.

    Written to a file by the worker pool first, so that the (multi-threaded) trainers never run while
    worker processes are being forked.  Sentences hold no newline (they come from one paragraph).
    """
    cfg = prep.cfg
    path.parent.mkdir(parents=True, exist_ok=True)
    items = ((None, d.text) for d in prep.docs(files) if d.text is not None)
    n = 0
    bar = None
    stats = Counter()
    with open(path, "w", encoding="utf-8") as fh, work.Runner(cfg.workers, prep.initargs(None, None)) as runner:
        if cfg.progress:
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
        check_not_mostly_garbage({**stats, "dropped": {"garbled": stats["garbled"]}}, cfg.max_garbage_frac,
                                 cfg.inputs)
        raise EmptyCorpusError(
            f"empty corpus: no sentence to train a tokenizer on in {', '.join(cfg.inputs)} "
            f"({stats['documents_read']} documents read, all empty, too short or garbled); check --format and the inputs"
        )
    return path


def _read_lines(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            yield line.rstrip("\n")
