"""Fault injection, alum-finetune: NaN updates are skipped and stop the run; a damaged or malicious
``checkpoint.pt`` falls back to ``checkpoint.prev.pt`` and the resumed run equals the uninterrupted one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from alum_pretrain.config import config_from_dict
from alum_pretrain.finetune.config import FinetuneConfig
from alum_pretrain.finetune.trainer import finetune

POS = ["a great and moving film", "wonderful acting , superb story", "truly delightful", "i loved it"]
NEG = ["a dull and boring mess", "terrible script , awful acting", "painfully bad", "i hated it"]


pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ft-faults")
    words = sorted({w for s in POS + NEG for w in s.split()})
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(d / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(0)
    model_dir = d / "tiny"
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rows = [f"{s}\t1" for s in POS] + [f"{s}\t0" for s in NEG]
    (d / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows * 2) + "\n")
    (d / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return model_dir, d / "train.tsv", d / "dev.tsv"


def _cfg(files, out: Path, **run):
    model_dir, train, dev = files
    return config_from_dict(FinetuneConfig, {
        "model": {"path": str(model_dir)},
        "data": {"task": "sst2", "train": str(train), "dev": str(dev), "max_length": 16},
        "optim": {"batch_size": 4, "epochs": 3, "lr": 1e-3, "warmup_ratio": 0.1},
        "run": {"out": str(out), "method": "plain", "progress": False, "seed": 3, **run}})


def test_nan_updates_are_skipped_then_stop_with_exit_3(files, tmp_path, capsys):
    from alum_pretrain.finetune.cli import main

    model_dir, train, dev = files
    out = tmp_path / "out"
    rc = main(["--model", str(model_dir), "--task", "sst2", "--train", str(train), "--dev", str(dev),
               "--out", str(out), "--optim.lr=1e6", "--optim.warmup_ratio=0", "--run.max_nonfinite=2",
               "--run.progress=false", "--data.max_length=16", "--optim.batch_size=2"])
    err = capsys.readouterr().err
    assert rc == 3, err[-2000:]
    assert "the gradient norm was NaN/Inf for 2 consecutive updates (--run.max_nonfinite=2)" in err
    assert not (out / "checkpoint.pt").exists()  # nothing non-finite was ever written


def _history(out: Path) -> list:
    return json.loads((out / "results.json").read_text())["history"]


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ft-ref") / "out"
    finetune(_cfg(files, out))
    return out


def _two_epochs(files, tmp_path) -> Path:
    out = tmp_path / "out"
    finetune(_cfg(files, out, stop_after_epochs=2))
    assert (out / "checkpoint.pt").is_file() and (out / "checkpoint.prev.pt").is_file()
    assert (out / "checkpoint.pt.json").is_file()
    return out


def _same_as_reference(out: Path, reference: Path) -> None:
    a, b = _history(out), _history(reference)
    assert [h["epoch"] for h in a] == [0, 1, 2]
    for x, y in zip(a, b):
        assert x["dev"] == y["dev"]
        for k in x["train"]:
            assert x["train"][k] == pytest.approx(y["train"][k], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
def test_damaged_checkpoint_falls_back_to_the_previous_epoch(files, reference, tmp_path, caplog, damage):
    out = _two_epochs(files, tmp_path)
    p = out / "checkpoint.pt"
    data = bytearray(p.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) * 2 // 3] ^= 0x10
    p.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        finetune(_cfg(files, out))
    assert f"checkpoint {p} is unusable" in caplog.text
    assert ("bytes" in caplog.text) if damage == "truncate" else ("CRC-32 recorded in checkpoint.pt.json does not match" in caplog.text)
    _same_as_reference(out, reference)


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_malicious_checkpoint_is_refused_and_does_not_run(files, reference, tmp_path, caplog):
    from alum_pretrain.integrity import sha256_file

    out = _two_epochs(files, tmp_path)
    p = out / "checkpoint.pt"
    marker = tmp_path / "PWNED"
    state = torch.load(p, weights_only=True)
    state["evil"] = _Evil(str(marker))
    torch.save(state, p)
    (out / "checkpoint.pt.json").write_text(json.dumps({"bytes": p.stat().st_size, "sha256": sha256_file(p)}))
    with caplog.at_level("WARNING"):
        finetune(_cfg(files, out))
    assert not marker.exists()
    assert "refused to load" in caplog.text and "--run.trust_checkpoint=true" in caplog.text
    _same_as_reference(out, reference)


def test_both_checkpoints_damaged_is_an_error_naming_both(files, tmp_path):
    out = _two_epochs(files, tmp_path)
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        with open(out / name, "r+b") as fh:
            fh.truncate(100)
    with pytest.raises(ValueError, match=r"(?s)no intact fine-tuning checkpoint.*checkpoint\.pt.*checkpoint\.prev\.pt"):
        finetune(_cfg(files, out))
    shutil.rmtree(out)
