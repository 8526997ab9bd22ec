"""Per-token rewards and advantage estimators: GAE (PPO), group-normalised (GRPO), leave-one-out
(RLOO) and REINFORCE with a baseline.

All token tensors are (B, T) over *response* tokens with a binary `mask`. Nothing here needs
gradients, so the estimators run under no_grad; pass detached tensors.
"""

from __future__ import annotations

import torch

from rlhfkit.algos.kl import kl_estimate
from rlhfkit.algos.stats import _select


@torch.no_grad()
def kl_penalized_rewards(
    score: torch.Tensor,
    logp: torch.Tensor,
    logp_ref: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kl_kind: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO rewards (SPEC 4.3): r_t = -kl_coef * kl_t, plus the sequence score at the
    last valid token (Ziegler et al. 2019; Ouyang et al. 2022).

    score: (B,) one scalar per response (from the reward model, already clipped/penalised).
    logp, logp_ref, mask: (B, T); logp is the rollout (old) policy's log-prob.
    Returns (rewards (B, T), kl (B, T)), both 0 at masked positions. `kl` is the per-token
    estimate, for logging (sum it over tokens for the usual sequence KL).

    The "last valid token" is the highest index with mask set, so right padding, left padding
    or holes all work. A row with no valid token gets no reward at all (its score is dropped).
    """
    kl = _select(kl_estimate(logp, logp_ref, kind=kl_kind), mask)
    rewards = -kl_coef * kl
    T = mask.shape[-1]
    valid = mask.bool()
    positions = torch.arange(T, device=mask.device).expand_as(valid)
    last = torch.where(valid, positions, -1).max(dim=-1).values  # (B,), -1 for empty rows
    has_valid = last >= 0
    score = torch.where(has_valid, score.to(rewards.dtype), 0.0)
    rewards = rewards.scatter_add(-1, last.clamp(min=0)[:, None], score[:, None])
    return rewards, kl


@torch.no_grad()
def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016) over response tokens.

    rewards, values, mask: (B, T). Returns (advantages (B, T), returns (B, T)) with
        delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1},
        R_t = A_t + V_t,
    and V = 0, A = 0 after the last valid token (the episode ends there). Both outputs are 0 at
    masked positions. Masked positions are *skipped*, not treated as zero-reward steps: the
    running V_{t+1} and A_{t+1} carry across them, so a row is processed as if its masked tokens
    were removed (with right padding this is exactly "stop at the last valid token").
    Whatever values/rewards hold at masked positions (nan included) cannot reach the result.
    Whitening the advantages (SPEC 4.4) is left to the caller: `stats.masked_whiten`.
    """
    valid = mask.bool()
    rewards = _select(rewards, valid)
    values = _select(values, valid)
    B, T = rewards.shape
    next_value = rewards.new_zeros(B)  # V_{t+1}; 0 past the end
    next_adv = rewards.new_zeros(B)  # A_{t+1}
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(T)):  # vectorised over B
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        m = valid[:, t]
        next_value = torch.where(m, values[:, t], next_value)
        next_adv = torch.where(m, adv, next_adv)
        advantages[:, t] = torch.where(m, adv, 0.0)
    returns = _select(advantages + values, valid)
    return advantages, returns


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) -> (N / G, G). Groups are contiguous: the G samples of prompt i are rows i*G..i*G+G-1."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (N,), got shape {tuple(scores.shape)}")
    if group_size < 1 or scores.numel() % group_size != 0:
        raise ValueError(f"N={scores.numel()} is not a multiple of group_size={group_size}")
    return scores.view(-1, group_size)


@torch.no_grad()
def group_advantages(
    scores: torch.Tensor, group_size: int, scale: str = "std", eps: float = 1e-6
) -> torch.Tensor:
    """GRPO advantages (Shao et al. 2024, DeepSeekMath): A_i = (R_i - mean_g) / (std_g + eps).

    scores: (N,) with N = num_prompts * group_size, groups contiguous. Returns (N,).
    scale="std" divides by the group's *unbiased* std (Bessel, n - 1), as TRL's GRPOTrainer and
    verl do; scale="none" keeps R_i - mean_g (Dr. GRPO, Liu et al. 2025, which argues the std
    division over-weights groups that are almost all right or all wrong).
    A group whose scores are all equal gets advantage 0 (no signal); group_size == 1 gives 0.
    """
    g = _groups(scores, group_size)
    if group_size == 1:
        return torch.zeros_like(scores)
    centered = g - g.mean(dim=1, keepdim=True)
    if scale == "std":
        centered = centered / (g.std(dim=1, keepdim=True) + eps)
    elif scale != "none":
        raise ValueError(f"unknown scale {scale!r}; expected 'std' or 'none'")
    return centered.reshape(-1)


@torch.no_grad()
def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE Leave-One-Out (Kool et al. 2019; Ahmadian et al. 2024):
    A_i = R_i - mean of the other G-1 rewards = R_i - (sum_g - R_i) / (G - 1)
        = G / (G - 1) * (R_i - mean_g).
    Excluding R_i from its own baseline keeps the gradient estimate unbiased.
    scores: (N,), contiguous groups of `group_size` >= 2. Returns (N,).
    """
    if group_size < 2:
        raise ValueError("RLOO needs group_size >= 2 (the baseline is the mean of the others)")
    g = _groups(scores, group_size)
    baseline = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - baseline).reshape(-1)


@torch.no_grad()
def reinforce_baseline_advantages(
    scores: torch.Tensor, baseline: float | torch.Tensor
) -> torch.Tensor:
    """REINFORCE with a baseline (Williams 1992): A = R - b. scores (N,); baseline a scalar
    (e.g. a running mean of rewards) or an (N,) tensor. Returns (N,)."""
    return scores - baseline


def expand_to_tokens(seq_adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Give every valid token of a response its sequence-level advantage.
    seq_adv (B,), mask (B, T) -> (B, T), 0 at masked positions."""
    return _select(seq_adv[:, None].expand(mask.shape), mask)
