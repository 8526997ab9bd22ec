"""The numbers of `rlhfkit eval` on constructed inputs whose answer is known by hand: win rates of a
policy that differs from its baseline, summaries (eos fraction, length-reward correlation), and the
capability probe's exact match."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch


def _samples(responses, scores=None, eos=None, tokens=None, fields=None):
    """One model's samples as `sample_and_score` returns them (the rollout stands in for its eos flags)."""
    n = len(responses)
    rows = [SimpleNamespace(messages=[{"role": "user", "content": f"q{i}"}], fields=(fields or [{}] * n)[i],
                            text=f"q{i}") for i in range(n)]
    return {"exp": SimpleNamespace(eos=torch.tensor(eos if eos is not None else [True] * n)), "rows": rows,
            "responses": list(responses), "scores": scores or {}, "tokens": tokens or [1] * n,
            "chars": [len(r) for r in responses]}


class _LongerWins:
    """A pairwise judge that surely prefers the longer response: P(a1 > a2) = 1, 0 or 0.5 (equal length)."""

    name = "longer"

    @staticmethod
    def context(messages):
        return messages[-1]["content"]

    def compare(self, contexts, a1s, a2s, fields=None):
        assert len(contexts) == len(a1s) == len(a2s) == len(fields)
        return [1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5 for a, b in zip(a1s, a2s)]


def test_win_rates_of_a_policy_that_beats_its_baseline():
    """Pointwise: policy scores (3, 2 | 5, 1) against the baseline's (1, 2 | 4, 0): votes 1, tie, 1, 1;
    per prompt (n = 2) 0.75 and 1.0, so the win rate is 0.875 with 3 wins, 1 tie, 0 losses. Pairwise:
    the policy's responses are longer on 3 of 4 samples and shorter on one: 3 wins, 1 loss, 0.75."""
    from rlhfkit.eval.policy_compare import win_rates

    pol = _samples(["aaaa", "aa", "aaaaa", "a"], scores={"gold": [3.0, 2.0, 5.0, 1.0]})
    base = _samples(["a", "aaa", "aa", ""], scores={"gold": [1.0, 2.0, 4.0, 0.0]})
    judges = {"gold": ("point", None), "longer": ("pair", _LongerWins())}
    out = win_rates(pol, base, judges, n=2)
    g = out["gold"]
    assert g["win_rate"] == pytest.approx(0.875) and g["n"] == 2
    assert (g["wins"], g["ties"], g["losses"]) == (3, 1, 0)
    p = out["longer"]
    assert p["win_rate"] == pytest.approx(0.75) and (p["wins"], p["ties"], p["losses"]) == (3, 0, 1)
    # the other way round the baseline loses what the policy won
    back = win_rates(base, pol, judges, n=2)
    assert back["gold"]["win_rate"] == pytest.approx(0.125) and (back["gold"]["wins"], back["gold"]["losses"]) == (0, 3)
    assert back["longer"]["win_rate"] == pytest.approx(0.25)
    # a policy that beats the baseline on every prompt: win rate 1.0, all wins
    allwin = win_rates(_samples(["xx"] * 4, {"gold": [9.0] * 4}), _samples(["x"] * 4, {"gold": [0.0] * 4}), judges, 1)
    for w in allwin.values():
        assert w["win_rate"] == 1.0 and (w["wins"], w["ties"], w["losses"], w["n"]) == (4, 0, 0, 4)


def test_identical_responses_are_a_tie_whatever_the_scores_say():
    """A reward model scores one text a few ulps apart with different batch companions: sample 0's
    responses are the same text, scored 1.0000001 against 1.0, and count as a tie for every judge;
    sample 1 (different texts) is a win for gold and a loss for the longer-wins judge."""
    from rlhfkit.eval.policy_compare import win_rates

    pol = _samples(["same", "aa"], scores={"gold": [1.0000001, 2.0]})
    base = _samples(["same", "aaa"], scores={"gold": [1.0, 1.0]})
    out = win_rates(pol, base, {"gold": ("point", None), "longer": ("pair", _LongerWins())}, n=1)
    assert (out["gold"]["wins"], out["gold"]["ties"], out["gold"]["losses"]) == (1, 1, 0)
    assert out["gold"]["win_rate"] == pytest.approx(0.75)
    assert (out["longer"]["wins"], out["longer"]["ties"], out["longer"]["losses"]) == (0, 1, 1)


class _TableJudge:
    """A model judge whose P(first response better) is looked up: (first, second) -> P."""

    def __init__(self, table):
        self.table = table

    @staticmethod
    def context(messages):
        return messages[-1]["content"]

    def prob_first(self, contexts, a1s, a2s):
        return torch.tensor([self.table[(a, b)] for a, b in zip(a1s, a2s)])


