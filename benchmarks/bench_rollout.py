"""Rollout throughput as training sees it, against this machine's decode roofline.

    python benchmarks/bench_rollout.py [--batches 8,16] [--new-tokens 48] [--calls 4] [--threads N]
    python benchmarks/bench_rollout.py --decode both   # + every decode step through the model's forward, paired
    python benchmarks/bench_rollout.py --tiny        # a tiny random model, 2 calls: checks the script runs

1. This machine, now: memory bandwidth (best of several copies of a 256 MB tensor, bytes read +
   written) and the fp32 matrix-product peak (`common.matmul_peak_gflops`).
2. The roofline of one decode step of b rows at context c: it reads every weight matrix once
   (the LM head included; tied embeddings count once) and the KV cache of its rows, and computes
   2 x (matrix parameters) x b FLOPs plus attention. Its time is the larger of bytes / bandwidth
   and FLOPs / peak; the roofline of a call sums that over the decode steps the call actually ran
   (rows that stopped at EOS leave the batch, so later steps are smaller), at the bandwidth
   measured again right before that call (it drifts on a shared machine).
3. rlhfkit's rollout path (`rollout.sampling.rollout`, as PPO/GRPO call it) at each batch size:
   sampling at temperature 1, EOS stopping on, new prompts of the sentiment task every call, and
   the weights changed in place between calls (as an optimizer step changes them), so nothing
   cached from the previous call's weights can be reused. The first call is a warm-up.

Printed per batch size: generated tokens/s over the whole call and over decoding alone, the decode
phase as % of its roofline, and the per-call fixed costs: weight packing
(`rollout.engine.decode_weights`: the lean Llama decoder's fused weights, `rollout.llama_decode`,
or else the model's own linears, `rollout.cpu_linears`), KV-cache allocation
(`rollout.kv_cache.preallocate`) and prefill (the prompts' forward, `rollout.engine._prefill`, allocation excluded).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt_table, matmul_peak_gflops, memory_bandwidth_gbs, tiny_model_dir  # noqa: E402

from rlhfkit.config import RolloutSection  # noqa: E402
from rlhfkit.models import DEFAULT_MODEL, load_causal_lm, load_tokenizer  # noqa: E402
from rlhfkit.rollout import engine, llama_decode, load_prompt_items  # noqa: E402
from rlhfkit.rollout.sampling import rollout  # noqa: E402


class DecodeRoofline:
    """Bytes and FLOPs of one decode step of the model (fp32), and its roofline time on this machine."""

    def __init__(self, model, bandwidth_gbs: float, peak_gflops: float):
        c = model.config
        weights = {id(m.weight): m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)}
        self.matrix_params = sum(w.numel() for w in weights.values())  # the LM head included, once
        self.bytes_per_el = 4
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim  # elements, K and V
        self.attn_flops_per_ctx = 4 * c.num_hidden_layers * c.num_attention_heads * head_dim  # QK^T and AV
        self.bw, self.peak = bandwidth_gbs * 1e9, peak_gflops * 1e9

    def _seconds(self, rows: int, context: int, bandwidth_gbs: float | None) -> tuple[float, float]:
        """(memory time, compute time) of one step, at ``bandwidth_gbs`` if given (else the start's)."""
        read = self.bytes_per_el * (self.matrix_params + rows * context * self.kv_per_token)
        flops = rows * (2 * self.matrix_params + context * self.attn_flops_per_ctx)
        return read / (bandwidth_gbs * 1e9 if bandwidth_gbs else self.bw), flops / self.peak

    def step_seconds(self, rows: int, context: int, bandwidth_gbs: float | None = None) -> float:
        """The step's roofline time: the larger of its memory and compute times."""
        return max(self._seconds(rows, context, bandwidth_gbs))

    def bound(self, rows: int, context: int, bandwidth_gbs: float | None = None) -> str:
        memory, compute = self._seconds(rows, context, bandwidth_gbs)
        return "memory" if memory >= compute else "compute"


class CallProbe:
    """Times the fixed costs inside one `rollout` call and records every decode step's rows and
    context, by wrapping the engine's weight preparation, prefill, cache allocation and decode step."""

    def __init__(self):
        self.reset()
        orig_prep, orig_prefill, orig_prealloc, orig_step = (engine.decode_weights, engine._prefill,
                                                             engine.preallocate, engine.decode_step)
        probe = self

        @contextlib.contextmanager
        def decode_weights(*a, **k):
            t = time.perf_counter()
            ctx = orig_prep(*a, **k)
            decoder = ctx.__enter__()
            probe.times["pack"] += time.perf_counter() - t
            probe.lean = decoder is not None
            try:
                yield decoder
            finally:
                t = time.perf_counter()
                ctx.__exit__(None, None, None)
                probe.times["pack"] += time.perf_counter() - t

        def prefill(*a, **k):
            t = time.perf_counter()
            out = orig_prefill(*a, **k)
            probe.times["prefill"] += time.perf_counter() - t
            return out

        def preallocate(*a, **k):
            t = time.perf_counter()
            out = orig_prealloc(*a, **k)
            probe.times["cache"] += time.perf_counter() - t
            return out

        def decode_step(model, decoder, tok, mask, *a, **k):
            probe.steps.append((tok.shape[0], mask.shape[1]))
            return orig_step(model, decoder, tok, mask, *a, **k)

        engine.decode_weights, engine._prefill, engine.preallocate = decode_weights, prefill, preallocate
        engine.decode_step = decode_step

    def reset(self) -> None:
        self.times = {"pack": 0.0, "prefill": 0.0, "cache": 0.0}
        self.steps: list[tuple[int, int]] = []  # (rows, context) of each decode forward
        self.lean = False


def perturb_(model, scale: float = 1e-4) -> None:
    """Change every weight in place, as an optimizer step would (new values, same tensors)."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.0 + scale * torch.randn_like(p))


def one_call(model, tok, items, settings, probe: CallProbe, roof: DecodeRoofline, seed: int, lean: bool,
             bandwidth_mb: int = 256) -> dict:
    """One timed rollout call. The bandwidth is measured right before it and its roofline taken at
    that bandwidth: on a shared machine the bandwidth drifts by a third within minutes, and a
    roofline from the start of the run would misstate later calls."""
    llama_decode.LEAN_DECODE = lean
    bw = memory_bandwidth_gbs(bandwidth_mb)
    probe.reset()
    t = time.perf_counter()
    exp = rollout(model, items, settings, tok, seed=seed)
    total = time.perf_counter() - t
    return {"total": total, "decode": total - probe.times["pack"] - probe.times["prefill"],
            "tokens": int(exp.response_mask.sum()), "steps": len(probe.steps),
            "ideal": sum(roof.step_seconds(b, ctx, bw) for b, ctx in probe.steps), "lean": probe.lean, "GB/s": bw,
            "ctx": statistics.mean(c for _, c in probe.steps) if probe.steps else 0, **probe.times}


def measure(model, tok, prompts, probe: CallProbe, roof: DecodeRoofline, rows: int, new_tokens: int,
            calls: int, modes: list[bool], bandwidth_mb: int = 256) -> tuple[list[dict], list[dict]]:
    """Rows of the table (one per mode) and each call's figures per mode. With two modes, each
    call runs both on the same prompts and weights, in alternating order."""
    settings = RolloutSection(n=1, max_new_tokens=new_tokens, temperature=1.0, top_p=1.0, top_k=0)
    per_call: list[dict] = []
    for call in range(calls + 1):  # call 0: warm-up
        start = (call * rows) % max(len(prompts) - rows, 1)
        items = prompts[start:start + rows]  # new prompts every call
        perturb_(model)
        order = modes if call % 2 == 0 else modes[::-1]
        got = {lean: one_call(model, tok, items, settings, probe, roof, call, lean, bandwidth_mb) for lean in order}
        if call > 0:
            per_call.append(got)
    table = []
    for lean in modes:
        cs = [c[lean] for c in per_call]
        m = {k: statistics.mean(c[k] for c in cs) for k in ("total", "decode", "tokens", "steps", "ideal", "ctx",
                                                            "pack", "cache", "prefill", "GB/s")}
        table.append({"batch": rows, "decode": "lean" if cs[-1]["lean"] else "forward", "tokens/call": m["tokens"],
                      "decode steps": m["steps"], "s/call": m["total"], "tokens/s": m["tokens"] / m["total"],
                      "decode tokens/s": m["tokens"] / max(m["decode"], 1e-9),
                      "% of roofline": 100 * m["ideal"] / max(m["decode"], 1e-9),
                      "GB/s": m["GB/s"], "roofline tok/s": rows / roof.step_seconds(rows, int(m["ctx"]), m["GB/s"]),
                      "bound": roof.bound(rows, int(m["ctx"]), m["GB/s"]),
                      "pack s": m["pack"], "cache s": m["cache"], "prefill s": m["prefill"] - m["cache"]})
    return table, per_call


def ratios(rows: int, per_call: list[dict]) -> dict:
    """forward / lean per call, the median over calls (pairs run back to back)."""
    def med(key, per_token=False):
        return statistics.median((c[False][key] / c[False]["steps"]) / (c[True][key] / c[True]["steps"])
                                 if per_token else c[False][key] / c[True][key] for c in per_call)
    return {"batch": rows, "decode time per step, forward / lean": med("decode", True),
            "call time, forward / lean": med("total"), "pack, forward / lean": med("pack"),
            "prefill, forward / lean": med("prefill")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--batches", default="8,16", help="rows per rollout call, comma-separated")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--calls", type=int, default=4, help="timed calls per batch size (after one warm-up call)")
    ap.add_argument("--prompts", default="task:sentiment", help="prompt source (a task or a prompts file)")
    ap.add_argument("--decode", choices=["lean", "forward", "both"], default="lean",
                    help="lean: the engine's default (`rollout.llama_decode` for Llama models); "
                         "forward: every step through the model's own forward; both: the two, call by call")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model, 1 timed call per batch: checks the script")
    args = ap.parse_args()
    if args.tiny:
        args.model, args.calls = tiny_model_dir(), 1
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    bw_mb = 64 if args.tiny else 256  # the copy buffer of each bandwidth measurement
    bandwidth = memory_bandwidth_gbs(bw_mb)
    peak = matmul_peak_gflops(256 if args.tiny else 2048)
    tok = load_tokenizer(args.model)
    model = load_causal_lm(args.model)
    prompts, _ = load_prompt_items(args.prompts, tok, max_prompt_length=128)
    roof = DecodeRoofline(model, bandwidth, peak)
    modes = {"lean": [True], "forward": [False], "both": [True, False]}[args.decode]
    probe = CallProbe()
    print(f"model {args.model} (fp32, {roof.matrix_params / 1e6:.0f}M matrix parameters = "
          f"{roof.matrix_params * 4 / 1e6:.0f} MB read per decode step) | {torch.get_num_threads()} threads")
    print(f"memory bandwidth (copy, read + write): {bandwidth:.1f} GB/s | fp32 matmul peak: {peak:.1f} GFLOP/s")
    print(f"weights alone: {roof.matrix_params * 4 / bandwidth / 1e6:.1f} ms per decode step at this bandwidth")
    results = [measure(model, tok, prompts, probe, roof, int(b), args.new_tokens, args.calls, modes, bw_mb)
               for b in args.batches.split(",")]
    rows = [r for table, _ in results for r in table]
    print(f"\nrollout: {args.new_tokens} new tokens max, temperature 1, EOS stopping, new prompts and changed "
          f"weights every call; mean of {args.calls} calls after a warm-up")
    print(fmt_table(rows, list(rows[0])))
    print("tokens/s: generated tokens / whole call | decode tokens/s: / the call less packing and prefill | "
          "% of roofline: the decode steps' roofline time / their measured time, at the bandwidth measured "
          "right before each call (GB/s, their mean) | roofline tok/s: all rows decoding at the mean context")
    for (rows_, _, _), (gemv_s, onednn_s) in llama_decode.TRIALS.items():
        print(f"decode products at {rows_} rows, timed once per process (llama_decode.gemv_wins): few-row kernel "
              f"{gemv_s * 1e3:.1f} ms, oneDNN {onednn_s * 1e3:.1f} ms per step -> "
              f"{'few-row kernel' if gemv_s < onednn_s else 'oneDNN'}")
    if len(modes) == 2:
        pairs = [ratios(int(b), per_call) for b, (_, per_call) in zip(args.batches.split(","), results)]
        print("\nthe two paths call by call (same prompts and weights, back to back), median over calls:")
        print(fmt_table(pairs, list(pairs[0])))


if __name__ == "__main__":
    main()
