"""Every encoder family of :data:`alum_pretrain.families.FAMILIES`, one matrix: a tiny random model of each
(the row in :data:`ROWS`) against the plain HF forward, under 16-bit autocast, and through the whole chain
alum-prep -> ALUM continual pre-training (both perturbation points) -> alum-export -> fill-mask -> SMART
fine-tuning; plus the modernbert-tiny / deberta-tiny scratch presets, the generic path for other
architectures, the config-time errors, and the support table of docs/families.md.

No downloads: the corpus is the standard library's docstrings, the tokenizer a small WordPiece trained on
it (sentencepiece BPE / unigram for the scratch presets, as docs/families.md tells users).
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import pytest
import torch
import transformers as T

from alum_pretrain.adversarial import ALUMConfig
from alum_pretrain.families import FAMILIES, GENERIC, family_of, scratch_presets, support_table
from alum_pretrain.models import PretrainModel, build_scratch_model, load_continual_model, load_model
from alum_pretrain.objective import Normalizers, pretrain_objective

V = 101
_BERTISH = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=64)

# One row per family: a tiny random config with the family's distinctive features switched on.
ROWS = {
    "BERT": lambda v, pad: T.BertConfig(vocab_size=v, pad_token_id=pad, **_BERTISH),
    "RoBERTa": lambda v, pad: T.RobertaConfig(vocab_size=v, pad_token_id=pad, type_vocab_size=1, **_BERTISH),
    "XLM-R": lambda v, pad: T.XLMRobertaConfig(vocab_size=v, pad_token_id=pad, type_vocab_size=1, **_BERTISH),
    # 3 layers: global, local, local; a window (8) shorter than the sequences, so local attention matters
    "ModernBERT": lambda v, pad: T.ModernBertConfig(
        vocab_size=v, pad_token_id=pad, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=48, local_attention=8, max_position_embeddings=64, cls_token_id=None, sep_token_id=None,
        bos_token_id=None, eos_token_id=None, attn_implementation="sdpa"),
    # DeBERTa-v3 attention: relative positions only, shared keys, log buckets
    "DeBERTa-v2": lambda v, pad: T.DebertaV2Config(
        vocab_size=v, pad_token_id=pad, relative_attention=True, pos_att_type=["p2c", "c2p"],
        position_biased_input=False, max_relative_positions=-1, position_buckets=16, norm_rel_ebd="layer_norm",
        share_att_key=True, type_vocab_size=0, **_BERTISH),
    "ELECTRA": lambda v, pad: T.ElectraConfig(vocab_size=v, pad_token_id=pad, embedding_size=16, **_BERTISH),
    "ALBERT": lambda v, pad: T.AlbertConfig(vocab_size=v, pad_token_id=pad, embedding_size=16, **_BERTISH),
    "DistilBERT": lambda v, pad: T.DistilBertConfig(vocab_size=v, pad_token_id=pad, dim=32, n_layers=2, n_heads=2,
                                                    hidden_dim=64, max_position_embeddings=64),
}
NAMES = list(FAMILIES)


def tiny(name: str, vocab: int = V, pad: int = 0, nsp: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    config = ROWS[name](vocab, pad)
    return (T.BertForPreTraining(config) if nsp else T.AutoModelForMaskedLM.from_config(config)).eval()


def batch(pad: int = 0, seed: int = 0, B: int = 3, L: int = 20):
    """Ids with right padding, two segments, ~30 % of the real tokens to predict."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (B, L), generator=g)
    att = torch.ones(B, L, dtype=torch.long)
    att[1, 12:] = 0
    att[2, 17:] = 0
    ids[att == 0] = pad
    tt = torch.zeros(B, L, dtype=torch.long)
    tt[:, 9:] = 1
    tt[att == 0] = 0
    mask = (torch.rand(B, L, generator=g) < 0.3) & att.bool()
    mask[0, 1] = True
    return ids, att, tt, mask


def hf_forward(model, ids, att, tt):
    kw = {"input_ids": ids, "attention_mask": att}
    if int(getattr(model.config, "type_vocab_size", 0) or 0) > 1:
        kw["token_type_ids"] = tt
    out = model(**kw)
    return (out.prediction_logits if hasattr(out, "prediction_logits") else out.logits,
            getattr(out, "seq_relationship_logits", None))