def test_judge_accuracy_by_hand_a_tie_counts_half_in_either_order():
    """Chosen c, rejected r; P(first better) in the order (c, r) and then (r, c):
    pair 1: 0.9, 0.2 (right both ways); pair 2: 0.5, 0.5 (a tie both ways); pair 3: 0.7, 0.7 (always the
    first). Both orders averaged: P(c > r) = 0.85, 0.5, 0.5 -> votes 1, 0.5, 0.5: accuracy 2/3. Each order
    alone: (1 + 1) / 2, (0.5 + 0.5) / 2, (1 + 0) / 2 -> 2/3. Position bias: mean (0.55, 0.5, 0.7) - 0.5."""
    from rlhfkit.eval.preference_sets import judge_accuracy

    table = {("c1", "r1"): 0.9, ("r1", "c1"): 0.2, ("c2", "r2"): 0.5, ("r2", "c2"): 0.5,
             ("c3", "r3"): 0.7, ("r3", "c3"): 0.7}
    examples = [SimpleNamespace(prompt=[{"role": "user", "content": f"q{i}"}], chosen=f"c{i}", rejected=f"r{i}",
                                category=None) for i in (1, 2, 3)]
    out = judge_accuracy(_TableJudge(table), examples)
    assert out["accuracy"] == pytest.approx(2 / 3) and out["pairs"] == 3
    assert out["accuracy_single_order"] == pytest.approx(2 / 3)
    assert out["position_bias"] == pytest.approx((0.55 + 0.5 + 0.7) / 3 - 0.5)


def test_summarize_by_hand():
    """4 samples of 2 prompts: 3 of 4 ended with eos (0.75); lengths 1..4 characters against gold
    (2, 1 | 3, 4): pooled Pearson sxy = 4, sxx = syy = 5 -> 0.8; within each prompt the centred
    lengths (-.5, .5 | -.5, .5) and gold (.5, -.5 | -.5, .5) are uncorrelated -> 0.0."""
    from rlhfkit.eval.policy_compare import summarize

    s = _samples(["a", "bb", "ccc", "dddd"], scores={"gold": [2.0, 1.0, 3.0, 4.0]}, eos=[True, False, True, True],
                 tokens=[1, 2, 2, 3])
    out = summarize(s, n=2)
    assert out["eos_frac"] == pytest.approx(0.75)
    assert out["samples"] == 4 and out["length_tokens"] == 2.0 and out["length_chars"] == 2.5
    assert out["corr_length_gold"] == pytest.approx(0.8)
    assert out["corr_length_gold_within_prompt"] == pytest.approx(0.0, abs=1e-12)
    assert out["gold_mean"]["mean"] == pytest.approx(2.5) and out["gold_mean"]["n"] == 2  # prompt means 1.5, 3.5
    # a longer response scoring lower: correlation -1, and no eos at all
    neg = summarize(_samples(["a", "bb", "ccc"], scores={"gold": [3.0, 2.0, 1.0]}, eos=[False] * 3), n=1)
    assert neg["corr_length_gold"] == pytest.approx(-1.0) and neg["eos_frac"] == 0.0
    assert "corr_length_gold_within_prompt" not in neg
    assert math.isnan(summarize(_samples(["a", "b"], scores={"gold": [1.0, 2.0]}), n=1)["corr_length_gold"])


def test_capability_exact_match_is_the_share_of_right_answers(tokenizer, tiny_model, monkeypatch):
    """The probe scores greedy answers with the task's own judge (task:arithmetic: the last number
    equals the reference). Answers that are right for 3 of 4 prompts (the last number of the
    answer, whatever comes before) give exact match 0.75; all wrong give 0.0."""
    from rlhfkit.eval import alignment_tax as at

    tax = at.AlignmentTax(at.AlignmentTaxSection(capability="task:arithmetic", limit=4, max_new_tokens=2),
                          tokenizer, 2, "cpu")
    refs = [item.fields["reference"] for item in tax.items]
    assert len(set(refs)) == 4  # distinct, so each answer is found by its reference
    answers = {}

    def decode(exp, tok):  # the greedy answers, replaced by constructed ones (right for prompts 0, 1, 3)
        assert len(exp) == 4
        return [answers[tax.items[i].fields["reference"]] for i in exp.prompt_index.tolist()]

    monkeypatch.setattr(at, "decode_responses", decode)
    answers.update({refs[0]: f"It is {refs[0]}", refs[1]: f"7 and then {refs[1]}", refs[2]: f"{refs[2]} or 1",
                    refs[3]: refs[3]})
    assert tax.exact_match(tiny_model) == pytest.approx(0.75)
    answers.update({r: f"{int(r) + 1}" for r in refs})
    assert tax.exact_match(tiny_model) == 0.0
    answers.update({r: f"= {r}" for r in refs})
    assert tax.measure(tiny_model) == {"capability_exact_match": 1.0}
