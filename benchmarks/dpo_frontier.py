"""Gold win rate against KL to the start, for offline and online DPO runs (docs/results_dpo.md).

    python benchmarks/dpo_frontier.py EVAL_RESULTS.json [MORE.json ...] --out docs/dpo_frontier.png
    python benchmarks/dpo_frontier.py --h2h EVAL_DIR/samples-A.jsonl EVAL_DIR/samples-B.jsonl

Reads the ``eval_results.json`` files written by ``rlhfkit eval`` (same baseline and prompts in
each) and plots each policy at (KL to the baseline, gold win rate) with the win rate's 95%
interval, offline runs in one colour and online runs in another (by the policy's name). A method
that is better at the same label budget sits above and to the left: more win rate per nat of KL.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_points(paths: list[str]) -> list[dict]:
    points, seen = [], set()
    for path in paths:
        results = json.loads(Path(path).read_text())
        for name, p in results["policies"].items():
            if name in seen:  # the same policy evaluated twice (seeded: identical figures)
                continue
            seen.add(name)
            win = p["win_rate"]["gold"]
            points.append({"name": name, "kl": p["kl"]["mean"], "win": win["win_rate"], "lo": win["ci_low"],
                           "hi": win["ci_high"], "prompts": results["prompts"]})
    return points


def head_to_head(a_path: str, b_path: str) -> str:
    """A over B on the same prompts (rows of two ``samples-*.jsonl`` from seeded evaluations):
    win rate by gold score with ties as halves, and the mean gold difference, each with a 95%
    normal interval over prompts."""
    import math

    a = [json.loads(line) for line in Path(a_path).read_text().splitlines()]
    b = [json.loads(line) for line in Path(b_path).read_text().splitlines()]
    if [r["prompt"] for r in a] != [r["prompt"] for r in b]:
        raise ValueError(f"{a_path} and {b_path} are not on the same prompts in the same order")
    n = len(a)

    def ci(xs):
        m = sum(xs) / n
        half = 1.96 * math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)
        return m, m - half, m + half

    ind = [1.0 if x["gold"] > y["gold"] else 0.5 if x["gold"] == y["gold"] else 0.0 for x, y in zip(a, b)]
    w, t = sum(v == 1.0 for v in ind), sum(v == 0.5 for v in ind)
    m, lo, hi = ci(ind)
    d, dlo, dhi = ci([x["gold"] - y["gold"] for x, y in zip(a, b)])
    return (f"{Path(a_path).stem} over {Path(b_path).stem}: {m:.3f} [{lo:.3f}, {hi:.3f}] ({w}/{t}/{n - w - t}); "
            f"gold {d:+.3f} [{dlo:+.3f}, {dhi:+.3f}]")


def plot(points: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in points:
        colour = "tab:blue" if p["name"].startswith("offline") else "tab:orange"
        ax.errorbar(p["kl"], p["win"], yerr=[[p["win"] - p["lo"]], [p["hi"] - p["win"]]], fmt="o", color=colour,
                    capsize=3)
        ax.annotate(p["name"], (p["kl"], p["win"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("KL to the SFT start (nats per response)")
    ax.set_ylabel("gold win rate vs the SFT start")
    ax.set_title(f"DPO at 272 annotator labels: offline (blue) vs online (orange), {points[0]['prompts']} prompts")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="*")
    ap.add_argument("--out", default="docs/dpo_frontier.png")
    ap.add_argument("--h2h", nargs=2, metavar=("A", "B"), help="two samples-*.jsonl: A over B, head to head")
    args = ap.parse_args()
    if args.h2h:
        print(head_to_head(*args.h2h))
        return
    points = load_points(args.results)
    for p in sorted(points, key=lambda q: q["kl"]):
        print(f"{p['name']:<18} KL {p['kl']:5.2f}  win {p['win']:.3f} [{p['lo']:.3f}, {p['hi']:.3f}]")
    plot(points, Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
