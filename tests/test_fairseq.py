"""fairseq plugin (alum_pretrain/fairseq_ext): task + criterion in real `fairseq-train` runs, resume,
continual pre-training, ALUM term == the native core's, HF export parity, and core imports without fairseq.

References written here from the paper (not calls into the implementation): the masking-rate curriculum
(ALUM Sec. 2.3: 5 % -> 25 % in steps of 5 % every 20 % of training) and the dictionary/position remap.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, requires_fairseq, shared_file
from databin_factory import make_databin, wikitext_documents

USER_DIR = ROOT / "alum_pretrain" / "fairseq_ext"
TINY = ["--arch", "roberta", "--encoder-layers", "2", "--encoder-embed-dim", "64", "--encoder-ffn-embed-dim", "128",
        "--encoder-attention-heads", "2", "--tokens-per-sample", "64", "--batch-size", "8", "--optimizer", "adam",
        "--lr", "1e-3", "--cpu", "--num-workers", "0", "--log-format", "json", "--log-interval", "1",
        "--no-epoch-checkpoints", "--disable-validation", "--seed", "3"]
# Large enough that R is far above float32 noise in a tiny model (paper values make R ~ 1e-10 here).
STRONG_ALUM = ["--alum-epsilon", "1e-2", "--alum-noise-std", "1e-3", "--alum-step-size", "1e-2"]


def curriculum_rate(update_num: int, total: int) -> float:
    """ALUM Sec. 2.3: 5 % for the first 20 % of training, +5 % every further 20 %, 25 % at the end."""
    phase = min(int(5 * update_num / total + 1e-9), 4)
    return 0.05 * (phase + 1)


@pytest.fixture(scope="module")
def databin(tmp_path_factory):
    raw = shared_file("wikitext-2-raw/wiki.test.raw")
    vocab = shared_file("vocab/bert-base-uncased-vocab.txt")
    docs = wikitext_documents(raw, max_docs=40)
    valid, train = docs[:4], docs[4:]
    shards = [{"train": train[k::2], "valid": valid} for k in range(2)]
    return make_databin(tmp_path_factory.mktemp("fs") / "bin", shards, vocab)


def fairseq_train(data, save_dir, *extra, timeout=300):
    cmd = [sys.executable, "-m", "fairseq_cli.train", str(data), "--user-dir", str(USER_DIR),
           "--task", "alum_masked_lm", "--criterion", "alum_masked_lm", "--save-dir", str(save_dir), *TINY,
           *map(str, extra)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    logs = []
    for line in out.splitlines():
        if "| train_inner |" in line:
            logs.append(json.loads(line.split("| train_inner |", 1)[1]))
    return logs, out


# ---------------------------------------------------------------------------------------------------
# Core imports without fairseq (runs with or without fairseq installed)
# ---------------------------------------------------------------------------------------------------


def test_core_imports_without_fairseq():
    code = ("import sys; sys.modules['fairseq'] = None\n"
            "import alum_pretrain, alum_pretrain.adversarial, alum_pretrain.masking, alum_pretrain.data.databin\n"
            "import alum_pretrain.fairseq_ext, alum_pretrain.fairseq_ext.export_hf\n"
            "assert not any(m == 'fairseq' or m.startswith('fairseq.') for m, v in sys.modules.items() if v), 'fairseq imported'\n"
            "print('ok')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------
# fairseq-train runs
# ---------------------------------------------------------------------------------------------------


TOTAL, START = 12, 5


@pytest.mark.fairseq
@requires_fairseq
def test_train_resume_curriculum_and_adv(databin, tmp_path):
    """6 updates, resume to 12 (curriculum over 12): loss parts logged, adv == 0 before
    --alum-start-step and > 0 after, mask rate == the paper's curriculum, resumed == uninterrupted."""
    common = ["--mask-curriculum-updates", TOTAL, "--alum-start-step", START, *STRONG_ALUM]
    data = f"{databin}/shard0:{databin}/shard1"  # fairseq's colon list
    first, _ = fairseq_train(data, tmp_path / "a", "--max-update", TOTAL // 2, *common)
    second, out2 = fairseq_train(data, tmp_path / "a", "--max-update", TOTAL, *common)
    assert "Loaded checkpoint" in out2 and f"@ {TOTAL // 2} updates" in out2
    full, _ = fairseq_train(databin, tmp_path / "b", "--max-update", TOTAL, *common)  # root: shards discovered
    resumed = first + second
    assert [int(r["num_updates"]) for r in resumed] == list(range(1, TOTAL + 1))
    assert [int(r["num_updates"]) for r in full] == list(range(1, TOTAL + 1))
    for r in resumed:
        u = int(r["num_updates"]) - 1  # fairseq logs after the update: update_num = num_updates - 1
        for key in ("loss", "mlm_loss", "adv", "mask_rate", "masked_frac", "alum_on"):
            assert key in r, key
        assert float(r["mask_rate"]) == pytest.approx(curriculum_rate(u, TOTAL), abs=1e-6)
        # realised fraction of maskable tokens close to the scheduled rate (exact count per sequence)
        assert abs(float(r["masked_frac"]) - curriculum_rate(u, TOTAL)) < 0.03
        if u < START:
            assert float(r["adv"]) == 0.0 and float(r["alum_on"]) == 0.0
            assert float(r["loss"]) == pytest.approx(float(r["mlm_loss"]), abs=1e-3)
        else:
            assert float(r["adv"]) > 0.0 and float(r["alum_on"]) == 1.0
            assert float(r["loss"]) > float(r["mlm_loss"])  # + alpha * R
            # the ALUM diagnostics are logged on every ALUM update
            assert float(r["ascent_zero_grad_frac"]) <= 0.01
            assert float(r["ascent_nonfinite"]) == 0 and float(r["adv_nonfinite"]) == 0
    # Resume masks (and trains) exactly like the uninterrupted run.
    for r, f in zip(resumed, full):
        assert r["masked_frac"] == f["masked_frac"] and r["mask_rate"] == f["mask_rate"]
        assert float(r["mlm_loss"]) == pytest.approx(float(f["mlm_loss"]), abs=2e-3)


@pytest.mark.fairseq
@requires_fairseq
def test_pairs_nsp_continual_pretraining_and_export(databin, tmp_path):
    """Stage 1: blocks MLM. Stage 2: continual pre-training from it (--restore-file + resets) with NSP
    pairs and ALUM from update 0. Export stage 2 via alum-export and check HF logits parity (< 1e-4)."""
    fairseq_train(databin, tmp_path / "s1", "--max-update", 4, "--alum-alpha", 0)
    # Simulate a released checkpoint whose vocabulary rows follow the tokenizer ids directly (like
    # roberta.base with the HF roberta tokenizer) and bring it back with remap_checkpoint --src-id-offset 0.
    released = _released_layout(tmp_path / "s1" / "checkpoint_last.pt", tmp_path / "released.pt")
    from alum_pretrain.fairseq_ext.remap_checkpoint import main as remap_main

    restore = tmp_path / "remapped.pt"
    assert remap_main([str(released), str(databin), str(restore), "--src-id-offset", "0"]) == 0
    _check_same_lm(tmp_path / "s1" / "checkpoint_last.pt", restore)
    logs, out = fairseq_train(
        databin, tmp_path / "s2", "--max-update", 4, "--sample-mode", "pairs", "--masking-whole-word",
        "--restore-file", restore, "--reset-optimizer", "--reset-dataloader",
        "--reset-meters", "--reset-lr-scheduler", *STRONG_ALUM)
    assert "Loaded checkpoint" in out and str(restore) in out
    assert [int(r["num_updates"]) for r in logs] == [1, 2, 3, 4]  # counters reset for the new stage
    for r in logs:
        assert float(r["nsp_loss"]) > 0 and 0.0 <= float(r["nsp_acc"]) <= 1.0
        assert float(r["adv"]) > 0  # --alum-start-step 0: ALUM from the first update
    assert float(logs[0]["mask_rate"]) == pytest.approx(0.05)

    # Export through the alum-export entry point (a fairseq .pt is dispatched to export_hf).
    from alum_pretrain.export import main as export_main

    out_dir = tmp_path / "hf"
    assert export_main([str(tmp_path / "s2" / "checkpoint_last.pt"), str(out_dir)]) == 0
    assert (out_dir / "nsp_head.safetensors").exists() and (out_dir / "tokenizer.json").exists()
    card = (out_dir / "README.md").read_text()
    assert "pipeline_tag: fill-mask" in card and "engine: fairseq" in card and str(tmp_path) not in card
    _check_parity(tmp_path / "s2" / "checkpoint_last.pt", out_dir, nsp=True)


def _released_layout(ckpt: Path, out: Path) -> Path:
    """Our checkpoint with vocabulary row i = tokenizer id i (no fairseq specials first), old key names."""
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    model = {}
    for k, v in state["model"].items():
        if k in ("encoder.sentence_encoder.embed_tokens.weight", "encoder.lm_head.weight", "encoder.lm_head.bias"):
            v = v[4:]  # drop fairseq's 4 specials: row i = tokenizer id i (+ the trailing <mask> row)
        model[k.replace("encoder.", "decoder.", 1)] = v  # pre-2020 key names, as in roberta.base/model.pt
    state["model"] = model
    torch.save(state, out)
    return out


def _check_same_lm(a: Path, b: Path):
    """Both checkpoints give the same MLM logits on real tokens (vocabulary rows 4..4+V)."""
    import alum_pretrain.fairseq_ext  # noqa: F401
    from fairseq import checkpoint_utils

    (ma,), _, task = checkpoint_utils.load_model_ensemble_and_task([str(a)])
    (mb,), _, _ = checkpoint_utils.load_model_ensemble_and_task([str(b)])
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4 + 1000, 4 + 5000, (2, 20), generator=g)
    src[:, 0] = task.cls_idx
    with torch.no_grad():
        la, _ = ma.eval()(src)
        lb, _ = mb.eval()(src)
    v = task.tokenizer_vocab_size
    assert (la[..., 4:4 + v] - lb[..., 4:4 + v]).abs().max().item() < 1e-5


