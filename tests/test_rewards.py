"""Reward sources (rm:, task:, module:function, file.py:function, callables), prompt-record fields
passed by signature, and the validator's errors."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from rlhfkit.judges import (
    RewardFn,
    RewardFunctionError,
    RewardSpecError,
    build_reward_fn,
)


def test_module_function(reward_module):
    fn = build_reward_fn("my_rewards:length")
    assert isinstance(fn, RewardFn)
    assert fn(["p", "q"], ["abc", ""]) == [3.0, 0.0]
    assert build_reward_fn("my_rewards:as_tensor")(["p"], ["x"]) == [1.0]


def test_file_function(reward_module):
    fn = build_reward_fn(f"{reward_module / 'my_rewards.py'}:length")
    assert fn(["p"], ["four"]) == [4.0]


@pytest.mark.parametrize("name, message", [
    ("too_few", "returned 1 scores for 2 responses"),
    ("too_many", "returned 3 scores for 2 responses"),
    ("boom", "raised KeyError: 'missing label'"),
    ("has_nan", "returned nan at index 0 (must be finite; return None for a response it cannot score)"),
    ("has_inf", "returned inf at index 1 (must be finite;"),
    ("minus_inf", "returned -inf at index 0 (must be finite;"),
    ("strings", "returned a non-number at index 0: str 'good'"),
    ("scalar", "must return a list of 2 numbers, got float"),
    ("nothing", "must return a list of 2 numbers, got NoneType"),
    ("flags", "returned a bool at index 0 (False): return a number"),
    ("bool_tensor", "returned a bool at index 0 (True)"),
    ("some_none", "returned None (cannot score) for response 0 (1 of 2)"),
])
def test_validator_names_the_function(reward_module, name, message):
    fn = build_reward_fn(f"my_rewards:{name}")
    with pytest.raises(RewardFunctionError) as e:
        fn(["p", "q"], ["a", "b"])
    assert f"my_rewards:{name}" in str(e.value)
    assert message in str(e.value)


def test_bad_specs(reward_module, tmp_path):
    with pytest.raises(ValueError, match="no function"):
        build_reward_fn("my_rewards:nope")
    with pytest.raises(ValueError, match="cannot import"):
        build_reward_fn("no_such_module_xyz:f")
    with pytest.raises(FileNotFoundError):
        build_reward_fn(str(tmp_path / "missing.py") + ":f")
    with pytest.raises(ValueError, match="empty"):
        build_reward_fn("")
    with pytest.raises(FileNotFoundError, match="no reward model"):
        build_reward_fn(f"rm:{tmp_path}")


def test_rm_source_scores_chat_rendering(tokenizer, tmp_path):
    """rm:DIR loads a saved *ForSequenceClassification dir (run dir or its model/) and scores exactly
    what the RM trainer trains on: prompt + reply up to end-of-turn, read at the last token."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rlhfkit.data import PreferenceExample, tokenize_preference
    from rlhfkit.models import save_pretrained_atomic, sequence_scores

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForSequenceClassification(config).eval()
    save_pretrained_atomic(model, tokenizer, tmp_path / "run" / "model")
    fn = build_reward_fn(f"rm:{tmp_path / 'run'}", batch_size=2)

    messages = [[{"role": "user", "content": "Say something nice."}], [{"role": "user", "content": "Hi"}]]
    responses = ["You are great!", "Hello there, friend."]
    got = fn(["Say something nice.", "Hi"], responses, messages=messages)

    for msgs, resp, score in zip(messages, responses, got):
        feats = tokenize_preference(tokenizer, PreferenceExample(msgs, resp, "x"), 512)
        ids = torch.tensor([feats["prompt_ids"] + feats["chosen_ids"]])
        with torch.no_grad():
            want = sequence_scores(model, ids, torch.ones_like(ids))
        assert math.isclose(score, float(want), rel_tol=1e-5, abs_tol=1e-5)
    # without messages= the prompts are taken as single user turns: same result here
    assert fn(["Say something nice.", "Hi"], responses) == pytest.approx(got, abs=1e-5)


