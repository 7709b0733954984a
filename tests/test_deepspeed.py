"""The DeepSpeed engine (``--train.engine=deepspeed``): same numbers as DDP, ZeRO-quiet ALUM ascent, resume,
preemption, export.

Fast tests check the config mapping and the error messages.  The ``multirank`` tests run
``torchrun --nproc_per_node 2`` on CPU (gloo):

* ZeRO-2 and ZeRO-3 (every parameter partitioned) runs of the tiny preset with ALUM switched on after
  step 2, over 6 steps and 2 micro-batches per step, give the logged losses, gradient norms and final
  weights of the DDP run of the same global batch (a 1-process DDP run: ``tests/test_ddp.py`` shows that
  2-process DDP equals it);
* during those runs, ``tests/ds_ascent_probe.py`` counts collectives and ZeRO's gradient-hook calls
  inside ALUM's ``torch.autograd.grad`` (the ascent): no hook call and no reduction there, while the real
  backward has both;
* ZeRO-3 resumed from its step-3 checkpoint ends with the uninterrupted run's weights;
* SIGUSR1 to one worker: both ranks save (every shard) and exit 0;
* ``alum-export`` of the DeepSpeed run gives an HF folder whose logits equal those of the weights rebuilt
  from the ZeRO shards by DeepSpeed's ``zero_to_fp32``.
Precision: single-process ZeRO-2 runs in fp16 (loss scaling) and bf16 autocast match DDP in the same
precision.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from engine_helpers import (PARITY, ROOT, final_weights, make_stdlib_databin, max_weight_diff, read_log, run_train,
                            subprocess_env, torchrun, train_args)

HAS_DS = importlib.util.find_spec("deepspeed") is not None
requires_ds = pytest.mark.skipif(not HAS_DS, reason="deepspeed not installed (pip install 'alum-pretrain[deepspeed]')")

COMMON = ("--alum.start_step=2", *PARITY)
STEPS = 6
Z3 = ("--train.engine=deepspeed", "--deepspeed.zero_stage=3", "--deepspeed.param_persistence_threshold=0")
Z2 = ("--train.engine=deepspeed", "--deepspeed.zero_stage=2")


def _torchrun(script: list[str], args: list[str], timeout: int = 400, **env) -> subprocess.CompletedProcess:
    return torchrun(script, args, timeout=timeout, **env)


def _single(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """One process in a subprocess (DeepSpeed leaves a process group behind in the process that ran it)."""
    return subprocess.run([sys.executable, "-m", "alum_pretrain.train", *args], env=subprocess_env(), cwd=str(ROOT),
                          capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------------------
# Config mapping and errors (no DeepSpeed engine built)
# ------------------------------------------------------------------------------------------------------


def _cfg(*argv: str):
    from alum_pretrain.config import parse_config
    from alum_pretrain.engine.config import TrainConfig

    return parse_config(TrainConfig, list(argv), prog="t")


def test_ds_config_maps_the_run_config():
    from alum_pretrain.engine.deepspeed_engine import ds_config

    cfg = _cfg("--train.batch_size=4", "--train.precision=bf16", "--optim.grad_clip=0.5",
               "--train.engine=deepspeed", "--deepspeed.zero_stage=3", "--deepspeed.offload_param=cpu",
               "--deepspeed.offload_optimizer=cpu")
    d = ds_config(cfg, grad_accum=8, world_size=16)
    assert d["train_micro_batch_size_per_gpu"] == 4 and d["gradient_accumulation_steps"] == 8
    assert d["train_batch_size"] == 4 * 8 * 16
    assert d["gradient_clipping"] == 0.5
    z = d["zero_optimization"]
    assert z["stage"] == 3 and z["offload_param"]["device"] == "cpu" and z["offload_optimizer"]["device"] == "cpu"
    # float32 weights + torch autocast (never DeepSpeed's pure-16-bit modes), fp32 gradient reduction
    assert "fp16" not in d and "bf16" not in d
    assert d["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert "torch_autocast" not in ds_config(_cfg("--train.engine=deepspeed"), 1, 1)
    assert ds_config(_cfg("--train.precision=fp16"), 1, 1)["torch_autocast"]["dtype"] == "float16"


@pytest.mark.parametrize("argv, flag", [
    (["--deepspeed.zero_stage=4"], "--deepspeed.zero_stage"),
    (["--deepspeed.offload_param=cpu", "--deepspeed.zero_stage=2"], "--deepspeed.offload_param"),
    (["--deepspeed.offload_optimizer=cpu", "--deepspeed.zero_stage=0"], "--deepspeed.offload_optimizer"),
    (["--deepspeed.param_persistence_threshold=-1"], "--deepspeed.param_persistence_threshold"),
    (["--train.engine=fsdp"], "--train.engine"),
    (["--optim.name=sgd"], "--optim.name"),
])
def test_bad_deepspeed_flags_name_the_flag(argv, flag):
    with pytest.raises((ValueError, SystemExit)) as ei:
        _cfg(*argv)
    if ei.type is ValueError:
        assert flag in str(ei.value)


def test_lamb_needs_deepspeed_on_cuda(tmp_path):
    from alum_pretrain.engine.deepspeed_engine import build_optimizer

    cfg = _cfg("--optim.name=lamb")
    with pytest.raises(ValueError, match="--optim.name=lamb.*CUDA"):
        build_optimizer(torch.nn.Linear(2, 2), cfg.optim, torch.device("cpu"))
    # and under DDP it is refused before anything is built
    databin = make_stdlib_databin(tmp_path / "db", n_docs=20)
    with pytest.raises(ValueError, match="--optim.name=lamb"):
        from alum_pretrain.engine import distributed as D
        from alum_pretrain.engine.setup import build_run

        build_run(_cfg(*train_args(databin, tmp_path / "r", 2), "--optim.name=lamb"), D.DistEnv())


def test_missing_deepspeed_is_a_clear_error(monkeypatch):
    from alum_pretrain.engine.deepspeed_engine import require_deepspeed

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    with pytest.raises(ValueError, match=r"alum-pretrain\[deepspeed\].*--train.engine=ddp"):
        require_deepspeed()


def test_nonfinite_weight_check_reads_zero3_partitions():
    """The refusal to checkpoint NaN weights looks into a ZeRO-3 parameter's partition (``ds_tensor``): the
    parameter's own data is empty there, so checking it alone would pass any weights."""
    from alum_pretrain.engine import distributed as D
    from alum_pretrain.engine.checkpoint import first_nonfinite_weight

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    for p in model.parameters():  # what zero.Init leaves: empty data, this rank's slice in ds_tensor
        p.ds_tensor = p.data.reshape(-1)[:2].clone()
        p.data = torch.empty(0)
    assert first_nonfinite_weight(model, D.DistEnv()) is None
    model[1].weight.ds_tensor[1] = float("nan")
    assert first_nonfinite_weight(model, D.DistEnv()) == "1.weight"


