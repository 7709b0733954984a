"""Rank-0 run logger: one object writes the console line, ``log.jsonl`` and TensorBoard.

``log.jsonl``: one JSON object per log step, at least ``step, loss, mlm, nsp, adv, mask_rate, lr`` (plus
``grad_norm, tokens_per_s, alum`` and, on GPU, ``mfu``); validation records carry ``"kind": "valid"``
with ``valid_mlm`` / ``valid_acc``.  Values are plain floats: the caller does the (single) host sync.
Ranks other than 0 get a logger whose methods do nothing.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_file
from . import distributed as D

LOG = logging.getLogger("alum_pretrain.train")

# Dense peak FLOP/s per (GPU, math mode), from NVIDIA's datasheets (no sparsity), for MFU.  The first
# matching name fragment wins, so the specific variants come before the generic ones ("H100 PCIe" before
# "H100" = SXM).  Math modes: "bf16"/"fp16" tensor cores (autocast), "tf32" (fp32 weights with TF32
# matmuls allowed), "fp32" (plain fp32 FMA).  A missing entry means the GPU cannot run that mode at speed
# (V100: no bf16, no TF32) and no MFU is reported.  Unknown GPUs report no MFU.
_PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    ("H200 NVL", {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12}),  # SXM5 ("H100 80GB HBM3")
    ("H200", {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12}),  # SXM
    ("A100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("V100S", {"fp16": 130e12, "fp32": 16.4e12}),
    ("V100-PCIE", {"fp16": 112e12, "fp32": 14e12}),
    ("V100 PCIe", {"fp16": 112e12, "fp32": 14e12}),
    ("V100", {"fp16": 125e12, "fp32": 15.7e12}),  # SXM2 (DGX-2)
    ("L4", {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30e12}),
    ("A6000", {"bf16": 155e12, "fp16": 155e12, "tf32": 77e12, "fp32": 38.7e12}),
    ("4090", {"bf16": 165e12, "fp16": 165e12, "tf32": 82.6e12, "fp32": 82.6e12}),
)


def math_mode(precision: str, tf32: bool | None = None) -> str:
    """The tensor-core mode a run's matmuls use: ``bf16``/``fp16`` under autocast; for ``fp32``, ``tf32``
    when TF32 matmuls are allowed (``torch.get_float32_matmul_precision() != "highest"``), else ``fp32``."""
    if precision in ("bf16", "fp16"):
        return precision
    if precision != "fp32":
        raise ValueError(f"precision {precision!r}: expected fp32, bf16 or fp16")
    if tf32 is None:
        tf32 = torch.get_float32_matmul_precision() != "highest"
    return "tf32" if tf32 else "fp32"


def peak_flops_for(name: str, mode: str) -> float | None:
    """Dense peak FLOP/s of the GPU called ``name`` (``torch.cuda.get_device_name``) in ``mode``, or None."""
    for key, table in _PEAK_FLOPS:
        if key.lower() in name.lower():
            return table.get(mode)
    return None


def peak_flops(device: torch.device, precision: str = "bf16") -> float | None:
    """Peak FLOP/s of ``device`` for a run at ``precision`` (fp32 / bf16 / fp16); None on CPU or unknown GPUs."""
    if device.type != "cuda":
        return None
    mode = math_mode(precision)
    if mode == "tf32" and torch.cuda.get_device_capability(device) < (8, 0):
        mode = "fp32"  # TF32 needs Ampere or newer; the setting is ignored below
    return peak_flops_for(torch.cuda.get_device_name(device), mode)


def flops_per_token(n_params_non_embedding: int, num_layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token of one standard step (forward + backward = 3 forwards): 6N + attention.

    Counted per *padded* token: the encoder computes on every position of the (B, T) batch, padding
    included.  The tied MLM decoder (hidden x vocab, shared with the word embeddings and so not in N) runs
    on the masked positions only: see :func:`decoder_flops_per_masked_token`."""
    return 6.0 * n_params_non_embedding + 12.0 * num_layers * hidden * seq_len


def decoder_flops_per_masked_token(hidden: int, vocab: int) -> float:
    """Training FLOPs of the tied MLM decoder per masked token: 6 * hidden * vocab (forward 2HV, backward 4HV)."""
    return 6.0 * hidden * vocab


