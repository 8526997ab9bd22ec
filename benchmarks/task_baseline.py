"""Gold score of a model on a task's held-out prompts: the starting point of any training run.

    PYTHONPATH=src python benchmarks/task_baseline.py --task arithmetic --n 60 --temperature 0
    PYTHONPATH=src python benchmarks/task_baseline.py --task sentiment --n 64 --temperature 1

Prints the mean gold score (accuracy for arithmetic), its spread, per-category means and a few
samples.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

from rlhfkit.data import end_of_turn_ids, render_prompt_ids
from rlhfkit.judges import task_reward_fn
from rlhfkit.models import DEFAULT_MODEL, load_causal_lm, load_tokenizer
from rlhfkit.rollout import generate
from rlhfkit.tasks import get_task, list_tasks


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", required=True, choices=list_tasks())
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--n", type=int, default=60, help="held-out prompts (the first n in seed-0 order)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--show", type=int, default=4, help="samples to print")
    args = ap.parse_args(argv)

    task = get_task(args.task)
    tok = load_tokenizer(args.model)
    model = load_causal_lm(args.model)
    records = task.eval_prompts(n=args.n, seed=0)
    ids = [render_prompt_ids(tok, task.messages(r["prompt"])) for r in records]
    texts, eos, tokens = [], [], 0
    t0 = time.perf_counter()
    for i in range(0, len(ids), args.batch_size):
        exp = generate(model, ids[i:i + args.batch_size], max_new_tokens=args.max_new_tokens,
                       eos_token_id=sorted(end_of_turn_ids(tok)), pad_token_id=tok.pad_token_id,
                       temperature=args.temperature, top_p=args.top_p, seed=args.seed + i, return_logprobs=False)
        lengths = exp.response_lengths().tolist()
        tokens += sum(lengths)
        texts += [tok.decode(r[:k], skip_special_tokens=True).strip() for r, k in zip(exp.response_ids.tolist(), lengths)]
        eos += exp.eos.tolist()
    dt = time.perf_counter() - t0
    # the task's gold judge as a reward function: it gets the prompt records' fields it names (the
    # arithmetic task's exact answers); a response it cannot score (None) is left out
    judge = task_reward_fn(args.task)
    fields = [{k: v for k, v in r.items() if k not in ("prompt", "messages")} for r in records]
    scored = [(r, t, s) for r, t, s in zip(records, texts, judge.score([r["prompt"] for r in records], texts,
                                                                         fields=fields))
              if s is not None]
    records, texts, scores = [x[0] for x in scored], [x[1] for x in scored], [x[2] for x in scored]
    by_cat = defaultdict(list)
    for r, s in zip(records, scores):
        by_cat[r.get("category", "-")].append(s)
    q = statistics.quantiles(scores, n=4) if len(scores) > 1 else [scores[0]] * 3
    print(f"{args.task} | {args.model} | n={len(scores)} temperature={args.temperature} top_p={args.top_p} "
          f"max_new_tokens={args.max_new_tokens}")
    print(f"gold mean {statistics.fmean(scores):.3f}  std {statistics.pstdev(scores):.3f}  "
          f"min {min(scores):.3f}  quartiles {q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f}  max {max(scores):.3f}")
    print("by category: " + ", ".join(f"{c} {statistics.fmean(v):.3f} (n={len(v)})" for c, v in sorted(by_cat.items())))
    print(f"ended with EOS: {sum(eos) / len(eos):.0%}; {tokens} tokens in {dt:.0f} s ({tokens / dt:.0f} tokens/s)")
    for r, t, s in list(zip(records, texts, scores))[:args.show]:
        print(f"  [{s:+.3f}] {r['prompt']!r} -> {t[:160]!r}")


if __name__ == "__main__":
    main()
