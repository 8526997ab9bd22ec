"""Accuracy of reward models and pairwise judges on a labelled preference set, by category
(docs/concepts.md: Reward model, Evaluation; the categories RewardBench reports when the set has a ``category`` field)."""

from __future__ import annotations

from collections import defaultdict

import torch

from rlhfkit.judges.preference import average_orders
from rlhfkit.judges.rewards import prompt_text


def by_category(categories, values) -> dict[str, list]:
    """values grouped by the category of each (a missing one is "all"), sorted by name; empty with
    fewer than two categories: an accuracy is reported per category only when there are several."""
    groups = defaultdict(list)
    for c, v in zip(categories, values):
        groups[c or "all"].append(v)
    return dict(sorted(groups.items())) if len(groups) > 1 else {}


def _by_category(examples, correct: list[float]) -> dict:
    out = {"accuracy": sum(correct) / max(len(correct), 1), "pairs": len(correct)}
    groups = by_category([ex.category for ex in examples], correct)
    if groups:
        out["by_category"] = {k: {"accuracy": sum(v) / len(v), "pairs": len(v)} for k, v in groups.items()}
    return out


def reward_accuracy(reward_fn, examples) -> dict:
    """Pointwise scorer (`judges.rewards.RewardFn`: rm:DIR, task:NAME, ...) on PreferenceExamples:
    share of pairs where r(chosen) > r(rejected); ties count half."""

    texts = [prompt_text(ex.prompt) for ex in examples]
    msgs = [ex.prompt for ex in examples]
    rc = reward_fn(texts, [ex.chosen for ex in examples], messages=msgs)
    rr = reward_fn(texts, [ex.rejected for ex in examples], messages=msgs)
    correct = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(rc, rr)]
    out = _by_category(examples, correct)
    out["margin"] = sum(c - r for c, r in zip(rc, rr)) / max(len(rc), 1)
    return out


def _vote(p: torch.Tensor) -> torch.Tensor:
    """P(chosen > rejected) -> 1 / 0.5 / 0."""
    return (p > 0.5).float() + 0.5 * (p == 0.5).float()


def judge_accuracy(judge, examples, fit=None) -> dict:
    """Pairwise judge on PreferenceExamples: accuracy of P(chosen > rejected) averaged over both
    orders; for model judges also the single-order accuracy and the position bias
    (mean P("A") over both orders minus 0.5; > 0 means the judge favours the first response).
    ``fit(context, first, second, label)`` (`trainers.pm.PairFitter`), when given, cuts each pair's
    texts as a preference model's training cut them (both orders are the same length), or drops it
    (counted in ``dropped_too_long``)."""

    ctx = [judge.context(ex.prompt) for ex in examples]
    ch, rj = [ex.chosen for ex in examples], [ex.rejected for ex in examples]
    dropped = 0
    if fit is not None:
        fitted = [(ex, f) for ex, *texts in zip(examples, ctx, ch, rj) if (f := fit(*texts, "A")) is not None]
        dropped = len(examples) - len(fitted)
        examples = [ex for ex, _ in fitted]
        ctx, ch, rj = ([f[i] for _, f in fitted] for i in range(3))
        if not examples:
            return {"accuracy": None, "pairs": 0, "dropped_too_long": dropped}
    out = _judge_accuracy(judge, examples, ctx, ch, rj)
    return {**out, "dropped_too_long": dropped} if dropped else out


def _judge_accuracy(judge, examples, ctx: list[str], ch: list[str], rj: list[str]) -> dict:
    if not hasattr(judge, "prob_first"):  # the simulated annotator: no order to average
        p = judge.compare(ctx, ch, rj)
        return _by_category(examples, [1.0 if x > 0.5 else 0.5 if x == 0.5 else 0.0 for x in p])
    fwd = judge.prob_first(ctx, ch, rj)  # chosen shown as A
    swp = judge.prob_first(ctx, rj, ch)  # chosen shown as B
    p = average_orders(fwd, swp).tolist()
    out = _by_category(examples, [1.0 if x > 0.5 else 0.5 if x == 0.5 else 0.0 for x in p])
    single = (_vote(fwd) + _vote(1 - swp)) / 2  # each order alone, a tie counting half as in `accuracy`
    out["accuracy_single_order"] = single.mean().item()
    out["position_bias"] = ((fwd + swp) / 2).mean().item() - 0.5
    return out
