"""The PWWS-style attack only substitutes listed synonyms, respects the change fraction and the query
budget; the embedding-space max-loss-increase is a real maximisation inside the ball; the
alum-eval-robust CLI writes its table and JSON."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from alum_pretrain.finetune.attack import pwws_attack

POS = {"good": 2.0, "great": 2.0, "fun": 1.0}
NEG = {"bad": 2.0, "dull": 1.5}


class FakeSynonyms:
    table = {"good": ("beneficial", "great", "estimable"), "great": ("big", "large"), "fun": ("merriment",),
             "film": ("movie", "picture"), "bad": ("big",), "plot": ("patch",)}

    def synonyms(self, word):
        return self.table.get(word.lower(), ())


class Counter:
    def __init__(self):
        self.calls = 0

    def __call__(self, pairs):
        self.calls += len(pairs)
        out = []
        for a, b in pairs:
            words = re.findall(r"[A-Za-z]+", (a + " " + (b or "")).lower())
            s = sum(POS.get(w, 0) for w in words) - sum(NEG.get(w, 0) for w in words)
            p = 1 / (1 + np.exp(-s))
            out.append([1 - p, p])
        return np.array(out)


def check_only_listed(res, syn):
    orig = res.original[0]
    for f, s, e, old, new in res.substitutions:
        assert orig[s:e] == old
        assert new.lower() in syn.synonyms(old)
    # outside the substituted spans nothing changed (punctuation and spacing kept)
    rebuilt, pos = [], 0
    for f, s, e, old, new in res.substitutions:
        rebuilt += [orig[pos:s], new]
        pos = e
    rebuilt.append(orig[pos:])
    assert "".join(rebuilt) == res.adversarial[0]


def test_attack_flips_with_synonyms_only():
    syn, fn = FakeSynonyms(), Counter()
    text = "A good film, with a fun plot!"
    res = pwws_attack(fn, (text, None), 1, syn, unk_token="[UNK]", max_change_fraction=1.0, query_budget=100)
    assert res.success and res.adv_pred == 0 and not res.skipped
    check_only_listed(res, syn)
    assert res.adversarial[0].endswith("plot!") or "patch!" in res.adversarial[0]
    assert res.queries == fn.calls and res.changed == len(res.substitutions) >= 1


def test_attack_respects_max_change_fraction():
    syn, fn = FakeSynonyms(), Counter()
    text = "good great fun film and story here ok yes"     # 9 words; 3 positive words hold the prediction
    for frac, cap in [(0.12, 1), (0.25, 2), (1.0, 9)]:
        res = pwws_attack(fn, (text, None), 1, syn, unk_token="[UNK]", max_change_fraction=frac, query_budget=1000)
        assert res.changed <= cap and res.changed <= int(frac * res.words)
        check_only_listed(res, syn)
    few = pwws_attack(fn, ("good movie", None), 1, syn, unk_token="[UNK]", max_change_fraction=0.2)
    assert few.changed == 0 and not few.success  # floor(0.2 * 2) = 0 words may change


@pytest.mark.parametrize("budget", [1, 3, 6, 12])
def test_attack_respects_query_budget(budget):
    syn, fn = FakeSynonyms(), Counter()
    res = pwws_attack(fn, ("a good film with a fun plot", None), 1, syn, unk_token="[UNK]",
                      max_change_fraction=1.0, query_budget=budget)
    assert fn.calls == res.queries <= budget
    check_only_listed(res, syn)


def test_attack_skips_misclassified_and_pairs_field_b():
    syn, fn = FakeSynonyms(), Counter()
    res = pwws_attack(fn, ("a bad film", None), 1, syn, unk_token="[UNK]")
    assert res.skipped and not res.success and res.queries == 1
    res = pwws_attack(fn, ("good good", "a good film"), 1, syn, unk_token="[UNK]", fields="b",
                      max_change_fraction=1.0)
    assert res.adversarial[0] == "good good" and all(f == 1 for f, *_ in res.substitutions)


def test_attack_with_wordnet_substitutes_wordnet_synonyms():
    from alum_pretrain.finetune.synonyms import SynonymSource, wordnet_available

    if not wordnet_available():
        pytest.skip("WordNet database not installed (apt-get install wordnet-base)")
    syn, fn = SynonymSource(), Counter()
    res = pwws_attack(fn, ("A good film with a fun story.", None), 1, syn, unk_token="[UNK]",
                      max_change_fraction=0.5, query_budget=500)
    assert res.changed >= 1
    for f, s, e, old, new in res.substitutions:
        assert new.lower() in syn.synonyms(old)


def test_max_loss_increase_is_a_bounded_maximisation(tmp_path, bert_vocab):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from alum_pretrain.finetune.data import Example, encode
    from alum_pretrain.finetune.robust import Classifier, EmbeddingAttackConfig, max_loss_increase

    tok = BertTokenizerFast(vocab_file=str(bert_vocab))
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    clf = Classifier(str(tmp_path), device="cpu", batch_size=4)
    ex = [Example("a good film", None, 1, 1), Example("a rather dull one", None, 0, 2), Example("fine", None, 1, 3)]
    enc = encode(clf.tokenizer, ex, 32)
    small = max_loss_increase(clf, enc, EmbeddingAttackConfig(epsilon=0.05, steps=5, step_size=0.02))
    large = max_loss_increase(clf, enc, EmbeddingAttackConfig(epsilon=2.0, steps=20, step_size=0.3))
    assert small.shape == (3,) and np.all(small >= 0) and np.all(large >= small - 1e-6)
    assert np.all(large > 0)
    # an independent check: no random point inside the eps ball beats PGD by much
    emb = clf.model.get_input_embeddings()
    ids = torch.tensor(enc.input_ids[0]).unsqueeze(0)
    with torch.no_grad():
        e = emb(ids)
        clean = torch.nn.functional.cross_entropy(clf.model(inputs_embeds=e).logits, torch.tensor([1]))
        best_rand = 0.0
        for _ in range(50):
            d = torch.randn_like(e)
            d = d / d.norm() * 2.0
            l = torch.nn.functional.cross_entropy(clf.model(inputs_embeds=e + d).logits, torch.tensor([1]))
            best_rand = max(best_rand, float(l - clean))
    assert large[0] >= best_rand - 1e-4
    assert all(p.requires_grad for p in clf.model.parameters())  # restored after the attack


def test_eval_robust_cli(tmp_path, bert_vocab, capsys):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from alum_pretrain.finetune.robust import main

    tok = BertTokenizerFast(vocab_file=str(bert_vocab))
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    data = tmp_path / "dev.tsv"
    data.write_text("sentence\tlabel\na good and fun film\t1\na bad and dull film\t0\nan excellent story\t1\n")
    argv = ["--model", str(tmp_path / "m"), "--task", "sst2", "--data", str(data), "--out", str(tmp_path / "r.json"),
            "--embedding.steps=3", "--run.progress=false"]
    from alum_pretrain.finetune.synonyms import wordnet_available
    if not wordnet_available():
        argv.append("--attack.enabled=false")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| clean acc | attacked acc |" in out
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["examples"] == 3 and 0 <= rep["clean_accuracy"] <= 1
    if "attack" in rep:
        assert rep["attack"]["attacked_accuracy"] <= rep["attack"]["clean_accuracy"]
    assert main(["--model", str(tmp_path / "nope"), "--data", str(data)]) == 2