def mfu(padded_tokens: float, masked_tokens: float, seconds: float, *, flops_per_padded_token: float,
        decoder_flops_per_masked: float, step_units: float, peak: float, world_size: int) -> float:
    """Model FLOPs utilisation: executed model FLOPs / (elapsed time x peak x GPUs).

    ``padded_tokens``/``masked_tokens``: totals over all ranks in ``seconds``; ``step_units``: executed
    forward-equivalents relative to a standard step (1 = standard; ALUM K steps = (6 + 2K) / 3)."""
    flops = (padded_tokens * flops_per_padded_token + masked_tokens * decoder_flops_per_masked) * step_units
    return flops / (max(seconds, 1e-9) * peak * world_size)


class RunLogger:
    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.output_dir = Path(output_dir)
        self._fh = None
        self._tb = None
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.output_dir / "log.jsonl", "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.output_dir / "tb"))
            except ImportError:  # tensorboard is a dependency; keep training if it is broken
                LOG.warning("tensorboard not importable; TensorBoard logging is off")
        self._t0 = time.time()

    def resume_at(self, step: int) -> None:
        """Drop records logged after ``step`` by a run that was killed after its last checkpoint, so a
        resumed run's log has every step exactly once; TensorBoard purges them too."""
        if not self.enabled:
            return
        path = self.output_dir / "log.jsonl"
        self._fh.close()
        kept = [r for r in read_log(path) if int(r.get("step", 0)) <= step]
        with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in kept)
        self._fh = open(path, "a", encoding="utf-8")
        if self._tb is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb.close()
            self._tb = SummaryWriter(log_dir=str(self.output_dir / "tb"), purge_step=step + 1)

    def info(self, msg: str) -> None:
        if self.enabled:
            LOG.info(msg)

    def warning(self, msg: str, step: int) -> None:
        """A warning on the console (rank 0) and as a ``{"kind": "warning"}`` record of ``step`` in log.jsonl."""
        if self.enabled:
            LOG.warning(msg)
            self._fh.write(json.dumps({"step": step, "kind": "warning", "message": msg}) + "\n")
            self._fh.flush()

    def event(self, record: dict[str, Any]) -> None:
        """A bookkeeping record (``{"step", "kind", ...}``) in log.jsonl only: not a metric, not TensorBoard."""
        if self.enabled:
            self._fh.write(json.dumps(record) + "\n")
            self._fh.flush()

    def log(self, record: dict[str, Any], console: bool = True, write=None) -> None:
        if not self.enabled:
            return
        record = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" else v)
                  for k, v in record.items()}
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        step = int(record["step"])
        prefix = "valid/" if record.get("kind") == "valid" else "train/"
        if self._tb is not None:
            for k, v in record.items():
                if k in ("step", "kind") or not isinstance(v, float):
                    continue
                self._tb.add_scalar(prefix + k, v, step)
        if console:
            parts = [f"step {step}"] + [f"{k} {_fmt(v)}" for k, v in record.items()
                                        if k not in ("step", "kind") and isinstance(v, float)]
            line = ("valid | " if record.get("kind") == "valid" else "") + " | ".join(parts)
            (write or LOG.info)(line)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def _fmt(v: float) -> str:
    if v == 0 or 1e-3 <= abs(v) < 1e5:
        return f"{v:.4g}"
    return f"{v:.3e}"


