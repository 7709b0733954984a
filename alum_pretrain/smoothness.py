"""Eval-mode smoothness of a masked LM: the worst-case SymKL of its predictions within an ε-ball of the
embeddings — the quantity ALUM minimises — beside the same figure for a random δ of the same size.

**What** (:func:`measure_smoothness`).  Dropout off (``model.eval()``; the mode is restored after), held-out
sequences masked like the evaluation (15 % by default, :class:`~alum_pretrain.masking.TokenMasker` with the
evaluation stream :data:`~alum_pretrain.masking.STREAM_EVAL_MASK`, step 0, sample ids = sequence index),
e = ``model.embed(ids)`` (the ALUM perturbation point).  For each norm and ε, δ is found by K-step
projected ascent on

    S(δ) = SymKL(p(e), p(e + δ)) = KL(p‖q) + KL(q‖p)   at the masked positions,

δ at every real (non-padding) token, the clean distribution fixed, the gradient taken w.r.t. δ only
(``torch.autograd.grad``; no parameter gradient).  The ball, per token t (``ball="token"``, ALUM's) with
radius r_t = ε (``eps_mode="abs"``) or, with ``"rel"`` (training's ``alum.scale=rel``: ε in units of the token's
own embedding scale, the same for every model — DeBERTa SiFT's idea), ε·RMS(e_t) for L∞ and ε·‖e_t‖₂ for L2:

* ``linf``: ‖δ_t‖∞ ≤ r_t; step δ ← clip(δ + η g / max|g_t|) (ALUM's per-token max-abs normalisation);
* ``l2``:   ‖δ_t‖₂ ≤ r_t; step δ ← Π(δ + η g / ‖g_t‖₂), Π rescales tokens outside the ball;
* ``ball="sequence"`` (L2 only): one ball ‖δ_b‖₂ ≤ r_b over a whole sequence's (T, H) δ, r_b = ε or
  ε·RMS(e_b) — the ball whose worst case is an eigenvalue problem (see below).

η = ``step_scale``·r, so each normalised step can cross the ball (K steps then act like power iterations on
the local Fisher matrix).  The ascent starts from the random δ below; for every sequence the best iterate
(start included) is kept, so the adversarial figure is never below the random one.  Divergences,
entropies and NLL are computed in float64 from the model's logits.

**Random δ.**  A random point on the ball's boundary: a uniform direction on the L2 sphere, or a uniform
random vertex ±r_t of the L∞ cube (the L2 size of a saturated sign-like adversarial δ).  ``ratio`` =
adversarial / random mean SymKL: how much worse the worst direction is than a typical one.

**Small-ε theory** (the reference test).  With q = softmax(z + dz), SymKL(p, q) = Σ (q − p)(log q − log p)
≈ dzᵀ F dz, F = diag(p) − ppᵀ (each KL is ½ dzᵀFdz), dz = J δ.  So in the L2 sequence ball the adversarial
SymKL tends to ε²·λ_max(Jᵀ F J) (averaged over the sequence's masked tokens), and a random direction
gives ε²·tr(JᵀFJ)/dim.  Sensitivity also falls when predictions flatten: compare models at matched
predictive entropy (:func:`fit_temperature`; ``temperature=`` divides the logits) beside the raw figure.

Cost per batch: 1 clean forward + per (norm, ε) K forward+input-backward passes and 1 forward.

This module imports no engine, so every engine, ``alum-bench`` and the benchmarks can call it; the command
``alum-smoothness MODEL --data DATA_BIN | --text FILE`` lives in :mod:`alum_pretrain.smoothness_cli`.
"""

from __future__ import annotations

import logging
import math
import re
import sys
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .adversarial import normalize_grad
from .masking import IGNORE_INDEX, STREAM_EVAL_MASK, MaskingConfig, TokenMasker
from .passes import ball_radius, token_scale

log = logging.getLogger("alum_pretrain.smoothness")

NORMS = ("linf", "l2")
BALLS = ("token", "sequence")
EPS_MODES = ("abs", "rel")
QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}

