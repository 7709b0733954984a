"""alum_pretrain.hf: ALUM, the masking curriculum and the fine-tuning methods inside a real transformers.Trainer.

Tiny BERTs built locally (no hub), a few CPU steps each: the loss is finite, ``adv`` appears in
``log_history`` from ``start_step`` on, the collator masks every trained batch at the curriculum's rate of
its step (also across a save/resume), the ALUM term equals the native engine's on the same batch and delta
seed, bf16 and fp16 (GradScaler semantics on CPU) keep the ascent gradient alive, and the fine-tuning
methods run through Trainer with the objects ``alum-finetune`` builds.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")

from transformers import (BertConfig, BertForMaskedLM, BertForSequenceClassification, BertTokenizerFast,  # noqa: E402
                          DataCollatorForLanguageModeling, DataCollatorWithPadding, TrainerCallback,
                          TrainingArguments)

from alum_pretrain.adversarial import ALUMConfig  # noqa: E402
from alum_pretrain.masking import MaskingConfig, SampleNoise  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORDS = [f"w{i}" for i in range(150)]


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}
    return BertTokenizerFast(vocab=vocab, do_lower_case=True)


def sentences(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(8, 24, (1,), generator=g))
        out.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g)))
    return out


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def mlm_dataset(tokenizer, n=64):
    return ListDataset([{"input_ids": tokenizer(s)["input_ids"]} for s in sentences(n)])


def tiny_mlm(tokenizer, dropout=0.1):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout)
    return BertForMaskedLM(cfg)


class TaggingCollator(DataCollatorForLanguageModeling):
    """Records the rate each batch was masked at (as a batch key the trainer below pops)."""

    def __call__(self, features, return_tensors=None):
        batch = super().__call__(features, return_tensors)
        batch["rate_tag"] = torch.tensor(self.mlm_probability)
        return batch


def recording_trainer_cls():
    from alum_pretrain.hf import AlumTrainer

    class Recording(AlumTrainer):
        trained: list = []  # (global step, rate the batch was masked at, loss, adv)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            tag = inputs.pop("rate_tag", None)
            loss, out = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
            if model.training and tag is not None:
                m = out["metrics"]
                self.trained.append((self.state.global_step, round(float(tag), 6), float(loss.detach()),
                                     float(m["adv"]) if "adv" in m else None))
            return (loss, out) if return_outputs else loss

    return Recording


def make_args(out: Path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1,
                save_strategy="no", report_to=[], use_cpu=True, seed=7, dataloader_num_workers=0,
                disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base)


def test_import_without_fairseq_and_deepspeed():
    code = ("import sys\nsys.modules['fairseq'] = None\nsys.modules['deepspeed'] = None\n"
            "from alum_pretrain.hf import AlumTrainer, MaskingCurriculumCallback, AdversarialTrainer\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_alum_trainer_logs_adv_after_start_and_follows_curriculum(tokenizer, tmp_path):
    from alum_pretrain.hf import MaskingCurriculumCallback

    collator = TaggingCollator(tokenizer=tokenizer, mlm_probability=0.15)
    Recording = recording_trainer_cls()
    Recording.trained = []
    steps = 10
    trainer = Recording(model=tiny_mlm(tokenizer), args=make_args(tmp_path, max_steps=steps),
                        train_dataset=mlm_dataset(tokenizer), data_collator=collator,
                        alum=ALUMConfig(alpha=1.0, start_step=3, log_baseline=True),
                        callbacks=[MaskingCurriculumCallback(collator)])
    trainer.train()
    masking = MaskingConfig()
    assert [s for s, *_ in Recording.trained] == list(range(steps))
    for step, rate, loss, adv in Recording.trained:
        assert math.isfinite(loss)
        assert rate == pytest.approx(masking.rate_at(step, steps)), f"step {step} masked at {rate}"
        assert (adv is None) == (step < 3)
    logs = [h for h in trainer.state.log_history if "loss" in h and "eval_loss" not in h]
    assert len(logs) == steps
    for h in logs:
        s = h["step"] - 1  # the step the log line covers
        assert math.isfinite(h["loss"]) and math.isfinite(h["mlm"])
        assert h["mask_rate"] == pytest.approx(masking.rate_at(s, steps))
        if s < 3:
            assert "adv" not in h and h["alum"] == 0.0
        else:
            assert h["alum"] == 1.0 and h["adv"] > 0 and "adv_share" in h and "adv_dropout" in h


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True


def test_curriculum_and_alum_resume_like_uninterrupted(tokenizer, tmp_path):
    from alum_pretrain.hf import MaskingCurriculumCallback

    steps = 10
    runs = {}
    for name in ("full", "cut"):
        collator = TaggingCollator(tokenizer=tokenizer, mlm_probability=0.15)
        Recording = recording_trainer_cls()
        Recording.trained = []
        extra = [StopAt(4)] if name == "cut" else []
        trainer = Recording(model=tiny_mlm(tokenizer), args=make_args(tmp_path / name, max_steps=steps),
                            train_dataset=mlm_dataset(tokenizer), data_collator=collator,
                            alum=ALUMConfig(alpha=1.0), callbacks=[MaskingCurriculumCallback(collator)] + extra)
        trainer.train()
        if name == "cut":
            assert [s for s, *_ in Recording.trained] == list(range(4))
            collator = TaggingCollator(tokenizer=tokenizer, mlm_probability=0.15)
            trainer = Recording(model=tiny_mlm(tokenizer), args=make_args(tmp_path / name, max_steps=steps),
                                train_dataset=mlm_dataset(tokenizer), data_collator=collator,
                                alum=ALUMConfig(alpha=1.0), callbacks=[MaskingCurriculumCallback(collator)])
            trainer.train(resume_from_checkpoint=str(tmp_path / name / "checkpoint-4"))
        runs[name] = list(Recording.trained)
    full, cut = runs["full"], runs["cut"]
    assert [r[:2] for r in cut] == [r[:2] for r in full]  # same steps, same rates (a pure function of the step)
    # The collator's mask draws come from the global RNG and the loader collates ahead of the checkpoint, so
    # the resumed losses are not bit-identical; the rate (and ALUM's per-step delta keys) are.
    assert all(math.isfinite(r[2]) and r[3] is not None and r[3] > 0 for r in cut)


def test_alum_term_equals_native_engine(tokenizer, tmp_path):
    """Same batch, same delta seed (per-sample generators keyed by (seed, step, sample id)), same dropout
    RNG: the Trainer's loss and R equal the native engine's PretrainStep."""
    from alum_pretrain.engine.step import PretrainStep
    from alum_pretrain.hf import AlumTrainer
    from alum_pretrain.models import PretrainModel

    collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm_probability=0.25)
    torch.manual_seed(3)
    batch = collator([mlm_dataset(tokenizer)[i] for i in range(6)])
    model = tiny_mlm(tokenizer).train()
    alum = ALUMConfig(alpha=2.0, k_steps=2, log_baseline=True)
    trainer = AlumTrainer(model=model, args=make_args(tmp_path, max_steps=1), data_collator=collator, alum=alum)
    n = int((batch["labels"] != -100).sum())
    torch.manual_seed(11)
    loss, out = trainer.compute_loss(model, dict(batch), return_outputs=True, num_items_in_batch=n)

    flat = batch["labels"].reshape(-1)
    pos = (flat != -100).nonzero().squeeze(1)
    native_batch = {**batch, "masked_pos": pos, "mlm_targets": flat[pos]}
    step = PretrainStep(PretrainModel(model), alum, nsp=False)
    gens = SampleNoise(trainer.args.seed, 0, torch.arange(6))
    torch.manual_seed(11)
    ref_loss, ref = step(native_batch, alum_on=True, mlm_denom=float(n), nsp_denom=6.0, alum_generators=gens)
    m = out["metrics"]
    for k in ("mlm", "adv", "adv_dropout", "delta_linf"):
        assert m[k].item() == pytest.approx(ref[k].item(), rel=1e-6, abs=1e-12), k
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert m["adv"].item() > 0


def test_wrapped_model_clean_pass_equals_unwrapped(tokenizer, tmp_path):
    """The clean pass through a wrapper (DDP's path: full HF forward, logits gathered) gives the same loss."""
    from alum_pretrain.hf import AlumTrainer

    collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm_probability=0.25)
    torch.manual_seed(3)
    batch = collator([mlm_dataset(tokenizer)[i] for i in range(6)])
    model = tiny_mlm(tokenizer, dropout=0.0).train()
    losses = []
    for m in (model, torch.nn.DataParallel(model)):
        trainer = AlumTrainer(model=model, args=make_args(tmp_path, max_steps=1), data_collator=collator,
                              alum=ALUMConfig(alpha=1.0))
        torch.manual_seed(5)
        losses.append(trainer.compute_loss(m, dict(batch)).item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_bf16_run(tokenizer, tmp_path):
    from alum_pretrain.hf import AlumTrainer

    collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm_probability=0.2)
    trainer = AlumTrainer(model=tiny_mlm(tokenizer), args=make_args(tmp_path, max_steps=3, bf16=True),
                          train_dataset=mlm_dataset(tokenizer), data_collator=collator, alum=ALUMConfig(alpha=1.0))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "adv" in h]
    assert len(logs) == 3 and all(math.isfinite(h["loss"]) and h["adv"] > 0 for h in logs)


