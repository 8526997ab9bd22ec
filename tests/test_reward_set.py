"""Several rewards with weights (RewardSet): the weighted sum, normalize-then-sum within a group,
rows a function cannot score, and construction errors."""

from __future__ import annotations

import math

import pytest

from rlhfkit.judges import RewardFn, RewardFunctionError, RewardSet, RewardSpecError, build_reward_fn, build_reward_set


def _exact(prompts, responses, reference):
    return [None if ref is None else float(r == ref) for r, ref in zip(responses, reference)]


def _length(prompts, responses):
    return [float(len(r)) for r in responses]


def test_reward_set_weighted_sum_by_hand():
    rs = build_reward_set([_exact, {"spec": _length, "weight": -0.5, "name": "len"}])
    rows = [{"reference": "4"}, {"reference": "5"}, {}]
    out = rs.score(["p"] * 3, ["4", "five", "xy"], fields=rows)
    assert out.names == ["_exact", "len"]
    assert out.per_function[:, 1].tolist() == [1.0, 4.0, 2.0]
    assert out.per_function[:2, 0].tolist() == [1.0, 0.0] and math.isnan(out.per_function[2, 0])
    # 1*1 - 0.5*1 ; 1*0 - 0.5*4 ; (exact unscored) - 0.5*2
    assert out.combined.tolist() == [0.5, -2.0, -1.0]
    assert rs(["p"] * 3, ["4", "five", "xy"], fields=rows) == [0.5, -2.0, -1.0]
    m = out.metrics()
    assert m["reward/_exact/mean"] == 0.5 and m["reward/_exact/scored_frac"] == pytest.approx(2 / 3)
    # lengths 1, 4, 2: mean 7/3, squared deviations (16 + 25 + 1) / 9 over n - 1 = 2 -> variance 7/3
    assert m["reward/len/mean"] == pytest.approx(7 / 3) and m["reward/len/std"] == pytest.approx(math.sqrt(7 / 3))


def test_reward_set_matches_a_single_function_exactly(reward_module):
    """One spec with weight 1 gives what the RewardFn gives: existing single-reward configs are unchanged."""
    rs = build_reward_set("my_rewards:length")
    fn = build_reward_fn("my_rewards:length")
    responses = ["abc", "", "a" * 17]
    assert rs(["p"] * 3, responses) == fn(["p"] * 3, responses) == [3.0, 0.0, 17.0]


def test_reward_set_unscorable_rows():
    def never(prompts, responses):
        return [None] * len(responses)

    rows = [{"reference": "4"}, {}]
    with pytest.raises(RewardFunctionError, match=r"no reward function could score response 1 \(1 of 2\): _exact, "
                                                  r"never all returned None for it \(response: 'x'\)"):
        build_reward_set([_exact, never])(["p", "q"], ["4", "x"], fields=rows)
    out = build_reward_set([_exact, never], unscorable=-1.0).score(["p", "q"], ["4", "x"], fields=rows)
    assert out.combined.tolist() == [1.0, -1.0] and out.unscorable.tolist() == [False, True]
    out = build_reward_set([_exact, never], unscorable="nan").score(["p", "q"], ["4", "x"], fields=rows)
    assert out.combined[0] == 1.0 and math.isnan(out.combined[1])
    assert math.isnan(out.metrics()["reward/never/mean"]) and out.metrics()["reward/never/scored_frac"] == 0.0


def test_reward_set_normalize_then_sum_per_group():
    """Each function is standardised within each prompt's group before the weighted sum."""
    rs = build_reward_set([_length, {"spec": lambda p, r: [float(x.count("a")) for x in r], "name": "a"}],
                          combine="normalize_then_sum")
    responses = ["a", "aaa", "bbbbbbbbbb", "bb"]  # two groups of two
    out = rs.score(["p"] * 4, responses, group_size=2)
    # group 1: length (1, 3) -> z = (-1, 1)/sqrt(2); a-count (1, 3) -> same; group 2: length (10, 2), a (0, 0)
    z = 1 / math.sqrt(2)
    want = [-2 * z, 2 * z, z, -z]
    assert out.combined.tolist() == pytest.approx(want, abs=1e-3)  # eps = 1e-4 in the std


