"""Losses: PPO clipped policy loss, clipped value loss, token NLL (SFT / PTX), Bradley-Terry
reward-model loss, DPO and relatives.

Every function returns (loss, metrics). metrics maps standard names to detached 0-dim tensors
(call .item() when logging; keeping tensors avoids a device sync per metric). Metrics are
statistics of *this* (micro-)batch; the trainer averages them over micro-batches.

Token losses reduce through `stats.agg_loss`; pass `normalizer` for exact gradient accumulation.
Inputs are masked on entry with torch.where, so garbage at masked positions (nan/inf) can reach
neither the loss nor the gradient: a nan there would otherwise flow back as 0 * nan = nan.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhfkit.algos.kl import LOG_RATIO_CLAMP
from rlhfkit.algos.logprobs import token_logprobs
from rlhfkit.algos.stats import _select, agg_loss, masked_mean

DPO_LOSS_TYPES = ("sigmoid", "cdpo", "ipo", "hinge")


def _reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":  # the trainer divides by the global number of pairs
        return losses.sum()
    if reduction == "none":
        return losses
    raise ValueError(f"unknown reduction {reduction!r}; expected 'mean', 'sum' or 'none'")


def ppo_policy_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    agg: str = "token-mean",
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict]:
    """PPO clipped surrogate (Schulman et al. 2017), to be minimised:
        ratio_t = exp(logp_t - logp_old_t)
        L = agg(-min(ratio_t * A_t, clip(ratio_t, 1 - clip_eps, 1 + clip_eps_high) * A_t))

    logp: (B, T) current policy log-probs (with grad); logp_old: (B, T) behaviour policy's, from
    the rollout; advantages, mask: (B, T). clip_eps_high=None means symmetric clipping; a larger
    value is DAPO's "clip-higher" (Yu et al. 2025), which leaves more room for raising the
    probability of unlikely tokens.

    Metrics:
      clipfrac   fraction of valid tokens where the clipped branch is the active one, i.e. the
                 token gets no gradient: ratio > 1 + eps_high with A > 0, or ratio < 1 - eps with
                 A < 0. (cleanrl counts |ratio - 1| > eps whatever the sign of A; that also counts
                 tokens that the clip does not affect.)
      approx_kl  k3 estimate of KL(pi_old || pi_theta) over valid tokens: mean((r - 1) - log r),
                 unbiased and >= 0 since tokens were sampled from pi_old (cleanrl's approx_kl).
      ratio_mean, ratio_max over valid tokens.
    """
    eps_low = clip_eps
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    logp = _select(logp, mask)
    logp_old = _select(logp_old, mask)
    advantages = _select(advantages, mask)

    # Clamp before exp so a wildly stale token gives a huge finite ratio, not inf (inf * 0 = nan).
    log_ratio = (logp - logp_old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    # Pessimistic bound: max of the two losses = min of the two objectives.
    loss_mat = torch.maximum(loss_unclipped, loss_clipped)
    loss = agg_loss(loss_mat, mask, mode=agg, normalizer=normalizer)

    with torch.no_grad():
        valid = mask.bool()
        metrics = {
            "clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), valid),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, valid),
            "ratio_mean": masked_mean(ratio, valid),
            "ratio_max": torch.where(valid, ratio, float("-inf")).max(),
        }
    return loss, metrics


def value_loss(
    values: torch.Tensor,
    values_old: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None = 0.2,
    agg: str = "token-mean",
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict]:
    """Clipped value loss (SPEC 4.5; the PPO2 baselines form):
        L = agg(0.5 * max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2))

    values: (B, T) critic outputs now (with grad); values_old: (B, T) from the rollout;
    returns: (B, T) GAE returns; mask (B, T). clip_eps=None disables clipping (plain 0.5 * MSE).
    Note eps is in the reward's units, so it must be re-tuned when rewards are rescaled.
    Metrics: vf_clipfrac (fraction of valid tokens where the clipped term is strictly larger,
    so the token gets no gradient), value_mean, value_error (mean squared error, unclipped).
    """
    values = _select(values, mask)
    values_old = _select(values_old, mask)
    returns = _select(returns, mask)

    loss_unclipped = (values - returns).square()
    if clip_eps is None:
        loss_clipped = loss_unclipped
    else:
        values_clipped = values_old + (values - values_old).clamp(-clip_eps, clip_eps)
        loss_clipped = (values_clipped - returns).square()
    loss_mat = 0.5 * torch.maximum(loss_unclipped, loss_clipped)
    loss = agg_loss(loss_mat, mask, mode=agg, normalizer=normalizer)

    with torch.no_grad():
        metrics = {
            "vf_clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), mask),
            "value_mean": masked_mean(values, mask),
            "value_error": masked_mean(loss_unclipped, mask),
        }
    return loss, metrics


def nll_loss(
    logp: torch.Tensor,
    mask: torch.Tensor,
    agg: str = "token-mean",
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict]:
    """Token cross-entropy -log p(y_t) over valid tokens (SFT, SPEC 1; PTX term, SPEC 4.5).

    logp: (B, T) log-probs of the target tokens (`token_logprobs`); mask: (B, T), 1 on the tokens
    to learn (response / assistant tokens). Metrics: nll (this batch's token-mean NLL, whatever
    `agg` and `normalizer` are, so it is comparable across runs), ntokens.
    """
    logp = _select(logp, mask)
    loss = agg_loss(-logp, mask, mode=agg, normalizer=normalizer)
    with torch.no_grad():
        metrics = {"nll": -masked_mean(logp, mask), "ntokens": mask.bool().sum().float()}
    return loss, metrics


def sft_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    agg: str = "token-mean",
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict]:
    """`nll_loss` from logits. logits (B, T, V) and labels, mask (B, T) must already be aligned
    (logits[:, t] predicts labels[:, t]; see `logprobs.shift_for_causal`)."""
    return nll_loss(token_logprobs(logits, labels), mask, agg=agg, normalizer=normalizer)


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: float | torch.Tensor | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict]:
    """Reward-model loss under the Bradley-Terry model (SPEC 2; Ouyang et al. 2022):
        L = -log sigmoid(r_chosen - r_rejected - margin)

    chosen_rewards, rejected_rewards: (B,) scalar rewards of each pair. margin: optional scalar or
    (B,) required gap (Llama 2 uses a margin from the annotators' preference strength).
    reduction: "mean" | "sum" | "none" ("sum" then divide by the global number of pairs for exact
    gradient accumulation; "none" returns the (B,) per-pair losses).
    Metrics: accuracy (fraction with r_chosen > r_rejected; ties count as wrong), margin
    (mean r_chosen - r_rejected), chosen_mean, rejected_mean.
    """
    diff = chosen_rewards - rejected_rewards
    logits = diff if margin is None else diff - margin
    losses = -F.logsigmoid(logits)  # = softplus(-logits), stable for large |logits|
    with torch.no_grad():
        metrics = {
            "accuracy": (diff > 0).float().mean(),
            "margin": diff.mean(),
            "chosen_mean": chosen_rewards.mean(),
            "rejected_mean": rejected_rewards.mean(),
        }
    return _reduce(losses, reduction), metrics


def dpo_loss(
    policy_chosen_logp: torch.Tensor,
    policy_rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict]:
    """Direct Preference Optimisation (Rafailov et al. 2023) and relatives (SPEC 6).

    Inputs: (B,) sequence log-probs (`sequence_logps`) of chosen / rejected responses under the
    policy and the frozen reference. With the log-ratio difference
        h = [log pi(y_w) - log ref(y_w)] - [log pi(y_l) - log ref(y_l)]
    loss_type:
      "sigmoid" DPO: -log s(beta*h). With label_smoothing = e > 0 this becomes conservative DPO
                (cDPO, Mitchell 2023), which assumes labels are flipped with probability e:
                -(1 - e) log s(beta*h) - e log s(-beta*h).
      "cdpo"    the same formula (an alias that makes the intent explicit).
      "ipo"     IPO (Azar et al. 2023): (h - 1/(2*beta))^2, a squared loss that stops pushing once
                the log-ratio gap reaches 1/(2 beta), so it cannot drive h to infinity. The paper
                and TRL use per-token *averaged* log-probs for IPO; we use whatever the caller
                passes (sum by default: call `sequence_logps(..., average=True)` for TRL's).
      "hinge"   SLiC-style hinge (Zhao et al. 2023): relu(1 - beta*h).
    reduction: "mean" | "sum" | "none" as in `bradley_terry_loss`.
    Metrics (implicit rewards beta * log(pi/ref), Z(x) cancels): rewards/chosen,
    rewards/rejected, rewards/accuracy (chosen > rejected), rewards/margin, logps/chosen,
    logps/rejected (policy sequence log-probs).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")
    if label_smoothing and loss_type not in ("sigmoid", "cdpo"):
        raise ValueError("label_smoothing is only defined for the sigmoid (cDPO) loss")
    chosen_logratio = policy_chosen_logp - ref_chosen_logp
    rejected_logratio = policy_rejected_logp - ref_rejected_logp
    h = chosen_logratio - rejected_logratio  # (B,)

    if loss_type in ("sigmoid", "cdpo"):
        e = label_smoothing
        losses = -(1 - e) * F.logsigmoid(beta * h) - e * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)).square()
    else:  # hinge
        losses = torch.relu(1 - beta * h)

    with torch.no_grad():
        chosen_rewards = beta * chosen_logratio
        rejected_rewards = beta * rejected_logratio
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": policy_chosen_logp.mean(),
            "logps/rejected": policy_rejected_logp.mean(),
        }
    return _reduce(losses, reduction), metrics