@requires_ds
def test_resume_refuses_a_changed_world_size_or_a_ddp_checkpoint(tmp_path):
    from types import SimpleNamespace

    from alum_pretrain.engine import distributed as D
    from alum_pretrain.engine.deepspeed_engine import load

    run = SimpleNamespace(env=D.DistEnv(world_size=1), engine=None)
    with pytest.raises(ValueError, match="sharded over 2 processes.*this run has 1"):
        load(run, tmp_path, {"engine": "deepspeed", "world_size": 2})
    with pytest.raises(ValueError, match="DDP engine"):
        load(run, tmp_path, {"world_size": 1})
    with pytest.raises(ValueError, match="incomplete"):
        load(run, tmp_path, {"engine": "deepspeed", "world_size": 1})


# ------------------------------------------------------------------------------------------------------
# Precision: single-process ZeRO-2 == DDP in fp16 (loss scaling) and bf16 autocast, ALUM on
# ------------------------------------------------------------------------------------------------------


@requires_ds
@pytest.mark.parametrize("precision, offload, stage", [("fp16", "none", 2), ("bf16", "cpu", 2), ("fp16", "none", 0)])
def test_zero_matches_ddp_under_16bit_autocast(tmp_path, precision, offload, stage):
    """ZeRO-2 in fp16 (dynamic loss scaling) and bf16 with the AdamW update on the host (ZeRO-Offload with
    torch's AdamW); stage 0 in fp16 (DeepSpeed's own GradScaler path; the norm is taken by the engine)."""
    databin = make_stdlib_databin(tmp_path / "db", n_docs=40)
    extra = (*COMMON, "--train.grad_accum=2", "--train.eval_every=0", f"--train.precision={precision}")
    ddp, ds = tmp_path / "ddp", tmp_path / "ds"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_train(databin, ddp, 4, *extra) == 0
    finally:
        torch.set_num_threads(n)
    r = _single(train_args(databin, ds, 4, *extra, "--train.engine=deepspeed", f"--deepspeed.zero_stage={stage}",
                           f"--deepspeed.offload_optimizer={offload}"))
    assert r.returncode == 0, r.stderr[-4000:]
    a, b = read_log(ddp), read_log(ds)
    assert len(b) == 4 and any(x["adv"] > 0 for x in b)
    for x, y in zip(a, b):
        # The gradient norm is the unscaled one (fp16: the loss scale is divided out, ~6.6e4 otherwise).
        for key in ("loss", "mlm", "nsp", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=2e-3), (x["step"], key, x[key], y[key])
        assert y["adv"] == pytest.approx(x["adv"], rel=5e-2, abs=1e-7)
    assert max_weight_diff(final_weights(ddp), final_weights(ds)) < 2e-3


