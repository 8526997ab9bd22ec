"""GRPO/RLOO group advantages: exact zeros for equal scores at every dtype, the epsilon, batch scaling
(also over fake data-parallel ranks)."""

import math

import pytest
import torch
from fake_reduce import run_ranks
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from rlhfkit.algos import group_advantages, rloo_advantages
from rlhfkit.algos.advantages import GROUP_STD_EPS

D = torch.float64
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SCALES = ["group", "batch", "none"]


# --- equal scores -------------------------------------------------------------------------------

def test_equal_float32_scores_give_exact_zero():
    # The float32 mean of eight 3.71 is one rounding step off; divided by (std ~ 5e-7) + eps it
    # must still give 0, not an order-1 advantage.
    adv = group_advantages(torch.full((8,), 3.71), 8)
    assert (adv == 0).all(), adv
    assert (rloo_advantages(torch.full((8,), 3.71), 8) == 0).all()


@settings(max_examples=300, deadline=None)
@given(value=st.floats(-1e4, 1e4, allow_nan=False, width=32), group_size=st.integers(1, 64),
       groups=st.integers(1, 3), dtype=st.sampled_from(DTYPES), scale=st.sampled_from(SCALES),
       eps=st.sampled_from([GROUP_STD_EPS, 1e-6, 0.0]))
def test_identical_group_is_exactly_zero(value, group_size, groups, dtype, scale, eps):
    scores = torch.full((groups * group_size,), value, dtype=dtype)  # value rounded to dtype
    adv = group_advantages(scores, group_size, scale=scale, eps=eps)
    assert adv.dtype == dtype and (adv == 0).all()
    if group_size > 1:
        assert (rloo_advantages(scores, group_size) == 0).all()


@settings(max_examples=200, deadline=None)
@given(data=st.data(), group_size=st.integers(2, 16), groups=st.integers(2, 4),
       dtype=st.sampled_from(DTYPES), scale=st.sampled_from(SCALES))
def test_an_equal_group_among_others_is_exactly_zero(data, group_size, groups, dtype, scale):
    # Other groups (and with scale="batch" the batch std they create) cannot leak into it.
    vals = data.draw(st.lists(st.floats(-100, 100, width=16), min_size=groups * group_size,
                              max_size=groups * group_size))
    scores = torch.tensor(vals, dtype=dtype)
    k = data.draw(st.integers(0, groups - 1))
    scores[k * group_size:(k + 1) * group_size] = scores[k * group_size]
    adv = group_advantages(scores, group_size, scale=scale).view(groups, group_size)
    assert (adv[k] == 0).all()
    assert (rloo_advantages(scores, group_size).view(groups, group_size)[k] == 0).all()


@settings(max_examples=200, deadline=None)
@given(base=st.floats(-100, 100, width=32), ulps=st.lists(st.integers(0, 4), min_size=2, max_size=16),
       scale=st.sampled_from(["group", "batch"]))
def test_near_equal_float32_scores_are_not_blown_up(base, ulps, scale):
    # Scores a few float32 rounding steps apart: |A| <= max|R - mean| / eps <= spread / eps, so
    # rounding noise stays well below 1 for |R| up to ~100 (with eps = 1e-6 it reached order 1).
    x = torch.tensor([base], dtype=torch.float32)
    vals = []
    for k in ulps:
        v = x.clone()
        for _ in range(k):
            v = torch.nextafter(v, torch.tensor([math.inf]))
        vals.append(v)
    scores = torch.cat(vals)
    spread = (scores.max().double() - scores.min().double()).item()
    adv = group_advantages(scores, len(ulps), scale=scale)
    assert adv.abs().max().item() <= spread / GROUP_STD_EPS * (1 + 1e-6) + 1e-12
    if abs(base) <= 10:  # one float32 step is <= 1.2e-7 * |R|: |A| <= 0.012 per step of spread
        assert adv.abs().max().item() <= 0.012 * max(ulps)


def test_one_ulp_apart_by_hand():
    # seven 3.71 and one ulp above: spread 2.38e-7, std = spread * sqrt(1/8) = 8.43e-8; the high
    # score's advantage is (7/8 spread) / (std + 1e-4) = 2.08e-3
    s = torch.full((8,), 3.71)
    s[-1] = torch.nextafter(s[-1], torch.tensor(math.inf))
    spread = s[-1].double() - s[0].double()
    expected = (7 / 8 * spread / (spread * math.sqrt(1 / 8) + 1e-4)).item()
    adv = group_advantages(s, 8)
    assert adv[-1].item() == pytest.approx(expected, rel=1e-6) and expected == pytest.approx(2.08e-3, rel=0.01)


# --- invariances --------------------------------------------------------------------------------