def test_reward_set_construction_errors(reward_module):
    with pytest.raises(RewardSpecError, match="no reward function given"):
        build_reward_set([])
    with pytest.raises(RewardSpecError, match="2 reward weights for 1 reward functions"):
        build_reward_set(_length, weights=[1.0, 2.0])
    with pytest.raises(RewardSpecError, match="weights given twice"):
        build_reward_set([{"spec": _length, "weight": 2.0}], weights=[1.0])
    for bad in (True, math.inf, "1"):
        with pytest.raises(RewardSpecError, match="reward weight .*: expected a finite number"):
            build_reward_set(_length, weights=[bad])
    with pytest.raises(RewardSpecError, match=r"reward weights \[0, 0.0\]: all 0"):
        build_reward_set([_length, {"spec": _exact, "name": "ex"}], weights=[0, 0.0])
    assert build_reward_set([_length, {"spec": _exact, "name": "ex"}], weights=[0, 2.0]).weights.tolist() == [0, 2]
    with pytest.raises(RewardSpecError, match="two reward functions are named '_length'"):
        build_reward_set([_length, _length])
    assert build_reward_set([_length, {"spec": _length, "name": "len2"}]).names == ["_length", "len2"]
    with pytest.raises(RewardSpecError, match="unknown key 'weights'"):
        build_reward_set([{"spec": _length, "weights": 1}])
    with pytest.raises(RewardSpecError, match="'spec' is missing"):
        build_reward_set([{"weight": 1}])
    with pytest.raises(RewardSpecError, match="combine 'mean'"):
        build_reward_set(_length, combine="mean")
    with pytest.raises(RewardSpecError, match="unscorable 'skip'"):
        build_reward_set(_length, unscorable="skip")
    for bad in (math.inf, -math.inf, math.nan):  # a score that would poison every mean it enters
        with pytest.raises(RewardSpecError, match="expected 'error', 'nan' or a finite number"):
            build_reward_set(_length, unscorable=bad)
    with pytest.raises(RewardSpecError, match="without '/'"):
        build_reward_set({"spec": _length, "name": "a/b"})
    # strings, callables, mappings and RewardFns mix; default names are short
    rs = build_reward_set(["my_rewards:length", "task:sentiment", build_reward_fn(_exact, name="ex")],
                          weights=[1, 2, 3])
    assert rs.names == ["length", "task:sentiment", "ex"] and rs.weights.tolist() == [1.0, 2.0, 3.0]
    assert isinstance(rs, RewardSet) and rs.model is None and rs.models == []


def test_reward_set_exposes_its_reward_model(tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rlhfkit.models import save_pretrained_atomic

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    save_pretrained_atomic(LlamaForSequenceClassification(config), tokenizer, tmp_path / "rmrun" / "model")
    rs = build_reward_set([f"rm:{tmp_path / 'rmrun'}", {"spec": _length, "weight": 0.1}])
    assert rs.names == ["rm:rmrun", "_length"] and rs.model is rs.fns[0].model and rs.models == [rs.model]
    rm_alone = rs.fns[0](["Hi"], ["Hello"])
    assert rs(["Hi"], ["Hello"]) == pytest.approx([rm_alone[0] + 0.5])


def test_absolute_scores_of_a_normalised_set_are_the_weighted_raw_sum():
    """Held-out means under normalize_then_sum use the weighted raw sum: the batch's z-scores
    would average to 0 however good the responses are."""
    from rlhfkit.judges import build_reward_set

    length = lambda prompts, responses: [float(len(r)) for r in responses]  # noqa: E731
    vowels = lambda prompts, responses: [float(sum(c in "aeiou" for c in r)) for r in responses]  # noqa: E731
    rs = build_reward_set([{"spec": length, "name": "len"}, {"spec": vowels, "name": "v"}], weights=[1.0, 0.5],
                          combine="normalize_then_sum")
    prompts, responses = ["p"] * 3, ["aa", "bbbb", "aeiouxyz"]
    assert abs(sum(rs(prompts, responses))) < 1e-9  # one group: mean 0 by construction
    assert rs.absolute()(prompts, responses) == [2 + 0.5 * 2, 4 + 0.0, 8 + 0.5 * 5]
    plain = build_reward_set(length)
    assert plain.absolute() is plain


def test_an_async_reward_function_is_awaited(tmp_path):
    """`async def` rewards (a remote judge) work as plain ones, also from inside a running event loop."""
    import asyncio

    from rlhfkit.judges import build_reward_fn

    async def remote(prompts, responses, reference=None):
        await asyncio.sleep(0)
        return [float(r == ref) for r, ref in zip(responses, reference)]

    fn = build_reward_fn(remote)
    assert fn(["q", "q"], ["4", "5"], fields=[{"reference": "4"}, {"reference": "4"}]) == [1.0, 0.0]

    async def inside_a_loop():
        return fn(["q"], ["4"], fields=[{"reference": "4"}])

    assert asyncio.run(inside_a_loop()) == [1.0]