def test_rm_scores_come_back_in_input_order_whatever_the_batching(tokenizer, tmp_path):
    """Rows are batched by length: each score still lands on its own row, and equals the row
    scored alone (batch of one, no padding)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rlhfkit.models import save_pretrained_atomic

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    save_pretrained_atomic(LlamaForSequenceClassification(config).eval(), tokenizer, tmp_path / "run" / "model")
    prompts = ["Hi", "Tell me a long story about a dragon and a knight.", "Why?", "Name a colour.", "Go"]
    responses = ["A" * 60, "ok", "Because the sky is blue and the sea is wide.", "red", "Fine, " * 12]
    alone = build_reward_fn(f"rm:{tmp_path / 'run'}", batch_size=1)
    want = [alone([p], [r])[0] for p, r in zip(prompts, responses)]
    assert len(set(want)) == len(want)  # distinct scores, so a misplaced one shows
    for bs in (2, 3, 16):
        got = build_reward_fn(f"rm:{tmp_path / 'run'}", batch_size=bs)(prompts, responses)
        assert got == pytest.approx(want, abs=1e-5), bs


def test_rm_rejects_a_causal_lm(tokenizer, tmp_path, tiny_model):
    from rlhfkit.models import save_pretrained_atomic

    save_pretrained_atomic(tiny_model, tokenizer, tmp_path / "lm")
    with pytest.raises(ValueError, match="not a reward model"):
        build_reward_fn(f"rm:{tmp_path / 'lm'}")


def test_task_source():
    fn = build_reward_fn("task:sentiment")
    good, bad = fn(["Review a film."] * 2, ["A wonderful, delightful, great film!", "Awful, terrible, bad."])
    assert good > bad


def test_reward_errors_in_training_name_the_function(tokenizer, tmp_path):
    """A reward function that fails mid-run stops PPO at its first call, before any update,
    with the function's spec in the message (not a bare traceback from inside the trainer)."""
    from pg_utils import base_config

    from rlhfkit.config import load_config
    from rlhfkit.trainers.ppo import PPOConfig, train_ppo

    (tmp_path / "bad_reward.py").write_text("def score(prompts, responses):\n    return [len(r) for r in responses[1:]]\n")
    spec = f"{tmp_path / 'bad_reward.py'}:score"
    cfg = load_config(PPOConfig, data=base_config(
        tmp_path, tokenizer, reward={"spec": spec}, critic_init="policy", rollout={"n": 2, "max_new_tokens": 4},
        train={"max_steps": 2, "save_every": 1}, ppo_epochs=1))
    with pytest.raises(RewardFunctionError, match=r"reward function score \(.*bad_reward\.py:score\) returned 15 "
                                                  r"scores for 16 responses"):
        train_ppo(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "model").exists()


