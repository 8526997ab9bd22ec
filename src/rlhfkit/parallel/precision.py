"""Compute precision: fp32, or bf16 / fp16 autocast over fp32 master weights.

Trained parameters and their optimizer state stay in fp32 (the master weights); forwards run under
``torch.autocast`` in the low-precision dtype, so matrix products are bf16/fp16 while the update
``p -= lr * m / sqrt(v)`` is applied in fp32. Updating bf16 parameters directly would lose every step
smaller than bf16's spacing (2^-8 relative: at lr 1e-6 almost every step). fp16 also needs loss
scaling (its range is narrow): the loss is multiplied by a dynamic scale before backward, gradients
are unscaled before clipping, and a step whose gradients overflowed is skipped while the scale
shrinks (`torch.amp.GradScaler`). bf16 has fp32's range and needs no scaling.
"""

from __future__ import annotations

import contextlib

import torch

NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "fp32": "fp32", "bf16": "bf16",
           "fp16": "fp16"}


def resolve(dtype: str, device: torch.device) -> str:
    """``model.dtype`` -> "fp32" | "bf16" | "fp16". "auto": bf16 on a GPU that supports it, else fp32
    (CPUs without fast bf16 run fp32 faster than emulated bf16)."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if dtype not in ALIASES:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto, float32, bfloat16 or float16")
    return ALIASES[dtype]


class Precision:
    """The run's compute precision. ``name``: "fp32", "bf16" or "fp16"."""

    def __init__(self, name: str = "fp32", device: torch.device | str = "cpu"):
        if name not in NAMES:
            raise ValueError(f"unknown precision {name!r}; expected one of {sorted(NAMES)}")
        self.name = name
        self.device = torch.device(device)
        self.dtype = NAMES[name]
        self.scaler = torch.amp.GradScaler(self.device.type) if name == "fp16" else None
        self._pending = False  # a scaler step awaiting its update

    @property
    def mixed(self) -> bool:
        return self.name != "fp32"

    def autocast(self):
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is None:
            loss.backward()
            return
        self._update()
        self.scaler.scale(loss).backward()

    def unscale(self, optimizer) -> None:
        """Bring gradients back to their true scale before clipping (fp16 only)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def overflowed(self, loss_value: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """fp16: the gradients overflowed at the current scale (finite loss, non-finite gradient norm).
        Such a step is the scaler's to skip; it is not a sign of divergence."""
        return (self.scaler is not None and bool(torch.isfinite(loss_value).all())
                and not bool(torch.isfinite(grad_norm).all()))

    def apply(self, optimizer) -> None:
        """Step the optimizer (the scaler skips a step whose gradients overflowed)."""
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self._pending = True
        else:
            optimizer.step()

    def skipped(self, optimizer) -> None:
        """A step the trainer skipped: the scaler still lowers its scale after an overflow."""
        if self.scaler is not None:
            self._pending = True

    def _update(self) -> None:
        """The scale's update, once every optimizer of the step has been stepped (PPO steps two with
        one scale): deferred to the next backward, so each optimizer is unscaled by the scale its
        gradients were multiplied with."""
        if self._pending:
            self.scaler.update()
            self._pending = False

    @property
    def scale(self) -> float:
        """The current loss scale (1.0 without a scaler)."""
        if self.scaler is None:
            return 1.0
        self._update()
        return float(self.scaler.get_scale())

    def state_dict(self) -> dict:
        """The loss scaler's state (fp16; plain numbers, stored in a checkpoint's trainer state)."""
        if self.scaler is None:
            return {}
        self._update()
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def keep_master_fp32(model) -> int:
    """Cast every trained (``requires_grad``) floating-point parameter of ``model`` to fp32, in place;
    frozen ones keep their dtype (a bf16 reference or LoRA base is fine). Returns how many tensors
    were cast. The optimizer must be built after this (its state then is fp32 too)."""
    cast = 0
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            cast += 1
    return cast

