"""Vectorised per-sample masking (``masking.mask_batch`` / ``sample_uniforms``).

What the engines rely on: a sample's mask is a pure function of (seed, step, sample id, stream) and its own
tokens - so any split of the global batch (processes, micro-batches), any order, any padded length gives
the same masks, and a resumed run re-draws them exactly.  The statistics are checked against the rule
written out here (k = floor(rate * n + U), at least one; 80/10/10; never a special), not against the code.
"""

from __future__ import annotations

import math

import pytest
import torch

from alum_pretrain.masking import IGNORE_INDEX, MaskingConfig, mask_batch, sample_uniforms

MASK_ID = 4
POOL = torch.arange(10, 1000)


def _batch(B=64, T=48, seed=0, pad_every=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 1000, (B, T), generator=g)
    ids[:, 0] = 2
    ids[:, T // 2] = 3
    ids[:, -1] = 3
    lengths = torch.full((B,), T)
    lengths[::pad_every] = T - 1 - torch.randint(0, T // 3, (len(lengths[::pad_every]),), generator=g)
    pos = torch.arange(T)[None, :]
    ids = torch.where(pos >= lengths[:, None], torch.zeros_like(ids), ids)
    special = (ids == 0) | (ids == 2) | (ids == 3)
    return ids, special


def _mask(ids, special, sids, rate=0.2, seed=7, step=11, stream=0, **kw):
    return mask_batch(ids, rate, mask_id=MASK_ID, special_mask=special, random_pool=POOL, seed=seed, step=step,
                      sample_ids=sids, stream=stream, **kw)


def test_any_split_order_or_padding_gives_the_same_masks():
    ids, special = _batch()
    B, T = ids.shape
    sids = torch.arange(100, 100 + B)
    m, lab = _mask(ids, special, sids)
    # one sample at a time
    for i in range(0, B, 7):
        mi, li = _mask(ids[i:i + 1], special[i:i + 1], sids[i:i + 1])
        assert torch.equal(mi[0], m[i]) and torch.equal(li[0], lab[i])
    # uneven chunks
    parts = [slice(0, 5), slice(5, 30), slice(30, B)]
    mc = torch.cat([_mask(ids[s], special[s], sids[s])[0] for s in parts])
    assert torch.equal(mc, m)
    # a permutation of the rows
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(1))
    mp, lp = _mask(ids[perm], special[perm], sids[perm])
    assert torch.equal(mp, m[perm]) and torch.equal(lp, lab[perm])
    # the same samples padded to a longer length: the real positions are masked identically
    extra = 17
    ids_l = torch.cat([ids, torch.zeros(B, extra, dtype=ids.dtype)], 1)
    special_l = torch.cat([special, torch.ones(B, extra, dtype=torch.bool)], 1)
    ml, ll = _mask(ids_l, special_l, sids)
    assert torch.equal(ml[:, :T], m) and torch.equal(ll[:, :T], lab)
    assert (ll[:, T:] == IGNORE_INDEX).all()
    # int32 ids: same masks (dtype of the batch is not part of the key)
    m32, _ = _mask(ids.int(), special, sids)
    assert m32.dtype == torch.int32 and torch.equal(m32.long(), m)


def test_masks_are_keyed_by_seed_step_stream_and_sample_id():
    ids, special = _batch()
    sids = torch.arange(ids.shape[0])
    base = _mask(ids, special, sids)[1]
    assert torch.equal(base, _mask(ids, special, sids.clone())[1])  # pure function
    for kw in (dict(seed=8), dict(step=12), dict(stream=1)):
        other = _mask(ids, special, sids, **kw)[1]
        assert not torch.equal(base, other), kw
    # sample ids: shifting them changes every row's mask (rows are not keyed by position in the batch)
    shifted = _mask(ids, special, sids + 1)[1]
    assert (shifted != base).any(1).float().mean() > 0.9
    # large 64-bit seeds/steps and ids are accepted and distinct
    a = _mask(ids, special, sids + 2**40, seed=2**63 + 5, step=2**33)[1]
    b = _mask(ids, special, sids + 2**40, seed=2**63 + 5, step=2**33 + 1)[1]
    assert not torch.equal(a, b)


def test_selection_count_and_80_10_10_follow_the_rule():
    """Per row: k = floor(rate * n + U) in {floor(rate n), ceil(rate n)} (>= 1), never a special, labels =
    original ids; over many rows: mean k = rate * n and the 80/10/10 split, within binomial tolerance."""
    ids, special = _batch(B=2000, T=40, seed=3)
    rate = 0.15
    m, lab = _mask(ids, special, torch.arange(2000), rate=rate)
    sel = lab != IGNORE_INDEX
    assert not (sel & special).any()
    assert torch.equal(lab[sel], ids[sel])
    assert torch.equal(m[~sel], ids[~sel])
    n = (~special).sum(1).double()
    k = sel.sum(1).double()
    lo, hi = torch.floor(rate * n), torch.ceil(rate * n)
    assert ((k == lo) | (k == hi) | ((k == 1) & (rate * n < 1))).all()
    # E[k] = rate * n exactly (fractional parts are rounded up with probability = fraction)
    frac = rate * n - lo
    var = (frac * (1 - frac)).sum()
    assert abs(float(k.sum() - (rate * n).sum())) < 5 * math.sqrt(float(var)) + 1
    total = int(sel.sum())
    n_mask = int((m[sel] == MASK_ID).sum())
    unchanged = int((m[sel] == ids[sel]).sum())
    n_rand = total - n_mask - unchanged  # a random replacement can equal the original (p ~ 1/990): negligible
    for got, p in ((n_mask, 0.8), (n_rand, 0.1), (unchanged, 0.1)):
        sd = math.sqrt(total * p * (1 - p))
        assert abs(got - total * p) < 5 * sd + 0.01 * total, (got, total * p)
    replaced = sel & (m != MASK_ID) & (m != ids)
    assert torch.isin(m[replaced], POOL).all()


def test_rate_zero_and_one_and_short_rows():
    ids, special = _batch(B=50, T=20)
    sids = torch.arange(50)
    _, lab0 = _mask(ids, special, sids, rate=0.0)
    assert (lab0 == IGNORE_INDEX).all()
    _, lab1 = _mask(ids, special, sids, rate=1.0)
    assert torch.equal(lab1 != IGNORE_INDEX, ~special)
    # a row with 2 maskable tokens and rate 0.05: still exactly one selected
    short = torch.tensor([[2, 50, 60, 3, 0, 0]])
    sp = (short == 0) | (short == 2) | (short == 3)
    _, lab = mask_batch(short, 0.05, mask_id=MASK_ID, special_mask=sp, random_pool=POOL, seed=0, step=0,
                        sample_ids=torch.tensor([9]))
    assert int((lab != IGNORE_INDEX).sum()) == 1
    # an all-special row selects nothing
    _, lab = mask_batch(torch.tensor([[2, 3, 0]]), 0.5, mask_id=MASK_ID, special_mask=torch.ones(1, 3, dtype=torch.bool),
                        random_pool=POOL, seed=0, step=0, sample_ids=torch.tensor([0]))
    assert (lab == IGNORE_INDEX).all()


def test_whole_word_masking_selects_and_treats_words_as_units():
    g = torch.Generator().manual_seed(5)
    B, T = 400, 30
    ids = torch.randint(10, 1000, (B, T), generator=g)
    ids[:, 0] = 2
    ids[:, -1] = 3
    special = (ids == 2) | (ids == 3)
    cont = (torch.rand(B, T, generator=g) < 0.4) & ~special
    cont[:, 1] = False
    m, lab = mask_batch(ids, 0.2, mask_id=MASK_ID, special_mask=special, random_pool=POOL, seed=1, step=2,
                        sample_ids=torch.arange(B), continuation=cont, random_prob=0.0, mask_prob=0.5)
    sel = lab != IGNORE_INDEX
    words_total = words_sel = 0
    for b in range(B):
        t = 1
        while t < T - 1:  # walk words: a start token + its continuations
            e = t + 1
            while e < T - 1 and cont[b, e]:
                e += 1
            s = sel[b, t:e]
            assert s.all() or not s.any(), (b, t, e)  # whole word or nothing
            if s.any():
                words_sel += 1
                kinds = m[b, t:e] == MASK_ID
                assert kinds.all() or not kinds.any()  # one 80/10/10 decision per word
            words_total += 1
            t = e
    assert abs(words_sel / words_total - 0.2) < 0.03


def test_sample_uniforms_are_uniform_and_uncorrelated():
    """Chi-square on 20 bins, neighbouring ids and counters uncorrelated, keys depend on every input."""
    u = sample_uniforms(3, 4, torch.arange(500), 0, torch.arange(400))  # (500, 400)
    assert u.dtype == torch.float64 and u.min() >= 0 and u.max() < 1
    counts = torch.histc(u.float(), bins=20, min=0, max=1)
    expected = u.numel() / 20
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 60  # 19 dof: p(chi2 > 60) ~ 4e-6
    c = u - 0.5

    def corr(a, b):
        return float((a * b).mean() / (a.std() * b.std()))

    assert abs(corr(c[1:], c[:-1])) < 0.01  # neighbouring sample ids
    assert abs(corr(c[:, 1:], c[:, :-1])) < 0.01  # neighbouring counters
    v = sample_uniforms(3, 5, torch.arange(500), 0, torch.arange(400))  # next step
    w = sample_uniforms(3, 4, torch.arange(500), 1, torch.arange(400))  # another stream
    assert abs(corr(c, v - 0.5)) < 0.01 and abs(corr(c, w - 0.5)) < 0.01
    # the first draw of 100k consecutive ids: no structure in the low bits either
    first = sample_uniforms(0, 0, torch.arange(100_000), 0, torch.zeros(1, dtype=torch.long))[:, 0]
    bits = (first * 2**32).long() & 1
    assert abs(float(bits.double().mean()) - 0.5) < 0.01


def test_bad_arguments_name_the_problem():
    ids, special = _batch(B=4, T=10)
    with pytest.raises(ValueError, match="sample_ids must be a 1-D tensor of 4"):
        _mask(ids, special, torch.arange(3))
    with pytest.raises(ValueError, match="sample_ids must be >= 0"):
        _mask(ids, special, torch.tensor([0, 1, -2, 3]))
    with pytest.raises(ValueError, match="sample_ids must be integers"):
        _mask(ids, special, torch.arange(4).float())
    with pytest.raises(ValueError, match="step=-1"):
        _mask(ids, special, torch.arange(4), step=-1)
    with pytest.raises(ValueError, match="special_mask"):
        _mask(ids, special.long(), torch.arange(4))
    with pytest.raises(ValueError, match="rate"):
        _mask(ids, special, torch.arange(4), rate=1.5)


def test_native_masker_uses_mask_batch_with_global_sample_ids():
    """The engine's Masker = mask_batch keyed by the global sample index; the log counts match the labels."""
    from alum_pretrain.engine.step import Masker
    from alum_pretrain.masking import STREAM_MASK

    ids, special = _batch(B=8, T=16)
    raw = {"input_ids": ids, "special_mask": special, "attention_mask": (ids != 0).long()}
    cfg = MaskingConfig()
    out = Masker(cfg, MASK_ID, POOL, seed=5)(raw, 0.25, 3, torch.arange(16, 24))
    m, lab = mask_batch(ids, 0.25, mask_id=MASK_ID, special_mask=special, random_pool=POOL, seed=5, step=3,
                        sample_ids=torch.arange(16, 24), stream=STREAM_MASK)
    assert torch.equal(out["input_ids"], m) and torch.equal(out["labels"], lab)
    assert out["n_masked"] == int((lab != IGNORE_INDEX).sum()) == out["masked_pos"].numel()
    assert torch.equal(out["mlm_targets"], lab.reshape(-1)[out["masked_pos"]])


# ---- the ALUM random start: per-sample normals from the same counter-based uniforms --------------------

def test_sample_normals_are_box_muller_of_the_sample_uniforms():
    """Reference from the Box-Muller equations (Box & Muller 1958) on the public uniforms, in Python floats:
    z_2p = sqrt(-2 ln(1 - U_2p)) cos(2 pi U_2p+1), z_2p+1 = sqrt(-2 ln(1 - U_2p)) sin(2 pi U_2p+1)."""
    from alum_pretrain.masking import STREAM_ALUM, sample_normals

    ids = torch.tensor([0, 7, 123456789012])
    z = sample_normals(5, 9, ids, (3, 5))  # (B, 3, 5): 15 numbers per sample, the last pair half used
    assert z.shape == (3, 3, 5) and z.dtype == torch.float32
    u = sample_uniforms(5, 9, ids, STREAM_ALUM, torch.arange(16)).tolist()  # (B, 16)
    for b in range(3):
        ref = []
        for p in range(8):
            r = math.sqrt(-2.0 * math.log(1.0 - u[b][2 * p]))
            ref += [r * math.cos(2 * math.pi * u[b][2 * p + 1]), r * math.sin(2 * math.pi * u[b][2 * p + 1])]
        assert torch.allclose(z[b].reshape(-1).double(), torch.tensor(ref[:15], dtype=torch.float64), atol=1e-5)


def test_sample_normals_follow_the_sample_not_the_batch_or_padding():
    from alum_pretrain.adversarial import init_delta
    from alum_pretrain.masking import SampleNoise, sample_normals

    ids = torch.tensor([4, 9, 2, 31])
    whole = sample_normals(1, 2, ids, (6, 8))
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.equal(sample_normals(1, 2, ids[perm], (6, 8)), whole[perm])  # place in the batch
    assert torch.equal(sample_normals(1, 2, ids[1:3], (6, 8)), whole[1:3])  # batch composition
    assert torch.equal(sample_normals(1, 2, ids, (10, 8))[:, :6], whole)  # padded length
    assert not torch.equal(sample_normals(1, 3, ids, (6, 8)), whole)  # the step
    assert not torch.equal(sample_normals(1, 2, ids, (6, 8), stream=0), whole)  # the stream
    # init_delta with the key: sigma * z, zero at padding, float32 for any embedding dtype
    pad = torch.ones(4, 6, dtype=torch.bool)
    pad[1, 4:] = False
    d = init_delta(torch.zeros(4, 6, 8, dtype=torch.bfloat16), pad, 1e-5, SampleNoise(1, 2, ids))
    assert d.dtype == torch.float32 and torch.equal(d, whole * 1e-5 * pad[..., None])
    with pytest.raises(ValueError, match="3 sample ids for a batch of 4"):
        init_delta(torch.zeros(4, 6, 8), None, 1e-5, SampleNoise(1, 2, ids[:3]))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        sample_normals(1, 2, ids.float(), (6, 8))


def test_sample_normals_are_standard_normal_and_uncorrelated():
    from alum_pretrain.masking import sample_normals

    z = sample_normals(3, 4, torch.arange(400), (50, 8)).double().reshape(400, -1)  # (400, 400)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1.0) < 0.01
    assert abs(float((z ** 4).mean()) - 3.0) < 0.1  # the normal's kurtosis
    # P(|z| > 1.96) = 0.05; P(z < 0) = 0.5
    assert abs(float((z.abs() > 1.959964).double().mean()) - 0.05) < 0.003
    assert abs(float((z < 0).double().mean()) - 0.5) < 0.005

    def corr(a, b):
        return float(((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std()))

    assert abs(corr(z[:, 0::2], z[:, 1::2])) < 0.01  # the cosine and sine of one pair
    assert abs(corr(z[1:], z[:-1])) < 0.01  # neighbouring sample ids
    assert abs(corr(z[:, 2:], z[:, :-2])) < 0.01  # neighbouring pairs
