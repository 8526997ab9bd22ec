"""Data parallelism: every rank holds a whole replica; gradients are averaged before each step.

The trained model is not wrapped in ``torch.nn.parallel.DistributedDataParallel``: the same module
also generates rollouts, serves as the reference with its LoRA adapters switched off, and runs
forwards that call its backbone and head separately, all of which a DDP wrapper would have to be
kept out of. Instead `DataParallel.step` averages the accumulated gradients with one flat
all-reduce right before clipping, which is what DDP computes (without overlapping the reduction
with the backward, which matters on GPUs at scale; FSDP is the layout for those).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from rlhfkit.parallel.base import Strategy


class DataParallel(Strategy):
    name = "ddp"

    def prepare(self, model, optimizer, *, micro_batch_size: int = 1, max_grad_norm: float = 0.0):
        self.broadcast_params(model)  # start every replica from rank 0's weights, as DDP's constructor does
        return super().prepare(model, optimizer, micro_batch_size=micro_batch_size, max_grad_norm=max_grad_norm)

    def step(self, model, optimizer, scheduler, max_grad_norm, loss_value, guard):
        self.average_gradients(model)
        return super().step(model, optimizer, scheduler, max_grad_norm, loss_value, guard)

    def broadcast_params(self, model) -> None:
        """Copy rank 0's parameters to every rank."""
        if self.world_size == 1 or model is None:
            return
        for p in model.parameters():
            dist.broadcast(p.data, src=0)

    def average_gradients(self, model) -> None:
        """Average the accumulated gradients over ranks in one flat all-reduce. A parameter must have
        a gradient on every rank or on none (true here: every forward uses all of a model's weights)."""
        if self.world_size == 1 or model is None:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))

    def check_replicas(self, model, what: str = "model") -> float:
        """Raise if the ranks' copies of ``model`` differ; returns the largest difference found.

        Replicas stay identical only if every gradient went through the all-reduce, and rank 0
        alone writes the model, so a drift would be silent. Compares one float64 sum per parameter.
        """
        if self.world_size == 1:
            return 0.0
        params = [p for p in self.unwrap(model).parameters() if not isinstance(p, DTensor)]
        if not params:
            return 0.0
        sums = torch.stack([p.detach().double().sum() for p in params]).to(self.device)
        lo, hi = -self.max(-sums), self.max(sums)
        diff = float((hi - lo).abs().max())
        scale = float(sums.abs().max()) + 1.0
        if diff > 1e-9 * scale:
            raise RuntimeError(f"{what}: the {self.world_size} data-parallel replicas differ (largest per-parameter "
                               f"sum difference {diff:.3g}); a gradient missed the all-reduce")
        return diff
