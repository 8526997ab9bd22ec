"""algos.rewards: several reward functions combined (weighted sum, normalise-then-sum), NaN = unscored."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhfkit.algos.rewards import (
    combine_rewards,
    nan_std,
    normalize_per_group,
    reward_stats,
)

NAN = math.nan


def naive_combine(rows: list[list[float]], weights: list[float], mode: str, group_size: int | None,
                  eps: float = 1e-4) -> list[float]:
    """Loops and the statistics module: the formulas of the module docstring, written out."""
    B, F = len(rows), len(weights)
    G = group_size or B
    vals = [list(r) for r in rows]
    if mode == "normalize_then_sum":
        for g0 in range(0, B, G):
            for f in range(F):
                col = [rows[i][f] for i in range(g0, g0 + G) if not math.isnan(rows[i][f])]
                mean = statistics.fmean(col) if col else NAN
                std = statistics.stdev(col) if len(col) > 1 else NAN
                for i in range(g0, g0 + G):
                    vals[i][f] = (rows[i][f] - mean) / (std + eps)
    out = []
    for i in range(B):
        if all(math.isnan(x) for x in rows[i]):
            out.append(NAN)
        else:
            out.append(sum(w * x for w, x in zip(weights, vals[i]) if not math.isnan(x)))
    return out


def close(a, b, tol=1e-9) -> bool:
    return all((math.isnan(x) and math.isnan(y)) or abs(x - y) <= tol * (1 + abs(y)) for x, y in zip(a, b))


def test_weighted_sum_by_hand():
    scores = torch.tensor([[1.0, 4.0], [0.0, NAN], [NAN, NAN], [NAN, 2.0]], dtype=torch.float64)
    got = combine_rewards(scores, torch.tensor([2.0, -0.5]))
    assert got[:2].tolist() == [2.0 - 2.0, 0.0] and math.isnan(got[2]) and got[3] == -1.0


def test_normalize_then_sum_by_hand():
    # two groups of 3; function 0 = 0/1 correctness, function 1 = a length score on another scale
    scores = torch.tensor([[1.0, 10.0], [0.0, 20.0], [0.0, 30.0],
                           [1.0, 5.0], [1.0, 5.0], [NAN, 8.0]], dtype=torch.float64)
    got = combine_rewards(scores, torch.tensor([1.0, 0.5]), "normalize_then_sum", group_size=3, eps=0.0)
    # group 1: f0 (1, 0, 0) mean 1/3, std sqrt(1/3) -> (2, -1, -1)/sqrt(3); f1 (10, 20, 30) -> (-1, 0, 1)
    s3 = math.sqrt(3)
    want1 = [2 / s3 - 0.5, -1 / s3, -1 / s3 + 0.5]
    # group 2: f0 (1, 1, nan): std 0 -> 0/0 = nan, left out; f1 (5, 5, 8) mean 6, std sqrt(3) -> (-1, -1, 2)/sqrt(3)
    want2 = [0.5 * -1 / s3, 0.5 * -1 / s3, 0.5 * 2 / s3]
    assert close(got.tolist(), want1 + want2)
    # with TRL's eps = 1e-4 a constant column gives exactly 0 instead of nan: same sums here
    got_eps = combine_rewards(scores, torch.tensor([1.0, 0.5]), "normalize_then_sum", group_size=3)
    assert close(got_eps.tolist(), want1 + want2, tol=1e-3)


def test_single_scored_value_in_a_group_has_no_spread():
    scores = torch.tensor([[3.0, 1.0], [NAN, 2.0]], dtype=torch.float64)
    z = normalize_per_group(scores, group_size=2)
    assert math.isnan(z[0, 0]) and math.isnan(z[1, 0])  # f0 scored one response: no z
    got = combine_rewards(scores, torch.ones(2), "normalize_then_sum", group_size=2)
    # f1 (1, 2): mean 1.5, std sqrt(1/2) -> z = -+0.5 / (sqrt(1/2) + eps)
    assert close(got.tolist(), [-0.5 / (math.sqrt(0.5) + 1e-4), 0.5 / (math.sqrt(0.5) + 1e-4)])


def test_nan_std_and_stats():
    x = torch.tensor([[1.0, NAN], [3.0, NAN], [NAN, 5.0]], dtype=torch.float64)
    assert close(nan_std(x, dim=0).tolist(), [math.sqrt(2.0), NAN])
    st_ = reward_stats(x)
    assert st_["mean"].tolist() == [2.0, 5.0] and close(st_["scored_frac"].tolist(), [2 / 3, 1 / 3])


@pytest.mark.parametrize("scores, weights, kw, match", [
    (torch.ones(3), torch.ones(1), {}, r"scores must be \(B, F\)"),
    (torch.ones(3, 2, dtype=torch.long), torch.ones(2), {}, "floating point"),
    (torch.ones(3, 2), torch.ones(3), {}, r"weights must be \(2,\)"),
    (torch.ones(3, 2), torch.tensor([1.0, math.inf]), {}, "weights must be finite"),
    (torch.tensor([[1.0, math.inf]]), torch.ones(2), {}, "got inf"),
    (torch.ones(3, 2), torch.ones(2), {"mode": "mean"}, "unknown combine mode 'mean'"),
    (torch.ones(3, 2), torch.ones(2), {"mode": "normalize_then_sum", "group_size": 2}, "not whole groups"),
])
def test_errors(scores, weights, kw, match):
    with pytest.raises(ValueError, match=match):
        combine_rewards(scores, weights, **kw)


# --------------------------------------------------------------------------- properties

finite = st.floats(-1e3, 1e3, allow_nan=False)
cell = st.one_of(finite, finite, finite, st.just(NAN))  # about a quarter unscored


@st.composite
def batches(draw):
    F = draw(st.integers(1, 4))
    G = draw(st.integers(1, 4))
    B = G * draw(st.integers(1, 4))
    rows = draw(st.lists(st.lists(cell, min_size=F, max_size=F), min_size=B, max_size=B))
    weights = draw(st.lists(st.floats(-5, 5, allow_nan=False), min_size=F, max_size=F))
    return rows, weights, G


@settings(max_examples=200, deadline=None)
@given(batches(), st.sampled_from(["sum", "normalize_then_sum"]))
def test_matches_the_naive_reference(batch, mode):
    rows, weights, G = batch
    got = combine_rewards(torch.tensor(rows, dtype=torch.float64), torch.tensor(weights, dtype=torch.float64), mode, G)
    assert close(got.tolist(), naive_combine(rows, weights, mode, G), tol=1e-7)


@settings(max_examples=100, deadline=None)
@given(batches(), st.sampled_from(["sum", "normalize_then_sum"]), st.randoms(use_true_random=False))
def test_order_of_functions_and_of_rows_within_a_group_does_not_matter(batch, mode, rnd):
    rows, weights, G = batch
    s, w = torch.tensor(rows, dtype=torch.float64), torch.tensor(weights, dtype=torch.float64)
    base = combine_rewards(s, w, mode, G)
    perm_f = torch.tensor(rnd.sample(range(len(weights)), len(weights)))
    assert close(combine_rewards(s[:, perm_f], w[perm_f], mode, G).tolist(), base.tolist(), tol=1e-9)
    perm_r = torch.cat([g0 + torch.tensor(rnd.sample(range(G), G)) for g0 in range(0, len(rows), G)])
    assert close(combine_rewards(s[perm_r], w, mode, G).tolist(), base[perm_r].tolist(), tol=1e-9)


@settings(max_examples=100, deadline=None)
@given(batches(), st.sampled_from(["sum", "normalize_then_sum"]))
def test_an_unscored_function_changes_nothing(batch, mode):
    """A function that returned None everywhere (or weight 0 where others scored) is as if absent."""
    rows, weights, G = batch
    s, w = torch.tensor(rows, dtype=torch.float64), torch.tensor(weights, dtype=torch.float64)
    base = combine_rewards(s, w, mode, G)
    with_nan = torch.cat([s, torch.full((len(rows), 1), NAN, dtype=torch.float64)], dim=1)
    assert close(combine_rewards(with_nan, torch.cat([w, torch.tensor([3.0], dtype=w.dtype)]), mode, G).tolist(),
                 base.tolist(), tol=1e-12)
    zero_w = torch.cat([s, torch.ones(len(rows), 1, dtype=s.dtype)], dim=1)
    got = combine_rewards(zero_w, torch.cat([w, torch.zeros(1, dtype=w.dtype)]), mode, G)
    scored = ~s.isnan().all(dim=1)
    assert close(got[scored].tolist(), base[scored].tolist(), tol=1e-12)
    assert (got[~scored] == 0).all()  # scored only by the weight-0 function: reward 0, not unscorable


@settings(max_examples=100, deadline=None)
@given(batches(), st.floats(0.1, 10), st.floats(-100, 100))
def test_normalize_then_sum_ignores_each_functions_scale_and_offset(batch, a, b):
    """z-scores do not change under s -> a*s + b (a > 0): a reward's units do not set its influence."""
    rows, weights, G = batch
    s, w = torch.tensor(rows, dtype=torch.float64), torch.tensor(weights, dtype=torch.float64)
    base = combine_rewards(s, w, "normalize_then_sum", G, eps=1e-12)
    moved = combine_rewards(a * s + b, w, "normalize_then_sum", G, eps=1e-12)
    spread = nan_std(s.view(-1, G, s.shape[1]), dim=1)  # (groups, F)
    if not ((spread > 1e-3) | spread.isnan()).all():  # constant columns: 0/eps, not scale-free
        return
    assert close(moved.tolist(), base.tolist(), tol=1e-6)


@settings(max_examples=100, deadline=None)
@given(batches(), st.sampled_from(["sum", "normalize_then_sum"]))
def test_float32_agrees_with_float64(batch, mode):
    rows, weights, G = batch
    s64, w = torch.tensor(rows, dtype=torch.float64), torch.tensor(weights, dtype=torch.float64)
    if mode == "normalize_then_sum":  # float32 rounding of a near-constant column is a large z: skip those
        spread = nan_std(s64.view(-1, G, s64.shape[1]), dim=1)
        if not ((spread > 1.0) | spread.isnan()).all():
            return
    b64 = combine_rewards(s64, w, mode, G)
    b32 = combine_rewards(s64.float(), w.float(), mode, G)
    assert b32.dtype == torch.float32
    size = s64.nan_to_num().abs().max().item() if mode == "sum" else 2.0  # |z| <= (G - 1) / sqrt(G) < 2
    assert close(b32.double().tolist(), b64.tolist(), tol=1e-5 * (1 + size * w.abs().sum().item()))
