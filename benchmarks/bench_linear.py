"""The decode step's matrix products alone, as the lean decoder runs them, against this machine's roofline.

    python benchmarks/bench_linear.py [--batches 1,2,4,8,16,32] [--threads N] [--mb 384]
    python benchmarks/bench_linear.py --tiny       # a tiny random model's shapes: checks the script runs

A decode step is mostly products of a few rows (b, the batch) with each weight matrix of the model:
fused q/k/v, o, gate, up, down and the LM head. This times each shape alone through the decoder's own
`rollout.llama_decode._Linear` (oneDNN's packed layout, packed for b rows, as a rollout call packs
them), cycling through enough copies of the matrix (`--mb` per shape) that every product reads its
weights from memory, as in a real step where the 540 MB of weights do not fit in any cache.

Printed per shape and batch: microseconds per product, achieved GB/s (weight bytes / time) and
GFLOP/s, and the product's roofline share: max(bytes / bandwidth, FLOPs / peak) / time, with the
copy bandwidth and the matmul peak measured in the same run. Per shape, the time is also fitted over
the batch sizes as t = bytes / B + FLOPs / F (least squares): B is the rate the kernel streams the
weights at when it does no arithmetic, F its rate of arithmetic per extra row. When the fit holds,
streaming and arithmetic run one after the other, not overlapped as the roofline's max() assumes,
and the best a product of b rows can reach is bytes / B + FLOPs / F. Then, for the batch sizes of
at most 8, the same products through the few-row kernel the decoder uses for such calls
(`rollout.cpu_gemv`, numba), with its time against oneDNN's.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt_table, matmul_peak_gflops, memory_bandwidth_gbs, tiny_model_dir  # noqa: E402

from rlhfkit.models import DEFAULT_MODEL, resolve_model_path  # noqa: E402
from rlhfkit.rollout import cpu_gemv  # noqa: E402
from rlhfkit.rollout.llama_decode import _Linear, _mkldnn_ok  # noqa: E402


def decode_shapes(config) -> dict[str, tuple[int, int]]:
    """(out, in) of each weight matrix a Llama decode step multiplies by, as the lean decoder fuses them."""
    H, inter, V = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * (H // config.num_attention_heads)
    return {"qkv": (H + 2 * kv, H), "o": (H, H), "gate / up": (inter, H), "down": (H, inter), "lm head": (V, H)}


def time_products(n: int, k: int, b: int, mb: int, repeats: int, gemv: bool = False) -> float:
    """Seconds per (b x k) @ (k x n) product, cycling through copies of the weight totalling `mb` MB:
    oneDNN's packed kernel, or with `gemv` the few-row kernel (`rollout.cpu_gemv`, b <= 8)."""
    copies = max(2, math.ceil(mb * 2**20 / (n * k * 4)))
    weights = [_Linear(torch.randn(n, k), b, _mkldnn_ok(), gemv) for _ in range(copies)]
    x = torch.randn(b, k)
    for w in weights:
        w(x)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for w in weights:
            w(x)
        best = min(best, time.perf_counter() - t)
    return best / copies


def roofline_seconds(n: int, k: int, b: int, bw_gbs: float, peak_gflops: float) -> float:
    """The (b x k) @ (k x n) product's roofline: max(weight bytes / bandwidth, FLOPs / peak)."""
    return max(n * k * 4 / (bw_gbs * 1e9), 2 * n * k * b / (peak_gflops * 1e9))


def fit_stream_then_compute(bytes_: float, flops_per_row: float, batches: list[int], secs: list[float]) -> dict:
    """Least-squares t = a + c * b over the batch sizes: B = bytes / a (GB/s), F = FLOPs per row / c
    (GFLOP/s), and the largest relative misfit."""
    nb = len(batches)
    mb_, mt = sum(batches) / nb, sum(secs) / nb
    var = sum((b - mb_) ** 2 for b in batches)
    c = sum((b - mb_) * (t - mt) for b, t in zip(batches, secs)) / var if var else 0.0
    a = mt - c * mb_
    misfit = max(abs(a + c * b - t) / t for b, t in zip(batches, secs))
    return {"stream GB/s": bytes_ / a / 1e9 if a > 0 else None,
            "arith GFLOP/s": flops_per_row / c / 1e9 if c > 0 else None, "misfit": misfit}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--batches", default="1,2,4,8,16,32")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--mb", type=int, default=384, help="MB of weight copies cycled through per shape")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="a tiny random model's shapes, small copies")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir() if args.tiny else resolve_model_path(args.model))
    mb = 4 if args.tiny else args.mb
    batches = [int(b) for b in args.batches.split(",")]
    bw, peak = memory_bandwidth_gbs(), matmul_peak_gflops()
    print(f"memory bandwidth (copy, read + write): {bw:.1f} GB/s | fp32 matmul peak: {peak:.1f} GFLOP/s | "
          f"threads {torch.get_num_threads()} | oneDNN packed: {_mkldnn_ok()}")
    rows, fits = [], []
    for name, (n, k) in decode_shapes(config).items():
        bytes_, secs = n * k * 4, []
        for b in batches:
            s = time_products(n, k, b, mb, args.repeats)
            secs.append(s)
            rows.append({"shape": name, "out x in": f"{n} x {k}", "batch": b, "us": s * 1e6,
                         "GB/s": bytes_ / s / 1e9, "GFLOP/s": 2 * n * k * b / s / 1e9,
                         "% roofline": 100 * roofline_seconds(n, k, b, bw, peak) / s})
        fits.append({"shape": name, "MB": bytes_ / 2**20, **fit_stream_then_compute(bytes_, 2 * n * k, batches, secs)})
    print(fmt_table(rows, ["shape", "out x in", "batch", "us", "GB/s", "GFLOP/s", "% roofline"]))
    few = [b for b in batches if b <= cpu_gemv.ROWS]
    if cpu_gemv.available() and few:
        cpu_gemv.set_threads(torch.get_num_threads())
        cmp = []
        for name, (n, k) in decode_shapes(config).items():
            for b in few:
                s = time_products(n, k, b, mb, args.repeats, gemv=True)
                onednn = next(r["us"] for r in rows if r["shape"] == name and r["batch"] == b) / 1e6
                cmp.append({"shape": name, "batch": b, "gemv us": s * 1e6, "GB/s": n * k * 4 / s / 1e9,
                            "% roofline": 100 * roofline_seconds(n, k, b, bw, peak) / s, "oneDNN / gemv": onednn / s})
        print(f"\nthe few-row kernel the decoder uses for calls of at most {cpu_gemv.ROWS} rows "
              "(rollout.cpu_gemv), against oneDNN's packed kernel above:")
        print(fmt_table(cmp, ["shape", "batch", "gemv us", "GB/s", "% roofline", "oneDNN / gemv"]))
    print("\nper shape, t = bytes / B + FLOPs / F fitted over the batch sizes (misfit: largest relative error):")
    print(fmt_table(fits, ["shape", "MB", "stream GB/s", "arith GFLOP/s", "misfit"]))


if __name__ == "__main__":
    main()
