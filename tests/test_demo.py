"""``alum-demo`` end to end with very few steps: every promised artifact appears, offline, without ../shared."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_leaves_all_artifacts(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               ALUM_SHARED_DATA=str(tmp_path / "no-shared-data"),
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    r = subprocess.run([sys.executable, "-m", "alum_pretrain.demo", "--out", str(out), "--steps", "12",
                        "--batch-size", "8", "--seq-len", "64"],
                       cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]

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
    assert train[0]["adv"] == 0 and train[-1]["adv"] > 0  # standard steps, then ALUM from step 6
    assert (out / "run" / "plot.png").stat().st_size > 10_000

    hf = out / "hf"
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (hf / f).exists(), f
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    AutoModelForMaskedLM.from_pretrained(str(hf))
    assert AutoTokenizer.from_pretrained(str(hf)).mask_token == "[MASK]"

    assert "fill-mask predictions" in r.stdout
    assert r.stdout.count("->") == 4
    assert str(out / "run" / "plot.png") in r.stdout
