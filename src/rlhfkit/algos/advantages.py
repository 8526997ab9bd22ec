"""Rewards and advantage estimators: KL-penalised rewards, GAE (PPO), group-normalised (GRPO),
leave-one-out (RLOO) and REINFORCE with a baseline.

All token tensors are (B, T) over *response* tokens with a binary `mask`; sequence tensors are
(N,). Nothing here needs gradients, so the estimators run under no_grad; pass detached tensors.
Functions taking ``reduce`` (a callable summing a tensor over data-parallel ranks, e.g.
`Runtime.sum`) compute batch statistics over the global batch, so N ranks match one process.
"""

from __future__ import annotations

import torch

from rlhfkit.algos.kl import kl_estimate
from rlhfkit.algos.stats import _mean_var, _select, masked_sum


@torch.no_grad()
def kl_penalized_rewards(
    score: torch.Tensor,
    logp: torch.Tensor,
    logp_ref: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kl_kind: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO rewards: r_t = -kl_coef * kl_t, plus the sequence score at the
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
    Whitening the advantages is left to the caller: `stats.masked_whiten`.
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


@torch.no_grad()
def kl_penalized_scores(
    scores: torch.Tensor,
    logp: torch.Tensor,
    logp_ref: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    kl_kind: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence rewards with the KL penalty folded in: R_i = score_i - beta * sum_t kl_t.

    This is RLOO's reward in Ahmadian et al. (2024) and in TRL's RLOOTrainer (k1 of the rollout
    policy against the reference, summed over the response, subtracted *before* the leave-one-out
    baseline, so the baseline also sees the penalty). scores: (N,); logp (rollout policy), logp_ref,
    mask: (N, T). Returns (rewards (N,), kl (N,) the per-sequence KL estimate). Masked positions
    (nan included) cannot reach the result; an empty response has kl 0.
    """
    kl = masked_sum(kl_estimate(logp, logp_ref, kind=kl_kind), mask, dim=-1)  # (N,)
    return scores - beta * kl.to(scores.dtype), kl


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) -> (N / G, G). Groups are contiguous: the G samples of prompt i are rows i*G..i*G+G-1."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (N,), got shape {tuple(scores.shape)}")
    if group_size < 1 or scores.numel() % group_size != 0:
        raise ValueError(f"N={scores.numel()} is not a multiple of group_size={group_size}")
    return scores.view(-1, group_size)


def _group_offsets(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) -> (N / G, G) float64 offsets R_ij - R_i0 from each group's first score.

    The upcast is exact for every float dtype up to float64, and x - x = 0 exactly, so a group of
    equal scores has offsets that are all exactly 0 and everything computed from them (mean, std,
    baselines) is exactly 0 too. Averaging the raw scores instead rounds: the float32 mean of eight
    3.71 is one step (~5e-7) off, which divided by a ~5e-7 std + eps becomes an order-1 advantage.
    """
    g = _groups(scores, group_size).to(torch.float64)
    return g - g[:, :1]


# Why 1e-4 (TRL's value): scores that differ only by float32 rounding, ~1.2e-7 * |R|, get at most
# |A| <= 1.2e-7 * |R| / eps, i.e. <= 0.012 for |R| <= 10 (1e-6 would allow 1.2: noise becomes signal).
# A group with a real spread (std >= 0.01; a mixed group of 0/1 rewards has std >= 0.35 for G <= 8)
# is shrunk by at most std / (std + eps) >= 0.99. Compute scores in float32 or wider: bf16 rounding
# (~4e-3 * |R|) is indistinguishable from signal whatever the epsilon.
GROUP_STD_EPS = 1e-4
GROUP_SCALES = ("group", "batch", "none")


@torch.no_grad()
def group_advantages(
    scores: torch.Tensor, group_size: int, scale: str = "group", eps: float = GROUP_STD_EPS, reduce=None
) -> torch.Tensor:
    """GRPO advantages (Shao et al. 2024, DeepSeekMath): A_i = (R_i - mean_g) / (std + eps).

    scores: (N,) with N = num_prompts * group_size, groups contiguous. Returns (N,) in the dtype of
    `scores`. The std is the *unbiased* one (Bessel, n - 1), as in TRL and verl. scale:
      "group"  std of the sample's own group (TRL scale_rewards="group"; "std" is accepted as the
               same thing).
      "batch"  std of the raw scores over the whole global batch, all groups on all ranks (TRL
               scale_rewards="batch"; "Lite PPO", Liu et al. 2025, "Tricks or Traps? A Deep Dive
               into RL for LLM Reasoning"). Pass ``reduce`` (sums over ranks) with data parallelism.
      "none"   R_i - mean_g only (Dr. GRPO, Liu et al. 2025, which argues the std division
               over-weights groups that are almost all right or all wrong).
    eps: see GROUP_STD_EPS for why 1e-4. A group of equal scores gives exactly 0 at every dtype and
    group size; so does group_size == 1. Scale invariance (A(c R) = A(R), c > 0) holds up to the
    eps, i.e. when std >> eps; translation invariance holds exactly in real arithmetic.
    """
    scale = "group" if scale == "std" else scale
    if scale not in GROUP_SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {GROUP_SCALES}")
    offsets = _group_offsets(scores, group_size)  # (P, G) float64
    centered = offsets - offsets.mean(dim=1, keepdim=True)
    if scale == "group" and group_size > 1:
        centered = _divide(centered, offsets.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        raw = scores.to(torch.float64)
        _, var = _mean_var(raw, torch.ones_like(raw, dtype=torch.bool), True, reduce)
        centered = _divide(centered, var.sqrt().to(centered.device) + eps)
    return centered.reshape(-1).to(scores.dtype)


def _divide(centered: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    # A zero spread means zero offsets (0 / 0 with eps = 0): keep them 0 instead of nan.
    return centered / torch.where(denom > 0, denom, torch.ones_like(denom))


@torch.no_grad()
def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE Leave-One-Out (Kool et al. 2019; Ahmadian et al. 2024):
    A_i = R_i - mean of the other G-1 rewards = R_i - (sum_g - R_i) / (G - 1)
        = G / (G - 1) * (R_i - mean_g).
    Excluding R_i from its own baseline keeps the gradient estimate unbiased.
    scores: (N,), contiguous groups of `group_size` >= 2. Returns (N,) in the dtype of `scores`;
    a group of equal scores gives exactly 0 (computed from exact float64 offsets, as in
    `group_advantages`). For the paper's KL-penalised reward, pass `kl_penalized_scores(...)[0]`.
    """
    if group_size < 2:
        raise ValueError("RLOO needs group_size >= 2 (the baseline is the mean of the others)")
    g = _group_offsets(scores, group_size)
    baseline = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - baseline).reshape(-1).to(scores.dtype)


def _global_mean(scores: torch.Tensor, reduce) -> torch.Tensor:
    """Mean of (N,) scores over every rank's rows (float64 sum and count, summed by ``reduce``)."""
    x = scores.to(torch.float64)
    total = torch.stack([x.sum(), torch.tensor(float(x.numel()), dtype=x.dtype, device=x.device)])
    total = total if reduce is None else reduce(total)
    return total[0] / total[1].clamp(min=1)


@torch.no_grad()
def reinforce_baseline_advantages(
    scores: torch.Tensor, baseline: float | torch.Tensor
) -> torch.Tensor:
    """REINFORCE with a baseline (Williams 1992): A = R - b. scores (N,); baseline a scalar
    (e.g. `RunningMeanBaseline.value`) or an (N,) tensor. Returns (N,)."""
    return scores - baseline


@torch.no_grad()
def batch_mean_advantages(scores: torch.Tensor, reduce=None) -> torch.Tensor:
    """REINFORCE with the global batch mean as baseline: A_i = R_i - mean_j R_j over all N samples
    of all ranks (``reduce`` sums over ranks). The mean includes R_i itself: A_i = (N - 1) / N *
    (R_i - mean of the others), an unbiased estimate scaled by (N - 1) / N, negligible for large
    batches. It needs no groups, so it works with one sample per prompt. scores (N,) -> (N,)."""
    return scores - _global_mean(scores, reduce).to(scores.dtype)


class RunningMeanBaseline:
    """REINFORCE baseline from previous batches: an exponential moving average of batch means.

        A_i = R_i - b_{k-1},    then    b_k = decay * b_{k-1} + (1 - decay) * mean(batch k)

    The advantages of batch k use only earlier batches, so the baseline does not depend on the
    current samples and the gradient estimate stays unbiased (Williams 1992). The first batch has
    no history: its baseline is its own mean (as `batch_mean_advantages`). With ``reduce`` the
    batch mean is global, so every rank holds the same baseline. The state is one float (or None
    before the first batch): `state_dict()` / `load_state_dict()` checkpoint it.
    """

    def __init__(self, decay: float = 0.9):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.value: float | None = None

    @torch.no_grad()
    def advantages(self, scores: torch.Tensor, reduce=None) -> torch.Tensor:
        """A = scores - baseline for this batch (N,), then fold this batch's mean into the baseline."""
        batch_mean = float(_global_mean(scores, reduce))
        baseline = batch_mean if self.value is None else self.value
        self.value = batch_mean if self.value is None else self.decay * self.value + (1 - self.decay) * batch_mean
        return scores - baseline

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = None if state["value"] is None else float(state["value"])


def expand_to_tokens(seq_adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Give every valid token of a response its sequence-level advantage.
    seq_adv (B,), mask (B, T) -> (B, T), 0 at masked positions."""
    return _select(seq_adv[:, None].expand(mask.shape), mask)