# ------------------------------------------------------------------------------------------------------
# Two processes (gloo)
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ds_runs(tmp_path_factory):
    """DDP (1 process) and DeepSpeed ZeRO-2 / ZeRO-3 (2 processes, under the probe) of the same config."""
    if not HAS_DS:
        pytest.skip("deepspeed not installed (pip install 'alum-pretrain[deepspeed]')")
    tmp = tmp_path_factory.mktemp("ds")
    databin = make_stdlib_databin(tmp / "data-bin", n_docs=60)
    # global batch 8 = 4 x 2 accum x 1 process (DDP) = 2 x 2 accum x 2 processes (DeepSpeed)
    ddp = tmp / "ddp"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_train(databin, ddp, STEPS, *COMMON, "--train.batch_size=4", "--train.grad_accum=2") == 0
    finally:
        torch.set_num_threads(n)
    out = {"databin": databin, "ddp": ddp}
    for name, flags in (("zero2", Z2), ("zero3", Z3)):
        run = tmp / name
        args = train_args(databin, run, STEPS, *COMMON, "--train.batch_size=2", "--train.grad_accum=2",
                          "--train.save_every=3", *flags)
        r = _torchrun(["tests/ds_ascent_probe.py"], args, PROBE_OUT=str(tmp / f"{name}-probe"))
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-5000:]
        assert "world size 2" in r.stderr
        assert ("built partitioned (ZeRO-3)" in r.stderr) == (name == "zero3")  # deepspeed.zero.Init
        out[name] = run
        out[f"{name}-args"] = args
        out[f"{name}-probe"] = [json.loads((tmp / f"{name}-probe" / f"rank{k}.json").read_text()) for k in (0, 1)]
    return out


