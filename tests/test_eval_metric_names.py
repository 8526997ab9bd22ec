"""Each trainer's ``eval_metrics()`` (the names ``train.select_best`` may pick, checked at load by
``config.loader._check_held_out``) against the ``eval/*`` keys its held-out evaluation really writes.

One tiny run per trainer and per config variation that changes the list (max_steps 1, eval_every 1,
a 1-layer model, 4-token responses), through the sub-command's own config class and run function,
then the eval/* keys of its metrics.jsonl are read back: every written key must be accepted by
eval_metrics() (its exact name, or under a declared "prefix/"), and every declared name written.
"""

from __future__ import annotations

import json

import pytest
from pg_utils import read_metrics, tiny_policy_dir, write_prompts, write_reward
from trainer_rows import pref_rows, sft_rows

from rlhfkit.config import load_config
from rlhfkit.registry import COMMANDS

SUPERVISED = ["train.batch_size=4", "train.micro_batch_size=4", "data.max_length=64"]
POLICY = ["train.batch_size=2", "train.micro_batch_size=4", "rollout.n=2", "rollout.max_new_tokens=4",
          "prompts.eval_limit=4"]
PG = [*POLICY, "mini_batch_size=4"]
# one iteration of 2 prompts; train.max_steps (1) is the inner DPO/SFT run's
ONLINE = [*POLICY, "iterations=1", "prompts_per_iteration=2", "train.micro_batch_size=2",
          "dpo.precompute_ref_logps=true",
          "train.drop_last=false"]  # a round of 2 prompts may keep 1 pair: batches filled from the next pass

# id: (sub-command, overrides with {placeholders} filled from the `files` fixture)
CASES = {
    "sft": ("sft", [*SUPERVISED, "data.train={sft}", "data.eval={sft}"]),
    "rm-categories": ("rm", [*SUPERVISED, "data.train={pref}", "data.eval={pref}"]),
    "rm-no-category": ("rm", [*SUPERVISED, "data.train={pref_plain}", "data.eval={pref_plain}"]),
    "pm": ("pm", [*SUPERVISED, "data.train={pref}", "data.eval={pref}", "eval_untrained=false",
                  "data.max_length=128"]),  # room for the A/B question
    "dpo": ("dpo", [*SUPERVISED, "data.train={pref}", "data.eval={pref}"]),
    "dpo-ipo": ("dpo", [*SUPERVISED, "data.train={pref}", "data.eval={pref}", "dpo.loss_type=ipo"]),
    "dpo-robust-precomputed": ("dpo", [*SUPERVISED, "data.train={pref}", "data.eval={pref}", "dpo.loss_type=robust",
                                       "dpo.label_smoothing=0.1", "dpo.precompute_ref_logps=true"]),
    "dpo-sft-first": ("dpo", [*SUPERVISED, "data.train={pref}", "data.eval={pref}", "sft_first.enabled=true",
                              "sft_first.max_steps=1"]),
    "ppo": ("ppo", [*PG, "critic_init=policy", "prompts.train={prompts}", "prompts.eval={prompts}",
                    "reward.spec={reward}"]),
    "ppo-gold": ("ppo", [*PG, "critic_init=policy", "prompts.train={prompts}", "prompts.eval={prompts}",
                         "reward.spec={reward}", "reward.gold={reward}"]),
    "grpo": ("grpo", [*PG, "prompts.train={prompts}", "prompts.eval={prompts}", "reward.spec={reward}"]),
    "grpo-gold": ("grpo", [*PG, "prompts.train={prompts}", "prompts.eval={prompts}", "reward.spec={reward}",
                           "reward.gold=task:sentiment"]),
    "rloo-gold": ("rloo", [*PG, "prompts.train={prompts}", "prompts.eval={prompts}", "reward.spec={reward}",
                           "reward.gold={reward}"]),
    "online-dpo": ("online-dpo", [*ONLINE, "prompts.train={prompts}", "prompts.eval={prompts}",
                                  "scorer={reward}"]),
    "online-dpo-gold": ("online-dpo", [*ONLINE, "prompts.train={prompts}", "prompts.eval={prompts}",
                                       "scorer={reward}", "gold=task:sentiment"]),
    "online-dpo-pairwise": ("online-dpo", [*ONLINE, "prompts.train={prompts}", "prompts.eval={prompts}",
                                           "scorer=annotator:sentiment"]),
    "online-rsft-pairwise-gold": ("online-dpo", [*ONLINE, "mode=rsft", "prompts.train={prompts}",
                                                 "prompts.eval={prompts}", "scorer=annotator:sentiment",
                                                 "gold={reward}"]),
}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer, one_torch_thread):
    """The shared inputs: a 1-layer policy, SFT rows, preference pairs with and without a category,
    prompts and a reward function file."""
    d = tmp_path_factory.mktemp("names")
    plain = [{k: v for k, v in r.items() if k != "category"} for r in pref_rows(4, 1)]
    return {"model": tiny_policy_dir(tokenizer, d / "policy"), "sft": _write_jsonl(d / "sft.jsonl", sft_rows(4, 0)),
            "pref": _write_jsonl(d / "pref.jsonl", pref_rows(4, 1)),
            "pref_plain": _write_jsonl(d / "pref_plain.jsonl", plain),
            "prompts": write_prompts(d / "prompts.jsonl", n=4), "reward": write_reward(d / "reward_fn.py")}


def _accepted(key: str, declared) -> bool:
    """What `config.loader._check_held_out` lets train.select_best name."""
    return any(key == d or (d.endswith("/") and key.startswith(d)) for d in declared)


def _written(name: str, keys: set) -> bool:
    return name in keys if not name.endswith("/") else any(k.startswith(name) for k in keys)


def _run(kind: str, overrides: list[str], files: dict, out) -> tuple[tuple, set]:
    """Run the sub-command as the CLI does; returns (its eval_metrics(), the eval/* keys logged)."""
    command = COMMANDS[kind]
    filled = [o.format(**{k: str(v) for k, v in files.items()}) for o in overrides]
    cfg = load_config(command.config_class(), overrides=[
        f"model.name={files['model']}", f"train.output_dir={out}", "train.max_steps=1", "train.eval_every=1",
        "train.progress=false", "train.save_every=0", *filled])
    command.runner()(cfg)
    keys = {k for row in read_metrics(out) for k in row if k.startswith("eval/")}
    return cfg.eval_metrics(), keys


@pytest.mark.parametrize("case", list(CASES))
def test_eval_metrics_are_exactly_what_the_evaluation_writes(case, files, tmp_path):
    """Every eval/* key the run logged is one train.select_best may name, and every name the
    config declares is one the run logged (a prefix: at least one key under it)."""
    kind, overrides = CASES[case]
    declared, keys = _run(kind, overrides, files, tmp_path / "run")
    assert keys, "the run logged no held-out evaluation"
    assert not [k for k in sorted(keys) if not _accepted(k, declared)], f"written, not declared: {declared}"
    # the per-category accuracy prefix of the RM is written only when the data has >= 2 categories
    optional = {"eval/accuracy/"} if case == "rm-no-category" else set()
    assert not [d for d in declared if d not in optional and not _written(d, keys)], f"declared, not written: {keys}"
