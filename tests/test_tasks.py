"""Built-in tasks: prompt splits, gold judges, the simulated annotator and the data builder."""

from __future__ import annotations

import json
import re

import pytest

from rlhfkit.tasks import SimulatedAnnotator, get_task, list_tasks
from rlhfkit.tasks.annotator import agreement
from rlhfkit.tasks.arithmetic import check_answer, last_number


def test_registry():
    assert list_tasks() == ["arithmetic", "sentiment"]
    assert get_task("sentiment") is get_task("sentiment")
    with pytest.raises(ValueError, match="unknown task"):
        get_task("nope")


@pytest.mark.parametrize("name", ["sentiment", "arithmetic"])
def test_splits_are_disjoint_and_deterministic(name):
    task = get_task(name)
    train, held = task.train_prompts(), task.eval_prompts()
    assert len(held) >= 300
    tr, ev = {r["prompt"] for r in train}, {r["prompt"] for r in held}
    assert len(tr) == len(train) and len(ev) == len(held)  # no duplicates
    assert not tr & ev
    # Same seed, same order; another seed, another order of the same prompts.
    assert task.train_prompts(n=50, seed=3) == task.train_prompts(n=50, seed=3)
    assert task.train_prompts(n=50, seed=3) != task.train_prompts(n=50, seed=4)
    assert {r["prompt"] for r in task.eval_prompts(seed=9)} == ev
    # The split does not depend on the task instance (a fresh one gives the same held-out set).
    assert {r["prompt"] for r in type(task)().eval_prompts()} == ev
    assert all(isinstance(r["prompt"], str) and r["prompt"] and r["category"] for r in train + held)
    with pytest.raises(ValueError, match="asked for"):
        task.train_prompts(n=len(train) + 1)


def test_sentiment_prompts_are_varied():
    prompts = [r["prompt"] for r in get_task("sentiment").train_prompts()]
    assert len(prompts) >= 1000
    assert len({r["category"] for r in get_task("sentiment").train_prompts()}) >= 5


def test_vader_ranks_positive_above_negative():
    task = get_task("sentiment")
    pos, neu, neg = task.gold_scores(["Review a film."] * 3, [
        "What a wonderful film! The acting was brilliant and I loved every minute.",
        "The film is two hours long and was released in March.",
        "A terrible, boring film. The plot was awful and I hated it.",
    ])
    assert pos > 0.5 > neu > -0.5 > neg
    assert all(-1 <= s <= 1 for s in (pos, neu, neg))


@pytest.mark.parametrize("text,value", [
    ("42", 42), ("The answer is 42.", 42), ("12 + 30 = 42", 42), ("= -7", -7), ("It is -7.", -7),
    ("1,234", 1234), ("about 3-5 apples", 5), ("x = 2.50", 2.5), ("no number here", None),
    ("First 10, then 20", 20), ("\u22123", -3),
])
def test_last_number(text, value):
    assert last_number(text) == value


@pytest.mark.parametrize("response,score", [
    ("47", 1.0), ("12 + 35 = 47", 1.0), ("The answer is 47.", 1.0), ("47.0", 1.0),
    ("47 is not right, it is 48", 0.0), ("", 0.0), ("forty-seven", 0.0), ("-47", 0.0),
])
def test_arithmetic_checker(response, score):
    assert check_answer(response, "47") == score


def _sum_in(prompt: str) -> int:
    """a + b of an arithmetic prompt, read independently of the library."""
    m = re.fullmatch(r"What is (\d+) \+ (\d+)\? Answer with just the number\.", prompt)
    assert m, prompt
    return int(m.group(1)) + int(m.group(2))


def test_arithmetic_prompts_carry_their_answer():
    task = get_task("arithmetic")
    for r in task.train_prompts(n=200, seed=1) + task.eval_prompts(n=50):
        assert _sum_in(r["prompt"]) == int(r["reference"])


