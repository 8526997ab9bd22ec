"""Worked example: where PPO puts the EOS token, rlhfkit's single mask against TRL's PPOTrainer.

rlhfkit: one response mask that includes EOS, used for the KL penalty, the score position (the last
valid token, i.e. EOS), GAE, whitening, the policy loss and the value loss.

TRL 1.12 (trl/experimental/ppo/ppo_trainer.py) derives everything from
`seq_len = (index of the first pad token) - 1`: the policy/whitening mask is `idx <= seq_len`, the
value mask `idx <= seq_len + 1`, the score goes to `seq_len + 1` (or `seq_len` if that is past the
end), and log-probs past `seq_len` are overwritten with the same constant, so their KL is 0. What
that means depends on whether the pad token *is* the EOS token:
  pad == eos:  seq_len is the token before EOS, so EOS is left out of the policy loss, the
               whitening and the KL, but is in the value loss and carries the score.
  pad != eos:  seq_len is EOS itself: EOS is in the policy loss, and one extra position after it
               (a pad token) carries the score and is in the value loss.
The TRL side below is written from those rules, with the advantages computed by TRL's unmasked
GAE loop.
"""

import pytest
import torch
from torch.testing import assert_close

from rlhfkit.algos import (
    gae_advantages,
    kl_penalized_rewards,
    masked_whiten,
    ppo_policy_loss,
)

D = torch.float64
NAN = float("nan")
EOS, PAD, TOK = 2, 0, 7
BETA = 0.1

# Row 0 stops with EOS at index 3; row 1 is truncated at T = 5 (no EOS).
LOGP = torch.tensor([[-1.0, -0.5, -2.0, -0.3, NAN], [-0.7, -1.1, -0.4, -0.9, -1.3]], dtype=D)
REF = torch.tensor([[-1.2, -0.5, -1.5, -0.9, 0.0], [-0.7, -1.0, -0.6, -0.9, -1.0]], dtype=D)
VALUES = torch.tensor([[0.2, 0.3, 0.4, 0.8, 0.5], [0.1, 0.0, -0.1, -0.2, -0.3]], dtype=D)
SCORES = torch.tensor([1.0, -0.5], dtype=D)
MASK = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)  # rlhfkit: includes EOS


def _tokens(pad_id):
    return torch.tensor([[TOK, TOK, TOK, EOS, pad_id], [TOK] * 5])


def _trl_layout(tokens, pad_id):
    """(policy_mask, value_mask, score_index) by TRL PPOTrainer's rules (module docstring)."""
    T = tokens.shape[1]
    is_pad = tokens == pad_id
    first_pad = torch.where(is_pad.any(1), is_pad.int().argmax(1), torch.full((tokens.shape[0],), T))
    seq_len = first_pad - 1
    idx = torch.arange(T)[None]
    end = torch.where(seq_len + 1 < T, seq_len + 1, seq_len)
    return idx <= seq_len[:, None], idx <= seq_len[:, None] + 1, end


def _trl_advantages(pad_id, gamma=1.0, lam=1.0):
    """TRL's rewards and unmasked GAE loop; returns (advantages, returns, policy_mask, value_mask)."""
    pmask, vmask, end = _trl_layout(_tokens(pad_id), pad_id)
    kl = torch.where(pmask, LOGP - REF, 0.0)  # k1; 0 wherever TRL overwrote the log-probs
    rewards = -BETA * kl
    rewards[torch.arange(2), end] += SCORES
    values = torch.where(vmask, VALUES, 0.0)
    adv, last = torch.zeros_like(rewards), torch.zeros(2, dtype=D)
    for t in reversed(range(rewards.shape[1])):
        next_v = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
        last = rewards[:, t] + gamma * next_v - values[:, t] + gamma * lam * last
        adv[:, t] = last
    return adv, adv + values, pmask, vmask


def _rlhfkit_advantages(gamma=1.0, lam=1.0):
    rewards, _ = kl_penalized_rewards(SCORES, LOGP, REF, MASK, kl_coef=BETA, kl_kind="k1")
    return gae_advantages(rewards, VALUES, MASK, gamma=gamma, lam=lam)


