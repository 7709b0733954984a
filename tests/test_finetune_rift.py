"""RIFT: the frozen teacher receives no gradient, the update matches an independent reference of the
objective (class-conditional InfoNCE, TRADES KL, ASCC convex combination), ASCC weights live on the
listed candidates only, and WordNet substitution candidates respect the tokenizer's pieces."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from alum_pretrain.finetune.data import collate
from alum_pretrain.finetune.methods.rift import RIFT, RIFTConfig, infonce_given_y
from test_finetune_methods import LR, assert_same_params, make_ctx, tiny_batch, tiny_model


def rift_batch():
    batch = tiny_batch()
    batch["labels"] = torch.tensor([0, 1, 1])
    items = []
    for i in range(3):
        n = int(batch["attention_mask"][i].sum())
        ids = batch["input_ids"][i, :n].tolist()
        subs = [([1], [[41], [42]]), ([2, 3], [[43, 44]])] if i != 1 else [([4], [[45], [46], [47]])]
        items.append((ids, batch["token_type_ids"][i, :n].tolist(), int(batch["labels"][i]), subs))
    return collate(items, 0, False, num_candidates=4)


def test_collate_builds_candidate_tensors():
    b = rift_batch()
    assert b["sub_ids"].shape == (3, 9, 4) and b["sub_mask"].shape == (3, 9, 4)
    assert torch.equal(b["sub_ids"][..., 0], b["input_ids"])
    assert b["sub_mask"][0, 1].tolist() == [True, True, True, False]
    assert b["sub_ids"][0, 2, 1] == 43 and b["sub_ids"][0, 3, 1] == 44
    assert b["word_head"][0, 3] == 2 and b["word_head"][0, 2] == 2 and b["word_head"][0, 5] == 5
    assert b["sub_mask"][1, 4].tolist() == [True, True, True, True]


def ref_infonce(s, t, y, hs, ht, tau):
    """-(1/|C|) sum_c (1/n_c) sum_i log[ exp(<s_i,t_i>/tau) / sum_j exp(<s_j,t_i>/tau) ] within class c."""
    tot, classes = 0.0, sorted(set(y.tolist()))
    for c in classes:
        idx = [i for i in range(len(y)) if y[i] == c]
        sc = [F.normalize(hs[c](s[i]), dim=-1) for i in idx]
        tc = [F.normalize(ht[c](t[i]), dim=-1) for i in idx]
        acc = 0.0
        for i in range(len(idx)):
            num = torch.exp(sc[i] @ tc[i] / tau)
            den = sum(torch.exp(sc[j] @ tc[i] / tau) for j in range(len(idx)))
            acc = acc + torch.log(num / den)
        tot = tot - acc / len(idx)
    return tot / len(classes)


def test_infonce_matches_reference():
    torch.manual_seed(0)
    s, t = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 2, 1, 0, 1])
    hs = torch.nn.ModuleList(torch.nn.Linear(5, 4).double() for _ in range(3))
    ht = torch.nn.ModuleList(torch.nn.Linear(5, 4).double() for _ in range(3))
    got = infonce_given_y(s, t, y, hs, ht, 0.2)
    want = ref_infonce(s, t, y, hs, ht, 0.2)
    assert torch.allclose(got.double(), want, atol=1e-6)


def _rift_cfg(**kw):
    base = dict(weight_clean=1.0, weight_adv=0.5, weight_kl=2.0, weight_mi_adv=0.3, weight_mi_clean=0.2,
                temperature=0.5, proj_hidden=8, proj_dim=6, ascc_steps=2, ascc_lr=0.5, ascc_sparse_weight=3.0,
                max_candidates=4)
    base.update(kw)
    return RIFTConfig(**base)


def test_rift_frozen_teacher_gets_no_gradient_and_stays_fixed():
    model, batch = tiny_model(dropout=0.1), rift_batch()
    method = RIFT(_rift_cfg())
    method.setup(model)
    teacher_before = copy.deepcopy(method.teacher.state_dict())
    student_before = copy.deepcopy(model.state_dict())
    ctx = make_ctx(model)
    ctx.extra_params = [p for m in method.modules() for p in m.parameters()]
    ctx.optimizer.add_param_group({"params": ctx.extra_params})
    outputs_need_grad = []
    for p in method.teacher.parameters():
        assert not p.requires_grad
    method.teacher.register_forward_hook(lambda m, i, o: outputs_need_grad.append(o.logits.requires_grad))
    method.train_step(ctx, batch)
    assert outputs_need_grad == [False]  # one teacher forward, outside the autograd graph
    assert all(p.grad is None for p in method.teacher.parameters())
    for k, v in method.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    assert any(not torch.equal(v, student_before[k]) for k, v in model.state_dict().items())
    assert not method.teacher.training


def test_rift_update_matches_reference():
    model, batch = tiny_model(), rift_batch()
    cfg = _rift_cfg()
    method = RIFT(cfg)
    method.setup(model)
    ref_model = copy.deepcopy(model)
    heads = copy.deepcopy(method.heads).double()
    method.heads.double()
    ctx = make_ctx(model)
    ctx.extra_params = [p for m in method.modules() for p in m.parameters()]
    ctx.optimizer.add_param_group({"params": ctx.extra_params})
    method.train_step(ctx, batch)

    # --- reference, from the equations ---
    teacher = copy.deepcopy(ref_model)
    E = ref_model.bert.embeddings.word_embeddings.weight

    def feats(m, e):
        """logits and the official RIFT feature: the BERT pooler output tanh(W h_[CLS] + b)."""
        out = m(inputs_embeds=e, attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"],
                output_hidden_states=True)
        pool = m.bert.pooler.dense
        return out.logits, torch.tanh(out.hidden_states[-1][:, 0] @ pool.weight.T + pool.bias)

    def kl(p_logits, q_logits):
        lp, lq = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
        return (lp.exp() * (lp - lq)).sum(-1).mean()

    y = batch["labels"]
    clean, s_clean = feats(ref_model, F.embedding(batch["input_ids"], E))
    valid, head, cand = batch["sub_mask"], batch["word_head"], E.detach()[batch["sub_ids"]]
    b, t, s = valid.shape
    # official ASCC: w_hat ~ Kaiming-normal over (B, T, S, 1): N(0, gain^2 / fan_in), gain^2 = 2, fan_in = T*S
    w_hat = torch.empty((b, t, s)).normal_(0.0, (2.0 / (t * s)) ** 0.5, generator=ctx.generator(3))
    w_hat = w_hat.double().requires_grad_(True)
    adam = torch.optim.Adam([w_hat], lr=cfg.ascc_lr)

    def weights(wh):
        w = torch.softmax(wh.masked_fill(~valid, float("-inf")), -1)
        return torch.stack([w[i, head[i]] for i in range(b)])  # tie the pieces of a word

    ref_model.eval()  # the attack runs without dropout, and so does its clean target
    with torch.no_grad():
        target, _ = feats(ref_model, F.embedding(batch["input_ids"], E))
    for _ in range(cfg.ascc_steps):
        w = weights(w_hat)
        adv, _ = feats(ref_model, (w.unsqueeze(-1) * cand).sum(2))
        kl_sum = kl(target, adv) * b  # KLDivLoss(reduction="sum")
        ent_sum = -(w * torch.log(w.clamp_min(1e-12))).sum()
        obj = -kl_sum + cfg.ascc_sparse_weight * ent_sum
        adam.zero_grad()
        obj.backward(inputs=[w_hat])
        adam.step()
    ref_model.train()
    w = weights(w_hat.detach())
    assert torch.all(w[~valid] == 0)  # only listed candidates get weight
    adv, s_adv = feats(ref_model, (w.unsqueeze(-1) * E[batch["sub_ids"]]).sum(2))
    with torch.no_grad():
        _, t_clean = feats(teacher, F.embedding(batch["input_ids"], teacher.bert.embeddings.word_embeddings.weight))
    hs, ht = heads["student"], heads["teacher"]
    loss = (cfg.weight_clean * F.cross_entropy(clean, y) + cfg.weight_adv * F.cross_entropy(adv, y)
            + cfg.weight_kl * kl(clean, adv)
            + cfg.weight_mi_adv * ref_infonce(s_adv, t_clean, y, hs, ht, cfg.temperature)
            + cfg.weight_mi_clean * ref_infonce(s_clean, t_clean, y, hs, ht, cfg.temperature))
    params = list(ref_model.parameters()) + list(heads.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p -= LR * g
    assert_same_params(model, ref_model)
    for p1, p2 in zip(method.heads.parameters(), heads.parameters()):
        assert torch.allclose(p1, p2, atol=1e-6)


def test_rift_embedding_adversary_runs_and_rejects_regression():
    model, batch = tiny_model(), tiny_batch()
    method = RIFT(_rift_cfg(adversary="embedding", emb_adv_steps=2))
    method.setup(model)
    before = copy.deepcopy(model.state_dict())
    ctx = make_ctx(model)
    m = method.train_step(ctx, batch)
    assert torch.isfinite(m["loss"])
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="classification"):
        RIFT(_rift_cfg(), regression=True)


def test_substitution_candidates_follow_wordpieces(minilm_dir):
    from transformers import AutoTokenizer

    from alum_pretrain.finetune.data import Example, encode, substitution_candidates
    from alum_pretrain.finetune.synonyms import wordnet_available

    if not wordnet_available():
        pytest.skip("WordNet database not installed (apt-get install wordnet-base)")
    from alum_pretrain.finetune.synonyms import SynonymSource

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    syn = SynonymSource()
    ex = [Example("a terrible movie , truly awful", None, 0, 1), Example("the film", "a good picture", 1, 2)]
    enc = encode(tok, ex, 32)
    subs = substitution_candidates(tok, ex, enc, syn, 5)
    assert subs[0], "no candidates for 'terrible movie ... awful'"
    for i, per_ex in enumerate(subs):
        ids = enc.input_ids[i]
        for positions, cands in per_ex:
            assert 1 <= len(cands) <= 4
            word = tok.decode([ids[p] for p in positions]).replace(" ", "")
            allowed = {s for s in syn.synonyms(word)}
            for c in cands:
                assert len(c) == len(positions)
                assert tok.decode(c).replace(" ", "").replace("##", "") in allowed
    only_b = substitution_candidates(tok, ex, enc, syn, 5, fields="b")
    assert only_b[0] == [] and all(enc.batch_encoding.sequence_ids(1)[p[0]] == 1 for p, _ in only_b[1])