@pytest.mark.parametrize("name", ["prompts_train.jsonl", "prompts_eval.jsonl"])
def test_shipped_arithmetic_prompts_carry_their_reference(name):
    """The shipped files give every record its exact answer, which reaches reward functions."""
    from rlhfkit.data import load_prompts
    from rlhfkit.tasks import data_dir

    examples = load_prompts(str(data_dir("arithmetic") / name))
    assert len(examples) > 1000
    for ex in examples:
        assert ex.reference == str(_sum_in(ex.prompt[-1]["content"]))
        assert ex.reward_fields() == {"reference": ex.reference, "category": ex.meta["category"]}


def test_arithmetic_judge_reads_the_reference_not_the_prompt():
    task = get_task("arithmetic")
    prompts = ["What is 2 + 2? Answer with just the number."] * 4
    # the reference decides, whatever the prompt says (any prompts with references can be judged)
    assert task.gold_scores(prompts, ["5", "4", "= 5.0", "x"], reference=["5", "5", 5, "5"]) == [1.0, 0.0, 1.0, 0.0]
    # a record without a reference is not scored (None), not guessed from the prompt text
    assert task.gold_scores(prompts[:2], ["4", "4"], reference=[None, "4"]) == [None, 1.0]
    with pytest.raises(ValueError, match="needs the prompt records' 'reference' field"):
        task.gold_scores(prompts, ["4"] * 4)
    with pytest.raises(ValueError, match="reference 'four' is not a number"):
        task.gold_scores(prompts[:1], ["4"], reference=["four"])
    # as a reward source, the field arrives from the prompt records
    from rlhfkit.judges import build_reward_fn

    fn = build_reward_fn("task:arithmetic")
    rows = [{"reference": "4", "category": "no-carry"}, {"reference": "7"}]
    assert fn(prompts[:2], ["4", "4"], fields=rows) == [1.0, 0.0]


def test_arithmetic_labels_use_each_records_reference():
    """make-data's annotator judges a pair against its own record's reference."""
    from rlhfkit.tasks.build import _label_pairs, _Sample

    records = [{"prompt": "What is 1 + 1? Answer with just the number.", "reference": "2", "category": "no-carry"},
               {"prompt": "What is 9 + 9? Answer with just the number.", "reference": "18", "category": "carry"}]
    samples = [[_Sample("3", 0.0, True), _Sample("2", 1.0, True)], [_Sample("18", 1.0, True), _Sample("17", 0.0, True)]]
    rows = _label_pairs(records, samples, get_task("arithmetic"), beta=1e6, flip_prob=0.0, seed=0)
    assert [(r["chosen"], r["rejected"], r["gold_chosen"], r["gold_rejected"]) for r in rows] == [
        ("2", "3", 1.0, 0.0), ("18", "17", 1.0, 0.0)]


def _toy_gold(prompts, responses):
    return [float(len(r)) for r in responses]  # longer is better


def _pairs(n=2000):
    a1 = ["x" * (i % 7) for i in range(n)]
    a2 = ["x" * ((i * 3 + 1) % 7) for i in range(n)]
    return ["p"] * n, a1, a2


def test_annotator_beta_extremes():
    prompts, a1, a2 = _pairs()
    gold = [1 if len(x) > len(y) else 0 for x, y in zip(a1, a2)]
    decided = [i for i, (x, y) in enumerate(zip(a1, a2)) if len(x) != len(y)]
    sharp = SimulatedAnnotator(_toy_gold, beta=1e6, seed=0).label(prompts, a1, a2)
    assert all(sharp[i] == gold[i] for i in decided)
    coin = SimulatedAnnotator(_toy_gold, beta=0.0, seed=0).label(prompts, a1, a2)
    assert abs(sum(coin[i] == gold[i] for i in decided) / len(decided) - 0.5) < 0.05
    # Moderate beta: the agreement rate matches the Bradley-Terry probability.
    ann = SimulatedAnnotator(_toy_gold, beta=0.5, seed=1)
    labels = ann.label(prompts, a1, a2)
    expected = sum(max(p, 1 - p) for p in ann.prob_first([len(x) for x in a1], [len(y) for y in a2])) / len(a1)
    got = sum(0.5 if len(x) == len(z) else float(y == g) for y, g, x, z in zip(labels, gold, a1, a2)) / len(a1)
    assert abs(got - expected) < 0.03


