"""Gradient accumulation done once: micro-batches, the global normaliser and the sync boundary.

A step's loss is a sum over the examples (or tokens) of the *global* batch divided by their count,
whatever the number of ranks and micro-batches. Each micro-batch's summed loss is divided by the
same global normaliser before its backward, so the accumulated gradient is exactly the full-batch
gradient: batch 8 x accumulation 1 equals batch 1 x accumulation 8, and 1 process equals N.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


def normalizer(strategy, count: float | torch.Tensor, *, per_rank: bool = False) -> float:
    """The divisor of one rank's summed micro-batch losses: the global count / world size, since the
    gradients are then averaged over ranks. ``count``: the global count, or with ``per_rank`` this
    rank's share of it (summed over ranks here: a collective)."""
    if per_rank:
        count = strategy.sum(torch.as_tensor(float(count), dtype=torch.float32))
    return max(float(count), 1.0) / strategy.world_size


def accumulate(strategy, models, chunks: list, loss_fn: Callable, *, sync: bool | dict = True) -> dict[str, Any]:
    """Forward and backward over this rank's micro-batches ``chunks``; returns the summed metrics.

    ``loss_fn(chunk) -> (loss, sums)``: the chunk's loss, already divided by the global normaliser,
    and detached per-chunk sums to add up. ``models`` is the trained model, or a dict of them with
    ``loss`` a dict of losses by the same names (PPO's actor and critic): each loss is
    backpropagated into its own model. ``sync``: whether the last chunk's backward is each model's
    last before its optimizer step (where sharded layouts reduce gradients); a dict by model name
    when some model has more backwards to come (PPO's PTX term follows the actor's minibatch).
    """
    sums: dict[str, Any] = {}
    for j, chunk in enumerate(chunks):
        last = j == len(chunks) - 1
        with strategy.autocast():
            loss, chunk_sums = loss_fn(chunk)
        if isinstance(loss, dict):
            for name, part in loss.items():
                final = sync[name] if isinstance(sync, dict) else sync
                strategy.backward(part, models[name], sync=last and final)
        else:
            strategy.backward(loss, models, sync=last and bool(sync))
        for k, v in chunk_sums.items():
            sums[k] = sums.get(k, 0.0) + v
    return sums
