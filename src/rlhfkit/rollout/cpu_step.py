"""The small operations of a decode step on CPU, fused: RMS norms, and rotary + KV-cache append + attention.

At decode batch sizes each of these works on a few kilobytes, so what costs is the number of
torch operators, not their arithmetic: a decode step of the default model ran its norms,
rotary, residual adds and attention as about 600 operators, 27% of the step at batch 8
(docs/benchmarks.md, "Where a decode step goes"). Here they are three numba kernels per layer
(`rms_norm` before the first product, `attend`, `add_rms_norm` after the attention's output
product), compiled on first use and cached on disk like `rollout.cpu_gemv`; on more than one
thread (`cpu_gemv.set_threads`) `attend` splits the rows across numba's threads. That parallel
kernel is compiled anew in every process (about 2 s), not cached: loaded from numba's disk cache it
rounded differently from the same kernel compiled in the process (by 1e-7), so the first run in a
new clone and later runs sampled different responses from one seed.

`attend` does, for one layer and one new token per row, what `rollout.llama_decode.LlamaDecoder`
does with torch: rotate the queries and keys (``x * cos + roll(x, hd/2) * sin``, ``sin`` signed),
append the keys and values to the preallocated cache, and attend with an additive bias over the
cache (the bias holds the padding mask). The softmax subtracts the row's maximum, as torch does.
Results equal the torch path's up to float32 rounding (sums are reassociated). Without numba, or
with ``RLHFKIT_DECODE_FUSED=0`` in the environment, `available` is False and the decoder keeps
torch's operators.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from rlhfkit import envvars
import rlhfkit.rollout.cpu_gemv as cpu_gemv

numba = cpu_gemv.numba  # None without numba (a dependency): the decoder keeps torch's operators


def available() -> bool:
    return numba is not None and envvars.setting("RLHFKIT_DECODE_FUSED") == "1"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """F.rms_norm(x, (H,), weight, eps) for x (b, H) float32 contiguous."""
    out = torch.empty_like(x)
    _rms_norm(x.numpy(), weight.numpy(), eps, out.numpy())
    return out


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x += delta in place (the residual stream), then rms_norm(x): (b, H) each."""
    out = torch.empty_like(x)
    _add_rms_norm(x.numpy(), delta.contiguous().numpy(), weight.numpy(), eps, out.numpy())
    return out


def attend(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer, bias: torch.Tensor, scale: float,
           heads: tuple[int, int, int]) -> torch.Tensor:
    """One decode step's attention for one layer. qkv (b, (nh + 2 nkv) hd) from the fused product,
    cos / sin (b, hd) (sin signed for the roll), `layer` a preallocated cache layer
    (`rollout.kv_cache`; this token's key and value are appended to it), bias (b, ctx) additive
    over the cache plus this token (0 or the dtype's minimum) -> (b, nh hd)."""
    nh, nkv, hd = heads
    kbuf, vbuf, n = layer.reserve(1)
    out = qkv.new_empty(qkv.shape[0], nh * hd)
    kernel = _attend_rows if cpu_gemv.threads() > 1 else _attend
    kernel(qkv.contiguous().numpy(), cos.contiguous().numpy(), sin.contiguous().numpy(), kbuf.numpy(), vbuf.numpy(),
           n, bias.numpy(), np.float32(scale), nh, nkv, out.numpy())
    layer.advance(1)
    return out


if numba is not None:
    _jit = numba.njit(fastmath=True, boundscheck=False, nogil=True, cache=True)

    @_jit
    def _rms_norm(x, w, eps, out):  # pragma: no cover - compiled; tests call it through rms_norm
        b, h = x.shape
        for i in range(b):
            ss = numba.float32(0.0)
            for j in range(h):
                ss += x[i, j] * x[i, j]
            r = numba.float32(1.0) / math.sqrt(ss / h + eps)
            for j in range(h):
                out[i, j] = x[i, j] * r * w[j]

    @_jit
    def _add_rms_norm(x, d, w, eps, out):  # pragma: no cover - compiled
        b, h = x.shape
        for i in range(b):
            ss = numba.float32(0.0)
            for j in range(h):
                v = x[i, j] + d[i, j]
                x[i, j] = v
                ss += v * v
            r = numba.float32(1.0) / math.sqrt(ss / h + eps)
            for j in range(h):
                out[i, j] = x[i, j] * r * w[j]

    @numba.njit(parallel=True, boundscheck=False, nogil=True)  # not cached: see the module docstring
    def _attend_rows(qkv, cos, sin, kbuf, vbuf, n, bias, scale, nh, nkv, out):  # pragma: no cover - compiled
        """`_attend` with the rows split across numba's threads (`cpu_gemv.set_threads`)."""
        for i in numba.prange(qkv.shape[0]):
            _attend(qkv[i:i + 1], cos[i:i + 1], sin[i:i + 1], kbuf[i:i + 1], vbuf[i:i + 1], n, bias[i:i + 1],
                    scale, nh, nkv, out[i:i + 1])

    @_jit
    def _rotate(x, cos, sin, half, out):  # pragma: no cover - compiled
        """out = x * cos + roll(x, half) * sin over one head (roll by half the head: the halves swap)."""
        hd = x.shape[0]
        for d in range(half):
            out[d] = x[d] * cos[d] + x[d + half] * sin[d]
        for d in range(half, hd):
            out[d] = x[d] * cos[d] + x[d - half] * sin[d]

    @_jit
    def _attend(qkv, cos, sin, kbuf, vbuf, n, bias, scale, nh, nkv, out):  # pragma: no cover - compiled
        b = qkv.shape[0]
        hd = cos.shape[1]
        half = hd // 2
        g = nh // nkv
        ctx = n + 1
        qr = np.empty(hd, np.float32)
        acc_o = np.empty(hd, np.float32)
        s = np.empty(ctx, np.float32)
        for i in range(b):
            for h in range(nkv):
                k0 = (nh + h) * hd
                v0 = (nh + nkv + h) * hd
                _rotate(qkv[i, k0:k0 + hd], cos[i], sin[i], half, kbuf[i, h, n])  # the key at position n
                for d in range(hd):
                    vbuf[i, h, n, d] = qkv[i, v0 + d]
                for r in range(g):
                    q0 = (h * g + r) * hd
                    _rotate(qkv[i, q0:q0 + hd], cos[i], sin[i], half, qr)
                    m = -numba.float32(math.inf)
                    for t in range(ctx):
                        acc = numba.float32(0.0)
                        for d in range(hd):
                            acc += qr[d] * kbuf[i, h, t, d]
                        v = acc * scale + bias[i, t]
                        s[t] = v
                        m = max(m, v)
                    tot = numba.float32(0.0)
                    for t in range(ctx):
                        e = math.exp(s[t] - m)
                        s[t] = e
                        tot += e
                    inv = numba.float32(1.0) / tot
                    acc_o[:] = 0.0
                    for t in range(ctx):
                        p = s[t] * inv
                        for d in range(hd):
                            acc_o[d] += p * vbuf[i, h, t, d]
                    for d in range(hd):
                        out[i, q0 + d] = acc_o[d]