def test_annotator_flip_prob_and_seed():
    prompts, a1, a2 = _pairs()
    sharp = SimulatedAnnotator(_toy_gold, beta=1e6, seed=0).label(prompts, a1, a2)
    flipped = SimulatedAnnotator(_toy_gold, beta=1e6, flip_prob=1.0, seed=0).label(prompts, a1, a2)
    decided = [i for i, (x, y) in enumerate(zip(a1, a2)) if len(x) != len(y)]
    assert all(flipped[i] == 1 - sharp[i] for i in decided)
    noisy = SimulatedAnnotator(_toy_gold, beta=1e6, flip_prob=0.2, seed=0).label(prompts, a1, a2)
    assert abs(sum(noisy[i] != sharp[i] for i in decided) / len(decided) - 0.2) < 0.03
    again = SimulatedAnnotator(_toy_gold, beta=1e6, flip_prob=0.2, seed=0).label(prompts, a1, a2)
    assert noisy == again
    with pytest.raises(ValueError):
        SimulatedAnnotator(_toy_gold, beta=1.0, flip_prob=1.5)


def test_ceiling_accuracy():
    ann = SimulatedAnnotator(_toy_gold, beta=1.0)
    assert ann.ceiling_accuracy(["p"] * 4, ["aa", "a", "aaa", "b"], ["a", "aa", "a", "c"]) == pytest.approx(2.5 / 4)
    assert agreement([1.0, 0.0], [0.0, 1.0]) == 0.5
    # The task-level annotator speaks the judges' interface.
    task_ann = get_task("sentiment").annotator(seed=0)
    assert task_ann.label(["p"], ["I love it, wonderful!"], ["I hate it, awful."]) == [1]