@pytest.mark.multirank
@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_zero_matches_ddp(ds_runs, name):
    l1, l2 = read_log(ds_runs["ddp"]), read_log(ds_runs[name])
    assert [x["step"] for x in l2] == list(range(1, STEPS + 1))
    assert l1[0]["adv"] == 0 and any(x["adv"] > 0 for x in l1)
    for a, b in zip(l1, l2):
        for key in ("loss", "mlm", "nsp", "adv", "mask_frac", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-8), (a["step"], key, a[key], b[key])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    for a, b in zip(read_log(ds_runs["ddp"], "valid"), read_log(ds_runs[name], "valid")):
        assert b["valid_mlm"] == pytest.approx(a["valid_mlm"], rel=1e-5)
    assert max_weight_diff(final_weights(ds_runs["ddp"]), final_weights(ds_runs[name])) < 1e-5
    step = ds_runs[name] / "checkpoints" / f"step-{STEPS}"
    shards = sorted(p.name for p in (step / "deepspeed" / "zero").glob("*optim_states.pt"))
    assert len(shards) == 2, shards  # one ZeRO optimizer shard per rank, inside the same step folder
    assert (ds_runs[name] / "COMPLETED").is_file()


@pytest.mark.multirank
@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_alum_ascent_fires_no_zero_hook_and_reduces_nothing(ds_runs, name):
    reductions = ("dist.all_reduce", "dist.reduce", "dist.reduce_scatter", "dist.reduce_scatter_tensor",
                  "dist.all_reduce_coalesced", "dist.all_to_all_single")
    for rank, p in enumerate(ds_runs[f"{name}-probe"]):
        # ALUM ran: K=1 ascent per micro-batch, 2 micro-batches, steps 3..6 (alum.start_step=2 -> 4 steps)
        # ... and each ascent step takes two input-only autograd.grad calls (precision.scale_free_input_grad:
        # the gradient w.r.t. the float32 logits, then the rescaled backward to delta)
        assert p["ascent_calls"] == 2 * 2 * (STEPS - 2), p
        hooks_out = sum(v for k, v in p["outside"].items() if k.startswith("hook."))
        assert hooks_out > 0 and sum(p["outside"].get(k, 0) for k in reductions) > 0, p  # the probe sees them
        assert not any(k.startswith("hook.") for k in p["ascent"]), (rank, p["ascent"])
        assert not any(k in reductions for k in p["ascent"]), (rank, p["ascent"])
        # ZeRO-3 may only all-gather the partitioned weights the ascent backward needs; ZeRO-2 does nothing.
        allowed = {"dist.all_gather_into_tensor", "dist.all_gather"} if name == "zero3" else set()
        assert set(p["ascent"]) <= allowed, (rank, p["ascent"])


@pytest.mark.multirank
def test_zero3_resume_equals_uninterrupted(ds_runs, tmp_path):
    run = tmp_path / "z3"
    shutil.copytree(ds_runs["zero3"], run)
    shutil.rmtree(run / "checkpoints" / f"step-{STEPS}")
    (run / "COMPLETED").unlink()
    args = [a.replace(str(ds_runs["zero3"]), str(run)) for a in ds_runs["zero3-args"]]
    r = _torchrun(["-m", "alum_pretrain.train"], args)
    assert r.returncode == 0, r.stderr[-5000:]
    assert "resumed from" in r.stderr
    assert max_weight_diff(final_weights(ds_runs["zero3"]), final_weights(run)) <= 1e-6
    assert [x["step"] for x in read_log(run)] == list(range(1, STEPS + 1))


