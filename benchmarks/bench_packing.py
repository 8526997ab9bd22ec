"""Packed batches as one row with per-segment attention, against the same batches as K rows.

    .venv/bin/python benchmarks/bench_packing.py [--pairs 4] [--prompts 2] [--group 4] [--repeats 7] [--threads N]
        [--compare layout|final-layer]
    .venv/bin/python benchmarks/bench_packing.py --tiny      # a tiny random model: checks the script runs

Three batches of the shapes `bench_trl.py` times, each run both ways, the two alternating. With
``--compare layout`` (the default) the two are the K padded rows and one row (`models.segments`:
``SEGMENT_ATTENTION`` off, and on, the default on CPU); with ``--compare final-layer`` both run as
one row, the last decoder layer once in full and once on the positions read only
(`models.final_layer`: ``ENABLED`` off, and on, the default).

- **rm**: --pairs preference pairs of the sentiment task (the shipped file, chat-rendered), the
  reward model's scores (last-token pooling) and a backward, as `pair_scores` runs them in a step;
- **dpo**: the same pairs through a policy's `packed_logprobs`, with a backward (the policy) and
  without gradients (the reference);
- **grpo**: --prompts sentiment prompts x --group replies of 24-48 random tokens, `packed_logprobs`
  with a backward and without gradients.

Prints, per batch and mode, the median seconds of each side over --repeats timed pairs (after one
warm-up pair), their ratio, and the largest difference between the two sides' outputs.
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
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7, help="timed A/B pairs per mode (after one warm-up pair)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--compare", choices=sorted(SIDES), default="layout")
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()

    import torch

    from common import matmul_peak_gflops, tiny_model_dir
    from rlhfkit.models import load_causal_lm, load_scalar_model, load_tokenizer, set_reward_pooling

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        args.model, args.repeats = tiny_model_dir(), 1
    tok = load_tokenizer(args.model)
    policy = load_causal_lm(args.model, dtype=torch.float32).train()
    rm = load_scalar_model(args.model, dtype=torch.float32, pad_token_id=tok.pad_token_id).train()
    set_reward_pooling(rm, "last")
    pairs, groups = _pairs(tok, args.pairs), _groups(tok, args.prompts, args.group)
    print(f"model {args.model} | threads {torch.get_num_threads()} | fp32 matmul peak {matmul_peak_gflops():.0f} "
          f"GFLOP/s | rm/dpo: {args.pairs} pairs, {_tokens(pairs)} tokens as K rows (the prompt once per pair); "
          f"grpo: {args.prompts} prompts x {args.group} replies, {_tokens(groups)} tokens", flush=True)
    before, after = SIDES[args.compare][1:]
    print(f"\n| batch | mode | {before} (s) | {after} (s) | speed-up | max difference |\n|---|---|---|---|---|---|")
    for name, model, fn, packed in [("rm", rm, _rm_scores, pairs), ("dpo", policy, _logprobs, pairs),
                                    ("grpo", policy, _logprobs, groups)]:
        for grad in ((True,) if name == "rm" else (True, False)):
            off, on, diff = _ab(model, fn, packed, grad, args.repeats, SIDES[args.compare][0])
            print(f"| {name} | {'forward + backward' if grad else 'forward, no grad'} | {off:.3f} | {on:.3f} | "
                  f"{off / on:.2f}x | {diff:.1e} |", flush=True)


def _pairs(tok, n: int) -> dict:
    """`pack_pairs` of the first n pairs of the sentiment task's preference file, chat-rendered."""
    from rlhfkit.data import PreferenceCollator, load_preference, tokenize_dataset
    from rlhfkit.models.packing import pack_pairs
    from rlhfkit.tasks import data_dir

    path = data_dir("sentiment") / "preference.jsonl"
    features, _ = tokenize_dataset(tok, load_preference(str(path))[:n], "preference", 256)
    return pack_pairs(PreferenceCollator(tok.pad_token_id, share_prompt=True)(features))


def _groups(tok, prompts: int, group: int) -> dict:
    """`pack_groups` of sentiment prompts, each with ``group`` replies of 24-48 random tokens."""
    import torch

    from rlhfkit.models.packing import pack_groups
    from rlhfkit.rollout.prompts import load_prompt_items

    items, _ = load_prompt_items("task:sentiment", tok, max_prompt_length=256)
    g = torch.Generator().manual_seed(0)
    out, row = [], 0
    for item in items[:prompts]:
        replies = []
        for _ in range(group):
            replies.append((row, torch.randint(100, len(tok) - 100, (int(torch.randint(24, 49, (1,), generator=g)),),
                                               generator=g)))
            row += 1
        out.append((torch.tensor(item.ids), replies))
    return pack_groups(out, (row, 48), tok.pad_token_id)


def _tokens(packed: dict) -> int:
    return sum(p + sum(n) for p, n in packed["lengths"])


def _rm_scores(model, packed):
    from rlhfkit.models.heads import pool_values
    from rlhfkit.models.packing import packed_token_values

    values, mask = packed_token_values(model, packed, last_only=True)
    return pool_values(values, mask, "last", mask)  # as `trainers.reward.pair_scores` pools a packed batch


def _logprobs(model, packed):
    from rlhfkit.models.packing import packed_logprobs

    return packed_logprobs(model, packed)


def _set_layout(one_row: bool) -> None:
    from rlhfkit.models import segments

    segments.SEGMENT_ATTENTION = one_row


def _set_final_layer(on: bool) -> None:
    from rlhfkit.models import final_layer

    final_layer.ENABLED = on


# what --compare toggles: (set(flag), the column of flag False, the column of flag True)
SIDES = {"layout": (_set_layout, "K rows", "one row"),
         "final-layer": (_set_final_layer, "last layer in full", "last layer where read")}


def _ab(model, fn, packed, grad: bool, repeats: int, toggle) -> tuple[float, float, float]:
    """Median seconds with the flag off and on, alternating, and the largest output difference."""
    import torch

    def once(flag: bool):
        toggle(flag)
        t = time.perf_counter()
        with torch.set_grad_enabled(grad):
            out = fn(model, packed)
            if grad:
                out.float().sum().backward()
        dt = time.perf_counter() - t
        model.zero_grad(set_to_none=True)
        return dt, out.detach()

    times: dict[bool, list[float]] = {True: [], False: []}
    outs = {}
    try:
        for k in range(repeats + 1):
            for flag in ((True, False) if k % 2 else (False, True)):
                dt, outs[flag] = once(flag)
                if k:  # the first pair warms up
                    times[flag].append(dt)
    finally:
        toggle(True)
    diff = float((outs[True] - outs[False]).abs().max())
    return statistics.median(times[False]), statistics.median(times[True]), diff


if __name__ == "__main__":
    main()
