"""PretrainModel against the plain HF forward: masked-only logits, perturbation points, continual MiniLM."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForPreTraining,
    RobertaConfig,
    RobertaForMaskedLM,
    RoFormerConfig,
    RoFormerForMaskedLM,
    XLMRobertaConfig,
    XLMRobertaForMaskedLM,
)

from alum_pretrain.models import (
    PRESETS,
    PretrainModel,
    build_scratch_model,
    load_continual_model,
    load_model,
    save_model,
)

V = 97
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=V,
            max_position_embeddings=40)


def _batch(pad_id: int = 0, two_segments: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, T = 3, 13
    ids = torch.randint(5, V, (B, T), generator=g)
    att = torch.ones(B, T, dtype=torch.long)
    att[1, 8:] = 0
    att[2, 11:] = 0
    ids[att == 0] = pad_id
    tt = torch.zeros(B, T, dtype=torch.long)
    if two_segments:
        tt[:, 6:] = 1
        tt[att == 0] = 0
    mask = (torch.rand(B, T, generator=g) < 0.3) & att.bool()
    mask[0, 1] = True
    return ids, att, tt, mask


def _models():
    torch.manual_seed(0)
    return [
        pytest.param("bert-pretraining", BertForPreTraining(BertConfig(**TINY)), True, 0, True, id="bert-pretraining"),
        pytest.param("bert-mlm", BertForMaskedLM(BertConfig(**TINY)), False, 0, True, id="bert-mlm"),
        pytest.param("roberta", RobertaForMaskedLM(RobertaConfig(**TINY, pad_token_id=1, type_vocab_size=1)), False,
                     1, False, id="roberta"),
        pytest.param("xlm-r", XLMRobertaForMaskedLM(XLMRobertaConfig(**TINY, pad_token_id=1, type_vocab_size=1)),
                     False, 1, False, id="xlm-roberta"),
    ]


def _full_logits(hf, ids, att, tt):
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=att, token_type_ids=tt)
    logits = out.prediction_logits if hasattr(out, "prediction_logits") else out.logits
    return logits, getattr(out, "seq_relationship_logits", None)


@pytest.mark.parametrize("name,hf,nsp,pad,two_seg", _models())
@pytest.mark.parametrize("perturb_at", ["word", "embedding_output"])
def test_masked_only_logits_equal_full_hf_logits(name, hf, nsp, pad, two_seg, perturb_at):
    hf.eval()
    ids, att, tt, mask = _batch(pad, two_seg)
    full, full_nsp = _full_logits(hf, ids, att, tt)
    m = PretrainModel(hf, perturb_at=perturb_at).eval()
    assert m.fast
    with torch.no_grad():
        mlm, nsp_logits = m(ids, att, tt, mask, nsp)
        # flat LongTensor positions give the same rows in the same (row-major) order
        mlm2, _ = m(ids, att, tt, mask.view(-1).nonzero().squeeze(1), False)
    assert mlm.shape == (int(mask.sum()), V)
    torch.testing.assert_close(mlm, full[mask], atol=1e-5, rtol=0)
    assert torch.equal(mlm, mlm2)
    if nsp:
        torch.testing.assert_close(nsp_logits, full_nsp, atol=1e-5, rtol=0)
    else:
        assert nsp_logits is None


def test_lm_head_sees_only_masked_rows():
    hf = BertForMaskedLM(BertConfig(**TINY)).eval()
    m = PretrainModel(hf)
    ids, att, tt, mask = _batch()
    rows = []
    hook = hf.cls.predictions.decoder.register_forward_hook(lambda mod, i, o: rows.append(i[0].shape[0]))
    with torch.no_grad():
        m(ids, att, tt, mask, False)
    hook.remove()
    assert rows == [int(mask.sum())]


def test_zero_perturbation_at_word_gives_the_hf_output_and_gradients_reach_delta():
    torch.manual_seed(1)
    hf = BertForPreTraining(BertConfig(**TINY)).eval()
    m = PretrainModel(hf, perturb_at="word")
    ids, att, tt, mask = _batch()
    all_pos = att.bool()
    full, full_nsp = _full_logits(hf, ids, att, tt)
    e = m.embed(ids, tt)  # (B, T, H) word-embedding lookup only
    assert torch.equal(e, hf.bert.embeddings.word_embeddings(ids))
    delta = torch.zeros_like(e, requires_grad=True)
    mlm, nsp = m.heads_from_embeds(e + delta, att, tt, all_pos, True)
    torch.testing.assert_close(mlm, full[all_pos], atol=1e-6, rtol=0)
    torch.testing.assert_close(nsp, full_nsp, atol=1e-6, rtol=0)
    # the perturbation is upstream of position/segment embeddings and LayerNorm: it changes the output
    (g,) = torch.autograd.grad(mlm.logsumexp(-1).sum() + nsp.sum(), delta)
    assert g.abs().sum() > 0 and g[~att.bool()].abs().max() == 0  # padding is masked out of attention
    with torch.no_grad():
        moved, _ = m.heads_from_embeds(e + 1e-2 * g.sign(), att, tt, all_pos, False)
    assert (moved - mlm).abs().max() > 1e-6


def test_embedding_output_point_is_after_layernorm():
    hf = BertForMaskedLM(BertConfig(**TINY)).eval()
    m = PretrainModel(hf, perturb_at="embedding_output")
    ids, att, tt, mask = _batch()
    e = m.embed(ids, tt)
    with torch.no_grad():
        ref = hf.bert.embeddings(input_ids=ids, token_type_ids=tt)
    assert torch.equal(e, ref)
    # a perturbation added here reaches the encoder unchanged (no LayerNorm re-normalises it away):
    shift = torch.zeros_like(e)
    shift[..., 0] = 3.0
    with torch.no_grad():
        a, _ = m.heads_from_embeds(e + shift, att, tt, mask, False)
        hidden = hf.bert.encoder(e + shift, attention_mask=hf.bert._create_attention_masks(
            att, None, e, None, None)[0]).last_hidden_state
        b = hf.cls(hidden)[mask]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_roberta_single_segment_ignores_token_types():
    hf = RobertaForMaskedLM(RobertaConfig(**TINY, pad_token_id=1, type_vocab_size=1)).eval()
    m = PretrainModel(hf)
    ids, att, tt, mask = _batch(pad_id=1, two_segments=True)  # pairs-mode segment ids on a 1-type model
    full, _ = _full_logits(hf, ids, att, torch.zeros_like(tt))
    with torch.no_grad():
        mlm, _ = m(ids, att, tt, mask, False)
    torch.testing.assert_close(mlm, full[mask], atol=1e-5, rtol=0)


def test_unknown_architecture_falls_back_to_full_forward(caplog):
    # RoFormer is outside alum_pretrain.families.FAMILIES (every family there has a fast path: test_families.py)
    hf = RoFormerForMaskedLM(RoFormerConfig(hidden_size=32, embedding_size=32, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=64, vocab_size=V)).eval()
    m = PretrainModel(hf)
    assert not m.fast
    ids, att, tt, mask = _batch()
    with torch.no_grad():
        full = hf(input_ids=ids, attention_mask=att, token_type_ids=tt).logits
    with caplog.at_level(logging.WARNING, logger="alum_pretrain.models"), torch.no_grad():
        mlm, _ = m(ids, att, tt, mask, False)
        m(ids, att, tt, mask, False)
    torch.testing.assert_close(mlm, full[mask], atol=1e-5, rtol=0)
    assert sum("full HF forward" in r.message and "roformer" in r.message for r in caplog.records) == 1  # warned once


def test_nsp_on_a_model_without_the_head_is_an_error():
    m = PretrainModel(BertForMaskedLM(BertConfig(**TINY)))
    ids, att, tt, mask = _batch()
    with pytest.raises(ValueError, match="no NSP head"):
        m(ids, att, tt, mask, True)
    with pytest.raises(ValueError, match="perturb_at"):
        PretrainModel(BertForMaskedLM(BertConfig(**TINY)), perturb_at="logits")


def _expected_bert_params(L, H, F, vocab, pos=512, types=2, nsp=True):
    """Parameter count of BERT from its definition (Devlin et al. 2019): embeddings, L layers, heads."""
    emb = vocab * H + pos * H + types * H + 2 * H
    layer = 4 * (H * H + H) + 2 * H + (H * F + F) + (F * H + H) + 2 * H
    mlm_head = H * H + H + 2 * H + vocab  # transform dense + LN + output bias (decoder tied to embeddings)
    pooler_nsp = (H * H + H) + (2 * H + 2) if nsp else 0
    return emb + L * layer + mlm_head + pooler_nsp


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_build_the_documented_sizes(preset):
    sizes = {"tiny": (2, 128, 2, 512), "mini": (4, 256, 4, 1024), "small": (4, 512, 8, 2048),
             "base": (12, 768, 12, 3072), "large": (24, 1024, 16, 4096)}[preset]
    with torch.device("meta"):  # sizes only: no memory, no init cost
        model = build_scratch_model(preset, vocab_size=30522, pad_token_id=0, nsp=True)
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == sizes
    assert c.vocab_size == 30522 and c.max_position_embeddings == 512 and c.pad_token_id == 0
    assert type(model).__name__ == "BertForPreTraining"
    L, H, _, F = sizes
    assert sum(p.numel() for p in model.parameters()) == _expected_bert_params(L, H, F, 30522)


def test_scratch_model_vocab_padding_and_mlm_only():
    m = build_scratch_model("tiny", vocab_size=30522, pad_token_id=0, nsp=False, pad_vocab_to_multiple_of=8)
    assert type(m).__name__ == "BertForMaskedLM" and m.config.vocab_size == 30528
    assert m.cls.predictions.decoder.weight.data_ptr() == m.bert.embeddings.word_embeddings.weight.data_ptr()
    with pytest.raises(ValueError, match="preset"):
        build_scratch_model("huge", vocab_size=100, pad_token_id=0)


def test_save_and_load_round_trip(tmp_path):
    hf = BertForPreTraining(BertConfig(**TINY)).eval()
    save_model(PretrainModel(hf), tmp_path / "model")
    assert (tmp_path / "model" / "model.safetensors").exists() and (tmp_path / "model" / "config.json").exists()
    back = load_model(tmp_path / "model")
    assert type(back.hf).__name__ == "BertForPreTraining"
    for (k, a), (k2, b) in zip(sorted(hf.state_dict().items()), sorted(back.hf.state_dict().items())):
        assert k == k2 and torch.equal(a, b), k
    assert not list(tmp_path.glob(".*tmp"))  # no temp folder left behind


def test_minilm_gets_a_fresh_tied_mlm_head(minilm_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="alum_pretrain.models"):
        hf = load_continual_model(minilm_dir, nsp=False)
    assert type(hf).__name__ == "BertForMaskedLM"
    dec = hf.cls.predictions.decoder
    assert dec.weight.data_ptr() == hf.bert.embeddings.word_embeddings.weight.data_ptr()  # tied
    assert hf.config.tie_word_embeddings
    log_line = " ".join(r.message for r in caplog.records)
    assert "freshly initialised" in log_line and "cls.predictions.transform.dense.weight" in log_line
    # the encoder weights are MiniLM's: same hidden states as the plain BertModel checkpoint
    from transformers import AutoModel, AutoTokenizer

    base = AutoModel.from_pretrained(str(minilm_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    enc = tok(["adversarial training of language models"], return_tensors="pt")
    with torch.no_grad():
        a = base(**enc).last_hidden_state
        b = hf.eval().bert(**enc).last_hidden_state
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="no next-sentence-prediction head"):
        load_continual_model(minilm_dir, nsp=True)


def test_continual_model_vocab_must_match_the_databin(minilm_dir, tmp_path):
    from databin_factory import make_databin
    from transformers import BertTokenizerFast

    from alum_pretrain.data import DataBin

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "."]
    small = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    db = DataBin(make_databin(tmp_path / "db", [{"train": [["the cat sat .", "on the mat ."]] * 2}], None,
                              tokenizer=small))
    with pytest.raises(ValueError, match="differs from the data-bin"):
        load_continual_model(minilm_dir, nsp=False, databin=db)
    same = DataBin(make_databin(tmp_path / "db2", [{"train": [["the cat sat ."], ["on the mat ."]]}],
                                minilm_dir / "vocab.txt"))
    assert type(load_continual_model(minilm_dir, nsp=False, databin=same)).__name__ == "BertForMaskedLM"
