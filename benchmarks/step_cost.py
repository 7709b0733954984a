"""Cost of one training step, side by side on the same model and batch.

    python benchmarks/step_cost.py                      # GPU: BERT-base, seq 128, bf16; CPU: mini, fp32
    python benchmarks/step_cost.py --preset base --batch-size 32 --device cpu

Times three steps (masking on the host + host->device copy, forward, backward, clip, AdamW step each; fp16
adds the GradScaler's unscale/step/update as in alum-train) on a padded sentence-pair batch, interleaved in
rounds so that drift in machine load hits all three alike, and reports the median (on CPU of every step, on
GPU, whose steps are queued asynchronously, of the per-round means):

(a) ``hf``        HF ``BertForPreTraining(..., labels=, next_sentence_label=)``: full (B, T, V) logits
(b) ``standard``  the project's step (:class:`alum_pretrain.engine.step.PretrainStep`, ALUM off): the LM
                  head on the masked positions only
(c) ``alum``      the project's ALUM step, K = 1 (clean + noisy + adversarial forwards, input-only ascent
                  backward, one backward through two graphs; floor 8/3 = 2.67x a standard step)

Then (unless ``--no-compile``) ``train.compile``: the standard and the ALUM step, each eager and with the
encoder layers compiled (:func:`alum_pretrain.families.compile_encoder`, as ``--train.compile true``), from
the same weights, on the same batches and masks, dropout 0 (compiled dropout draws other random numbers).
The first compiled step is timed alone (``compile_first_step_s_*``: tracing + code generation); the
losses of every timed step must agree within 1e-5 (``compile_losses_max_diff``; exit 1 otherwise).
``compile_speedup_standard`` / ``compile_speedup_alum``: eager / compiled median step time;
``alum_over_standard_compiled``: the ALUM/standard ratio with both compiled.

``--phases``: where an ALUM step's time goes - the standard step's forward and backward, and the ALUM step
cut into its phases (clean forward, random start, noisy forward, input-only ascent backward with the
divergence, projected step, adversarial forward, symmetric KL, backward through both graphs), each the
median over ``--phase-steps`` steps of the library functions the step calls, in the step's order, on the
benchmark's model and batch (optimizer step excluded); lines ``phase_ms_<name>=`` and
``phases_alum_over_standard=`` (the ratio without the optimizer step).

Goals: ``standard_speedup_vs_hf`` >= 1.3 and ``alum_over_standard`` <= 2.75.  The last lines are
``standard_speedup_vs_hf=``, ``alum_over_standard=`` and (with compile) ``compile_speedup_standard=``,
``compile_speedup_alum=``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alum_pretrain.adversarial import ALUMConfig  # noqa: E402
from alum_pretrain.engine.optim import build_optimizer  # noqa: E402
from alum_pretrain.engine.config import OptimConfig  # noqa: E402
from alum_pretrain.engine.step import Masker, PretrainStep  # noqa: E402
from alum_pretrain.families import compile_encoder  # noqa: E402
from alum_pretrain.masking import SampleNoise  # noqa: E402
from alum_pretrain.masking import MaskingConfig  # noqa: E402
from alum_pretrain.models import PretrainModel, build_scratch_model  # noqa: E402


def make_batch(B: int, T: int, V: int, seed: int) -> dict:
    """A padded BERT pair batch: [CLS] A [SEP] B [SEP] [PAD]..., row lengths uniform in [T/2, T].

    Padding matters for timing: with an all-ones attention mask HF drops the mask and SDPA may take its
    fastest kernel, which real (padded) sentence-pair batches never get."""
    g = torch.Generator().manual_seed(seed)
    cls, sep, pad, mask = 2, 3, 0, 4
    ids = torch.randint(10, V, (B, T), generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)  # (B,)
    pos = torch.arange(T)[None, :]
    cut = (lengths // 2)[:, None]  # end of segment A
    ids[:, 0] = cls
    ids = torch.where(pos == cut, torch.full_like(ids, sep), ids)
    ids = torch.where(pos == lengths[:, None] - 1, torch.full_like(ids, sep), ids)
    attn = (pos < lengths[:, None]).long()
    ids = ids.masked_fill(attn == 0, pad)
    tt = ((pos > cut) & (attn == 1)).long()
    special = (ids == cls) | (ids == sep) | (ids == pad)
    return {"input_ids": ids, "attention_mask": attn, "token_type_ids": tt,
            "special_mask": special, "continuation": torch.zeros(B, T, dtype=torch.bool),
            "next_sentence_label": torch.randint(0, 2, (B,), generator=g)}, mask, pad


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--preset", default="base" if cuda else "mini", help="model size preset (models.PRESETS)")
    p.add_argument("--batch-size", type=int, default=64 if cuda else 8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab", type=int, default=30522, help="vocabulary size (BERT: 30522)")
    p.add_argument("--mask-rate", type=float, default=0.15)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16" if cuda else "fp32",
                   help="fp32, bf16 autocast, or fp16 autocast with a dynamic GradScaler (as alum-train)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median reported)")
    p.add_argument("--steps", type=int, default=10 if cuda else 3, help="steps per method per round")
    p.add_argument("--warmup", type=int, default=3 if cuda else 1)
    p.add_argument("--no-compile", action="store_true", help="skip the train.compile comparison")
    p.add_argument("--phases", action="store_true", help="also time the phases of the ALUM step (docstring)")
    p.add_argument("--phase-steps", type=int, default=20, help="steps timed per phase with --phases")
    p.add_argument("--compile-steps", type=int, default=10 if cuda else 4,
                   help="timed steps per variant and round in the compile comparison")
    args = p.parse_args(argv)

    dev = torch.device(args.device)
    torch.manual_seed(0)
    batch, mask_id, pad_id = make_batch(args.batch_size, args.seq_len, args.vocab, seed=0)
    hf = build_scratch_model(args.preset, args.vocab, pad_id, nsp=True, dropout=0.1).to(dev)
    model = PretrainModel(hf)
    opt = build_optimizer(model, OptimConfig(lr=1e-5), dev)
    masker = Masker(MaskingConfig(), mask_id, torch.arange(10, args.vocab), seed=0)
    B = args.batch_size
    sample_ids = torch.arange(B)
    step_std = PretrainStep(model, ALUMConfig(alpha=0.0), nsp=True)
    step_alum = PretrainStep(model, ALUMConfig(k_steps=1), nsp=True)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    amp = torch.autocast(dev.type, dtype=dtype) if dtype is not None else None
    scaler = torch.amp.GradScaler(dev.type, enabled=args.precision == "fp16")
    counter = {"step": 0}

    def masked_batch():
        """Masking + host->device copy of this step, inside the timing (as in the training loop)."""
        counter["step"] += 1
        mb = masker(batch, args.mask_rate, counter["step"], sample_ids)
        cuda_dev = dev.type == "cuda"
        d = {k: ((v.pin_memory() if cuda_dev else v).to(dev, non_blocking=cuda_dev) if torch.is_tensor(v) else v)
             for k, v in mb.items() if k != "sample_ids"}
        return d, float(mb["n_masked"])

    def fwd(fn):
        if amp is None:
            return fn()
        with amp:
            return fn()

    def hf_step():
        d, _ = masked_batch()
        out = fwd(lambda: hf(input_ids=d["input_ids"], attention_mask=d["attention_mask"],
                             token_type_ids=d["token_type_ids"], labels=d["labels"],
                             next_sentence_label=d["next_sentence_label"]))
        scaler.scale(out.loss).backward()

    def std_step():
        d, N = masked_batch()
        loss, _ = fwd(lambda: step_std(d, alum_on=False, mlm_denom=N, nsp_denom=float(B)))
        scaler.scale(loss).backward()

    def alum_step():
        d, N = masked_batch()
        gens = SampleNoise(0, counter["step"], sample_ids.to(dev))
        loss, _ = fwd(lambda: step_alum(d, alum_on=True, mlm_denom=N, nsp_denom=float(B), alum_generators=gens))
        scaler.scale(loss).backward()

    def timed(fn, n) -> list[float]:
        """Seconds of each of ``n`` steps (on CPU every step is a sample; on GPU, whose steps are queued
        asynchronously, the mean of the ``n``)."""
        sync = dev.type == "cuda"
        if sync:
            torch.cuda.synchronize()
        out, t = [], time.perf_counter()
        for _ in range(n):
            fn()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            if not sync:
                out.append(time.perf_counter() - t)
                t = time.perf_counter()
        if sync:
            torch.cuda.synchronize()
            out = [(time.perf_counter() - t) / n]
        return out

    methods = {"hf": hf_step, "standard": std_step, "alum": alum_step}
    for fn in methods.values():
        timed(fn, args.warmup)
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(args.rounds):
        for k, fn in methods.items():
            times[k].extend(timed(fn, args.steps))
    med = {k: statistics.median(v) for k, v in times.items()}

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    n_params = sum(p.numel() for p in model.parameters())
    real = int(batch["attention_mask"].sum())
    print(f"device {name}; preset {args.preset} ({n_params / 1e6:.1f}M parameters, vocab {args.vocab}); "
          f"padded pair batch {B} x seq {args.seq_len} ({real / (B * args.seq_len):.0%} real tokens); mask rate "
          f"{args.mask_rate:.0%}, masking and host->device copy inside the timing; {args.precision}"
          f"{' + GradScaler' if args.precision == 'fp16' else ''}; median over {args.rounds} rounds x {args.steps} steps "
          f"({'per round' if dev.type == 'cuda' else 'every step a sample'})")
    tokens = B * args.seq_len  # padded: what the encoder computes on
    print(f"{'step':<10} {'ms/step':>10} {'tokens/s':>12} {'vs standard':>12}")
    for k in methods:
        print(f"{k:<10} {1e3 * med[k]:>10.1f} {tokens / med[k]:>12.0f} {med[k] / med['standard']:>11.2f}x")
    print("spread (min-max ms): " + ", ".join(f"{k} {1e3 * min(v):.1f}-{1e3 * max(v):.1f}" for k, v in times.items()))
    print(f"standard_speedup_vs_hf={med['hf'] / med['standard']:.3f}")
    print(f"alum_over_standard={med['alum'] / med['standard']:.3f}")
    if args.phases:
        phase_figures(args, dev, model, step_alum.alum, masked_batch, fwd)
    if args.no_compile:
        return 0
    return compile_figures(args, dev, batch, mask_id, pad_id, masker, amp)


def phase_figures(args, dev, model, cfg: ALUMConfig, masked_batch, fwd) -> None:
    """``--phases`` (module docstring): the standard and the ALUM step cut where their time goes."""
    from alum_pretrain.adversarial import ascent_step, init_delta, perturb
    from alum_pretrain.divergence import get_divergence
    from alum_pretrain.objective import Normalizers, pretrain_objective
    from alum_pretrain.precision import scale_free_input_grad

    divergence = get_divergence(cfg.divergence)
    B = args.batch_size
    sample_ids = torch.arange(B, device=dev)
    times: dict[str, list[float]] = {}
    clock = {"t": 0.0}

    def mark(name=None):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if name is not None:
            times.setdefault(name, []).append(now - clock["t"])
        clock["t"] = now

    def heads(d, e, nsp):
        return model.heads_from_embeds(e, d["attention_mask"], d["token_type_ids"], d["masked_pos"], nsp)

    def task_loss(d, e, logits, N):
        """The step's own MLM + NSP loss (:func:`alum_pretrain.objective.pretrain_objective`, ALUM off)."""
        return pretrain_objective(lambda x, nsp: heads(d, x, nsp), e, logits, mlm_targets=d["mlm_targets"],
                                  nsp_labels=d["next_sentence_label"], pad_mask=d["attention_mask"].bool(),
                                  alum=cfg, alum_on=False, norm=Normalizers(mlm=N, nsp=float(B)))[0]

    for i in range(args.warmup + args.phase_steps):
        d, N = masked_batch()
        pad = d["attention_mask"].bool()
        mark()
        e = fwd(lambda: model.embed(d["input_ids"], d["token_type_ids"]))
        loss = task_loss(d, e, fwd(lambda: heads(d, e, True)), N)
        mark("standard_forward")
        loss.backward()
        mark("standard_backward")
        model.zero_grad(set_to_none=True)
        d, N = masked_batch()
        mark()
        e = fwd(lambda: model.embed(d["input_ids"], d["token_type_ids"]))
        mlm, nsp = fwd(lambda: heads(d, e, True))
        loss = task_loss(d, e, (mlm, nsp), N)
        mark("alum_clean_forward")
        delta = init_delta(e, pad, cfg.noise_std, SampleNoise(0, i, sample_ids)).requires_grad_(True)
        mark("alum_random_start")
        (adv, _) = fwd(lambda: heads(d, perturb(e.detach(), delta), False))
        mark("alum_noisy_forward")
        g, _ = scale_free_input_grad([adv], lambda o: divergence(o[0], mlm.detach()), delta)
        mark("alum_ascent_backward")
        delta = ascent_step(delta.detach(), g, cfg, pad).detach()
        mark("alum_ascent_step")
        (adv, _) = fwd(lambda: heads(d, perturb(e, delta), False))
        mark("alum_adversarial_forward")
        loss = loss + cfg.alpha * divergence(adv, mlm)
        mark("alum_symmetric_kl")
        loss.backward()
        mark("alum_backward_both_graphs")
        model.zero_grad(set_to_none=True)
        if i < args.warmup:
            times.clear()
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"phase_ms_{k}={v:.1f}")
    std = med["standard_forward"] + med["standard_backward"]
    alum = sum(v for k, v in med.items() if k.startswith("alum_"))
    print(f"phases_alum_over_standard={alum / std:.3f} (no optimizer step; median of {args.phase_steps} steps each)")


