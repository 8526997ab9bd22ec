import math

import pytest
import torch
from fake_reduce import run_ranks
from torch.testing import assert_close

from rlhfkit.algos import (
    RunningMeanBaseline,
    batch_mean_advantages,
    expand_to_tokens,
    gae_advantages,
    group_advantages,
    kl_penalized_rewards,
    kl_penalized_scores,
    reinforce_baseline_advantages,
    rloo_advantages,
)

D = torch.float64
NAN = float("nan")


def _random_case(seed, B=5, T=8, holes=False):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(B, T, generator=g, dtype=D)
    v = torch.randn(B, T, generator=g, dtype=D)
    lengths = torch.tensor([0, 1, T, 3, 5])[:B]
    m = torch.arange(T)[None, :] < lengths[:, None]
    if holes:
        m = torch.rand(B, T, generator=g) > 0.35
    return r, v, m


# --- 1. hand-computed ---------------------------------------------------------------------------

def test_gae_by_hand_gamma1_lam095():
    # r = [0, 0, 1], V = [0.5, 0.6, 0.7], a 4th padded token holding nan.
    # delta_2 = 1 + 0 - 0.7 = 0.3                 A_2 = 0.3
    # delta_1 = 0 + 0.7 - 0.6 = 0.1               A_1 = 0.1 + 0.95 * 0.3 = 0.385
    # delta_0 = 0 + 0.6 - 0.5 = 0.1               A_0 = 0.1 + 0.95 * 0.385 = 0.46575
    # returns = A + V = [0.96575, 0.985, 1.0]
    r = torch.tensor([[0.0, 0.0, 1.0, NAN]], dtype=D)
    v = torch.tensor([[0.5, 0.6, 0.7, NAN]], dtype=D)
    m = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae_advantages(r, v, m, gamma=1.0, lam=0.95)
    assert_close(adv, torch.tensor([[0.46575, 0.385, 0.3, 0.0]], dtype=D))
    assert_close(ret, torch.tensor([[0.96575, 0.985, 1.0, 0.0]], dtype=D))


def test_gae_lam1_gives_monte_carlo_returns():
    # gamma = lam = 1: returns are reward-to-go, independent of the values.
    r = torch.tensor([[1.0, 2.0, 3.0]], dtype=D)
    v = torch.tensor([[9.0, -4.0, 0.5]], dtype=D)
    _, ret = gae_advantages(r, v, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert_close(ret, torch.tensor([[6.0, 5.0, 3.0]], dtype=D))


def test_kl_penalized_rewards_by_hand():
    score = torch.tensor([2.0, 5.0, 7.0], dtype=D)
    logp = torch.tensor([[-1.0, -2.0, -3.0, NAN], [-1.0, NAN, NAN, NAN], [NAN] * 4], dtype=D)
    ref = torch.tensor([[-1.5, -2.0, -2.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [0.0] * 4], dtype=D)
    m = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])  # row 2: empty response
    rewards, kl = kl_penalized_rewards(score, logp, ref, m, kl_coef=0.1, kl_kind="k1")
    # row 0: k1 = [0.5, 0, -1] -> -0.1 * k1 = [-0.05, 0, 0.1], + score 2 at index 2
    assert_close(kl, torch.tensor([[0.5, 0.0, -1.0, 0.0], [0.0] * 4, [0.0] * 4], dtype=D))
    expected = torch.tensor([[-0.05, 0.0, 2.1, 0.0], [5.0, 0, 0, 0], [0.0] * 4], dtype=D)
    assert_close(rewards, expected)


def test_kl_penalized_rewards_left_padding_and_holes():
    # the score lands on the highest valid index, whatever the padding layout
    score = torch.tensor([1.0, 1.0])
    z = torch.zeros(2, 4)
    m = torch.tensor([[0, 0, 1, 1], [1, 0, 1, 0]])
    rewards, _ = kl_penalized_rewards(score, z, z, m, kl_coef=0.5)
    assert_close(rewards, torch.tensor([[0.0, 0, 0, 1], [0, 0, 1, 0]]))


