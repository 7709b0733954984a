"""alum-finetune mechanics on a tiny random BERT (fast): GLUE TSV layouts and JSONL, pairs, regression,
predictions, best checkpoint, resume == uninterrupted, clear errors, --help."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertTokenizerFast

from alum_pretrain.config import config_from_dict
from alum_pretrain.finetune.cli import main
from alum_pretrain.finetune.config import FinetuneConfig
from alum_pretrain.finetune.data import read_examples
from alum_pretrain.finetune.tasks import get_task
from alum_pretrain.finetune.trainer import finetune


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, bert_vocab):
    d = tmp_path_factory.mktemp("tiny_bert")
    tok = BertTokenizerFast(vocab_file=str(bert_vocab), do_lower_case=True)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    from transformers import BertModel
    BertModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sst_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sst")
    pos = ["a great and moving film", "wonderful acting , superb story", "truly delightful", "i loved it"]
    neg = ["a dull and boring mess", "terrible script , awful acting", "painfully bad", "i hated it"]
    rows = [f"{s}\t1" for s in pos] + [f"{s}\t0" for s in neg]
    train = write(d / "train.tsv", "sentence\tlabel\n" + "\n".join(rows * 3) + "\n")
    dev = write(d / "dev.tsv", "sentence\tlabel\n" + "\n".join(rows) + "\n")
    test = write(d / "test.tsv", "index\tsentence\n0\tsuperb film\n1\tawful mess\n")
    return train, dev, test


def cfg_for(tiny_dir, train, dev, out, **over):
    d = {"model": {"path": str(tiny_dir)},
         "data": {"task": "sst2", "train": str(train), "dev": str(dev), "max_length": 32},
         "optim": {"batch_size": 4, "epochs": 2, "lr": 1e-3, "warmup_ratio": 0.1},
         "run": {"out": str(out), "method": "plain", "progress": False, "seed": 3}}
    for k, v in over.items():
        sect, key = k.split(".")
        d.setdefault(sect, {})[key] = v
    return config_from_dict(FinetuneConfig, d)


def test_glue_layouts_and_jsonl(tmp_path):
    cola = write(tmp_path / "cola.tsv", "gj04\t1\t\tOur friends won't buy this analysis.\ngj04\t0\t*\tThey drank the pub.\n")
    ex = read_examples(cola, get_task("cola"))
    assert [(e.text_a, e.label, e.line) for e in ex] == [("Our friends won't buy this analysis.", 1, 1),
                                                          ("They drank the pub.", 0, 2)]
    mrpc = write(tmp_path / "mrpc.tsv", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tHe said \"hi\".\tHe greeted.\n")
    e = read_examples(mrpc, get_task("mrpc"))[0]
    assert (e.text_a, e.text_b, e.label) == ('He said "hi".', "He greeted.", 1)
    rte = write(tmp_path / "rte.tsv", "index\tsentence1\tsentence2\tlabel\n0\tA b.\tC d.\tnot_entailment\n")
    assert read_examples(rte, get_task("rte"))[0].label == 1
    sts = write(tmp_path / "sts.jsonl", '{"s1": "a", "s2": "b", "y": 3.5}\n\n{"s1": "c", "s2": "d", "y": 1}\n')
    spec = get_task("custom", text_a="s1", text_b="s2", label="y", regression=True)
    assert [(e.text_b, e.label) for e in read_examples(sts, spec)] == [("b", 3.5), ("d", 1.0)]


def test_bad_input_errors_name_file_and_line(tmp_path):
    bad = write(tmp_path / "bad.tsv", "sentence\tlabel\ngood\t1\nbad\tpositive\n")
    with pytest.raises(ValueError, match=r"bad\.tsv:3: label 'positive' is not one of"):
        read_examples(bad, get_task("sst2"))
    nohdr = write(tmp_path / "nohdr.tsv", "text\tlabel\nx\t1\n")
    with pytest.raises(ValueError, match=r"nohdr\.tsv:1: header .* no column 'sentence'"):
        read_examples(nohdr, get_task("sst2"))
    js = write(tmp_path / "x.jsonl", '{"text": "a", "label": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"x\.jsonl:2: not valid JSON"):
        read_examples(js, get_task("custom", text_a="text", label="label", labels=("0", "1")))
    with pytest.raises(ValueError, match="not found"):
        read_examples(tmp_path / "missing.tsv", get_task("sst2"))


def test_finetune_writes_best_predictions_and_results(tiny_dir, sst_files, tmp_path):
    train, dev, test = sst_files
    res = finetune(cfg_for(tiny_dir, train, dev, tmp_path / "run", **{"data.test": str(test),
                                                                      "run.predictions_format": "jsonl"}))
    out = tmp_path / "run"
    assert (out / "best" / "config.json").is_file() and (out / "checkpoint.pt").is_file()
    assert len(res["history"]) == 2 and res["optimizer_steps"] == 2 * 6
    saved = json.loads((out / "results.json").read_text())
    assert saved["best"]["score"] == max(h["dev"]["accuracy"] for h in saved["history"])
    preds = [json.loads(line) for line in (out / "predictions_dev.jsonl").read_text().splitlines()]
    assert len(preds) == 8 and all(p["prediction"] in ("0", "1") and len(p["probs"]) == 2 for p in preds)
    test_preds = (out / "predictions_test.jsonl").read_text().splitlines()
    assert len(test_preds) == 2 and json.loads(test_preds[0])["label"] is None


def _params(path):
    from safetensors.torch import load_file
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("method", ["plain", "freelb"])
def test_resume_equals_uninterrupted(tiny_dir, sst_files, tmp_path, method):
    train, dev, _ = sst_files
    over = {"run.method": method, "model.hidden_dropout": 0.1}
    full = finetune(cfg_for(tiny_dir, train, dev, tmp_path / "full", **over))
    # an "interrupted" run: 1 epoch, then the same command with 2 epochs resumes from checkpoint.pt
    first = finetune(cfg_for(tiny_dir, train, dev, tmp_path / "part", **over, **{"run.stop_after_epochs": 1}))
    assert not first["finished"] and len(first["history"]) == 1
    resumed = finetune(cfg_for(tiny_dir, train, dev, tmp_path / "part", **over))
    assert [h["epoch"] for h in resumed["history"]] == [0, 1]
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=False)["model"]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert full["history"][1]["dev"] == resumed["history"][1]["dev"]


def test_resume_refuses_other_method(tiny_dir, sst_files, tmp_path):
    train, dev, _ = sst_files
    finetune(cfg_for(tiny_dir, train, dev, tmp_path / "r", **{"optim.epochs": 1}))
    with pytest.raises(ValueError, match="method='plain'"):
        finetune(cfg_for(tiny_dir, train, dev, tmp_path / "r", **{"run.method": "freelb"}))


def test_resume_refuses_a_changed_lr_or_training_file_and_records_what_was_used(tiny_dir, sst_files, tmp_path):
    train, dev, _ = sst_files
    out = tmp_path / "r"
    finetune(cfg_for(tiny_dir, train, dev, out, **{"run.stop_after_epochs": 1}))
    before = (out / "results.json").read_bytes()
    with pytest.raises(ValueError, match=r"--optim.lr was 0.001, now 0.0005"):
        finetune(cfg_for(tiny_dir, train, dev, out, **{"optim.lr": 5e-4}))
    other = tmp_path / "other_train.tsv"
    other.write_text(Path(train).read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(ValueError, match=r"--data.train was"):
        finetune(cfg_for(tiny_dir, other, dev, out))
    assert (out / "results.json").read_bytes() == before  # nothing recorded for the refused runs
    res = finetune(cfg_for(tiny_dir, train, dev, out, **{"run.log_every": 3}))  # bookkeeping may change
    assert [h["epoch"] for h in res["history"]] == [0, 1]
    assert json.loads((out / "results.json").read_text())["config"]["optim"]["lr"] == 1e-3


def test_resume_refuses_a_training_file_changed_under_the_same_path(tiny_dir, sst_files, tmp_path):
    from alum_pretrain.integrity import sha256_file

    train0, dev, _ = sst_files
    train = tmp_path / "train.tsv"  # the same path throughout; its content changes
    train.write_bytes(Path(train0).read_bytes())
    out = tmp_path / "r"
    first = finetune(cfg_for(tiny_dir, train, dev, out, **{"run.stop_after_epochs": 1}))
    was = "sha256:" + sha256_file(train)
    assert first["data_fingerprints"]["data.train"] == was
    assert first["data_fingerprints"]["data.dev"] == "sha256:" + sha256_file(dev)
    before = (out / "results.json").read_bytes()
    lines = train.read_text(encoding="utf-8").splitlines()
    train.write_text("\n".join([lines[0], *lines[1:][::-1]]) + "\n", encoding="utf-8")  # same rows, other order
    now = "sha256:" + sha256_file(train)
    with pytest.raises(ValueError) as exc:
        finetune(cfg_for(tiny_dir, train, dev, out))
    msg = str(exc.value)
    assert "--data.train has changed" in msg and was in msg and now in msg and "restore the original" in msg, msg
    assert (out / "results.json").read_bytes() == before
    assert main([f"--model={tiny_dir}", "--task=sst2", f"--train={train}", f"--dev={dev}", f"--out={out}",
                 "--optim.batch_size=4", "--optim.epochs=2", "--optim.lr=1e-3", "--optim.warmup_ratio=0.1",
                 "--data.max_length=32", "--run.progress=false", "--run.seed=3"]) == 2
    train.write_bytes(Path(train0).read_bytes())  # restored: the resume goes on
    res = finetune(cfg_for(tiny_dir, train, dev, out))
    assert [h["epoch"] for h in res["history"]] == [0, 1] and res["data_fingerprints"]["data.train"] == was


def test_pairs_and_regression_with_smart(tiny_dir, tmp_path):
    rows = [{"s1": f"a man plays {w}", "s2": f"someone plays {w}", "score": float(i % 5)}
            for i, w in enumerate(["guitar", "piano", "drums", "flute", "violin", "cello"])]
    data = write(tmp_path / "sts.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = cfg_for(tiny_dir, data, data, tmp_path / "sts", **{
        "data.task": "custom", "data.text_a_field": "s1", "data.text_b_field": "s2", "data.label_field": "score",
        "data.regression": True, "run.method": "smart", "optim.epochs": 1})
    res = finetune(cfg)
    assert res["metric"] == "pearson" and "spearman" in res["history"][0]["dev"]
    lines = (tmp_path / "sts" / "predictions_dev.tsv").read_text().splitlines()
    assert lines[0] == "line\tprediction\tlabel" and len(lines) == 7
    float(lines[1].split("\t")[1])


def test_cli_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model.path", "--data.task", "--optim.lr", "--run.method", "--smart.alpha", "--freelb.adv_lr",
                 "--freelb.reuse_dropout_masks", "--pgd.adv_steps", "--freeat.adv_steps", "--rift.weight_mi_adv",
                 "--rift.adversary", "--model", "--method", "--train", "--dev", "--out"):
        assert flag in text, flag


def test_cli_errors(tiny_dir, sst_files, tmp_path, capsys):
    train, dev, _ = sst_files
    assert main(["--model", str(tiny_dir), "--train", str(train), "--dev", str(dev)]) == 2
    assert "--out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--method", "nope"])
    assert main(["--model", str(tmp_path), "--train", str(train), "--dev", str(dev), "--out", str(tmp_path / "o"),
                 "--run.progress=false"]) == 2
    assert "no config.json" in capsys.readouterr().err


@pytest.mark.multirank
def test_torchrun_two_processes_gloo(tiny_dir, sst_files, tmp_path):
    import os
    import subprocess
    import sys

    train, dev, _ = sst_files
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, json, torch, torch.distributed as dist\n"
        "from alum_pretrain.config import config_from_dict\n"
        "from alum_pretrain.finetune.config import FinetuneConfig\n"
        "from alum_pretrain.finetune import trainer\n"
        "models = []\n"
        "orig = trainer.load_model\n"
        "def spy(*a, **k):\n"
        "    m = orig(*a, **k); models.append(m); return m\n"
        "trainer.load_model = spy\n"
        "trainer.finetune(config_from_dict(FinetuneConfig, json.loads(sys.argv[1])))\n"
        "torch.save(models[0].state_dict(), sys.argv[2] + f'/rank{dist.get_rank()}.pt')\n")
    cfg = {"model": {"path": str(tiny_dir)}, "data": {"task": "sst2", "train": str(train), "dev": str(dev),
                                                       "max_length": 32},
           "optim": {"batch_size": 2, "epochs": 1, "lr": 1e-3}, "run": {"out": str(tmp_path / "o"),
                                                                       "method": "freelb", "progress": False}}
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29571",
                        str(script), json.dumps(cfg), str(tmp_path)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["optimizer_steps"] == 6  # 24 examples / 2 ranks / batch 2
