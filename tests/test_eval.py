"""Evaluation statistics on hand-made numbers, and the table/labels of `rlhfkit eval`."""

from __future__ import annotations

import json
import math

import pytest

from rlhfkit.eval.config import policy_label
from rlhfkit.eval.policy_compare import format_table
from rlhfkit.eval.stats import (
    gold_agreement,
    mean_ci,
    pearson,
    prob_indicators,
    win_indicators,
    win_rate,
    within_group_agreement,
    within_group_pearson,
)


def test_win_indicators_count_ties_half():
    assert win_indicators([3, 1, 2, 5], [1, 1, 4, 0]) == [1.0, 0.5, 0.0, 1.0]
    assert prob_indicators([0.9, 0.5, 0.2]) == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError):
        win_indicators([1], [1, 2])


def test_win_rate_and_ci_by_hand():
    votes = [1.0] * 6 + [0.0] * 3 + [0.5]  # 6 wins, 3 losses, 1 tie -> 6.5 / 10
    w = win_rate(votes)
    assert w["win_rate"] == pytest.approx(0.65)
    sd = math.sqrt((6 * 0.35 ** 2 + 3 * 0.65 ** 2 + 0.15 ** 2) / 9)
    half = 1.959963984540054 * sd / math.sqrt(10)
    assert w["ci_low"] == pytest.approx(0.65 - half) and w["ci_high"] == pytest.approx(0.65 + half)
    assert (w["wins"], w["ties"], w["losses"], w["n"]) == (6, 1, 3, 10)
    assert win_rate([1.0] * 5)["ci_high"] == 1.0  # clipped


@pytest.mark.parametrize("votes, low, high", [
    ([1.0] * 5, 0.565518, 1.0),  # Wilson at 5/5: (5 + z^2/2 - z sqrt(z^2/4)) / (5 + z^2) = 5 / (5 + z^2)
    ([0.0] * 5, 0.0, 0.434482),
    ([0.5] * 4, 0.150039, 0.849961),  # (0.5 + z^2/8 -+ z sqrt(1/16 + z^2/64)) / (1 + z^2/4)
])
def test_prompts_that_all_agree_get_wilsons_interval_not_one_of_no_width(votes, low, high):
    """Every prompt with the same mean vote: the sample has no spread, so the normal interval
    would be a point; Wilson's score interval over the prompts is given instead (by hand above)."""
    w = win_rate(votes)
    assert w["ci_low"] == pytest.approx(low, abs=1e-6) and w["ci_high"] == pytest.approx(high, abs=1e-6)
    z2 = 1.959963984540054 ** 2
    assert win_rate([1.0] * 5)["ci_low"] == pytest.approx(5 / (5 + z2))


def test_win_rate_clusters_samples_by_prompt():
    # 2 prompts x 2 samples: the interval has n = 2 prompts, computed on the prompt means 1.0 and 0.5.
    w = win_rate([1.0, 1.0, 1.0, 0.0], per_prompt=2)
    assert w["n"] == 2 and w["win_rate"] == pytest.approx(0.75)
    half = 1.959963984540054 * math.sqrt(((0.25 ** 2) * 2) / 1) / math.sqrt(2)
    assert 0.75 + half > 1  # the normal interval reaches past 1: Wilson's over the 2 prompts instead
    z2 = 1.959963984540054 ** 2
    centre, spread = 0.75 + z2 / 4, math.sqrt(z2) * math.sqrt(0.75 * 0.25 / 2 + z2 / 16)
    assert w["ci_low"] == pytest.approx((centre - spread) / (1 + z2 / 2))
    assert (w["wins"], w["losses"]) == (3, 1)


def test_a_win_rate_interval_that_would_leave_0_1_is_wilsons():
    # votes 1, 0: mean 0.5, sd sqrt(0.5), half = 1.96 * sqrt(0.5) / sqrt(2) = 0.98 -> [-0.48, 1.48]: past
    # both ends, so Wilson's at 1/2 over 2: (0.5 + z^2/4 -+ z sqrt(1/8 + z^2/16)) / (1 + z^2/2)
    w = win_rate([1.0, 0.0])
    assert w["win_rate"] == 0.5 and w["ci_low"] == pytest.approx(0.094531, abs=1e-6)
    assert w["ci_high"] == pytest.approx(0.905469, abs=1e-6)
    # and the lower bound rises with the wins, a clean sweep included (the normal interval's did not)
    lows = [win_rate([1.0] * k + [0.0] * (20 - k))["ci_low"] for k in range(10, 21)]
    assert lows == sorted(lows) and len(set(lows)) == len(lows)
    assert mean_ci([1.0, 0.0])["ci_low"] == pytest.approx(0.5 - 0.979981992270027)  # the mean's is not


def test_one_value_has_no_interval():
    """One prompt says nothing of the spread: no interval of zero width (a mean's is NaN, a win
    rate's the whole [0, 1])."""
    s = mean_ci([0.7])
    assert s["mean"] == 0.7 and math.isnan(s["ci_low"]) and math.isnan(s["ci_high"]) and s["n"] == 1
    w = win_rate([0.5])
    assert (w["win_rate"], w["ci_low"], w["ci_high"]) == (0.5, 0.0, 1.0)
    w = win_rate([1.0, 0.0], per_prompt=2)  # two samples of one prompt: one unit
    assert (w["win_rate"], w["ci_low"], w["ci_high"], w["n"]) == (0.5, 0.0, 1.0, 1)


