"""Gold win rate against KL to the start, for offline and online DPO runs (docs/results_dpo.md).

    python benchmarks/dpo_frontier.py EVAL_RESULTS.json [MORE.json ...] --out docs/dpo_frontier.png
    python benchmarks/dpo_frontier.py --h2h EVAL_DIR/samples-A.jsonl EVAL_DIR/samples-B.jsonl
    python benchmarks/dpo_frontier.py --published --out docs/dpo_frontier.png

Reads the ``eval_results.json`` files written by ``rlhfkit eval`` (same baseline and prompts in
each) and plots each policy at (KL to the baseline, gold win rate) with the win rate's 95%
interval, offline runs in one colour and online runs in another (by the policy's name). A method
that is better at the same label budget sits above and to the left: more win rate per nat of KL.
``--published`` redraws the figure from the numbers docs/results_dpo.md reports for those runs
(its section "Offline vs online DPO at 272 annotator labels"), when their evaluation files are not
at hand.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


# The measured points as docs/results_dpo.md reports them (320 held-out prompts, gold judge).
PUBLISHED = [  # name, KL to the SFT start (nats), gold win rate, 95% CI low, high
    ("offline", 3.13, 0.678, 0.628, 0.728), ("offline-2ep", 5.54, 0.755, 0.708, 0.802),
    ("offline-4ep", 14.85, 0.806, 0.763, 0.849), ("online-ann", 2.75, 0.692, 0.642, 0.742),
    ("online-ann8", 2.95, 0.673, 0.623, 0.724), ("online-ann-prev", 3.05, 0.658, 0.607, 0.709),
    ("online-ann-4ep", 19.08, 0.697, 0.647, 0.747),
]


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


def label_offsets(xy: list[tuple[float, float]], label_w: float, label_h: float, gap: float = 8.0) -> list[tuple[float, float]]:
    """Offsets (display units) that keep point labels from overlapping, without adjustText.

    xy: the points in display coordinates; label_w, label_h: a label's box. A label goes to the
    right of its point. Points whose labels would collide (closer than a label's width across and
    its height up or down, transitively) share one column to the right of the group's rightmost
    point, one label per line, in the order of the points' heights so leader lines do not cross.
    """
    n = len(xy)
    group = list(range(n))  # union-find over colliding labels

    def root(i):
        while group[i] != i:
            group[i] = group[group[i]]
            i = group[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            if abs(xy[i][0] - xy[j][0]) < label_w and abs(xy[i][1] - xy[j][1]) < 1.5 * label_h:
                group[root(i)] = root(j)
    out = [(gap, 0.0)] * n
    for g in {root(i) for i in range(n)}:
        members = sorted((i for i in range(n) if root(i) == g), key=lambda i: -xy[i][1])  # top first
        if len(members) == 1:
            continue
        x = max(xy[i][0] for i in members) + 4 * gap
        centre = sum(xy[i][1] for i in members) / len(members)
        step = 1.6 * label_h
        for k, i in enumerate(members):
            y = centre + step * ((len(members) - 1) / 2 - k)
            out[i] = (x - xy[i][0], y - xy[i][1])
    return out


# (name prefix, colour, legend label): a point takes the first group its name starts with.
GROUPS = [("offline", "tab:blue", "offline DPO"), ("", "tab:orange", "online iterative DPO")]


def plot(points: list[dict], out: Path, title: str | None = None, groups: list | None = None) -> None:
    """Gold win rate against KL with 95% intervals and non-overlapping labels. A point with
    ``minor: True`` (e.g. one seed of a method whose mean is also plotted) is drawn small and
    faint, without interval or label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    groups = groups or GROUPS
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colour = lambda p: next(c for prefix, c, _ in groups if p["name"].startswith(prefix))
    for p in points:
        if p.get("minor"):
            ax.plot(p["kl"], p["win"], "o", color=colour(p), alpha=0.35, markersize=4)
            continue
        ax.errorbar(p["kl"], p["win"], yerr=[[p["win"] - p["lo"]], [p["hi"] - p["win"]]], fmt="o", color=colour(p),
                    capsize=3, alpha=0.85)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    xmin, xmax = min(0.0, *(p["kl"] for p in points)), max(p["kl"] for p in points)
    ax.set_xlim(xmin * 1.25, xmin + (xmax - xmin) * 1.25)  # room on the right for the labels of the last points
    ax.set_ylim(min(0.48, min(p["lo"] for p in points) - 0.02), max(p["hi"] for p in points) + 0.03)
    ax.set_xlabel("KL to the SFT start (nats per response)")
    ax.set_ylabel("gold win rate vs the SFT start (95% CI)")
    ax.set_title(title or f"DPO at 272 annotator labels, {points[0]['prompts']} held-out prompts", fontsize=11)
    ax.legend(handles=[Line2D([], [], color=c, marker="o", ls="", label=lab) for _, c, lab in groups],
              loc="upper left", fontsize=8)
    ax.grid(alpha=0.25)
    fig.tight_layout()
    # place the labels once the axes' limits and size are final: offsets are in display units
    fontsize = 8
    scale = fig.dpi / 72.0  # points -> pixels
    points = [p for p in points if not p.get("minor")]
    longest = max(len(p["name"]) for p in points)
    xy = [tuple(ax.transData.transform((p["kl"], p["win"]))) for p in points]
    offsets = label_offsets(xy, label_w=0.62 * fontsize * longest * scale, label_h=fontsize * scale)
    for p, (dx, dy) in zip(points, offsets):
        moved = abs(dy) > 1 or dx > 10 * scale
        ax.annotate(p["name"], (p["kl"], p["win"]), xytext=(dx / scale, dy / scale), textcoords="offset points",
                    fontsize=fontsize, va="center", ha="left",
                    arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.6, "shrinkA": 0, "shrinkB": 3}
                    if moved else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="*")
    ap.add_argument("--out", default="docs/dpo_frontier.png")
    ap.add_argument("--published", action="store_true", help="the points docs/results_dpo.md reports")
    ap.add_argument("--h2h", nargs=2, metavar=("A", "B"), help="two samples-*.jsonl: A over B, head to head")
    args = ap.parse_args()
    if args.h2h:
        print(head_to_head(*args.h2h))
        return
    if args.published:
        points = [dict(zip(("name", "kl", "win", "lo", "hi"), row), prompts=320) for row in PUBLISHED]
    elif args.results:
        points = load_points(args.results)
    else:
        ap.error("give eval_results.json files, or --published")
    for p in sorted(points, key=lambda q: q["kl"]):
        print(f"{p['name']:<18} KL {p['kl']:5.2f}  win {p['win']:.3f} [{p['lo']:.3f}, {p['hi']:.3f}]")
    plot(points, Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