def test_build_task_data_with_tiny_model(tmp_path):
    from rlhfkit.data import load_preference, load_prompts, load_sft
    from rlhfkit.models import load_tokenizer, tiny_causal_lm
    from rlhfkit.tasks.build import build_task_data

    tok = load_tokenizer("smollm2-135m-instruct")
    model = tiny_causal_lm(tok, seed=0)
    kw = dict(seed=0, n_sft_prompts=4, n_pref_prompts=4, samples_per_prompt=3, max_new_tokens=6,
              temperature=1.0, annotator_beta=5.0, flip_prob=0.1, model=model, tokenizer=tok, progress=False)
    meta = build_task_data("sentiment", "tiny", tmp_path / "a", **kw)
    for f in ["sft.jsonl", "preference.jsonl", "prompts_train.jsonl", "prompts_eval.jsonl", "meta.json"]:
        assert (tmp_path / "a" / f).is_file()
    sft = [json.loads(x) for x in (tmp_path / "a" / "sft.jsonl").read_text().splitlines()]
    pref = [json.loads(x) for x in (tmp_path / "a" / "preference.jsonl").read_text().splitlines()]
    assert len(sft) == meta["counts"]["sft"] <= 4 and len(pref) == meta["counts"]["preference"] <= 4
    assert all(set(r) == {"prompt", "response"} and r["response"] for r in sft)
    assert all(set(r) == {"prompt", "chosen", "rejected", "category", "gold_chosen", "gold_rejected"} for r in pref)
    assert all(r["chosen"] != r["rejected"] for r in pref)
    # Every file passes the library's own validation.
    assert len(load_sft(str(tmp_path / "a" / "sft.jsonl"))) == len(sft)
    assert len(load_preference(str(tmp_path / "a" / "preference.jsonl"))) == len(pref)
    assert len(load_prompts(str(tmp_path / "a" / "prompts_eval.jsonl"))) == meta["counts"]["prompts_eval"]
    # SFT and preference prompts are disjoint training prompts.
    train = {json.loads(x)["prompt"] for x in (tmp_path / "a" / "prompts_train.jsonl").read_text().splitlines()}
    held = {json.loads(x)["prompt"] for x in (tmp_path / "a" / "prompts_eval.jsonl").read_text().splitlines()}
    assert {r["prompt"] for r in sft} <= train and {r["prompt"] for r in pref} <= train
    assert not {r["prompt"] for r in sft} & {r["prompt"] for r in pref} and not train & held
    assert meta["settings"]["annotator_beta"] == 5.0 and meta["seed"] == 0
    assert 0.0 <= meta["annotator_ceiling_accuracy"] <= 1.0 or meta["counts"]["preference"] == 0
    # Same seed, same bytes.
    build_task_data("sentiment", "tiny", tmp_path / "b", **kw)
    for f in ["sft.jsonl", "preference.jsonl", "prompts_train.jsonl"]:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_build_arithmetic_data_scores_with_references(tmp_path):
    """The best-of-n sampler and the annotator of make-data give the gold judge each record's
    reference (the arithmetic judge refuses to run without it)."""
    from rlhfkit.models import load_tokenizer, tiny_causal_lm
    from rlhfkit.tasks.build import build_task_data

    tok = load_tokenizer("smollm2-135m-instruct")
    meta = build_task_data("arithmetic", "tiny", tmp_path, seed=0, n_sft_prompts=2, n_pref_prompts=2,
                           samples_per_prompt=2, max_new_tokens=4, model=tiny_causal_lm(tok, seed=0), tokenizer=tok,
                           progress=False)
    assert meta["counts"]["samples"] == 2 * 2 + 2 * 2
    assert set(meta["gold"]["all_samples"]["quartiles"]) <= {0.0, 1.0}


def test_make_data_cli_parses_its_own_options(tmp_path, capsys):
    """`rlhfkit make-data --task ...` reaches the task builder (its options start with --)."""
    from rlhfkit.cli import main

    assert main(["make-data", "--task", "arithmetic", "--out", str(tmp_path), "--prompts-only"]) == 0
    assert "train" in capsys.readouterr().out
    train = (tmp_path / "prompts_train.jsonl").read_text().splitlines()
    evals = (tmp_path / "prompts_eval.jsonl").read_text().splitlines()
    assert train and evals and not set(train) & set(evals)


