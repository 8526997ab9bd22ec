"""Products of a few rows (up to 8) with a float32 weight matrix on CPU: the decode step's kernel.

A decode step multiplies b rows (the batch, 8 in a GRPO group) by every weight matrix of the
model. At b <= 8 each weight element takes part in at most 8 multiply-adds, so the product is
bound by how fast the weights stream from memory. On some machines oneDNN's packed kernel streams
them at about half the copy bandwidth at these row counts, its arithmetic not overlapped with the
loads (docs/benchmarks.md, "The products alone"). This kernel reads each weight row once and keeps
one accumulator per input row in registers (8 vector accumulators plus the weights: within the 16
AVX2 registers), so the loads of the next weights overlap the arithmetic on the current ones, and
it needs no packing (docs/benchmarks.md compares the two per matrix and per rollout). With 12 or
16 accumulators the registers spill and it is no faster than oneDNN, so calls of more rows go to
oneDNN (`rollout.llama_decode`).

The kernel is compiled by numba (LLVM, from the PyPI wheel: no system compiler) on first use and
cached on disk. Which of the two is faster at 5-8 rows depends on the machine (docs/benchmarks.md:
a batch-8 rollout call 1.25x faster on one, 15-20% slower on a Zen 4 with more bandwidth), so the
decoder times both once per process (`setting`). Without numba, or with ``RLHFKIT_DECODE_GEMV=0``
in the environment, `available` is False and the decoder uses oneDNN. Results equal ``x @ w.T``
up to float32 rounding (the sum over the inner dimension is reassociated).
"""

from __future__ import annotations


import torch

from rlhfkit import envvars

try:
    import numba
except ImportError:  # numba is a dependency; a build without it decodes through oneDNN
    numba = None

ROWS = 8  # the most rows a product takes; up to 4 run through a 4-row kernel, 5-8 through the 8-row one (zero-padded)


def available() -> bool:
    return numba is not None and setting() != "0"


def setting() -> str:
    """``RLHFKIT_DECODE_GEMV``: "0" never uses this kernel, "1" uses it for every call of at most
    `ROWS` rows; unset (or "auto"), the decoder times it against oneDNN once per process and row
    count and uses the faster (`rollout.llama_decode`)."""
    return envvars.setting("RLHFKIT_DECODE_GEMV")


def variant(rows: int) -> int:
    """The kernel a product of `rows` rows (at most `ROWS`) runs through: 4 up to 4 rows, else 8
    (fewer rows are zero-padded to it)."""
    return 4 if rows <= 4 else ROWS


class GemvLinear:
    """y = x @ W^T for x of at most `ROWS` rows, W (out, in) float32 on CPU, used as it is (no copy
    when it is contiguous)."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight.detach().contiguous()
        self._w = self.weight.numpy()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, k = x.shape
        if b > ROWS:
            raise ValueError(f"GemvLinear takes at most {ROWS} rows, got {b}")
        rows = variant(b)
        if b == rows:
            xp = x.contiguous()
        else:
            xp = x.new_zeros(rows, k)
            xp[:b] = x
        y = x.new_empty(rows, self.weight.shape[0])
        if _threads > 1:
            _rows_parallel(xp.numpy(), self._w, y.numpy())
        else:  # on the calling thread: numba's pool stays unstarted
            (_rows4 if rows == 4 else _rows8)(xp.numpy(), self._w, y.numpy(), 0, y.shape[1])
        return y[:b]


_threads = 1


def threads() -> int:
    """The threads the numba kernels of the decode step run on (`set_threads`)."""
    return _threads


def set_threads(n: int) -> None:
    """Run the kernels (this one's and `rollout.cpu_step`'s) on `n` threads (torch's count) from
    numba's pool; on 1, without the pool."""
    global _threads
    if numba is not None:
        _threads = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
        if _threads > 1:  # numba.set_num_threads starts the pool, which one thread does not use
            numba.set_num_threads(_threads)


if numba is not None:
    @numba.njit(fastmath=True, boundscheck=False, nogil=True, cache=True)
    def _rows8(x, w, y, j0, j1):  # pragma: no cover - compiled; tests call it through GemvLinear
        """y[:8, j] = sum_k w[j, k] * x[:8, k] for output rows j0 <= j < j1, on the calling thread."""
        k_dim = w.shape[1]
        for j in range(j0, j1):
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = numba.float32(0.0)
            for k in range(k_dim):
                wk = w[j, k]
                a0 += wk * x[0, k]
                a1 += wk * x[1, k]
                a2 += wk * x[2, k]
                a3 += wk * x[3, k]
                a4 += wk * x[4, k]
                a5 += wk * x[5, k]
                a6 += wk * x[6, k]
                a7 += wk * x[7, k]
            y[0, j] = a0
            y[1, j] = a1
            y[2, j] = a2
            y[3, j] = a3
            y[4, j] = a4
            y[5, j] = a5
            y[6, j] = a6
            y[7, j] = a7

    @numba.njit(fastmath=True, boundscheck=False, nogil=True, cache=True)
    def _rows4(x, w, y, j0, j1):  # pragma: no cover - compiled
        """`_rows8` for at most 4 input rows: half the multiply-adds and loads per weight."""
        k_dim = w.shape[1]
        for j in range(j0, j1):
            a0 = a1 = a2 = a3 = numba.float32(0.0)
            for k in range(k_dim):
                wk = w[j, k]
                a0 += wk * x[0, k]
                a1 += wk * x[1, k]
                a2 += wk * x[2, k]
                a3 += wk * x[3, k]
            y[0, j] = a0
            y[1, j] = a1
            y[2, j] = a2
            y[3, j] = a3

    @numba.njit(parallel=True, boundscheck=False, nogil=True, cache=True)
    def _rows_parallel(x, w, y):  # pragma: no cover - compiled
        """`_rows8` (or `_rows4` for 4 input rows) over all output rows, in blocks across numba's threads."""
        n = w.shape[0]
        blocks = 32
        per = (n + blocks - 1) // blocks
        for blk in numba.prange(blocks):
            if x.shape[0] == 4:
                _rows4(x, w, y, blk * per, min(n, blk * per + per))
            else:
                _rows8(x, w, y, blk * per, min(n, blk * per + per))