__all__ = ["NORMS", "BALLS", "EPS_MODES", "SmoothnessConfig", "measure_smoothness", "mlm_logits",
           "mlm_stats", "fit_temperature", "flat_metrics", "format_table", "tokenizer_masker"]


@dataclass
class SmoothnessConfig:
    """How the smoothness is measured (see the module docstring)."""

    epsilons: tuple[float, ...] = (1e-5, 1e-4, 1e-3)  # ball radii (absolute, or relative with eps_mode="rel")
    norms: tuple[str, ...] = ("linf",)  # "linf" (ALUM) and/or "l2"
    eps_mode: str = "abs"  # "abs": radius ε; "rel": ε × the token's embedding RMS (L∞) or L2 norm (L2)
    ball: str = "token"  # "token" (one ball per token, ALUM) or "sequence" (one L2 ball per sequence)
    steps: int = 3  # K ascent steps
    step_scale: float = 10.0  # ascent step η = step_scale × radius
    mask_rate: float = 0.15  # evaluation masking rate
    seed: int = 0  # the random δ (and the start of the ascent)

    def __post_init__(self) -> None:
        self.epsilons = tuple(float(e) for e in self.epsilons)
        self.norms = tuple(self.norms)
        if not self.epsilons or any(not math.isfinite(e) or e <= 0 for e in self.epsilons):
            raise ValueError(f"--eps {self.epsilons}: every ε must be a positive number")
        if not self.norms or any(n not in NORMS for n in self.norms):
            raise ValueError(f"--norm {','.join(self.norms)}: choose from {', '.join(NORMS)}")
        if self.eps_mode not in EPS_MODES:
            raise ValueError(f"--eps-mode {self.eps_mode!r}: choose {' or '.join(EPS_MODES)}")
        if self.ball not in BALLS:
            raise ValueError(f"--ball {self.ball!r}: choose {' or '.join(BALLS)}")
        if self.ball == "sequence" and "linf" in self.norms:
            raise ValueError("--ball sequence is an L2 ball over the whole sequence: use --norm l2")
        if isinstance(self.steps, bool) or int(self.steps) != self.steps or self.steps < 0:
            raise ValueError(f"--steps {self.steps}: must be an integer >= 0")
        if not self.step_scale > 0:
            raise ValueError(f"--step-scale {self.step_scale}: must be > 0")
        if not 0.0 < self.mask_rate <= 1.0:
            raise ValueError(f"--mask-rate {self.mask_rate}: must be in (0, 1]")


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------


def _as_dict(batch: Any) -> dict:
    if isinstance(batch, Mapping):
        return dict(batch)
    if isinstance(batch, (tuple, list)) and 2 <= len(batch) <= 4:
        return dict(zip(("input_ids", "attention_mask", "token_type_ids", "special_mask"), batch))
    raise ValueError("a batch must be a dict with input_ids/attention_mask[/token_type_ids/special_mask/labels] "
                     "or a tuple (input_ids, attention_mask[, token_type_ids[, special_mask]])")


