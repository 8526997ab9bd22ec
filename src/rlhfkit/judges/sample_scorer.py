"""Scoring a policy's samples for online iterative DPO (docs/methods/online_dpo.md): one interface
over pointwise rewards (reward functions, reward models) and pairwise judges, whose comparisons
become per-response scores by a round robin within each prompt's group of n samples."""

from __future__ import annotations

from rlhfkit.judges.preference import build_pairwise_judge, check_pairwise_spec, is_pairwise_spec, judge_tokenizer
from rlhfkit.judges.rewards import build_reward_fn, check_reward_spec


def check_scorer_spec(spec: str) -> None:
    """A pointwise spec (`check_reward_spec`) or a pairwise one (`check_pairwise_spec`) checked
    without loading a model (a model judge's tokenizer is loaded, to check it can ask the A/B
    question): what `Scorer` and `rlhfkit eval`'s judges accept."""
    if is_pairwise_spec(spec):
        kind, target = check_pairwise_spec(spec)
        if kind != "annotator":
            judge_tokenizer(spec, target)
    else:
        check_reward_spec(spec)


def round_robin(compare, contexts: list[str], responses: list[str], n: int, fields: list[dict] | None = None
                ) -> list[float]:
    """Pairwise judge -> per-response score: mean over the other n-1 responses of its prompt of
    P(this > other). Makes n(n-1)/2 comparisons per prompt in one batched call."""
    idx = [(g * n + i, g * n + j) for g in range(len(responses) // n) for i in range(n) for j in range(i + 1, n)]
    rows = {} if fields is None else {"fields": [fields[i] for i, _ in idx]}  # what the annotator's gold judge reads
    probs = compare([contexts[i] for i, _ in idx], [responses[i] for i, _ in idx], [responses[j] for _, j in idx],
                    **rows)
    wins = [0.0] * len(responses)
    for (i, j), p in zip(idx, probs):
        wins[i] += p
        wins[j] += 1.0 - p
    return [w / (n - 1) for w in wins]


class Scorer:
    """One interface over pointwise rewards and pairwise judges: ``score(items, responses, n)``."""

    def __init__(self, spec: str, tokenizer, device, batch_size: int, seed: int = 0, gold: str = ""):
        self.spec = spec
        self.gold = build_reward_fn(gold) if gold else None  # optional: the gold judge's scores too
        self.pairwise = is_pairwise_spec(spec)
        if self.pairwise:
            self.judge = build_pairwise_judge(spec, device=device, batch_size=batch_size, seed=seed)
        else:
            self.reward_fn = build_reward_fn(spec, tokenizer=tokenizer, device=device, batch_size=batch_size)

    def score(self, rows: list, responses: list[str], n: int) -> tuple[list[float], dict]:
        """rows: the PromptItem of each response. Returns (scores, {"labels", "judge_calls"})."""
        if self.pairwise:
            before = self.judge.calls
            scores = round_robin(self.judge.compare, [self.judge.context(r.messages) for r in rows], responses, n,
                                 fields=[r.fields for r in rows])
            labels = len(responses) // n * n * (n - 1) // 2
            return scores, {"labels": labels, "judge_calls": self.judge.calls - before}
        return _pointwise(self.reward_fn, rows, responses), {"labels": len(responses), "judge_calls": len(responses)}

    def restart(self, stream: int) -> None:
        """A judge that draws its labels at random (the simulated annotator) draws stream ``stream``
        of its seed from its start: online DPO's iteration k gets the same labels in a run resumed
        before it as in one that never stopped."""
        if self.pairwise and hasattr(self.judge, "restart"):
            self.judge.restart(stream)

    def gold_scores(self, rows: list, responses: list[str]) -> list[float] | None:
        """The gold judge's score of each response, or None without one."""
        return None if self.gold is None else _pointwise(self.gold, rows, responses)


def _pointwise(fn, rows: list, responses: list[str]) -> list[float]:
    return fn([r.text for r in rows], responses, messages=[r.messages for r in rows], fields=[r.fields for r in rows])