@pytest.mark.multirank
def test_export_of_a_zero3_checkpoint_has_logit_parity(ds_runs, tmp_path):
    from transformers import AutoModelForPreTraining

    from alum_pretrain.engine.deepspeed_engine import consolidate_zero
    from alum_pretrain.export import main as export_main

    out = tmp_path / "hf"
    assert export_main([str(ds_runs["zero3"]), str(out)]) == 0
    exported = AutoModelForPreTraining.from_pretrained(str(out)).eval()
    # The training weights as ZeRO holds them: fp32 partitions of both ranks, merged by zero_to_fp32.
    trained = AutoModelForPreTraining.from_pretrained(str(out)).eval()
    sd = consolidate_zero(ds_runs["zero3"] / "checkpoints" / f"step-{STEPS}")
    missing, unexpected = trained.load_state_dict(sd, strict=False)
    assert not unexpected and all("decoder" in k or "position_ids" in k for k in missing), (missing, unexpected)
    ids = torch.randint(5, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = exported(input_ids=ids), trained(input_ids=ids)
    assert (a.prediction_logits - b.prediction_logits).abs().max() < 1e-4
    assert (a.seq_relationship_logits - b.seq_relationship_logits).abs().max() < 1e-4

    # Fault: the consolidated model/ weights are damaged; --from-zero-shards rebuilds them from the shards.
    run = tmp_path / "damaged"
    shutil.copytree(ds_runs["zero3"], run)
    st = run / "checkpoints" / f"step-{STEPS}" / "model" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    assert export_main([str(run), str(tmp_path / "hf2"), "--from-zero-shards"]) == 0
    from safetensors.torch import load_file

    x, y = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "hf2" / "model.safetensors"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert export_main([str(ds_runs["ddp"]), str(tmp_path / "hf3"), "--from-zero-shards"]) == 2  # no shards there


@pytest.mark.multirank
def test_sigusr1_to_one_rank_saves_all_shards_and_exits_0(ds_runs, tmp_path):
    from alum_pretrain.engine.deepspeed_engine import consolidate_zero

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "alum_pretrain.train",
           *train_args(ds_runs["databin"], out, 500, "--train.batch_size=2", "--train.eval_every=0",
                       "--train.save_every=0", *Z2)]
    proc = subprocess.Popen(cmd, env=subprocess_env(), cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = out / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate(timeout=60)[0][-3000:]
    workers = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True,
                             timeout=60).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGUSR1)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and not ckpts[0].name.endswith(".tmp"), ckpts
    n = int(ckpts[0].name.split("-")[1])
    assert 3 <= n < 500
    assert not (out / "COMPLETED").exists()
    assert len(list((ckpts[0] / "deepspeed" / "zero").glob("*optim_states.pt"))) == 2
    # The consolidated model/ and the ZeRO shards hold the same weights.
    model = final_weights(out)
    shards = consolidate_zero(ckpts[0])
    assert max(float((model[k] - shards[k]).abs().max()) for k in model) == 0.0


