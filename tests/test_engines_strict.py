"""Both engines equally strict: the same fault cases through ``alum-train`` and ``fairseq-train`` (the plugin).

* NaN updates (a huge learning rate): skipped and counted, and after 5 in a row the run stops with exit 3 and
  the same message naming the last good checkpoint, whose weights are finite.
* A ``.bin`` holding ids outside the vocabulary: exit 2 with the native reader's message naming the shard,
  split, file and item - no traceback, no IndexError in the model.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import requires_fairseq
from engine_helpers import ROOT, make_stdlib_databin, subprocess_env, train_args

ENGINES = ["native", pytest.param("fairseq", marks=[pytest.mark.fairseq, requires_fairseq])]
NAN_STOP = re.compile(r"step (\d+): the loss or gradient norm was NaN/Inf for 5 consecutive steps "
                      r"\(--(?:train\.max_nonfinite|max-nonfinite)=5\); those updates were skipped; "
                      r"the last good checkpoint is (\S+) ")


@pytest.fixture(scope="module")
def databin(tmp_path_factory) -> Path:
    return make_stdlib_databin(tmp_path_factory.mktemp("strict") / "data-bin")


def _run(engine: str, databin: Path, out: Path, *, lr: str, steps: int) -> subprocess.CompletedProcess:
    if engine == "native":
        cmd = [sys.executable, "-m", "alum_pretrain.train",
               *train_args(databin, out, steps, f"--optim.lr={lr}", "--optim.warmup_ratio=0", "--train.save_every=1",
                           "--train.eval_every=0", "--train.keep_last=50")]
    else:
        from test_fairseq import TINY, USER_DIR

        tiny = [a for a in TINY]
        tiny[tiny.index("--lr") + 1] = lr
        cmd = [sys.executable, "-m", "fairseq_cli.train", str(databin), "--user-dir", str(USER_DIR), "--task",
               "alum_masked_lm", "--criterion", "alum_masked_lm", "--save-dir", str(out), *tiny,
               "--max-update", str(steps), "--save-interval-updates", "1", "--tokens-per-sample", "32"]
    return subprocess.run(cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)


def _finite_weights(ckpt: Path) -> bool:
    if ckpt.is_dir():  # native step-N/
        from alum_pretrain.engine.checkpoint import model_tensors

        w = model_tensors(ckpt)
    else:  # fairseq checkpoint_last.pt
        w = torch.load(ckpt, map_location="cpu", weights_only=False)["model"]
    return all(bool(torch.isfinite(t).all()) for t in w.values() if t.is_floating_point())


@pytest.mark.parametrize("engine", ENGINES)
def test_nan_updates_are_skipped_counted_and_stop_with_the_last_good_checkpoint(engine, databin, tmp_path):
    r = _run(engine, databin, tmp_path / "run", lr="1e6", steps=30)
    err = r.stderr
    assert r.returncode == 3, (r.stdout + err)[-3000:]
    m = NAN_STOP.search(err)
    assert m, err[-3000:]
    assert "Traceback" not in err and "FloatingPointError" not in err
    assert int(m.group(1)) < 30
    ckpt = Path(m.group(2))
    assert ckpt.exists() and _finite_weights(ckpt)
    if engine == "fairseq":
        assert "NaN/Inf gradient norm; update skipped (5 in a row" in r.stdout + err
        assert re.search(r'"nonfinite_skipped": "?[1-9]', r.stdout + err), (r.stdout + err)[-3000:]


@pytest.mark.parametrize("engine", ENGINES)
def test_out_of_range_ids_are_the_same_clear_error(engine, databin, tmp_path):
    db = tmp_path / "bin"
    shutil.copytree(databin, db)
    p = db / "shard0" / "train.bin"
    from alum_pretrain.data.indexed import MMapIndexedDataset

    dt = MMapIndexedDataset(db / "shard0" / "train").dtype
    p.write_bytes(np.full(p.stat().st_size // dt.itemsize, 40000, dtype=dt).tobytes())  # size kept
    r = _run(engine, db, tmp_path / "run", lr="1e-3", steps=3)
    assert r.returncode == 2, (r.stdout + r.stderr)[-3000:]
    assert re.search(r"shard 0 split 'train' \(.*shard0/train\.bin\) item \d+: token id 39996 is outside the "
                     r"vocabulary \[0, 1000\)", r.stderr), r.stderr[-3000:]
    assert "Traceback" not in r.stderr


@pytest.mark.fairseq
@requires_fairseq
def test_fairseq_alum_noise_needs_no_host_read_and_follows_the_sample(databin, monkeypatch):
    """The criterion derives each sample's ALUM random start from the batch's ``id`` tensor with tensor ops:
    no value is read to the host on its way (every tensor-to-host conversion raises while the noise is made;
    fairseq's own encoder reads a padding flag, which is not the criterion's), and a sample's noise is the
    native engine's (``SampleNoise``) whatever its place in the batch."""
    from alum_pretrain import adversarial
    from alum_pretrain.masking import SampleNoise
    from test_fairseq import _setup

    task, model, criterion, sample = _setup(databin)
    sample = task.mask_sample(sample, 0.15, 7, 0)
    model.eval()  # no dropout: the calls see the same network
    criterion.train()
    seen = []
    original = adversarial.init_delta

    def host_read(self, *a, **k):
        raise AssertionError("a tensor was read to the host while the ALUM noise was made")

    def spy(embeds, pad_mask, noise_std, generator=None):
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"):
                m.setattr(torch.Tensor, name, host_read)
            delta = original(embeds, pad_mask, noise_std, generator)
        seen.append((generator, delta.detach().clone()))
        return delta

    monkeypatch.setattr(adversarial, "init_delta", spy)
    loss, _, log = criterion(model, sample)
    assert isinstance(seen[0][0], SampleNoise) and seen[0][0].sample_ids is sample["id"]
    assert float(log["adv"]) > 0
    # a reversed batch: every sample gets the same noise as before (padding zeroed in both)
    flip = {**sample, "id": sample["id"].flip(0), "target": sample["target"].flip(0),
            "net_input": {**sample["net_input"], "src_tokens": sample["net_input"]["src_tokens"].flip(0)}}
    criterion(model, flip)
    assert torch.equal(seen[1][1], seen[0][1].flip(0)) and seen[0][1].abs().max() > 0
    # = the shared definition, row by row
    pad = sample["net_input"]["src_tokens"].ne(task.dictionary.pad())
    sigma = criterion.alum.noise_std
    for b, sid in enumerate(sample["id"].tolist()):
        ref = SampleNoise(criterion.seed, 7, torch.tensor([sid])).normal(seen[0][1].shape[1:])[0] * sigma
        assert torch.equal(seen[0][1][b], ref * pad[b, :, None])
