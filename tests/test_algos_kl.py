import math

import pytest
import torch
from torch.testing import assert_close

from rlhfkit.algos import (
    AdaptiveKLController,
    FixedKLController,
    bias_corrected_kl,
    kl_estimate,
)

D = torch.float64


def test_kl_estimators_by_hand():
    # p = 0.5 (policy), q = 0.25 (ref): log p/q = ln 2
    logp = torch.tensor([math.log(0.5)], dtype=D)
    logq = torch.tensor([math.log(0.25)], dtype=D)
    ln2 = math.log(2)
    assert_close(kl_estimate(logp, logq, "k1"), torch.tensor([ln2], dtype=D))
    assert_close(kl_estimate(logp, logq, "k2"), torch.tensor([0.5 * ln2**2], dtype=D))  # 0.240227
    # k3 = q/p - 1 - log(q/p) = 0.5 - 1 + ln 2 = 0.193147
    assert_close(kl_estimate(logp, logq, "k3"), torch.tensor([0.5 - 1 + ln2], dtype=D))
    assert_close(kl_estimate(logq, logp, "abs"), torch.tensor([ln2], dtype=D))
    assert_close(kl_estimate(logq, logp, "k1"), torch.tensor([-ln2], dtype=D))
    with pytest.raises(ValueError):
        kl_estimate(logp, logq, "k4")


def test_k3_nonnegative_finite_and_zero_at_equality():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1000, generator=g) * 10
    b = torch.randn(1000, generator=g) * 10
    extreme = torch.tensor([1e-9, -1e-9, 50.0, -50.0, 1000.0, -1000.0])
    for x, y in [(a, b), (extreme, torch.zeros(6)), (a, a)]:
        k3 = kl_estimate(x, y, "k3")
        assert torch.isfinite(k3).all() and (k3 >= 0).all()
    assert (kl_estimate(a, a, "k3") == 0).all()
    assert (kl_estimate(a, b, "k2") >= 0).all()


def test_k1_k3_are_unbiased_for_kl():
    # Sample from p, average: both estimators approach the exact KL(p || q).
    p = torch.tensor([0.6, 0.3, 0.1], dtype=D)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=D)
    exact = (p * (p / q).log()).sum()
    a = torch.multinomial(p, 400_000, replacement=True, generator=torch.Generator().manual_seed(0))
    for kind in ("k1", "k3"):
        est = kl_estimate(p.log()[a], q.log()[a], kind).mean()
        assert abs(est - exact) < 0.01, kind


def test_adaptive_kl_controller_by_hand():
    c = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    # kl 9 -> err 0.5 clipped to 0.2 -> coef * (1 + 0.2 * 256 / 10000) = 0.1 * 1.00512
    assert c.update(9.0, n_steps=256) == pytest.approx(0.100512)
    c = AdaptiveKLController(0.1, 6.0, 10000)
    c.update(torch.tensor(3.0), 256)  # err -0.5 -> -0.2 -> 0.1 * 0.99488
    assert c.value == pytest.approx(0.099488)
    c = AdaptiveKLController(0.1, 6.0, 10000)
    c.update(6.6, 256)  # err 0.1 (not clipped) -> 0.1 * 1.00256
    assert c.value == pytest.approx(0.100256)
    c.update(6.0, 256)  # on target: unchanged
    assert c.value == pytest.approx(0.100256)


def test_controller_state_roundtrip():
    c = AdaptiveKLController(0.2, 1.0, 100)
    for _ in range(5):
        c.update(2.0, 10)
    d = AdaptiveKLController(0.2, 1.0, 100)
    d.load_state_dict(c.state_dict())
    assert d.value == c.value
    f = FixedKLController(0.05)
    assert f.update(100.0, 10) == 0.05 and f.value == 0.05
    f.load_state_dict({"value": 0.3})
    assert f.value == 0.3


# --- value and gradient of each estimator, by exact enumeration ---------------------------------
# A 5-way categorical pi = softmax(theta) and a fixed reference. "Expected estimator" means
# sum_a pi_old(a) * f(a): the exact expectation over samples a ~ pi_old, held fixed while
# differentiating (as a loss does). The claims are those of the table in algos/kl.py.