finite = st.floats(-50, 50, allow_nan=False)
sizeable = finite.filter(lambda x: x == 0 or abs(x) >= 1e-100)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), group_size=st.integers(1, 8), groups=st.integers(1, 4),
       shift=finite, scale=st.sampled_from(SCALES))
def test_translation_invariance(data, group_size, groups, shift, scale):
    vals = data.draw(st.lists(finite, min_size=groups * group_size, max_size=groups * group_size))
    s = torch.tensor(vals, dtype=D)
    assert_close(group_advantages(s + shift, group_size, scale=scale),
                 group_advantages(s, group_size, scale=scale), atol=1e-8, rtol=1e-8)
    if group_size > 1:
        assert_close(rloo_advantages(s + shift, group_size), rloo_advantages(s, group_size),
                     atol=1e-10, rtol=1e-8)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), group_size=st.integers(2, 8), groups=st.integers(1, 4),
       c=st.floats(1e-3, 1e3), scale=st.sampled_from(SCALES))
def test_scale_invariance(data, group_size, groups, c, scale):
    # Exact (up to rounding) with eps = 0; "none" and RLOO are scale-equivariant instead. Scores
    # are 0 or at least 1e-100 in size: two scores within ~1e-154 of each other have a variance
    # below float64's normal range, and its subnormal digits make A off by percents at eps = 0.
    vals = data.draw(st.lists(sizeable, min_size=groups * group_size, max_size=groups * group_size))
    s = torch.tensor(vals, dtype=D)
    a, ac = (group_advantages(x, group_size, scale=scale, eps=0.0) for x in (s, c * s))
    assert_close(ac, a if scale != "none" else c * a, atol=1e-9, rtol=1e-7)
    assert_close(rloo_advantages(c * s, group_size), c * rloo_advantages(s, group_size), atol=1e-9, rtol=1e-7)


def test_scale_invariance_holds_up_to_eps():
    # With the default eps, scaling a group with std 1 down by 1000 shrinks A by std/(std+eps) only.
    s = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=D)
    std = s.std().item()
    a_small = group_advantages(s / 1000, 4)
    assert_close(a_small, group_advantages(s, 4, eps=0.0) * (std / 1000) / (std / 1000 + 1e-4))


# --- batch scaling ------------------------------------------------------------------------------

def test_batch_scale_by_hand():
    s = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 3.0], dtype=D)
    # centred by group means 1/3 and 7/3; raw batch mean 4/3, squared deviations sum 28/3,
    # unbiased variance 28/15
    centred = torch.tensor([2 / 3, -1 / 3, -1 / 3, -4 / 3, 2 / 3, 2 / 3], dtype=D)
    std = math.sqrt(28 / 15)
    assert_close(group_advantages(s, 3, scale="batch", eps=0.0), centred / std)
    assert_close(group_advantages(s, 3, scale="batch"), centred / (std + 1e-4))
    with pytest.raises(ValueError):
        group_advantages(s, 3, scale="max")


def _batch_loop(scores, G, eps):
    xs = scores.tolist()
    n = len(xs)
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    out = []
    for p in range(n // G):
        grp = xs[p * G:(p + 1) * G]
        gm = sum(grp) / G
        out += [(x - gm) / (std + eps) for x in grp]
    return torch.tensor(out, dtype=D)


@pytest.mark.parametrize("G", [1, 2, 5])
def test_batch_scale_matches_loop(G):
    s = torch.randn(6 * G, generator=torch.Generator().manual_seed(G), dtype=D) * 3 + 1
    assert_close(group_advantages(s, G, scale="batch"), _batch_loop(s, G, GROUP_STD_EPS))


@pytest.mark.parametrize("split", [[3, 3], [1, 5], [2, 1, 3]])
@pytest.mark.parametrize("dtype", [torch.float32, D])
def test_batch_scale_over_fake_ranks_equals_single_batch(split, dtype):
    # Ranks hold whole groups (possibly different numbers of them); the std must be the global one.
    G = 4
    s = (torch.randn(6 * G, generator=torch.Generator().manual_seed(0), dtype=D) * 2).to(dtype)
    shards = list(torch.split(s, [k * G for k in split]))
    parts = run_ranks(lambda x, reduce: group_advantages(x, G, scale="batch", reduce=reduce), shards)
    whole = group_advantages(s, G, scale="batch")
    assert_close(torch.cat(parts), whole, atol=1e-6 if dtype == torch.float32 else 1e-12, rtol=1e-6)
    # without reduce each rank would use its own std: not the same thing
    local = torch.cat([group_advantages(x, G, scale="batch") for x in shards])
    assert (local - whole).abs().max() > 1e-3
