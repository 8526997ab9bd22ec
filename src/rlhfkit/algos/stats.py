"""Masked statistics and the one loss reduction every token loss goes through.

Convention for every function here: `mask` is binary (bool or 0/1 of any dtype) and broadcastable
to `x`. Masked entries are selected away with `torch.where`, never multiplied by 0, because
`0 * nan = nan` and `0 * inf = nan`: padding positions may hold garbage (nan values from a critic
on pad tokens, -inf log-probs, ...) and must never reach a result.

Half-precision inputs (bf16, fp16) are reduced in float32: a bf16 sum of thousands of tokens is
off in the third digit, and an fp16 count overflows at 65504. Statistics come back in the input's
dtype; `agg_loss` returns a loss of at least float32.
"""

from __future__ import annotations

import torch

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")


def _select(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x where mask is set, exact 0 elsewhere (also kills nan/inf, unlike x * mask)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `x` over entries where `mask` is set; over all dims if `dim` is None."""
    x = _select(x, mask)
    return x.sum() if dim is None else x.sum(dim)


def _wide(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _count(x: torch.Tensor, mask: torch.Tensor, dim: int | None) -> torch.Tensor:
    # Broadcast the mask to x's shape first, so a (B, 1) mask on a (B, T) x counts T per row.
    return masked_sum(torch.ones_like(x), mask, dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over valid entries. An empty selection gives 0 (count clamped to 1), not nan,
    so a row with no valid tokens does not poison a batch statistic."""
    w = _wide(x)
    return (masked_sum(w, mask, dim) / _count(w, mask, dim).clamp(min=1)).to(x.dtype)


def _mean_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool, reduce) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, variance) over valid entries, two-pass; ``reduce`` sums each partial over ranks."""
    reduce = reduce or (lambda t: t)
    x = _wide(x)
    total = reduce(torch.stack([masked_sum(x, mask), _count(x, mask, None)]))  # (sum, count)
    mean = total[0] / total[1].clamp(min=1)
    sq_dev = reduce(masked_sum((x - mean) ** 2, mask))
    n = total[1]
    return mean, sq_dev / (n - 1 if unbiased else n).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, reduce=None) -> torch.Tensor:
    """Variance of `x` over all valid entries (a scalar).

    unbiased=True divides by n - 1 (Bessel). With fewer than two valid entries the denominator is
    clamped to 1, which gives variance 0 instead of inf/nan. ``reduce`` (e.g. `Strategy.sum`) sums
    a tensor over data-parallel ranks: the variance is then that of every rank's valid entries.
    """
    return _mean_var(x, mask, unbiased, reduce)[1].to(x.dtype)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8, reduce=None
) -> torch.Tensor:
    """Normalise `x` to mean 0 / variance 1 over its valid entries; masked entries become 0.

    Used on PPO advantages over all valid tokens of the batch. With shift_mean=False
    the mean is added back after scaling, i.e. (x - mean) / std + mean (same as OpenAI's
    lm-human-preferences and TRL): the spread is normalised but the sign balance is kept.
    The variance is the unbiased one. With ``reduce`` (sums a tensor over data-parallel ranks)
    the statistics are the global batch's, so N ranks whiten exactly as one process would.
    """
    mean, var = _mean_var(x, mask, True, reduce)
    whitened = (_wide(x) - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _select(whitened, mask).to(x.dtype)


def agg_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    normalizer: float | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss (B, T) to a scalar; the single reduction used by all token losses.

    Modes:
      "token-mean"          sum of valid token losses / number of valid tokens
                            (every token weighs the same; long responses weigh more).
      "seq-mean-token-sum"  sum over tokens of each row, then mean over rows.
      "seq-mean-token-mean" mean over the valid tokens of each row, then mean over rows
                            (every sequence weighs the same; the original GRPO paper).

    normalizer: the denominator of the *global* batch, for gradient accumulation and data
    parallelism. For "token-mean" it is the number of valid tokens in the whole global batch;
    for the seq-mean modes it is the number of sequences (rows) in the whole global batch.
    With it, each micro-batch returns its share sum/normalizer, so summing the micro-batch losses
    (accumulating their gradients) equals the full-batch loss exactly: batch 8 x accumulation 1
    == batch 1 x accumulation 8. Without it, the denominator is this batch's own count, and
    averaging micro-batch means over-weights tokens of short micro-batches.

    Rows with no valid token still count as a row in the seq-mean modes (contributing 0).
    """
    loss_mat = _wide(loss_mat)
    if mode == "token-mean":
        total = masked_sum(loss_mat, mask)
        denom = _count(loss_mat, mask, None).clamp(min=1) if normalizer is None else normalizer
        return total / denom
    if mode == "seq-mean-token-sum":
        seq_losses = masked_sum(loss_mat, mask, dim=-1)  # (B,)
    elif mode == "seq-mean-token-mean":
        seq_losses = masked_mean(loss_mat, mask, dim=-1)  # (B,)
    else:
        raise ValueError(f"unknown agg_loss mode {mode!r}; expected one of {AGG_MODES}")
    denom = seq_losses.numel() if normalizer is None else normalizer
    return seq_losses.sum() / denom


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, reduce=None
) -> torch.Tensor:
    """1 - Var[returns - values] / Var[returns] over valid entries (cleanrl's critic metric).

    1 is a perfect critic, 0 is no better than predicting the mean, negative is worse than that.
    Returns nan when the returns have zero variance (the ratio is undefined), as cleanrl does.
    ``reduce`` as in `masked_var`.
    """
    var_returns = masked_var(returns, mask, reduce=reduce)
    var_resid = masked_var(returns - values, mask, reduce=reduce)
    nan = torch.full_like(var_returns, float("nan"))
    return torch.where(var_returns > 0, 1 - var_resid / var_returns, nan)
