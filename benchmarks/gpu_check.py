"""One command that proves the GPU paths on a real GPU in a few minutes, one ``name=value`` line per figure.

    python benchmarks/gpu_check.py                  # on a GPU node: BERT-base seq 128 (<= 8 min on one H100/H200)
    python benchmarks/gpu_check.py --cpu-smoke      # the same code paths on a tiny model on CPU (< 2 min)
    python benchmarks/gpu_check.py --only env,throughput

Each figure is preceded by a ``# expect:`` comment line giving the outcome a healthy setup shows; a
check that fails prints ``name=error: ...`` and the others still run (GPU time is rare: one broken check
must not cost the rest).  Sections (``--only`` takes their names):

env         torch/CUDA versions, the card, compute capability, the build's arch list and whether it has
            kernels for this card, real bf16 support (capability >= 8.0) vs what torch claims, peak FLOP/s.
throughput  tokens/s (padded) and MFU of the standard and the ALUM (K=1) step, bf16 and fp16 (GradScaler),
            eager and ``torch.compile`` of the encoder (graphs compiled, recompiles in steady state), the
            ALUM/standard time ratio and the ascent's time (ALUM K=2 minus K=1).  Masking and the
            host->device copy are inside every timed step, as in ``alum-train``.
host        host masking time per step, the GPU-idle fraction it causes (1 - time with pre-masked batches /
            time with masking in the loop), host<->device syncs per standard and ALUM step
            (``torch.cuda.set_sync_debug_mode``).
ascent      fp16 ALUM ascent health: fraction of delta entries the ascent did not move (a zero gradient:
            fp16 underflow) and the cosine of the fp16 ascent step with the fp32 one (same weights, same
            random start).
memory      peak GPU memory of one fp16 ALUM step at mask rate 0.25 for each launch preset's micro-batch.
roundtrip   ``alum-train`` on the device: SIGUSR1 -> checkpoint + exit 0 -> resume -> completed; then the
            checkpoint exported with ``alum-export`` and its logits compared with the training model on CPU.
ddp         one ALUM step through DDP on a 1-rank NCCL process group (gloo on CPU).
fairseq     one ``fairseq-train`` update of the ``alum_masked_lm`` task/criterion with the flags the
            launcher emits (``--amp`` on GPU for fp16 + ALUM).

``--cpu-smoke`` forces the CPU, a tiny model, few steps, and ``torch.compile(backend="eager")`` (graph
capture and recompile counting without a C++ toolchain); GPU-only figures print ``n/a``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alum_pretrain.adversarial import ALUMConfig, alum_regularizer  # noqa: E402
from alum_pretrain.engine import gpu as G  # noqa: E402
from alum_pretrain.engine.config import OptimConfig  # noqa: E402
from alum_pretrain.engine.metrics import (decoder_flops_per_masked_token, flops_per_token, math_mode, mfu,  # noqa: E402
                                          peak_flops_for)
from alum_pretrain.engine.optim import build_optimizer  # noqa: E402
from alum_pretrain.engine.step import Masker, PretrainStep  # noqa: E402
from alum_pretrain.masking import SampleNoise  # noqa: E402
from alum_pretrain.masking import MaskingConfig  # noqa: E402
from alum_pretrain.models import PRESETS, PretrainModel, build_scratch_model  # noqa: E402

SECTIONS = ("env", "throughput", "host", "ascent", "memory", "roundtrip", "ddp", "fairseq")


# ---------------------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------------------
def emit(name: str, value, expect: str | None = None) -> None:
    if expect:
        print(f"# expect: {expect}")
    if isinstance(value, float):
        value = f"{value:.4g}"
    print(f"{name}={value}", flush=True)


@contextlib.contextmanager
def section(name: str):
    t0 = time.perf_counter()
    print(f"# ---- {name}", flush=True)
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - report and go on with the next section
        msg = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]
        emit(f"{name}_status", f"error: {msg}")
        traceback.print_exc(file=sys.stderr)
    finally:
        emit(f"{name}_seconds", round(time.perf_counter() - t0, 1))


# ---------------------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------------------
class Setup:
    """Device, sizes and step counts for a GPU run or the CPU smoke run."""

    def __init__(self, args):
        self.smoke = args.cpu_smoke
        cuda = torch.cuda.is_available() and not self.smoke
        if not cuda and not self.smoke:
            raise SystemExit("gpu_check: no CUDA device visible; run with --cpu-smoke to exercise the code paths on CPU")
        self.dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
        self.cuda = cuda
        self.preset = "tiny" if self.smoke else "base"
        self.seq = 16 if self.smoke else 128
        self.batch = 4 if self.smoke else args.batch_size
        self.vocab = 500 if self.smoke else 30522
        self.warmup = 1 if self.smoke else 3
        self.steps = 1 if self.smoke else args.steps
        self.name = torch.cuda.get_device_name(self.dev) if cuda else "cpu"
        self.cap = G.capability(self.dev)
        self.work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.work.mkdir(parents=True, exist_ok=True)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def dtypes(self) -> list[str]:
        out = []
        if not self.cuda or G.real_bf16_support(self.cap):
            out.append("bf16")
        out.append("fp16")
        return out


def pair_batch(B: int, T: int, V: int, seed: int = 0) -> tuple[dict, int, int]:
    """A padded BERT pair batch (lengths uniform in [T/2, T]); same layout as ``benchmarks/step_cost.py``."""
    from step_cost import make_batch

    return make_batch(B, T, V, seed)


def build_step(S: Setup, preset: str | None = None, vocab: int | None = None, dropout: float = 0.1):
    vocab = vocab or S.vocab
    torch.manual_seed(0)
    hf = build_scratch_model(preset or S.preset, vocab, 0, nsp=True, dropout=dropout).to(S.dev)
    model = PretrainModel(hf)
    return model


class Loop:
    """The training loop's step (``alum_pretrain.train``): mask on the host -> pinned non-blocking copy ->
    autocast forward (clean + ALUM) -> scaled backward -> unscale -> clip -> step -> update."""

    def __init__(self, S: Setup, model, dtype: str, alum: ALUMConfig | None, batch_size: int, seq: int,
                 rate: float = 0.15, vocab: int | None = None):
        self.S, self.model = S, model
        self.vocab = vocab or S.vocab
        self.raw, mask_id, _ = pair_batch(batch_size, seq, self.vocab)
        self.masker = Masker(MaskingConfig(), mask_id, torch.arange(10, self.vocab), seed=0)
        self.rate = rate
        self.alum = alum
        self.step_module = PretrainStep(model, alum or ALUMConfig(alpha=0.0), nsp=True)
        self.opt = build_optimizer(model, OptimConfig(lr=1e-5), S.dev)
        self.amp = torch.autocast(S.dev.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[dtype])
        self.scaler = torch.amp.GradScaler(S.dev.type, enabled=dtype == "fp16")
        self.ids = torch.arange(batch_size)
        self.n = 0
        self.mask_seconds = 0.0
        self.premasked = None

    def masked(self):
        t0 = time.perf_counter()
        mb = self.masker(self.raw, self.rate, self.n, self.ids)
        self.mask_seconds += time.perf_counter() - t0
        return mb

    def to_device(self, mb: dict) -> dict:
        cuda = self.S.cuda
        return {k: ((v.pin_memory() if cuda else v).to(self.S.dev, non_blocking=cuda) if torch.is_tensor(v) else v)
                for k, v in mb.items() if k != "sample_ids"}

    def step(self):
        self.n += 1
        mb = self.premasked if self.premasked is not None else self.masked()
        gens = SampleNoise(0, self.n, mb["sample_ids"].to(self.S.dev)) if self.alum is not None else None
        d = self.to_device(mb)
        with self.amp:
            loss, _ = self.step_module(d, alum_on=self.alum is not None, mlm_denom=float(mb["n_masked"]),
                                       nsp_denom=float(len(self.ids)), alum_generators=gens)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.last_masked = mb["n_masked"]

    def time(self, n: int) -> float:
        self.S.sync()
        t0 = time.perf_counter()
        for _ in range(n):
            self.step()
        self.S.sync()
        return (time.perf_counter() - t0) / n


def model_flops(model, seq: int) -> tuple[float, float]:
    cfg = model.config
    emb = model.word_embeddings().weight
    n = sum(p.numel() for p in model.parameters()) - emb.numel()
    return (flops_per_token(n, cfg.num_hidden_layers, cfg.hidden_size, seq),
            decoder_flops_per_masked_token(emb.shape[1], emb.shape[0]))


def dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# ---------------------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------------------
def check_env(S: Setup) -> None:
    emit("torch", torch.__version__)
    emit("cuda_runtime", torch.version.cuda or "none")
    emit("device", S.name.replace(" ", "_"))
    if not S.cuda:
        for k in ("capability", "arch_list", "arch_ok", "bf16_real", "bf16_torch_claims"):
            emit(k, "n/a(cpu)")
        return
    arch = torch.cuda.get_arch_list()
    emit("capability", f"{S.cap[0]}.{S.cap[1]}")
    emit("arch_list", ",".join(arch))
    ok, how = G.arch_support(S.cap, arch)
    emit("arch_ok", f"{int(ok)}:{how.split(';')[0].replace(' ', '_')}",
         "1:sass_sm_XY for this card (V100 needs sm_70 in the list; ptx_ means a slow JIT start)")
    emit("bf16_real", int(G.real_bf16_support(S.cap)), "1 on A100/H100/H200; 0 on V100 (alum-train refuses bf16 there)")
    emit("bf16_torch_claims", int(torch.cuda.is_bf16_supported()), "1 even on V100: torch counts emulation")
    for mode in ("bf16", "fp16", "tf32", "fp32"):
        peak = peak_flops_for(S.name, mode)
        emit(f"peak_tflops_{mode}", "unknown" if peak is None else round(peak / 1e12, 1))


def check_throughput(S: Setup, results: dict) -> None:
    for dtype in S.dtypes():
        for mode in ("eager", "compile"):
            model = build_step(S)
            if mode == "compile":
                model.base.encoder.compile(**({"backend": "eager"} if S.smoke else {}))
            enc_flops, dec_flops = model_flops(model, S.seq)
            peak = peak_flops_for(S.name, math_mode(dtype)) if S.cuda else None
            times = {}
            for kind, alum in (("standard", None), ("alum", ALUMConfig(k_steps=1)), ("alum_k2", ALUMConfig(k_steps=2))):
                loop = Loop(S, model, dtype, alum, S.batch, S.seq)
                loop.time(S.warmup)
                graphs0 = dynamo_graphs()
                times[kind] = loop.time(S.steps)
                if mode == "compile":
                    emit(f"recompiles_{kind}_{dtype}", dynamo_graphs() - graphs0,
                         "0 (a steady-state recompile means shapes or guards change per step)")
                tag = f"{kind}_{dtype}_{mode}"
                padded = S.batch * S.seq
                if kind != "alum_k2":
                    emit(f"tokens_per_s_{tag}", round(padded / times[kind]))
                    units = 1.0 if kind == "standard" else 8 / 3
                    if peak:
                        m = mfu(padded, float(loop.last_masked), times[kind], flops_per_padded_token=enc_flops,
                                decoder_flops_per_masked=dec_flops, step_units=units, peak=peak, world_size=1)
                        emit(f"mfu_{tag}", m, ">= 0.35 standard / >= 0.30 ALUM on H100/H200 bf16 eager; compile higher"
                             if kind == "standard" and dtype == "bf16" and mode == "eager" else None)
                    else:
                        emit(f"mfu_{tag}", "n/a(no peak for this device)")
                results[tag] = times[kind]
            if mode == "compile":
                emit(f"compile_graphs_{dtype}", dynamo_graphs(), "a handful (one per encoder call signature)")
            emit(f"alum_over_standard_{dtype}_{mode}", times["alum"] / times["standard"],
                 "<= 2.75 (compute floor 8/3 = 2.67)")
            emit(f"ascent_ms_{dtype}_{mode}", 1e3 * (times["alum_k2"] - times["alum"]),
                 "about 2/3 of a standard step (one forward + an input-only backward)")
            del model
            if S.cuda:
                torch.cuda.empty_cache()
    for mode in ("eager", "compile"):
        if f"standard_bf16_{mode}" in results and f"standard_fp16_{mode}" in results:
            emit(f"fp16_over_bf16_standard_{mode}", results[f"standard_fp16_{mode}"] / results[f"standard_bf16_{mode}"],
                 "about 1.0-1.1 (fp16 adds the GradScaler's inf check)")
            emit(f"fp16_over_bf16_alum_{mode}", results[f"alum_fp16_{mode}"] / results[f"alum_bf16_{mode}"])


def check_host(S: Setup) -> None:
    dtype = S.dtypes()[0]
    model = build_step(S)
    loop = Loop(S, model, dtype, None, S.batch, S.seq)
    loop.time(S.warmup)
    loop.mask_seconds = 0.0
    n = max(S.steps, 3)
    with_masking = loop.time(n)
    emit("host_mask_ms_per_step", 1e3 * loop.mask_seconds / n,
         f"< 10 for {S.batch} x {S.seq} (vectorised mask_batch; the per-sample loop took ~50-80)")
    loop.premasked = loop.masked()
    premasked = loop.time(n)
    emit("gpu_idle_frac_from_masking", max(0.0, 1.0 - premasked / with_masking),
         "< 0.05 (masking hides behind the previous step's GPU work)")
    if not S.cuda:
        emit("host_syncs_standard_step", "n/a(cpu)")
        emit("host_syncs_alum_step", "n/a(cpu)")
        return
    loop.premasked = None
    for kind, alum in (("standard", None), ("alum", ALUMConfig(k_steps=1))):
        lp = Loop(S, model, dtype, alum, S.batch, S.seq)
        lp.time(S.warmup)
        S.sync()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                lp.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
        where = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})
        emit(f"host_syncs_{kind}_step", len(syncs),
             "0-2 per optimizer step, none per forward (fp16: the GradScaler's inf check)")
        emit(f"host_sync_sites_{kind}_step", ",".join(where) or "none")


def check_ascent(S: Setup) -> None:
    """fp16 vs fp32 first ascent step on the same weights, batch and random start."""
    model = build_step(S, dropout=0.0).eval()
    raw, mask_id, _ = pair_batch(S.batch, S.seq, S.vocab, seed=1)
    mb = Masker(MaskingConfig(), mask_id, torch.arange(10, S.vocab), seed=0)(raw, 0.15, 0, torch.arange(S.batch))
    d = {k: v.to(S.dev) if torch.is_tensor(v) else v for k, v in mb.items() if k != "sample_ids"}
    cfg = ALUMConfig(k_steps=1)

    def run(dtype):
        inputs = []
        ctx = torch.autocast(S.dev.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with ctx:
            e = model.embed(d["input_ids"], d["token_type_ids"])

            def heads(x):
                inputs.append(x.detach().float().clone())
                return model.heads_from_embeds(x, d["attention_mask"], d["token_type_ids"], d["masked_pos"], True)

            with torch.no_grad():
                mlm, nsp = heads(e)
            # A clean target the model does not already predict (what dropout provides in training): at
            # delta ~ 1e-5 the divergence to the model's own prediction is flat to first order, so the fp32
            # direction would be rounding noise and no precision could match it.
            g = torch.Generator(device=S.dev).manual_seed(7)
            clean = (mlm.float() + 3.0 * torch.randn(mlm.shape, generator=g, device=S.dev), nsp)
            inputs.clear()
            gens = SampleNoise(0, 0, torch.arange(S.batch, device=S.dev))
            alum_regularizer(heads, e, clean, cfg, pad_mask=d["attention_mask"].bool(), generator=gens)
        return inputs[1] - inputs[0]  # delta_1 - delta_0 (the ascent step), (B, T, H)

    real = d["attention_mask"].bool()
    b = run(None)[real]
    emit("ascent_fp32_zero_frac", float((b == 0).float().mean()), "0")
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        if name == "bf16" and name not in S.dtypes():
            continue
        a = run(dtype)[real]
        emit(f"ascent_{name}_zero_frac", float((a == 0).float().mean()),
             f"< 0.01 (a large fraction = the {name} ascent signal was rounded or underflowed to zero)")
        cos = float(torch.nn.functional.cosine_similarity(a.reshape(1, -1).double(), b.reshape(1, -1).double()))
        emit(f"ascent_{name}_cos_vs_fp32", cos, f"> 0.9 (the {name} ascent moves delta the way fp32 does)")


def check_memory(S: Setup) -> None:
    from launch.spec import load_preset

    for name in ("bert-base-scratch", "roberta-base-continual", "roberta-large-continual"):
        p = load_preset(name)
        micro = p["resources"]["max_micro_batch"]
        seq = p["config"]["data"]["max_seq_len"]
        preset = p["config"]["model"]["preset"]
        vocab = 30522 if preset == "base" and "bert" in name else 50265
        if S.smoke:
            micro, seq, preset, vocab = 2, S.seq, S.preset, S.vocab
        model = build_step(S, preset=preset, vocab=vocab)
        loop = Loop(S, model, "fp16", ALUMConfig(k_steps=1), micro, seq, rate=0.25, vocab=vocab)
        if S.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(S.dev)
        loop.time(1)
        if S.cuda:
            gib = torch.cuda.max_memory_allocated(S.dev) / 2**30
            emit(f"peak_mem_gib_{name}", round(gib, 2), f"< 30 (fits the preset's 32 GB V100 at micro-batch {micro} x {seq})")
        else:
            emit(f"peak_mem_gib_{name}", "n/a(cpu)")
        del model, loop
        if S.cuda:
            torch.cuda.empty_cache()


def make_databin(S: Setup) -> Path:
    databin = S.work / "data-bin"
    if (databin / "manifest.json").exists():
        return databin
    from alum_pretrain.demo import stdlib_documents, write_text_corpus
    from data_prep import PrepConfig, prepare

    corpus = write_text_corpus(stdlib_documents(max_docs=60 if S.smoke else 400), S.work / "corpus.txt")
    cfg = PrepConfig(inputs=[str(corpus)], format="text", out=databin, train_tokenizer="wordpiece",
                     vocab_size=600 if S.smoke else 4000, lowercase=True, shards=1, valid_fraction=0.05, seed=1, progress=False)
    prepare(cfg, command=["gpu_check"])
    return databin


def _train_cfg(S: Setup, databin: Path, out: Path, steps: int):
    from alum_pretrain.config import parse_config
    from alum_pretrain.engine.config import TrainConfig

    precision = S.dtypes()[0] if S.cuda else "fp32"
    return parse_config(TrainConfig, [
        f"--data.path={databin}", f"--train.output_dir={out}", f"--train.max_steps={steps}", "--model.preset=tiny",
        "--data.max_seq_len=32", "--train.batch_size=8", "--train.log_every=1", "--train.progress=false",
        "--train.eval_every=0", "--train.save_every=0", "--alum.start_step=2", f"--train.precision={precision}",
        f"--train.device={S.dev.type}", "--train.num_workers=0"], prog="gpu_check")


def check_roundtrip(S: Setup) -> None:
    """alum-train in this process: SIGUSR1 after 3 logged steps -> checkpoint + stop; rerun -> resume -> done."""
    import threading

    from alum_pretrain.train import run_training

    databin = make_databin(S)
    out = S.work / "run"
    steps = 8 if S.smoke else 40
    log = out / "log.jsonl"
    done = threading.Event()

    def signal_after_three_steps():
        while not done.is_set():
            # 3 *training* records (the log also holds the step-0 validation record)
            if log.exists() and sum('"kind": "valid"' not in x for x in log.read_text().splitlines()) >= 3:
                os.kill(os.getpid(), signal.SIGUSR1)  # as SLURM's --signal does before the time limit
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=signal_after_three_steps, daemon=True)
    watcher.start()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the run's console lines: stdout is for figures only
            first = run_training(_train_cfg(S, databin, out, steps))
    finally:
        done.set()
    ckpts = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    emit("sigusr1_stopped", int(bool(first["stopped"]) and not first["completed"]), "1 (saved and stopped for a requeue)")
    emit("sigusr1_saved_step", ckpts[-1] if ckpts else "none", f"a step between 3 and {steps - 1}")
    if not ckpts:
        raise RuntimeError("no checkpoint after SIGUSR1")
    with contextlib.redirect_stdout(sys.stderr):
        second = run_training(_train_cfg(S, databin, out, steps))
    emit("resume_completed", int(second["completed"] and (out / "COMPLETED").exists()), "1 (resumed and completed)")
    records = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    steps_logged = [int(x["step"]) for x in records if x.get("kind", "train") == "train"]
    emit("resume_steps_each_once", int(steps_logged == list(range(1, steps + 1))), "1")
    emit("resume_losses_finite", int(all(math.isfinite(x["loss"]) for x in records if "loss" in x)), "1")

    # export parity: the device-trained checkpoint, exported, against the checkpoint model, both on CPU
    from transformers import AutoModelForPreTraining

    from alum_pretrain.engine.checkpoint import latest_checkpoint
    from alum_pretrain.export import export
    from alum_pretrain.models import load_model

    ck = latest_checkpoint(out)
    hf_dir = S.work / "export"
    export(str(ck), str(hf_dir))
    ref = load_model(ck / "model").eval()
    exported = AutoModelForPreTraining.from_pretrained(str(hf_dir)).eval()
    g = torch.Generator().manual_seed(0)
    V = ref.word_embeddings().weight.shape[0]
    ids = torch.randint(5, V, (2, 24), generator=g)
    attn = torch.ones_like(ids)
    attn[1, 18:] = 0
    tt = torch.zeros_like(ids)
    with torch.no_grad():
        mlm, _ = ref(ids, attn, tt)
        out_hf = exported(input_ids=ids, attention_mask=attn, token_type_ids=tt)
    logits = out_hf.prediction_logits.reshape(-1, out_hf.prediction_logits.shape[-1])
    emit("export_parity_max_abs_diff", float((mlm - logits).abs().max()), "< 1e-4 (CPU, float32)")


def check_ddp(S: Setup) -> None:
    import socket

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if S.cuda else "gloo"
    kw = {"device_id": S.dev} if S.cuda else {}
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, **kw)
    try:
        model = build_step(S)
        loop = Loop(S, model, S.dtypes()[0], ALUMConfig(k_steps=1), S.batch, S.seq)
        loop.step_module = DDP(loop.step_module, device_ids=[S.dev.index] if S.cuda else None,
                               broadcast_buffers=False)
        loop.time(1)
        t = loop.time(max(1, S.steps))
        finite = all(torch.isfinite(p).all() for p in model.parameters())
        emit(f"ddp_{backend}_alum_step", "ok" if finite else "non-finite weights", "ok")
        emit(f"ddp_{backend}_step_ms", 1e3 * t)
    finally:
        dist.destroy_process_group()


def check_fairseq(S: Setup) -> None:
    import importlib.util

    if importlib.util.find_spec("fairseq") is None:
        emit("fairseq_update", "skipped(fairseq not installed)")
        return
    from alum_pretrain.config import config_from_dict
    from alum_pretrain.engine.config import TrainConfig
    from launch.spec import Resources, fairseq_train_argv

    databin = make_databin(S)
    out = S.work / "fairseq"
    cfg = config_from_dict(TrainConfig, {
        "data": {"path": str(databin), "mode": "blocks", "nsp": False, "max_seq_len": 32},
        "model": {"preset": "tiny"}, "alum": {"alpha": 10.0, "start_step": 0},
        "train": {"output_dir": str(out), "max_steps": 2, "batch_size": 8, "precision": "fp16" if S.cuda else "fp32",
                  "save_every": 1000, "eval_every": 0, "log_every": 1, "num_workers": 0},
    })
    argv = fairseq_train_argv(cfg, Resources(nodes=1, gpus_per_node=1 if S.cuda else 0))
    emit("fairseq_precision_flag", "--amp" if "--amp" in argv else ("--fp16" if "--fp16" in argv else "none"),
         "--amp on GPU (fp16 + ALUM); none on CPU")
    # fairseq-train's own entry point, in this process (one start-up less); its log goes to stderr
    import io
    import logging

    with contextlib.redirect_stdout(sys.stderr):  # importing fairseq may print (e.g. DeepSpeed's accelerator note)
        from fairseq_cli.train import cli_main

    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    logging.getLogger().addHandler(handler)
    old_argv = sys.argv
    sys.argv = ["fairseq-train", *argv, "--disable-validation", "--no-save"]
    status = 0
    try:
        with contextlib.redirect_stdout(sys.stderr):
            cli_main()
    except SystemExit as exc:
        status = exc.code or 0
    finally:
        sys.argv = old_argv
        logging.getLogger().removeHandler(handler)
    text = buf.getvalue()
    ok = status == 0 and "num_updates" in text
    emit("fairseq_update", "ok" if ok else f"error(status {status})", "ok (two ALUM updates)")
    if not ok:
        print(text[-2000:], file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU: the same code paths in < 2 minutes")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections (default: all of {SECTIONS})")
    p.add_argument("--batch-size", type=int, default=128, help="GPU micro-batch for the throughput figures (default 128)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per figure on GPU (default 8)")
    p.add_argument("--work", default="", help="scratch folder for the data-bin, runs and exports (default: a temp dir)")
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        p.error(f"--only: unknown section(s) {bad}; choose from {', '.join(SECTIONS)}")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    S = Setup(args)
    if S.smoke:
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    emit("date_utc", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    emit("mode", "cpu-smoke" if S.smoke else "gpu")
    results: dict = {}
    runners = {"env": lambda: check_env(S), "throughput": lambda: check_throughput(S, results),
               "host": lambda: check_host(S), "ascent": lambda: check_ascent(S), "memory": lambda: check_memory(S),
               "roundtrip": lambda: check_roundtrip(S), "ddp": lambda: check_ddp(S), "fairseq": lambda: check_fairseq(S)}
    for name in SECTIONS:
        if name in only:
            with section(name):
                runners[name]()
    emit("total_seconds", round(time.perf_counter() - t0, 1), "<= 480 on one H100/H200; <= 120 with --cpu-smoke")
    return 0


if __name__ == "__main__":
    sys.exit(main())
