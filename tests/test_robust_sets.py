"""Robust sets in their published formats (AdvGLUE dev.json, ANLI jsonl, GLUE layout) and label mapping by name.

The evaluation tests use tiny randomly initialised BERT classifiers whose label order differs from
GLUE's integer order (the project's MNLI order is contradiction, entailment, neutral).  The gold labels
of the files are written as the *meaning* of what the model predicts, so name-matched evaluation must
score exactly 1.0 while a positional match scores less - an independent check of the mapping.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from alum_pretrain.finetune.bench import evaluate_labelled_set
from alum_pretrain.finetune.robust_sets import (GLUE_INT_LABELS, label_meaning, map_labels, read_advglue, read_anli,
                                                read_glue_layout)

# The AdvGLUE field names and GLUE integer labels, written here from the benchmark's description.
ADV_FIELDS = {"sst2": ("sentence",), "qqp": ("question1", "question2"), "mnli": ("premise", "hypothesis"),
              "mnli-mm": ("premise", "hypothesis"), "qnli": ("question", "sentence"), "rte": ("sentence1", "sentence2")}
ADV_NCLASS = {"sst2": 2, "qqp": 2, "mnli": 3, "mnli-mm": 3, "qnli": 2, "rte": 2}
PREMISES = ["A man is playing a guitar on the stage.", "The cat sleeps on the warm windowsill.",
            "Two children are running through a field of flowers.", "The committee approved the new budget.",
            "She bought three apples at the market.", "The train to the city was delayed by an hour.",
            "A dog is catching a frisbee in the park.", "The museum opens at nine every morning."]
HYPOS = ["Someone is making music.", "An animal is resting.", "Kids are outdoors.", "The budget was rejected.",
         "She bought fruit.", "The train was on time.", "A pet is playing.", "The museum is closed on mornings."]


def advglue_file(path, n=4):
    data = {}
    for key, fields in ADV_FIELDS.items():
        items = []
        for i in range(n):
            it = {"idx": i, "label": i % ADV_NCLASS[key]}
            for j, f in enumerate(fields):
                it[f] = (PREMISES if j == 0 else HYPOS)[i]
            items.append(it)
        data[key] = items
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_advglue_reader_all_subsets(tmp_path):
    f = advglue_file(tmp_path / "dev.json")
    meanings = {"sst2": ["negative", "positive"], "qqp": ["not_duplicate", "duplicate"],
                "mnli": ["entailment", "neutral", "contradiction"], "qnli": ["entailment", "not_entailment"],
                "rte": ["entailment", "not_entailment"]}
    for key, fields in ADV_FIELDS.items():
        s = read_advglue(f, key)
        assert len(s.examples) == 4 and s.ids == ["0", "1", "2", "3"]
        assert s.examples[1].text_a == PREMISES[1]
        assert (s.examples[1].text_b == HYPOS[1]) if len(fields) == 2 else s.examples[1].text_b is None
        want = meanings["mnli" if key == "mnli-mm" else key]
        assert [e.label for e in s.examples] == [want[i % len(want)] for i in range(4)]


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("rte"), "no task 'rte' (the file has: sst2, qqp, mnli, mnli-mm, qnli)"),
    (lambda d: d["rte"][2].pop("sentence2"), "[rte][2] (idx 2): missing text field 'sentence2'"),
    (lambda d: d["rte"][1].update(label=2), "[rte][1] (idx 1): label 2 is not a GLUE integer label of rte"),
    (lambda d: d["rte"][0].update(label="entailment"), "label 'entailment' is not a GLUE integer label"),
    (lambda d: d.__setitem__("rte", {"a": 1}), "[rte]: expected a list of examples"),
])
def test_advglue_bad_input_names_the_item(tmp_path, mutate, message):
    f = advglue_file(tmp_path / "dev.json")
    d = json.loads(f.read_text())
    mutate(d)
    f.write_text(json.dumps(d))
    with pytest.raises(ValueError) as e:
        read_advglue(f, "rte")
    assert message in str(e.value) and str(f) in str(e.value)


def test_advglue_truncated_file(tmp_path):
    f = advglue_file(tmp_path / "dev.json")
    f.write_text(f.read_text()[:-40])
    with pytest.raises(ValueError, match="not valid JSON"):
        read_advglue(f, "sst2")


def anli_file(path, labels):
    with open(path, "w") as fh:
        for i, lab in enumerate(labels):
            fh.write(json.dumps({"uid": f"u{i}", "premise": PREMISES[i], "hypothesis": HYPOS[i], "label": lab,
                                 "reason": ""}) + "\n")
    return path


def test_anli_reader_and_errors(tmp_path):
    (tmp_path / "R2").mkdir()
    f = anli_file(tmp_path / "R2" / "dev.jsonl", ["e", "n", "c", "e"])
    s = read_anli(f)
    assert s.name == "anli-r2-dev" and s.task == "mnli"
    assert [e.label for e in s.examples] == ["entailment", "neutral", "contradiction", "entailment"]
    assert s.ids == ["u0", "u1", "u2", "u3"]
    official = tmp_path / "R2" / "test.jsonl"          # v1.0 release: the premise is called "context"
    official.write_text(f.read_text().replace('"premise"', '"context"'))
    assert [e.text_a for e in read_anli(official).examples] == PREMISES[:4]
    lines = f.read_text().splitlines()
    lines[2] = lines[2].replace('"label": "c"', '"label": "x"')
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"dev.jsonl:3: label 'x' is not one of e, n, c"):
        read_anli(f)
    lines[2] = "{not json"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"dev.jsonl:3: not valid JSON"):
        read_anli(f)


def test_glue_layout_reader(tmp_path):
    f = tmp_path / "dev.tsv"
    f.write_text("index\tsentence1\tsentence2\tlabel\n0\ta b\tc d\tentailment\n1\te f\tg h\tnot_entailment\n")
    s = read_glue_layout(f, "rte")
    assert s.labels == ("entailment", "not_entailment") and [e.label for e in s.examples] == ["entailment", "not_entailment"]


def test_label_meanings():
    assert label_meaning("1", "sst2") == "positive" and label_meaning("0", "qqp") == "not_duplicate"
    assert label_meaning("1", "wnli") == "entailment"          # WNLI's 1 means entailment
    assert label_meaning("Not-Entailment") == "not_entailment"
    assert label_meaning("LABEL_0", "mnli") is None and label_meaning("1") is None
    assert GLUE_INT_LABELS["mnli"] == ("entailment", "neutral", "contradiction")


def test_map_labels_by_name_not_position():
    project_mnli = ["contradiction", "entailment", "neutral"]       # the project's MNLI class order
    m = map_labels(("entailment", "neutral", "contradiction"), "mnli", project_mnli, "mnli")
    assert m == {"entailment": 1, "neutral": 2, "contradiction": 0}
    hub_style = ["NEGATIVE", "POSITIVE"]
    assert map_labels(("negative", "positive"), "sst2", hub_style) == {"negative": 0, "positive": 1}
    assert map_labels(("negative", "positive"), "sst2", ["0", "1"], "sst2") == {"negative": 0, "positive": 1}


def test_map_labels_mismatches_name_both_sets():
    with pytest.raises(ValueError) as e:   # an SST-2 classifier on an NLI set
        map_labels(("entailment", "neutral", "contradiction"), "mnli", ["0", "1"], "sst2")
    assert "['entailment', 'neutral', 'contradiction']" in str(e.value) and "['0', '1']" in str(e.value)
    with pytest.raises(ValueError, match="carry no meaning.*give label_map"):
        map_labels(("entailment", "not_entailment"), "rte", ["LABEL_0", "LABEL_1"])
    with pytest.raises(ValueError, match="have no counterpart"):     # 2-way set on a 3-way model
        map_labels(("entailment", "neutral"), "mnli", ["contradiction", "entailment", "neutral"], "mnli")
    with pytest.raises(ValueError, match="duplicate names"):
        map_labels(("entailment", "not_entailment"), "rte", ["entailment", "entailment"])


def test_label_map_placeholders_and_permuted_map_caught():
    m = map_labels(("entailment", "not_entailment"), "rte", ["LABEL_0", "LABEL_1"],
                   label_map={"entailment": "LABEL_1", "not_entailment": "LABEL_0"})
    assert m == {"entailment": 1, "not_entailment": 0}
    permuted = {"entailment": "neutral", "neutral": "contradiction", "contradiction": "entailment"}
    with pytest.raises(ValueError, match=r"maps 'entailment' \(entailment\) to model label 'neutral' \(neutral\)"):
        map_labels(("entailment", "neutral", "contradiction"), "mnli", ["contradiction", "entailment", "neutral"],
                   "mnli", label_map=permuted)
    with pytest.raises(ValueError, match="both map to model label"):
        map_labels(("entailment", "not_entailment"), "rte", ["LABEL_0", "LABEL_1"],
                   label_map={"entailment": "LABEL_0", "not_entailment": "LABEL_0"})


# ---- evaluation through the model's id2label ---------------------------------------------------------------

def tiny_classifier(path, labels, vocab_words, seed=0):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    vocab = path.parent / f"{path.name}-vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + vocab_words) + "\n")
    tok = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=len(labels),
                     id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    model = BertForSequenceClassification(cfg).eval()
    with torch.no_grad():    # spread the logits so that all classes get predicted
        model.classifier.weight.normal_(0, 3.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


def diverse_classifier(path, labels, pairs, min_classes=2):
    """A tiny classifier predicting at least ``min_classes`` classes on ``pairs``: the head's bias is set to
    centre its logits over these inputs (a random tiny BERT otherwise predicts one class for everything)."""
    for seed in range(20):
        model, tok = tiny_classifier(path, labels, _words(), seed=seed)
        a = [p[0] for p in pairs]
        b = [p[1] for p in pairs] if pairs[0][1] is not None else None
        enc = tok(a, b, truncation=True, max_length=32, padding=True, return_tensors="pt")
        with torch.no_grad():
            pooled = model.bert(**enc).pooler_output                     # (N, H)
            z = pooled @ model.classifier.weight.T                       # (N, C)
            model.classifier.bias.copy_(-z.mean(0))
        pred = _predict(model, tok, pairs)
        if len(set(pred)) >= min_classes:
            model.save_pretrained(path)
            return model, tok, pred
    raise AssertionError("no seed gives a tiny model predicting several classes")


def _words():
    return sorted({w.strip(".,").lower() for s in PREMISES + HYPOS for w in s.split()})


def _predict(model, tok, pairs):
    a = [p[0] for p in pairs]
    b = [p[1] for p in pairs] if pairs[0][1] is not None else None
    enc = tok(a, b, truncation=True, max_length=32, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits.argmax(-1).tolist()


def test_advglue_and_anli_evaluate_with_name_mapping(tmp_path):
    labels = ["contradiction", "entailment", "neutral"]                # project order, not GLUE's
    pairs = list(zip(PREMISES, HYPOS))
    model, tok, pred = diverse_classifier(tmp_path / "mnli-model", labels, pairs, 3)
    glue_int = {"entailment": 0, "neutral": 1, "contradiction": 2}     # AdvGLUE MNLI integers
    enc_anli = {"entailment": "e", "neutral": "n", "contradiction": "c"}
    adv = {"mnli": [{"idx": i, "premise": p, "hypothesis": h, "label": glue_int[labels[y]]}
                    for i, ((p, h), y) in enumerate(zip(pairs, pred))]}
    (tmp_path / "dev.json").write_text(json.dumps(adv))
    anli_file(tmp_path / "test.jsonl", [enc_anli[labels[y]] for y in pred])

    for lset in (read_advglue(tmp_path / "dev.json", "mnli"), read_anli(tmp_path / "test.jsonl")):
        rep = evaluate_labelled_set(tmp_path / "mnli-model", lset, model_task="mnli", workdir=tmp_path / "w",
                                    max_length=32, device="cpu")
        assert rep["examples"] == len(pairs)
        assert rep["accuracy"] == 1.0, lset.name
        assert rep["label_mapping"] == {"entailment": "entailment", "neutral": "neutral",
                                        "contradiction": "contradiction"}
    # what a positional match would have scored (GLUE integer i read as class id i): well below 1
    positional = np.mean([glue_int[labels[y]] == y for y in pred])
    assert positional < 1.0


def test_sst2_digit_labels_and_mismatch_at_evaluation(tmp_path):
    sents = PREMISES
    model, tok, pred = diverse_classifier(tmp_path / "sst2-model", ["0", "1"], [(s, None) for s in sents])
    (tmp_path / "dev.json").write_text(json.dumps({"sst2": [{"idx": i, "sentence": s, "label": y}
                                                            for i, (s, y) in enumerate(zip(sents, pred))]}))
    rep = evaluate_labelled_set(tmp_path / "sst2-model", read_advglue(tmp_path / "dev.json", "sst2"),
                                model_task="sst2", workdir=tmp_path / "w", max_length=32, device="cpu")
    assert rep["accuracy"] == 1.0 and rep["label_mapping"] == {"negative": "0", "positive": "1"}
    anli_file(tmp_path / "a.jsonl", ["e", "n", "c"])
    with pytest.raises(ValueError, match=r"model labels \['0', '1'\]"):
        evaluate_labelled_set(tmp_path / "sst2-model", read_anli(tmp_path / "a.jsonl"), model_task="sst2",
                              workdir=tmp_path / "w", device="cpu")


def test_permuted_id2label_in_model_is_followed_and_permuted_suite_map_caught(tmp_path):
    """Swapping the names in a model's id2label swaps which class is read as which (names are the truth);
    a permuted explicit map is refused."""
    pairs = list(zip(PREMISES, HYPOS))
    model, tok, pred = diverse_classifier(tmp_path / "m", ["entailment", "not_entailment"], pairs)
    rows = "\n".join(f"{i}\t{p}\t{h}\t{['entailment', 'not_entailment'][y]}" for i, ((p, h), y) in enumerate(zip(pairs, pred)))
    (tmp_path / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n" + rows + "\n")
    s = read_glue_layout(tmp_path / "dev.tsv", "rte")
    assert evaluate_labelled_set(tmp_path / "m", s, model_task="rte", workdir=tmp_path / "w", device="cpu",
                                 max_length=32)["accuracy"] == 1.0
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["id2label"] = {"0": "not_entailment", "1": "entailment"}
    cfg["label2id"] = {"not_entailment": 0, "entailment": 1}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    assert evaluate_labelled_set(tmp_path / "m", s, model_task="rte", workdir=tmp_path / "w", device="cpu",
                                 max_length=32)["accuracy"] == 0.0
    with pytest.raises(ValueError, match="a permuted map"):
        evaluate_labelled_set(tmp_path / "m", s, model_task="rte", workdir=tmp_path / "w", device="cpu",
                              label_map={"entailment": "not_entailment", "not_entailment": "entailment"})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_checkpoint_and_caller_autocast_evaluate_in_float32(tmp_path, dtype):
    """A checkpoint saved in 16 bits (foreign checkpoints often are) is evaluated in float32, and a caller's
    autocast region does not leak into the evaluation: the reference is the float32 forward of the
    (16-bit-rounded) weights.  This tiny model's logits are centred, so 16-bit arithmetic flips many of
    its predictions - the precision trap made visible."""
    from transformers import AutoModelForSequenceClassification

    labels = ["contradiction", "entailment", "neutral"]
    pairs = list(zip(PREMISES, HYPOS))
    model, tok, pred32 = diverse_classifier(tmp_path / "m32", labels, pairs, 3)   # float32 predictions
    model.to(dtype).save_pretrained(tmp_path / "m16")
    tok.save_pretrained(tmp_path / "m16")
    ref = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m16").float().eval()
    assert next(ref.parameters()).dtype == torch.float32
    pred = _predict(ref, tok, pairs)
    code = {"entailment": "e", "neutral": "n", "contradiction": "c"}
    anli_file(tmp_path / "a.jsonl", [code[labels[y]] for y in pred])
    for where in ("m16", "m32"):
        if where == "m32":   # same check for the float32 checkpoint under the caller's 16-bit autocast
            anli_file(tmp_path / "a.jsonl", [code[labels[y]] for y in pred32])
        with torch.autocast("cpu", dtype=dtype):
            rep = evaluate_labelled_set(tmp_path / where, read_anli(tmp_path / "a.jsonl"), model_task="mnli",
                                        workdir=tmp_path / "w", max_length=32, device="cpu")
        assert rep["accuracy"] == 1.0, where
