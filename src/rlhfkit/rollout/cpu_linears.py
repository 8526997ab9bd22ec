"""CPU decoding speed: float32 linear layers run through oneDNN with weights packed once per call."""

from __future__ import annotations

import contextlib
import functools

import torch

# Run the model's float32 nn.Linear layers on CPU through oneDNN with weights packed once per
# `generate` call (see `packed_linears`). Set to False to use torch's default (MKL) kernels.
PACK_CPU_LINEARS = True


@contextlib.contextmanager
def packed_linears(model, rows: int, steps: int):
    """Temporarily run every float32 CPU `nn.Linear` of `model` with oneDNN and a pre-packed weight.

    A decode step multiplies a few rows by every weight matrix. torch's default CPU kernel (MKL
    sgemm) re-packs the weight at each call, and at 16 rows that dominates: on the 2-core AMD
    machine of the benchmark it moves weights at ~2 GB/s where a plain read reaches ~10. Packing
    once for oneDNN (what torch.compile's weight freezing does) makes the linear layers ~1.7x
    faster. Packing the 135M default model takes ~0.35 s and as much memory as its weights, for
    the duration of the call, so it is skipped for short calls (`steps` forwards) and when memory
    is short. Only the matrix-multiply kernel changes, not the layers: results differ from the MKL
    path by float32 rounding (~1e-5 on log-probs, like any change of batch shape).
    Modules that already carry an instance-level `forward` (accelerate hooks) are left alone.
    """
    ops = getattr(torch.ops, "mkldnn", None)
    usable = (PACK_CPU_LINEARS and steps >= 8 and torch.backends.mkldnn.is_available()
              and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")
              and not torch.is_autocast_enabled("cpu"))
    linears = []
    if usable:
        linears = [m for m in model.modules()
                   if type(m) is torch.nn.Linear and "forward" not in m.__dict__
                   and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"]
        weights = {id(m.weight): m.weight for m in linears}  # tied weights count once
        if sum(w.numel() * 4 for w in weights.values()) > _available_memory() // 2:
            linears = []
    patched = []
    try:
        packed: dict[int, torch.Tensor] = {}
        for m in linears:
            if id(m.weight) not in packed:
                packed[id(m.weight)] = ops._reorder_linear_weight(m.weight.detach(), max(rows, 1))
            m.forward = functools.partial(_packed_linear_forward, m, packed[id(m.weight)])
            patched.append(m)
    except (RuntimeError, NotImplementedError):  # a build without these kernels: keep MKL
        for m in patched:
            m.__dict__.pop("forward", None)
        patched = []
    try:
        yield
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)


def _available_memory() -> int:
    """Bytes of memory available (Linux MemAvailable); 8 GiB if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def _packed_linear_forward(module: torch.nn.Linear, packed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32 or x.device.type != "cpu":
        return torch.nn.functional.linear(x, module.weight, module.bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, module.bias, "none", [], "")