def test_group_and_rloo_by_hand():
    s = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 3.0], dtype=D)
    # group 1 [1, 0, 0]: mean 1/3, unbiased std sqrt(1/3)
    # group 2 [1, 3, 3]: mean 7/3, unbiased std sqrt(4/3)
    std1, std2 = math.sqrt(1 / 3), math.sqrt(4 / 3)
    exp_std = torch.tensor([2 / 3 / std1, -1 / 3 / std1, -1 / 3 / std1,
                            -4 / 3 / std2, 2 / 3 / std2, 2 / 3 / std2], dtype=D)
    assert_close(group_advantages(s, 3, scale="std", eps=0.0), exp_std)
    assert_close(group_advantages(s, 3, scale="none"),
                 torch.tensor([2 / 3, -1 / 3, -1 / 3, -4 / 3, 2 / 3, 2 / 3], dtype=D))
    # RLOO: 1 - mean(0, 0) = 1; 0 - mean(1, 0) = -0.5; ... 1 - 3 = -2; 3 - 2 = 1
    assert_close(rloo_advantages(s, 3), torch.tensor([1, -0.5, -0.5, -2, 1, 1], dtype=D))
    assert_close(reinforce_baseline_advantages(s, 1.0), s - 1)


def test_group_edge_cases():
    s = torch.tensor([2.0, 2.0, 5.0, 5.0])
    assert (group_advantages(s, 2) == 0).all()  # equal scores: no signal, no nan
    assert (group_advantages(s, 1) == 0).all()
    with pytest.raises(ValueError):
        group_advantages(s, 3)
    with pytest.raises(ValueError):
        group_advantages(s, 2, scale="max")
    with pytest.raises(ValueError):
        rloo_advantages(s, 1)


def test_expand_to_tokens():
    adv = torch.tensor([1.5, -2.0])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert_close(expand_to_tokens(adv, m), torch.tensor([[1.5, 1.5, 0.0], [-2.0, 0.0, 0.0]]))


# --- 2. naive reference implementations ---------------------------------------------------------

def _gae_loop(r, v, m, gamma, lam):
    """Per row: drop masked tokens, run textbook GAE on what is left, scatter back."""
    adv = torch.zeros_like(r)
    for b in range(r.shape[0]):
        idx = [t for t in range(r.shape[1]) if m[b, t]]
        a_next, v_next = 0.0, 0.0
        for t in reversed(idx):
            delta = r[b, t].item() + gamma * v_next - v[b, t].item()
            a_next = delta + gamma * lam * a_next
            v_next = v[b, t].item()
            adv[b, t] = a_next
    return adv, torch.where(m, adv + v, 0.0)


@pytest.mark.parametrize("holes", [False, True])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.9, 0.0)])
def test_gae_matches_loop(holes, gamma, lam):
    r, v, m = _random_case(seed=3, holes=holes)
    adv, ret = gae_advantages(r, v, m, gamma=gamma, lam=lam)
    adv_ref, ret_ref = _gae_loop(r, v, m, gamma, lam)
    assert_close(adv, adv_ref)
    assert_close(ret, ret_ref)


def test_group_and_rloo_match_loops():
    G, P = 4, 6
    s = torch.randn(P * G, generator=torch.Generator().manual_seed(4), dtype=D)
    grpo, rloo = torch.zeros_like(s), torch.zeros_like(s)
    for p in range(P):
        grp = [s[p * G + j].item() for j in range(G)]
        mean = sum(grp) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (G - 1))
        for j, x in enumerate(grp):
            grpo[p * G + j] = (x - mean) / (std + 1e-4)
            rloo[p * G + j] = x - (sum(grp) - x) / (G - 1)
    assert_close(group_advantages(s, G), grpo)
    assert_close(rloo_advantages(s, G), rloo)
    # identity from the docstring: RLOO = G/(G-1) * (R - mean)
    assert_close(rloo_advantages(s, G), G / (G - 1) * group_advantages(s, G, scale="none"))


# --- 3. invariances -----------------------------------------------------------------------------