def test_mean_ci_by_hand():
    s = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert s["mean"] == 2.5
    assert s["ci_high"] - 2.5 == pytest.approx(1.959963984540054 * math.sqrt(5 / 3) / 2)


def test_pearson_by_hand():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # x = (1,2,3,4), y = (1,3,2,4): sxy = 4, sxx = syy = 5 -> 0.8
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))


def test_within_prompt_pearson_removes_prompt_effects():
    # Prompt 2 has longer and better answers overall, but within each prompt longer = worse.
    lengths = [10, 20, 110, 120]
    rewards = [1.0, 0.0, 11.0, 10.0]
    assert pearson(lengths, rewards) > 0.9
    assert within_group_pearson(lengths, rewards, n=2) == pytest.approx(-1.0)


def test_within_prompt_agreement_counts_the_pairs_the_judge_separates():
    # prompt 1: judge order 0 > 1 > 2, gold agrees on (0,1), (0,2), disagrees on (1,2) -> 2/3;
    # prompt 2: the judge ties (3,4) (not counted), gold ties (3,5) (one half), agrees on (4,5).
    judge = [3.0, 2.0, 1.0,   1.0, 1.0, 0.0]
    gold = [0.9, 0.1, 0.5,    0.2, 0.7, 0.2]
    assert within_group_agreement(judge, gold, n=3) == pytest.approx((1 + 1 + 0 + 0.5 + 1) / 5)
    assert within_group_agreement(judge, judge, n=3) == 1.0
    assert math.isnan(within_group_agreement([1.0, 1.0], [0.0, 1.0], n=2))


def test_gold_agreement_of_best_vs_worst_pairs():
    ranked = [0.9, 0.1, 0.5,   0.3, 0.8, 0.0]  # groups of 3: best/worst rows (0, 1) and (4, 5)
    gold = [0.2, 0.6, 0.4,     0.5, 0.9, 0.1]
    out = gold_agreement(ranked, gold, [(0, 0, 1), (1, 4, 5)], n=3)
    assert out["gold_pair_accuracy"] == 0.5  # gold disagrees on the first pair, agrees on the second
    assert out["gold_pair_margin"] == pytest.approx(((0.2 - 0.6) + (0.9 - 0.1)) / 2)
    assert out["gold_ranking_accuracy"] == pytest.approx(within_group_agreement(ranked, gold, 3))
    assert out["gold_mean"] == pytest.approx(sum(gold) / 6)
    assert math.isnan(gold_agreement(ranked, gold, [], n=3)["gold_pair_accuracy"])


def test_gold_pair_accuracy_counts_the_chosen_side():
    # gold prefers the chosen response of pair (0, 1) and ties pair (2, 3): (1 + 0.5) / 2, not (0 + 0.5) / 2
    out = gold_agreement([1.0, 0.0, 1.0, 0.0], [0.8, 0.2, 0.5, 0.5], [(0, 0, 1), (1, 2, 3)], n=2)
    assert out["gold_pair_accuracy"] == 0.75 and out["gold_pair_margin"] == pytest.approx(0.3)


def test_policy_labels():
    assert policy_label("runs/dpo/model") == ("dpo", "runs/dpo/model")
    assert policy_label("online=runs/x/iter-3/model") == ("online", "runs/x/iter-3/model")
    assert policy_label("smollm2-135m-instruct") == ("smollm2-135m-instruct", "smollm2-135m-instruct")


def test_table_shows_win_rate_with_ci():
    w = {"win_rate": 0.6, "ci_low": 0.55, "ci_high": 0.65, "n": 200}
    res = {"prompts": 200, "samples_per_prompt": 1,
           "baseline": {"gold_mean": {"mean": 0.1}, "length_tokens": 30.0},
           "policies": {"dpo": {"gold_mean": {"mean": 0.3}, "kl": {"mean": 2.0}, "length_tokens": 35.0,
                                "corr_length_gold": 0.2, "win_rate": {"gold": w, "pm:x": w}}}}
    table = format_table(res)
    assert "0.600 [0.550, 0.650]" in table and "win rate by pm:x" in table
    res["policies"]["a-policy-with-a-long-run-name"] = res["policies"]["dpo"]
    lines = format_table(res).splitlines()
    col = lines[1].index("win (gold)")  # each row's win-rate cell starts under the header's
    assert [(line[:col].rstrip(), line[col - 1], line[col] != " ") for line in lines[3:6]] == [
        ("baseline", " ", True), ("dpo", " ", True), ("a-policy-with-a-long-run-name", " ", True)], lines


