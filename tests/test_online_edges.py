"""Online DPO at its edges: scores that tie only up to rounding, the simulated annotator across a
resume, the scorer checked against the held-out prompts, a reward file that exits, and what RSFT's
gold agreement measures."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from rlhfkit.algos.selection import build_pairs, length_penalised
from rlhfkit.cli import main
from rlhfkit.config import load_config
from rlhfkit.trainers.online_dpo import OnlineDPOConfig, train_online_dpo
from rlhfkit.trainers.online_samples import Samples, score_and_write


def _groups(n: int, lam: int):
    """Groups of n (score in hundredths, length): half of them built to tie exactly once penalised."""
    tie = st.tuples(st.integers(-300, 300), st.lists(st.integers(1, 40), min_size=n, max_size=n)).map(
        lambda t: [(t[0] + lam * length, length) for length in t[1]])
    free = st.lists(st.tuples(st.integers(-300, 300), st.integers(1, 40)), min_size=n, max_size=n)
    return st.lists(st.one_of(tie, free), min_size=1, max_size=4).map(lambda gs: [r for g in gs for r in g])


@settings(max_examples=300, deadline=None)
@given(st.tuples(st.integers(2, 5), st.integers(0, 5)).flatmap(lambda t: st.tuples(st.just(t[0]), st.just(t[1]),
                                                                                    _groups(*t))))
def test_pairs_of_length_penalised_scores_agree_with_exact_arithmetic(case):
    """Scores with two decimals and a penalty per character (as a judge's and a config's): a group
    whose exact best and worst tie is dropped (the float difference is a last-bit one), any other is
    kept with its chosen exactly above its rejected."""
    n, lam, rows = case
    scores, responses = [s / 100 for s, _ in rows], [f"{i}" + "x" * (length - 1) for i, (_, length) in enumerate(rows)]
    pairs, counts = build_pairs(length_penalised(scores, responses, lam / 100), responses, n)
    exact = [Fraction(s, 100) - Fraction(lam, 100) * len(r) for (s, _), r in zip(rows, responses)]
    kept = {g: (b, w) for g, b, w in pairs}
    for g in range(len(rows) // n):
        group = exact[g * n:(g + 1) * n]
        if max(group) == min(group):
            assert g not in kept
        else:
            assert g in kept and exact[kept[g][0]] > exact[kept[g][1]]
    assert counts["ties"] == sum(1 for g in range(len(rows) // n) if len(set(exact[g * n:(g + 1) * n])) == 1)


def test_a_cut_preferred_reply_that_ties_is_dropped_not_turned():
    """missing_eos_penalty 1 on the annotator's 1 / 0 with a length penalty: the cut reply's 1 - 1
    ties the other's 0 (configuration.md), and the tie must not become a pair the other way round."""
    ranked = length_penalised([1.0, 0.0], ["a", "b"], 0.01)
    ranked[0] -= 1.0
    assert build_pairs(ranked, ["a", "b"], 2) == ([], {"identical": 0, "ties": 1, "empty": 0})


def _setup(tmp_path, tokenizer) -> list[str]:
    from rlhfkit.models import tiny_causal_lm

    model_dir = tmp_path / "tiny"
    tiny_causal_lm(tokenizer, seed=3).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Write a line about day {i}"}) + "\n"
                                                    for i in range(8)))
    return [f"model.name={model_dir}", f"prompts.train={tmp_path / 'prompts.jsonl'}", "scorer=annotator:sentiment",
            "prompts_per_iteration=4", "rollout.n=3", "rollout.max_new_tokens=6", "train.batch_size=2",
            "train.micro_batch_size=2", "train.max_steps=1", "train.drop_last=false", "train.progress=false"]


def test_the_annotators_labels_of_an_iteration_are_the_same_after_a_resume(tmp_path, tokenizer):
    """The simulated annotator draws iteration k's labels from stream k of its seed: a run continued
    after iteration 1 labels iteration 2 as a run that never stopped (it used to draw iteration 1's
    labels again)."""
    args = _setup(tmp_path, tokenizer)
    train_online_dpo(load_config(OnlineDPOConfig, overrides=[*args, "iterations=2", f"train.output_dir={tmp_path / 'a'}"]))
    train_online_dpo(load_config(OnlineDPOConfig, overrides=[*args, "iterations=1", f"train.output_dir={tmp_path / 'b'}"]))
    train_online_dpo(load_config(OnlineDPOConfig, overrides=[*args, "iterations=2", "train.resume=true",
                                                             f"train.output_dir={tmp_path / 'b'}"]))

    def scored(run):
        rows = [json.loads(line) for line in (tmp_path / run / "iter-2" / "samples.jsonl").read_text().splitlines()]
        return [(r["response"], r["score"]) for r in rows]

    assert scored("a") == scored("b")
    assert len({s for _, s in scored("a")}) > 1  # labels that vary: the comparison says something


