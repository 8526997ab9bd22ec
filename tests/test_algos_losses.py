import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from rlhfkit.algos import (
    nll_loss,
    ppo_policy_loss,
    sequence_policy_loss,
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
    # TRL's approxkl: 0.5 * (ln^2 1.5 + 2 ln^2 2 + ln^2 1.5) over all 5 positions (padding included)
    k2_trl = 0.5 * (2 * math.log(1.5) ** 2 + 2 * LN2**2) / 5
    assert_close(metrics["approx_kl_trl"], torch.tensor(k2_trl, dtype=D))


def test_ppo_clip_higher():
    # ratio 1.25 with A>0 is clipped at eps=0.2 but not with eps_high=0.28
    logp = torch.tensor([[math.log(1.25)]], dtype=D)
    z, a, m = torch.zeros(1, 1, dtype=D), torch.ones(1, 1, dtype=D), torch.ones(1, 1)
    loss, met = ppo_policy_loss(logp=logp, logp_old=z, advantages=a, mask=m, clip_eps=0.2)
    assert_close(loss, torch.tensor(-1.2, dtype=D))
    assert met["clipfrac"].item() == 1.0
    loss, met = ppo_policy_loss(logp=logp, logp_old=z, advantages=a, mask=m, clip_eps=0.2, clip_eps_high=0.28)
    assert_close(loss, torch.tensor(-1.25, dtype=D))
    assert met["clipfrac"].item() == 0.0


def test_ppo_clip_higher_asymmetric_by_hand():
    # eps_low = 0.2, eps_high = 0.28: clip range [0.8, 1.28]
    # ratio 1.25, A=+1: inside the range               -> loss -1.25, not clipped
    # ratio 1.4,  A=+1: clipped to 1.28                -> loss -1.28, clipped
    # ratio 0.75, A=-1: max(0.75, 0.8) = 0.8           -> loss  0.8,  clipped (low side uses eps_low)
    # ratio 0.7,  A=+1: min(0.7, 0.8) = 0.7            -> loss -0.7,  not clipped
    logp = torch.tensor([[math.log(1.25), math.log(1.4), math.log(0.75), math.log(0.7)]], dtype=D)
    z, m = torch.zeros(1, 4, dtype=D), torch.ones(1, 4)
    a = _t(1.0, 1.0, -1.0, 1.0).unsqueeze(0)
    loss, met = ppo_policy_loss(logp=logp, logp_old=z, advantages=a, mask=m, clip_eps=0.2, clip_eps_high=0.28)
    assert_close(loss, torch.tensor((-1.25 - 1.28 + 0.8 - 0.7) / 4, dtype=D))
    assert met["clipfrac"].item() == 0.5
    assert_close(met["ratio_max"], torch.tensor(1.4, dtype=D))


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


# --- sequence-level surrogate (RLOO as TRL 1.16, GSPO) -------------------------------------------

def test_sequence_policy_loss_by_hand():
    # row 0: token log-ratios ln 1.5 and 0 -> rho = 1.5, A = +1: clipped at 1.2, loss -1.2
    # row 1: log-ratios ln 0.5 (one token; the padded one holds nan) -> rho = 0.5, A = -1:
    #        min(-0.5, -0.8) = -0.8 -> loss 0.8, clipped
    # row 2: rho = 0.9 * 1 = 0.9, A = 2: min(1.8, 1.8) -> loss -1.8, not clipped
    logp_old = torch.zeros(3, 2, dtype=D)
    logp = torch.tensor([[math.log(1.5), 0.0], [math.log(0.5), NAN], [math.log(0.9), 0.0]], dtype=D)
    m = torch.tensor([[1, 1], [1, 0], [1, 1]])
    adv = _t(1.0, -1.0, 2.0)
    loss, met = sequence_policy_loss(logp, logp_old, adv, m, clip_eps=0.2)
    assert_close(loss, torch.tensor((-1.2 + 0.8 - 1.8) / 3, dtype=D))
    assert met["clipfrac"].item() == pytest.approx(2 / 3)
    assert_close(met["ratio_max"], torch.tensor(1.5, dtype=D))
    # "mean" (GSPO): row 0 rho = exp(ln(1.5) / 2) = 1.2247 -> clipped at 1.2 as well;
    # row 2: rho = sqrt(0.9) = 0.94868 -> loss -1.89737
    loss, _ = sequence_policy_loss(logp, logp_old, adv, m, clip_eps=0.2, log_ratio="mean")
    assert_close(loss, torch.tensor((-1.2 + 0.8 - 2 * math.sqrt(0.9)) / 3, dtype=D))
    with pytest.raises(ValueError):
        sequence_policy_loss(logp, logp_old, adv, m, log_ratio="max")


def test_sequence_policy_loss_matches_loop_and_gradient_at_ratio_one():
    g = torch.Generator().manual_seed(5)
    B, T, eps, eps_hi = 6, 5, 0.2, 0.28
    logp = (torch.randn(B, T, generator=g, dtype=D) * 0.2).requires_grad_()
    logp_old = torch.randn(B, T, generator=g, dtype=D) * 0.2
    adv = torch.randn(B, generator=g, dtype=D)
    m = torch.rand(B, T, generator=g) > 0.3
    for kind in ("sum", "mean"):
        total = 0.0
        for b in range(B):
            lr = [logp[b, t].item() - logp_old[b, t].item() for t in range(T) if m[b, t]]
            x = sum(lr) if kind == "sum" else (sum(lr) / len(lr) if lr else 0.0)
            rho = math.exp(x)
            total += -min(rho * adv[b].item(), min(max(rho, 1 - eps), 1 + eps_hi) * adv[b].item())
        loss, _ = sequence_policy_loss(logp, logp_old, adv, m, eps, eps_hi, log_ratio=kind)
        assert loss.item() == pytest.approx(total / B, abs=1e-12)
    # at ratio 1 ("sum"): the REINFORCE gradient -A_i / B on every valid token of row i
    loss, met = sequence_policy_loss(logp, logp.detach(), adv, m)
    (grad,) = torch.autograd.grad(loss, logp)
    assert_close(grad, torch.where(m, -adv[:, None] / B, 0.0))
    assert met["clipfrac"].item() == 0.0 and met["approx_kl"].item() == 0.0


def test_sequence_policy_loss_garbage_and_micro_batches():
    g = torch.Generator().manual_seed(6)
    B, T = 8, 6
    logp = (torch.randn(B, T, generator=g, dtype=D) * 0.1).requires_grad_()
    logp_old = (logp + 0.1 * torch.randn(B, T, generator=g, dtype=D)).detach()
    adv = torch.randn(B, generator=g, dtype=D)
    m = torch.arange(T)[None] < torch.randint(0, T + 1, (B, 1), generator=g)
    full, met = sequence_policy_loss(logp, logp_old, adv, m)
    (full_grad,) = torch.autograd.grad(full, logp)
    dirty, met_d = sequence_policy_loss(torch.where(m, logp, 1e4), torch.where(m, logp_old, NAN), adv, m)
    assert_close(dirty, full)
    assert_close(torch.autograd.grad(dirty, logp)[0], full_grad)
    for k in met:
        assert_close(met_d[k], met[k])
    total, grad = 0.0, torch.zeros_like(logp)
    for i in range(0, B, 3):  # uneven micro-batches 3 + 3 + 2, normalised by the global row count
        s = slice(i, i + 3)
        part, _ = sequence_policy_loss(logp[s], logp_old[s], adv[s], m[s], normalizer=B)
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
    assert_close(met["value_mean"], torch.tensor(1.0, dtype=D))  # mean of V, not V_old (0.5)
    assert_close(met["value_error"], torch.tensor(1.0, dtype=D))  # unclipped (V-R)^2: mean(1, 1)
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
