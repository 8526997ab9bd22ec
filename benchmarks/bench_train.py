"""Training throughput of SFT and RM steps on the default model (fp32, CPU), next to this
machine's fp32 matrix-product peak measured in the same run.

    python benchmarks/bench_train.py [--batch 8] [--seq 128] [--steps 3]

Each step is one optimizer step (forward + backward + AdamW) through the trainers' own loss
functions (`sft_batch_loss`, `pair_scores` + Bradley-Terry). Achieved GFLOP/s counts only the
matrix products (6 * params * tokens + attention), so it is comparable to the matmul peak.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt_table, matmul_peak_gflops, train_flops_per_token  # noqa: E402

from rlhfkit.algos import bradley_terry_loss  # noqa: E402
from rlhfkit.models import load_causal_lm, load_scalar_model  # noqa: E402
from rlhfkit.config import OptimSection  # noqa: E402
from rlhfkit.trainers.common import build_optimizer  # noqa: E402
from rlhfkit.trainers.reward import pair_scores  # noqa: E402
from rlhfkit.trainers.sft import sft_batch_loss  # noqa: E402


def _timed_steps(step_fn, steps: int) -> float:
    step_fn()  # warm-up (allocator, kernels)
    t = time.perf_counter()
    for _ in range(steps):
        step_fn()
    return (time.perf_counter() - t) / steps


def bench_sft(batch: int, seq: int, steps: int) -> dict:
    model = load_causal_lm("smollm2-135m-instruct").train()
    opt = build_optimizer(model, OptimSection(lr=1e-6))  # the trainers' own AdamW (fused)
    ids = torch.randint(10, 40000, (batch, seq))
    labels = ids.clone()
    labels[:, : seq // 3] = -100  # prompt third unlabelled, as in chat SFT
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    def step():
        loss, _, _ = sft_batch_loss(model, b, float((labels[:, 1:] != -100).sum()))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sec = _timed_steps(step, steps)
    tokens = batch * seq
    flops = train_flops_per_token(model.config, seq, lm_head=True) * tokens
    return {"phase": "sft step", "batch x seq": f"{batch}x{seq}", "s/step": sec, "tokens/s": tokens / sec,
            "GFLOP/s": flops / sec / 1e9}


def bench_rm(batch: int, seq: int, steps: int) -> dict:
    model = load_scalar_model("smollm2-135m-instruct").train()
    opt = build_optimizer(model, OptimSection(lr=1e-6))  # the trainers' own AdamW (fused)
    ids = torch.randint(10, 40000, (2 * batch, seq))  # chosen rows then rejected rows
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def step():
        rc, rr = pair_scores(model, b)
        loss, _ = bradley_terry_loss(rc, rr)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sec = _timed_steps(step, steps)
    tokens = 2 * batch * seq
    flops = train_flops_per_token(model.config, seq, lm_head=False) * tokens
    return {"phase": "rm step", "batch x seq": f"{batch} pairs x{seq}", "s/step": sec, "tokens/s": tokens / sec,
            "GFLOP/s": flops / sec / 1e9}


def bench_dpo(batch: int, seq: int, steps: int, precompute: bool, share: bool = False) -> dict:
    """One DPO step (chosen + rejected in one forward); the reference either runs live (a frozen
    copy: one more forward per step) or was precomputed once (numbers on the examples). With
    ``share`` each pair is one packed sequence, prompt once (`dpo.share_prompt`, the default):
    tokens/s still counts 2 x seq tokens per pair, GFLOP/s only the tokens actually computed."""
    from rlhfkit.data import PreferenceCollator
    from rlhfkit.trainers.dpo import REF_KEYS, DPOSection, Reference, dpo_batch_loss

    model = load_causal_lm("smollm2-135m-instruct").train()
    ref = None if precompute else Reference(load_causal_lm("smollm2-135m-instruct").eval().requires_grad_(False))
    opt = build_optimizer(model, OptimSection(lr=1e-7))
    p = seq // 3  # prompt third, response two thirds (as in the SFT benchmark)
    rnd = lambda n: torch.randint(10, 40000, (n,)).tolist()
    feats = [{"prompt_ids": rnd(p), "chosen_ids": rnd(seq - p), "rejected_ids": rnd(seq - p)} for _ in range(batch)]
    if precompute:
        for f in feats:
            f[REF_KEYS[0]], f[REF_KEYS[1]] = -300.0, -300.0
    collator = PreferenceCollator(0, share_prompt=share)

    def step():
        loss, _ = dpo_batch_loss(model, ref, feats, collator, DPOSection(), float(batch), "cpu")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sec = _timed_steps(step, steps)
    tokens = 2 * batch * seq
    computed = batch * (2 * seq - p) if share else tokens  # packed: prompt once per pair
    # policy forward+backward + a forward of the reference (1/3 of it)
    flops = train_flops_per_token(model.config, seq, lm_head=True) * computed * (1.0 if precompute else 4 / 3)
    what = ("precomputed ref" if precompute else "live ref") + (", shared prompt" if share else "")
    return {"phase": f"dpo step ({what})",
            "batch x seq": f"{batch} pairs x{seq}", "s/step": sec, "tokens/s": tokens / sec, "GFLOP/s": flops / sec / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    from rlhfkit.trainers.malloc import keep_freed_memory

    keep_freed_memory()  # as the trainers' Runtime does on CPU (RLHFKIT_MALLOC=default: glibc as it comes)
    torch.manual_seed(0)
    peak = matmul_peak_gflops()
    rows = [bench_sft(args.batch, args.seq, args.steps), bench_rm(args.batch // 2 or 1, args.seq, args.steps)]
    rows += [bench_dpo(args.batch // 2 or 1, args.seq, args.steps, precompute, share)
             for precompute, share in ((False, False), (True, False), (True, True))]
    peak_after = matmul_peak_gflops()
    peak = max(peak, peak_after)
    for r in rows:
        r["% of peak"] = 100 * r["GFLOP/s"] / peak
    print(f"threads={torch.get_num_threads()}  fp32 matmul peak (2048^3, best of 10): {peak:.1f} GFLOP/s")
    print(fmt_table(rows, ["phase", "batch x seq", "s/step", "tokens/s", "GFLOP/s", "% of peak"]))


if __name__ == "__main__":
    main()