def _check_parity(ckpt: Path, out_dir: Path, nsp: bool):
    import alum_pretrain.fairseq_ext  # noqa: F401  (registers the task; allows Namespace in torch.load)
    from fairseq import checkpoint_utils
    from safetensors.torch import load_file
    from transformers import AutoModelForMaskedLM, AutoTokenizer, RobertaForSequenceClassification

    models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(ckpt)])
    fs = models[0].eval()
    tok = AutoTokenizer.from_pretrained(str(out_dir))
    hf = AutoModelForMaskedLM.from_pretrained(str(out_dir)).eval()
    enc = tok(["the film was released in 1994 .", "he played american football for the detroit lions"],
              ["it was a [MASK] success .", "later he worked in television"], padding=True, return_tensors="pt")
    assert set(enc) == {"input_ids", "attention_mask"}  # no token_type_ids: RoBERTa has one segment
    ids, am = enc["input_ids"], enc["attention_mask"].bool()
    manifest = json.loads((Path(task.root) / "manifest.json").read_text())
    off = manifest["id_offset"]
    # Independent remap: fairseq id = tokenizer id + id_offset, fairseq pad = 1.
    fs_ids = torch.where(am, ids + off, torch.full_like(ids, fs.encoder.dictionary.pad()))
    with torch.no_grad():
        fl, _ = fs(fs_ids)  # (B, T, V_fairseq)
        hl = hf(**enc).logits  # (B, T, V_tokenizer)
    diff = (fl[..., off:off + hl.shape[-1]] - hl)[am].abs().max().item()
    assert diff < 1e-4, diff
    assert hl.shape[-1] == manifest["tokenizer"]["vocab_size"]
    if nsp:
        clf = RobertaForSequenceClassification.from_pretrained(str(out_dir), num_labels=2).eval()
        missing, unexpected = clf.load_state_dict(load_file(str(out_dir / "nsp_head.safetensors")), strict=False)
        assert not unexpected and not any(k.startswith("classifier") for k in missing)
        with torch.no_grad():
            feats, _ = fs(fs_ids, features_only=True)
            f_nsp = fs.classification_heads["nsp"](feats)
            h_nsp = clf(**enc).logits
        assert (f_nsp - h_nsp).abs().max().item() < 1e-4


