import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from rlhfkit.algos import (
    bradley_terry_loss,
    dpo_loss,
    nll_loss,
    ppo_policy_loss,
    sft_loss,
    value_loss,
)

D = torch.float64
NAN = float("nan")
LN2 = math.log(2)


def _t(*x):
    return torch.tensor(x, dtype=D)


# --- PPO policy loss ----------------------------------------------------------------------------

def test_ppo_policy_loss_by_hand():
    # ratio 1.5, A=+1: clipped to 1.2        -> loss -1.2, clipped branch active
    # ratio 0.5, A=+1: min(0.5, 0.8) = 0.5   -> loss -0.5, not clipped
    # ratio 0.5, A=-1: min(-0.5, -0.8)=-0.8  -> loss  0.8, clipped branch active
    # ratio 1.5, A=-1: min(-1.5, -1.2)=-1.5  -> loss  1.5, not clipped
    # 5th token is padding with nan everywhere.  token-mean = 0.6 / 4 = 0.15, clipfrac = 2/4
    logp_old = torch.zeros(1, 5, dtype=D)
    logp = torch.tensor([[math.log(1.5), math.log(0.5), math.log(0.5), math.log(1.5), NAN]], dtype=D)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, NAN]], dtype=D)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, metrics = ppo_policy_loss(logp=logp, logp_old=logp_old, advantages=adv, mask=mask, clip_eps=0.2)
    assert_close(loss, torch.tensor(0.15, dtype=D))
    assert metrics["clipfrac"].item() == 0.5
    assert_close(metrics["ratio_mean"], torch.tensor(1.0, dtype=D))
    assert_close(metrics["ratio_max"], torch.tensor(1.5, dtype=D))
    # approx_kl = mean((r - 1) - log r) = 2 * (0.5 - ln 1.5) + 2 * (-0.5 - ln 0.5), over 4
    k3 = (2 * (0.5 - math.log(1.5)) + 2 * (-0.5 + LN2)) / 4
    assert_close(metrics["approx_kl"], torch.tensor(k3, dtype=D))


def test_ppo_clip_higher():
    # ratio 1.25 with A>0 is clipped at eps=0.2 but not with eps_high=0.28
    logp = torch.tensor([[math.log(1.25)]], dtype=D)
    z, a, m = torch.zeros(1, 1, dtype=D), torch.ones(1, 1, dtype=D), torch.ones(1, 1)
    loss, met = ppo_policy_loss(logp=logp, logp_old=z, advantages=a, mask=m, clip_eps=0.2)
    assert_close(loss, torch.tensor(-1.2, dtype=D)) and met["clipfrac"].item() == 1.0
    loss, met = ppo_policy_loss(logp=logp, logp_old=z, advantages=a, mask=m, clip_eps=0.2, clip_eps_high=0.28)
    assert_close(loss, torch.tensor(-1.25, dtype=D)) and met["clipfrac"].item() == 0.0


def test_ppo_ratio_one_gives_minus_mean_advantage():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(4, 6, generator=g, dtype=D, requires_grad=True)
    adv = torch.randn(4, 6, generator=g, dtype=D)
    m = torch.rand(4, 6, generator=g) > 0.3
    loss, met = ppo_policy_loss(logp=logp, logp_old=logp.detach(), advantages=adv, mask=m)
    assert_close(loss, -adv[m].mean())
    assert met["clipfrac"].item() == 0.0 and met["approx_kl"].item() == 0.0
    assert met["ratio_mean"].item() == 1.0
    # at ratio 1 the gradient is the policy gradient -A / n_valid
    (grad,) = torch.autograd.grad(loss, logp)
    assert_close(grad, torch.where(m, -adv / m.sum(), 0.0))


def test_ppo_matches_per_token_loop():
    g = torch.Generator().manual_seed(1)
    B, T, eps = 3, 7, 0.2
    logp = torch.randn(B, T, generator=g, dtype=D) * 0.3
    logp_old = logp + torch.randn(B, T, generator=g, dtype=D) * 0.3
    adv = torch.randn(B, T, generator=g, dtype=D)
    m = torch.rand(B, T, generator=g) > 0.3
    total, n, clipped = 0.0, 0, 0
    for b in range(B):
        for t in range(T):
            if not m[b, t]:
                continue
            r = math.exp(logp[b, t] - logp_old[b, t])
            a = adv[b, t].item()
            obj_unclipped, obj_clipped = r * a, min(max(r, 1 - eps), 1 + eps) * a
            total += -min(obj_unclipped, obj_clipped)
            clipped += obj_clipped < obj_unclipped
            n += 1
    loss, met = ppo_policy_loss(logp=logp, logp_old=logp_old, advantages=adv, mask=m, clip_eps=eps)
    assert_close(loss, torch.tensor(total / n, dtype=D))
    assert met["clipfrac"].item() == pytest.approx(clipped / n)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_ppo_masked_garbage_changes_neither_loss_nor_grad(agg):
    g = torch.Generator().manual_seed(2)
    B, T = 4, 6
    logp = torch.randn(B, T, generator=g, dtype=D)
    logp_old = logp + 0.2 * torch.randn(B, T, generator=g, dtype=D)
    adv = torch.randn(B, T, generator=g, dtype=D)
    m = torch.arange(T)[None] < torch.tensor([[6], [3], [1], [4]])

    def run(lp, lpo, a):
        lp = lp.clone().requires_grad_()
        loss, met = ppo_policy_loss(logp=lp, logp_old=lpo, advantages=a, mask=m, agg=agg)
        (grad,) = torch.autograd.grad(loss, lp)
        return loss, met, grad

    clean = run(logp, logp_old, adv)
    dirty = run(torch.where(m, logp, 1e4), torch.where(m, logp_old, NAN), torch.where(m, adv, torch.inf))
    assert_close(dirty[0], clean[0])
    assert_close(dirty[2], clean[2])
    assert torch.isfinite(dirty[2]).all()
    for k in clean[1]:
        assert_close(dirty[1][k], clean[1][k])