@pytest.mark.multirank
@requires_ds
def test_zero3_builds_partitioned_with_the_plain_builds_weights(tmp_path):
    """Under ZeRO-3 the model is built under ``deepspeed.zero.Init`` (2 processes): no rank ever holds a whole
    weight, each holds half of the elements, and the gathered weights equal, bit for bit, a plain build with
    the same seed - from scratch (BERT with NSP, ModernBERT, DeBERTa-v3) and continual from an HF folder
    (with its heads, and without an MLM head: the fresh head's initialisation too), tied decoder kept."""
    from transformers import BertConfig, BertForPreTraining, BertModel

    ck = tmp_path / "ck"
    config = BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128,
                        vocab_size=500)
    torch.manual_seed(7)
    BertForPreTraining(config).save_pretrained(str(ck / "full"))
    BertModel(config).save_pretrained(str(ck / "bare"))
    r = _torchrun(["tests/ds_zero_init_probe.py"], [], PROBE_OUT=str(tmp_path / "probe"), PROBE_CKPT=str(ck))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-5000:]
    ranks = [json.loads((tmp_path / "probe" / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert set(ranks[0]) == {"bert-nsp", "modernbert-tiny", "deberta-tiny", "continual-nsp", "continual-fresh-head"}
    for rank, res in enumerate(ranks):
        for case, c in res.items():
            assert c["unequal"] == [] and c["tensors"] >= 20, (rank, case, c["unequal"])
            assert c["held"] == 0, (rank, case, c)
            assert c["whole"] / 2 <= c["partition"] <= c["whole"] / 2 + c["tensors"], (rank, case, c)
            assert c["tied"] == [True, True], (rank, case, c["tied"])
            assert c["fresh"] == c["fresh_plain"], (rank, case)
    fresh = ranks[0]["continual-fresh-head"]["fresh"]
    assert "cls.predictions.transform.dense.weight" in fresh and not ranks[0]["continual-nsp"]["fresh"]


@pytest.mark.multirank
@requires_ds
def test_zero3_continual_run_matches_ddp(ds_runs, tmp_path):
    """``--model.init_from`` under ZeRO-3 (transformers' partitioned ``from_pretrained``, 2 processes) trains
    like DDP from the same folder: the same losses and gradient norms over the first steps."""
    from alum_pretrain.engine.checkpoint import latest_checkpoint

    init = latest_checkpoint(ds_runs["ddp"]) / "model"  # the DDP run's trained weights, as an HF folder
    flags = (*COMMON, f"--model.init_from={init}", "--train.eval_every=0", "--train.grad_accum=2")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_train(ds_runs["databin"], tmp_path / "ddp", 3, *flags, "--train.batch_size=4") == 0
    finally:
        torch.set_num_threads(n)
    r = _torchrun(["-m", "alum_pretrain.train"],
                  train_args(ds_runs["databin"], tmp_path / "z3", 3, *flags, "--train.batch_size=2", *Z3))
    assert r.returncode == 0, r.stderr[-5000:]
    assert "built partitioned (ZeRO-3)" in r.stderr
    a, b = read_log(tmp_path / "ddp"), read_log(tmp_path / "z3")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        for key in ("loss", "mlm", "nsp", "adv"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-8), (x["step"], key, x[key], y[key])
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)


@requires_ds
@pytest.mark.multirank
def test_resume_override_lowers_the_lr_inside_the_zero2_engine(tmp_path):
    """The NaN remedy under DeepSpeed: resuming from step 2 with half the LR and
    ``--train.resume_override=optim.lr`` (2 ranks, gloo) makes the engine's own optimizer use half the
    uninterrupted run's rate at every later step (the schedule keeps its shape), records the override, and
    the next checkpoint's schedule carries the new base rate."""
    databin = make_stdlib_databin(tmp_path / "db", n_docs=30)
    out = tmp_path / "run"
    base = train_args(databin, out, 5, "--train.batch_size=2", "--train.eval_every=0", "--train.save_every=2",
                      "--optim.warmup_ratio=0.4", *Z2)
    r = _torchrun(["-m", "alum_pretrain.train"], base)
    assert r.returncode == 0, r.stderr[-4000:]
    full = {x["step"]: x["lr"] for x in read_log(out)}
    r = _torchrun(["-m", "alum_pretrain.train"], [*base, "--optim.lr=5e-4", "--train.resume_override=optim.lr",
                                                 "--train.resume_from=2"])
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resume override at step 2: --optim.lr 0.001 -> 0.0005" in r.stderr, r.stderr[-3000:]
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if x.strip()]
    assert [x for x in recs if x.get("kind") == "resume_override"] == [
        {"step": 2, "kind": "resume_override", "key": "optim.lr", "was": 0.001, "now": 0.0005}]
    first = next(i for i, x in enumerate(recs) if x.get("kind") == "resume_override")
    resumed = {x["step"]: x["lr"] for x in recs[first:] if "lr" in x}
    assert sorted(resumed) == [3, 4, 5]
    for k in (3, 4, 5):  # the rate the engine's optimizer stepped with: half, at every step of the schedule
        assert resumed[k] == pytest.approx(full[k] / 2, rel=1e-6), (k, resumed[k], full[k])
    state = torch.load(out / "checkpoints" / "step-4" / "deepspeed" / "zero" / "mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)
    assert state["lr_scheduler"]["base_lrs"] == pytest.approx([5e-4] * len(state["lr_scheduler"]["base_lrs"]))


# ------------------------------------------------------------------------------------------------------
# Fault injection: a non-finite loss never reaches the weights
# ------------------------------------------------------------------------------------------------------


@requires_ds
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_nonfinite_loss_skips_the_update_under_zero2(tmp_path, precision):
    """NaN loss at steps 3 and 4 (ALUM on): ZeRO skips both updates (non-finite gradient norm), the weights
    stay finite and equal those of a run that never took those two updates' data into the weights."""
    from safetensors.torch import load_file

    databin = make_stdlib_databin(tmp_path / "db", n_docs=30)
    out = tmp_path / "run"
    args = train_args(databin, out, 5, *COMMON, "--train.eval_every=0", "--train.save_every=2",
                      f"--train.precision={precision}", *Z2)
    env = subprocess_env(NAN_STEPS="3,4", MICRO_PER_STEP="1")
    r = subprocess.run([sys.executable, "tests/ds_nan_probe.py", *args], env=env, cwd=str(ROOT),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    log = read_log(out)
    assert [x["step"] for x in log] == [1, 2, 3, 4, 5]
    for x in log:  # a skipped step's gradient norm stays out of the average (null) and is counted
        nan_step = x["step"] in (3, 4)
        assert x["nonfinite_skipped"] == (1 if nan_step else 0), x
        # fp16 only: the loss scaler may also skip an early step on its own (its initial scale 2^16 overflows
        # the gradients of some tiny-model batches; the WordPiece vocabulary of the data-bin differs from process
        # to process) - an overflow, not a non-finite step, and logged as such
        overflow = precision == "fp16" and not nan_step and x["grad_norm"] is None
        if overflow:
            assert x.get("overflow_skipped", 1) >= 1 and x["step"] < 3, x
        assert nan_step == (x["grad_norm"] is None) or overflow, x
    # steps 3 and 4 changed nothing: the weights after step 4 are those saved after step 2
    w2 = load_file(str(out / "checkpoints" / "step-2" / "model" / "model.safetensors"))
    w4 = load_file(str(out / "checkpoints" / "step-4" / "model" / "model.safetensors"))
    assert max_weight_diff(w2, w4) == 0.0
    w5 = final_weights(out)
    assert all(torch.isfinite(v).all() for v in w5.values()) and max_weight_diff(w4, w5) > 0


@requires_ds
def test_fp16_overflow_advances_the_lr_schedule_like_ddp(tmp_path):
    """A forced fp16 overflow at steps 3 and 4 (finite loss x 1e30): DDP's GradScaler and ZeRO-2's loss scaler
    both skip the updates, and both engines step the LR schedule on, so the logged LR sequences are equal."""
    databin = make_stdlib_databin(tmp_path / "db", n_docs=30)
    logs = {}
    for name, flags in (("ddp", ()), ("ds", Z2)):
        out = tmp_path / name
        args = train_args(databin, out, 6, *COMMON, "--train.eval_every=0", "--train.precision=fp16",
                          "--optim.warmup_ratio=0.34", *flags)
        r = subprocess.run([sys.executable, "tests/ds_nan_probe.py", *args], cwd=str(ROOT), capture_output=True,
                           text=True, timeout=300, env=subprocess_env(OVERFLOW_STEPS="3,4", MICRO_PER_STEP="1",
                                                                   PROBE_COUNT="train"))
        assert r.returncode == 0, r.stderr[-4000:]
        logs[name] = read_log(out)
    # An overflow step: DDP counts it in overflow_skipped; DeepSpeed's log has no norm for it (the loss scaler
    # skipped the step inside the engine).  Step 1 overflows too (the initial scale 2**16 is too large).
    over = {"ddp": [x["overflow_skipped"] == 1 for x in logs["ddp"]], "ds": [x["grad_norm"] is None for x in logs["ds"]]}
    seen = {k: [(o, x["lr"]) for o, x in zip(over[k], logs[k])] for k in logs}
    for name, log in logs.items():
        assert [x["step"] for x in log] == [1, 2, 3, 4, 5, 6]
        assert over[name][2] and over[name][3], seen
        assert [x["nonfinite_skipped"] for x in log] == [0] * 6, seen
    assert over["ds"] == over["ddp"], seen
    lr_ddp, lr_ds = ([x["lr"] for x in logs[k]] for k in ("ddp", "ds"))
    assert lr_ds == pytest.approx(lr_ddp, rel=1e-9, abs=0) and len(set(lr_ddp)) >= 3, seen