def test_fp16_ascent_survives_under_grad_scaler(tokenizer, tmp_path):
    """fp16 autocast on CPU with a GradScaler, the paper's sigma = eps = 1e-5 and the globally normalised
    loss: >= 99 % of real tokens get a non-zero ascent gradient, R is finite and > 0, and the scaled final
    backward unscales to finite gradients."""
    from alum_pretrain.hf import AlumTrainer

    collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm_probability=0.25)
    torch.manual_seed(3)
    batch = collator([mlm_dataset(tokenizer)[i] for i in range(6)])
    model = tiny_mlm(tokenizer).train()
    trainer = AlumTrainer(model=model, args=make_args(tmp_path, max_steps=1), data_collator=collator,
                          alum=ALUMConfig(alpha=1.0))
    n = 8 * int((batch["labels"] != -100).sum())  # a global count (8 ranks' worth), as Trainer passes it
    scaler = torch.amp.GradScaler("cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with torch.autocast("cpu", dtype=torch.float16):
        loss, out = trainer.compute_loss(model, dict(batch), return_outputs=True, num_items_in_batch=n)
    m = out["metrics"]
    assert m["ascent_zero_grad_frac"].item() <= 0.01 and m["ascent_nonfinite"].item() == 0
    assert torch.isfinite(m["adv"]) and m["adv"].item() > 0
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def cls_dataset(tokenizer, n=24):
    return ListDataset([{**tokenizer(s), "labels": i % 3} for i, s in enumerate(sentences(n, seed=1))])


@pytest.mark.parametrize("method", ["smart", "freelb", "pgd", "freeat"])
def test_adversarial_trainer_methods(tokenizer, tmp_path, method):
    from alum_pretrain.finetune.methods import FreeAT, FreeLB, PGD, Smart
    from alum_pretrain.hf import AdversarialTrainer

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    model = BertForSequenceClassification(cfg)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = AdversarialTrainer(model=model, args=make_args(tmp_path, max_steps=3), method=method,
                                 train_dataset=cls_dataset(tokenizer), data_collator=DataCollatorWithPadding(tokenizer))
    assert type(trainer.method) is {"smart": Smart, "freelb": FreeLB, "pgd": PGD, "freeat": FreeAT}[method]
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(math.isfinite(h["loss"]) for h in logs)
    if method == "smart":
        assert all(h["adv"] > 0 for h in logs)
    else:
        assert all("ascent_nonfinite" in h and h["ascent_nonfinite"] == 0 for h in logs)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_adversarial_trainer_refuses_bad_input(tokenizer, tmp_path):
    from alum_pretrain.hf import AdversarialTrainer

    model = BertForSequenceClassification(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ValueError, match="rift"):
        AdversarialTrainer(model=model, args=make_args(tmp_path, max_steps=1), method="rift")
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1"):
        AdversarialTrainer(model=model, args=make_args(tmp_path, max_steps=1, gradient_accumulation_steps=2),
                           method="freeat")


def test_gradient_accumulation_uses_the_global_masked_count(tokenizer, tmp_path):
    """GA = 2: each micro-batch is divided by the masked-token count of the whole step (Trainer's
    num_items_in_batch), so the two micro-batches' mlm contributions add up to the step's mean."""
    from alum_pretrain.hf import AlumTrainer

    seen = []

    class Spy(AlumTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, out = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
            if model.training:
                seen.append((num_items_in_batch, int((inputs["labels"] != -100).sum()), float(out["metrics"]["mlm"])))
            return (loss, out) if return_outputs else loss

    collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm_probability=0.2)
    trainer = Spy(model=tiny_mlm(tokenizer), args=make_args(tmp_path, max_steps=2, gradient_accumulation_steps=2,
                                                             per_device_train_batch_size=2),
                  train_dataset=mlm_dataset(tokenizer), data_collator=collator, alum=ALUMConfig(alpha=1.0))
    trainer.train()
    assert len(seen) == 4
    for a, b in (seen[0:2], seen[2:4]):
        assert a[0] is not None and int(a[0]) == a[1] + b[1]  # the step's masked tokens
    logs = [h for h in trainer.state.log_history if "adv" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) and h["adv"] > 0 for h in logs)
    assert logs[0]["mlm"] == pytest.approx(seen[0][2] + seen[1][2], rel=1e-5)


