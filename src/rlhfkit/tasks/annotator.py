"""A simulated human annotator: Bradley-Terry labels from a known gold reward (docs/concepts.md: Simulated human feedback).

    y ~ Bernoulli(s(beta * (r*(x, a1) - r*(x, a2)))),   then flipped with probability flip_prob.

beta is the annotator's rationality on the gold scale: beta -> inf always prefers the higher gold
score, beta = 0 flips a fair coin. flip_prob adds label noise that does not depend on how far apart
the two responses are (careless clicks), which a Bradley-Terry model cannot explain away.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

GoldFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


def sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)  # no overflow for very negative z
    return e / (1.0 + e)


class SimulatedAnnotator:
    """Labels pairs of responses using `gold_fn(prompts, responses) -> scores`.

    The random stream is seeded once and advances with every call, so a fixed sequence of calls
    gives a fixed sequence of labels.
    """

    def __init__(self, gold_fn: GoldFn, beta: float, flip_prob: float = 0.0, seed: int = 0):
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.gold_fn = gold_fn
        self.beta = float(beta)
        self.flip_prob = float(flip_prob)
        self.seed = seed
        self._rng = random.Random(seed)

    def prob_first(self, g1: Sequence[float], g2: Sequence[float]) -> list[float]:
        """P(a1 preferred) before label flipping, from gold scores."""
        out = []
        for a, b in zip(g1, g2):
            z = self.beta * (a - b) if self.beta > 0 and a != b else 0.0  # equal scores: 1/2 at any beta
            out.append(sigmoid(z) if math.isfinite(z) else float(z > 0))
        return out

    def annotate(self, prompts: Sequence[str], a1s: Sequence[str], a2s: Sequence[str]
                 ) -> tuple[list[int], list[float], list[float]]:
        """(labels, gold(a1), gold(a2)); label 1 means a1 is preferred."""
        if not len(prompts) == len(a1s) == len(a2s):
            raise ValueError(f"lengths differ: {len(prompts)} prompts, {len(a1s)} a1s, {len(a2s)} a2s")
        g1 = [float(x) for x in self.gold_fn(list(prompts), list(a1s))]
        g2 = [float(x) for x in self.gold_fn(list(prompts), list(a2s))]
        return self.labels(g1, g2), g1, g2

    def labels(self, g1: Sequence[float], g2: Sequence[float]) -> list[int]:
        """One label per pair of gold scores (1: the first is preferred), flipped with flip_prob."""
        labels = []
        for p in self.prob_first(g1, g2):
            y = int(self._rng.random() < p)
            if self.flip_prob and self._rng.random() < self.flip_prob:
                y = 1 - y
            labels.append(y)
        return labels

    def label(self, prompts: Sequence[str], a1s: Sequence[str], a2s: Sequence[str]) -> list[int]:
        """1 where a1 is preferred to a2, else 0."""
        return self.annotate(prompts, a1s, a2s)[0]

    def ceiling_accuracy(self, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str]) -> float:
        """Accuracy of the gold judge itself on labelled pairs: P(gold(chosen) > gold(rejected)),
        ties counting 0.5. A reward model learned from these labels is measured against this noise
        ceiling (it cannot be expected to agree with the labels more often than r* does)."""
        gc = self.gold_fn(list(prompts), list(chosen))
        gr = self.gold_fn(list(prompts), list(rejected))
        return agreement(gc, gr)

    def __repr__(self) -> str:
        return f"SimulatedAnnotator(beta={self.beta}, flip_prob={self.flip_prob}, seed={self.seed})"


def agreement(gold_chosen: Sequence[float], gold_rejected: Sequence[float]) -> float:
    """Fraction of pairs with gold(chosen) > gold(rejected); ties count 0.5; nan for no pairs."""
    if not gold_chosen:
        return float("nan")
    wins = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(gold_chosen, gold_rejected))
    return wins / len(gold_chosen)
