"""Several reward functions combined into one score per response, with unscorable samples.

Each of F reward functions scores the same B responses: scores (B, F). A function that cannot
score a response (no reference answer, a format it does not judge) marks it NaN, and the
combination ignores it, as TRL's GRPOTrainer does (its reward functions return None -> NaN ->
``nansum``). A row that no function scored stays NaN: what to do with it is the caller's choice.

Two combinations, the two that TRL 1.16 offers (``GRPOConfig.multi_objective_aggregation``):

- ``"sum"``: R_i = sum_f w_f * s_if over the functions that scored i (TRL's default,
  "sum_then_normalize": the group normalisation of GRPO comes afterwards, from the advantages).
- ``"normalize_then_sum"``: each function is first standardised within each group of responses
  to the same prompt, z_if = (s_if - mean_g,f) / (std_g,f + eps), then R_i = sum_f w_f * z_if
  (GDPO, arXiv:2601.05242: a reward with a large spread no longer drowns the others, and a weight
  means what it says). Means and stds skip NaN; the std is unbiased (Bessel) as in
  `algos.advantages.group_advantages`. A function that scored a single response of a group has
  no spread there: that z is NaN and the function is left out of that row's sum.
"""

from __future__ import annotations

import torch

COMBINE_MODES = ("sum", "normalize_then_sum")


def nan_std(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """Unbiased std over `dim` ignoring NaN; NaN where fewer than two values are present."""
    count = (~x.isnan()).sum(dim=dim, keepdim=True)
    mean = x.nanmean(dim=dim, keepdim=True)
    sq = ((x - mean) ** 2).nansum(dim=dim, keepdim=True)
    var = torch.where(count > 1, sq / (count - 1).clamp(min=1), torch.full_like(sq, float("nan")))
    std = var.sqrt()
    return std if keepdim else std.squeeze(dim)


def _check(scores: torch.Tensor, weights: torch.Tensor, mode: str, group_size: int | None) -> int:
    """Validate the inputs; returns the group size (B when None)."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, F), got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be floating point (NaN marks unscored), got {scores.dtype}")
    if weights.shape != (scores.shape[1],):
        raise ValueError(f"weights must be ({scores.shape[1]},), one per function, got {tuple(weights.shape)}")
    if not torch.isfinite(weights).all():
        raise ValueError(f"weights must be finite, got {weights.tolist()}")
    if scores.isinf().any():
        raise ValueError("scores must be finite numbers or NaN (unscored), got inf")
    if mode not in COMBINE_MODES:
        raise ValueError(f"unknown combine mode {mode!r}; expected one of {', '.join(COMBINE_MODES)}")
    B = scores.shape[0]
    G = B if group_size is None else group_size
    if G < 1 or (B and B % G):
        raise ValueError(f"B={B} responses are not whole groups of group_size={group_size}")
    return max(G, 1)


def normalize_per_group(scores: torch.Tensor, group_size: int | None = None, eps: float = 1e-4) -> torch.Tensor:
    """(B, F) -> (B, F): each column standardised within contiguous groups of `group_size` rows
    (rows g*G .. g*G+G-1 are the responses to prompt g; None: the whole batch is one group).
    NaN stays NaN; a group with a single scored value gives NaN (no spread to measure)."""
    B, F = scores.shape
    G = _check(scores, scores.new_ones(F), "sum", group_size)
    g = scores.view(-1, G, F)  # (B/G, G, F)
    mean = g.nanmean(dim=1, keepdim=True)
    std = nan_std(g, dim=1, keepdim=True)
    return ((g - mean) / (std + eps)).view(B, F)


def combine_rewards(scores: torch.Tensor, weights: torch.Tensor, mode: str = "sum",
                    group_size: int | None = None, eps: float = 1e-4) -> torch.Tensor:
    """Combine per-function scores into one reward per response.

    scores: (B, F) float, NaN where a function did not score a response (never inf).
    weights: (F,) finite (negative weights penalise). mode: "sum" or "normalize_then_sum" (see the
    module docstring). group_size: rows per prompt for "normalize_then_sum" (groups contiguous;
    None = one group). eps: added to the std, as TRL does (1e-4).
    Returns (B,): sum_f w_f * s_if over the scored functions, NaN for rows no function scored.
    """
    _check(scores, weights, mode, group_size)
    unscored = scores.isnan().all(dim=1)  # (B,)
    if mode == "normalize_then_sum":
        scores = normalize_per_group(scores, group_size, eps)
    combined = (scores * weights.to(scores)).nansum(dim=1)  # (B,) NaN terms skipped
    return combined.masked_fill(unscored, float("nan"))


def reward_stats(scores: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-function statistics over the responses each function scored.

    scores: (B, F) with NaN for unscored. Returns {"mean", "std", "scored_frac"}, each (F,):
    NaN-skipping mean, unbiased std (NaN with fewer than two scores), fraction of rows scored.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, F), got shape {tuple(scores.shape)}")
    scored = ~scores.isnan()
    return {"mean": scores.nanmean(dim=0), "std": nan_std(scores, dim=0),
            "scored_frac": scored.to(scores.dtype).mean(dim=0) if len(scores) else scores.new_zeros(scores.shape[1])}