@pytest.mark.parametrize("holes", [False, True])
@pytest.mark.parametrize("garbage", [NAN, float("inf"), 1e6])
def test_gae_ignores_masked_positions(holes, garbage):
    r, v, m = _random_case(seed=5, holes=holes)
    adv, ret = gae_advantages(r, v, m, gamma=0.99, lam=0.95)
    rg = torch.where(m, r, garbage)
    vg = torch.where(m, v, garbage)
    adv_g, ret_g = gae_advantages(rg, vg, m, gamma=0.99, lam=0.95)
    assert_close(adv_g, adv)
    assert_close(ret_g, ret)
    assert (adv[~m] == 0).all() and (ret[~m] == 0).all()


def test_gae_padding_length_does_not_matter():
    r, v, m = _random_case(seed=6)
    adv, _ = gae_advantages(r, v, m, 1.0, 0.95)
    pad = torch.zeros(r.shape[0], 3, dtype=D)
    adv_p, _ = gae_advantages(torch.cat([r, pad + NAN], 1), torch.cat([v, pad + NAN], 1),
                              torch.cat([m, pad.bool()], 1), 1.0, 0.95)
    assert_close(adv_p[:, : r.shape[1]], adv)


def test_kl_penalized_rewards_ignore_masked_positions():
    g = torch.Generator().manual_seed(7)
    B, T = 4, 6
    logp, ref = torch.randn(B, T, generator=g, dtype=D), torch.randn(B, T, generator=g, dtype=D)
    m = torch.arange(T)[None] < torch.tensor([[0], [2], [6], [4]])
    score = torch.tensor([NAN, 1.0, -2.0, 0.5], dtype=D)  # row 0 is empty: its score is dropped
    for kind in ("k1", "k2", "k3"):
        out = kl_penalized_rewards(score, logp, ref, m, 0.05, kind)
        out_g = kl_penalized_rewards(score, torch.where(m, logp, NAN), torch.where(m, ref, -torch.inf), m, 0.05, kind)
        for a, b in zip(out, out_g):
            assert_close(a, b)
            assert torch.isfinite(a).all()
        # total reward = score - kl_coef * sum(kl) per row
        rewards, kl = out
        assert_close(rewards.sum(1), torch.nan_to_num(score) * m.any(1) - 0.05 * kl.sum(1))


# --- 4. KL folded into the sequence reward (RLOO), REINFORCE baselines ---------------------------

def test_kl_penalized_scores_by_hand():
    score = torch.tensor([2.0, 5.0, 7.0], dtype=D)
    logp = torch.tensor([[-1.0, -2.0, -3.0, NAN], [-1.0, NAN, NAN, NAN], [NAN] * 4], dtype=D)
    ref = torch.tensor([[-1.5, -2.0, -2.0, 0.0], [-0.5, 0.0, 0.0, 0.0], [0.0] * 4], dtype=D)
    m = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    rewards, kl = kl_penalized_scores(score, logp, ref, m, beta=0.1)
    # k1 sums: 0.5 + 0 - 1 = -0.5; -0.5; empty row 0
    assert_close(kl, torch.tensor([-0.5, -0.5, 0.0], dtype=D))
    assert_close(rewards, torch.tensor([2.05, 5.05, 7.0], dtype=D))
    r3, kl3 = kl_penalized_scores(score, logp, ref, m, beta=0.1, kl_kind="k3")
    k3 = lambda x: math.exp(-x) - 1 + x  # noqa: E731
    assert_close(kl3, torch.tensor([k3(0.5) + k3(-1.0), k3(-0.5), 0.0], dtype=D))


def test_rloo_with_kl_in_reward_matches_loop():
    # The paper's RLOO (and TRL 1.16's): R_i = score_i - beta * sum_t (logp_old - logp_ref), then
    # A_i = R_i - mean of the other rewards of the group.
    g = torch.Generator().manual_seed(8)
    G, P, T, beta = 4, 3, 5, 0.05
    score = torch.randn(G * P, generator=g, dtype=D)
    logp, ref = torch.randn(G * P, T, generator=g, dtype=D), torch.randn(G * P, T, generator=g, dtype=D)
    m = torch.rand(G * P, T, generator=g) > 0.3
    rewards, _ = kl_penalized_scores(score, logp, ref, m, beta)
    adv = rloo_advantages(rewards, G)
    for i in range(G * P):
        r = lambda j: score[j].item() - beta * sum(  # noqa: E731
            logp[j, t].item() - ref[j, t].item() for t in range(T) if m[j, t])
        p = i // G
        others = [r(j) for j in range(p * G, p * G + G) if j != i]
        assert adv[i].item() == pytest.approx(r(i) - sum(others) / (G - 1), abs=1e-12)


