import math

import pytest
import torch
from torch.testing import assert_close

from rlhfkit.algos import AdaptiveKLController, FixedKLController, kl_estimate

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
