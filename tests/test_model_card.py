"""The exported model card: hub front matter (pipeline_tag, base_model, datasets, held-out MLM figures),
the training recipe, and no absolute path of the exporting machine."""

from __future__ import annotations

import json
import re

import torch
import yaml
from transformers import BertConfig, BertForMaskedLM

from alum_pretrain.model_card import model_card, public_name


def _run(tmp_path):
    data = tmp_path / "corpora" / "bin"
    data.mkdir(parents=True)
    (data / "manifest.json").write_text(json.dumps({"inputs": [
        {"path": str(tmp_path / "raw" / "wiki.jsonl"), "bytes": 10, "sha256": "x"},
        {"path": str(tmp_path / "raw" / "owt.parquet"), "bytes": 10, "sha256": "y"}]}))
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    recs = [{"step": 10, "loss": 5.0}, {"step": 10, "kind": "valid", "valid_mlm": 4.5, "valid_acc": 0.1},
            {"step": 20, "kind": "valid", "valid_mlm": 4.0, "valid_acc": 0.2}]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"torn')
    init = tmp_path / "models" / "all-MiniLM-L6-v2"
    cfg = {"model": {"init_from": str(init)}, "data": {"path": str(data), "max_seq_len": 128, "nsp": False},
           "train": {"max_steps": 20, "batch_size": 8, "grad_accum": 2, "global_batch_size": 0,
                     "precision": "bf16", "engine": "ddp", "seed": 1},
           "masking": {"schedule": "curriculum", "start_rate": 0.05, "end_rate": 0.25, "num_phases": 5},
           "alum": {"alpha": 10.0, "epsilon": 1e-5, "step_size": 1e-3, "noise_std": 1e-5, "k_steps": 1,
                    "projection": "linf", "perturb_at": "word", "divergence": "sym_kl_ce", "start_step": 0},
           "optim": {"lr": 4e-5, "warmup_ratio": 0.01, "weight_decay": 0.01}}
    return run, cfg


def test_card_front_matter_and_no_local_paths(tmp_path):
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32))
    run, cfg = _run(tmp_path)
    card = model_card(model, cfg, step=20, run=run)
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "fill-mask"
    assert "alum" in front["tags"]
    assert front["base_model"] == "all-MiniLM-L6-v2"
    assert front["datasets"] == ["wiki.jsonl", "owt.parquet"]
    metrics = {m["type"]: m["value"] for m in front["model-index"][0]["results"][0]["metrics"]}
    assert metrics["mlm_cross_entropy"] == 4.0 and metrics["accuracy"] == 0.2
    assert abs(metrics["perplexity"] - 54.5982) < 1e-3
    assert "step 20" in card and "curriculum 0.05 -> 0.25" in card and "alpha 10.0" in card
    assert "precision: bf16; engine: ddp" in card
    assert str(tmp_path) not in card
    tokens = re.split(r"[\s`'\"(),\[\]{}]+", card)
    assert not [t for t in tokens if t.startswith("/")], [t for t in tokens if t.startswith("/")]


def test_public_name():
    assert public_name("/home/me/models/bert-base-uncased/") == "bert-base-uncased"
    assert public_name("google-bert/bert-base-uncased") == "google-bert/bert-base-uncased"
    assert public_name("") == "" and public_name(None) == ""
