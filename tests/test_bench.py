"""alum-bench end to end on CPU: 2 tiny randomly initialised BERTs x (SST-2 + RTE subsets) x 2 seeds, with
AdvGLUE-schema robust sets; the table and results.json are checked against values recomputed here
(medians, ranges, per-seed paired differences, robust accuracies from the saved models), then re-running
reuses every run, a corrupt results.json is recovered without retraining, and a changed suite is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from alum_pretrain.finetune import bench as B
from conftest import shared_file

SEEDS = [1, 2]


def tiny_bert(path, vocab_file, seed):
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    tok = BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertForMaskedLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    vocab = shared_file("vocab/bert-base-uncased-vocab.txt")
    sst_tr, sst_dev = shared_file("glue/SST-2/train.tsv"), shared_file("glue/SST-2/dev.tsv")
    rte_tr, rte_dev = shared_file("glue/RTE/train.tsv"), shared_file("glue/RTE/dev.tsv")
    d = tmp_path_factory.mktemp("bench")
    data = d / "data"
    data.mkdir()

    def head(src, dst, n):
        lines = src.read_text(encoding="utf-8").splitlines()
        dst.write_text("\n".join(lines[:n + 1]) + "\n", encoding="utf-8")
        return lines[1:n + 1]

    head(sst_tr, data / "sst2-train.tsv", 48)
    sst_rows = head(sst_dev, data / "sst2-dev.tsv", 24)
    head(rte_tr, data / "rte-train.tsv", 32)
    rte_rows = head(rte_dev, data / "rte-dev.tsv", 16)
    # AdvGLUE dev.json schema: GLUE field names and GLUE integer labels (RTE: 0 entailment, 1 not_entailment)
    adv = {"sst2": [{"idx": i, "sentence": r.split("\t")[0], "label": int(r.split("\t")[1])}
                    for i, r in enumerate(sst_rows[:10])],
           "rte": [{"idx": i, "sentence1": r.split("\t")[1], "sentence2": r.split("\t")[2],
                    "label": {"entailment": 0, "not_entailment": 1}[r.split("\t")[3]]} for i, r in enumerate(rte_rows[:8])]}
    (data / "dev.json").write_text(json.dumps(adv), encoding="utf-8")
    suite = {"seeds": SEEDS, "methods": ["plain"],
             "finetune": {"data": {"max_length": 32}, "optim": {"epochs": 1, "batch_size": 16, "lr": 1e-3}},
             "tasks": [{"name": "sst2", "task": "sst2", "train": "data/sst2-train.tsv", "dev": "data/sst2-dev.tsv",
                        "robust": [{"name": "advglue", "format": "advglue", "file": "data/dev.json", "subset": "sst2"}]},
                       {"name": "rte", "task": "rte", "train": "data/rte-train.tsv", "dev": "data/rte-dev.tsv",
                        "robust": [{"name": "advglue", "format": "advglue", "file": "data/dev.json", "subset": "rte"}]}]}
    (d / "suite.yaml").write_text(yaml.safe_dump(suite), encoding="utf-8")
    cks = [str(tiny_bert(d / "A", vocab, 0)), str(tiny_bert(d / "B", vocab, 1))]
    out = d / "out"
    res = B.bench(str(d / "suite.yaml"), cks, str(out), device="cpu", progress=False)
    return d, cks, out, res, adv


def test_bench_end_to_end_content(setup):
    d, cks, out, res, adv = setup
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["runs"] == res["runs"]
    runs = res["runs"]
    assert len(runs) == 2 * 2 * 2
    assert {(r["checkpoint"], r["task"], r["seed"]) for r in runs} == {
        (c, t, s) for c in ("A", "B") for t in ("sst2", "rte") for s in SEEDS}
    for r in runs:
        assert 0.0 <= r["dev"]["accuracy"] <= 1.0 and not r["reused"]
        assert r["robust"]["advglue"]["examples"] == (10 if r["task"] == "sst2" else 8)
    # medians/ranges recomputed from the per-run records
    for ck in ("A", "B"):
        for col, getter in (("sst2/dev", lambda r: r["dev"]["accuracy"]),
                            ("rte/advglue", lambda r: r["robust"]["advglue"]["accuracy"])):
            task = col.split("/")[0]
            vals = [100 * getter(r) for r in runs if r["checkpoint"] == ck and r["task"] == task]
            cell = res["summary"][ck]["plain"][col]
            assert cell["median"] == pytest.approx(np.median(vals))
            assert (cell["min"], cell["max"]) == (pytest.approx(min(vals)), pytest.approx(max(vals)))
    # paired differences B - A by seed
    (p,) = res["paired"]
    assert (p["checkpoint"], p["baseline"], p["method"]) == ("B", "A", "plain")
    by = {(r["checkpoint"], r["task"], r["seed"]): 100 * r["dev"]["accuracy"] for r in runs}
    diffs = [by[("B", "sst2", s)] - by[("A", "sst2", s)] for s in SEEDS]
    cell = p["columns"]["sst2/dev"]
    assert [cell["differences"][str(s)] for s in SEEDS] == pytest.approx(diffs)
    assert cell["median"] == pytest.approx(np.median(diffs))
    assert cell["wins"] == sum(x > 0 for x in diffs) and cell["losses"] == sum(x < 0 for x in diffs)
    # the Markdown table: header, one row per checkpoint x method, the paired row
    table = (out / "results.md").read_text()
    lines = table.splitlines()
    assert lines[0] == ("| checkpoint | method | sst2 dev (accuracy) | sst2 advglue (acc) | rte dev (accuracy) | "
                        "rte advglue (acc) |")
    a_row = next(l for l in lines if l.startswith("| A | plain |"))
    s = res["summary"]["A"]["plain"]["sst2/dev"]
    assert f"{s['median']:.1f} ({s['min']:.1f}–{s['max']:.1f})" in a_row
    paired_row = next(l for l in lines if l.startswith("| B − A | plain |"))
    assert f"{cell['median']:+.1f} [{cell['wins']}+ {cell['losses']}− {cell['ties']}=]" in paired_row
    assert len([l for l in lines if l.startswith("| ")]) == 1 + 2 + 1


def test_robust_accuracy_recomputed_from_saved_model(setup):
    """The AdvGLUE RTE accuracy of one run, recomputed here from its best/ model and the GLUE integer labels."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    d, cks, out, res, adv = setup
    rec = next(r for r in res["runs"] if r["checkpoint"] == "B" and r["task"] == "rte" and r["seed"] == 2)
    best = out / "runs" / "B" / "rte" / "plain" / "seed2" / "best"
    model = AutoModelForSequenceClassification.from_pretrained(best).eval()
    tok = AutoTokenizer.from_pretrained(best)
    items = adv["rte"]
    enc = tok([i["sentence1"] for i in items], [i["sentence2"] for i in items], truncation=True, max_length=32,
              padding=True, return_tensors="pt")
    with torch.no_grad():
        pred = model(**enc).logits.argmax(-1).tolist()
    names = {0: "entailment", 1: "not_entailment"}                 # GLUE's RTE integers
    acc = np.mean([model.config.id2label[p] == names[i["label"]] for p, i in zip(pred, items)])
    assert rec["robust"]["advglue"]["accuracy"] == pytest.approx(acc)


