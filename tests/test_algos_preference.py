"""Pairwise preference losses: Bradley-Terry (with label smoothing), DPO, cDPO, robust DPO, IPO, hinge,
and the shared pairwise accuracy."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from rlhfkit.algos import (
    bradley_terry_loss,
    dpo_loss,
    pairwise_accuracy,
    sequence_logps,
)

D = torch.float64
LN2 = math.log(2)


def _t(*x):
    return torch.tensor(x, dtype=D)


# --- Bradley-Terry ------------------------------------------------------------------------------

def test_bradley_terry_by_hand():
    loss, met = bradley_terry_loss(chosen_rewards=_t(1.0), rejected_rewards=_t(0.0))
    assert_close(loss, torch.tensor(math.log(1 + math.exp(-1)), dtype=D))  # 0.313262
    loss, _ = bradley_terry_loss(chosen_rewards=_t(1.0), rejected_rewards=_t(0.0), margin=1.0)
    assert_close(loss, torch.tensor(LN2, dtype=D))
    loss, met = bradley_terry_loss(chosen_rewards=_t(2.0, 0.0, 1.0), rejected_rewards=_t(1.0, 3.0, 1.0))
    assert met["accuracy"].item() == pytest.approx(0.5)  # (1 + 0 + 1/2) / 3: the tie counts 1/2
    assert_close(met["margin"], torch.tensor(-2 / 3, dtype=D))
    assert_close(met["chosen_mean"], torch.tensor(1.0, dtype=D))
    per, _ = bradley_terry_loss(chosen_rewards=_t(2.0, 0.0, 1.0), rejected_rewards=_t(1.0, 3.0, 1.0),
                                reduction="none")
    assert_close(per, -F.logsigmoid(_t(1.0, -3.0, 0.0)))
    big, _ = bradley_terry_loss(chosen_rewards=_t(-1e4), rejected_rewards=_t(1e4))
    assert torch.isfinite(big) and abs(big.item() - 2e4) < 1e-6


# --- DPO and relatives --------------------------------------------------------------------------

def _dpo(pc, pr, rc, rr, **kw):
    return dpo_loss(policy_chosen_logp=_t(*pc), policy_rejected_logp=_t(*pr),
                    ref_chosen_logp=_t(*rc), ref_rejected_logp=_t(*rr), **kw)


def test_dpo_at_reference_is_ln2():
    for lt in ("sigmoid", "cdpo"):
        loss, met = _dpo([-5.0, -9.0], [-7.0, -2.0], [-5.0, -9.0], [-7.0, -2.0], beta=0.1, loss_type=lt,
                         label_smoothing=0.1 if lt == "cdpo" else 0.0)
        assert_close(loss, torch.tensor(LN2, dtype=D))
    assert met["rewards/accuracy"].item() == 0.0 and met["rewards/margin"].item() == 0.0
    loss, _ = _dpo([-5.0], [-7.0], [-5.0], [-7.0], beta=0.1, loss_type="ipo")
    assert_close(loss, torch.tensor(25.0, dtype=D))  # (0 - 1/(2*0.1))^2
    loss, _ = _dpo([-5.0], [-7.0], [-5.0], [-7.0], beta=0.1, loss_type="hinge")
    assert_close(loss, torch.tensor(1.0, dtype=D))


def test_dpo_by_hand():
    # chosen log-ratio 2, rejected log-ratio 0, beta 0.5: beta*h = 1
    kw = dict(pc=[-3.0], pr=[-4.0], rc=[-5.0], rr=[-4.0], beta=0.5)
    loss, met = _dpo(**kw)
    assert_close(loss, torch.tensor(math.log(1 + math.exp(-1)), dtype=D))  # 0.313262
    assert_close(met["rewards/chosen"], torch.tensor(1.0, dtype=D))
    assert_close(met["rewards/rejected"], torch.tensor(0.0, dtype=D))
    assert met["rewards/accuracy"].item() == 1.0 and met["rewards/margin"].item() == 1.0
    # cDPO eps=0.1: 0.9 * 0.313262 + 0.1 * ln(1 + e) = 0.413262
    loss, _ = _dpo(**kw, label_smoothing=0.1)
    assert_close(loss, torch.tensor(0.9 * math.log(1 + math.exp(-1)) + 0.1 * math.log(1 + math.e), dtype=D))
    loss, _ = _dpo(**kw, loss_type="ipo")  # (2 - 1)^2
    assert_close(loss, torch.tensor(1.0, dtype=D))


def test_hinge_and_ipo_by_hand_away_from_zero():
    # h = (pc - rc) - (pr - rr) = 1, -2, 4 with the reference at 0 and pr = 0
    kw = dict(pc=[1.0, -2.0, 4.0], pr=[0.0, 0.0, 0.0], rc=[0.0, 0.0, 0.0], rr=[0.0, 0.0, 0.0],
              reduction="none")
    # hinge, beta 0.5: relu(1 - 0.5 h) = relu(0.5), relu(2), relu(-1) = 0.5, 2, 0
    per, _ = _dpo(**kw, beta=0.5, loss_type="hinge")
    assert_close(per, _t(0.5, 2.0, 0.0))
    # hinge, beta 2: relu(1 - 2 h) = relu(-1), relu(5), relu(-7) = 0, 5, 0
    per, _ = _dpo(**kw, beta=2.0, loss_type="hinge")
    assert_close(per, _t(0.0, 5.0, 0.0))
    # IPO, beta 0.25: (h - 1/(2 * 0.25))^2 = (h - 2)^2 = 1, 16, 4
    per, _ = _dpo(**kw, beta=0.25, loss_type="ipo")
    assert_close(per, _t(1.0, 16.0, 4.0))
    loss, _ = _dpo(**{**kw, "reduction": "mean"}, beta=0.25, loss_type="ipo")
    assert_close(loss, torch.tensor(7.0, dtype=D))


def test_dpo_is_bradley_terry_on_implicit_rewards():
    g = torch.Generator().manual_seed(6)
    pc, pr, rc, rr = (torch.randn(16, generator=g, dtype=D) * 5 for _ in range(4))
    beta = 0.3
    dpo, _ = dpo_loss(policy_chosen_logp=pc, policy_rejected_logp=pr, ref_chosen_logp=rc,
                      ref_rejected_logp=rr, beta=beta, reduction="none")
    bt, _ = bradley_terry_loss(chosen_rewards=beta * (pc - rc), rejected_rewards=beta * (pr - rr),
                               reduction="none")
    assert_close(dpo, bt)
    total, _ = dpo_loss(policy_chosen_logp=pc, policy_rejected_logp=pr, ref_chosen_logp=rc,
                        ref_rejected_logp=rr, beta=beta, reduction="sum")
    assert_close(total, dpo.sum())


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    pc = torch.tensor([-3.0], dtype=D, requires_grad=True)
    pr = torch.tensor([-3.0], dtype=D, requires_grad=True)
    loss, _ = dpo_loss(policy_chosen_logp=pc, policy_rejected_logp=pr, ref_chosen_logp=_t(-3.0),
                       ref_rejected_logp=_t(-3.0), beta=0.1)
    loss.backward()
    # d/dh of -log s(beta h) at h=0 is -beta/2
    assert_close(pc.grad, _t(-0.05))
    assert_close(pr.grad, _t(0.05))


def test_dpo_bad_arguments():
    with pytest.raises(ValueError):
        _dpo([0.0], [0.0], [0.0], [0.0], beta=0.1, loss_type="kto")
    with pytest.raises(ValueError):
        _dpo([0.0], [0.0], [0.0], [0.0], beta=0.1, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError):
        _dpo([0.0], [0.0], [0.0], [0.0], beta=0.1, reduction="max")


# --- shared accuracy ----------------------------------------------------------------------------

def test_pairwise_accuracy_ties_count_half():
    c, r = _t(2.0, 0.0, 1.0, 5.0), _t(1.0, 3.0, 1.0, 5.0)
    assert pairwise_accuracy(c, r).item() == 0.5  # (1 + 0 + 0.5 + 0.5) / 4
    assert_close(pairwise_accuracy(c, r, reduction="none"), torch.tensor([1.0, 0.0, 0.5, 0.5]))
    assert pairwise_accuracy(c, r, reduction="sum").item() == 2.0
    # a constant model scores chance, whatever the labels
    assert pairwise_accuracy(torch.full((7,), 0.3), torch.full((7,), 0.3)).item() == 0.5
    _, met = bradley_terry_loss(chosen_rewards=torch.zeros(5), rejected_rewards=torch.zeros(5))
    assert met["accuracy"].item() == 0.5


# --- Bradley-Terry with label smoothing ---------------------------------------------------------

def test_bradley_terry_label_smoothing_by_hand():
    # d = 1, e = 0.1: 0.9 * ln(1 + e^-1) + 0.1 * ln(1 + e) = 0.9 * 0.313262 + 0.1 * 1.313262 = 0.413262
    loss, _ = bradley_terry_loss(chosen_rewards=_t(1.0), rejected_rewards=_t(0.0), label_smoothing=0.1)
    assert_close(loss, torch.tensor(0.4132617, dtype=D), atol=1e-7, rtol=0)
    # with margin 0.5: 0.9 * ln(1 + e^-0.5) + 0.1 * ln(1 + e^1.5) = 0.9 * 0.474077 + 0.1 * 1.701413
    loss, _ = bradley_terry_loss(chosen_rewards=_t(1.0), rejected_rewards=_t(0.0), margin=0.5,
                                 label_smoothing=0.1)
    assert_close(loss, torch.tensor(0.9 * 0.4740770 + 0.1 * 1.7014132, dtype=D), atol=1e-7, rtol=0)
    with pytest.raises(ValueError):
        bradley_terry_loss(chosen_rewards=_t(1.0), rejected_rewards=_t(0.0), label_smoothing=0.5)


def test_bradley_terry_label_smoothing_matches_formula_and_is_bounded():
    g = torch.Generator().manual_seed(3)
    c, r, m = (torch.randn(32, generator=g, dtype=D) * 3 for _ in range(3))
    e = 0.2
    per, _ = bradley_terry_loss(chosen_rewards=c, rejected_rewards=r, margin=m, label_smoothing=e,
                                reduction="none")
    sig = lambda x: 1 / (1 + torch.exp(-x))  # noqa: E731
    assert_close(per, -(1 - e) * torch.log(sig(c - r - m)) - e * torch.log(sig(-(c - r) - m)))
    # minimum (no margin) at d = log((1 - e) / e), not at +inf
    d = torch.tensor([math.log((1 - e) / e)], dtype=D, requires_grad=True)
    loss, _ = bradley_terry_loss(chosen_rewards=d, rejected_rewards=torch.zeros(1, dtype=D), label_smoothing=e)
    (grad,) = torch.autograd.grad(loss, d)
    assert abs(grad.item()) < 1e-12


# --- robust DPO, cDPO, IPO as TRL computes it ----------------------------------------------------

def test_robust_dpo_by_hand():
    # beta * h = 1, e = 0.1: [0.9 * ln(1 + e^-1) - 0.1 * ln(1 + e)] / 0.8
    #                      = (0.28193553 - 0.13132617) / 0.8 = 0.18826170
    kw = dict(pc=[-3.0], pr=[-4.0], rc=[-5.0], rr=[-4.0], beta=0.5)
    loss, _ = _dpo(**kw, loss_type="robust", label_smoothing=0.1)
    assert_close(loss, torch.tensor(0.1882617, dtype=D), atol=1e-7, rtol=0)
    loss0, _ = _dpo(**kw, loss_type="robust")
    assert_close(loss0, _dpo(**kw)[0])  # e = 0 is DPO
    with pytest.raises(ValueError):
        _dpo(**kw, loss_type="robust", label_smoothing=0.5)


def test_robust_dpo_is_unbiased_under_label_flips_and_cdpo_is_not():
    # Labels flipped with probability e: the expected robust loss is the clean DPO loss.
    g = torch.Generator().manual_seed(4)
    pc, pr, rc, rr = (torch.randn(16, generator=g, dtype=D) * 3 for _ in range(4))
    beta, e = 0.2, 0.15
    clean, _ = dpo_loss(pc, pr, rc, rr, beta=beta, reduction="none")
    for lt, unbiased in (("robust", True), ("cdpo", False)):
        kept, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=lt, label_smoothing=e, reduction="none")
        flipped, _ = dpo_loss(pr, pc, rr, rc, beta=beta, loss_type=lt, label_smoothing=e, reduction="none")
        expected = (1 - e) * kept + e * flipped
        assert torch.allclose(expected, clean) == unbiased, lt


def test_robust_dpo_slope_is_dpo_slope_minus_constant():
    # d loss / d(beta h) = DPO's - e / (1 - 2e) everywhere: it never stops pushing h up.
    e, beta = 0.1, 1.0
    for h0 in (-5.0, 0.0, 5.0, 30.0):
        slopes = {}
        for lt, ls in (("sigmoid", 0.0), ("robust", e)):
            pc = torch.tensor([h0], dtype=D, requires_grad=True)
            loss, _ = dpo_loss(pc, _t(0.0), _t(0.0), _t(0.0), beta=beta, loss_type=lt, label_smoothing=ls)
            slopes[lt] = torch.autograd.grad(loss, pc)[0].item()
        assert slopes["robust"] == pytest.approx(slopes["sigmoid"] - e / (1 - 2 * e), abs=1e-12)


def test_cdpo_minimum_is_finite():
    e = 0.1
    pc = torch.tensor([math.log((1 - e) / e)], dtype=D, requires_grad=True)  # beta = 1: beta h = log 9
    loss, _ = dpo_loss(pc, _t(0.0), _t(0.0), _t(0.0), beta=1.0, loss_type="cdpo", label_smoothing=e)
    assert abs(torch.autograd.grad(loss, pc)[0].item()) < 1e-12


def test_ipo_on_averaged_logps_equals_trl_length_normalised_value():
    # TRL 1.16 IPO: each response's token-summed log-ratio divided by its number of tokens, then
    # (avg_chosen - avg_rejected - 1/(2 beta))^2. Chosen: 3 tokens, rejected: 2 tokens (+1 pad).
    pol = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, float("nan")]], dtype=D)
    ref = torch.tensor([[-1.5, -1.0, -1.5], [-2.0, -2.5, 0.0]], dtype=D)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    beta = 0.5
    # chosen log-ratio sum 0.5 + (-1) + 1 = 0.5 over 3 tokens = 1/6;
    # rejected (-1) + 1.5 = 0.5 over 2 tokens = 1/4; h = 1/6 - 1/4 = -1/12
    trl = (-1 / 12 - 1 / (2 * beta)) ** 2  # (-13/12)^2 = 1.1736111
    pavg, ravg = sequence_logps(pol, mask, average=True), sequence_logps(ref, mask, average=True)
    loss, _ = dpo_loss(pavg[:1], pavg[1:], ravg[:1], ravg[1:], beta=beta, loss_type="ipo")
    assert_close(loss, torch.tensor(trl, dtype=D))
    assert trl == pytest.approx(1.1736111, abs=1e-7)
    # on summed log-probs (our default) the value differs: h = 0.5 - 0.5 = 0 -> (0 - 1)^2 = 1
    psum, rsum = sequence_logps(pol, mask), sequence_logps(ref, mask)
    assert_close(dpo_loss(psum[:1], psum[1:], rsum[:1], rsum[1:], beta=beta, loss_type="ipo")[0],
                 torch.tensor(1.0, dtype=D))
