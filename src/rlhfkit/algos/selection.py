"""Which samples online DPO and rejection-sampling fine-tuning train on: pure functions of the
scores of n responses per prompt (rows ``g*n .. g*n+n-1`` are group g), docs/concepts.md
("Online iterative DPO")."""

from __future__ import annotations

import math


# Two scores this close (relative to their size) are equal up to rounding: a length penalty leaves
# 0.3 - 0.2 * 2 and 0.1 - 0.2 * 1 apart in their last bit. Far below the resolution of a float32
# reward model (1e-7), so no real difference is ever taken for a tie.
ROUNDING = 1e-9


def build_pairs(scores, responses, n: int, tie_tolerance: float = 0.0) -> tuple[list[tuple[int, int, int]], dict]:
    """Best-vs-worst pair of each group of n consecutive rows (docs/concepts.md: Online iterative DPO).

    scores, responses: length G*n, rows [g*n, (g+1)*n) belong to prompt g. Returns
    ([(g, best_row, worst_row), ...], counts). A group is dropped when its best and worst
    responses are the same text (``identical``), when best - worst <= tie_tolerance or is a
    rounding difference (`ROUNDING`; ``ties``),
    or when either is empty (``empty``: nothing to learn from, and not a valid preference record).
    """
    if len(scores) != len(responses) or len(scores) % n:
        raise ValueError(f"{len(scores)} scores / {len(responses)} responses do not form groups of {n}")
    pairs, counts = [], {"identical": 0, "ties": 0, "empty": 0}
    for g in range(len(scores) // n):
        rows = range(g * n, (g + 1) * n)
        best = max(rows, key=lambda i: scores[i])  # first of equals: deterministic
        worst = min((i for i in rows if i != best), key=lambda i: scores[i])  # never the same row
        a, b = responses[best].strip(), responses[worst].strip()
        if a == b:
            counts["identical"] += 1
        elif scores[best] - scores[worst] <= max(tie_tolerance, ROUNDING * max(1.0, abs(scores[best]),
                                                                         abs(scores[worst]))):
            counts["ties"] += 1
        elif not a or not b:
            counts["empty"] += 1
        else:
            pairs.append((g, best, worst))
    return pairs, counts


def best_of_n(scores, responses, n: int, min_score: float | None = None,
              top_fraction: float = 1.0) -> list[tuple[int, int]]:
    """(g, best_row) of RSFT's data: each group's best response, kept when it is not empty, its score
    is >= ``min_score`` (None: no threshold), and it is among the ``top_fraction`` best of the groups'
    best responses (ceil(fraction x groups), ties broken by group order). Sorted by group."""
    best = []
    for g in range(len(scores) // n):
        b = max(range(g * n, (g + 1) * n), key=lambda i: scores[i])
        if responses[b].strip() and (min_score is None or scores[b] >= min_score):
            best.append((g, b))
    keep = math.ceil(top_fraction * (len(scores) // n) - 1e-9)  # 0.55 x 100 is 55.000000000000007 in floats
    return sorted(sorted(best, key=lambda gb: -scores[gb[1]])[:keep])


def rsft_dropped(scores, responses, n: int, min_score: float | None, kept: int) -> dict[str, int]:
    """Why the prompts `best_of_n` did not keep were left out: an empty best response, a best score
    below ``min_score``, or not among the top fraction."""
    best = [max(range(g * n, (g + 1) * n), key=lambda i: scores[i]) for g in range(len(scores) // n)]
    empty = sum(1 for b in best if not responses[b].strip())
    below = sum(1 for b in best if responses[b].strip() and min_score is not None and scores[b] < min_score)
    return {"dropped_empty": empty, "dropped_below_min_score": below,
            "dropped_top_fraction": len(best) - kept - empty - below}


def length_penalised(scores, responses, lam: float) -> list[float]:
    """score - lam * |a|, |a| in characters (docs/concepts.md: Online iterative DPO)."""
    return [s - lam * len(r) for s, r in zip(scores, responses)]