def compile_figures(args, dev, batch, mask_id, pad_id, masker, amp) -> int:
    """Eager vs ``train.compile`` for the standard and the ALUM step (module docstring); prints the lines."""
    B = args.batch_size
    sample_ids = torch.arange(B)
    torch.manual_seed(1)
    hf0 = build_scratch_model(args.preset, args.vocab, pad_id, nsp=True, dropout=0.0).to(dev)
    variants = {}
    for kind, alum in (("standard", ALUMConfig(alpha=0.0)), ("alum", ALUMConfig(k_steps=1))):
        for compiled in (False, True):
            hf = copy.deepcopy(hf0)
            if compiled:
                compile_encoder(hf)
            model = PretrainModel(hf)
            variants[(kind, compiled)] = {"step": PretrainStep(model, alum, nsp=True), "model": model,
                                          "opt": build_optimizer(model, OptimConfig(lr=1e-5), dev),
                                          "n": 0, "losses": [], "times": []}

    def one_step(v, kind):
        v["n"] += 1
        mb = masker(batch, args.mask_rate, v["n"], sample_ids)
        d = {k: (x.to(dev) if torch.is_tensor(x) else x) for k, x in mb.items() if k != "sample_ids"}
        gens = SampleNoise(0, v["n"], sample_ids.to(dev)) if kind == "alum" else None
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with amp if amp is not None else contextlib.nullcontext():
            loss, _ = v["step"](d, alum_on=kind == "alum", mlm_denom=float(mb["n_masked"]), nsp_denom=float(B),
                                alum_generators=gens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(v["model"].parameters(), 1.0)
        v["opt"].step()
        v["opt"].zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t, loss.item()

    first = {}
    for (kind, compiled), v in variants.items():  # step 1 alone: compilation happens here
        first[(kind, compiled)] = one_step(v, kind)[0]
        for _ in range(args.warmup):
            one_step(v, kind)
    for _ in range(args.rounds):  # interleaved: machine load hits all four alike
        for (kind, compiled), v in variants.items():
            for _ in range(args.compile_steps):
                dt, loss = one_step(v, kind)
                v["times"].append(dt)
                v["losses"].append(loss)
    med = {k: statistics.median(v["times"]) for k, v in variants.items()}
    diff = max(abs(a - b) for kind in ("standard", "alum")
               for a, b in zip(variants[(kind, False)]["losses"], variants[(kind, True)]["losses"]))
    print(f"compile (dropout 0, {args.rounds} rounds x {args.compile_steps} steps, median ms/step): " + ", ".join(
        f"{k} {'compiled' if c else 'eager'} {1e3 * m:.1f}" for (k, c), m in med.items()))
    for kind in ("standard", "alum"):
        print(f"compile_first_step_s_{kind}={first[(kind, True)]:.2f} (eager first step {first[(kind, False)]:.2f} s)")
    print(f"compile_losses_max_diff={diff:.2e} over {len(variants[('alum', True)]['losses'])} timed steps each")
    print(f"alum_over_standard_eager_dropout0={med[('alum', False)] / med[('standard', False)]:.3f}")
    print(f"alum_over_standard_compiled={med[('alum', True)] / med[('standard', True)]:.3f}")
    print(f"compile_speedup_standard={med[('standard', False)] / med[('standard', True)]:.3f}")
    print(f"compile_speedup_alum={med[('alum', False)] / med[('alum', True)]:.3f}")
    if diff > 1e-5:
        print(f"FAIL: compiled and eager losses differ by {diff:.2e} (> 1e-5)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
