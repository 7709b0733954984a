"""Helpers for the engine tests: a small real data-bin (no ../shared needed), run launchers (in this process,
in a subprocess, under torchrun) and the readers of what a run wrote.

The corpus is the standard library's docstrings (the demo's corpus: real English on every machine),
tokenized with a small WordPiece vocabulary trained on it, written by ``tests/databin_factory.py``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
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


def make_stdlib_databin(out: Path, n_docs: int = 120, vocab_size: int = 1000, permute_seed: int | None = None) -> Path:
    """``permute_seed``: the same tokens under other ids (another vocabulary of the same size)."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    from alum_pretrain.demo import stdlib_documents
    from data_prep.tokenizer import canonical_vocab
    from databin_factory import make_databin

    docs = [[s for p in d for s in split_sentences(p)] for d in stdlib_documents(max_docs=n_docs)]
    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator((s for d in docs for s in d), vocab_size=vocab_size, min_frequency=2,
                           special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False)
    vocab = canonical_vocab(wp.get_vocab(with_added_tokens=False), 5)  # one numbering in every process
    if permute_seed is not None:
        import random

        rest = sorted((t for t, i in vocab.items() if i >= 5), key=vocab.get)
        random.Random(permute_seed).shuffle(rest)
        vocab = {**{t: i for t, i in vocab.items() if i < 5}, **{t: 5 + k for k, t in enumerate(rest)}}
    tok = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    return make_databin(out, [{"train": docs[:-12], "valid": docs[-12:]}], None, tokenizer=tok)


def train_args(databin: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [f"--data.path={databin}", f"--train.output_dir={out}", f"--train.max_steps={steps}", *COMMON, *extra]


def run_train(databin: Path, out: Path, steps: int, *extra: str) -> int:
    from alum_pretrain.train import main

    return main(train_args(databin, out, steps, *extra))


def subprocess_env(*extra_paths: Path, **env: str) -> dict:
    """The environment of a child Python: this checkout (then ``extra_paths``) first on PYTHONPATH, one thread."""
    path = os.pathsep.join([str(ROOT), *map(str, extra_paths), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **env}


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