# ---------------------------------------------------------------------------------------------------
# In-process: the criterion's ALUM term == the native core's on the same model and batch
# ---------------------------------------------------------------------------------------------------


def _setup(databin, *extra):
    import alum_pretrain.fairseq_ext  # noqa: F401
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [str(databin), "--task", "alum_masked_lm", "--criterion",
                                                "alum_masked_lm", "--max-update", "10", *TINY, *STRONG_ALUM,
                                                *map(str, extra)])
    cfg = convert_namespace_to_omegaconf(args)
    torch.manual_seed(0)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    task.load_dataset("valid")
    itr = task.get_batch_iterator(task.dataset("valid"), max_sentences=4, seed=1).next_epoch_itr(shuffle=False)
    return task, model, criterion, next(iter(itr))


@pytest.mark.fairseq
@requires_fairseq
@pytest.mark.parametrize("mode", ["blocks", "pairs"])
def test_criterion_alum_equals_core(databin, mode):
    from alum_pretrain.adversarial import ALUMConfig, alum_regularizer
    from alum_pretrain.masking import SampleNoise

    # pairs: NSP also inside R (--alum-include-nsp); blocks: the paper's MLM-only R (the default)
    extra = ("--alum-include-nsp",) if mode == "pairs" else ()
    task, model, criterion, sample = _setup(databin, "--sample-mode", mode, *extra)
    sample = task.mask_sample(sample, 0.15, 7, 0)
    model.eval()  # no dropout: both computations see the same network
    criterion.train()  # ALUM only runs in training mode of the criterion
    loss, n, log = criterion(model, sample)
    r_crit = float(log["adv"]) / float(n)
    assert r_crit > 0

    # Reference: fairseq's own precomputed-embedding path (token_embeddings=) instead of hooks.
    src = sample["net_input"]["src_tokens"]
    masked = sample["target"].ne(task.dictionary.pad())
    enc = model.encoder

    def heads(e):
        feats, _ = enc.extract_features(src, token_embeddings=e)  # (B, T, C)
        nsp = model.classification_heads["nsp"](feats) if mode == "pairs" else None
        return enc.output_layer(feats, masked_tokens=masked), nsp

    e = enc.sentence_encoder.embed_tokens(src)  # (B, T, C) word embeddings
    clean = heads(e)
    cfg = ALUMConfig(alpha=10.0, epsilon=1e-2, step_size=1e-2, noise_std=1e-3, k_steps=1)
    gen = SampleNoise(3, 7, sample["id"])  # the per-sample random start (the shared definition)
    r_ref, _ = alum_regularizer(heads, e, clean if mode == "pairs" else (clean[0], None), cfg,
                                pad_mask=src.ne(task.dictionary.pad()), generator=gen)
    assert r_crit == pytest.approx(float(r_ref.detach()), rel=1e-4)

    # Total = sum CE_mlm (+ NSP mean * N) + alpha * R * N  (criterion docstring normalisation)
    targets = sample["target"][masked]
    ce = torch.nn.functional.cross_entropy(clean[0].float(), targets, reduction="sum")
    expect = ce + 10.0 * r_ref.detach() * float(n)
    if mode == "pairs":
        nsp_mean = torch.nn.functional.cross_entropy(clean[1].float(), sample["nsp_target"])
        expect = expect + nsp_mean * float(n)
    assert float(loss) == pytest.approx(float(expect), rel=1e-4)