def test_trl_masks_depend_on_whether_pad_is_eos():
    pmask, vmask, end = _trl_layout(_tokens(EOS), EOS)  # pad == eos
    assert pmask[0].tolist() == [True, True, True, False, False]  # EOS (index 3) not in the policy loss
    assert vmask[0].tolist() == [True, True, True, True, False]
    assert end.tolist() == [3, 4]  # score on EOS; truncated row: on its last token
    pmask, vmask, end = _trl_layout(_tokens(PAD), PAD)  # pad != eos
    assert pmask[0].tolist() == MASK[0].tolist()  # EOS in the policy loss, as in rlhfkit
    assert vmask[0].tolist() == [True] * 5  # plus the pad position after EOS in the value loss
    assert end.tolist() == [4, 4]  # score on the pad token after EOS
    for p in (EOS, PAD):  # a truncated response is the same in all three conventions
        pm, vm, _ = _trl_layout(_tokens(p), p)
        assert pm[1].all() and vm[1].all() and MASK[1].all()


def test_worked_example_pad_is_eos():
    # gamma = lam = 1, so A_t = (sum of rewards from t on) - V_t.
    # rlhfkit row 0: rewards -0.1 * k1 = [-0.02, 0, 0.05, -0.06] + score 1 on EOS
    #   reward-to-go [0.97, 0.99, 0.99, 0.94] - V [0.2, 0.3, 0.4, 0.8] = [0.77, 0.69, 0.59, 0.14]
    # TRL (pad == eos) row 0: no KL on EOS, score 1 on EOS
    #   reward-to-go [1.03, 1.05, 1.05, 1.00] - V = [0.83, 0.75, 0.65, 0.20]; A at EOS unused
    # Row 1 (truncated) is the same in both: [-0.58, -0.48, -0.39, -0.27, -0.17].
    ours, our_ret = _rlhfkit_advantages()
    trl, trl_ret, pmask, vmask = _trl_advantages(EOS)
    assert_close(ours[0, :4], torch.tensor([0.77, 0.69, 0.59, 0.14], dtype=D))
    assert_close(trl[0, :4], torch.tensor([0.83, 0.75, 0.65, 0.20], dtype=D))
    assert_close(ours[1], trl[1])
    assert_close(ours[1], torch.tensor([-0.58, -0.48, -0.39, -0.27, -0.17], dtype=D))
    # The value targets at EOS: the score minus EOS's KL (ours) or the score itself (TRL).
    assert our_ret[0, 3].item() == pytest.approx(0.94) and trl_ret[0, 3].item() == pytest.approx(1.0)

    # Whitening over 9 tokens (with EOS's 0.14) or 8 (without): every token's whitened advantage
    # moves, by up to 0.11 here (row 0: 1.390 vs 1.323; row 1's first token: -1.157 vs -1.046).
    w_ours = masked_whiten(ours, MASK)
    w_trl = masked_whiten(trl, pmask)
    assert w_ours[0, 0].item() == pytest.approx(1.3899, abs=1e-4)
    assert w_trl[0, 0].item() == pytest.approx(1.3230, abs=1e-4)
    assert w_ours[1, 0].item() == pytest.approx(-1.1572, abs=1e-4)
    assert w_trl[1, 0].item() == pytest.approx(-1.0458, abs=1e-4)

    # The stop decision: TRL's policy loss gives EOS's log-prob no gradient, so whether to stop is
    # never reinforced by the score; ours pushes it by -A_EOS / n_tokens (ratio 1).
    for mask, adv, eos_grad in ((MASK, w_ours, -w_ours[0, 3].item() / 9), (pmask, w_trl, 0.0)):
        logp = torch.where(mask, LOGP, 0.0).clone().requires_grad_()
        loss, _ = ppo_policy_loss(logp, logp.detach(), adv, mask)
        (grad,) = torch.autograd.grad(loss, logp)
        assert grad[0, 3].item() == pytest.approx(eos_grad, abs=1e-12)
    assert abs(w_ours[0, 3].item()) > 0.2


def test_worked_example_pad_is_not_eos():
    # With a separate pad token TRL keeps EOS in the policy loss and moves the score one position
    # later, onto a pad token that only the critic sees. At lam = 1 the policy-side advantages are
    # then exactly rlhfkit's (the extra position only adds r + V - V); at lam < 1 they differ by
    # gamma * (1 - lam) * (V(after EOS) - score) at EOS, through the critic's value on a pad token.
    ours, _ = _rlhfkit_advantages()
    trl, _, pmask, vmask = _trl_advantages(PAD)
    assert (pmask == MASK).all()
    assert_close(torch.where(MASK, trl, 0.0), ours)
    ours95, _ = _rlhfkit_advantages(lam=0.95)
    trl95, _, _, _ = _trl_advantages(PAD, lam=0.95)
    assert trl95[0, 3].item() - ours95[0, 3].item() == pytest.approx(0.05 * (VALUES[0, 4].item() - 1.0))