def test_a_pointwise_scorer_is_checked_on_the_held_out_prompts_before_the_run(tmp_path, tiny_model_dir, capsys):
    """task:arithmetic needs each prompt's reference: held-out prompts without one are refused in
    one line naming prompts.eval, before a model loads or the run directory is written."""
    src = Path(__file__).resolve().parents[1] / "src" / "rlhfkit" / "tasks" / "data" / "arithmetic" / "prompts_eval.jsonl"
    rows = [json.loads(line) for line in src.read_text().splitlines()[:4]]
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "reference"}) + "\n" for r in rows))
    assert main(["online-dpo", f"model.name={tiny_model_dir}", "prompts.train=task:arithmetic",
                 "scorer=task:arithmetic", f"prompts.eval={held}", f"train.output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "prompts.eval" in err and "reference" in err, err
    assert not (tmp_path / "run").exists()


def test_a_reward_file_that_exits_as_it_loads_is_one_line(tmp_path, capsys):
    (tmp_path / "script.py").write_text("import sys\nsys.exit(3)\ndef reward(prompts, responses):\n    return []\n")
    code = main(["grpo", "model.name=smollm2-135m-instruct", f"reward.spec={tmp_path / 'script.py'}:reward",
                 f"train.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "called sys.exit(3)" in err and "__main__" in err, err


def test_rsft_gold_agreement_is_measured_on_the_groups_it_trains_on(tmp_path):
    """RSFT keeps a group's best response only when it clears rsft_min_score: gold_pair_accuracy
    is over the kept groups' best against their worst, not over every group."""

    class Fixed:  # scores and gold of 3 groups of 2: only group 0 clears the threshold
        def score(self, rows, responses, n):
            return [0.9, 0.1, 0.3, 0.2, 0.4, 0.0], {"labels": 6, "judge_calls": 6}

        def gold_scores(self, rows, responses):
            return [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]  # gold agrees in group 0, disagrees in groups 1 and 2

    cfg = SimpleNamespace(rollout=SimpleNamespace(n=2), length_penalty=0.0, missing_eos_penalty=None, mode="rsft",
                          tie_tolerance=0.0, rsft_min_score=0.5, rsft_top_fraction=1.0)
    items = [SimpleNamespace(messages=[{"role": "user", "content": f"p{g}"}], ids=[1, 2], text=f"p{g}", fields={})
             for g in range(3)]
    samples = Samples(["a", "b", "c", "d", "e", "f"], [True] * 6, [[5]] * 6)
    stats: dict = {}
    score_and_write(cfg, items, samples, stats, Fixed(), tmp_path, tmp_path / "best.jsonl")
    assert stats["pairs"] == 1 and stats["gold_pair_accuracy"] == 1.0 and stats["gold_pair_margin"] == 1.0
    assert stats["gold_ranking_accuracy"] == 1 / 3  # the ranking itself, over every group


def test_a_model_judge_warns_once_when_a_question_is_past_its_positions(tokenizer, caplog):
    """judge:MODEL / pm:DIR read past their positions give verdicts on what they never saw: said once."""
    from rlhfkit.judges.preference import PairwiseJudge
    from rlhfkit.models import tiny_causal_lm

    judge = PairwiseJudge(tiny_causal_lm(tokenizer), tokenizer, name="judge:tiny")
    with caplog.at_level("WARNING", logger="rlhfkit"):
        judge.prob_first(["Say hi"], ["hi"], ["hello"])
        assert "positions" not in caplog.text
        for _ in range(2):
            judge.prob_first(["Say hi"], ["hi " * 1500], ["hello"])
    assert caplog.text.count(f"judge:tiny: an A/B question of") == 1 and "judge's 1024 positions" in caplog.text