def test_eval_of_a_policy_against_itself(tmp_path, tokenizer):
    """Same model, same seed: identical samples, so every judge gives exactly 0.5 and the KL is 0."""
    import json

    from rlhfkit.config import load_config
    from rlhfkit.eval.config import EvalConfig
    from rlhfkit.eval.policy_compare import run_eval
    from rlhfkit.models import tiny_causal_lm

    model_dir = tmp_path / "tiny"
    tiny_causal_lm(tokenizer, seed=5).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Say a word {i}"}) + "\n" for i in range(4)))
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(
        {"prompt": f"q{i}", "chosen": "long answer here", "rejected": "no", "category": c}) + "\n"
        for i, c in enumerate(["a", "a", "b", "b"])))
    (tmp_path / "rew.py").write_text("def reward(prompts, responses):\n    return [float(len(r)) for r in responses]\n")
    cfg = load_config(EvalConfig, overrides=[
        f"policies=[same={model_dir}]", f"baseline={model_dir}", f"prompts.train={tmp_path / 'prompts.jsonl'}",
        "rollout.n=2", "rollout.max_new_tokens=5", f"gold={tmp_path / 'rew.py'}:reward",
        f"judges=[judge:{model_dir}]", f"preference_set={tmp_path / 'prefs.jsonl'}",
        f"train.output_dir={tmp_path / 'eval'}"])
    res = run_eval(cfg)
    pol = res["policies"]["same"]
    for judge in ("gold", f"judge:{model_dir}"):
        assert pol["win_rate"][judge]["win_rate"] == 0.5 and pol["win_rate"][judge]["n"] == 4
    assert abs(pol["kl"]["mean"]) < 1e-4
    assert pol["gold_mean"]["mean"] == res["baseline"]["gold_mean"]["mean"]
    acc = res["preference_set"]
    assert acc["gold"]["accuracy"] == 1.0 and set(acc["gold"]["by_category"]) == {"a", "b"}
    assert "position_bias" in acc[f"judge:{model_dir}"]
    assert (tmp_path / "eval" / "eval_results.json").is_file() and (tmp_path / "eval" / "samples-same.jsonl").is_file()


def test_the_annotators_labels_of_a_policy_do_not_depend_on_the_policies_before_it():
    """The simulated annotator draws its labels from a seeded stream: each policy's comparisons
    (and the labelled set's) start that stream again, so the same samples get the same labels
    whatever was evaluated before them."""
    from types import SimpleNamespace

    from rlhfkit.eval.policy_compare import win_rates
    from rlhfkit.judges.preference import build_pairwise_judge

    judge = build_pairwise_judge("annotator:sentiment", seed=3)
    rows = [SimpleNamespace(messages=[{"role": "user", "content": f"Write about day {i}"}], fields={})
            for i in range(40)]
    # neutral replies: equal gold scores, so each label is a coin the annotator's stream tosses
    pol = {"rows": rows, "responses": [f"It is day {i}." for i in range(40)]}
    base = {"responses": [f"Day {i} it is." for i in range(40)]}
    judges = {"annotator": ("pair", judge)}
    first = win_rates(pol, base, judges, n=1)
    assert 0 < first["annotator"]["wins"] < 40  # coins, not a foregone verdict
    judge.compare(["x"] * 7, ["a day"] * 7, ["the day"] * 7)  # another policy compared in between
    assert win_rates(pol, base, judges, n=1) == first


def test_a_policy_with_another_tokenizer_is_refused_and_another_chat_template_said(tmp_path, tokenizer, caplog):
    """Every model is prompted and scored with the baseline's tokenizer: another vocabulary would
    make the KL compare other tokens (refused before anything is written); another chat template
    prompts the policy in a format it was not trained on (a warning)."""
    import json
    import shutil

    from rlhfkit.config import ConfigError, load_config
    from rlhfkit.eval.config import EvalConfig
    from rlhfkit.eval.policy_compare import run_eval
    from rlhfkit.models import tiny_causal_lm

    base = tmp_path / "base"
    tiny_causal_lm(tokenizer, seed=5).save_pretrained(base)
    tokenizer.save_pretrained(base)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Say a word {i}"}) + "\n" for i in range(2)))
    other_vocab, other_template = tmp_path / "vocab", tmp_path / "template"
    shutil.copytree(base, other_vocab)
    grown = copy_tokenizer(tokenizer)
    grown.add_tokens(["<rlhfkit-new-token>"])
    grown.save_pretrained(other_vocab)
    shutil.copytree(base, other_template)
    (other_template / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")

    def cfg(policy):
        return load_config(EvalConfig, overrides=[
            f"policies=[p={policy}]", f"baseline={base}", f"prompts.train={tmp_path / 'prompts.jsonl'}",
            "rollout.n=1", "rollout.max_new_tokens=2", f"train.output_dir={tmp_path / 'eval'}"])

    with pytest.raises(ConfigError, match=rf"policies: {other_vocab}'s tokenizer has another vocabulary than the "
                                          rf"baseline's \({base}\)"):
        run_eval(cfg(other_vocab))
    adapter = tmp_path / "adapter"  # an adapter saved without a tokenizer reads with its base's
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA",
                                                             "base_model_name_or_path": str(other_vocab)}))
    with pytest.raises(ConfigError, match=rf"policies: {adapter}'s tokenizer has another vocabulary"):
        run_eval(cfg(adapter))
    assert not (tmp_path / "eval").exists()
    with caplog.at_level("WARNING", logger="rlhfkit"):
        run_eval(cfg(other_template))
    assert f"policies: {other_template}'s chat template differs from the baseline's ({base})" in caplog.text


def copy_tokenizer(tokenizer):
    import copy

    return copy.deepcopy(tokenizer)


