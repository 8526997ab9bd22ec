"""Shared benchmark helpers: this machine's fp32 matmul peak, transformer FLOP counts, and a tiny
random model for checking that a script runs end to end (``--tiny``)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

TINY_DIR = Path(tempfile.gettempdir()) / "rlhfkit-bench-tiny-model"


def tiny_model_dir() -> str:
    """A tiny random Llama with the default model's tokenizer, saved once as a transformers directory:
    every script's ``--tiny`` runs on it, to check the script end to end in seconds (its timings
    mean nothing)."""
    if not (TINY_DIR / "config.json").is_file():
        from rlhfkit.models import DEFAULT_MODEL, load_tokenizer, save_pretrained_atomic, tiny_causal_lm

        tok = load_tokenizer(DEFAULT_MODEL)
        save_pretrained_atomic(tiny_causal_lm(tok, seed=0), tok, TINY_DIR)
    return str(TINY_DIR)


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    """Best-of achieved GFLOP/s of an (n x n) @ (n x n) fp32 product on this machine, now."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def memory_bandwidth_gbs(mb: int = 256, repeats: int = 5) -> float:
    """Best-of copy bandwidth in GB/s, counting the bytes read and the bytes written."""
    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page first
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


def train_flops_per_token(config, seq_len: int, lm_head: bool = True) -> float:
    """Forward+backward FLOPs per token: 6 * (matmul params) + 12 * L * T * d for attention.

    Counts only matrix products (the standard estimate of Kaplan et al. / PaLM's MFU): the
    non-embedding weights, plus the output projection when logits are computed (tied or not).
    """
    d, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * config.intermediate_size  # q, k, v, o, mlp
    params = L * per_layer + (V * d if lm_head else d)
    return 6 * params + 12 * L * seq_len * d


def sft_step_flops(config, seq_len: float, tokens: float, labelled: float) -> float:
    """`train_flops_per_token` over an SFT step's tokens, the LM head counted on ``labelled`` of them
    (rlhfkit runs it on the labelled tokens only; pass ``labelled=tokens`` for a head on every token)."""
    body = train_flops_per_token(config, seq_len, lm_head=False)
    return body * tokens + (train_flops_per_token(config, seq_len, lm_head=True) - body) * labelled


def fmt_table(rows: list[dict], cols: list[str]) -> str:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
    line = "  ".join(c.ljust(widths[c]) for c in cols)
    out = [line, "-" * len(line)]
    for r in rows:
        out.append("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in cols))
    return "\n".join(out)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return "" if v is None else str(v)
