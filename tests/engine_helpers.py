"""Helpers for the engine tests: a small real data-bin (no ../shared needed), run launchers (in this process,
in a subprocess, under torchrun) and the readers of what a run wrote.

The corpus is the standard library's docstrings (the demo's corpus: real English on every machine),
tokenized with a small WordPiece vocabulary trained on it, written by ``tests/databin_factory.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
#: intra-op threads of every training run a test starts, in this process (:func:`run_train`) or in a child
#: (:func:`subprocess_env`): float reductions split over another number of threads round differently, so
#: runs compared bit for bit must use the same count (1: also the fastest for tiny models on shared cores)
THREADS = 1
#: multi-process parity runs: dropout draws are per process, so runs agree only without dropout
PARITY = ("--model.dropout=0", "--alum.epsilon=1e-3", "--alum.noise_std=1e-3", "--train.eval_every=3",
          "--train.keep_last=5")

COMMON = [
    "--model.preset=tiny",
    "--data.max_seq_len=32",
    "--train.batch_size=4",
    "--train.log_every=1",
    "--train.progress=false",
    "--train.eval_batches=2",
    "--optim.lr=1e-3",
    "--optim.warmup_ratio=0.1",
]

_SENT = re.compile(r"(?<=[a-z0-9)][.?!])\s+(?=[A-Z])")


def split_sentences(paragraph: str) -> list[str]:
    return [s for s in _SENT.split(paragraph) if s.strip()]


SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
#: the WordPiece vocabularies of the test data-bins, ``{"N_DOCS-VOCAB_SIZE": [token, ...]}`` (specials left out)
VOCABS = Path(__file__).resolve().with_name("stdlib_vocabs.json")
#: the (n_docs, vocab_size) pairs the tests use: ``python tests/engine_helpers.py`` writes VOCABS for them
VOCAB_KEYS = ((120, 1000), (60, 1000), (40, 1000), (30, 1000), (20, 1000), (60, 600), (60, 400), (40, 400))


def stdlib_docs(n_docs: int) -> list[list[str]]:
    """The first ``n_docs`` standard-library documents (the demo's corpus) as lists of sentences."""
    from alum_pretrain.demo import stdlib_documents

    return [[s for p in d for s in split_sentences(p)] for d in stdlib_documents(max_docs=n_docs)]


def train_vocab(docs: list[list[str]], vocab_size: int) -> list[str]:
    """A WordPiece vocabulary trained on ``docs`` by ``tokenizers``: its tokens but the specials, sorted."""
    from tokenizers import BertWordPieceTokenizer

    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator((s for d in docs for s in d), vocab_size=vocab_size, min_frequency=2,
                           special_tokens=SPECIALS, show_progress=False)
    return sorted(t for t in wp.get_vocab() if t not in SPECIALS)


def stdlib_vocab(n_docs: int, vocab_size: int, docs: list[list[str]]) -> dict[str, int]:
    """``token -> id`` for a test data-bin: the specials, then the tokens sorted as strings.

    Stored in :data:`VOCABS` rather than trained per process: the WordPiece trainer of ``tokenizers`` breaks
    ties between merges of equal count in hash order, which changes from process to process - the ids (73
    of 1000 moved between two builds) and, at 400 tokens, the set itself (6 tokens) - so every test session
    trained on other data: other weights, other float rounding, other margins.  A pair not stored is trained."""
    stored = json.loads(VOCABS.read_text(encoding="utf-8")) if VOCABS.exists() else {}
    tokens = stored.get(f"{n_docs}-{vocab_size}") or train_vocab(docs, vocab_size)
    return {t: i for i, t in enumerate(SPECIALS + tokens)}


def make_stdlib_databin(out: Path, n_docs: int = 120, vocab_size: int = 1000, permute_seed: int | None = None) -> Path:
    """A data-bin of ``n_docs`` standard-library documents (12 of them the valid split), the same bytes in
    every process (:func:`stdlib_vocab`).  ``permute_seed``: the same tokens under other ids (another
    vocabulary of the same size)."""
    from transformers import BertTokenizerFast

    from databin_factory import make_databin

    docs = stdlib_docs(n_docs)
    vocab = stdlib_vocab(n_docs, vocab_size, docs)
    if permute_seed is not None:
        import random

        rest = sorted((t for t, i in vocab.items() if i >= 5), key=vocab.get)
        random.Random(permute_seed).shuffle(rest)
        vocab = {**{t: i for t, i in vocab.items() if i < 5}, **{t: 5 + k for k, t in enumerate(rest)}}
    tok = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    return make_databin(out, [{"train": docs[:-12], "valid": docs[-12:]}], None, tokenizer=tok)


def train_args(databin: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [f"--data.path={databin}", f"--train.output_dir={out}", f"--train.max_steps={steps}", *COMMON, *extra]


@contextlib.contextmanager
def pinned_threads(n: int = THREADS):
    """torch's intra-op thread count set to ``n`` inside the block, restored after it."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_train(databin: Path, out: Path, steps: int, *extra: str, threads: int = THREADS) -> int:
    """``alum-train`` in this process with ``threads`` intra-op threads, whatever the caller's (a
    module-scoped fixture runs before the function-scoped ``one_thread`` fixture, under the default count)."""
    from alum_pretrain.train import main

    with pinned_threads(threads):
        return main(train_args(databin, out, steps, *extra))


def subprocess_env(*extra_paths: Path, **env: str) -> dict:
    """The environment of a child Python: this checkout (then ``extra_paths``) first on PYTHONPATH, :data:`THREADS`."""
    path = os.pathsep.join([str(ROOT), *map(str, extra_paths), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": str(THREADS), "PYTHONPATH": path, **env}


def torchrun(script: list[str], args: list[str], timeout: int = 300, nproc: int = 2,
             **env: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node nproc SCRIPT ARGS`` (``script``: ``["-m", module]`` or a path)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *script,
           *args]
    return subprocess.run(cmd, env=subprocess_env(**env), cwd=str(ROOT), capture_output=True, text=True,
                          timeout=timeout)


def torchrun_train(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """``alum-train ARGS`` in two processes under torchrun."""
    return torchrun(["-m", "alum_pretrain.train"], args, timeout=timeout)


def read_log(out: Path, kind: str = "train") -> list[dict]:
    recs = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in recs if r.get("kind", "train") == kind]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from alum_pretrain.engine.checkpoint import latest_checkpoint

    ck = latest_checkpoint(out)
    assert ck is not None, f"no checkpoint in {out}"
    return load_file(str(ck / "model" / "model.safetensors"))


def max_weight_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


if __name__ == "__main__":  # (re)write VOCABS: python tests/engine_helpers.py
    VOCABS.write_text(json.dumps({f"{n}-{v}": train_vocab(stdlib_docs(n), v) for n, v in VOCAB_KEYS}, indent=0)
                      + "\n", encoding="utf-8")
    print(f"wrote {VOCABS}")