def test_cli_reports_a_failing_reward_function_in_one_line(tokenizer, tmp_path, capsys):
    """From the command line the same error is one message naming the function, exit code 2."""
    import yaml
    from pg_utils import base_config

    from rlhfkit.cli import main

    (tmp_path / "bad_reward.py").write_text("def score(prompts, responses):\n    raise KeyError('label')\n")
    spec = f"{tmp_path / 'bad_reward.py'}:score"
    cfg = base_config(tmp_path, tokenizer, reward={"spec": spec}, critic_init="policy",
                      rollout={"n": 2, "max_new_tokens": 4}, train={"max_steps": 1}, ppo_epochs=1)
    (tmp_path / "ppo.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["ppo", "--config", str(tmp_path / "ppo.yaml")]) == 2
    err = capsys.readouterr().err
    assert "rlhfkit ppo: error: reward function" in err and "bad_reward.py:score" in err and "KeyError" in err
    assert "Traceback" not in err


def test_bad_reward_specs_fail_before_any_model_loads(tmp_path, monkeypatch, tokenizer):
    import transformers
    from pg_utils import base_config

    from rlhfkit.config import load_config
    from rlhfkit.trainers.ppo import PPOConfig, train_ppo

    def loaded(*a, **k):
        raise AssertionError("a model was loaded before the reward spec was checked")

    (tmp_path / "r.py").write_text("def score(prompts, responses):\n    return [0.0 for _ in responses]\n")
    cfg = base_config(tmp_path, tokenizer, critic_init="policy", rollout={"n": 2})  # writes the policy before the patch
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", loaded)
    for spec, error, match in [(f"{tmp_path / 'r.py'}:scor", ValueError, r"r\.py.*no function 'scor'"),
                               (f"{tmp_path / 'nope.py'}:score", FileNotFoundError, r"nope\.py"),
                               ("no_such_module_xyz:score", ValueError, r"cannot import module 'no_such_module_xyz'"),
                               ("tsk:sentiment", ValueError, r"module 'tsk'.*; did you mean task:sentiment\?")]:
        with pytest.raises(error, match=match):
            train_ppo(load_config(PPOConfig, data={**cfg, "reward": {"spec": spec}}))


# --------------------------------------------------------------------------- fields by signature

PROMPTS, RESPONSES = ["p1", "p2"], ["4", "five"]
ROWS = [{"reference": "4", "id": 1}, {"reference": "5", "level": "hard"}]  # `level` only in the second record


def test_fields_reach_the_parameters_that_name_them():
    seen = {}

    def two(prompts, responses):
        return [0.0] * len(responses)

    def named(prompts, responses, reference):
        seen["named"] = reference
        return [float(r == ref) for r, ref in zip(responses, reference)]

    def optional(prompts, responses, level=None, missing="default"):
        seen["optional"] = (level, missing)
        return [0.0] * len(responses)

    def everything(prompts, responses, **fields):
        seen["everything"] = fields
        return [0.0] * len(responses)

    def conversations(prompts, responses, messages, reference):
        seen["conversations"] = messages
        return [0.0] * len(responses)

    assert build_reward_fn(two)(PROMPTS, RESPONSES, fields=ROWS) == [0.0, 0.0]
    assert build_reward_fn(named)(PROMPTS, RESPONSES, fields=ROWS) == [1.0, 0.0]
    assert seen["named"] == ["4", "5"]
    build_reward_fn(optional)(PROMPTS, RESPONSES, fields=ROWS)
    assert seen["optional"] == ([None, "hard"], "default")  # aligned with the responses, None where absent
    build_reward_fn(everything)(PROMPTS, RESPONSES, fields=ROWS)
    assert seen["everything"] == {"reference": ["4", "5"], "id": [1, None], "level": [None, "hard"]}
    # columns work as well as rows
    build_reward_fn(everything)(PROMPTS, RESPONSES, fields={"reference": ("4", "5")})
    assert seen["everything"] == {"reference": ["4", "5"]}
    msgs = [[{"role": "system", "content": "S"}, {"role": "user", "content": p}] for p in PROMPTS]
    build_reward_fn(conversations)(PROMPTS, RESPONSES, messages=msgs, fields=ROWS)
    assert seen["conversations"] == msgs
    build_reward_fn(conversations)(PROMPTS, RESPONSES, fields=ROWS)  # default: the prompt as one user turn
    assert seen["conversations"] == [[{"role": "user", "content": "p1"}], [{"role": "user", "content": "p2"}]]


def test_a_field_of_the_prompt_set_reaches_every_batch(tmp_path):
    """docs/rewards.md's brevity(prompts, responses, max_words=None) zips over max_words: a batch
    in which no record has the field must still pass it, as a list of None (not the default)."""
    from rlhfkit.data import load_prompts

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "17 + 25?", "reference": "42"}\n{"prompt": "1 + 1?", "reference": "2"}\n'
                    '{"prompt": "A haiku about rain.", "max_words": 17}\n')
    examples = load_prompts(str(path))
    seen = []

    def brevity(prompts, responses, max_words=None):
        seen.append(max_words)
        return [None if m is None else -max(0, len(r.split()) - m) / m for r, m in zip(responses, max_words)]

    def exact(prompts, responses, reference):
        return [None if ref is None else float(r.strip() == ref) for r, ref in zip(responses, reference)]

    from rlhfkit.judges import build_reward_set

    rewards = build_reward_set([exact, {"spec": brevity, "weight": 0.1}])
    first_two = [ex.reward_fields() for ex in examples[:2]]
    assert rewards(["a", "b"], ["42", "3"], fields=first_two) == [1.0, 0.0]
    assert seen[-1] == [None, None]
    assert examples[2].reward_fields() == {"reference": None, "max_words": 17}


def test_the_docs_reward_functions_run_on_a_prompt_set_without_their_fields():
    """docs/rewards.md's my_rewards.py, as written there, next to a task whose prompt records have
    no max_words (the doc's own "Several rewards" example combines it with task:arithmetic): the
    field is not passed, and brevity judges none of the responses instead of raising."""
    import re

    from rlhfkit.judges import build_reward_set

    doc = (Path(__file__).resolve().parents[1] / "docs" / "rewards.md").read_text()
    code = re.search(r"```python\n# my_rewards\.py\n(.*?)```", doc, re.S).group(1)
    module: dict = {}
    exec(compile(code, "my_rewards.py", "exec"), module)
    rows = [{"reference": "42"}, {"reference": "2"}]  # an arithmetic prompt set: no max_words anywhere
    out = build_reward_set([module["exact"], {"spec": module["brevity"], "weight": 0.1}]).score(
        ["17 + 25?", "1 + 1?"], ["42", "3"], fields=rows)
    assert out.combined.tolist() == [1.0, 0.0]
    assert torch.isnan(out.per_function[:, 1]).all()  # brevity judged none of them


