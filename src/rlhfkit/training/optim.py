"""The optimizer, its schedule, and the guarded step every trainer takes."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from rlhfkit.models.heads import backbone_and_head


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses or gradients."""


def build_optimizer(model: torch.nn.Module, optim, extra_groups: list[dict] | None = None) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (the usual transformer recipe).

    With ``optim.head_lr`` set, the scalar head of a reward/value model gets its own learning rate:
    a freshly initialised head on a pretrained backbone learns far too slowly at a backbone-sized lr
    (schedules scale every group's lr by the same factor, so the ratio holds throughout).
    """
    head_ids: set[int] = set()
    if getattr(optim, "head_lr", 0.0):
        try:
            head_ids = {id(p) for p in backbone_and_head(model)[1].parameters()}
        except (TypeError, AttributeError):  # a causal LM: no scalar head, head_lr does not apply
            head_ids = set()
    decay, no_decay, head = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in head_ids:
            head.append(p)
        else:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0},
              {"params": head, "weight_decay": 0.0, "lr": optim.head_lr}]
    groups = [g for g in groups if g["params"]] + list(extra_groups or [])
    params = [p for g in groups for p in g["params"]]
    # The fused kernel (one pass over each tensor) where torch has it: plain CPU/CUDA float tensors.
    # On CPU torch's default is a per-parameter loop, ~3x slower; FSDP2's DTensors keep the default.
    fused = bool(params) and all(type(p) is torch.nn.Parameter and p.is_floating_point()
                                 and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_eps,
                             fused=fused or None)


def build_scheduler(optimizer, optim, total_steps: int):
    """Linear warmup over ``ceil(warmup_ratio * total_steps)`` optimizer steps, then cosine, linear or
    constant. As transformers' schedules, but the warmup counts optimizer steps from 1: step k of W
    runs at lr * k / W (transformers' runs step 1 at lr 0, an update that changes nothing)."""
    warmup = int(math.ceil(optim.warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, schedule=optim.schedule, warmup=warmup, total=max(total_steps, 1)))


def lr_factor(done: int, schedule: str, warmup: int, total: int) -> float:
    """Multiplier of the base lr for the optimizer step that follows ``done`` completed ones."""
    if done < warmup:
        return (done + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (done - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


@dataclass
class StepGuard:
    """Skips an update whose loss or gradient is not finite; stops after too many in a row."""

    max_bad_steps: int = 3
    consecutive: int = 0
    skipped_total: int = 0

    def state_dict(self) -> dict:
        """The counters, for a checkpoint's trainer_state.json (a resumed run keeps counting)."""
        return {"consecutive": self.consecutive, "skipped_total": self.skipped_total}

    def load_state_dict(self, state: dict | None) -> StepGuard:
        state = state or {}
        self.consecutive = int(state.get("consecutive", 0))
        self.skipped_total = int(state.get("skipped_total", 0))
        return self

    def add_skipped(self, n: int) -> None:
        """Count ``n`` steps that a nested run skipped (online DPO's rounds) as this run's."""
        self.skipped_total += int(n)

    def check(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        ok = bool(torch.isfinite(loss).all()) and bool(torch.isfinite(grad_norm).all())
        if ok:
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.skipped_total += 1
        if self.consecutive >= self.max_bad_steps:
            raise TrainingDiverged(
                f"{self.consecutive} consecutive updates had a non-finite loss or gradient "
                f"(loss={float(loss):.4g}, grad_norm={float(grad_norm):.4g}); stopping without applying them. "
                "Checkpoints saved before them, if any (train.save_every), are intact; lower the learning rate "
                "or check the data.")
        return False