THETA = [0.3, -1.2, 0.8, 0.0, -0.4]
REF = [0.1, 0.3, 0.2, 0.25, 0.15]


def _setup(theta_old=None):
    theta = torch.tensor(THETA, dtype=D, requires_grad=True)
    logp = torch.log_softmax(theta, 0)
    logp_old = logp.detach() if theta_old is None else torch.log_softmax(torch.tensor(theta_old, dtype=D), 0)
    logq = torch.tensor(REF, dtype=D).log()
    return theta, logp, logp_old, logq


def _expected(values, logp_old):
    return (logp_old.exp() * values).sum()  # E_{a ~ pi_old}[values(a)]


def _kl(logp_a, logp_b):  # KL(a || b) for full distributions
    return (logp_a.exp() * (logp_a - logp_b)).sum()


def _grad(x, theta):
    return torch.autograd.grad(x, theta, retain_graph=True)[0]


def test_value_of_each_estimator_on_policy():
    _, logp, logp_old, logq = _setup()
    reverse = _kl(logp, logq)
    for kind in ("k1", "k3"):
        assert_close(_expected(kl_estimate(logp, logq, kind), logp_old), reverse)
    assert_close(_expected(bias_corrected_kl(logp, logq, logp_old), logp_old), reverse)
    k2 = _expected(kl_estimate(logp, logq, "k2"), logp_old)
    assert abs(k2 - reverse) > 1e-3  # k2's value is biased


def test_gradient_of_each_estimator_on_policy():
    theta, logp, logp_old, logq = _setup()
    g_reverse = _grad(_kl(logp, logq), theta)  # grad KL(pi || ref)
    g_forward = _grad(_kl(logq, logp), theta)  # grad KL(ref || pi)
    g = {kind: _grad(_expected(kl_estimate(logp, logq, kind), logp_old), theta) for kind in ("k1", "k2", "k3")}
    g["bc"] = _grad(_expected(bias_corrected_kl(logp, logq, logp_old), logp_old), theta)
    assert_close(g["k1"], torch.zeros_like(theta), atol=1e-12, rtol=0)  # k1 as a loss: no signal
    assert_close(g["k2"], g_reverse, atol=1e-6, rtol=0)
    assert_close(g["k3"], g_forward, atol=1e-6, rtol=0)  # k3: the forward KL's gradient ...
    assert (g["k3"] - g_reverse).abs().max() > 1e-2  # ... which is not the reverse KL's here
    assert_close(g["bc"], g_reverse, atol=1e-6, rtol=0)


def test_bias_corrected_kl_off_policy():
    # Samples from a stale pi_old != pi: the ratio makes value and gradient those of KL(pi || ref);
    # plain k3 is then biased in value too.
    theta, logp, logp_old, logq = _setup(theta_old=[0.0, 0.5, -0.5, 1.0, 0.2])
    est = _expected(bias_corrected_kl(logp, logq, logp_old), logp_old)
    assert_close(est, _kl(logp, logq))
    assert_close(_grad(est, theta), _grad(_kl(logp, logq), theta), atol=1e-6, rtol=0)
    assert abs(_expected(kl_estimate(logp, logq, "k3"), logp_old) - _kl(logp, logq)) > 1e-2


def test_bias_corrected_kl_value_is_k3_on_policy_and_detaches_old():
    g = torch.Generator().manual_seed(1)
    logp = torch.randn(3, 4, generator=g, dtype=D, requires_grad=True)
    ref = torch.randn(3, 4, generator=g, dtype=D)
    # logp_old given *with* grad (the same tensor): it must still be treated as a constant
    bc = bias_corrected_kl(logp, ref, logp)
    assert_close(bc, kl_estimate(logp, ref, "k3"))
    (grad,) = torch.autograd.grad(bc.sum(), logp)
    # d/dx [exp(x - c) * k3(x)] at x = c is k3 + k3' with k3' = 1 - exp(-(x - ref))
    x = (logp - ref).detach()
    assert_close(grad, (torch.expm1(-x) + x) + (1 - torch.exp(-x)))
    assert torch.isfinite(bias_corrected_kl(logp, ref, logp.detach() - 1e4)).all()  # clamped