def test_rerun_reuses_and_recovers(setup, monkeypatch):
    d, cks, out, res, adv = setup
    corrupt = out / "runs" / "A" / "sst2" / "plain" / "seed1" / "results.json"
    corrupt.write_text(corrupt.read_text()[:50])        # a truncated write
    calls = []
    import alum_pretrain.finetune.trainer as T

    real = T.finetune

    def spy(cfg):
        calls.append(cfg.run.out)
        return real(cfg)

    monkeypatch.setattr(T, "finetune", spy)
    again = B.bench(str(d / "suite.yaml"), cks, str(out), device="cpu", progress=False)
    assert calls == [str(corrupt.parent)]                  # only the run whose results were lost
    assert (corrupt.parent / "results.json.corrupt").is_file()
    assert [r["reused"] for r in again["runs"]].count(False) == 1
    # the resumed run continued from its final checkpoint: same best dev result, no retraining
    old = {(r["checkpoint"], r["task"], r["seed"]): r["dev"] for r in res["runs"]}
    assert all(old[(r["checkpoint"], r["task"], r["seed"])] == r["dev"] for r in again["runs"])
    assert again["summary"] == res["summary"]


def test_changed_suite_refused_and_run_index(setup, tmp_path):
    d, cks, out, res, adv = setup
    suite = yaml.safe_load((d / "suite.yaml").read_text())
    suite["finetune"]["optim"]["lr"] = 5e-4
    (d / "suite2.yaml").write_text(yaml.safe_dump(suite))
    with pytest.raises(ValueError, match=r"finished with other settings \(optim.lr: 0.001 -> 0.0005\)"):
        B.bench(str(d / "suite2.yaml"), cks, str(out), device="cpu", progress=False)
    # --run-index: one run, no table; an index out of range names the range
    one = B.bench(str(d / "suite.yaml"), cks, str(out), run_index=5, device="cpu", progress=False)
    assert [r["index"] for r in one["runs"]] == [5] and one["runs"][0]["reused"]
    with pytest.raises(ValueError, match=r"runs 0\.\.7"):
        B.bench(str(d / "suite.yaml"), cks, str(out), run_index=8, device="cpu", progress=False)