def test_batch_mean_baseline_by_hand_and_over_fake_ranks():
    s = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=D)
    assert_close(batch_mean_advantages(s), s - 3.0)
    parts = run_ranks(lambda x, reduce: batch_mean_advantages(x, reduce=reduce), [s[:1], s[1:]])
    assert_close(torch.cat(parts), s - 3.0)


def test_running_mean_baseline_by_hand():
    b = RunningMeanBaseline(decay=0.5)
    assert b.value is None
    a1 = b.advantages(torch.tensor([1.0, 3.0]))  # first batch: its own mean 2
    assert_close(a1, torch.tensor([-1.0, 1.0]))
    assert b.value == 2.0
    a2 = b.advantages(torch.tensor([6.0, 8.0]))  # baseline 2 from the past only; then 0.5*2 + 0.5*7
    assert_close(a2, torch.tensor([4.0, 6.0]))
    assert b.value == 4.5
    c = RunningMeanBaseline(decay=0.5)
    c.load_state_dict(b.state_dict())
    assert_close(c.advantages(torch.tensor([4.5])), torch.tensor([0.0]))
    assert_close(reinforce_baseline_advantages(torch.tensor([4.5]), 4.5), torch.tensor([0.0]))
    empty = RunningMeanBaseline()
    empty.load_state_dict(RunningMeanBaseline().state_dict())
    assert empty.value is None
    with pytest.raises(ValueError):
        RunningMeanBaseline(decay=1.0)


def test_running_mean_baseline_decay_09_by_hand():
    # decay 0.9 weighs the old baseline by 0.9 and the new batch mean by 0.1 (not the other way round)
    b = RunningMeanBaseline(decay=0.9)
    assert_close(b.advantages(torch.tensor([0.0, 4.0])), torch.tensor([-2.0, 2.0]))  # own mean 2
    assert b.value == pytest.approx(2.0)
    a2 = b.advantages(torch.tensor([12.0, 8.0]))  # baseline 2; then 0.9 * 2 + 0.1 * 10 = 2.8
    assert_close(a2, torch.tensor([10.0, 6.0]))
    assert b.value == pytest.approx(2.8)
    a3 = b.advantages(torch.tensor([2.8, 4.8]))  # baseline 2.8; then 0.9 * 2.8 + 0.1 * 3.8 = 2.9
    assert_close(a3, torch.tensor([0.0, 2.0]))
    assert b.value == pytest.approx(2.9)


def test_running_mean_baseline_is_global_over_fake_ranks():
    batches = [torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.tensor([0.0, 4.0, 4.0, 8.0])]
    single = RunningMeanBaseline(0.9)
    expected = [single.advantages(x) for x in batches]

    def rank(shard_batches, reduce):
        b = RunningMeanBaseline(0.9)
        return [b.advantages(x, reduce=reduce) for x in shard_batches], b.value

    results = run_ranks(rank, [[x[:3] for x in batches], [x[3:] for x in batches]])
    for k in range(2):
        assert_close(torch.cat([results[0][0][k], results[1][0][k]]), expected[k])
    assert results[0][1] == results[1][1] == pytest.approx(single.value)


def test_reinforce_baseline_is_unbiased_by_enumeration():
    # Exact expectation over a 3-armed bandit: E[A * grad log pi] with A = R - b and b independent
    # of the sample equals the true policy gradient grad E[R] for any b.
    theta = torch.tensor([0.2, -0.4, 0.9], dtype=D, requires_grad=True)
    R = torch.tensor([1.0, 3.0, -2.0], dtype=D)
    pi = torch.softmax(theta, 0)
    (true_grad,) = torch.autograd.grad((pi * R).sum(), theta)
    for b in (0.0, 1.7, -5.0):
        adv = reinforce_baseline_advantages(R, b)
        est = sum(pi[a].detach() * adv[a] * torch.autograd.grad(torch.log_softmax(theta, 0)[a], theta)[0]
                  for a in range(3))
        assert_close(est, true_grad)