def test_build_preference_pairs_with_tiny_model(tmp_path):
    """--pairs-only: pairs on the preference slice of the training prompts (never the SFT
    prompts) or on held-out prompts; a new seed on the same prompts gives new samples."""
    from rlhfkit.data import load_preference
    from rlhfkit.models import load_tokenizer, tiny_causal_lm
    from rlhfkit.tasks.pairs import build_preference_pairs

    tok = load_tokenizer("smollm2-135m-instruct")
    model = tiny_causal_lm(tok, seed=0)
    kw = dict(max_new_tokens=6, model=model, tokenizer=tok, progress=False)
    task = get_task("sentiment")
    meta = build_preference_pairs("sentiment", "tiny", tmp_path / "ev", split="eval", n_prompts=3,
                                  pairs_per_prompt=2, seed=1, **kw)
    ev = [json.loads(x) for x in (tmp_path / "ev" / "preference.jsonl").read_text().splitlines()]
    assert len(ev) == meta["counts"]["preference"] == 6 - meta["counts"]["preference_dropped"]
    assert [r["prompt"] for r in ev][::2] == [r["prompt"] for r in task.eval_prompts(seed=0)[:3]][:len(ev) // 2]
    assert len(load_preference(str(tmp_path / "ev" / "preference.jsonl"))) == len(ev)
    assert meta["settings"]["split"] == "eval" and meta["seed"] == 1

    build_preference_pairs("sentiment", "tiny", tmp_path / "tr", split="train", n_prompts=4, skip=3, seed=2, **kw)
    tr = [json.loads(x) for x in (tmp_path / "tr" / "preference.jsonl").read_text().splitlines()]
    train = task.train_prompts(seed=0)
    assert {r["prompt"] for r in tr} <= {r["prompt"] for r in train[3:7]}
    build_preference_pairs("sentiment", "tiny", tmp_path / "tr3", split="train", n_prompts=4, skip=3, seed=3, **kw)
    assert (tmp_path / "tr" / "preference.jsonl").read_text() != (tmp_path / "tr3" / "preference.jsonl").read_text()
    with pytest.raises(ValueError, match="train prompts"):
        build_preference_pairs("sentiment", "tiny", tmp_path / "x", split="train", n_prompts=len(train), skip=1, **kw)


def test_preference_pairs_on_a_prompt_file(tmp_path):
    """--prompts: the pairs are sampled on the file's prompts in file order (here the shipped
    prompts unlike the task's own), labelled by the task's annotator, each keeping its category."""
    from rlhfkit.data import load_preference
    from rlhfkit.data.sources import task_data_dir
    from rlhfkit.models import load_tokenizer, tiny_causal_lm
    from rlhfkit.tasks.pairs import build_preference_pairs

    tok = load_tokenizer("smollm2-135m-instruct")
    ood = "task:sentiment/prompts_ood.jsonl"
    meta = build_preference_pairs("sentiment", "tiny", tmp_path / "ood", split="eval", n_prompts=4, pairs_per_prompt=2,
                                  prompts=ood, seed=1, max_new_tokens=6, model=tiny_causal_lm(tok, seed=0),
                                  tokenizer=tok, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "ood" / "preference.jsonl").read_text().splitlines()]
    shipped = [json.loads(x) for x in (task_data_dir("sentiment") / "prompts_ood.jsonl").read_text().splitlines()[:4]]
    assert rows and meta["settings"]["prompts"] == ood
    assert {(r["prompt"], r["category"]) for r in rows} <= {(r["prompt"], r["category"]) for r in shipped}
    assert not {r["prompt"] for r in rows} & {r["prompt"] for r in get_task("sentiment").eval_prompts(seed=0)}
    assert all(isinstance(r["gold_chosen"], float) for r in rows)
    assert len(load_preference(str(tmp_path / "ood" / "preference.jsonl"))) == len(rows)