def test_changed_task_file_refused(setup):
    """A finished run is reused only on the data it was trained on: the same path with other content is
    refused naming the file and both fingerprints (its dev figures describe data no longer there)."""
    d, cks, out, res, adv = setup
    f = d / "data" / "rte-dev.tsv"
    original = f.read_bytes()
    try:
        f.write_bytes(original.replace(b"\n", b"\n", 1) + original.splitlines(keepends=True)[1])  # one row more
        with pytest.raises(ValueError, match=r"finished on other data \(--data.dev: sha256:[0-9a-f]{64} -> sha256:"):
            B.bench(str(d / "suite.yaml"), cks, str(out), device="cpu", progress=False)
    finally:
        f.write_bytes(original)
    again = B.bench(str(d / "suite.yaml"), cks, str(out), run_index=5, device="cpu", progress=False)
    assert again["runs"][0]["reused"]


def test_cli_list_runs_and_errors(setup, tmp_path):
    d, cks, out, res, adv = setup
    r = subprocess.run([sys.executable, "-m", "alum_pretrain.finetune.bench", "--checkpoints", *cks,
                        "--suite", str(d / "suite.yaml"), "--out", str(out), "--list-runs"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = r.stdout.strip().splitlines()
    assert len(rows) == 8 and all("\tdone\t" in row for row in rows)
    assert rows[0].split("\t")[:5] == ["0", "A", "sst2", "plain", "seed 1"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"seeds": [1], "tasks": [{"name": "x", "task": "rte", "train": "a", "dev": "b",
                                                             "finetune": {"run": {"seed": 3}}}]}))
    r = subprocess.run([sys.executable, "-m", "alum_pretrain.finetune.bench", "--checkpoints", cks[0],
                        "--suite", str(bad), "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "finetune sets ['run.seed']" in r.stderr and str(bad) in r.stderr


def test_suite_errors_name_file_and_key(setup, tmp_path):
    d, cks, out, res, adv = setup
    base = yaml.safe_load((d / "suite.yaml").read_text())

    def check(mutate, pattern):
        s = json.loads(json.dumps(base))
        mutate(s)
        f = d / "bad-suite.yaml"
        f.write_text(yaml.safe_dump(s))
        with pytest.raises(ValueError, match=pattern):
            B.bench(str(f), cks, str(tmp_path / "o"), device="cpu", progress=False)

    check(lambda s: s.update(seeds=[1, 1]), "seeds must be a non-empty list of distinct integers")
    check(lambda s: s["tasks"][0].update(task="sst3"), "unknown task")
    check(lambda s: s["tasks"][0]["robust"][0].update(subset="mrpc"), "AdvGLUE subset 'mrpc'")
    check(lambda s: s["finetune"]["optim"].update(lrr=1), r"unknown key optim.lrr \(did you mean optim.lr\?\)")
    # an SST-2 task with an NLI robust set: refused before any training, naming both label sets
    check(lambda s: s["tasks"][0]["robust"][0].update(subset="rte"),
          r"robust set 'advglue'.*\['entailment', 'not_entailment'\].*model labels \['0', '1'\]")
    with pytest.raises(ValueError, match="two checkpoints are named 'A'"):
        B.parse_checkpoints([cks[0], cks[0]])


def test_launch_bench_array_dry_run_and_task_command(setup, tmp_path):
    """alum-launch bench writes an array of one task per run and a collecting job; the array task's command,
    run here with SLURM_ARRAY_TASK_ID set, does run i (reused here: it finished above)."""
    import os

    from launch.cli import main as launch_main

    d, cks, out, res, adv = setup
    rc = launch_main(["bench", "--suite", str(d / "suite.yaml"), "--checkpoints", *cks, "--out", str(out),
                      "--gpus", "1", "--time", "2:00:00", "--partition", "gpu", "--max-parallel", "4", "--dry-run"])
    assert rc == 0
    script = (out / "slurm" / "bench-out.sbatch").read_text()
    collect = (out / "slurm" / "bench-out-collect.sbatch").read_text()
    assert "#SBATCH --array=0-7%4" in script and "#SBATCH --gres=gpu:1" in script
    assert "#SBATCH --time=2:00:00" in script and "#SBATCH --partition=gpu" in script
    assert '--run-index "$SLURM_ARRAY_TASK_ID"' in script and "--device cuda" in script
    assert "--array" not in collect and "--run-index" not in collect
    cmd = next(l for l in script.splitlines() if l.startswith("python -m alum_pretrain.finetune.bench"))
    cmd = cmd.replace("--device cuda", "--device cpu").replace("python -m", f"{sys.executable} -m", 1)
    # runs are numbered checkpoint x task x method x seed: 3 = A / rte / plain / seed 2
    cache3 = out / "runs" / "A" / "rte" / "plain" / "seed2" / "eval" / "advglue.json"
    cache2 = out / "runs" / "A" / "rte" / "plain" / "seed1" / "eval" / "advglue.json"
    cache3.unlink()
    cache2.unlink()
    r = subprocess.run(["bash", "-c", cmd], env={**os.environ, "SLURM_ARRAY_TASK_ID": "3"}, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert cache3.is_file() and not cache2.is_file()
    rc = launch_main(["bench", "--suite", str(d / "suite.yaml"), "--checkpoints", *cks, "--out", str(out),
                      "--max-parallel", "0", "--dry-run"])
    assert rc == 2


def test_lost_best_model_is_retrained(setup, monkeypatch):
    d, cks, out, res, adv = setup
    run = out / "runs" / "B" / "sst2" / "plain" / "seed2"
    shutil.rmtree(run / "best")
    again = B.bench(str(d / "suite.yaml"), cks, str(out), device="cpu", progress=False)
    rec = next(r for r in again["runs"] if r["checkpoint"] == "B" and r["task"] == "sst2" and r["seed"] == 2)
    assert not rec["reused"] and (run / "best" / "config.json").is_file()
    assert [r["reused"] for r in again["runs"]].count(False) == 1
    # the same seed and data give the same fine-tuned model (CPU determinism)
    old = next(r for r in res["runs"] if r["checkpoint"] == "B" and r["task"] == "sst2" and r["seed"] == 2)
    assert rec["dev"] == old["dev"]


def test_summary_with_non_finite_values():
    """A diverged run (NaN metric) is counted apart, never folded into a median."""
    suite = B.Suite("s.yaml", [1, 2, 3], [B.TaskEntry("stsb", "stsb", "t", "d", ["plain"], {}, [])])
    recs = [{"checkpoint": ck, "task": "stsb", "method": "plain", "seed": s, "metric": "pearson",
             "dev": {"pearson": v}, "robust": {}}
            for ck, vals in (("A", [0.5, 0.7, float("nan")]), ("B", [0.6, 0.6, 0.9])) for s, v in zip([1, 2, 3], vals)]
    out = B.summarise(suite, ["A", "B"], recs)
    a = out["summary"]["A"]["plain"]["stsb/dev"]
    assert (a["n"], a["non_finite"], a["median"]) == (2, 1, pytest.approx(60.0))
    p = out["paired"][0]["columns"]["stsb/dev"]
    assert sorted(p["differences"]) == ["1", "2"] and p["median"] == pytest.approx(0.0)
    assert (p["wins"], p["losses"]) == (1, 1)
    table = B.markdown_table(out, [1, 2, 3])
    assert "60.0 (50.0–70.0) [1 failed/non-finite]" in table and "| B − A | plain | +0.0 [1+ 1− 0=]" in table


def test_cli_prints_table_and_bad_method_names_suite(setup, capsys, tmp_path):
    d, cks, out, res, adv = setup
    assert B.main(["--checkpoints", *cks, "--suite", str(d / "suite.yaml"), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert (out / "results.md").read_text().strip() in printed and "| B − A | plain |" in printed
    s = yaml.safe_load((d / "suite.yaml").read_text())
    s["tasks"][1]["methods"] = ["plain", "alumm"]
    (d / "bad-method.yaml").write_text(yaml.safe_dump(s))
    assert B.main(["--checkpoints", *cks, "--suite", str(d / "bad-method.yaml"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{d / 'bad-method.yaml'}: task 'rte', method 'alumm'" in err and "must be one of" in err


def test_16bit_checkpoint_is_fine_tuned_in_float32(tmp_path):
    """A checkpoint stored in float16/bfloat16 is fine-tuned from float32 master weights (transformers would
    load it in 16 bits, and AdamW on 16-bit weights loses small updates)."""
    from transformers import BertConfig, BertForMaskedLM

    from alum_pretrain.finetune.tasks import get_task
    from alum_pretrain.finetune.trainer import load_model

    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    for dtype in (torch.float16, torch.bfloat16):
        BertForMaskedLM(cfg).to(dtype).save_pretrained(tmp_path / str(dtype))
        m = load_model(str(tmp_path / str(dtype)), get_task("rte"))
        assert {p.dtype for p in m.parameters()} == {torch.float32}


def test_failed_run_is_recorded_and_others_kept(setup, monkeypatch, tmp_path):
    """A run that fails (here: its fine-tuning raises, as a diverged run would) is recorded, its cells count
    it as missing, the other runs are kept, and the next invocation redoes only it."""
    d, cks, out, res, adv = setup
    work = tmp_path / "out"
    shutil.copytree(out, work)
    # the copied runs point at the old folder in their saved config (run.out is bookkeeping only)
    victim = work / "runs" / "A" / "rte" / "plain" / "seed1"
    shutil.rmtree(victim)
    import alum_pretrain.finetune.trainer as T

    real = T.finetune

    def boom(cfg):
        raise FloatingPointError("non-finite loss at step 3")

    monkeypatch.setattr(T, "finetune", boom)
    assert B.main(["--checkpoints", *cks, "--suite", str(d / "suite.yaml"), "--out", str(work), "--no-progress"]) == 1
    got = json.loads((work / "results.json").read_text())
    assert [f["index"] for f in got["failed"]] == [2] and "non-finite loss" in got["failed"][0]["error"]
    cell = got["summary"]["A"]["plain"]["rte/dev"]
    assert cell["n"] == 1 and cell["non_finite"] == 1
    assert "[1 failed/non-finite]" in (work / "results.md").read_text()
    monkeypatch.setattr(T, "finetune", real)
    again = B.bench(str(d / "suite.yaml"), cks, str(work), device="cpu", progress=False)
    assert again["failed"] == [] and [r["reused"] for r in again["runs"]].count(False) == 1


def test_a_second_bench_on_the_same_out_is_refused(setup, capsys):
    """One alum-bench per --out (alum_pretrain/runlock.py); an array task locks only its own run folder."""
    from alum_pretrain.runlock import lock_folder

    d, cks, out, res, adv = setup
    argv = ["--checkpoints", *cks, "--suite", str(d / "suite.yaml"), "--out", str(out), "--device", "cpu",
            "--no-progress"]
    with lock_folder(out, tool="test", command="the first alum-bench"):
        assert B.main(argv) == 2
        err = capsys.readouterr().err
        assert f"{out} is in use by PID {os.getpid()}" in err and "the first alum-bench" in err
        one = B.bench(str(d / "suite.yaml"), cks, str(out), run_index=5, device="cpu", progress=False)
        assert len(one["runs"]) == 1  # another task's run folder is free
    assert B.main(argv) == 0  # released: the same command runs (every run reused)