def test_docs_examples_compile():
    text = (ROOT / "docs" / "trainer.md").read_text(encoding="utf-8")
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    assert len(blocks) == 2
    for b in blocks:
        compile(b, "docs/trainer.md", "exec")


@pytest.mark.multirank
def test_trainer_ddp_two_processes_keep_ranks_in_sync(tmp_path):
    """torchrun, 2 gloo processes: AlumTrainer's clean pass goes through the DDP wrapper and the ranks end
    with identical weights (gradients were averaged); AdversarialTrainer's all-reduce does the same."""
    import json
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "hf_ddp_probe.py"), str(tmp_path)]
    r = subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    for name in ("mlm", "smart", "freelb"):
        a, b = (json.loads((tmp_path / f"{name}-rank{k}.json").read_text()) for k in (0, 1))
        assert a["final"] == pytest.approx(b["final"], rel=1e-6, abs=1e-7), name
        assert a["final"] != pytest.approx(a["init"], rel=1e-9, abs=1e-9), name
    mlm = json.loads((tmp_path / "mlm-rank0.json").read_text())
    assert mlm["world"] == 2 and mlm["wrapped"] and all(mlm["wrapped"])
    assert all(h["adv"] > 0 for h in mlm["logs"] if "loss" in h and "train_runtime" not in h)


