"""The policy-gradient log-prob forwards of padded rows in three layouts.

    .venv/bin/python benchmarks/bench_prefix.py [--rows 16] [--response 48] [--pairs 5] [--lora]
    .venv/bin/python benchmarks/bench_prefix.py --tiny      # a tiny random model: checks the script runs

Rows are the built-in sentiment task's training prompts, chat-rendered (the template's system turn
and user header are the prefix every row shares), each followed by a response of random length up
to --response tokens: the layout PPO, GRPO without prompt sharing and RLOO score and train on.
Each round times `models.forward.causal_logprobs` in three layouts, in rotating order:

- **rows**: the (B, T) padded batch, every row running its own prefix (``shared_prefix=0``, the
  one-row layout off: what GPU and data-parallel runs do without a shared prefix);
- **prefix once**: the padded batch after one forward of the shared prefix, whose key/value cache
  every row continues (`models.forward.prefix_inputs`; ``segments.SEGMENT_ATTENTION`` off);
- **one row**: the CPU default, the prefix once and then every row's real tokens in one row with
  per-segment attention (`models.segments.rows_one_row`).

Two modes: no grad (the reference's and logp_old's forward) and forward + backward (the update);
--lora runs them through a LoRA adapter. Prints the median time of each layout and the ratios,
with this machine's fp32 matmul peak.

    .venv/bin/python benchmarks/bench_prefix.py --scorer RM_DIR [--rows 8] [--group 4] [--response 48]

With --scorer, the reward model's side instead: `rm:RM_DIR` (as GRPO, RLOO and online DPO call it)
scores --group replies to each of --rows prompts, with the replies to one prompt packed into one
sequence (the prompt once; the scorer's default for last- and mean-pooled RMs) against every row
scored on its own, alternating; replies are --response/2 to --response words drawn at random.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--response", type=int, default=48)
    ap.add_argument("--pairs", type=int, default=5, help="timed A/B pairs per mode (after one warm-up pair)")
    ap.add_argument("--lora", action="store_true", help="the model wrapped with a LoRA adapter (r=16, all-linear)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--scorer", default="", help="a reward model directory: time its scoring of groups instead")
    ap.add_argument("--group", type=int, default=4, help="with --scorer: replies per prompt")
    args = ap.parse_args()
    if args.scorer:
        return time_scorer(args)

    import torch

    from common import matmul_peak_gflops, tiny_model_dir
    from rlhfkit.config import LoraSection
    from rlhfkit.models import load_causal_lm, load_tokenizer
    from rlhfkit.models.forward import causal_logprobs
    from rlhfkit.models.lora import apply_lora
    from rlhfkit.rollout.experience import common_prefix_len
    from rlhfkit.rollout.prompts import load_prompt_items

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        args.model, args.pairs, args.rows = tiny_model_dir(), 1, 4
    torch.manual_seed(0)
    tok = load_tokenizer(args.model)
    model = load_causal_lm(args.model)
    if args.lora:
        model = apply_lora(model, LoraSection(enabled=True, r=16, alpha=32), "CAUSAL_LM")
    items, _ = load_prompt_items("task:sentiment", tok, max_prompt_length=256)
    prompts = [items[i].ids for i in range(args.rows)]
    P, R, B = max(map(len, prompts)), args.response, args.rows
    ids = torch.full((B, P + R), tok.pad_token_id)
    mask = torch.zeros(B, P + R, dtype=torch.long)
    for i, p in enumerate(prompts):
        n = int(torch.randint(R // 2, R + 1, (1,)))
        ids[i, P - len(p):P] = torch.tensor(p)
        ids[i, P:P + n] = torch.randint(10, len(tok) - 1, (n,))
        mask[i, P - len(p):P + n] = 1
    L = common_prefix_len(prompts)
    real = int(mask.sum())
    print(f"model {args.model}{' + LoRA' if args.lora else ''}, {B} rows, prompts {min(map(len, prompts))}-{P} "
          f"tokens, responses up to {R}; {real} real tokens, shared prefix {L} tokens ({(B - 1) * L} "
          f"tokens not recomputed, {(B - 1) * L / real:.0%}); threads {torch.get_num_threads()}; "
          f"fp32 matmul peak {matmul_peak_gflops():.0f} GFLOP/s")

    from rlhfkit.models import segments

    def once(layout: str, grad: bool) -> float:
        segments.SEGMENT_ATTENTION = layout == "one row"
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with torch.set_grad_enabled(grad):
            logp = causal_logprobs(model, ids, mask, keep_last=R, shared_prefix=0 if layout == "rows" else L)
            if grad:
                logp.sum().backward()
        return time.perf_counter() - t0

    model.train()
    layouts = ("rows", "prefix once", "one row")
    print("| mode | rows (s) | prefix once (s) | one row (s) | prefix once / rows | one row / rows | "
          "one row / prefix once |\n|---|---|---|---|---|---|---|")
    try:
        for grad in (False, True):
            times: dict[str, list[float]] = {k: [] for k in layouts}
            for k in range(args.pairs + 1):
                for layout in layouts[k % 3:] + layouts[:k % 3]:
                    t = once(layout, grad)
                    if k:  # the first round warms up
                        times[layout].append(t)
            a, b, c = (statistics.median(times[k]) for k in layouts)
            print(f"| {'forward + backward' if grad else 'forward, no grad'} | {a:.3f} | {b:.3f} | {c:.3f} | "
                  f"{a / b:.2f}x | {a / c:.2f}x | {b / c:.2f}x |", flush=True)
    finally:
        segments.SEGMENT_ATTENTION = True


def time_scorer(args) -> None:
    """`rm:DIR` on --rows prompts x --group replies: groups packed against every row on its own."""
    import random

    import torch

    import rlhfkit.judges.reward_model as reward_model
    from common import matmul_peak_gflops
    from rlhfkit.judges import build_reward_fn
    from rlhfkit.rollout.prompts import load_prompt_items

    if args.threads:
        torch.set_num_threads(args.threads)
    scorer = build_reward_fn(f"rm:{args.scorer}", batch_size=16).fn  # the RewardModelScorer
    items, _ = load_prompt_items("task:sentiment", scorer.tokenizer, max_prompt_length=256)
    rng = random.Random(0)
    words = ("the a lovely awful bright dull calm noisy warm cold kind rude day night garden city river "
             "friend story song light rain sun quiet happy sad strange old new small big").split()
    msgs = [items[i].messages for i in range(args.rows) for _ in range(args.group)]
    replies = [" ".join(rng.choices(words, k=rng.randint(args.response // 2, args.response))) for _ in msgs]
    real = reward_model.shared_prompt_groups
    parts = [scorer.render_parts(m, r) for m, r in zip(msgs, replies)]
    tokens = sum(len(p) + len(r) for p, r in parts)
    packed_tokens = tokens - sum((len(g) - 1) * len(parts[g[0]][0]) for g in real(parts)[0])
    print(f"rm:{args.scorer}, {args.rows} prompts x {args.group} replies: {tokens} tokens scored row by row, "
          f"{packed_tokens} packed; threads {torch.get_num_threads()}; fp32 matmul peak {matmul_peak_gflops():.0f} GFLOP/s")

    def once(packed: bool) -> float:
        reward_model.shared_prompt_groups = real if packed else (lambda parts: ([], list(range(len(parts)))))
        t0 = time.perf_counter()
        scorer([""] * len(msgs), replies, messages=msgs)
        return time.perf_counter() - t0

    plain, packed = [], []
    for k in range(args.pairs + 1):
        for flag, out in ([(True, packed), (False, plain)] if k % 2 else [(False, plain), (True, packed)]):
            t = once(flag)
            if k:
                out.append(t)
    reward_model.shared_prompt_groups = real
    a, b = statistics.median(plain), statistics.median(packed)
    print(f"| every row on its own (s) | replies to one prompt packed (s) | speed-up |\n|---|---|---|\n"
          f"| {a:.3f} | {b:.3f} | {a / b:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
