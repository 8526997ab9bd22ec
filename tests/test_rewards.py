"""Reward sources (rm:, task:, module:function, file.py:function) and the validator's errors."""

from __future__ import annotations

import math
import sys
import textwrap

import pytest
import torch

from rlhfkit.judges import RewardFn, RewardFunctionError, build_reward_fn


@pytest.fixture()
def reward_module(tmp_path, monkeypatch):
    """An importable module `my_rewards` with good and bad reward functions."""
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        import math
        def length(prompts, responses):
            return [float(len(r)) for r in responses]
        def too_few(prompts, responses):
            return [1.0] * (len(responses) - 1)
        def boom(prompts, responses):
            raise KeyError("missing label")
        def has_nan(prompts, responses):
            return [math.nan for _ in responses]
        def strings(prompts, responses):
            return ["good" for _ in responses]
        def as_tensor(prompts, responses):
            import torch
            return torch.ones(len(responses))
        def too_many(prompts, responses):
            return [1.0] * (len(responses) + 1)
        def has_inf(prompts, responses):
            return [1.0, math.inf][:len(responses)]
        def minus_inf(prompts, responses):
            return [-math.inf for _ in responses]
        def scalar(prompts, responses):
            return 1.0
        def nothing(prompts, responses):
            pass
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("my_rewards", None)


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
    ("has_nan", "returned nan at index 0 (must be finite)"),
    ("has_inf", "returned inf at index 1 (must be finite)"),
    ("minus_inf", "returned -inf at index 0 (must be finite)"),
    ("strings", "returned a non-number at index 0: str 'good'"),
    ("scalar", "must return a list of 2 numbers, got float"),
    ("nothing", "must return a list of 2 numbers, got NoneType"),
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


def test_rm_rejects_a_causal_lm(tokenizer, tmp_path, tiny_model):
    from rlhfkit.models import save_pretrained_atomic

    save_pretrained_atomic(tiny_model, tokenizer, tmp_path / "lm")
    with pytest.raises(ValueError, match="not a reward model"):
        build_reward_fn(f"rm:{tmp_path / 'lm'}")


def test_task_source():
    tasks = pytest.importorskip("rlhfkit.tasks")
    if not hasattr(tasks, "get_task"):
        pytest.skip("rlhfkit.tasks.get_task not available yet")
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
    with pytest.raises(RewardFunctionError, match=r"reward function .*bad_reward\.py:score returned 15 scores for 16 "
                                                  r"responses"):
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
    from pg_utils import base_config
    from rlhfkit.config import load_config
    from rlhfkit.trainers.ppo import PPOConfig, train_ppo

    import transformers

    def loaded(*a, **k):
        raise AssertionError("a model was loaded before the reward spec was checked")

    (tmp_path / "r.py").write_text("def score(prompts, responses):\n    return [0.0 for _ in responses]\n")
    cfg = base_config(tmp_path, tokenizer, critic_init="policy", rollout={"n": 2})  # writes the policy before the patch
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", loaded)
    for spec, error, match in [(f"{tmp_path / 'r.py'}:scor", ValueError, r"r\.py.*no function 'scor'"),
                               (f"{tmp_path / 'nope.py'}:score", FileNotFoundError, r"nope\.py"),
                               ("no_such_module_xyz:score", ValueError, r"cannot import module 'no_such_module_xyz'")]:
        with pytest.raises(error, match=match):
            train_ppo(load_config(PPOConfig, data={**cfg, "reward": {"spec": spec}}))
