"""Masking (alum_pretrain/masking.py): the ALUM curriculum (paper Sec. 2.3), 80/10/10, whole words, determinism.

The schedule reference is the paper's table written out by hand ("from 5% to 25% with 5% increment for
every 20% of training epochs"); the masking checks are exact per-sequence counts and binomial
tolerances, computed here without calling the module.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from alum_pretrain.masking import IGNORE_INDEX, MaskingConfig, mask_tokens, step_generator

MASK_ID = 3


# --------------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------------

PAPER_TABLE = [  # (progress, rate) at and around the phase boundaries
    (0.0, 0.05), (0.1, 0.05), (0.2 - 1e-9, 0.05), (0.2, 0.10), (0.4 - 1e-9, 0.10), (0.4, 0.15),
    (0.6 - 1e-9, 0.15), (0.6, 0.20), (0.8 - 1e-9, 0.20), (0.8, 0.25), (0.999, 0.25), (1.0, 0.25), (2.5, 0.25),
]


def mask_rate(progress: float, cfg: MaskingConfig) -> float:
    """The rate at training progress ``progress`` (as step / total_steps: the nearest fraction with a
    denominator up to 10**12, so 1/3 is one step of three), through the one schedule function rate_at."""
    f = Fraction(progress).limit_denominator(10 ** 12)
    return cfg.rate_at(f.numerator, f.denominator)


@pytest.mark.parametrize("progress,rate", PAPER_TABLE)
def test_curriculum_at_phase_boundaries(progress, rate):
    assert mask_rate(progress, MaskingConfig()) == pytest.approx(rate, abs=1e-12)


def test_rate_at_integer_steps_matches_exact_progress():
    cfg = MaskingConfig()
    total = 1000
    rates = [0.05, 0.10, 0.15, 0.20, 0.25]
    for step in range(0, 1300, 7):
        want = rates[min(step // 200, 4)]
        assert cfg.rate_at(step, total) == pytest.approx(want, abs=1e-12)
    # exactly at each boundary step (where float step/total * 5 may round below an integer): the phase is
    # floor of the exact fraction step/total * 5
    for total in (3, 7, 10, 30, 999, 12345):
        for step in range(total + 1):
            want = rates[min(int(Fraction(step, total) * 5), 4)]
            assert cfg.rate_at(step, total) == want, (step, total)


def test_constant_and_custom_schedules():
    assert all(mask_rate(p, MaskingConfig(schedule="constant")) == 0.15 for p in (0, 0.3, 0.99, 1, 5))
    assert MaskingConfig(schedule="constant").rate_at(17, 20) == 0.15
    c = MaskingConfig(start_rate=0.1, end_rate=0.3, num_phases=3)
    assert [mask_rate(p, c) for p in (0, 0.33, 1 / 3, 0.66, 2 / 3, 1.0)] == pytest.approx([0.1, 0.1, 0.2, 0.2, 0.3, 0.3])
    assert mask_rate(0.7, MaskingConfig(num_phases=1)) == 0.05


@pytest.mark.parametrize("kwargs,field", [
    (dict(schedule="linear"), "schedule"),
    (dict(start_rate=-0.1), "start_rate"),
    (dict(end_rate=1.5), "end_rate"),
    (dict(constant_rate="x"), "constant_rate"),
    (dict(num_phases=0), "num_phases"),
    (dict(mask_prob=0.9, random_prob=0.2), "random_prob"),
    (dict(whole_word="yes"), "whole_word"),
])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"masking\.{field}="):
        MaskingConfig(**kwargs)


def test_bad_progress_and_steps():
    with pytest.raises(ValueError, match="step"):
        MaskingConfig().rate_at(-1, 10)
    with pytest.raises(ValueError, match="step"):
        MaskingConfig().rate_at(float("nan"), 10)
    with pytest.raises(ValueError, match="total_steps"):
        MaskingConfig().rate_at(3, 0)


# --------------------------------------------------------------------------------------------------
# Masking
# --------------------------------------------------------------------------------------------------


def batch(B=64, T=256, seed=0):
    """ids in [1000, 2000) (disjoint from the random pool, so a random replacement is always visible),
    [CLS]=1 at 0, [SEP]=2 in the middle and at the end of the real part, padding (0) after a random length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (B, T), generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    pos = torch.arange(T).expand(B, T)
    ids[:, 0] = 1
    ids[torch.arange(B), lengths // 2] = 2
    ids[torch.arange(B), lengths - 1] = 2
    ids = ids.masked_fill(pos >= lengths[:, None], 0)
    special = (ids == 0) | (ids == 1) | (ids == 2)
    return ids, special


POOL = torch.arange(5000, 9000)


def test_80_10_10_proportions_and_specials_never_selected():
    ids, special = batch()
    masked, labels = mask_tokens(ids, 0.15, mask_id=MASK_ID, special_mask=special, random_pool=POOL,
                                 generator=step_generator(0, 0))
    sel = labels != IGNORE_INDEX
    assert not (sel & special).any()  # specials and padding never selected
    assert torch.equal(masked[special], ids[special])
    assert torch.equal(labels[sel], ids[sel])  # labels = original ids
    assert torch.equal(masked[~sel], ids[~sel])  # unselected tokens untouched
    n = int(sel.sum())
    n_mask = int((masked[sel] == MASK_ID).sum())
    n_rand = int(((masked[sel] >= 5000) & (masked[sel] < 9000)).sum())
    n_same = int((masked[sel] == ids[sel]).sum())
    assert n_mask + n_rand + n_same == n  # nothing else happens
    for count, p in ((n_mask, 0.8), (n_rand, 0.1), (n_same, 0.1)):
        tol = 5 * math.sqrt(p * (1 - p) / n)  # 5 binomial standard deviations
        assert abs(count / n - p) < tol, (count, n, p)


@pytest.mark.parametrize("rate", [0.05, 0.15, 0.25])
def test_per_sequence_count_is_floor_or_ceil_and_mean_rate_matches(rate):
    ids, special = batch(B=200, T=128, seed=1)
    _, labels = mask_tokens(ids, rate, mask_id=MASK_ID, special_mask=special, random_pool=POOL,
                            generator=step_generator(1, 2))
    n = (~special).sum(1).double()
    k = (labels != IGNORE_INDEX).sum(1).double()
    lo = torch.clamp(torch.floor(rate * n), min=1)
    hi = torch.clamp(torch.ceil(rate * n), min=1)
    assert torch.all((k == lo) | (k == hi))
    # E[k] = rate * n exactly (k - rate n is a centred Bernoulli in [-1, 1]): the mean over 200 rows is within 5 sigma
    dev = (k - rate * n).sum() / n.sum()
    assert abs(dev.item()) < 5 * 0.5 * math.sqrt(len(n)) / n.sum().item()


def test_rate_zero_and_at_least_one():
    ids, special = batch(B=8, T=32)
    _, labels = mask_tokens(ids, 0.0, mask_id=MASK_ID, special_mask=special, random_pool=POOL,
                            generator=step_generator(0, 0))
    assert (labels == IGNORE_INDEX).all()
    _, labels = mask_tokens(ids, 1e-4, mask_id=MASK_ID, special_mask=special, random_pool=POOL,
                            generator=step_generator(0, 0))
    assert torch.equal((labels != IGNORE_INDEX).sum(1), torch.ones(8, dtype=torch.long))
    # a row with nothing maskable selects nothing
    special[3] = True
    _, labels = mask_tokens(ids, 0.5, mask_id=MASK_ID, special_mask=special, random_pool=POOL,
                            generator=step_generator(0, 0))
    assert (labels[3] == IGNORE_INDEX).all()


def test_input_not_modified_and_device_dtype_kept():
    ids, special = batch(B=4, T=16)
    ids32 = ids.to(torch.int32)
    before = ids32.clone()
    masked, labels = mask_tokens(ids32, 0.5, mask_id=MASK_ID, special_mask=special, random_pool=POOL,
                                 generator=step_generator(0, 0))
    assert torch.equal(ids32, before)
    assert masked.dtype == torch.int32 and labels.dtype == torch.int32


def words_batch(B=32, T=96, seed=3):
    """Rows of words of 1-4 pieces; continuation marks pieces after the first; [CLS]/[SEP]/padding special."""
    g = torch.Generator().manual_seed(seed)
    ids, special = batch(B, T, seed)
    cont = torch.zeros(B, T, dtype=torch.bool)
    word_of = torch.full((B, T), -1)
    for b in range(B):
        t, w = 0, 0
        while t < T:
            if special[b, t]:
                t += 1
                continue
            length = int(torch.randint(1, 5, (1,), generator=g))
            for j in range(length):
                if t + j >= T or special[b, t + j]:
                    break
                cont[b, t + j] = j > 0
                word_of[b, t + j] = w
                length = j + 1
            t += length
            w += 1
    return ids, special, cont, word_of


def test_whole_word_selects_complete_words_with_one_decision():
    ids, special, cont, word_of = words_batch()
    rate = 0.2
    masked, labels = mask_tokens(ids, rate, mask_id=MASK_ID, special_mask=special, random_pool=POOL,
                                 generator=step_generator(5, 6), continuation=cont)
    sel = labels != IGNORE_INDEX
    assert not (sel & special).any()
    n_sel_words, n_words = 0, 0
    kinds = {"mask": 0, "random": 0, "same": 0}
    for b in range(ids.shape[0]):
        words = sorted(set(word_of[b][word_of[b] >= 0].tolist()))
        chosen = 0
        for w in words:
            toks = word_of[b] == w
            s = sel[b][toks]
            assert s.all() or not s.any(), f"row {b} word {w} partially selected"
            if s.all():
                chosen += 1
                m = masked[b][toks]
                if (m == MASK_ID).all():
                    kinds["mask"] += 1
                elif ((m >= 5000) & (m < 9000)).all():
                    kinds["random"] += 1
                elif torch.equal(m, ids[b][toks]):
                    kinds["same"] += 1
                else:
                    raise AssertionError(f"row {b} word {w}: mixed 80/10/10 decisions {m.tolist()}")
        # rate applies to words: floor or ceil of rate * n_words (at least one)
        assert chosen in {max(1, math.floor(rate * len(words))), max(1, math.ceil(rate * len(words)))}
        n_sel_words += chosen
        n_words += len(words)
    assert kinds["mask"] > kinds["random"] > 0 and kinds["same"] > 0
    # expected token fraction = rate (each word included with marginal probability rate)
    tok_rate = sel.sum().item() / (~special).sum().item()
    assert abs(tok_rate - rate) < 0.03


def test_whole_word_continuation_after_special_starts_a_word():
    ids = torch.tensor([[1, 1500, 1501, 2, 1600, 1601, 1602, 2]])
    special = torch.tensor([[True, False, False, True, False, False, False, True]])
    cont = torch.tensor([[True, True, True, False, True, True, True, False]])  # every piece "continues"
    seen = set()
    for step in range(40):
        _, labels = mask_tokens(ids, 0.5, mask_id=MASK_ID, special_mask=special, random_pool=POOL,
                                generator=step_generator(0, step), continuation=cont)
        sel = tuple((labels[0] != IGNORE_INDEX).tolist())
        seen.add(sel)
    # two words: {1500, 1501} and {1600, 1601, 1602}; exactly one of them per draw (rate 0.5 of 2 words)
    assert seen == {(False, True, True, False, False, False, False, False),
                    (False, False, False, False, True, True, True, False)}


# --------------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------------


def test_same_seed_step_rank_same_masks_and_different_otherwise():
    ids, special = batch(B=16, T=64)

    def run(seed, step, rank=0, stream=0):
        return mask_tokens(ids, 0.15, mask_id=MASK_ID, special_mask=special, random_pool=POOL,
                           generator=step_generator(seed, step, rank, stream=stream))

    a = run(7, 100)
    b = run(7, 100)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for other in (run(7, 101), run(7, 100, rank=1), run(8, 100), run(7, 100, stream=1)):
        assert not torch.equal(a[1], other[1])


def test_step_generator_is_a_pure_function_of_its_inputs():
    x = torch.rand(5, generator=step_generator(1, 2, 3))
    torch.rand(100)  # global RNG use in between changes nothing
    y = torch.rand(5, generator=step_generator(1, 2, 3))
    assert torch.equal(x, y)
    assert not torch.equal(x, torch.rand(5, generator=step_generator(1, 3, 2)))  # not a sum/commutative mix
    with pytest.raises(ValueError, match="step"):
        step_generator(0, -1)


def test_bad_inputs():
    ids, special = batch(B=2, T=8)
    with pytest.raises(ValueError, match="special_mask"):
        mask_tokens(ids, 0.1, mask_id=MASK_ID, special_mask=special.long(), random_pool=POOL)
    with pytest.raises(ValueError, match="rate"):
        mask_tokens(ids, 1.5, mask_id=MASK_ID, special_mask=special, random_pool=POOL)
    with pytest.raises(ValueError, match="random_pool"):
        mask_tokens(ids, 0.1, mask_id=MASK_ID, special_mask=special, random_pool=None)
    masked, labels = mask_tokens(ids, 0.5, mask_id=MASK_ID, special_mask=special, random_pool=None,
                                 random_prob=0.0, generator=step_generator(0, 0))
    assert (labels != IGNORE_INDEX).any()
