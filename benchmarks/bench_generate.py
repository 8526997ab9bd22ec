"""Tokens/s of rlhfkit's `generate` versus plain `model.generate(do_sample=True)`.

Same model, prompts, batch size and number of new tokens; EOS is disabled in both so that every
row produces exactly `--new-tokens` tokens (otherwise random early stops decide the winner).
Run:  PYTHONPATH=src python benchmarks/bench_generate.py [--batch 16 --new-tokens 32 --repeats 2 --threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from rlhfkit.models import DEFAULT_MODEL, load_causal_lm, load_tokenizer
from rlhfkit.rollout import generate

TOPICS = ["a movie you watched", "a day at the beach", "your favourite city", "a new phone",
          "a rainy afternoon", "a local bakery", "a train journey", "a letter to a friend"]


def _prompts(tok, batch: int) -> list[list[int]]:
    out = []
    for i in range(batch):
        msg = [{"role": "user", "content": f"Write a few sentences about {TOPICS[i % len(TOPICS)]}."}]
        out.append(tok.encode(tok.apply_chat_template(msg, add_generation_prompt=True, tokenize=False)))
    return out


def _best_times(fns: dict, repeats: int) -> dict:
    """Best wall time of each function; runs alternate so a noisy neighbour hurts both alike."""
    for fn in fns.values():  # warm-up: allocator, thread pool, lazy imports
        fn(4)
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default). On a shared machine 1 thread avoids OpenMP "
                         "threads waiting on each other and can be several times faster")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    tok = load_tokenizer(args.model)
    model = load_causal_lm(args.model).eval()
    prompts = _prompts(tok, args.batch)
    N = args.new_tokens

    def ours(N=N):
        exp = generate(model, prompts, max_new_tokens=N, eos_token_id=[], pad_token_id=tok.pad_token_id,
                       temperature=1.0, seed=0)
        assert exp.response_ids.shape[1] == N

    enc = tok.pad([{"input_ids": p} for p in prompts], padding_side="left", return_tensors="pt")

    def plain(N=N):
        torch.manual_seed(0)
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=True, max_new_tokens=N, min_new_tokens=N, temperature=1.0,
                                 top_k=0, top_p=1.0, pad_token_id=tok.pad_token_id)
        assert out.shape[1] - enc["input_ids"].shape[1] == N

    total = args.batch * N
    best = _best_times({"rlhfkit.generate": ours, "model.generate": plain}, args.repeats)
    rows = list(best.items())
    base = best["model.generate"]
    print(f"\nbatch {args.batch}, {N} new tokens, best of {args.repeats}, {torch.get_num_threads()} threads")
    print(f"{'method':<18} {'seconds':>8} {'tokens/s':>9} {'speed-up':>9}")
    for name, sec in rows:
        print(f"{name:<18} {sec:>8.2f} {total / sec:>9.1f} {base / sec:>8.2f}x")


if __name__ == "__main__":
    main()