def test_the_matrix_has_one_row_per_family():
    assert list(ROWS) == NAMES
    for name in NAMES:
        model = tiny(name)
        fam = family_of(model)
        assert fam is FAMILIES[name] and model.config.model_type in fam.model_types
        assert type(model).__name__ == fam.masked_lm


# -- the fast path and the perturbation points, per family --------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("perturb_at", ["word", "embedding_output"])
@pytest.mark.parametrize("name", NAMES)
def test_fast_path_equals_the_full_hf_forward_at_masked_positions(name, perturb_at, precision):
    nsp = FAMILIES[name].nsp
    hf = tiny(name, nsp=nsp)
    m = PretrainModel(hf, perturb_at=perturb_at).eval()
    assert m.fast and m.has_nsp == nsp
    ids, att, tt, mask = batch()
    rows = []
    hook = hf.get_output_embeddings().register_forward_hook(lambda mod, i, o: rows.append(i[0].shape[0]))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        full, full_nsp = hf_forward(hf, ids, att, tt)
        rows.clear()
        mlm, nsp_logits = m(ids, att, tt, mask, nsp)
    hook.remove()
    assert rows == [int(mask.sum())]  # the decoder saw the masked rows only
    tol = dict(atol=1e-5, rtol=0) if precision == "fp32" else dict(atol=3e-2, rtol=2e-2)  # bf16: 8-bit mantissa
    torch.testing.assert_close(mlm.float(), full[mask].float(), **tol)
    if nsp:
        torch.testing.assert_close(nsp_logits.float(), full_nsp.float(), **tol)


def test_deberta_non_legacy_head_multiplies_by_the_embedding_matrix():
    torch.manual_seed(0)
    config = ROWS["DeBERTa-v2"](V, 0)
    config.legacy = False  # lm_predictions.lm_head(h, E): no decoder module of its own
    hf = T.DebertaV2ForMaskedLM(config).eval()
    m = PretrainModel(hf)
    ids, att, tt, mask = batch()
    with torch.no_grad():
        full, _ = hf_forward(hf, ids, att, tt)
        mlm, _ = m(ids, att, tt, mask)
    assert m.fast and hasattr(hf, "lm_predictions")
    torch.testing.assert_close(mlm, full[mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_perturbation_points_are_the_documented_modules(name):
    fam = FAMILIES[name]
    hf = tiny(name)
    ids, att, tt, mask = batch()
    assert hf.get_submodule(fam.word_path) is hf.get_input_embeddings()
    emb_module = hf.get_submodule(fam.embedding_path)
    assert emb_module is hf.base_model.embeddings
    if fam.after_embedding:  # the projection to the hidden size follows the perturbed output
        proj = hf.get_submodule(fam.after_embedding)
        assert proj.in_features == hf.config.embedding_size != proj.out_features == hf.config.hidden_size
    seen = []
    handle = emb_module.register_forward_hook(lambda mod, i, o: seen.append(o))
    with torch.no_grad():
        hf_forward(hf, ids, att, tt)
    handle.remove()
    real = att.bool()
    for perturb_at, expected in (("word", hf.get_input_embeddings()(ids)), ("embedding_output", seen[0])):
        m = PretrainModel(hf, perturb_at=perturb_at)
        e = m.embed(ids, tt)
        torch.testing.assert_close(e[real], expected[real], atol=1e-6, rtol=0)
        delta = torch.zeros_like(e, requires_grad=True)
        mlm, _ = m.heads_from_embeds(e.detach() + delta, att, tt, real, False)
        (g,) = torch.autograd.grad(mlm.logsumexp(-1).sum(), delta)
        assert g[real].abs().sum() > 0 and g[~real].abs().max() == 0  # padding is masked out of attention
        with torch.no_grad():
            moved, _ = m.heads_from_embeds(e + 1e-2 * g.sign(), att, tt, real, False)
        assert (moved - mlm).abs().max() > 1e-6


def test_compile_targets_the_layer_stack_of_every_family():
    from alum_pretrain.families import compile_encoder

    for name in NAMES:
        hf = tiny(name)
        stack = getattr(hf.base_model, FAMILIES[name].encoder)
        compile_encoder(hf)  # lazy: compiled on the first call, which this test does not make
        compiled = list(stack) if isinstance(stack, torch.nn.ModuleList) else [stack]
        assert all(m._compiled_call_impl is not None for m in compiled), name


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="no CUDA device")])