@pytest.mark.fairseq
@requires_fairseq
def test_samples_longer_than_the_models_positions_are_refused_by_flag(databin):
    """--tokens-per-sample beyond the model's --max-positions: a clear error naming both flags at model build,
    not fairseq's size filter or an index error in the position embedding."""
    with pytest.raises(ValueError, match=r"--tokens-per-sample=64: .*positions for 32 tokens.*--max-positions"):
        _setup(databin, "--max-positions", "32")


@pytest.mark.fairseq
@requires_fairseq
def test_every_native_knob_is_a_fairseq_option(databin, monkeypatch):
    """alum.* / masking.* of alum-train -> --<section>-<field> (alum_pretrain.knobs.to_argv) -> the real fairseq
    parser -> the criterion's ALUMConfig and the task's MaskingConfig == the native configs; the old spellings
    still work (mapped, with a FutureWarning)."""
    from alum_pretrain import knobs
    from alum_pretrain.adversarial import ALUMConfig
    from alum_pretrain.masking import MaskingConfig

    monkeypatch.setattr(knobs, "_warned", set())
    alum = ALUMConfig(alpha=3.0, epsilon=2e-5, step_size=5e-4, noise_std=3e-5, k_steps=2, projection="l2",
                      perturb_at="embedding_output", start_step=7, divergence="sym_kl", include_nsp=True,
                      log_baseline=True)
    masking = MaskingConfig(schedule="constant", start_rate=0.1, end_rate=0.3, num_phases=4, constant_rate=0.2,
                            mask_prob=0.7, random_prob=0.2, whole_word=True)
    task, _, criterion, _ = _setup(databin, "--sample-mode", "pairs",  # alum.include_nsp needs the NSP head
                                   *knobs.to_argv("alum", alum), *knobs.to_argv("masking", masking))
    assert criterion.alum == alum and task.masking == masking and task.masker.cfg == masking
    task, _, criterion, _ = _setup(databin)  # defaults: the native defaults (STRONG_ALUM aside)
    assert task.masking == MaskingConfig()
    assert criterion.alum == ALUMConfig(epsilon=1e-2, noise_std=1e-3, step_size=1e-2)

    old = ["--alum-k", "2", "--alum-start-update", "7", "--mask-schedule", "constant", "--mask-start-rate", "0.1",
           "--mask-end-rate", "0.3", "--mask-num-phases", "4", "--mask-constant-rate", "0.2", "--mask-replace-prob",
           "0.7", "--mask-random-prob", "0.2", "--mask-whole-words"]
    with pytest.warns(FutureWarning) as record:
        task, _, criterion, _ = _setup(databin, *old)
    said = " ".join(str(w.message) for w in record)
    for flag in old[::2] + ["--mask-whole-words"]:
        if flag.startswith("--"):
            assert f"{flag} is deprecated" in said, flag
    assert (criterion.alum.k_steps, criterion.alum.start_step) == (2, 7)
    assert task.masking == masking
    with pytest.raises(ValueError, match="--alum-k=3.*--alum-k-steps=2"):
        _setup(databin, "--alum-k", "3", "--alum-k-steps", "2")