def _prepare(batch: Any, masker: Optional[TokenMasker], rate: float, first_id: int,
             special_ids: Optional[Sequence[int]], device: torch.device) -> dict:
    """Mask one batch (unless it brings ``labels``) and return what the measurement needs, on ``device``."""
    b = _as_dict(batch)
    ids = b["input_ids"]
    att = b.get("attention_mask")
    att = torch.ones_like(ids) if att is None else att
    labels = b.get("labels")
    if labels is None:
        special = b.get("special_mask")
        if special is None:
            if special_ids is None:
                raise ValueError("batches without special_mask need special_ids= (the tokenizer's special ids)")
            special = torch.isin(ids, torch.as_tensor(list(special_ids), dtype=ids.dtype))
        special = special.bool() | att.eq(0)
        if masker is None:
            raise ValueError("batches without labels need a masker (TokenMasker) to mask them")
        sample_ids = first_id + torch.arange(ids.shape[0])
        ids, labels = masker.mask(ids, special, rate, 0, sample_ids, stream=STREAM_EVAL_MASK)
    flat = labels.reshape(-1)
    pos = (flat != IGNORE_INDEX).nonzero().squeeze(1)  # (N,) flat positions into B*T
    tt = b.get("token_type_ids")
    return {"input_ids": ids.to(device), "attention_mask": att.to(device),
            "token_type_ids": None if tt is None else tt.to(device), "pos": pos.to(device),
            "seq": (pos // ids.shape[1]).to(device), "targets": flat.index_select(0, pos).to(device),
            "real": att.to(device).bool()}


def _heads(model, b: dict, embeds: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N, V) float64 logits / T at the masked positions for input embeddings ``embeds`` (B, T, H)."""
    z, _ = model.heads_from_embeds(embeds, b["attention_mask"], b["token_type_ids"], b["pos"], need_nsp=False)
    return z.to(torch.float64) / temperature


# --------------------------------------------------------------------------------------------------
# Divergences and statistics (float64)
# --------------------------------------------------------------------------------------------------


def _sym_kl_rows(z: torch.Tensor, z_ref: torch.Tensor) -> torch.Tensor:
    """Per-row SymKL(softmax(z_ref), softmax(z)) = Σ (p − q)(log p − log q), (N,) float64."""
    lq, lp = F.log_softmax(z.double(), -1), F.log_softmax(z_ref.double(), -1)
    return ((lp.exp() - lq.exp()) * (lp - lq)).sum(-1)


def _token_stats(z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, 3) float64 per masked token: NLL of the target, correct (0/1), predictive entropy (nats)."""
    lp = F.log_softmax(z.double(), -1)
    nll = -lp.gather(1, targets.long().unsqueeze(1)).squeeze(1)
    correct = (lp.argmax(-1) == targets).double()
    ent = -(lp.exp() * lp).sum(-1)
    return torch.stack([nll, correct, ent], 1)


def _distribution(x: torch.Tensor) -> dict[str, float]:
    x = x.double()
    if x.numel() == 0:
        return {"mean": float("nan"), **{k: float("nan") for k in QUANTILES}, "max": float("nan")}
    q = torch.quantile(x, torch.tensor(list(QUANTILES.values()), dtype=torch.float64))
    return {"mean": float(x.mean()), **{k: float(v) for k, v in zip(QUANTILES, q)}, "max": float(x.max())}


# --------------------------------------------------------------------------------------------------
# Balls, random δ, projected ascent
# --------------------------------------------------------------------------------------------------


def _radius(e: torch.Tensor, real: torch.Tensor, eps: float, cfg: SmoothnessConfig, norm: str) -> torch.Tensor:
    """Ball radius, (B, T, 1) per token or (B, 1, 1) per sequence, float64.

    ``rel`` is training's ``alum.scale=rel`` (:func:`alum_pretrain.passes.ball_radius`): ε × the token's RMS for
    the L∞ ball, ε × its L2 norm for the L2 ball (so ‖δ‖/‖e‖ ≤ ε in the ball's own norm); the sequence ball:
    ε × the sequence's L2 norm."""
    e = e.detach().double() * real.unsqueeze(-1)
    if cfg.ball == "token":
        r = ball_radius(eps, token_scale(e, cfg.eps_mode), norm, e.shape[-1])  # float (abs) or (B, T, 1)
        return (r if torch.is_tensor(r) else torch.full_like(e[..., :1], r)) * real.unsqueeze(-1)
    if cfg.eps_mode == "rel":
        return eps * e.pow(2).sum((1, 2)).sqrt().view(-1, 1, 1)
    return torch.full((e.shape[0], 1, 1), eps, dtype=torch.float64, device=e.device)


def _l2(x: torch.Tensor, ball: str) -> torch.Tensor:
    dims = (-1,) if ball == "token" else (-2, -1)
    return x.pow(2).sum(dims, keepdim=True).sqrt()


def _project(delta: torch.Tensor, radius: torch.Tensor, norm: str, ball: str, real: torch.Tensor) -> torch.Tensor:
    """Euclidean projection onto the ball(s); padding stays zero."""
    if norm == "linf":
        delta = torch.maximum(torch.minimum(delta, radius), -radius)
    else:
        n = _l2(delta, ball)
        delta = delta * (radius / n.clamp_min(torch.finfo(torch.float64).tiny)).clamp(max=1.0)
    return delta * real.unsqueeze(-1)


def _random_direction(shape: torch.Size, seed: int, batch_index: int, norm: str, ball: str) -> torch.Tensor:
    """A standard-normal (B, T, H) draw, CPU float64, a pure function of (seed, batch, norm, ball): the same
    direction for every ε (common random numbers) and on every device."""
    key = np.random.SeedSequence([int(seed), int(batch_index), NORMS.index(norm), BALLS.index(ball)])
    gen = torch.Generator().manual_seed(int(key.generate_state(1, dtype=np.uint64)[0] >> 1))
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def _random_delta(u: torch.Tensor, radius: torch.Tensor, norm: str, ball: str, real: torch.Tensor) -> torch.Tensor:
    """A random point on the ball's boundary: an L∞ vertex (random signs × r) or a uniform L2 direction × r."""
    u = u.to(radius.device) * real.unsqueeze(-1)
    if norm == "linf":
        return torch.where(u >= 0, radius, -radius) * real.unsqueeze(-1)
    return u / _l2(u, ball).clamp_min(torch.finfo(torch.float64).tiny) * radius


def _seq_sum(rows: torch.Tensor, seq: torch.Tensor, B: int) -> torch.Tensor:
    return torch.zeros(B, dtype=rows.dtype, device=rows.device).index_add_(0, seq, rows)


def _ascent(model, b: dict, e: torch.Tensor, z0: torch.Tensor, radius: torch.Tensor, delta0: torch.Tensor,
            norm: str, cfg: SmoothnessConfig, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """K-step projected ascent of Σ SymKL from ``delta0``.  Returns per masked token (N,) the SymKL at each
    sequence's best iterate (the start included) and the SymKL at the start ``delta0``."""
    B = e.shape[0]
    level = "token" if cfg.ball == "token" else "sequence"
    delta = delta0
    best_rows = best_seq = None
    for k in range(cfg.steps + 1):
        last = k == cfg.steps
        d = delta.detach().to(e.dtype).requires_grad_(not last)
        with torch.enable_grad() if not last else torch.no_grad():
            rows = _sym_kl_rows(_heads(model, b, e + d, temperature), z0)  # (N,)
            grad = None if last else torch.autograd.grad(rows.sum(), d)[0]
        rows = rows.detach()
        seq_val = _seq_sum(rows, b["seq"], B)  # (B,)
        if best_rows is None:
            start_rows = best_rows = rows
            best_seq = seq_val
        else:
            better = seq_val > best_seq  # (B,) keep the best iterate of each sequence
            best_rows = torch.where(better[b["seq"]], rows, best_rows)
            best_seq = torch.where(better, seq_val, best_seq)
        if not last:
            step = normalize_grad(grad.double(), norm, level)  # per-token max-abs (L∞) or L2 normalisation
            delta = _project(delta + cfg.step_scale * radius * step, radius, norm, cfg.ball, b["real"])
    return best_rows, start_rows


# --------------------------------------------------------------------------------------------------
# The measurement
# --------------------------------------------------------------------------------------------------


class _EvalMode:
    """``model.eval()`` for the block; the previous mode is restored after."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was)


def _device_of(model) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _measure_batch(model, b: dict, j: int, cfg: SmoothnessConfig, temperature: float, acc: dict, bar) -> None:
    with torch.no_grad():
        e = model.embed(b["input_ids"], b["token_type_ids"]).detach()  # (B, T, H)
        z0 = _heads(model, b, e, temperature)  # (N, V) float64
    acc["stats"].append(_token_stats(z0, b["targets"]).cpu())
    real = b["real"]
    acc["rms"].append(e.double().pow(2).mean(-1).sqrt()[real].cpu())
    acc["n_seq"] += int(e.shape[0])
    acc["n_tok"] += int(real.sum())
    for norm in cfg.norms:
        u = _random_direction(e.shape, cfg.seed, j, norm, cfg.ball)
        for eps in cfg.epsilons:
            radius = _radius(e, real, eps, cfg, norm)
            delta0 = _random_delta(u, radius, norm, cfg.ball, real)
            adv, rand = _ascent(model, b, e, z0, radius, delta0, norm, cfg, temperature)
            per_tok = radius.expand(*real.shape, 1)[..., 0][real] if cfg.ball == "token" else radius.view(-1)
            rec = acc["runs"].setdefault((norm, eps), {"adv": [], "rand": [], "radius": []})
            rec["adv"].append(adv.cpu())
            rec["rand"].append(rand.cpu())
            rec["radius"].append(per_tok.cpu())
            if bar is not None:
                bar.update(1)


def measure_smoothness(model, batches: Iterable[Any], masker: Optional[TokenMasker] = None,
                       cfg: Optional[SmoothnessConfig] = None, *, temperature: float = 1.0,
                       special_ids: Optional[Sequence[int]] = None, progress: bool = False,
                       check: Optional[Callable[[], None]] = None) -> dict:
    """Eval-mode adversarial vs random SymKL of ``model`` (a :class:`~alum_pretrain.models.PretrainModel`, or
    anything with its ``embed`` / ``heads_from_embeds``) on held-out ``batches``.

    ``batches``: iterated once; each a dict with ``input_ids``, ``attention_mask`` (B, T), optional
    ``token_type_ids`` and ``special_mask`` (True = never mask), or a tuple in that order.  A batch that
    brings ``labels`` (-100 = not masked) is taken as already masked; others are masked by ``masker`` at
    ``cfg.mask_rate`` (evaluation stream, step 0, sample id = running sequence index), with specials from
    ``special_mask`` or ``special_ids``.  ``temperature``: the logits are divided by it everywhere (entropy
    matching).  Returns a dict: ``n_sequences``, ``n_tokens``, ``n_masked``, ``temperature``, ``mlm_nll``,
    ``mlm_acc``, ``entropy`` (mean predictive entropy, nats), ``embed_rms`` (mean per-token RMS of the
    perturbed embeddings), ``config`` and ``results``: one dict per (norm, ε) with ``norm``, ``eps``,
    ``eps_mode``, ``ball``, ``radius_mean`` (mean absolute radius), ``adv_sym_kl`` (mean per masked token),
    ``adv_p50``/``adv_p90``/``adv_p99``/``adv_max``, ``rand_sym_kl`` and its quantiles ``rand_p50``...,
    and ``ratio`` = adv_sym_kl / rand_sym_kl.  ``check``: called before each batch (e.g. to raise on a stop
    signal, :func:`alum_pretrain.stopping.poll`).
    """
    cfg = cfg if cfg is not None else SmoothnessConfig()
    if not temperature > 0:
        raise ValueError(f"temperature={temperature}: must be > 0")
    device = _device_of(model)
    acc: dict = {"stats": [], "rms": [], "runs": {}, "n_seq": 0, "n_tok": 0}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = len(batches) * len(cfg.norms) * len(cfg.epsilons) if hasattr(batches, "__len__") else None
        bar = tqdm(total=total, desc="smoothness", unit="ball", file=sys.stderr)
    with _EvalMode(model):
        first = 0
        for j, batch in enumerate(batches):
            if check is not None:
                check()
            b = _prepare(batch, masker, cfg.mask_rate, first, special_ids, device)
            first += int(b["input_ids"].shape[0])
            if b["pos"].numel():
                _measure_batch(model, b, j, cfg, temperature, acc, bar)
    if bar is not None:
        bar.close()
    return _summarise(acc, cfg, temperature)


def _summarise(acc: dict, cfg: SmoothnessConfig, temperature: float) -> dict:
    if not acc["stats"]:
        raise ValueError("no masked token in the held-out batches: give more (or longer) sequences")
    stats = torch.cat(acc["stats"])  # (N, 3)
    out: dict[str, Any] = {
        "n_sequences": acc["n_seq"], "n_tokens": acc["n_tok"], "n_masked": int(stats.shape[0]),
        "temperature": float(temperature), "mlm_nll": float(stats[:, 0].mean()),
        "mlm_acc": float(stats[:, 1].mean()), "entropy": float(stats[:, 2].mean()),
        "embed_rms": float(torch.cat(acc["rms"]).mean()), "config": asdict(cfg), "results": []}
    for (norm, eps), rec in acc["runs"].items():
        adv, rand = _distribution(torch.cat(rec["adv"])), _distribution(torch.cat(rec["rand"]))
        row = {"norm": norm, "eps": eps, "eps_mode": cfg.eps_mode, "ball": cfg.ball,
               "radius_mean": float(torch.cat(rec["radius"]).mean()), "adv_sym_kl": adv.pop("mean")}
        row.update({f"adv_{k}": v for k, v in adv.items()})
        row["rand_sym_kl"] = rand.pop("mean")
        row.update({f"rand_{k}": v for k, v in rand.items()})
        row["ratio"] = row["adv_sym_kl"] / row["rand_sym_kl"] if row["rand_sym_kl"] > 0 else float("nan")
        out["results"].append(row)
    return out


def flat_metrics(result: dict, prefix: str = "smooth_") -> dict[str, float]:
    """Scalars for a training log: ``smooth_adv_kl_eps1e-05`` (L∞, absolute ε, per-token ball),
    ``smooth_rand_kl_…``, ``smooth_ratio_…``; ``rel``eps / ``_l2`` / ``_seq`` mark the other settings;
    plus ``smooth_entropy``, ``smooth_mlm_nll``, ``smooth_mlm_acc``."""
    out = {f"{prefix}{k}": float(result[k]) for k in ("entropy", "mlm_nll", "mlm_acc")}
    for r in result["results"]:
        tag = f"{'rel' if r['eps_mode'] == 'rel' else ''}eps{r['eps']:g}"
        tag += ("" if r["norm"] == "linf" else f"_{r['norm']}") + ("_seq" if r["ball"] == "sequence" else "")
        out[f"{prefix}adv_kl_{tag}"] = r["adv_sym_kl"]
        out[f"{prefix}rand_kl_{tag}"] = r["rand_sym_kl"]
        out[f"{prefix}ratio_{tag}"] = r["ratio"]
    return out


# --------------------------------------------------------------------------------------------------
# Clean statistics and entropy matching
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def mlm_logits(model, batches: Iterable[Any], masker: Optional[TokenMasker] = None, mask_rate: float = 0.15,
               special_ids: Optional[Sequence[int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode clean logits at the masked positions of ``batches`` (masked as in :func:`measure_smoothness`):
    ``(logits (N, V) float32 on CPU, targets (N,))``."""
    device = _device_of(model)
    zs, ts = [], []
    with _EvalMode(model):
        first = 0
        for batch in batches:
            b = _prepare(batch, masker, mask_rate, first, special_ids, device)
            first += int(b["input_ids"].shape[0])
            e = model.embed(b["input_ids"], b["token_type_ids"])
            zs.append(_heads(model, b, e, 1.0).float().cpu())
            ts.append(b["targets"].cpu())
    if not zs or sum(t.numel() for t in ts) == 0:
        raise ValueError("no masked token in the held-out batches: give more (or longer) sequences")
    return torch.cat(zs), torch.cat(ts)


def mlm_stats(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
              chunk: int = 512) -> dict[str, float]:
    """``{"mlm_nll", "mlm_acc", "entropy"}`` (means over tokens, float64) of ``logits / temperature``."""
    tot = torch.zeros(3, dtype=torch.float64)
    for s in range(0, logits.shape[0], chunk):
        tot += _token_stats(logits[s:s + chunk].double() / temperature, targets[s:s + chunk]).sum(0)
    n = max(int(logits.shape[0]), 1)
    return {"mlm_nll": float(tot[0] / n), "mlm_acc": float(tot[1] / n), "entropy": float(tot[2] / n)}


def fit_temperature(logits: torch.Tensor, target_entropy: float, *, tol: float = 1e-6,
                    bounds: tuple[float, float] = (1e-3, 1e3)) -> float:
    """T such that the mean predictive entropy of ``softmax(logits / T)`` equals ``target_entropy``.

    The entropy of each row rises monotonically with T (from the row's top-tie entropy at T → 0 to log V
    as T → ∞), so their mean does too: bisection on log T.  ValueError when the target is not reached
    inside ``bounds`` (e.g. above log V)."""
    targets = torch.zeros(logits.shape[0], dtype=torch.long)

    def ent(t: float) -> float:
        return mlm_stats(logits, targets, t)["entropy"]

    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    e_lo, e_hi = ent(bounds[0]), ent(bounds[1])
    if not e_lo <= target_entropy <= e_hi:
        raise ValueError(f"--match-entropy: target entropy {target_entropy:.4g} nats is outside what temperatures "
                         f"{bounds[0]:g}..{bounds[1]:g} give this model ({e_lo:.4g}..{e_hi:.4g})")
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        e_mid = ent(math.exp(mid))
        if abs(e_mid - target_entropy) <= tol:
            return math.exp(mid)
        lo, hi = (mid, hi) if e_mid < target_entropy else (lo, mid)
    return math.exp(0.5 * (lo + hi))


_PLACEHOLDER_TOKEN = re.compile(r"^(\[unused\d+\]|<unused\d+>|madeupword\d+)$")  # never a random replacement


def tokenizer_masker(tokenizer, seed: int = 0) -> TokenMasker:
    """A :class:`TokenMasker` for an HF tokenizer: its ``[MASK]`` id, random replacements drawn from every
    non-special, non-placeholder token."""
    if tokenizer.mask_token_id is None:
        raise ValueError(f"{getattr(tokenizer, 'name_or_path', 'the tokenizer')}: has no mask token")
    special = set(int(i) for i in tokenizer.all_special_ids)
    pool = sorted(i for t, i in tokenizer.get_vocab().items()
                  if i not in special and not _PLACEHOLDER_TOKEN.match(t))
    return TokenMasker(MaskingConfig(), int(tokenizer.mask_token_id), torch.tensor(pool, dtype=torch.long),
                       int(seed))


def _fmt(x: float) -> str:
    return "nan" if x != x else f"{x:.3e}"


def format_table(result: dict, title: str = "") -> str:
    """The result of :func:`measure_smoothness` as a text table."""
    lines = [title] if title else []
    lines.append(f"held-out MLM at {result['n_masked']} masked tokens ({result['n_sequences']} sequences, "
                 f"{result['n_tokens']} tokens), T={result['temperature']:.4g}: NLL {result['mlm_nll']:.4f}  "
                 f"acc {result['mlm_acc']:.4f}  entropy {result['entropy']:.4f} nats  "
                 f"embedding RMS {result['embed_rms']:.4g}")
    head = ("norm", "eps", "mode", "radius", "adv SymKL", "p50", "p90", "p99", "max", "random", "ratio")
    rows = [head]
    for r in result["results"]:
        rows.append((r["norm"] + ("/seq" if r["ball"] == "sequence" else ""), f"{r['eps']:g}", r["eps_mode"],
                     _fmt(r["radius_mean"]), _fmt(r["adv_sym_kl"]), _fmt(r["adv_p50"]), _fmt(r["adv_p90"]),
                     _fmt(r["adv_p99"]), _fmt(r["adv_max"]), _fmt(r["rand_sym_kl"]), f"{r['ratio']:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)