@pytest.mark.parametrize("device", ["cpu", CUDA])  # cuda: the fused SDPA kernels (-m gpu on a GPU machine)
@pytest.mark.parametrize("precision", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("perturb_at", ["word", "embedding_output"])
@pytest.mark.parametrize("name", NAMES)
def test_alum_step_stays_finite_under_16bit_autocast(name, perturb_at, precision, device):
    nsp = FAMILIES[name].nsp
    m = PretrainModel(tiny(name, nsp=nsp), perturb_at=perturb_at).to(device).train()
    ids, att, tt, mask = (t.to(device) for t in batch(seed=1))
    targets = torch.randint(5, V, (int(mask.sum()),), generator=torch.Generator().manual_seed(2)).to(device)
    idx = mask.view(-1).nonzero().squeeze(1)
    alum = ALUMConfig(alpha=10.0, perturb_at=perturb_at)

    def heads(e, with_nsp):
        return m.heads_from_embeds(e, att, tt, idx, with_nsp)

    with torch.autocast(device, dtype=precision):
        embeds = m.embed(ids, tt)
        loss, metrics = pretrain_objective(
            heads, embeds, heads(embeds, nsp), mlm_targets=targets,
            nsp_labels=torch.tensor([0, 1, 0], device=device) if nsp else None,
            pad_mask=att.bool(), alum=alum, alum_on=True, norm=Normalizers(mlm=float(targets.numel()), nsp=3.0))
    loss.backward()
    assert torch.isfinite(loss) and math.isfinite(float(metrics["adv"])) and float(metrics["adv"]) >= 0
    assert int(metrics["ascent_nonfinite"]) == 0 and int(metrics["adv_nonfinite"]) == 0
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# -- the whole chain, per family -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from alum_pretrain.demo import stdlib_documents, write_text_corpus

    return write_text_corpus(stdlib_documents(max_docs=60), tmp_path_factory.mktemp("corpus") / "corpus.txt")


@pytest.fixture(scope="module")
def wordpiece(corpus, tmp_path_factory):
    """A small uncased WordPiece tokenizer trained on the corpus (BertTokenizerFast: [PAD]=0 ... [MASK]=4)."""
    from tokenizers import BertWordPieceTokenizer

    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train([str(corpus)], vocab_size=600, min_frequency=2, show_progress=False,
             special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    return T.BertTokenizerFast(vocab=wp.get_vocab(), do_lower_case=True)


def prep(corpus: Path, out: Path, **tokenizer) -> Path:
    from data_prep import PrepConfig, prepare

    prepare(PrepConfig(inputs=[str(corpus)], format="text", out=out, valid_fraction=0.1, progress=False,
                       **tokenizer))
    return out


def train(databin: Path, out: Path, steps: int, *extra: str) -> list[dict]:
    from engine_helpers import read_log, run_train

    assert run_train(databin, out, steps, "--alum.start_step=0", "--train.eval_every=0", *extra) == 0
    return read_log(out)


def masked_sentence_batch(tok):
    return tok(["the value of the [MASK] is returned .", "return a new [MASK] of the list ."], padding=True,
               return_tensors="pt")


def sst_files(d: Path) -> tuple[Path, Path]:
    rows = ["a great and moving film\t1", "wonderful acting , superb story\t1", "truly delightful\t1",
            "i loved it\t1", "a dull and boring mess\t0", "terrible script , awful acting\t0", "painfully bad\t0",
            "i hated it\t0"]
    (d / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n", encoding="utf-8")
    (d / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(rows[:4]) + "\n", encoding="utf-8")
    return d / "train.tsv", d / "dev.tsv"


def smart_step(model_dir: Path, d: Path) -> dict:
    from alum_pretrain.config import config_from_dict
    from alum_pretrain.finetune.config import FinetuneConfig
    from alum_pretrain.finetune.trainer import finetune

    train_tsv, dev_tsv = sst_files(d)
    cfg = config_from_dict(FinetuneConfig, {
        "model": {"path": str(model_dir)}, "data": {"task": "sst2", "train": str(train_tsv), "dev": str(dev_tsv),
                                                    "max_length": 16},
        "optim": {"batch_size": 8, "epochs": 1, "lr": 1e-3}, "run": {"method": "smart", "out": str(d / "ft"),
                                                                     "progress": False, "seed": 1}})
    return finetune(cfg)


@pytest.mark.parametrize("name", NAMES)
def test_whole_chain_prep_alum_export_fill_mask_finetune(name, corpus, wordpiece, tmp_path):
    from alum_pretrain.export import export
    from alum_pretrain.engine.checkpoint import latest_checkpoint

    fam = FAMILIES[name]
    nsp = fam.nsp
    model_dir = tmp_path / "init"
    tiny(name, vocab=len(wordpiece), pad=wordpiece.pad_token_id, nsp=nsp).save_pretrained(model_dir)
    wordpiece.save_pretrained(model_dir)
    databin = prep(corpus, tmp_path / "bin", tokenizer_json=str(model_dir / "tokenizer.json"))
    data = ["--data.nsp=true"] if nsp else ["--data.nsp=false", "--data.mode=blocks"]
    for perturb_at in ("word", "embedding_output"):  # ALUM from step 0 under the masking curriculum
        log = train(databin, tmp_path / perturb_at, 2, f"--model.init_from={model_dir}",
                    f"--alum.perturb_at={perturb_at}", *data)
        assert len(log) == 2 and all(math.isfinite(r["loss"]) and r["adv"] > 0 for r in log), log
    run = tmp_path / "embedding_output"
    out = export(run, tmp_path / "hf")
    mlm = T.AutoModelForMaskedLM.from_pretrained(str(out)).eval()
    assert type(mlm).__name__ == fam.masked_lm
    tok = T.AutoTokenizer.from_pretrained(str(out))
    enc = masked_sentence_batch(tok)
    ours = load_model(latest_checkpoint(run) / "model").eval()
    everywhere = enc["attention_mask"].bool()
    with torch.no_grad():
        theirs, _ = hf_forward(mlm, enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"))
        mine, _ = ours(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"), everywhere)
    assert (theirs[everywhere] - mine).abs().max() <= 1e-5
    first_mask = int((enc["input_ids"][0] == tok.mask_token_id).nonzero()[0])
    fill = T.pipeline("fill-mask", model=str(out), tokenizer=str(out))
    assert fill("the value of the [MASK] is returned .", top_k=1)[0]["token"] == int(theirs[0, first_mask].argmax())
    result = smart_step(out, tmp_path)
    assert result["optimizer_steps"] == 1 and math.isfinite(result["history"][0]["train"]["loss"])


@pytest.mark.parametrize("name", ["ModernBERT", pytest.param("ELECTRA", marks=pytest.mark.slow)])  # ~30 s each
def test_deepspeed_zero3_continual_alum_equals_ddp(name, corpus, wordpiece, tmp_path):
    """The DeepSpeed engine wraps the same PretrainModel: ZeRO-3 (every parameter partitioned, one process)
    logs the DDP run's losses and ends with its weights."""
    import importlib.util
    import os
    import subprocess
    import sys

    from engine_helpers import final_weights, max_weight_diff, read_log, train_args

    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed not installed (pip install 'alum-pretrain[deepspeed]')")
    model_dir = tmp_path / "init"
    tiny(name, vocab=len(wordpiece), pad=wordpiece.pad_token_id).save_pretrained(model_dir)
    wordpiece.save_pretrained(model_dir)
    databin = prep(corpus, tmp_path / "bin", tokenizer_json=str(model_dir / "tokenizer.json"))
    extra = (f"--model.init_from={model_dir}", "--model.dropout=0", "--data.nsp=false", "--data.mode=blocks",
             "--alum.start_step=1", "--alum.epsilon=1e-3", "--alum.noise_std=1e-3", "--train.eval_every=0")
    ddp = train(databin, tmp_path / "ddp", 3, *extra)
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    args = train_args(databin, tmp_path / "ds", 3, *extra, "--train.engine=deepspeed", "--deepspeed.zero_stage=3",
                      "--deepspeed.param_persistence_threshold=0")
    r = subprocess.run([sys.executable, "-m", "alum_pretrain.train", *args], env=env, cwd=str(root),
                       capture_output=True, text=True, timeout=600)  # a subprocess: DeepSpeed keeps a process group
    assert r.returncode == 0, r.stderr[-4000:]
    ds = read_log(tmp_path / "ds")
    assert ds[-1]["adv"] > 0
    for x, y in zip(ddp, ds):
        assert y["loss"] == pytest.approx(x["loss"], rel=2e-3) and y["adv"] == pytest.approx(x["adv"], rel=5e-2)
    assert max_weight_diff(final_weights(tmp_path / "ddp"), final_weights(tmp_path / "ds")) < 2e-3


# -- from scratch: the modern presets --------------------------------------------------------------------------


@pytest.mark.parametrize("preset,tokenizer,cls", [
    ("modernbert-tiny", "spm-bpe", "ModernBertForMaskedLM"),
    ("deberta-tiny", "spm-unigram", "DebertaV2ForMaskedLM"),
])
def test_scratch_preset_trains_with_alum_under_the_curriculum_and_exports(preset, tokenizer, cls, corpus, tmp_path):
    from alum_pretrain.export import export

    databin = prep(corpus, tmp_path / "bin", train_tokenizer=tokenizer, vocab_size=700)
    log = train(databin, tmp_path / "run", 3, f"--model.preset={preset}", "--data.nsp=false", "--data.mode=blocks")
    assert all(math.isfinite(r["loss"]) and r["adv"] > 0 for r in log)
    rates = [r["mask_rate"] for r in log]
    assert rates == sorted(rates) and rates[0] < rates[-1] <= 0.25  # the 5 % -> 25 % curriculum
    out = export(tmp_path / "run", tmp_path / "hf")
    model = T.AutoModelForMaskedLM.from_pretrained(str(out))
    assert type(model).__name__ == cls
    fill = T.pipeline("fill-mask", model=str(out), tokenizer=str(out))
    assert len(fill("Return the <mask> of the list.", top_k=2)) == 2


def test_modernbert_base_is_the_published_configuration():
    with torch.device("meta"):
        m = build_scratch_model("modernbert-base", vocab_size=50368, pad_token_id=50283, nsp=False)
    c = m.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.max_position_embeddings) == (22, 768, 12, 8192)
    assert m.model.layers[0].mlp.Wi.out_features == 2304  # GeGLU: two halves of 1,152
    assert c.layer_types == ["full_attention" if i % 3 == 0 else "sliding_attention" for i in range(22)]
    assert c.local_attention == 128 and not (c.attention_bias or c.mlp_bias or c.norm_bias)
    # parameters from the definition: embeddings, 22 layers (layer 0 has no attention norm), final norm, head
    H, F, L = 768, 1152, 22
    layer = H * 3 * H + H * H + H * 2 * F + F * H + 2 * H
    expected = 50368 * H + H + L * layer - H + H + (H * H + H) + 50368
    n = sum(p.numel() for p in m.parameters())
    assert n == expected and 149e6 < n < 150e6


def test_deberta_base_preset():
    with torch.device("meta"):
        m = build_scratch_model("deberta-base", vocab_size=128100, pad_token_id=0, nsp=False)
    c = m.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.position_buckets) == (12, 768, 3072, 256)
    assert c.relative_attention and not c.position_biased_input and c.pos_att_type == ["p2c", "c2p"]
    assert type(m).__name__ == "DebertaV2ForMaskedLM"
    n = sum(p.numel() for p in m.parameters())
    assert 184e6 < n < 185e6 and 85e6 < n - m.get_input_embeddings().weight.numel() < 87e6  # DeBERTa-v3-base
    assert set(scratch_presets()) >= {"tiny", "base", "modernbert-tiny", "modernbert-base", "deberta-tiny",
                                      "deberta-base"}


# -- what a family cannot do, and everything else ---------------------------------------------------------------


def test_config_time_errors_name_the_alternative(tmp_path):
    from alum_pretrain.config import config_from_dict
    from alum_pretrain.engine.config import TrainConfig

    with pytest.raises(ValueError, match=r"ModernBERT.*--data.nsp=false"):
        config_from_dict(TrainConfig, {"model": {"preset": "modernbert-tiny"}})
    with pytest.raises(ValueError, match=r"unknown size preset.*modernbert-base"):
        config_from_dict(TrainConfig, {"model": {"preset": "modernbert-huge"}})
    tiny("DistilBERT").save_pretrained(tmp_path / "distil")
    with pytest.raises(ValueError, match=r"DistilBERT model.*--data.nsp=false"):
        config_from_dict(TrainConfig, {"model": {"init_from": str(tmp_path / "distil")}})
    config_from_dict(TrainConfig, {"model": {"init_from": str(tmp_path / "distil")},
                                   "data": {"nsp": False, "mode": "blocks"}})
    with pytest.raises(ValueError, match="no next-sentence-prediction head"):
        build_scratch_model("deberta-tiny", 100, 0, nsp=True)

    from launch.spec import Resources, fairseq_train_argv

    cfg = config_from_dict(TrainConfig, {"model": {"preset": "modernbert-tiny"}, "data": {"nsp": False,
                                                                                        "mode": "blocks"}})
    with pytest.raises(ValueError, match=r"fairseq engine trains fairseq's RoBERTa.*native engine"):
        fairseq_train_argv(cfg, Resources(nodes=1, gpus_per_node=0))


def test_other_architectures_take_the_generic_path_and_remote_code_needs_the_flag(tmp_path, caplog):
    from alum_pretrain.config import config_from_dict
    from alum_pretrain.engine.config import TrainConfig

    torch.manual_seed(0)
    mpnet = T.MPNetForMaskedLM(T.MPNetConfig(vocab_size=V, pad_token_id=0, **_BERTISH))
    folder = tmp_path / "mpnet"
    mpnet.save_pretrained(folder)
    m = PretrainModel(load_continual_model(folder, nsp=False), perturb_at="embedding_output").eval()
    assert family_of(m.hf) is GENERIC and not m.fast
    ids, att, tt, mask = batch()
    with caplog.at_level(logging.WARNING, logger="alum_pretrain.models"), torch.no_grad():
        mlm, _ = m(ids, att, tt, mask)
    assert any("'mpnet'" in r.message and "full HF forward" in r.message for r in caplog.records)
    torch.testing.assert_close(mlm, mpnet.eval()(input_ids=ids, attention_mask=att).logits[mask], atol=1e-5, rtol=0)

    # a folder with its own modelling code (config.json auto_map): refused unless trusted
    remote = tmp_path / "remote"
    T.BertForMaskedLM(T.BertConfig(vocab_size=V, **_BERTISH)).save_pretrained(remote)  # the weights
    (remote / "tiny_custom.py").write_text(
        "from transformers import BertConfig, BertForMaskedLM\n"
        "class TinyCustomConfig(BertConfig):\n    model_type = 'tiny-custom'\n"
        "class TinyCustomForMaskedLM(BertForMaskedLM):\n    config_class = TinyCustomConfig\n", encoding="utf-8")
    import json

    cfg = {**json.loads((remote / "config.json").read_text()), "model_type": "tiny-custom",
           "architectures": ["TinyCustomForMaskedLM"],
           "auto_map": {"AutoConfig": "tiny_custom.TinyCustomConfig",
                        "AutoModelForMaskedLM": "tiny_custom.TinyCustomForMaskedLM"}}
    (remote / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(ValueError, match="--model.trust_remote_code=true"):
        load_continual_model(remote, nsp=False)
    with pytest.raises(ValueError, match="--model.trust_remote_code=true"):
        config_from_dict(TrainConfig, {"model": {"init_from": str(remote)}, "data": {"nsp": False, "mode": "blocks"}})
    hf = load_continual_model(remote, nsp=False, trust_remote_code=True)
    assert type(hf).__name__ == "TinyCustomForMaskedLM" and not PretrainModel(hf).fast


def test_docs_support_table_is_rendered_from_the_registry():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "families.md").read_text(encoding="utf-8")
    table = re.search(r"<!-- support-table:start -->\n(.*?)<!-- support-table:end -->", doc, re.S)
    assert table, "docs/families.md lost its support-table markers"
    assert table.group(1) == support_table(), "regenerate: python3 -m alum_pretrain.families > table"