def test_ppo_micro_batches_with_global_normalizer_equal_full_batch():
    g = torch.Generator().manual_seed(3)
    B, T = 8, 9
    logp = torch.randn(B, T, generator=g, dtype=D, requires_grad=True)
    logp_old = (logp + 0.3 * torch.randn(B, T, generator=g, dtype=D)).detach()
    adv = torch.randn(B, T, generator=g, dtype=D)
    m = torch.arange(T)[None] < torch.randint(1, T + 1, (B, 1), generator=g)
    full, _ = ppo_policy_loss(logp=logp, logp_old=logp_old, advantages=adv, mask=m)
    (full_grad,) = torch.autograd.grad(full, logp)
    n_tokens = m.sum().item()
    total, grad = 0.0, torch.zeros_like(logp)
    for i in range(0, B, 2):  # 4 micro-batches of 2
        s = slice(i, i + 2)
        part, _ = ppo_policy_loss(logp=logp[s], logp_old=logp_old[s], advantages=adv[s], mask=m[s],
                                  normalizer=n_tokens)
        total = total + part
        grad += torch.autograd.grad(part, logp)[0]
    assert_close(total, full)
    assert_close(grad, full_grad)


# --- value loss ---------------------------------------------------------------------------------

def test_value_loss_by_hand():
    # V=1, V_old=0.5, R=0: (1-0)^2 = 1 vs (0.7-0)^2 = 0.49 -> 0.5 * 1 = 0.5, not clipped
    # V=1, V_old=0.5, R=2: (1-2)^2 = 1 vs (0.7-2)^2 = 1.69 -> 0.5 * 1.69 = 0.845, clipped
    v = torch.tensor([[1.0, 1.0, NAN]], dtype=D)
    v_old = torch.tensor([[0.5, 0.5, NAN]], dtype=D)
    ret = torch.tensor([[0.0, 2.0, NAN]], dtype=D)
    m = torch.tensor([[1, 1, 0]])
    loss, met = value_loss(values=v, values_old=v_old, returns=ret, mask=m, clip_eps=0.2)
    assert_close(loss, torch.tensor((0.5 + 0.845) / 2, dtype=D))
    assert met["vf_clipfrac"].item() == 0.5
    loss, met = value_loss(values=v, values_old=v_old, returns=ret, mask=m, clip_eps=None)
    assert_close(loss, torch.tensor(0.5, dtype=D))  # 0.5 * mean(1, 1)
    assert met["vf_clipfrac"].item() == 0.0


def test_value_loss_unchanged_values_is_half_mse():
    g = torch.Generator().manual_seed(4)
    v, r = torch.randn(3, 5, generator=g, dtype=D), torch.randn(3, 5, generator=g, dtype=D)
    m = torch.rand(3, 5, generator=g) > 0.3
    loss, _ = value_loss(values=v, values_old=v, returns=r, mask=m)
    assert_close(loss, 0.5 * ((v - r)[m] ** 2).mean())
    dirty, _ = value_loss(values=torch.where(m, v, NAN), values_old=torch.where(m, v, NAN),
                          returns=torch.where(m, r, NAN), mask=m)
    assert_close(dirty, loss)


# --- NLL / SFT ----------------------------------------------------------------------------------

def test_nll_loss_by_hand_and_vs_cross_entropy():
    lp = torch.tensor([[math.log(0.5), math.log(0.25), NAN]], dtype=D)
    m = torch.tensor([[1, 1, 0]])
    loss, met = nll_loss(logp=lp, mask=m)
    assert_close(loss, torch.tensor(1.5 * LN2, dtype=D))  # (ln 2 + ln 4) / 2
    assert met["ntokens"].item() == 2
    loss, _ = nll_loss(logp=lp, mask=m, normalizer=4)
    assert_close(loss, torch.tensor(3 * LN2 / 4, dtype=D))

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 5, 7, generator=g, dtype=D)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[1, 3:] = -100
    m = labels != -100
    loss, met = sft_loss(logits=logits, labels=labels, mask=m)
    ref = F.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1), ignore_index=-100)
    assert_close(loss, ref)
    assert_close(met["nll"], ref)


# --- Bradley-Terry ------------------------------------------------------------------------------

def test_bradley_terry_by_hand():
    loss, met = bradley_terry_loss(chosen_rewards=_t(1.0), rejected_rewards=_t(0.0))
    assert_close(loss, torch.tensor(math.log(1 + math.exp(-1)), dtype=D))  # 0.313262
    loss, _ = bradley_terry_loss(chosen_rewards=_t(1.0), rejected_rewards=_t(0.0), margin=1.0)
    assert_close(loss, torch.tensor(LN2, dtype=D))
    loss, met = bradley_terry_loss(chosen_rewards=_t(2.0, 0.0, 1.0), rejected_rewards=_t(1.0, 3.0, 1.0))
    assert met["accuracy"].item() == pytest.approx(1 / 3)  # ties count as wrong
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
