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
* **Deterministic and resumable**: masking is drawn at train time from :func:`step_generator`
  ``(seed, step, rank)``, a ``torch.Generator`` seeded from a hash (numpy ``SeedSequence``) of those
  integers, so a resumed run masks each step exactly as an uninterrupted run would.  Draws happen on the
  generator's device (CPU by default) and are moved to the input's device, so the masks do not depend
  on where the batch lives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .config import opt

__all__ = ["MaskingConfig", "SCHEDULES", "mask_rate", "mask_tokens", "step_generator", "IGNORE_INDEX"]

SCHEDULES = ("curriculum", "constant")
IGNORE_INDEX = -100  # label at unselected positions (torch cross_entropy's default ignore_index)


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

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"masking.{name}={getattr(self, name)!r}: {why}")

        if self.schedule not in SCHEDULES:
            raise bad("schedule", f"must be one of {', '.join(SCHEDULES)}")
        for name in ("start_rate", "end_rate", "constant_rate", "mask_prob", "random_prob"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 <= float(v) <= 1.0):
                raise bad(name, "must be a number in [0, 1]")
            setattr(self, name, float(v))
        if isinstance(self.num_phases, bool) or not isinstance(self.num_phases, int) or self.num_phases < 1:
            raise bad("num_phases", "must be an integer >= 1")
        if self.mask_prob + self.random_prob > 1.0 + 1e-12:
            raise bad("random_prob", f"mask_prob + random_prob = {self.mask_prob + self.random_prob} must be <= 1")
        if not isinstance(self.whole_word, bool):
            raise bad("whole_word", "must be true or false")

    def rate_at(self, step: int, total_steps: int) -> float:
        """The masking rate at optimizer step ``step`` of ``total_steps`` (exact integer phase arithmetic)."""
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


def mask_rate(progress: float, cfg: MaskingConfig) -> float:
    """The masking rate at training progress ``progress = step / total_steps`` (>= 1 clamps to the last phase)."""
    p = float(progress)
    if not math.isfinite(p) or p < 0:
        raise ValueError(f"mask_rate: progress={progress!r} must be a finite number >= 0 (step / total_steps)")
    if cfg.schedule == "constant":
        return cfg.constant_rate
    # The 1e-12 slack absorbs float error of step/total (e.g. 0.6 * 5 = 2.9999999999999996 would
    # otherwise land in the previous phase); rate_at() is exact.
    phase = min(int(math.floor(p * cfg.num_phases + 1e-12)), cfg.num_phases - 1)
    return cfg._phase_rate(phase)


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
    step``).  ``stream`` separates consumers of the same step, e.g. 0 = masking, 1 = the ALUM random
    start, or ``(consumer, micro_batch)`` under gradient accumulation.
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
    if input_ids.dim() != 2:
        raise ValueError(f"mask_tokens: input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"mask_tokens: input_ids must be an integer tensor, got {input_ids.dtype}")
    if tuple(special_mask.shape) != tuple(input_ids.shape) or special_mask.dtype != torch.bool:
        raise ValueError(f"mask_tokens: special_mask must be a bool tensor of shape {tuple(input_ids.shape)}, "
                         f"got {special_mask.dtype} {tuple(special_mask.shape)}")
    if continuation is not None and (tuple(continuation.shape) != tuple(input_ids.shape)
                                     or continuation.dtype != torch.bool):
        raise ValueError(f"mask_tokens: continuation must be a bool tensor of shape {tuple(input_ids.shape)}, "
                         f"got {continuation.dtype} {tuple(continuation.shape)}")
    rate = float(rate)
    if not (0.0 <= rate <= 1.0):
        raise ValueError(f"mask_tokens: rate={rate} must be in [0, 1]")
    if not (0.0 <= mask_prob <= 1.0 and 0.0 <= random_prob <= 1.0 and mask_prob + random_prob <= 1.0 + 1e-12):
        raise ValueError(f"mask_tokens: mask_prob={mask_prob}, random_prob={random_prob} must be in [0, 1] "
                         "with a sum <= 1")
    if random_prob > 0 and (random_pool is None or random_pool.numel() == 0):
        raise ValueError("mask_tokens: random_pool must hold at least one id when random_prob > 0")

    out_device = input_ids.device
    gdev = generator.device if generator is not None else torch.device("cpu")
    B, T = input_ids.shape

    cand = ~special_mask.to(gdev)  # (B, T) maskable tokens
    # Units = what gets selected: single tokens, or whole words (start token + continuations).
    if continuation is None:
        unit_start = cand
    else:
        cont = continuation.to(gdev)
        prev_cand = torch.zeros_like(cand)
        prev_cand[:, 1:] = cand[:, :-1]
        unit_start = cand & (~cont | ~prev_cand)  # a continuation after a special/position 0 starts a word
    unit_id = unit_start.long().cumsum(1) - 1  # (B, T) index of each token's unit (valid where cand)
    unit_id = unit_id.clamp_min(0)
    n_units = unit_start.sum(1)  # (B,)

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

    # k = floor(rate * n + U): E[k] = rate * n exactly; at least one when rate > 0 and n > 0.
    k = torch.floor(rate * n_units.double() + u_count.double()).long()  # (B,)
    if rate > 0:
        k = torch.maximum(k, (n_units > 0).long())
    k = torch.minimum(k, n_units)

    # Uniform selection of k units without replacement: the k smallest random scores among valid units.
    unit_index = torch.arange(T, device=gdev).expand(B, T)  # (B, T)
    scores = scores.masked_fill(unit_index >= n_units[:, None], 2.0)  # invalid unit slots sort last
    order = scores.argsort(dim=1)
    rank = torch.empty_like(order).scatter_(1, order, unit_index.contiguous())  # rank of unit j in row b
    unit_selected = rank < k[:, None]  # (B, T) indexed by unit

    selected = cand & unit_selected.gather(1, unit_id)  # (B, T) tokens
    dec = decision.gather(1, unit_id)  # per-unit decision broadcast to its tokens
    to_mask = selected & (dec < mask_prob)
    to_random = selected & (dec >= mask_prob) & (dec < mask_prob + random_prob)

    ids = input_ids.to(gdev)
    labels = torch.where(selected, ids, torch.full_like(ids, IGNORE_INDEX))
    masked = ids.masked_fill(to_mask, mask_id)
    if rand_ids is not None:
        masked = torch.where(to_random, rand_ids.to(ids.dtype), masked)
    return masked.to(out_device), labels.to(out_device)