def test_heldout_nll_is_the_token_mean_nll_of_the_responses(tmp_path, tokenizer):
    import json

    import torch

    from rlhfkit.data import load_sft, tokenize_dataset
    from rlhfkit.eval.alignment_tax import heldout_nll
    from rlhfkit.models import tiny_causal_lm

    model = tiny_causal_lm(tokenizer, seed=2).eval()
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps({"prompt": f"Count to {i}", "response": "one two " * (i + 1)})
                                                + "\n" for i in range(5)))
    rows = load_sft(str(tmp_path / "sft.jsonl"))
    exs, _ = tokenize_dataset(tokenizer, rows, "sft", 128)
    total, count = 0.0, 0
    for ex in exs:  # one unpadded row at a time, plain cross-entropy
        ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]])
        logits = model(input_ids=ids).logits[0, :-1].detach()
        keep = labels[0, 1:] != -100
        total += float(torch.nn.functional.cross_entropy(logits[keep], labels[0, 1:][keep], reduction="sum"))
        count += int(keep.sum())
    assert heldout_nll(model, exs, tokenizer.pad_token_id, 2, "cpu") == pytest.approx(total / count, rel=1e-4)


def test_capability_exact_match_counts_the_verified_answers(tmp_path, tokenizer, monkeypatch):
    """The probe decodes greedily and counts the replies the task's verifier scores 1: with the
    decoded replies replaced by the right sum for the first and third of four prompts, a wrong one
    for the second and prose for the fourth, the exact match is 2/4, and 0 with none right."""
    from pg_utils import tiny_policy_dir
    from transformers import AutoModelForCausalLM

    from rlhfkit.eval import alignment_tax
    from rlhfkit.eval.alignment_tax import AlignmentTax, AlignmentTaxSection

    tax = AlignmentTax(AlignmentTaxSection(capability="task:arithmetic", limit=4, max_new_tokens=2), tokenizer,
                       batch_size=4, device="cpu")
    answers = [item.fields["reference"] for item in tax.items]
    model = AutoModelForCausalLM.from_pretrained(tiny_policy_dir(tokenizer, tmp_path / "p"))
    replies = [f"The answer is {answers[0]}.", str(int(answers[1]) + 1), answers[2], "I do not know."]
    monkeypatch.setattr(alignment_tax, "decode_responses", lambda exp, tok: [replies[i] for i in exp.prompt_index])
    assert tax.exact_match(model) == 0.5
    replies[0], replies[2] = "no", "none"
    assert tax.exact_match(model) == 0.0


def test_eval_reports_alignment_tax(tmp_path, tokenizer):
    """A policy whose next-token distribution is made over-confident models the SFT data worse:
    its held-out NLL rises, and the delta is policy - baseline. The arithmetic probe runs for both."""
    import json

    from pg_utils import tiny_policy_dir

    from rlhfkit.config import load_config
    from rlhfkit.eval.config import EvalConfig
    from rlhfkit.eval.policy_compare import run_eval

    base_dir = tiny_policy_dir(tokenizer, tmp_path / "base", seed=5, scale=1.0)
    peaked = tiny_policy_dir(tokenizer, tmp_path / "peaked", seed=5, scale=30.0)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Say a word {i}"}) + "\n" for i in range(2)))
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps({"prompt": f"Name colour {i}", "response": "red and blue"})
                                                + "\n" for i in range(6)))
    (tmp_path / "rew.py").write_text("def reward(prompts, responses):\n    return [float(len(r)) for r in responses]\n")
    cfg = load_config(EvalConfig, overrides=[
        f"policies=[peaked={peaked}]", f"baseline={base_dir}", f"prompts.train={tmp_path / 'prompts.jsonl'}",
        "rollout.n=1", "rollout.max_new_tokens=3", f"gold={tmp_path / 'rew.py'}:reward",
        f"alignment_tax.sft_data={tmp_path / 'sft.jsonl'}", "alignment_tax.capability=task:arithmetic",
        "alignment_tax.limit=4", "alignment_tax.max_new_tokens=4", f"train.output_dir={tmp_path / 'eval'}"])
    res = run_eval(cfg)
    base, pol = res["baseline"]["alignment_tax"], res["policies"]["peaked"]["alignment_tax"]
    assert pol["sft_nll"] > base["sft_nll"] + 1.0
    assert pol["sft_nll_delta"] == pytest.approx(pol["sft_nll"] - base["sft_nll"])
    for d in (base, pol):
        assert 0.0 <= d["capability_exact_match"] <= 1.0
    assert "capability_exact_match_delta" in pol
    from rlhfkit.eval.policy_compare import format_table

    table = format_table(res)
    assert f"peaked alignment tax: sft_nll {pol['sft_nll']:.3f} ({pol['sft_nll_delta']:+.3f})" in table
    assert "baseline alignment tax: sft_nll" in table
    assert res["alignment_tax"] == {"sft_data": str(tmp_path / "sft.jsonl"), "sft_examples": 4, "sft_truncated": 0,
                                    "sft_dropped": 0, "capability": "task:arithmetic", "capability_prompts": 4}
    # the HTML report of this evaluation shows the same numbers, before and after
    from rlhfkit.report import build_report
    from rlhfkit.report.sections import num

    page = build_report([tmp_path / "eval"]).read_text()
    tax = page[page.index("<h4>Alignment tax"):]
    tax = tax[:tax.index("</table>")]
    assert "baseline (before)" in tax and "peaked (after)" in tax and "n = 4 examples" in tax
    assert f"<b>{num(base['sft_nll'])}</b>" in tax and f"<b>{num(pol['sft_nll'])}</b>" in tax
    assert f"{pol['sft_nll_delta']:+.3f} vs baseline (worse)" in tax


