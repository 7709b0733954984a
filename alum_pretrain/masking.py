"""Masked-LM masking with ALUM's masking-rate curriculum (torch + numpy only; no engine imports).

* **Curriculum** (Liu et al. 2020, Sec. 2.3: "we gradually increase it from 5% to 25% with 5% increment
  for every 20% of training epochs"): the rate for training progress ``t = step / total_steps`` is
  ``start + (end - start) * phase / (num_phases - 1)`` with ``phase = floor(t * num_phases)`` clamped
  to ``num_phases - 1`` - by default 5 % for t < 0.2, 10 % < 0.4, 15 % < 0.6, 20 % < 0.8, 25 % after
  (and for t >= 1).  ``schedule: constant`` is BERT's fixed 15 %.
* **80/10/10** (BERT): of the selected tokens, ``mask_prob`` (80 %) become ``[MASK]``, ``random_prob``
  (10 %) a random id drawn uniformly from ``random_pool`` and the rest (10 %) stay unchanged; each
  selected unit decides independently.  Labels hold the original id at every selected position
  (all three kinds are predicted) and -100 elsewhere.
* **How many per sequence.** With ``n`` maskable units in a sequence (tokens, or words with whole-word
  masking) we select exactly ``k = floor(rate * n + U)``, ``U ~ Uniform[0, 1)`` drawn per sequence
  (fairseq's ``MaskTokensDataset`` rounding), uniformly without replacement, so ``E[k] = rate * n``
  exactly: the realised rate equals the target in expectation with far less variance than independent
  Bernoulli draws.  If ``rate > 0`` and ``n > 0`` at least one unit is selected, so every sequence
  contributes an MLM target (this only changes sequences with ``rate * n < 1``, i.e. very short ones,
  where it raises the rate slightly above target).  ``rate == 0`` selects nothing.
* **Never masked**: positions with ``special_mask`` True (pass specials *and* padding there).
* **Whole-word masking** (optional): ``continuation`` ``(B, T)`` bool marks word-piece continuation
  tokens (``##x`` in WordPiece).  A word is a non-special start token plus the continuation tokens
  that follow it (a continuation token right after a special token or at position 0 starts a word).
  The rate is applied to *words*: ``k = floor(rate * n_words + U)`` whole words are chosen uniformly,
  so every word is selected with marginal probability ``rate`` and the expected fraction of masked
  *tokens* is also exactly ``rate``.  The 80/10/10 decision is drawn once per word and applied to all
  its tokens (a random-replacement word gets an independent random id per token).
* **Deterministic and resumable**: :func:`mask_tokens` draws from a ``torch.Generator`` such as
  :func:`step_generator` ``(seed, step, rank)`` (seeded from a numpy ``SeedSequence`` hash of those
  integers), so a resumed run masks each step exactly as an uninterrupted run would.  Draws happen on the
  generator's device (CPU by default) and are moved to the input's device, so the masks do not depend
  on where the batch lives.
* **Per-sample, vectorised** (:func:`mask_batch`, what both training engines call): every random number
  of sample ``i`` is a pure function of ``(seed, step, sample_ids[i], stream, position, kind)`` computed by
  a counter-based hash (:func:`sample_uniforms`: the ``lowbias32`` integer mixer applied twice with a
  64-bit per-sample key), so the whole ``(B, T)`` batch is masked by a handful of tensor ops - no Python
  loop, no per-sample generator - while the mask of a sample still does not depend on which batch,
  micro-batch, process or padding length it arrives in.  Integer arithmetic is exact on every device,
  so CPU and GPU give identical masks.
* **The ALUM random start** (:class:`SampleNoise`, what every engine passes to ``init_delta``): Gaussian
  noise from the same per-sample hash (:func:`sample_normals`, Box-Muller, stream :data:`STREAM_ALUM`),
  computed where the sample ids live - no per-sample generator, no device-to-host read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .config import opt

__all__ = ["MaskingConfig", "SCHEDULES", "mask_tokens", "mask_batch", "TokenMasker", "sample_uniforms",
           "step_generator", "sample_generators", "sample_normals", "SampleNoise", "IGNORE_INDEX", "STREAM_MASK",
           "STREAM_ALUM", "STREAM_EVAL_MASK"]

SCHEDULES = ("curriculum", "constant")
IGNORE_INDEX = -100  # label at unselected positions (torch cross_entropy's default ignore_index)

# Randomness streams of a training step, shared by every engine: one consumer per id, so draws never collide
# (and a resumed run draws exactly what an uninterrupted one does).
STREAM_MASK = 0  # training masks
STREAM_ALUM = 1  # the ALUM random start
STREAM_EVAL_MASK = 2  # validation masks


@dataclass
class MaskingConfig:
    """MLM masking: the rate schedule and the 80/10/10 split."""

    schedule: str = opt("curriculum", "masking-rate schedule: curriculum (ALUM: start_rate -> end_rate in "
                                      "num_phases equal phases of training) or constant (constant_rate)")
    start_rate: float = opt(0.05, "curriculum: masking rate of the first phase")
    end_rate: float = opt(0.25, "curriculum: masking rate of the last phase (also used after total_steps)")
    num_phases: int = opt(5, "curriculum: number of equal-length phases (rate rises linearly per phase)")
    constant_rate: float = opt(0.15, "constant: masking rate (BERT: 0.15)")
    mask_prob: float = opt(0.8, "fraction of selected tokens replaced by [MASK]")
    random_prob: float = opt(0.1, "fraction of selected tokens replaced by a random token "
                                  "(the rest, 1 - mask_prob - random_prob, stay unchanged)")
    whole_word: bool = opt(False, "select whole words (a start token + its word-piece continuations) "
                                  "instead of single tokens; the rate applies to words")
    curriculum_steps: int = opt(0, "curriculum: optimizer steps (fairseq: updates) it runs over; 0 = the run's "
                                   "length (train.max_steps, fairseq --max-update); set it when a run is "
                                   "resumed with a longer length")
    eval_rate: float = opt(0.15, "masking rate of validation (fixed, with fixed masks, so valid losses "
                                 "compare across steps)")

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"masking.{name}={getattr(self, name)!r}: {why}")

        if self.schedule not in SCHEDULES:
            raise bad("schedule", f"must be one of {', '.join(SCHEDULES)}")
        for name in ("start_rate", "end_rate", "constant_rate", "mask_prob", "random_prob", "eval_rate"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 <= float(v) <= 1.0):
                raise bad(name, "must be a number in [0, 1]")
            setattr(self, name, float(v))
        if isinstance(self.num_phases, bool) or not isinstance(self.num_phases, int) or self.num_phases < 1:
            raise bad("num_phases", "must be an integer >= 1")
        if (isinstance(self.curriculum_steps, bool) or not isinstance(self.curriculum_steps, int)
                or self.curriculum_steps < 0):
            raise bad("curriculum_steps", "must be an integer >= 0 (0 = the run's length)")
        if self.mask_prob + self.random_prob > 1.0 + 1e-12:
            raise bad("random_prob", f"mask_prob + random_prob = {self.mask_prob + self.random_prob} must be <= 1")
        if not isinstance(self.whole_word, bool):
            raise bad("whole_word", "must be true or false")

    def rate_at(self, step: int, total_steps: int) -> float:
        """The masking rate at optimizer step ``step`` of a run of ``total_steps``: the one schedule of both
        engines (``curriculum_steps``, when set, replaces ``total_steps``).

        Phase ``min(step * num_phases // total, num_phases - 1)`` in exact integer arithmetic (no float
        ``step / total`` that could round a boundary step into the previous phase); steps past the total stay
        in the last phase."""
        total_steps = self.curriculum_steps or total_steps
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
            raise ValueError(f"rate_at: total_steps={total_steps!r} must be a positive integer")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"rate_at: step={step!r} must be an integer >= 0")
        if self.schedule == "constant":
            return self.constant_rate
        phase = min(step * self.num_phases // total_steps, self.num_phases - 1)
        return self._phase_rate(phase)

    def _phase_rate(self, phase: int) -> float:
        if self.num_phases == 1:
            return self.start_rate
        r = self.start_rate + (self.end_rate - self.start_rate) * phase / (self.num_phases - 1)
        return round(r, 12)  # 0.15000000000000002 -> 0.15 for clean logs; far below any effect


def step_generator(
    seed: int,
    step: int,
    rank: int = 0,
    *,
    stream: Union[int, Sequence[int]] = 0,
    device: Union[str, torch.device] = "cpu",
) -> torch.Generator:
    """A ``torch.Generator`` seeded from a hash of ``(seed, step, rank, *stream)``.

    The same integers always give the same generator state (resume reproduces masking); neighbouring
    steps/ranks get statistically independent streams (numpy ``SeedSequence`` hashing, not ``seed +
    step``).  ``stream`` separates consumers of the same step (:data:`STREAM_MASK`, :data:`STREAM_ALUM`,
    :data:`STREAM_EVAL_MASK`), or ``(consumer, micro_batch)`` under gradient accumulation.
    """
    extra = [stream] if isinstance(stream, int) else list(stream)
    ints = [seed, step, rank, *extra]
    for name, v in zip(["seed", "step", "rank"] + [f"stream[{i}]" for i in range(len(extra))], ints):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"step_generator: {name}={v!r} must be an integer >= 0")
    state = np.random.SeedSequence([int(v) for v in ints]).generate_state(1, dtype=np.uint64)[0]
    g = torch.Generator(device=device)
    g.manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def sample_generators(seed: int, step: int, sample_ids: torch.Tensor, stream: int = STREAM_ALUM,
                      device: Union[str, torch.device] = "cpu") -> list[torch.Generator]:
    """One :func:`step_generator` per sample, keyed by (seed, step, sample id, stream): per-sample draws
    (e.g. the ALUM random start) that do not depend on how a batch is split."""
    return [step_generator(seed, step, int(i), stream=stream, device=device) for i in sample_ids.tolist()]


def mask_tokens(
    input_ids: torch.Tensor,
    rate: float,
    *,
    mask_id: int,
    special_mask: torch.Tensor,
    random_pool: Optional[torch.Tensor],
    generator: Optional[torch.Generator] = None,
    continuation: Optional[torch.Tensor] = None,
    mask_prob: float = 0.8,
    random_prob: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select ``rate`` of the maskable tokens (or words) per sequence and apply 80/10/10.

    ``input_ids``: ``(B, T)`` integer ids.  ``special_mask``: ``(B, T)`` bool, True = never select
    (special tokens and padding).  ``random_pool``: 1-D ids allowed as random replacements (e.g. every
    non-special vocabulary id); may be None only if ``random_prob == 0``.  ``generator``: e.g.
    ``step_generator(seed, step, rank)``; None = the global RNG.  ``continuation``: ``(B, T)`` bool,
    True at word-piece continuation tokens, for whole-word masking (None = token-level).
    Returns ``(masked_input_ids (B, T), labels (B, T))`` with ``labels = -100`` where not selected and
    the original id where selected.  The input is not modified.
    """
    rate = _check_inputs("mask_tokens", input_ids, special_mask, continuation, rate, mask_prob, random_prob,
                         random_pool)

    out_device = input_ids.device
    gdev = generator.device if generator is not None else torch.device("cpu")
    B, T = input_ids.shape

    # Random draws, always in the same order and shapes so (generator state) -> masks is a pure function.
    u_count = torch.rand(B, generator=generator, device=gdev)  # (B,)
    scores = torch.rand(B, T, generator=generator, device=gdev)  # (B, T) per unit
    decision = torch.rand(B, T, generator=generator, device=gdev)  # (B, T) per unit
    if random_prob > 0:
        assert random_pool is not None
        pool = random_pool.to(gdev).long().reshape(-1)
        rand_ids = pool[torch.randint(pool.numel(), (B, T), generator=generator, device=gdev)]  # (B, T)
    else:
        rand_ids = None
    masked, labels = _apply_masking(
        input_ids.to(gdev), special_mask.to(gdev), None if continuation is None else continuation.to(gdev), rate,
        u_count, scores, decision, rand_ids, mask_id=mask_id, mask_prob=mask_prob, random_prob=random_prob)
    return masked.to(out_device), labels.to(out_device)


