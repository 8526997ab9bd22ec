"""Statistics of evaluation (docs/concepts.md: Evaluation): win rate with a 95% interval, Pearson
correlation, a judge's agreement with gold on within-prompt pairs.

Pure functions of plain lists: no models here, so they are tested on hand-made numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def win_indicators(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per prompt: 1 if a beats b, 0.5 for a tie, 0 if b wins (paired scores of the same prompt)."""
    if len(a) != len(b):
        raise ValueError(f"paired scores differ in length: {len(a)} vs {len(b)}")
    return [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)]


def prob_indicators(p: Sequence[float]) -> list[float]:
    """Pairwise judge P(a > b) per prompt -> the same 1 / 0.5 / 0 vote as `win_indicators`."""
    return [1.0 if x > 0.5 else 0.5 if x == 0.5 else 0.0 for x in p]


def mean_ci(values: Sequence[float], z: float = Z95) -> dict:
    """Mean with a normal-approximation interval mean +- z * s / sqrt(n) (s: sample std, n - 1).

    For win indicators in {0, 0.5, 1} this is the Wald interval extended to ties; with n >= 100
    prompts and a rate away from 0/1 it is within a point of Wilson's. Clipped to [0, 1] only by
    `win_rate`, since a mean reward is unbounded. One value has no spread to estimate: its interval
    is NaN (null in a results file; a win rate's is then the whole [0, 1]), not of zero width.
    """
    n = len(values)
    if n == 0:
        return {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    half = z * sd / math.sqrt(n)
    return {"mean": m, "ci_low": m - half, "ci_high": m + half, "n": n}


def win_rate(indicators: Sequence[float], per_prompt: int = 1) -> dict:
    """{"win_rate", "ci_low", "ci_high", "n", "wins", "ties", "losses"} from 1 / 0.5 / 0 votes.

    per_prompt: votes come in groups of this many consecutive samples of one prompt; the interval
    is then computed over the prompts' mean votes (n = prompts), because samples of one prompt are
    not independent. wins / ties / losses count the raw votes. Where the normal interval fails, near
    0 and 1 with few prompts (it would reach past [0, 1], or every prompt has the same mean vote and
    it would have no width), Wilson's score interval for the rate over the n prompts is given instead.
    """
    k = per_prompt
    units = [sum(indicators[g:g + k]) / len(indicators[g:g + k]) for g in range(0, len(indicators), k)]
    s = mean_ci(units)
    if s["n"] > 1 and (max(units) == min(units) or s["ci_low"] < 0 or s["ci_high"] > 1):
        s.update(wilson(s["mean"], s["n"]))
    return {"win_rate": s["mean"], "ci_low": max(0.0, s["ci_low"]), "ci_high": min(1.0, s["ci_high"]),
            "n": s["n"], "wins": sum(1 for v in indicators if v == 1.0),
            "ties": sum(1 for v in indicators if v == 0.5), "losses": sum(1 for v in indicators if v == 0.0)}


def wilson(p: float, n: int, z: float = Z95) -> dict:
    """Wilson's score interval {"ci_low", "ci_high"} for a rate ``p`` over ``n`` trials."""
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    scale = 1 + z * z / n
    return {"ci_low": (centre - half) / scale, "ci_high": (centre + half) / scale}


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; nan when either side is constant or there are < 2 points."""
    n = len(x)
    if n != len(y):
        raise ValueError(f"pearson: {len(x)} vs {len(y)} values")
    if n < 2:
        return float("nan")
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return float("nan")
    return sxy / math.sqrt(sxx * syy)


def within_group_pearson(x: Sequence[float], y: Sequence[float], n: int) -> float:
    """Pearson after subtracting each group's mean (groups of n consecutive items = samples of one
    prompt): length bias *within* a prompt, free of "long prompts get long, high-reward answers"."""
    cx, cy = [], []
    for g in range(0, len(x), n):
        gx, gy = x[g:g + n], y[g:g + n]
        mx, my = sum(gx) / len(gx), sum(gy) / len(gy)
        cx += [v - mx for v in gx]
        cy += [v - my for v in gy]
    return pearson(cx, cy)


def within_group_agreement(judge: Sequence[float], gold: Sequence[float], n: int) -> float:
    """Accuracy of ``judge`` against ``gold`` on every two items of a group (groups of n consecutive
    items = samples of one prompt): over the pairs the judge separates, the share it orders as gold
    does (a gold tie counts one half); nan when the judge separates no pair."""
    hi, lo = [], []  # the judge's higher and lower item of every pair it separates
    for g in range(0, len(judge), n):
        for i in range(g, min(g + n, len(judge))):
            for j in range(i + 1, min(g + n, len(judge))):
                if judge[i] != judge[j]:
                    a, b = (i, j) if judge[i] > judge[j] else (j, i)
                    hi.append(gold[a])
                    lo.append(gold[b])
    votes = win_indicators(hi, lo)
    return sum(votes) / len(votes) if votes else float("nan")


def gold_agreement(ranked, gold, pairs: Sequence[tuple[int, int, int]], n: int) -> dict:
    """How well a ranking of groups of n responses (samples of one prompt), and the (group, best, worst)
    pairs built from it (online DPO's), agree with a gold judge's scores of the same responses:
    gold_pair_accuracy (share of the kept (g, best, worst) pairs whose chosen response gold scores
    higher, a tie one half), gold_pair_margin (mean gold(chosen) - gold(rejected) over them),
    gold_ranking_accuracy (the ranking's accuracy on every two responses of a prompt,
    `within_group_agreement`) and gold_mean (over all responses)."""
    votes = win_indicators([gold[b] for _, b, _ in pairs], [gold[w] for _, _, w in pairs])
    nan = float("nan")
    return {"gold_pair_accuracy": sum(votes) / len(votes) if votes else nan,
            "gold_pair_margin": sum(gold[b] - gold[w] for _, b, w in pairs) / len(pairs) if pairs else nan,
            "gold_ranking_accuracy": within_group_agreement(ranked, gold, n), "gold_mean": sum(gold) / len(gold)}
