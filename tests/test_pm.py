"""Pairwise preference model: the prompt format, randomised training order, both-order averaging."""

from __future__ import annotations

import re

import pytest
import torch

from rlhfkit.data import PreferenceExample
from rlhfkit.judges.preference import (
    QUESTION,
    PairwiseJudge,
    average_orders,
    context_text,
    label_token_ids,
    pm_prompt,
    pm_training_records,
)


def test_prompt_format():
    assert pm_prompt("Is it nice?", "yes", "no") == f"[CONTEXT] Is it nice? [RESPONSE A] yes [RESPONSE B] no\n{QUESTION}"
    assert context_text([{"role": "user", "content": "hi"}]) == "hi"
    multi = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "how?"}]
    assert context_text(multi) == "user: hi\nassistant: hello\nuser: how?"


def test_training_records_randomise_order_and_label_the_chosen():
    pairs = [PreferenceExample([{"role": "user", "content": f"q{i}"}], f"good{i}", f"bad{i}") for i in range(200)]
    recs = pm_training_records(pairs, seed=0)
    firsts = 0
    for ex, rec in zip(pairs, recs):
        user, answer = rec["messages"][0]["content"], rec["messages"][1]["content"]
        a, b = re.match(r"\[CONTEXT\] .* \[RESPONSE A\] (.*) \[RESPONSE B\] (.*)\n", user).groups()
        assert {a, b} == {ex.chosen, ex.rejected}
        assert answer == ("A" if a == ex.chosen else "B")
        firsts += a == ex.chosen
    assert 70 < firsts < 130  # about half each way: position carries no signal
    assert pm_training_records(pairs, seed=0) == recs  # reproducible


def test_average_orders_by_hand():
    fwd, swp = torch.tensor([0.8, 0.5, 0.9]), torch.tensor([0.4, 0.5, 0.9])
    # a1 first: P(A)=0.8 says a1 wins; a2 first: P(A)=0.4 -> P(a1 wins)=0.6; mean 0.7.
    # A judge that always says "A" with 0.9 has no preference once both orders are averaged.
    torch.testing.assert_close(average_orders(fwd, swp), torch.tensor([0.7, 0.5, 0.5]))


def test_label_tokens_follow_the_generation_prompt(tokenizer):
    a, b = label_token_ids(tokenizer)
    assert a != b
    assert tokenizer.decode([a]) == "A" and tokenizer.decode([b]) == "B"


def test_judge_probabilities_are_order_symmetric(tokenizer, tiny_model):
    judge = PairwiseJudge(tiny_model, tokenizer, batch_size=2)
    ctx, x, y = ["Say hi", "Name a fruit", "2+2?"], ["hi there", "apple", "4"], ["go away", "a rock", "five"]
    p_xy = torch.tensor(judge.compare(ctx, x, y))
    p_yx = torch.tensor(judge.compare(ctx, y, x))
    torch.testing.assert_close(p_xy + p_yx, torch.ones(3))  # P(x > y) + P(y > x) = 1 exactly
    # ... and each is the specified average of the two single-order probabilities.
    torch.testing.assert_close(p_xy, average_orders(judge.prob_first(ctx, x, y), judge.prob_first(ctx, y, x)))
    assert ((p_xy > 0) & (p_xy < 1)).all()
    assert judge.calls == 3 * 2 * 2 + 3 * 2  # two compare() calls (2 orders each) + two prob_first()