def test_kl_to_baseline_equals_each_row_computed_alone(tokenizer):
    """Rows batched by length and cut to the columns they use give, per row, the KL of that row
    computed alone without padding: sum_t log pi(a_t) - log base(a_t) over its response."""
    import torch

    from rlhfkit.eval.policy_compare import kl_to_baseline
    from rlhfkit.models import tiny_causal_lm
    from rlhfkit.models.forward import causal_logprobs
    from rlhfkit.rollout import Experience

    base = tiny_causal_lm(tokenizer, seed=3).eval()
    g = torch.Generator().manual_seed(0)
    plen, rlen = [3, 7, 5, 2, 6, 4, 7], [4, 1, 6, 0, 2, 5, 3]  # a row with an empty response
    P, R, pad = max(plen), max(rlen), tokenizer.pad_token_id
    B = len(plen)
    prompt_ids, prompt_mask = torch.full((B, P), pad), torch.zeros(B, P, dtype=torch.long)
    resp_ids, resp_mask = torch.full((B, R), pad), torch.zeros(B, R, dtype=torch.long)
    for i, (p, r) in enumerate(zip(plen, rlen)):
        prompt_ids[i, P - p:] = torch.randint(10, 1000, (p,), generator=g)
        prompt_mask[i, P - p:] = 1
        resp_ids[i, :r] = torch.randint(10, 1000, (r,), generator=g)
        resp_mask[i, :r] = 1
    logprobs = torch.where(resp_mask.bool(), -torch.rand(B, R, generator=g) * 5, 0.0)
    exp = Experience(prompt_ids, prompt_mask, resp_ids, resp_mask, logprobs, resp_mask.any(-1),
                     torch.arange(B), pad_token_id=pad)
    want = []
    for i, (p, r) in enumerate(zip(plen, rlen)):
        if r == 0:
            want.append(0.0)
            continue
        ids = torch.cat([prompt_ids[i, P - p:], resp_ids[i, :r]])[None]
        with torch.no_grad():
            lp = causal_logprobs(base, ids, torch.ones_like(ids), keep_last=r)[0]
        want.append(float((logprobs[i, :r] - lp).sum()))
    for bs in (1, 3, 16):
        assert kl_to_baseline(base, exp, bs) == pytest.approx(want, abs=1e-4), bs


@pytest.mark.parametrize("policies, match", [
    (["x/ppo/model", "y/ppo/model"], r"y/ppo/model and x/ppo/model are both labelled 'ppo': name them"),
    (["baseline=x/ppo/model"], r"x/ppo/model and base/model are both labelled 'baseline'"),
    (["a/b=x/ppo/model"], r"label 'a/b' of x/ppo/model: it names the samples file"),  # found before any sampling
    (["..=x/ppo/model"], r"label '\.\.' of x/ppo/model"),
])
def test_two_policies_with_one_label_are_refused(policies, match):
    """A label names a table row and a samples file: a second policy of the same label would
    silently replace the first. Named, they both count."""
    from rlhfkit.config import ConfigError, load_config
    from rlhfkit.eval.config import EvalConfig

    with pytest.raises(ConfigError, match=match):
        load_config(EvalConfig, data={"policies": policies, "baseline": "base/model"})
    cfg = load_config(EvalConfig, data={"policies": ["a=x/ppo/model", "b=y/ppo/model"], "baseline": "base/model"})
    assert [policy_label(p)[0] for p in cfg.policies] == ["a", "b"]


@pytest.mark.parametrize("spec", ["pm:runs/pm", "judge:smollm2-135m-instruct", "annotator:sentiment"])
def test_a_pairwise_proxy_is_refused(spec):
    from rlhfkit.config import ConfigError, load_config
    from rlhfkit.eval.config import EvalConfig

    with pytest.raises(ConfigError, match=rf"proxy: {spec} is a pairwise judge; proxy is a pointwise reward"):
        load_config(EvalConfig, data={"policies": ["x/model"], "proxy": spec})
    assert load_config(EvalConfig, data={"policies": ["x/model"], "judges": [spec]}).judges == [spec]


def test_an_eval_directory_in_use_by_another_process_is_refused(tmp_path, tiny_model_dir):
    """Two evaluations writing one directory would mix their samples and results: while another
    process holds it, the second is refused before it samples anything; once it is released, the
    evaluation runs and releases it in turn."""
    from conftest import held_by_another_process

    from rlhfkit.config import ConfigError, load_config
    from rlhfkit.eval.config import EvalConfig
    from rlhfkit.eval.policy_compare import run_eval
    from rlhfkit.training.runlock import _HELD

    out = tmp_path / "eval"
    out.mkdir()
    cfg = load_config(EvalConfig, overrides=[
        f"policies=[a={tiny_model_dir}]", f"baseline={tiny_model_dir}", "prompts.limit=2", "rollout.n=1",
        "rollout.max_new_tokens=2", f"train.output_dir={out}"])
    with held_by_another_process(out) as holder:
        with pytest.raises(ConfigError, match=rf"{out} is in use by another rlhfkit process \(pid {holder.pid}\)"):
            run_eval(cfg)
        assert not (out / "eval_config.yaml").exists()
    assert run_eval(cfg)["policies"]["a"] and str(out.resolve()) not in _HELD