def _check_inputs(fn: str, input_ids, special_mask, continuation, rate, mask_prob, random_prob, random_pool) -> float:
    if input_ids.dim() != 2:
        raise ValueError(f"{fn}: input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"{fn}: input_ids must be an integer tensor, got {input_ids.dtype}")
    if tuple(special_mask.shape) != tuple(input_ids.shape) or special_mask.dtype != torch.bool:
        raise ValueError(f"{fn}: special_mask must be a bool tensor of shape {tuple(input_ids.shape)}, "
                         f"got {special_mask.dtype} {tuple(special_mask.shape)}")
    if continuation is not None and (tuple(continuation.shape) != tuple(input_ids.shape)
                                     or continuation.dtype != torch.bool):
        raise ValueError(f"{fn}: continuation must be a bool tensor of shape {tuple(input_ids.shape)}, "
                         f"got {continuation.dtype} {tuple(continuation.shape)}")
    rate = float(rate)
    if not (0.0 <= rate <= 1.0):
        raise ValueError(f"{fn}: rate={rate} must be in [0, 1]")
    if not (0.0 <= mask_prob <= 1.0 and 0.0 <= random_prob <= 1.0 and mask_prob + random_prob <= 1.0 + 1e-12):
        raise ValueError(f"{fn}: mask_prob={mask_prob}, random_prob={random_prob} must be in [0, 1] "
                         "with a sum <= 1")
    if random_prob > 0 and (random_pool is None or random_pool.numel() == 0):
        raise ValueError(f"{fn}: random_pool must hold at least one id when random_prob > 0")
    return rate


def _apply_masking(ids: torch.Tensor, special: torch.Tensor, cont: Optional[torch.Tensor], rate: float,
                   u_count: torch.Tensor, scores: torch.Tensor, decision: torch.Tensor,
                   rand_ids: Optional[torch.Tensor], *, mask_id: int, mask_prob: float,
                   random_prob: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Selection + 80/10/10 from given uniforms (all on one device): the math shared by both samplers.

    ``u_count`` (B,) the rounding draw of k; ``scores`` (B, T) and ``decision`` (B, T) indexed by *unit*
    (token or word) number; ``rand_ids`` (B, T) replacement ids indexed by token position (or None)."""
    B, T = ids.shape
    dev = ids.device
    cand = ~special  # (B, T) maskable tokens
    # Units = what gets selected: single tokens, or whole words (start token + continuations).
    if cont is None:
        unit_start = cand
    else:
        prev_cand = torch.zeros_like(cand)
        prev_cand[:, 1:] = cand[:, :-1]
        unit_start = cand & (~cont | ~prev_cand)  # a continuation after a special/position 0 starts a word
    unit_id = unit_start.long().cumsum(1) - 1  # (B, T) index of each token's unit (valid where cand)
    unit_id = unit_id.clamp_min(0)
    n_units = unit_start.sum(1)  # (B,)

    # k = floor(rate * n + U): E[k] = rate * n exactly; at least one when rate > 0 and n > 0.
    k = torch.floor(rate * n_units.double() + u_count.double()).long()  # (B,)
    if rate > 0:
        k = torch.maximum(k, (n_units > 0).long())
    k = torch.minimum(k, n_units)

    # Uniform selection of k units without replacement: the k smallest random scores among valid units.
    unit_index = torch.arange(T, device=dev).expand(B, T)  # (B, T)
    scores = scores.masked_fill(unit_index >= n_units[:, None], 2.0)  # invalid unit slots sort last
    order = scores.argsort(dim=1, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, unit_index.contiguous())  # rank of unit j in row b
    unit_selected = rank < k[:, None]  # (B, T) indexed by unit

    selected = cand & unit_selected.gather(1, unit_id)  # (B, T) tokens
    dec = decision.gather(1, unit_id)  # per-unit decision broadcast to its tokens
    to_mask = selected & (dec < mask_prob)
    to_random = selected & (dec >= mask_prob) & (dec < mask_prob + random_prob)

    labels = torch.where(selected, ids, torch.full_like(ids, IGNORE_INDEX))
    masked = ids.masked_fill(to_mask, mask_id)
    if rand_ids is not None:
        masked = torch.where(to_random, rand_ids.to(ids.dtype), masked)
    return masked, labels


# ---------------------------------------------------------------------------------------------------------
# Counter-based per-sample randomness (vectorised over the batch)
# ---------------------------------------------------------------------------------------------------------
_M32 = 0xFFFF_FFFF
_GOLDEN = 0x9E37_79B9  # 2^32 / golden ratio: spreads consecutive counters over the 32-bit ring
# Counter layout per sample: 4 * position + kind, so a position's draws do not depend on the padded length.
_KIND_COUNT, _KIND_SCORE, _KIND_DECISION, _KIND_RANDOM = 0, 1, 2, 3


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash with near-ideal avalanche (the improved ``lowbias32`` of C. Wellons'
    hash-prospector: xorshift-multiply twice).  Input and output are int64 tensors holding values in
    [0, 2^32); both multipliers are < 2^31, so every product stays below 2^63 - exact in int64 on every
    device, no reliance on signed overflow."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0_AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A_2D97) & _M32
    return x ^ (x >> 15)


def _mix32_int(x: int) -> int:
    """:func:`_mix32` on a Python int (the same function; used for the per-call part of the key)."""
    x &= _M32
    x ^= x >> 16
    x = (x * 0x21F0_AAAD) & _M32
    x ^= x >> 15
    x = (x * 0x735A_2D97) & _M32
    return x ^ (x >> 15)


def _chain(words: Sequence[int], salt: int) -> int:
    h = salt
    for w in words:
        h = _mix32_int((h ^ w) + _GOLDEN)
    return h


def _sample_keys(seed: int, step: int, stream: int, sample_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent 32-bit keys per sample (B,) from (seed, step, stream, sample id), all 64-bit inputs."""
    words = [seed & _M32, seed >> 32, step & _M32, step >> 32, stream & _M32, stream >> 32]
    ha, hb = _chain(words, 0x243F_6A88), _chain(words, 0x85A3_08D3)  # two salts (digits of pi)
    ids = sample_ids.long()
    lo, hi = ids & _M32, (ids >> 32) & _M32
    ka = _mix32(((_mix32(lo ^ ha) ^ hi) + _GOLDEN) & _M32)
    kb = _mix32(((_mix32(lo ^ hb) ^ hi) + _GOLDEN) & _M32)
    return ka, kb


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """:func:`_mix32` in place (the same values, half the temporaries: the (B, N) tensors are large)."""
    x ^= x >> 16
    x *= 0x21F0_AAAD
    x &= _M32
    x ^= x >> 15
    x *= 0x735A_2D97
    x &= _M32
    x ^= x >> 15
    return x


def _hash32(ka: torch.Tensor, kb: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """32-bit hashes (int64 in [0, 2^32)): (B,) keys x (N,) counters -> (B, N)."""
    c = (counters.long()[None, :] * _GOLDEN) & _M32  # (1, N); counters < 2^31 keep the product < 2^63
    x = ka[:, None] + c  # (B, N)
    x &= _M32
    _mix32_(x)  # round 1, keyed by ka
    x ^= kb[:, None]
    return _mix32_(x)  # round 2, keyed by kb


def _uniforms(ka: torch.Tensor, kb: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """float64 uniforms in [0, 1) with 32-bit resolution: (B,) keys x (N,) counters -> (B, N)."""
    return _hash32(ka, kb, counters).double().mul_(1.0 / 4294967296.0)


def _check_key_ints(fn: str, **ints) -> None:
    for name, v in ints.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not (0 <= int(v) < 2**64):
            raise ValueError(f"{fn}: {name}={v!r} must be an integer in [0, 2**64)")


def _check_sample_ids(fn: str, sample_ids: torch.Tensor, B: int) -> None:
    if not torch.is_tensor(sample_ids) or sample_ids.dim() != 1 or sample_ids.numel() != B:
        raise ValueError(f"{fn}: sample_ids must be a 1-D tensor of {B} ids (one per row), got "
                         f"{getattr(sample_ids, 'shape', type(sample_ids).__name__)}")
    if sample_ids.dtype.is_floating_point or sample_ids.dtype == torch.bool:
        raise ValueError(f"{fn}: sample_ids must be integers, got {sample_ids.dtype}")
    # (checked on the host only: on a GPU the check itself would be a device->host synchronisation)
    if B and sample_ids.device.type == "cpu" and bool((sample_ids < 0).any()):
        raise ValueError(f"{fn}: sample_ids must be >= 0 (global sample indices), got min {int(sample_ids.min())}")


def sample_uniforms(seed: int, step: int, sample_ids: torch.Tensor, stream: int, counters: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) numbers ``(B, N)``: entry ``[b, j]`` is a pure function of
    ``(seed, step, sample_ids[b], stream, counters[j])`` - the same value whatever else is in the batch,
    on whatever device ``sample_ids`` lives (the counters are moved there)."""
    _check_key_ints("sample_uniforms", seed=seed, step=step, stream=stream)
    _check_sample_ids("sample_uniforms", sample_ids, sample_ids.numel() if torch.is_tensor(sample_ids) else -1)
    if counters.dim() != 1 or counters.dtype.is_floating_point or (
            counters.numel() and (int(counters.min()) < 0 or int(counters.max()) >= 2**31)):
        raise ValueError("sample_uniforms: counters must be a 1-D integer tensor with values in [0, 2**31)")
    ka, kb = _sample_keys(int(seed), int(step), int(stream), sample_ids)
    return _uniforms(ka, kb, counters.to(sample_ids.device))


def sample_normals(seed: int, step: int, sample_ids: torch.Tensor, shape: Sequence[int],
                   stream: int = STREAM_ALUM) -> torch.Tensor:
    """Standard normal numbers ``(B, *shape)`` (float32), entry ``[b, ...]`` a pure function of
    ``(seed, step, sample_ids[b], stream, flat index)``: the per-sample noise of the ALUM random start.

    Box-Muller on :func:`sample_uniforms`' counter-based uniforms (flat index ``e`` uses the pair of counters
    ``2 (e // 2)``, ``2 (e // 2) + 1``: cosine for even ``e``, sine for odd), so a sample's noise does not
    depend on the batch it arrives in, and position ``t`` of a ``(T, H)`` shape (index ``t * H + h``) not on
    the padded length ``T``.  Computed on ``sample_ids``' device with integer tensor ops and elementwise
    math only: no device-to-host read (the ids' values are not checked; they are global sample indices)."""
    _check_key_ints("sample_normals", seed=seed, step=step, stream=stream)
    if not torch.is_tensor(sample_ids) or sample_ids.dim() != 1 or sample_ids.dtype.is_floating_point \
            or sample_ids.dtype == torch.bool:
        raise ValueError(f"sample_normals: sample_ids must be a 1-D integer tensor, got "
                         f"{getattr(sample_ids, 'dtype', type(sample_ids).__name__)} {getattr(sample_ids, 'shape', '')}")
    n = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
    pairs = (n + 1) // 2
    if 2 * pairs > 2**31:
        raise ValueError(f"sample_normals: {n} numbers per sample exceed the counter range (2**31)")
    ka, kb = _sample_keys(int(seed), int(step), int(stream), sample_ids)
    x = _hash32(ka, kb, torch.arange(2 * pairs, device=sample_ids.device))  # (B, 2P): U = x / 2^32
    # 1 - U = (2^32 - x) / 2^32 in [2^-32, 1], formed from the integer: log finite, |z| <= 6.7
    radius = (4294967296 - x[:, 0::2]).float().mul_(1.0 / 4294967296.0).log_().mul_(-2.0).sqrt_()  # (B, P)
    angle = x[:, 1::2].float().mul_(2.0 * np.pi / 4294967296.0)  # (B, P) 2 pi U
    z = torch.empty(x.shape, dtype=torch.float32, device=x.device)  # (B, 2P)
    torch.mul(radius, torch.cos(angle), out=z[:, 0::2])
    torch.mul(radius, angle.sin_(), out=z[:, 1::2])
    return z[:, :n].reshape(sample_ids.shape[0], *shape)


@dataclass(frozen=True)
class SampleNoise:
    """The per-sample noise key of one step, ``(seed, step, sample ids, stream)``: what the engines pass as
    the ``generator`` of :func:`alum_pretrain.adversarial.init_delta` for the ALUM random start (row ``b``
    of the batch gets :func:`sample_normals` of ``sample_ids[b]``).  Keep ``sample_ids`` on the batch's
    device: the noise is computed there."""

    seed: int
    step: int
    sample_ids: torch.Tensor
    stream: int = STREAM_ALUM

    def normal(self, shape: Sequence[int]) -> torch.Tensor:
        """``(B, *shape)`` float32 standard normals on ``sample_ids``' device."""
        return sample_normals(self.seed, self.step, self.sample_ids, tuple(shape), self.stream)


def mask_batch(
    input_ids: torch.Tensor,
    rate: float,
    *,
    mask_id: int,
    special_mask: torch.Tensor,
    random_pool: Optional[torch.Tensor],
    seed: int,
    step: int,
    sample_ids: torch.Tensor,
    stream: int = 0,
    continuation: Optional[torch.Tensor] = None,
    mask_prob: float = 0.8,
    random_prob: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mask_tokens` for a whole batch with per-sample randomness, vectorised (no Python loop).

    Row ``b``'s mask is a pure function of ``(seed, step, sample_ids[b], stream)`` and the row's own
    tokens/special/continuation flags: splitting the batch in any way, reordering it, padding it to
    another length or running it on another device gives every sample the same mask.  ``sample_ids``:
    ``(B,)`` non-negative integers, e.g. the global index of the sample within the optimizer step
    (native engine) or the dataset id (fairseq).  Same selection rule and 80/10/10 as :func:`mask_tokens`;
    the draws come from :func:`sample_uniforms` instead of a ``torch.Generator``.  Runs on the device of
    ``input_ids``.  Returns ``(masked_input_ids (B, T), labels (B, T))``; the input is not modified.
    """
    rate = _check_inputs("mask_batch", input_ids, special_mask, continuation, rate, mask_prob, random_prob,
                         random_pool)
    _check_key_ints("mask_batch", seed=seed, step=step, stream=stream)
    B, T = input_ids.shape
    if T >= 2**28:
        raise ValueError(f"mask_batch: sequence length {T} is too long for the per-position counters (< 2**28)")
    _check_sample_ids("mask_batch", sample_ids, B)
    dev = input_ids.device
    ka, kb = _sample_keys(int(seed), int(step), int(stream), sample_ids.to(dev))
    pos = torch.arange(T, device=dev, dtype=torch.int64) * 4  # (T,)
    u_count = _uniforms(ka, kb, torch.full((1,), _KIND_COUNT, device=dev, dtype=torch.int64))[:, 0]  # (B,)
    scores = _uniforms(ka, kb, pos + _KIND_SCORE)  # (B, T) per unit
    decision = _uniforms(ka, kb, pos + _KIND_DECISION)  # (B, T) per unit
    rand_ids = None
    if random_prob > 0:
        assert random_pool is not None
        pool = random_pool.to(dev).long().reshape(-1)
        u = _uniforms(ka, kb, pos + _KIND_RANDOM)  # (B, T)
        rand_ids = pool[(u * pool.numel()).long().clamp_max(pool.numel() - 1)]  # (B, T)
    return _apply_masking(input_ids, special_mask.to(dev),
                          None if continuation is None else continuation.to(dev), rate, u_count, scores,
                          decision, rand_ids, mask_id=mask_id, mask_prob=mask_prob, random_prob=random_prob)


@dataclass
class TokenMasker:
    """:func:`mask_batch` with a run's fixed arguments: the masking config (80/10/10 split, whole words),
    the ``[MASK]`` id, the random-replacement pool and the seed.  Both engines mask through it."""

    cfg: MaskingConfig
    mask_id: int
    random_pool: torch.Tensor  # 1-D ids allowed as random replacements
    seed: int
    _pool_on: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # pool per device

    def mask(self, input_ids: torch.Tensor, special_mask: torch.Tensor, rate: float, step: int,
             sample_ids: torch.Tensor, stream: int = STREAM_MASK,
             continuation: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(masked_input_ids (B, T), labels (B, T))`` on the device of ``input_ids``; ``continuation`` is
        used only with ``cfg.whole_word``."""
        dev = input_ids.device
        pools = self._pool_on  # the pool copied once per device
        if dev not in pools:
            pools[dev] = self.random_pool.to(dev)
        return mask_batch(
            input_ids, rate, mask_id=self.mask_id, special_mask=special_mask, random_pool=pools[dev],
            seed=int(self.seed), step=int(step), sample_ids=sample_ids.to(dev), stream=stream,
            continuation=continuation if self.cfg.whole_word else None,
            mask_prob=self.cfg.mask_prob, random_prob=self.cfg.random_prob)