def test_fields_errors():
    def named(prompts, responses, reference):
        return [0.0] * len(responses)

    with pytest.raises(RewardFunctionError, match=r"reward function named .*needs the field 'reference', which the "
                                                  r"prompt records do not have \(their fields: id\)"):
        build_reward_fn(named)(PROMPTS, RESPONSES, fields=[{"id": 1}, {"id": 2}])
    with pytest.raises(RewardFunctionError, match=r"their fields: none"):
        build_reward_fn(named)(PROMPTS, RESPONSES)
    with pytest.raises(ValueError, match=r"prompts and responses are lists \(one prompt per response\), got a string"):
        build_reward_fn(named)("p1", "a response")
    with pytest.raises(ValueError, match="3 rows for 2 responses"):
        build_reward_fn(named)(PROMPTS, RESPONSES, fields=ROWS + ROWS[:1])
    with pytest.raises(ValueError, match="field 'reference': expected a list of 2 values"):
        build_reward_fn(named)(PROMPTS, RESPONSES, fields={"reference": "4"})
    with pytest.raises(ValueError, match="field 'responses' is reserved"):
        build_reward_fn(named)(PROMPTS, RESPONSES, fields={"reference": ["4", "5"], "responses": [1, 2]})
    with pytest.raises(RewardSpecError, match=r"reward function one \(.*<lambda>\) must take \(prompts, "
                                              r"responses, ...\) or TRL's \(completions, ...\); its signature is "
                                              r"\(responses\)"):
        build_reward_fn(lambda responses: [], name="one")


def test_trl_reward_functions_get_the_completions_by_name():
    """TRL's reward functions take ``completions`` (and ``prompts``, and dataset columns) by name:
    called so, each argument lands where its name says. A function taking (prompts, responses) by
    position under names the other way round is refused, not fed the prompts as its responses."""
    seen = {}

    def accuracy(completions, reference, **kwargs):
        seen["accuracy"] = (completions, reference, sorted(kwargs))
        return [float(c == r) for c, r in zip(completions, reference)]

    def only(completions):
        seen["only"] = completions
        return [float(len(c)) for c in completions]

    def both(prompts, completions, level=None):
        seen["both"] = (prompts, completions, level)
        return [0.0] * len(completions)

    assert build_reward_fn(accuracy)(PROMPTS, ["4", "x"], fields=ROWS) == [1.0, 0.0]
    assert seen["accuracy"] == (["4", "x"], ["4", "5"], ["id", "level", "prompts"])
    assert build_reward_fn(only)(PROMPTS, RESPONSES) == [float(len(r)) for r in RESPONSES]
    assert seen["only"] == RESPONSES
    build_reward_fn(both)(PROMPTS, RESPONSES, fields=ROWS)
    assert seen["both"] == (PROMPTS, RESPONSES, [None, "hard"])
    with pytest.raises(RewardFunctionError, match=r"needs the field 'solution'"):
        build_reward_fn(lambda completions, solution, **kw: [0.0] * 2, name="s")(PROMPTS, RESPONSES, fields=ROWS)
    for fn, msg in ((lambda responses, reference: [], r"parameter 1 is named 'responses', but it is given the prompts"),
                    (lambda p, prompts: [], r"parameter 2 is named 'prompts', but it is given the responses")):
        with pytest.raises(RewardSpecError, match=msg):
            build_reward_fn(fn, name="f")
    # a record field named completions: the responses win in TRL's form; rlhfkit's form may read it
    build_reward_fn(accuracy)(PROMPTS, RESPONSES, fields={"reference": ["4", "5"], "completions": [1, 2]})
    assert seen["accuracy"][0] == RESPONSES
    # rlhfkit's positional form, whatever the second parameter is called
    assert build_reward_fn(lambda queries, completions: [float(len(c)) for c in completions])(
        PROMPTS, RESPONSES) == [float(len(r)) for r in RESPONSES]
    assert build_reward_fn(lambda prompts, /, completions: [float(len(c)) for c in completions])(
        PROMPTS, RESPONSES) == [float(len(r)) for r in RESPONSES]


def test_callables_and_their_names():
    import functools

    def brevity(prompts, responses, scale=1.0):
        return [-scale * len(r) for r in responses]

    fn = build_reward_fn(brevity)
    assert fn.name == "brevity" and fn(["p"], ["abc"]) == [-3.0]
    half = build_reward_fn(functools.partial(brevity, scale=0.5))
    assert half.name == "brevity" and half(["p"], ["abcd"]) == [-2.0]

    class Scorer:
        def __call__(self, prompts, responses, reference):
            return [float(r == x) for r, x in zip(responses, reference)]

    obj = build_reward_fn(Scorer(), name="exact")
    assert obj.name == "exact" and obj(["p"], ["4"], fields=[{"reference": "4"}]) == [1.0]
    with pytest.raises(RewardSpecError, match="a model object is not a reward function"):
        build_reward_fn(torch.nn.Linear(2, 1))


