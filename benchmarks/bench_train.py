"""Training throughput of SFT and RM steps on the default model (fp32, CPU), next to this
machine's fp32 matrix-product peak measured in the same run.

    python benchmarks/bench_train.py [--batch 8] [--seq 128] [--steps 3] [--model NAME_OR_DIR]
    python benchmarks/bench_train.py --tiny          # a tiny random model, 1 step: checks the script runs

Each step is one optimizer step (forward + backward + AdamW) through the trainers' own loss
functions (`sft_batch_loss`, `pair_scores` + Bradley-Terry, `dpo_batch_loss`) and
their AdamW (`training.optim.build_optimizer`, fused), with freed memory kept in the process as the
trainers keep it on CPU (`parallel.malloc`). Achieved GFLOP/s counts only the
matrix products (6 * params * tokens + attention), so it is comparable to the matmul peak.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    fmt_table,
    matmul_peak_gflops,
    sft_step_flops,
    tiny_model_dir,
    train_flops_per_token,
)

from rlhfkit.algos import bradley_terry_loss  # noqa: E402
from rlhfkit.config import OptimSection  # noqa: E402
from rlhfkit.models import DEFAULT_MODEL, load_causal_lm, load_scalar_model  # noqa: E402
from rlhfkit.parallel.malloc import keep_freed_memory  # noqa: E402
from rlhfkit.trainers.reward import pair_scores  # noqa: E402
from rlhfkit.trainers.sft import sft_batch_loss  # noqa: E402
from rlhfkit.training.optim import build_optimizer  # noqa: E402


def _timed_steps(step_fn, steps: int) -> float:
    step_fn()  # warm-up (allocator, kernels)
    t = time.perf_counter()
    for _ in range(steps):
        step_fn()
    return (time.perf_counter() - t) / steps


def bench_sft(model_name: str, batch: int, seq: int, steps: int) -> dict:
    model = load_causal_lm(model_name).train()
    opt = build_optimizer(model, OptimSection(lr=1e-6))  # the trainers' own AdamW (fused)
    ids = torch.randint(10, model.config.vocab_size, (batch, seq))
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
    flops = sft_step_flops(model.config, seq, tokens, int((labels[:, 1:] != -100).sum()))
    return {"phase": "sft step", "batch x seq": f"{batch}x{seq}", "s/step": sec, "tokens/s": tokens / sec,
            "GFLOP/s": flops / sec / 1e9}


def bench_rm(model_name: str, batch: int, seq: int, steps: int) -> dict:
    model = load_scalar_model(model_name).train()
    opt = build_optimizer(model, OptimSection(lr=1e-6))  # the trainers' own AdamW (fused)
    ids = torch.randint(10, model.config.vocab_size, (2 * batch, seq))  # chosen rows then rejected rows
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


def bench_dpo(model_name: str, batch: int, seq: int, steps: int, precompute: bool, share: bool = False) -> dict:
    """One DPO step (chosen + rejected in one forward); the reference either runs live (a frozen
    copy: one more forward per step) or was precomputed once (numbers on the examples). With
    ``share`` each pair is one packed sequence, prompt once (`dpo.share_prompt`, the default):
    tokens/s still counts 2 x seq tokens per pair, GFLOP/s only the tokens actually computed."""
    from rlhfkit.data import PreferenceCollator
    from rlhfkit.trainers.dpo import DPOSection, dpo_batch_loss
    from rlhfkit.trainers.dpo_logps import REF_KEYS, Reference

    model = load_causal_lm(model_name).train()
    ref = None if precompute else Reference(load_causal_lm(model_name).eval().requires_grad_(False))
    opt = build_optimizer(model, OptimSection(lr=1e-7))
    p = seq // 3  # prompt third, response two thirds (as in the SFT benchmark)
    rnd = lambda n: torch.randint(10, model.config.vocab_size, (n,)).tolist()  # noqa: E731
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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--tiny", action="store_true",
                    help="a tiny random model, batch 2, seq 16, 1 step: checks that the script runs")
    args = ap.parse_args()
    if args.tiny:
        args.model, args.batch, args.seq, args.steps = tiny_model_dir(), 2, 16, 1
    keep_freed_memory()  # as the strategies do on CPU (RLHFKIT_MALLOC=default: glibc as it comes)
    torch.manual_seed(0)
    peak_n = 256 if args.tiny else 2048
    peak = matmul_peak_gflops(peak_n)
    m, b, s, n = args.model, args.batch, args.seq, args.steps
    rows = [bench_sft(m, b, s, n), bench_rm(m, b // 2 or 1, s, n)]
    rows += [bench_dpo(m, b // 2 or 1, s, n, precompute, share)
             for precompute, share in ((False, False), (True, False), (True, True))]
    peak_after = matmul_peak_gflops(peak_n)
    peak = max(peak, peak_after)
    for r in rows:
        r["% of peak"] = 100 * r["GFLOP/s"] / peak
    print(f"model {m} | threads={torch.get_num_threads()} | fp32 matmul peak ({peak_n}^3, best of 10): "
          f"{peak:.1f} GFLOP/s")
    print(fmt_table(rows, ["phase", "batch x seq", "s/step", "tokens/s", "GFLOP/s", "% of peak"]))


if __name__ == "__main__":
    main()