def read_log(path: str | os.PathLike) -> list[dict]:
    """All records of a ``log.jsonl`` (skips a torn last line of a killed run)."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


class Accumulator:
    """Sums the step metrics on the device between log steps; :meth:`flush` does the one host sync.

    Averages count only steps whose value is finite: the loss terms of steps skipped for a NaN/Inf loss and
    the gradient norm of steps skipped for a NaN/Inf gradient (fp16 loss-scale overflows included) stay out
    of the means; ``nonfinite_skipped`` (and with fp16 ``overflow_skipped`` / ``loss_scale``) count them.
    """

    #: adv_dropout (with alum.log_baseline) is a contribution to the step mean like adv, so it is averaged
    #: like adv: over the steps with a finite loss.
    KEYS = ("mlm", "nsp", "adv", "delta_linf", "adv_dropout")
    #: ALUM diagnostics logged as they are, skipped steps included (that is when they matter): counts summed
    #: over the interval's ALUM micro-batches and ranks (ascent_nonfinite, adv_nonfinite) or fractions
    #: averaged over them (ascent_zero_grad_frac).
    ALUM_SUMS = ("ascent_nonfinite", "adv_nonfinite")
    ALUM_MEANS = ("ascent_zero_grad_frac",)

    def __init__(self, run: Any):
        """``run``: the :class:`~alum_pretrain.engine.setup.Run` (env, grad_accum, cfg, scaler, FLOP figures)."""
        self.run = run
        self._reset()

    def _reset(self) -> None:
        dev = self.run.env.device
        self.sums = torch.zeros(len(self.KEYS) + 1, device=dev)  # + grad-norm sum
        self.step_sums = torch.zeros(len(self.KEYS), device=dev)  # this step's micro-batches
        self.loss_steps = 0  # steps with a finite loss (the denominator of mlm/nsp/adv)
        self.grad_steps = 0  # steps with a finite gradient norm
        self.nonfinite = 0
        self.overflow = 0
        self.diag = torch.zeros(len(self.ALUM_SUMS) + len(self.ALUM_MEANS), device=dev)
        self.diag_micro = 0  # ALUM micro-batches of the interval, skipped steps included (diag's denominator)
        self.baseline_micro = 0
        self.tokens = 0
        self.padded = 0  # B x T per micro-batch: the encoder computes on padding too (MFU)
        self.masked = 0
        self.maskable = 0
        self.steps = 0
        self.alum_micro = 0
        self.alum_steps = 0
        self.t0 = time.perf_counter()

    def add(self, metrics: dict, batch: dict) -> None:
        for i, k in enumerate(self.KEYS):
            if k in metrics:
                self.step_sums[i] += metrics[k].to(self.sums.device)
        if "adv" in metrics:
            self.alum_micro += 1
            self.diag_micro += 1
            for i, k in enumerate(self.ALUM_SUMS + self.ALUM_MEANS):
                if k in metrics:
                    self.diag[i] += metrics[k].to(self.diag.device, torch.float32)
            self.baseline_micro += int("adv_dropout" in metrics)
        self.tokens += int(batch["n_tokens"])
        self.padded += batch["input_ids"].numel()  # shape metadata: no device sync
        self.masked += int(batch["n_masked"])
        self.maskable += int(batch["n_maskable"])

    def end_step(self, grad_norm: torch.Tensor, rate: float, alum_on: bool, lr: float, *, loss_ok: bool = True,
                 grad_ok: bool = True, skipped: bool = False) -> None:
        if loss_ok:
            self.sums[:-1] += self.step_sums
            self.loss_steps += 1
        elif alum_on:
            self.alum_micro -= self.run.grad_accum  # delta_linf is averaged over the kept micro-batches
        self.step_sums.zero_()
        if grad_ok:
            self.sums[-1] += grad_norm.detach().float()
            self.grad_steps += 1
        self.nonfinite += int(skipped)
        self.overflow += int(not grad_ok and not skipped)  # fp16: the GradScaler skipped the update
        self.steps += 1
        self.alum_steps += int(alum_on)
        self.rate, self.alum_on, self.lr = rate, alum_on, lr

    def flush(self, step: int) -> dict:
        run, env = self.run, self.run.env
        sums = D.all_reduce_device(env, self.sums.clone())  # mlm/nsp/adv contributions sum over ranks
        counts = D.all_reduce_cpu(env, torch.tensor([self.tokens, self.masked, self.maskable, self.alum_micro,
                                                     self.padded, self.diag_micro], dtype=torch.float64))
        s = sums.tolist()  # the host sync of this log interval
        tokens, masked, maskable, alum_micro, padded, diag_micro = counts.tolist()
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        n = max(self.steps, 1)
        nl = self.loss_steps
        # Each rank's contributions carry the factor W (DDP averages over ranks): sum / W = the global mean.
        mlm, nsp, adv = ((x / (nl * env.world_size) if nl else None) for x in s[:3])
        rec = {
            "step": step,
            "loss": mlm + nsp + run.cfg.alum.alpha * adv if nl else None,  # None (null): every step was NaN/Inf
            "mlm": mlm,
            "nsp": nsp,
            "adv": adv,
            "mask_rate": self.rate,
            "mask_frac": masked / max(maskable, 1.0),
            "lr": self.lr,
            # identical on every rank after the all-reduce; the mean over steps with a finite norm
            "grad_norm": s[-1] / (self.grad_steps * env.world_size) if self.grad_steps else None,
            "nonfinite_skipped": self.nonfinite,
            "alum": float(self.alum_on),
            "tokens_per_s": tokens / elapsed,
            "steps_per_s": self.steps / elapsed,
        }
        if run.scaler.is_enabled():
            rec["overflow_skipped"] = self.overflow
            rec["loss_scale"] = float(run.scaler.get_scale())
        if alum_micro > 0:
            rec["delta_linf"] = s[3] / alum_micro
        if diag_micro > 0:
            diag = D.all_reduce_device(env, self.diag.clone()).tolist()
            n_sum = len(self.ALUM_SUMS)
            for i, k in enumerate(self.ALUM_SUMS):
                rec[k] = diag[i]
            for i, k in enumerate(self.ALUM_MEANS):
                rec[k] = diag[n_sum + i] / diag_micro  # diag_micro is already summed over ranks
            if self.baseline_micro:
                rec["adv_dropout"] = s[4] / (nl * env.world_size) if nl else None
                if rec["adv_dropout"] is not None and adv:
                    rec["adv_share"] = (adv - rec["adv_dropout"]) / adv  # the part of R due to delta
        if run.peak_flops:
            # executed FLOPs: a standard step = 3 forward-units; ALUM = 6 + 2K (module docstring of adversarial)
            k = run.cfg.alum.k_steps
            units = (3 * (self.steps - self.alum_steps) + (6 + 2 * k) * self.alum_steps) / (3 * n)
            rec["mfu"] = mfu(padded, masked, elapsed, flops_per_padded_token=run.flops_per_token,
                             decoder_flops_per_masked=run.decoder_flops, step_units=units,
                             peak=run.peak_flops, world_size=env.world_size)
        self._reset()
        return rec


class DeltaShareWatch:
    """Tells the user, once, when ALUM's term is almost all dropout consistency rather than adversarial.

    ``adv_share = (adv - adv_dropout) / adv`` is the part of R due to delta (``adv_dropout``: R at delta = 0
    under the same dropout masks).  The native loop measures it over the first ALUM log intervals even when
    ``alum.log_baseline`` is off (:meth:`probe`: one extra no-grad forward per step there, under a forked RNG,
    so no training number changes); if it stays below ``threshold`` there, one warning says what the term
    does at this epsilon and what to change.
    """

    def __init__(self, cfg: Any, log_every: int, threshold: float = 0.01):
        self.alum = cfg.alum
        # the (partial) interval in which ALUM starts and the next full one
        self.probe_end = (self.alum.start_step // log_every + 2) * log_every
        self.threshold = threshold
        self.shares: list[float] = []
        self.done = not (self.alum.alpha > 0)

    def probe(self, step: int, alum_on: bool) -> bool:
        """Whether optimizer step ``step`` should also measure ``adv_dropout``."""
        return alum_on and not self.done and step < self.probe_end

    def observe(self, record: dict, warn) -> None:
        """Take a training record; ``warn(msg, step)`` is called at most once per run."""
        if self.done:
            return
        if record.get("adv_share") is not None:
            self.shares.append(float(record["adv_share"]))
        if self.shares and record["step"] >= self.probe_end:
            self.finish(warn, record["step"])

    def finish(self, warn, step: int) -> None:
        if self.done or not self.shares:
            return
        self.done = True
        share = sum(self.shares) / len(self.shares)
        if share >= self.threshold:
            return
        a = self.alum
        warn(f"ALUM: the adversarial perturbation makes up only {100 * share:.2g} % of the ALUM term R over its first "
             f"log intervals (adv_share; alum.epsilon={a.epsilon:g}, alum.scale={a.scale}, alum.adv_dropout="
             f"{a.adv_dropout}). At this epsilon delta barely changes the output: the term acts as dropout "
             f"consistency between two passes (R-Drop) weighted by alpha={a.alpha:g}, not as smoothness around the "
             "embeddings. To make the adversary matter: --alum.scale rel --alum.epsilon 1e-2 (epsilon relative to "
             "each token's embedding RMS), or --alum.adv_dropout shared (R measures delta alone); see "
             "docs/what-alum-does.md.", step)
