"""The simulated annotator's ceiling on the reward model's held-out pairs.

    python benchmarks/rm_ceiling.py [--data task:sentiment] [--eval-fraction 0.15] [--seed 0]

Uses the same deterministic split as `rlhfkit rm` (data.sources.split_eval) and the gold
scores stored with each generated pair: the ceiling is the accuracy of the gold judge itself on
the noisy labels (ties count half). A learned RM is compared to this number, not to 100%.
"""

from __future__ import annotations

import argparse
import json

from rlhfkit.data.sources import resolve_source, split_eval


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="task:sentiment")
    ap.add_argument("--eval-fraction", type=float, default=0.15)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = [json.loads(l) for l in open(resolve_source(args.data, "preference")) if l.strip()]
    train, held = split_eval(rows, args.eval_fraction, args.seed)
    for name, part in (("train", train), ("held-out", held), ("all", rows)):
        acc = sum(1.0 if r["gold_chosen"] > r["gold_rejected"] else 0.5 if r["gold_chosen"] == r["gold_rejected"]
                  else 0.0 for r in part) / len(part)
        print(f"{name:9s} pairs={len(part):4d}  gold-judge accuracy on annotator labels (ceiling) = {acc:.3f}")


if __name__ == "__main__":
    main()