@pytest.mark.fairseq
@requires_fairseq
def test_mask_sample_and_datasets(databin):
    """Masking only touches non-special tokens with the tokenizer's [MASK]; blocks keep every token;
    NSP pairs: label 0 = B continues A in the same document, 1 = B from another document."""
    from alum_pretrain.data.databin import DataBin

    task, model, criterion, sample = _setup(databin)
    src = sample["net_input"]["src_tokens"]
    out = task.mask_sample(sample, 0.25, 5, 0)
    again = task.mask_sample(sample, 0.25, 5, 0)
    assert torch.equal(out["net_input"]["src_tokens"], again["net_input"]["src_tokens"])  # deterministic
    pad = task.dictionary.pad()
    sel = out["target"].ne(pad)
    specials = {pad, task.cls_idx, task.sep_idx}
    assert not any(int(t) in specials for t in src[sel])
    assert torch.equal(out["target"][sel], src[sel])
    m = out["net_input"]["src_tokens"]
    assert torch.equal(m[~sel], src[~sel])
    frac_mask = (m[sel] == task.mask_idx).float().mean().item()
    assert 0.6 < frac_mask < 0.95  # ~80 % [MASK] of the selected
    tok = DataBin(databin).tokenizer()
    assert task.mask_idx == tok.mask_token_id + 4 and task.cls_idx == tok.cls_token_id + 4

    # Blocks: concatenating every block (minus [CLS] and document-end [SEP]) gives the shard's tokens.
    task.load_dataset("train", epoch=1)
    ds = task.dataset("train")
    db = DataBin(databin)
    split = db.split(0, "train")
    expect = np.concatenate([split[i] for i in range(len(split))]) + 4
    inner = ds.dataset  # SortDataset -> NestedDictionaryDataset
    blocks = [inner[i]["net_input.src_tokens"] for i in range(len(inner))]
    assert all(int(b[0]) == task.cls_idx and len(b) <= 64 for b in blocks)
    toks = torch.cat([b[1:] for b in blocks])
    got = toks[toks != task.sep_idx].numpy()
    assert np.array_equal(got, expect[expect != task.sep_idx])
    assert int((toks == task.sep_idx).sum()) == split.num_docs  # one [SEP] per document end

    # Pairs: check the labels against the document index.
    task2, _, _, _ = _setup(databin, "--sample-mode", "pairs")
    task2.load_dataset("train", epoch=1)
    pairs = task2.dataset("train").dataset.pairs
    doc_of = np.searchsorted(split.doc_starts, np.arange(len(split)), side="right") - 1
    labels = pairs.plan["label"]
    assert 0.3 < labels.mean() < 0.7
    for row in pairs.plan[:200]:
        same = doc_of[row["a_lo"]] == doc_of[row["b_lo"]]
        assert same == (row["label"] == 0)
    for i in range(50):
        item = pairs[i]["source"]
        assert len(item) <= 64 and int(item[0]) == task2.cls_idx and int(item[-1]) == task2.sep_idx
        assert int((item == task2.sep_idx).sum()) == 2


