"""Every value checked against the model, the data and the objective before work starts
(:mod:`alum_pretrain.compat`): each bad value goes through the real command (``main()`` in this process) and
must end with exit code 2, a message naming the flag, and no output folder created or changed - never a
tensor-shape traceback, never a metric computed over nothing."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine_helpers import make_stdlib_databin, read_log, run_train, train_args

pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    """A data-bin, a copy of it whose validation split is empty, and small HF folders with its tokenizer:
    a RoBERTa whose 34 position rows hold 33 tokens, a BERT with NSP but one segment type, and a BERT whose
    embedding has fewer rows than the tokenizer has tokens."""
    import torch
    import transformers as T

    from alum_pretrain.data.indexed import IndexedDatasetBuilder

    root = tmp_path_factory.mktemp("values")
    db = make_stdlib_databin(root / "data-bin")
    empty_valid = root / "data-bin-empty-valid"
    shutil.copytree(db, empty_valid)
    IndexedDatasetBuilder(empty_valid / "shard0" / "valid", vocab_size=2000).finalize()
    tok = T.AutoTokenizer.from_pretrained(str(db / "tokenizer"))
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    models = {
        "roberta": T.RobertaForMaskedLM(T.RobertaConfig(vocab_size=len(tok), max_position_embeddings=34,
                                                        pad_token_id=0, type_vocab_size=1, **small)),
        "one_segment": T.BertForPreTraining(T.BertConfig(vocab_size=len(tok), type_vocab_size=1,
                                                         max_position_embeddings=64, **small)),
        "bert40": T.BertModel(T.BertConfig(vocab_size=len(tok), max_position_embeddings=40, **small)),
        "few_rows": T.BertModel(T.BertConfig(vocab_size=500, max_position_embeddings=64, **small)),
        "clf40": T.BertForSequenceClassification(T.BertConfig(vocab_size=len(tok), max_position_embeddings=40,
                                                              num_labels=2, **small)),
    }
    for name, m in models.items():
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    words = _word_level_databin(root / "data-bin-words")
    rows = ["a great and moving film\t1", "a dull and boring mess\t0"] * 4
    (root / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    (root / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(rows[:4]) + "\n")
    (root / "empty.tsv").write_text("sentence\tlabel\n")
    return SimpleNamespace(root=root, db=db, empty_valid=empty_valid, words=words, **{k: root / k for k in models})


def _word_level_databin(out: Path) -> Path:
    """A data-bin whose tokenizer is word-level (no ``##``, ``▁`` or ``Ġ`` pieces to tell words apart)."""
    import collections
    import re

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from alum_pretrain.demo import stdlib_documents
    from databin_factory import make_databin
    from engine_helpers import split_sentences

    docs = [[s for p in d for s in split_sentences(p)] for d in stdlib_documents(max_docs=60)]
    counts = collections.Counter(w for d in docs for s in d for w in re.findall(r"\w+|[^\w\s]", s.lower()))
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wl = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + [w for w, _ in counts.most_common(400)])},
                                    unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok = PreTrainedTokenizerFast(tokenizer_object=wl, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]")
    return make_databin(out, [{"train": docs[:-6], "valid": docs[-6:]}], None, tokenizer=tok)


def _train(args, capsys) -> tuple[int, str]:
    from alum_pretrain.train import main

    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