@pytest.mark.parametrize("flags, message", [
    (["--pairs-only", "eval", "--n-pref-prompts", "100000"], "--n-pref-prompts: 100000 prompts"),
    (["--pairs-only", "train", "--pair-from", "1"], "--pair-from: must be >= 2"),
    (["--pairs-only", "train", "--pairs-per-prompt", "0"], "--pairs-per-prompt: must be >= 1"),
    (["--prompts", "task:sentiment/prompts_ood.jsonl"], "--prompts: a prompt file sets the prompts of --pairs-only"),
    (["--pairs-only", "eval", "--prompts", "task:sentiment/prompts_ood.jsonl", "--n-pref-prompts", "321"],
     "do not fit in the 320 prompts of task:sentiment/prompts_ood.jsonl"),
    (["--pairs-only", "eval", "--prompts", "{tmp}/missing.jsonl"], "missing.jsonl"),
    (["--pairs-only", "eval", "--prompts", "{tmp}/bad.jsonl"], "bad.jsonl:2: field 'prompt': expected a non-empty "
                                                                "string"),
])
def test_make_data_pairs_only_refuses_bad_settings_before_writing(tmp_path, capsys, flags, message):
    from rlhfkit.tasks.make_data import main

    (tmp_path / "bad.jsonl").write_text('{"prompt": "Write a poem."}\n{"prompt": ["a", "list"]}\n')
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    assert main(["--task", "sentiment", "--out", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err
    assert not (tmp_path / "out").exists()


def test_pick_two_pairs_highest_with_lowest_gold():
    from rlhfkit.tasks.build import _Sample
    from rlhfkit.tasks.pairs import _pick_two

    s = [_Sample(t, g, True) for t, g in [("a", 0.0), ("b", 1.0), ("c", 0.0), ("d", 1.0)]]
    assert [x.text for x in _pick_two(s)] == ["b", "a"]  # the first of the best, the first of the worst
    assert _pick_two([s[0], s[2], _Sample("e", 0.0, False)]) is None  # all equal: no informative pair
    assert [x.text for x in _pick_two(s[:2])] == ["a", "b"]  # two samples: both, in order


def test_arithmetic_pairs_are_correct_versus_wrong(tmp_path, monkeypatch):
    """pair_from > 2 on a 0/1 task pairs a correct with a wrong sample and drops prompts whose
    samples are all right or all wrong (the sampler is replaced by fixed answers)."""
    from rlhfkit.models import load_tokenizer, tiny_causal_lm
    from rlhfkit.tasks import pairs
    from rlhfkit.tasks.build import _Sample

    task = get_task("arithmetic")
    prompts = task.eval_prompts(seed=0)[:4]
    answers = [int(p["reference"]) for p in prompts]
    a0, a1, a2, a3 = answers
    texts = [[f"{a0 + 1}", f"It is {a0}.", f"{a0 - 10}", f"{a0}"],  # first correct vs first wrong
             [f"{a1 + 1}"] * 4, [f"{a2}"] * 4,  # all wrong, all right: dropped
             [f"{a3}", f"{a3}", f"{a3 + 2}", f"{a3}"]]

    class FixedSampler:
        def __init__(self, *a, **k):
            self.tokens = 0

        def __call__(self, records, n, desc):
            assert n == 4 and [r["prompt"] for r in records] == [p["prompt"] for p in prompts]
            out = []
            for rec, group in zip(records, texts):
                gold = task.gold_scores([rec["prompt"]] * n, group, reference=[rec["reference"]] * n)
                out.append([_Sample(t, g, True) for t, g in zip(group, gold)])
            return out

    monkeypatch.setattr(pairs, "_Sampler", FixedSampler)
    tok = load_tokenizer("smollm2-135m-instruct")
    meta = pairs.build_preference_pairs("arithmetic", "tiny", tmp_path, split="eval", n_prompts=4, pair_from=4,
                                        model=tiny_causal_lm(tok), tokenizer=tok, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "preference.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["gold_chosen"], r["gold_rejected"]) for r in rows] == [
        (prompts[0]["prompt"], 1.0, 0.0), (prompts[3]["prompt"], 1.0, 0.0)]
    assert rows[0]["chosen"] == f"It is {answers[0]}." and rows[0]["rejected"] == f"{answers[0] + 1}"
    assert meta["counts"]["preference_dropped"] == 2 and meta["annotator_ceiling_accuracy"] == 1.0


@pytest.mark.parametrize("flags, message", [
    (["--n-sft-prompts", "-3"], "--n-sft-prompts: must be >= 0, got -3"),
    (["--n-pref-prompts", "-3", "--pairs-only", "train"], "--n-pref-prompts: must be >= 0, got -3"),
    (["--samples-per-prompt", "0"], "--samples-per-prompt: must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
    (["--temperature", "0"], "--temperature: must be a finite number > 0"),
    (["--top-p", "0"], "--top-p: must be in (0, 1]"),
    (["--flip-prob", "2"], "--flip-prob: must be in [0, 1], got 2.0"),
    (["--annotator-beta", "-1"], "--annotator-beta: must be > 0"),
    (["--seed", "99999999999999999999"], "--seed: must be in [0, 2**32)"),
    (["--n-sft-prompts", "0", "--n-pref-prompts", "0"], "--n-sft-prompts + --n-pref-prompts: 0 + 0 must be between 1"),
    (["--n-sft-prompts", "1000", "--n-pref-prompts", "1000"], "--n-sft-prompts + --n-pref-prompts: 1000 + 1000"),
    (["--model", "/nonexistent/model-dir"], "model directory not found: /nonexistent/model-dir"),
    (["--prompts-only", "--pairs-only", "eval"], "--prompts-only and --pairs-only: choose one"),
    (["--pairs-only", "eval", "--prompt-seed", "-1"], "--prompt-seed: must be in [0, 2**32), got -1"),
    (["--prompts-only", "--out", ""], "--out: empty; name the directory the data is written to"),
])
def test_make_data_refuses_bad_flags_before_loading_or_writing(tmp_path, capsys, monkeypatch, flags, message):
    from rlhfkit.tasks import build, pairs
    from rlhfkit.tasks.make_data import main

    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # an empty --out wrote into the working directory

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(build, "load_causal_lm", no_load)
    monkeypatch.setattr(pairs, "load_causal_lm", no_load)
    assert main(["--task", "sentiment", "--out", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert not (tmp_path / "out").exists() and not any((tmp_path / "cwd").iterdir())


def test_make_data_replaces_earlier_output_only_with_overwrite(tmp_path, capsys):
    """An --out that holds make-data files is refused (a pairs-only run would put held-out pairs next
    to an earlier build's training data); with --overwrite only this run's files remain."""
    from rlhfkit.tasks.make_data import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "sft.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    (out / "notes.txt").write_text("mine")
    argv = ["--task", "arithmetic", "--out", str(out), "--prompts-only"]
    assert main(argv) == 2
    assert "--out: " in capsys.readouterr().err and (out / "sft.jsonl").is_file()
    assert main([*argv, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "notes.txt", "prompts_eval.jsonl",
                                                     "prompts_train.jsonl"]
    (tmp_path / "afile").write_text("x")
    assert main(["--task", "arithmetic", "--out", str(tmp_path / "afile"), "--prompts-only"]) == 2
    assert "--out: " in capsys.readouterr().err and (tmp_path / "afile").read_text() == "x"


def test_meta_json_of_an_empty_preference_set_is_strict_json(tmp_path):
    """No pair written (every pair's samples identical): the ceiling accuracy is null, not NaN."""
    from rlhfkit.models import load_tokenizer, tiny_causal_lm
    from rlhfkit.tasks.build import build_task_data

    tok = load_tokenizer("smollm2-135m-instruct")
    build_task_data("sentiment", "tiny", tmp_path, n_sft_prompts=1, n_pref_prompts=2, samples_per_prompt=1,
                    max_new_tokens=2, temperature=1e-6, model=tiny_causal_lm(tok, seed=0), tokenizer=tok,
                    progress=False)
    meta = json.loads((tmp_path / "meta.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in meta"))
    assert meta["counts"]["preference"] == 0 and meta["annotator_ceiling_accuracy"] is None


@pytest.mark.parametrize("beta", [float("inf"), 2.0])
def test_annotator_prob_of_equal_gold_scores_is_one_half(beta):
    from rlhfkit.tasks.annotator import SimulatedAnnotator

    ann = SimulatedAnnotator(lambda p, r: [0.0] * len(r), beta=beta)
    tie, higher, lower = ann.prob_first([0.3, 1.0, 0.0], [0.3, 0.0, 1.0])
    assert tie == 0.5
    assert (higher, lower) == ((1.0, 0.0) if beta == float("inf") else (pytest.approx(0.8808, abs=1e-4),
                                                                        pytest.approx(0.1192, abs=1e-4)))