def test_an_eval_into_a_training_runs_directory_or_its_own_input_is_refused(tmp_path, tiny_model_dir):
    """An evaluation writes a directory of its own: into a training run's (a ppo_run.json there)
    the report would show it under the run's config; inside a policy's directory it would write
    into what it evaluates. Both refused in one line before anything is written."""
    import shutil

    from rlhfkit.config import ConfigError, load_config
    from rlhfkit.eval.config import EvalConfig
    from rlhfkit.eval.policy_compare import run_eval

    policy = tmp_path / "ppo" / "model"
    shutil.copytree(tiny_model_dir, policy)
    (tmp_path / "ppo" / "ppo_run.json").write_text("{}")
    common = [f"baseline={tiny_model_dir}", f"policies=[a={policy}]", "prompts.limit=2", "rollout.n=1",
              "rollout.max_new_tokens=2"]
    with pytest.raises(ConfigError, match=rf"^train\.output_dir: {tmp_path / 'ppo'} holds a run of `rlhfkit ppo` "
                                          r"\(ppo_run\.json\): write the evaluation into a directory of its own$"):
        run_eval(load_config(EvalConfig, overrides=[*common, f"train.output_dir={tmp_path / 'ppo'}"]))
    with pytest.raises(ConfigError, match=r"^train\.output_dir: .*ppo/model/eval is inside policies\[0\]"):
        run_eval(load_config(EvalConfig, overrides=[*common, f"train.output_dir={policy / 'eval'}"]))
    assert sorted(p.name for p in (tmp_path / "ppo").iterdir()) == ["model", "ppo_run.json"]
    assert sorted(p.name for p in policy.iterdir()) == sorted(p.name for p in tiny_model_dir.iterdir())


def test_a_second_eval_in_one_directory_replaces_the_first(tmp_path, tiny_model_dir):
    """Evaluating again into a directory replaces the earlier evaluation's results and samples:
    a policy it had that this one has not leaves no samples file for the report to pick up."""
    from rlhfkit.config import load_config
    from rlhfkit.eval.config import EvalConfig
    from rlhfkit.eval.policy_compare import run_eval

    out = tmp_path / "eval"
    common = [f"baseline={tiny_model_dir}", "prompts.limit=2", "rollout.n=1", "rollout.max_new_tokens=2",
              f"train.output_dir={out}"]
    run_eval(load_config(EvalConfig, overrides=[f"policies=[a={tiny_model_dir},b={tiny_model_dir}]", *common]))
    assert (out / "samples-b.jsonl").is_file()
    (out / "notes.txt").write_text("mine")
    results = run_eval(load_config(EvalConfig, overrides=[f"policies=[a={tiny_model_dir}]", *common]))
    assert list(results["policies"]) == ["a"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "eval_config.yaml", "eval_results.json", "eval_run.json", "notes.txt", "samples-a.jsonl",
        "samples-baseline.jsonl"]


def test_a_finished_evaluation_whose_inputs_changed_is_not_skipped_by_a_pipeline(tmp_path, tiny_model_dir, tokenizer):
    """eval_run.json records what was evaluated by content (prompts, baseline, policies, judges): a
    pipeline whose evaluation stage is done refuses to skip it when the prompts file was edited or
    a policy was retrained in place (it skipped it, keeping results of models and prompts no
    longer there), and skips it when nothing changed."""
    import shutil

    from conftest import write_jsonl

    from rlhfkit.config import ConfigError
    from rlhfkit.eval.policy_compare import run_eval
    from rlhfkit.models import save_pretrained_atomic, tiny_causal_lm
    from rlhfkit.pipeline import _check_unchanged

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say {w}"} for w in ("hi", "yes", "no")])
    policy = tmp_path / "ppo" / "model"
    shutil.copytree(tiny_model_dir, policy)
    cfg = _eval_cfg(tmp_path, tiny_model_dir, f"policies=[p={policy}]", f"prompts.train={prompts}")
    run_eval(cfg)
    out = tmp_path / "eval"
    assert json.loads((out / "eval_run.json").read_text())["kind"] == "eval"
    _check_unchanged("eval", out, cfg)  # nothing changed: skipped
    write_jsonl(prompts, [{"prompt": "Say hi"}])
    with pytest.raises(ConfigError, match=r"stage 'eval' finished with another config or inputs \(prompts\.train "
                                          r"content differs \(size \d+ -> \d+\)\)"):
        _check_unchanged("eval", out, cfg)
    write_jsonl(prompts, [{"prompt": f"Say {w}"} for w in ("hi", "yes", "no")])
    save_pretrained_atomic(tiny_causal_lm(tokenizer, seed=5), tokenizer, policy)  # retrained in place
    with pytest.raises(ConfigError, match=r"\(policies\[0\] content differs\)"):
        _check_unchanged("eval", out, cfg)


def test_results_files_are_strict_json(tmp_path):
    """eval_results.json's correlations are NaN when a side is constant: written as null, which
    jq and JSON.parse read (bare NaN is not JSON)."""
    import torch

    from rlhfkit.io import write_json_atomic

    write_json_atomic(tmp_path / "r.json", {"corr_length_gold": float("nan"), "x": [1.5, float("inf")],
                                            "t": torch.tensor(float("nan")), "n": 3})
    got = json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda c: pytest.fail(f"holds {c}"))
    assert got == {"corr_length_gold": None, "x": [1.5, None], "t": None, "n": 3}