# (extra flags, the flag the error must name, a word of the reason); the RoBERTa and BERT folders by name
TRAIN_CASES = {
    "sequence longer than the position table": (
        ["--model.init_from={roberta}", "--data.nsp=false", "--data.mode=blocks", "--data.max_seq_len=40"],
        "--data.max_seq_len", "positions for 33 tokens"),
    "NSP on a model with one segment type": (
        ["--model.init_from={one_segment}", "--data.max_seq_len=32"], "--data.nsp", "type_vocab_size=1"),
    "a model vocabulary smaller than the tokenizer's": (
        ["--model.init_from={few_rows}", "--data.nsp=false", "--data.mode=blocks"], "--model.init_from",
        "smaller than the tokenizer's"),
    "LAMB without DeepSpeed": (["--optim.name=lamb"], "--optim.name", "LAMB comes from DeepSpeed"),
    "constant rate 0": (["--masking.schedule=constant", "--masking.constant_rate=0"], "--masking.constant_rate",
                        "mask no token"),
    "curriculum starting at 0": (["--masking.start_rate=0"], "--masking.start_rate", "mask no token"),
    "curriculum ending at 0": (["--masking.start_rate=0.2", "--masking.end_rate=0"], "--masking.end_rate",
                               "mask no token"),
    "eval rate 0": (["--masking.eval_rate=0"], "--masking.eval_rate", "over nothing"),
    "nothing corrupted": (["--masking.mask_prob=0", "--masking.random_prob=0"], "--masking.mask_prob", "copying"),
    "no [MASK]": (["--masking.mask_prob=0", "--masking.random_prob=0.5"], "--masking.mask_prob", "[MASK]"),
    "smoothness over zero batches": (["--train.smooth_every=1", "--train.smooth_batches=0"],
                                     "--train.smooth_batches", "zero batches"),
    "smoothness without validation": (["--train.smooth_every=1", "--train.eval_batches=0"],
                                      "--train.smooth_every", "validation"),
    "ascent that cannot move": (["--alum.step_size=0"], "--alum.step_size", "would not move delta"),
    "NSP in R without NSP": (["--alum.include_nsp=true", "--data.nsp=false"], "--alum.include_nsp", "no NSP"),
    "batch larger than the corpus": (["--train.batch_size=6000"], "--train.batch_size", "fewer than one global"),
    "global batch larger than the corpus": (["--train.global_batch_size=8000"], "--train.global_batch_size",
                                            "fewer than one global"),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_alum_train_refuses_a_bad_value_naming_the_flag_before_the_run_folder_exists(world, tmp_path, capsys, case):
    extra, flag, words = TRAIN_CASES[case]
    extra = [e.format(**vars(world)) for e in extra]
    rc, err = _train(train_args(world.db, tmp_path / "run", 2, *extra), capsys)
    line = [ln for ln in err.splitlines() if ln.startswith("alum-train: error:")]
    assert rc == 2 and line and flag in line[0] and words in line[0], err[-2000:]
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_whole_word_masking_needs_a_tokenizer_that_marks_words(world, tmp_path, capsys):
    rc, err = _train(train_args(world.words, tmp_path / "run", 1, "--masking.whole_word=true"), capsys)
    assert rc == 2 and "--masking.whole_word=True: the tokenizer" in err and "continuations" in err, err[-2000:]
    assert not (tmp_path / "run").exists()


def test_an_empty_validation_split_is_refused_not_reported(world, tmp_path, capsys):
    rc, err = _train(train_args(world.empty_valid, tmp_path / "run", 2), capsys)
    assert rc == 2 and "--data.valid_split='valid'" in err and "no sequence" in err, err[-2000:]
    assert not (tmp_path / "run").exists()


def test_a_refused_value_on_resume_leaves_the_run_byte_identical(world, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_train(world.db, out, 2, "--train.eval_every=0") == 0
    before = snapshot(out)
    # smooth_every / smooth_batches may change on resume (speed-only keys): the value check refuses, not resume
    rc, err = _train(train_args(world.db, out, 2, "--train.eval_every=0", "--train.smooth_every=1",
                                "--train.smooth_batches=0"), capsys)
    assert rc == 2 and "--train.smooth_batches" in err
    assert snapshot(out) == before


def test_alum_that_never_switches_on_or_a_delta_fixed_at_0_is_said_at_start(world, tmp_path, capsys):
    """Not refused: a run extended later (--train.resume_override=train.max_steps) is how the standard
    objective is trained first, and delta = 0 is the control of the delta-share measurement (R = dropout
    consistency, or exactly 0 with shared masks); the start says so, naming the flag."""
    rc, err = _train(train_args(world.db, tmp_path / "run", 1, "--alum.start_step=10", "--train.eval_every=0"),
                     capsys)
    assert rc == 0 and "--alum.start_step=10: ALUM will not switch on in this run of 1 steps" in err, err[-2000:]
    rc, err = _train(train_args(world.db, tmp_path / "run0", 1, "--alum.noise_std=0", "--alum.k_steps=0",
                                "--train.eval_every=0"), capsys)
    assert rc == 0 and "--alum.noise_std=0.0: with --alum.k_steps=0 delta is exactly 0, so R is the dropout" in err
    rc, err = _train(train_args(world.db, tmp_path / "run1", 1, "--alum.noise_std=0", "--alum.k_steps=0",
                                "--alum.adv_dropout=shared", "--train.eval_every=0"), capsys)
    assert rc == 0 and "delta is exactly 0, so R is exactly 0" in err, err[-2000:]
    assert all(r["adv"] == 0.0 for r in read_log(tmp_path / "run1"))


def test_eval_batches_0_turns_validation_off_instead_of_reporting_zeros(world, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_train(world.db, out, 1, "--train.eval_batches=0") == 0
    assert read_log(out, "valid") == []
    assert len(read_log(out)) == 1


# ---- alum-finetune ------------------------------------------------------------------------------

FINETUNE_CASES = {
    "max_length beyond the positions": (["--data.max_length=64"], "--data.max_length", "positions for 40"),
    "empty dev file": (["--dev", "{root}/empty.tsv"], "--data.dev", "over nothing"),
    "empty training file": (["--train", "{root}/empty.tsv"], "--data.train", "no example"),
    "SMART ascent that cannot move": (["--method", "smart", "--smart.step_size=0"], "--smart.step_size",
                                      "would not move delta"),
    "FreeLB adversary that never moves": (["--method", "freelb", "--freelb.adv_lr=0", "--freelb.adv_init_mag=0"],
                                          "--freelb.adv_lr", "delta stays 0"),
    "PGD adversary that never moves": (["--method", "pgd", "--pgd.adv_lr=0", "--pgd.adv_init_mag=0"],
                                       "--pgd.adv_lr", "plain fine-tuning"),
    "tokenizer larger than the embedding": (["--model", "{few_rows}"], "--model.path", "embeds only 500"),
}


@pytest.mark.parametrize("case", list(FINETUNE_CASES))
def test_alum_finetune_refuses_a_bad_value_before_out_exists(world, tmp_path, capsys, case):
    from alum_pretrain.finetune.cli import main

    extra, flag, words = FINETUNE_CASES[case]
    base = ["--model", str(world.bert40), "--task", "sst2", "--train", str(world.root / "train.tsv"), "--dev",
            str(world.root / "dev.tsv"), "--data.max_length=32", "--optim.batch_size=4", "--optim.epochs=1",
            "--run.progress=false", "--out", str(tmp_path / "ft")]
    rc = main(base + [e.format(**vars(world)) for e in extra])
    err = capsys.readouterr().err
    assert rc == 2 and flag in err and words in err, err[-2000:]
    assert not (tmp_path / "ft").exists()


def test_alum_bench_checks_every_run_before_locking_its_folder(world, tmp_path):
    from alum_pretrain.finetune.bench import check_runs
    from alum_pretrain.config import config_from_dict
    from alum_pretrain.finetune.config import FinetuneConfig

    cfg = config_from_dict(FinetuneConfig, {
        "model": {"path": str(world.bert40)}, "data": {"task": "sst2", "train": str(world.root / "train.tsv"),
                                                      "dev": str(world.root / "empty.tsv"), "max_length": 32},
        "run": {"out": str(tmp_path / "r0"), "progress": False}})
    run = SimpleNamespace(cfg=cfg, index=0, checkpoint="ck", task=SimpleNamespace(name="sst2"), method="plain")
    with pytest.raises(ValueError, match=r"run 0 \(ck / sst2 / plain\): --data.dev="):
        check_runs([run])
    assert not (tmp_path / "r0").exists()


def test_alum_eval_robust_refuses_a_max_length_beyond_the_positions(world, tmp_path, capsys):
    from alum_pretrain.finetune.robust import main

    rc = main(["--model", str(world.clf40), "--task", "sst2", "--data", str(world.root / "dev.tsv"),
               "--data.max_length=64", "--out", str(tmp_path / "report.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "--data.max_length=64" in err and "positions for 40 tokens" in err, err[-2000:]
    assert not (tmp_path / "report.json").exists()


def test_robustness_rates_over_no_example_are_null_not_zero():
    from alum_pretrain.finetune.robust import format_table

    row = {"model": "m", "clean_accuracy": 0.0, "attack": {"attacked_accuracy": 0.0, "attack_success_rate": None}}
    assert format_table([row]).splitlines()[-1] == "| m | 0.000 | 0.000 | n/a | n/a |"


# ---- alum-smoothness, the Trainer integration, the fairseq plugin ---------------------------------------


def test_alum_smoothness_refuses_a_seq_len_beyond_the_positions(world, capsys):
    from alum_pretrain.smoothness_cli import main

    rc = main([str(world.roberta), "--data", str(world.db), "--seq-len", "40", "--batches", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--seq-len=40" in err and "positions for 33 tokens" in err, err[-2000:]


def test_the_trainer_integration_checks_the_same_objective_values(world, tmp_path, caplog):
    import transformers as T

    from alum_pretrain.adversarial import ALUMConfig
    from alum_pretrain.hf import AlumTrainer, MaskingCurriculumCallback
    from alum_pretrain.masking import MaskingConfig

    tok = T.AutoTokenizer.from_pretrained(str(world.db / "tokenizer"))
    collator = T.DataCollatorForLanguageModeling(tok)
    with pytest.raises(ValueError, match=r"--masking\.start_rate=0\.0: .*mask no token"):
        MaskingCurriculumCallback(collator, MaskingConfig(start_rate=0.0))
    model = T.BertForMaskedLM(T.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=64))
    args = T.TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=5, report_to=[], use_cpu=True)
    # The Python API warns (delta = 0 is a documented control there); the CLIs refuse.
    with caplog.at_level(logging.WARNING, logger="alum_pretrain.compat"):
        AlumTrainer(model=model, args=args, data_collator=collator, alum=ALUMConfig(start_step=5, step_size=0.0))
    text = caplog.text
    assert "--alum.start_step=5: ALUM will not switch on" in text and "--alum.step_size=0.0" in text, text


def test_the_fairseq_plugin_names_its_own_flags(caplog):
    pytest.importorskip("fairseq", reason="fairseq not installed")
    from alum_pretrain.fairseq_ext.criterion import AlumMaskedLMCriterion, AlumMaskedLMCriterionConfig

    task = SimpleNamespace(cfg=SimpleNamespace(max_update=10, sample_mode="blocks"))
    common = dict(seed=1, fp16=False, bf16=False, memory_efficient_fp16=False, memory_efficient_bf16=False)
    with pytest.raises(ValueError, match=r"--alum-step-size=0\.0"):
        AlumMaskedLMCriterion(AlumMaskedLMCriterionConfig(alum_step_size=0.0, **common), task)
    with pytest.raises(ValueError, match=r"--alum-include-nsp=True: the run has no NSP head"):
        AlumMaskedLMCriterion(AlumMaskedLMCriterionConfig(alum_include_nsp=True, **common), task)
    with caplog.at_level(logging.WARNING, logger="alum_pretrain.compat"):
        AlumMaskedLMCriterion(AlumMaskedLMCriterionConfig(alum_start_step=10, **common), task)
    assert "--alum-start-step=10: ALUM will not switch on in this run of 10 steps" in caplog.text
    AlumMaskedLMCriterion(AlumMaskedLMCriterionConfig(**common), task)  # the defaults pass


# ---- the model limits ---------------------------------------------------------------------------------


def test_usable_positions_per_family():
    import transformers as T

    from alum_pretrain.compat import usable_positions

    assert usable_positions(T.BertConfig(max_position_embeddings=512)) == 512
    assert usable_positions(T.RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512  # from pad + 1
    assert usable_positions(T.XLMRobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512
    assert usable_positions(T.DebertaV2Config(position_biased_input=False)) is None  # relative positions only
    assert usable_positions(T.DebertaV2Config(position_biased_input=True, max_position_embeddings=256)) == 256


def test_max_samples_bounds_what_the_loader_builds(world):
    """The up-front batch check never refuses a batch the loader could fill: its bound is >= the plan."""
    from alum_pretrain.compat import max_samples
    from alum_pretrain.data.databin import DataBin
    from alum_pretrain.data.loader import build_loader

    databin = DataBin(world.db)
    sizes = databin.split(0, "train").sizes
    for mode, nsp in (("pairs", True), ("blocks", False)):
        for seq in (16, 32, 128):
            loader = build_loader(databin, "train", mode=mode, nsp=nsp, max_seq_len=seq, batch_size=1, seed=1)
            assert len(loader.plan(0)) <= max_samples(sizes, seq), (mode, seq)
