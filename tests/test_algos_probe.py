"""The linear Bradley-Terry probe (reward head fitted on frozen features)."""

import math

import pytest
import torch

from rlhfkit.algos import fit_bt_probe, fit_linear_bt
from rlhfkit.algos.probe import pairwise_accuracy


def _naive_1d_minimiser(ds, l2):
    """Bisection on the derivative of mean softplus(-w d) + l2 w^2 (convex in one variable)."""
    def grad(w):
        return sum(-d / (1 + math.exp(w * d)) for d in ds) / len(ds) + 2 * l2 * w

    lo, hi = -50.0, 50.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if grad(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


def test_fit_linear_bt_matches_a_hand_solved_one_dimensional_case():
    # two pairs say "chosen has the larger feature", one says the opposite: the optimum is a
    # positive weight, shrunk by the L2 term; bisection on the derivative is the reference
    ds, l2 = [1.0, 1.0, -1.0], 0.1
    w = fit_linear_bt(torch.tensor(ds)[:, None], l2)
    assert w.shape == (1,)
    assert w.item() == pytest.approx(_naive_1d_minimiser(ds, l2), abs=1e-6)
    # without L2 the optimum is log(2): the sigmoid then gives the 2:1 odds of the data
    assert fit_linear_bt(torch.tensor(ds)[:, None], 0.0).item() == pytest.approx(math.log(2), abs=1e-5)


def test_fit_linear_bt_stationary_point_in_many_dimensions():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(200, 8, generator=g, dtype=torch.float64) + 0.3
    w = fit_linear_bt(d, 0.01).requires_grad_(True)
    loss = torch.nn.functional.softplus(-(d @ w)).mean() + 0.01 * w.pow(2).sum()
    (grad,) = torch.autograd.grad(loss, w)
    assert grad.abs().max().item() < 1e-6  # L-BFGS's own tolerance


def test_fit_bt_probe_recovers_a_planted_direction_and_is_scale_free():
    g = torch.Generator().manual_seed(1)
    true_w = torch.randn(16, generator=g)
    h = torch.randn(600, 16, generator=g)
    labels = torch.bernoulli(torch.sigmoid(3 * h @ true_w / true_w.norm()), generator=g)
    d = torch.where(labels[:, None] > 0, h, -h)  # chosen-minus-rejected, noisy BT labels
    w, info = fit_bt_probe(d, seed=0)
    cos = torch.nn.functional.cosine_similarity(w.float(), true_w, dim=0).item()
    assert cos > 0.9
    assert 0.7 < info["cv_accuracy"] <= info["train_accuracy"] + 0.05
    assert info["l2"] in (1e-3, 1e-2, 1e-1, 1.0, 10.0)
    # multiplying the features by 1000 gives the same ranking and a weight 1000x smaller
    w2, info2 = fit_bt_probe(d * 1000, seed=0)
    assert info2["l2"] == info["l2"]
    torch.testing.assert_close(w2 * 1000, w, rtol=1e-4, atol=1e-6)
    assert pairwise_accuracy(d, w) == pytest.approx(info["train_accuracy"])


def test_fit_bt_probe_needs_enough_pairs():
    with pytest.raises(ValueError, match="at least 8 pairs"):
        fit_bt_probe(torch.randn(5, 3))


def test_fit_bt_probe_prefers_the_strongest_l2_within_one_standard_error():
    """Few pairs, many dimensions, weak signal: a small L2 separates the training pairs perfectly
    and its CV edge is noise; the one-SE rule takes a stronger L2, which does not overfit."""
    g = torch.Generator().manual_seed(2)
    d = torch.randn(120, 200, generator=g)
    d[:, 0] += 0.3  # a weak real direction
    w, info = fit_bt_probe(d, seed=0)
    assert info["cv_accuracy"] >= info["cv_best_accuracy"] - (0.25 / 120) ** 0.5 - 1e-12
    assert info["train_accuracy"] < 1.0
    assert info["l2"] >= 1.0


def test_label_smoothing_by_hand():
    """With eps the stationary point of the 1-D case solves 3 s(w) = 2 - eps (two pairs for, one
    against): w = logit((2 - eps) / 3); separable data keeps a finite w = logit(1 - eps)."""
    ds = torch.tensor([1.0, 1.0, -1.0])[:, None]
    for eps in (0.0, 0.1, 0.3):
        p = (2 - eps) / 3
        assert fit_linear_bt(ds, 0.0, label_smoothing=eps).item() == pytest.approx(math.log(p / (1 - p)), abs=1e-5)
    assert fit_linear_bt(torch.ones(2, 1), 0.0, label_smoothing=0.1).item() == pytest.approx(math.log(9), abs=1e-5)
    with pytest.raises(ValueError, match="label_smoothing"):
        fit_linear_bt(ds, 0.0, label_smoothing=0.5)


def test_fit_bt_probe_rules():
    """rule="best" takes the grid value with the highest CV accuracy; "one_se" the strongest L2
    within one standard error of it; both report the CV accuracy of what they chose."""
    g = torch.Generator().manual_seed(2)  # 10 dims of real signal, 200 noisy BT labels
    w = torch.randn(10, generator=g)
    h = torch.randn(200, 10, generator=g)
    d = torch.where(torch.bernoulli(torch.sigmoid(2 * h @ w / w.norm()), generator=g)[:, None] > 0, h, -h)
    grid = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
    _, best = fit_bt_probe(d, l2_grid=grid, seed=0, rule="best")
    _, one_se = fit_bt_probe(d, l2_grid=grid, seed=0, rule="one_se")
    assert best["cv_accuracy"] == best["cv_best_accuracy"] == one_se["cv_best_accuracy"]
    assert one_se["l2"] > best["l2"]  # here the CV maximum sits at a weak L2
    assert one_se["cv_accuracy"] >= best["cv_accuracy"] - (0.25 / 200) ** 0.5
    with pytest.raises(ValueError, match="rule"):
        fit_bt_probe(d, rule="median")


def test_pairwise_accuracy_by_hand_ties_count_half():
    """probe.pairwise_accuracy: the share of pairs whose difference d scores w . d > 0, a score of
    exactly 0 counting half (as the reward model's accuracy does): here right, wrong, tied, right."""
    d = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])
    w = torch.tensor([1.0, -1.0])  # scores 1, -1, 0, 1
    assert pairwise_accuracy(d, w) == (1 + 0 + 0.5 + 1) / 4
    assert pairwise_accuracy(d, -w) == (0 + 1 + 0.5 + 0) / 4
    assert pairwise_accuracy(d, torch.zeros(2)) == 0.5