def _eval_cfg(tmp_path, model_dir, *overrides):
    from rlhfkit.config import load_config
    from rlhfkit.eval.config import EvalConfig

    return load_config(EvalConfig, overrides=[f"policies=[p={model_dir}]", f"baseline={model_dir}", "prompts.limit=3",
                                              "rollout.n=1", "rollout.max_new_tokens=3",
                                              f"train.output_dir={tmp_path / 'eval'}", *overrides])


@pytest.mark.parametrize("case, match", [
    ("no reference", r"gold: prompts.train \(task:sentiment\): .*task:arithmetic.*'reference'"),
    ("bad reference", r"gold: prompts.train \(.*arbad.jsonl\): .*reference 'four' is not a number"),
    ("pairs", r"gold: task:arithmetic cannot score the pairs of preference_set .*pairs.jsonl"),
])
def test_a_task_judge_that_cannot_score_the_data_is_refused_before_anything_is_written(tmp_path, tiny_model_dir,
                                                                                       case, match):
    from rlhfkit.config import ConfigError
    from rlhfkit.eval.policy_compare import run_eval

    (tmp_path / "arbad.jsonl").write_text(json.dumps({"prompt": "What is 2 + 2?", "reference": "four"}) + "\n")
    pair = {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}
    (tmp_path / "pairs.jsonl").write_text(json.dumps(pair) + "\n")
    extra = {"no reference": ["prompts.train=task:sentiment"],
             "bad reference": [f"prompts.train={tmp_path / 'arbad.jsonl'}"],
             "pairs": ["prompts.train=task:arithmetic", f"preference_set={tmp_path / 'pairs.jsonl'}"]}[case]
    with pytest.raises(ConfigError, match=match):
        run_eval(_eval_cfg(tmp_path, tiny_model_dir, "gold=task:arithmetic", *extra))
    assert not (tmp_path / "eval").exists()


def test_the_annotator_judge_reads_the_records_fields_and_ties_identical_responses(tmp_path, tiny_model_dir):
    """annotator:arithmetic needs each prompt's reference; a policy against itself gives identical
    samples, which the annotator scores as ties (0.5), as every judge does."""
    from rlhfkit.eval.policy_compare import run_eval

    res = run_eval(_eval_cfg(tmp_path, tiny_model_dir, "prompts.train=task:arithmetic", "gold=task:arithmetic",
                             "judges=[annotator:arithmetic,annotator:sentiment]"))
    for judge in ("annotator:arithmetic", "annotator:sentiment"):
        assert res["policies"]["p"]["win_rate"][judge]["win_rate"] == 0.5


def test_annotator_judge_draws_labels_for_different_responses_only():
    from rlhfkit.judges.preference import build_pairwise_judge

    judge = build_pairwise_judge("annotator:arithmetic", seed=0)
    fields = [{"reference": "4"}, {"reference": "4"}, {"reference": "7"}]
    p = judge.compare(["2 + 2?", "2 + 2?", "3 + 4?"], ["4", "5", "7"], ["5", "5", "1"], fields=fields)
    assert p == [1.0, 0.5, 1.0] and judge.calls == 2  # beta 10 on a 0/1 gold: the right answer wins


@pytest.mark.parametrize("override, error, match", [
    ("alignment_tax.capability=task:sentiment", "ConfigError",
     r"alignment_tax.capability: task sentiment has no exact answer to match; a verifiable task is needed "
     r"\(task:arithmetic\)"),
    ("alignment_tax.capability=task:nope", "ConfigError", r"alignment_tax.capability: .*nope"),
    ("alignment_tax.capability=task:arithmetic/prompts_train.jsonl", "ConfigError", r"alignment_tax.capability: "),
    ("alignment_tax.max_new_tokens=-5", "ConfigError", r"alignment_tax.max_new_tokens: must be >= 1, got -5"),
    ("alignment_tax.sft_data=task:nope", "FileNotFoundError",
     r"alignment_tax.sft_data: task:nope: no built-in task 'nope' \(tasks with data: arithmetic, sentiment\)"),
    ("alignment_tax.sft_data=task:arithmetic", "FileNotFoundError",
     r"alignment_tax.sft_data: task:arithmetic: task arithmetic ships no sft.jsonl .*--out DIR"),
    ("preference_set=nope.jsonl", "FileNotFoundError", r"^preference_set: .*nope\.jsonl"),
    ("rollout.max_new_tokens=1000", "ValueError",
     r"baseline: prompts.max_prompt_length \+ rollout.max_new_tokens = \d+ tokens, more than the 1024 positions"),
])
def test_alignment_tax_settings_are_refused_naming_the_key(tmp_path, tiny_model_dir, override, error, match):
    from rlhfkit.config import ConfigError
    from rlhfkit.eval.policy_compare import run_eval

    errors = {"ConfigError": ConfigError, "FileNotFoundError": FileNotFoundError, "ValueError": ValueError}
    with pytest.raises(errors[error], match=match):
        run_eval(_eval_cfg(tmp_path, tiny_model_dir, override))
    assert not (tmp_path / "eval").exists()