def test_single_order_batches_match_one_by_one(tokenizer, tiny_model):
    """Left padding of judge prompts of different lengths must not change P(A)."""
    judge = PairwiseJudge(tiny_model, tokenizer, batch_size=3)
    ctx, x, y = ["a", "a much longer context here", "b"], ["yes", "no", "a long answer with words"], ["x", "y", "z"]
    batched = judge.prob_first(ctx, x, y)
    single = torch.cat([judge.prob_first([c], [a], [b]) for c, a, b in zip(ctx, x, y)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", ["nope:x", "pm:"])
def test_bad_judge_spec(spec):
    from rlhfkit.judges.preference import build_pairwise_judge

    with pytest.raises(ValueError, match="expected pm:DIR"):
        build_pairwise_judge(spec)


def test_a_pm_spec_that_is_no_pm_runs_model_is_warned_about(tmp_path, tiny_model_dir, caplog):
    """pm:DIR on a plain causal LM (an untrained judge reported as a trained preference model) is
    warned about once; a model of a `rlhfkit pm` run (its model/, best/model, a checkpoint's) is not."""
    import shutil

    from rlhfkit.judges.preference import check_pairwise_spec

    run = tmp_path / "pm"
    for sub in ("model", "best/model", "checkpoints/step-00000002/model"):
        shutil.copytree(tiny_model_dir, run / sub)
    (run / "pm_config.yaml").write_text("model: {}\n")
    with caplog.at_level("WARNING", logger="rlhfkit"):
        for where in (run, run / "best" / "model", run / "checkpoints" / "step-00000002" / "model"):
            check_pairwise_spec(f"pm:{where}")
        assert not [r for r in caplog.records if "not a model of an `rlhfkit pm` run" in r.message]
        check_pairwise_spec(f"pm:{tiny_model_dir}")
        check_pairwise_spec(f"pm:{tiny_model_dir}")
    warned = [r.message for r in caplog.records if "not a model of an `rlhfkit pm` run" in r.message]
    assert len(warned) == 1 and "judge:MODEL" in warned[0]


def test_a_pair_too_long_for_pm_names_its_own_file_before_anything_is_written(tmp_path, tiny_model_dir):
    import json

    from rlhfkit.config import load_config
    from rlhfkit.data import DataError
    from rlhfkit.trainers.pm import PMConfig, train_pm

    rows = [{"prompt": f"Say something {i}", "chosen": "Short.", "rejected": "No."} for i in range(7)]
    rows.insert(4, {"prompt": "Say something", "chosen": "word " * 60, "rejected": "No."})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(PMConfig, overrides=[f"model.name={tiny_model_dir}", f"data.train={tmp_path / 'pairs.jsonl'}",
                                           "data.max_length=90", f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(DataError, match=r"pairs\.jsonl:5: field 'chosen': the conversation is \d+ tokens, longer than"):
        train_pm(cfg)
    assert not (tmp_path / "run").exists()


class _LetterJudgeStub(torch.nn.Module):
    """A judge LM with known next-token logits at the answer position: the "A" logit is ``margin``
    when the first response contains "good", the "B" logit is ``margin`` when the second does,
    plus ``bias_a`` on "A" always (a position bias); every other logit is -inf."""

    def __init__(self, tokenizer, margin: float, bias_a: float = 0.0):
        super().__init__()
        self.tok, self.margin, self.bias_a = tokenizer, margin, bias_a
        self.a_id, self.b_id = label_token_ids(tokenizer)
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # the judge reads the device from the parameters

    def forward(self, input_ids, attention_mask, **_):
        from types import SimpleNamespace

        logits = torch.full((input_ids.shape[0], 1, max(self.a_id, self.b_id) + 1), float("-inf"))
        for i, (ids, m) in enumerate(zip(input_ids, attention_mask)):
            text = self.tok.decode(ids[m.bool()].tolist())
            first, second = re.search(r"\[RESPONSE A\] (.*) \[RESPONSE B\] (.*)\n", text).groups()
            logits[i, -1, self.a_id] = self.margin * ("good" in first) + self.bias_a
            logits[i, -1, self.b_id] = self.margin * ("good" in second)
        return SimpleNamespace(logits=logits)


def test_prob_first_is_the_probability_of_the_letter_a(tokenizer):
    """P("A") normalised over {A, B}: logits (3, 0) give sigmoid(3) for the first response, (0, 3)
    give sigmoid(-3); a judge whose logits prefer the "good" response in either position prefers it."""
    import math

    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    judge = PairwiseJudge(_LetterJudgeStub(tokenizer, margin=3.0), tokenizer, batch_size=2)
    ctx = ["Say hi", "a much longer context to force left padding", "x"]
    good, bad = ["good hi", "good day", "good"], ["go away", "no", "bad bad bad answer"]
    torch.testing.assert_close(judge.prob_first(ctx, good, bad), torch.full((3,), sig(3.0)))
    torch.testing.assert_close(judge.prob_first(ctx, bad, good), torch.full((3,), sig(-3.0)))
    assert (judge.prob_first(ctx, good, bad) > 0.9).all()
    torch.testing.assert_close(torch.tensor(judge.compare(ctx, good, bad)), torch.full((3,), sig(3.0)),
                               check_dtype=False)
    torch.testing.assert_close(torch.tensor(judge.compare(ctx, bad, good)), torch.full((3,), sig(-3.0)),
                               check_dtype=False)
    # With a position bias of +1 on "A": P_A(good, bad) = sig(4), P_A(bad, good) = sig(1 - 3) = sig(-2);
    # averaged over both orders P(good > bad) = (sig(4) + 1 - sig(-2)) / 2 = (sig(4) + sig(2)) / 2.
    biased = PairwiseJudge(_LetterJudgeStub(tokenizer, margin=3.0, bias_a=1.0), tokenizer, batch_size=3)
    p = biased.compare(ctx, good, bad)
    assert p == pytest.approx([(sig(4.0) + sig(2.0)) / 2] * 3, abs=1e-6)
    assert biased.compare(ctx, bad, good) == pytest.approx([1 - (sig(4.0) + sig(2.0)) / 2] * 3, abs=1e-6)


def test_pair_fitter_cuts_only_what_is_over_and_the_longer_response_first(tokenizer):
    from rlhfkit.trainers.pm import PairFitter

    context, long, short = "Tell me about bread.", "Bread is made of flour, water and salt. " * 6, "No"
    assert len(tokenizer.encode(short, add_special_tokens=False)) == 1
    full = PairFitter(tokenizer, 10_000)._length((context, long, short), "A")
    exact = PairFitter(tokenizer, full)  # exactly at the limit: nothing is cut or counted
    assert exact(context, long, short, "A") == (context, long, short) and exact.truncated == 0
    # 5 tokens over, the context already under half: the longer response loses its end, even when the
    # other is down to one token; the context and the shorter response stay whole
    fitter = PairFitter(tokenizer, full - 5)
    c, a, b = fitter(context, long, short, "A")
    assert (c, b) == (context, short) and long.startswith(a) and len(a) < len(long)
    assert fitter.truncated == 1 and fitter.tokens_removed == full - fitter._length((c, a, b), "A") >= 5
    # a long context 3 tokens over: it loses 3 tokens from its start, not everything above half
    story = "The history of bread in Europe is long and varied. " * 12
    full = PairFitter(tokenizer, 10_000)._length((story, "Yes.", "No."), "B")
    fitter = PairFitter(tokenizer, full - 3)
    c, a, b = fitter(story, "Yes.", "No.", "B")
    assert story.endswith(c) and len(c) >= len(story) - 20 and b == "No." and fitter.tokens_removed == 3


def test_pm_learns_to_pick_the_better_response_of_held_out_pairs(tmp_path, tiny_model_dir):
    """`rlhfkit pm` on a tiny random model: the A/B judge it trains picks the chosen response of
    held-out pairs (colours no training pair names) whichever side it is on, where the untrained
    model as LLM-as-judge answers by position (one order right, the other wrong: 0.5). Both are
    scored on the same held-out pairs; the single-order accuracy is the one a judge that reads
    only positions cannot raise."""
    from conftest import write_jsonl
    from trainer_rows import pref_rows, trainer_cfg

    from rlhfkit.trainers.pm import PMConfig, train_pm

    train = write_jsonl(tmp_path / "train.jsonl", pref_rows(64, 0))
    held = write_jsonl(tmp_path / "eval.jsonl", pref_rows(24, 1, held_out=True))
    cfg = trainer_cfg(PMConfig, tmp_path, tiny_model_dir, train, held, train__max_steps=80,
                      data__max_length=128, train__report_to=[])
    results = train_pm(cfg)
    assert results["pm"]["pairs"] == results["llm_judge"]["pairs"] == 24
    assert results["llm_judge"]["accuracy_single_order"] <= 0.6, results["llm_judge"]
    assert results["pm"]["accuracy_single_order"] >= 0.9 and results["pm"]["accuracy"] >= 0.9, results["pm"]