@pytest.mark.fairseq
@requires_fairseq
def test_criterion_dropout_modes_rdrop_and_relative_scale(databin):
    """The fairseq criterion with dropout on: shared masks and delta = 0 give R = 0 exactly; independent masks
    and delta = 0 equal the R-Drop objective, which equals SymKL of two dropout passes computed by hand."""
    from alum_pretrain.divergence import symmetric_kl

    zero = ("--alum-noise-std", "0", "--alum-k-steps", "0", "--dropout", "0.3")

    def term(*extra, seed=11):
        task, model, criterion, sample = _setup(databin, "--sample-mode", "blocks", *extra)
        sample = task.mask_sample(sample, 0.15, 7, 0)
        model.train()
        criterion.train()
        torch.manual_seed(seed)
        _, n, log = criterion(model, sample)
        return float(log["adv"]) / float(n), (task, model, sample)

    assert term(*zero, "--alum-adv-dropout", "shared")[0] == 0.0
    r_ind, _ = term(*zero)
    r_rdrop, (task, model, sample) = term("--alum-objective", "rdrop", "--dropout", "0.3")
    assert r_ind > 1e-4 and r_rdrop == pytest.approx(r_ind, rel=1e-6)
    src = sample["net_input"]["src_tokens"]
    masked = sample["target"].ne(task.dictionary.pad())
    torch.manual_seed(11)
    first, _ = model(src, masked_tokens=masked)
    second, _ = model(src, masked_tokens=masked)
    assert r_rdrop == pytest.approx(float(symmetric_kl(second, first)), rel=1e-4)
    r_off, _ = term(*zero, "--alum-adv-dropout", "off")
    assert r_off > 0 and r_off != pytest.approx(r_ind)
    r_rel, _ = term("--alum-scale", "rel", "--alum-epsilon", "0.05", "--alum-step-size", "0.05", "--dropout", "0")
    assert 0 < r_rel < float("inf")


@pytest.mark.fairseq
@requires_fairseq
def test_reduce_metrics_reports_the_delta_share():
    from fairseq.logging import metrics

    from alum_pretrain.fairseq_ext.criterion import AlumMaskedLMCriterion

    logs = [{"loss": 8.0, "mlm_loss": 6.0, "adv": 0.4, "adv_dropout": 0.3, "alum_n": 1, "sample_size": 2,
             "nsentences": 2, "alum_on": 2}]
    with metrics.aggregate() as agg:
        AlumMaskedLMCriterion.reduce_metrics(logs)
        vals = agg.get_smoothed_values()
    assert vals["adv"] == pytest.approx(0.2) and vals["adv_dropout"] == pytest.approx(0.15)
    assert vals["adv_share"] == pytest.approx(0.25)