def test_alignment_tax_counts_the_sft_rows_it_cut(tmp_path, tiny_model_dir):
    from rlhfkit.eval.policy_compare import run_eval

    rows = [{"prompt": "Name a colour", "response": "red " * 80}, {"prompt": "Name a fruit", "response": "apple"}]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = run_eval(_eval_cfg(tmp_path, tiny_model_dir, f"alignment_tax.sft_data={tmp_path / 'sft.jsonl'}",
                             "alignment_tax.max_length=64"))
    assert res["alignment_tax"]["sft_examples"] == 2 and res["alignment_tax"]["sft_truncated"] == 1


def test_eval_win_rate_of_a_different_policy_is_recounted_from_its_samples(tmp_path, tokenizer):
    """A policy that differs from the baseline: the gold win rate (gold = response length) is the
    share of samples i whose policy response is longer than the baseline's sample i (a tie one half),
    recounted from the two samples files; the pairwise judge's counts add up to the samples."""
    from rlhfkit.eval.policy_compare import run_eval
    from rlhfkit.models import tiny_causal_lm

    dirs = {}
    for name, seed in [("base", 5), ("other", 11)]:
        dirs[name] = tmp_path / name
        tiny_causal_lm(tokenizer, seed=seed).save_pretrained(dirs[name])
        tokenizer.save_pretrained(dirs[name])
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Say a word {i}"}) + "\n" for i in range(4)))
    (tmp_path / "rew.py").write_text("def reward(prompts, responses):\n    return [float(len(r)) for r in responses]\n")
    res = run_eval(_eval_cfg(tmp_path, dirs["base"], f"policies=[other={dirs['other']}]", "prompts.limit=0",
                             f"prompts.train={tmp_path / 'prompts.jsonl'}", "rollout.n=2", "rollout.max_new_tokens=6",
                             f"gold={tmp_path / 'rew.py'}:reward"))
    pol, base = ([json.loads(line) for line in (tmp_path / "eval" / f"samples-{name}.jsonl").open()]
                 for name in ("other", "baseline"))
    assert [r["prompt"] for r in pol] == [r["prompt"] for r in base] and len(pol) == 8
    votes = [1.0 if len(p["response"]) > len(b["response"]) else 0.5 if len(p["response"]) == len(b["response"])
             else 0.0 for p, b in zip(pol, base)]
    assert [p["gold"] for p in pol] == [float(len(p["response"])) for p in pol]
    w = res["policies"]["other"]["win_rate"]["gold"]
    assert sum(votes) != 4.0  # not a draw: swapping the policy and the baseline would change the win rate
    assert w["win_rate"] == pytest.approx(sum(votes) / 8) and w["n"] == 4
    assert (w["wins"], w["ties"], w["losses"]) == (votes.count(1.0), votes.count(0.5), votes.count(0.0))
    assert res["policies"]["other"]["length_chars"] == pytest.approx(sum(len(p["response"]) for p in pol) / 8)
    assert res["baseline"]["length_chars"] == pytest.approx(sum(len(b["response"]) for b in base) / 8)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.5])
def test_eval_kl_is_unbiased_for_the_sampled_distributions(tokenizer, temperature):
    """One-token responses sampled at T: the mean per-sample KL of `kl_to_baseline` estimates the
    exact KL(pi_T || base_T) = sum_v pi_T(v) (log pi_T(v) - log base_T(v)) of the next-token
    distributions (within 4 standard errors over 3000 samples per prompt), and the rollout records T."""
    import torch

    from rlhfkit.eval.policy_compare import kl_to_baseline
    from rlhfkit.models import tiny_causal_lm
    from rlhfkit.rollout import generate

    pol, base = tiny_causal_lm(tokenizer, seed=1).eval(), tiny_causal_lm(tokenizer, seed=2).eval()
    for m in (pol, base):  # sharper next-token distributions: a KL well above the estimator's noise
        m.lm_head.weight.data.mul_(3.0)
    prompts = [tokenizer.encode(t) for t in ("Hello there", "Tell me a story about")]
    n = 3000
    exp = generate(pol, prompts, max_new_tokens=1, eos_token_id=[], pad_token_id=tokenizer.pad_token_id,
                   temperature=temperature, n=n, seed=0)
    assert exp.temperature == temperature
    per_row = torch.tensor(kl_to_baseline(base, exp, 512))
    for i, p in enumerate(prompts):
        with torch.no_grad():
            lp, lq = ((m(input_ids=torch.tensor([p])).logits[0, -1].double() / temperature).log_softmax(-1)
                      for m in (pol, base))
        exact = float((lp.exp() * (lp - lq)).sum())
        est = per_row[i * n:(i + 1) * n].double()
        assert exact > 0.05 and abs(float(est.mean()) - exact) < 4 * float(est.std()) / n ** 0.5, (exact, est.mean())


def test_by_category_groups_only_when_there_are_several():
    """One rule for the RM trainer's per-category accuracy, its select_best check and `rlhfkit eval`:
    a missing category is "all", and a single category gets no figure of its own."""
    from rlhfkit.eval.preference_sets import by_category

    assert by_category([None, "b", "a", "b", ""], [1, 2, 3, 4, 5]) == {"a": [3], "all": [1, 5], "b": [2, 4]}
    assert list(by_category(["b", None, "a"], [0, 0, 0])) == ["a", "all", "b"]
    assert by_category(["a", "a"], [1, 0]) == {} and by_category([None, ""], [1, 0]) == {}