@pytest.mark.parametrize("alum_kw,check", [
    (dict(adv_dropout="shared", noise_std=0.0, k_steps=0), "zero"),     # delta = 0, same masks: R = 0 exactly
    (dict(adv_dropout="off"), "positive"),
    (dict(objective="rdrop"), "positive"),
    (dict(adv_dropout="shared", scale="rel", epsilon=0.05, step_size=0.05), "share1"),
])
def test_alum_trainer_dropout_modes_and_rdrop(tokenizer, tmp_path, alum_kw, check):
    """alum.adv_dropout / alum.objective / alum.scale through the Trainer integration (dropout 0.1 on)."""
    from alum_pretrain.hf import AlumTrainer

    collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm_probability=0.15)
    trainer = AlumTrainer(model=tiny_mlm(tokenizer), args=make_args(tmp_path, max_steps=3),
                          train_dataset=mlm_dataset(tokenizer), data_collator=collator,
                          alum=ALUMConfig(alpha=1.0, log_baseline=True, **alum_kw))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "eval_loss" not in h]
    assert len(logs) == 3 and all(math.isfinite(h["loss"]) for h in logs)
    for h in logs:
        if check == "zero":
            assert h["adv"] == 0.0 and h["adv_dropout"] == 0.0
        elif check == "share1":
            assert h["adv"] > 0 and h["adv_dropout"] == 0.0 and h["adv_share"] == 1.0
        else:
            assert h["adv"] > 0
