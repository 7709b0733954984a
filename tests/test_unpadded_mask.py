"""A blocks batch without padding (every one but a stream's last block) reaches the encoder with no
attention mask — counted on the encoder's calls — and gives the same logits and loss as with the mask;
alum-train turns this on for blocks mode only; pairs grouped by length train and resume exactly."""

from __future__ import annotations

import pytest
import torch

from alum_pretrain.adversarial import ALUMConfig
from alum_pretrain.engine.step import Masker, PretrainStep
from alum_pretrain.masking import MaskingConfig, STREAM_ALUM, sample_generators
from alum_pretrain.models import PretrainModel, build_scratch_model

pytestmark = pytest.mark.usefixtures("one_thread")
V, PAD, CLS, SEP, MASK = 200, 0, 2, 3, 4


def blocks_batch(B: int, T: int, short: int | None = None) -> dict:
    """[CLS] block [SEP] rows; ``short``: the last row is a stream's last block of that many tokens."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, V, (B, T), generator=g)
    ids[:, 0], ids[:, -1] = CLS, SEP
    attn = torch.ones(B, T, dtype=torch.long)
    if short is not None:
        ids[-1, short - 1], ids[-1, short:], attn[-1, short:] = SEP, PAD, 0
    special = (ids == CLS) | (ids == SEP) | (ids == PAD)
    return {"input_ids": ids, "attention_mask": attn, "token_type_ids": torch.zeros(B, T, dtype=torch.long),
            "special_mask": special}


def count_masks(model: PretrainModel) -> list:
    """Records, per encoder call, whether it got an attention mask."""
    seen = []
    model.base.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("attention_mask") is not None),
                                         with_kwargs=True)
    return seen


@pytest.mark.parametrize("alum", [False, True])
def test_unpadded_batch_passes_no_mask_same_loss(alum):
    torch.manual_seed(0)
    model = PretrainModel(build_scratch_model("tiny", V, PAD, nsp=False, dropout=0.0))
    model.eval()  # no dropout: the two calls must agree exactly
    masker = Masker(MaskingConfig(), MASK, torch.arange(10, V), seed=0)
    step = PretrainStep(model, ALUMConfig(k_steps=1) if alum else ALUMConfig(alpha=0.0), nsp=False,
                        unmasked_when_unpadded=True)
    seen = count_masks(model)
    losses = {}
    for short in (None, 9):
        mb = masker(blocks_batch(4, 16, short), 0.15, 1, torch.arange(4))
        assert mb["padded"] is (short is not None)
        for padded in ((False, True) if short is None else (True,)):
            d = {**mb, "padded": padded}
            gens = sample_generators(0, 1, torch.arange(4), STREAM_ALUM, torch.device("cpu")) if alum else None
            loss, _ = step(d, alum_on=alum, mlm_denom=float(mb["n_masked"]), nsp_denom=4.0, alum_generators=gens)
            losses[(short, padded)] = loss.item()
    calls = 3 if alum else 1  # encoder calls per step: clean (+ ascent + adversarial)
    # unpadded batch without the mask, the same batch forced through the mask, then the padded batch
    assert seen == [False] * calls + [True] * calls + [True] * calls
    assert abs(losses[(None, False)] - losses[(None, True)]) < 1e-6


@pytest.mark.parametrize("mode", ["blocks", "pairs"])
def test_alum_train_drops_the_mask_in_blocks_mode_only(tmp_path, monkeypatch, mode):
    """A short alum-train run: encoder calls without a mask are counted (blocks: every unpadded batch)."""
    import alum_pretrain.engine.setup as setup_mod
    from alum_pretrain.engine.config import DataConfig

    from engine_helpers import make_stdlib_databin, run_train

    seen = []

    class Counting(PretrainStep):
        """Counts the encoder calls of training steps (validation calls the encoder outside the step)."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.in_step = False
            self.model.base.register_forward_pre_hook(
                lambda m, a, kw: seen.append(kw.get("attention_mask") is not None) if self.in_step else None,
                with_kwargs=True)

        def forward(self, *a, **kw):
            self.in_step = True
            try:
                return super().forward(*a, **kw)
            finally:
                self.in_step = False

    monkeypatch.setattr(setup_mod, "PretrainStep", Counting)
    db = make_stdlib_databin(tmp_path / "bin", n_docs=40, vocab_size=400)
    extra = ("--data.mode=blocks", "--data.nsp=false") if mode == "blocks" else ()
    assert run_train(db, tmp_path / "run", 3, "--train.eval_every=0", "--alum.start_step=100", *extra) == 0
    assert len(seen) == 3
    assert seen.count(False) == (3 if mode == "blocks" else 0)  # blocks batches of 3 steps: no padding
    assert DataConfig().group_by_length is False


def test_same_logits_without_mask():
    torch.manual_seed(0)
    model = PretrainModel(build_scratch_model("tiny", V, PAD, nsp=False, dropout=0.0)).eval()
    b = blocks_batch(3, 12)
    with torch.no_grad():
        a, _ = model(b["input_ids"], b["attention_mask"], b["token_type_ids"])
        c, _ = model(b["input_ids"], None, b["token_type_ids"])
    assert torch.allclose(a, c, atol=1e-6, rtol=0)


def test_blocks_loader_batches_are_mostly_unpadded(tmp_path):
    """On a real blocks loader: batches without padding are recognised as such (host side)."""
    from alum_pretrain.data import build_loader

    from engine_helpers import make_stdlib_databin

    db = make_stdlib_databin(tmp_path / "bin", n_docs=40, vocab_size=400)
    loader = build_loader(db, "train", mode="blocks", nsp=False, max_seq_len=32, batch_size=4, seed=0, epochs=1,
                          pad_to_max_len=True)
    masker = Masker(MaskingConfig(), MASK, torch.arange(10, 400), seed=0)
    flags = [masker(b, 0.15, 1, torch.arange(len(b["input_ids"])))["padded"] for b in loader]
    full = [bool((b["attention_mask"] == 0).any()) for b in build_loader(
        db, "train", mode="blocks", nsp=False, max_seq_len=32, batch_size=4, seed=0, epochs=1, pad_to_max_len=True)]
    assert flags == full
    assert flags.count(False) > len(flags) // 2


def test_training_with_grouped_pairs_resumes_exactly(tmp_path):
    """alum-train --data.group_by_length=true: runs, and a run interrupted after step 3 ends with the same
    weights and losses as an uninterrupted one."""
    import shutil

    from engine_helpers import final_weights, make_stdlib_databin, max_weight_diff, read_log, run_train

    db = make_stdlib_databin(tmp_path / "bin", n_docs=60, vocab_size=400)
    args = ("--data.group_by_length=true", "--train.eval_every=0", "--train.save_every=3", "--train.keep_last=5")
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_train(db, a, 6, *args) == 0
    assert run_train(db, b, 6, *args) == 0
    shutil.rmtree(b / "checkpoints" / "step-6")
    (b / "COMPLETED").unlink()
    assert run_train(db, b, 6, *args) == 0
    assert max_weight_diff(final_weights(a), final_weights(b)) <= 1e-6
    la = {r["step"]: r for r in read_log(a)}
    assert sorted(la) == list(range(1, 7))
    for r in read_log(b):
        assert r["loss"] == pytest.approx(la[r["step"]]["loss"], rel=1e-6, abs=1e-9)
