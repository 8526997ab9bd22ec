"""Token losses: PPO clipped policy loss (token and sequence level), clipped value loss, token NLL
(SFT / PTX). Pairwise preference losses (Bradley-Terry, DPO) are in `preference`.

Every function returns (loss, metrics). metrics maps standard names to detached 0-dim tensors
(call .item() when logging; keeping tensors avoids a device sync per metric). Metrics are
statistics of *this* (micro-)batch; the trainer averages them over micro-batches.

Token losses reduce through `stats.agg_loss`; pass `normalizer` for exact gradient accumulation.
Inputs are masked on entry with torch.where, so garbage at masked positions (nan/inf) can reach
neither the loss nor the gradient: a nan there would otherwise flow back as 0 * nan = nan.
"""

from __future__ import annotations

import torch

from rlhfkit.algos.kl import LOG_RATIO_CLAMP
from rlhfkit.algos.logprobs import token_logprobs
from rlhfkit.algos.stats import _count, _select, agg_loss, masked_mean, masked_sum


def _clipped_surrogate(
    log_ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Elementwise PPO loss max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)) and the ratio r.
    Returns (loss, ratio, clipped) where `clipped` marks entries whose active branch is the clipped
    one, i.e. that get no gradient. The log-ratio is clamped to [-20, 20] before exp so a wildly
    stale sample gives a huge finite ratio, not inf (inf * 0 = nan); a token beyond the clamp gets
    no gradient, as with a dual clip at e^20."""
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    # Pessimistic bound: max of the two losses = min of the two objectives.
    return torch.maximum(loss_unclipped, loss_clipped), ratio, loss_clipped > loss_unclipped


def _token_k3(log_ratio: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over valid tokens of (r - 1) - log r, r = exp(log_ratio) (log-ratio clamped as above)."""
    x = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return masked_mean(torch.expm1(x) - x, valid)


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
      approx_kl  k3 estimate of KL(pi_old || pi_theta), averaged over valid tokens:
                 mean((r - 1) - log r). Unbiased and >= 0 since tokens were sampled from pi_old
                 (cleanrl's approx_kl). 0 on the first minibatch of an on-policy update.
      approx_kl_trl  TRL PPOTrainer's `policy/approxkl_avg`: 0.5 * (logp - logp_old)^2 summed over
                 valid tokens and divided by *all* B * T positions (TRL fills padding with equal
                 log-probs, so padding adds 0 to the sum but counts in the mean). A k2 estimate
                 diluted by the padding fraction: it depends on how wide the batch is padded.
      ratio_mean, ratio_max over valid tokens.
    """
    eps_low = clip_eps
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    logp = _select(logp, mask)
    logp_old = _select(logp_old, mask)
    advantages = _select(advantages, mask)

    log_ratio = logp - logp_old
    loss_mat, ratio, clipped = _clipped_surrogate(log_ratio, advantages, eps_low, eps_high)
    loss = agg_loss(loss_mat, mask, mode=agg, normalizer=normalizer)

    with torch.no_grad():
        valid = mask.bool()
        metrics = {
            "clipfrac": masked_mean(clipped.float(), valid),
            "approx_kl": _token_k3(log_ratio, valid),
            "approx_kl_trl": masked_sum(0.5 * log_ratio.square(), valid) / max(log_ratio.numel(), 1),
            "ratio_mean": masked_mean(ratio, valid),
            "ratio_max": torch.where(valid, ratio, float("-inf")).max(),
        }
    return loss, metrics


SEQUENCE_LOG_RATIOS = ("sum", "mean")


def sequence_policy_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    log_ratio: str = "sum",
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict]:
    """PPO clipped surrogate with one importance ratio per *sequence*, to be minimised:
        rho_i = exp(sum_t (logp_it - logp_old_it))            log_ratio="sum"
        rho_i = exp(mean_t (logp_it - logp_old_it))           log_ratio="mean"
        L = sum_i -min(rho_i A_i, clip(rho_i, 1 - clip_eps, 1 + clip_eps_high) A_i) / normalizer

    "sum" is the likelihood ratio of the whole response, the ratio of TRL 1.16's RLOOTrainer
    (RLOO as REINFORCE on whole responses, Ahmadian et al. 2024): one clip decision per response,
    so a response is either fully in the trust region or gets no gradient at all. "mean" is the
    length-normalised ratio of GSPO (Zheng et al. 2025; TRL GRPO importance_sampling_level=
    "sequence"). The token-level form is `ppo_policy_loss` with `expand_to_tokens(A, mask)`.

    logp: (B, T) current policy log-probs (with grad); logp_old: (B, T) the rollout policy's;
    advantages: (B,) one per sequence; mask: (B, T). normalizer: the number of sequences in the
    global batch, for exact gradient accumulation (default: B, the mean over this batch, as TRL).
    A row with no valid token has ratio 1 and still counts in the mean (its loss gets no gradient).

    Metrics: clipfrac (share of sequences whose clipped branch is active), approx_kl (the token
    k3 of `ppo_policy_loss`, comparable across levels), ratio_mean, ratio_max (sequence ratios).
    """
    if log_ratio not in SEQUENCE_LOG_RATIOS:
        raise ValueError(f"unknown log_ratio {log_ratio!r}; expected one of {SEQUENCE_LOG_RATIOS}")
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    token_lr = _select(logp, mask) - _select(logp_old, mask)  # (B, T), 0 at masked positions
    seq_lr = token_lr.sum(-1)  # (B,)
    if log_ratio == "mean":
        seq_lr = seq_lr / _count(token_lr, mask, -1).clamp(min=1)
    losses, ratio, clipped = _clipped_surrogate(seq_lr, advantages, clip_eps, eps_high)  # (B,)
    loss = losses.sum() / (losses.numel() if normalizer is None else normalizer)

    with torch.no_grad():
        metrics = {
            "clipfrac": clipped.float().mean(),
            "approx_kl": _token_k3(token_lr, mask.bool()),
            "ratio_mean": ratio.mean(),
            "ratio_max": ratio.max(),
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
    """Clipped value loss (the PPO2 baselines form):
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
    """Token cross-entropy -log p(y_t) over valid tokens (SFT; the PTX term of Ouyang et al. 2022).

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