def test_score_keeps_none_and_call_refuses_it(reward_module):
    fn = build_reward_fn("my_rewards:some_none")
    assert fn.score(["p", "q"], ["a", "b"]) == [None, 1.0]
    with pytest.raises(RewardFunctionError, match=r"some_none \(my_rewards:some_none\) returned None"):
        fn(["p", "q"], ["a", "b"])


# --------------------------------------------------------------------------- spec errors

@pytest.mark.parametrize("source, match", [
    ("def score(prompts, responses)\n    return []\n",
     r"syntax error in .*broken_\w+\.py:1: (expected ':'|invalid syntax)"),
    ("import no_such_dependency_xyz\n", r"cannot import module 'broken_\w+': No module named 'no_such_dependency_xyz'"),
    ("X = 1 / 0\n", r"importing 'broken_\w+' raised ZeroDivisionError: division by zero"),
])
def test_module_that_fails_to_import_is_one_clear_error(tmp_path, monkeypatch, source, match):
    name = f"broken_{abs(hash(source)) % 10**6}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec in (f"{name}:score", f"{tmp_path / name}.py:score"):
        with pytest.raises(RewardSpecError) as e:
            build_reward_fn(spec)
        assert spec in str(e.value) and "\n" not in str(e.value)
        assert isinstance(e.value, ValueError) and isinstance(e.value, RewardFunctionError)
    with pytest.raises(RewardSpecError, match=match):
        build_reward_fn(f"{name}:score")
    sys.modules.pop(name, None)


def test_rm_spec_checks_the_directory_before_loading(tokenizer, tmp_path, tiny_model):
    """rm: on something that is not a reward model: one line naming the path and what is there."""
    import json

    from rlhfkit.models import save_pretrained_atomic

    save_pretrained_atomic(tiny_model, tokenizer, tmp_path / "policy" / "model")  # a policy run directory
    with pytest.raises(RewardSpecError, match=r"rm:.*policy: .*policy/model is not a reward model: its config\.json "
                                              r"says LlamaForCausalLM \(a causal language model, e\.g\. a policy\)"):
        build_reward_fn(f"rm:{tmp_path / 'policy'}")
    cls = tmp_path / "classifier"
    cls.mkdir()
    (cls / "config.json").write_text(json.dumps({"architectures": ["LlamaForSequenceClassification"],
                                                 "id2label": {"0": "neg", "1": "pos"}}))
    with pytest.raises(RewardSpecError, match="is a classifier with 2 labels, not a reward model"):
        build_reward_fn(f"rm:{cls}")
    (cls / "config.json").write_text(json.dumps({"architectures": ["LlamaForSequenceClassification"]}))
    with pytest.raises(RewardSpecError, match=r"has a config\.json but no weights"):
        build_reward_fn(f"rm:{cls}")
    (cls / "config.json").write_text("{not json")
    with pytest.raises(RewardSpecError, match=r"config\.json is not valid JSON"):
        build_reward_fn(f"rm:{cls}")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_reward_fn(f"rm:{tmp_path / 'nowhere'}")


@pytest.mark.parametrize("what", ["policy", "syntax"])
def test_cli_reports_a_bad_reward_spec_in_one_line(tokenizer, tmp_path, capsys, what):
    """`rlhfkit ppo` with rm: pointing at a policy, or a reward file with a syntax error: exit 2,
    one line naming the spec, no traceback, nothing trained."""
    import yaml
    from pg_utils import base_config

    from rlhfkit.cli import main

    (tmp_path / "bad.py").write_text("def score(prompts, responses)\n    return []\n")
    cfg = base_config(tmp_path, tokenizer, critic_init="policy", rollout={"n": 2, "max_new_tokens": 4},
                      train={"max_steps": 1}, ppo_epochs=1)
    cfg["reward"] = {"spec": f"rm:{tmp_path / 'policy'}" if what == "policy" else f"{tmp_path / 'bad.py'}:score"}
    (tmp_path / "ppo.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()  # writing the tiny policy printed a progress bar
    assert main(["ppo", "--config", str(tmp_path / "ppo.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("rlhfkit ppo: error: ") and cfg["reward"]["spec"] in err
    assert ("is not a reward model" in err) if what == "policy" else ("syntax error in" in err)
    assert not (tmp_path / "run" / "model").exists()
