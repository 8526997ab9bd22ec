"""What each command reads before it runs is declared by its config (``inputs()``), and that is
all `rlhfkit pipeline` checks before the first stage trains: a data or spec key a config has but
does not declare fails here, not in a pipeline whose last stage has a typo."""

from __future__ import annotations

import dataclasses

import pytest

from rlhfkit.config import DataSection, PromptsSection, PTXSection, RewardSection
from rlhfkit.eval.alignment_tax import AlignmentTaxSection
from rlhfkit.eval.config import EvalPromptsSection
from rlhfkit.registry import COMMANDS

# The keys of a section that name a data file or a reward/judge spec, and a config's own specs and
# models (``rlhfkit eval``'s policies and judges are lists of them).
SOURCE_KEYS = {DataSection: ("train", "eval"), PromptsSection: ("train", "eval"), RewardSection: ("spec", "gold"),
               PTXSection: ("data",), EvalPromptsSection: ("train",), AlignmentTaxSection: ("sft_data",)}
SPEC_KEYS = ("gold", "scorer", "proxy", "preference_set", "baseline")
LIST_KEYS = ("policies", "judges")
COMMAND_NAMES = sorted(COMMANDS)


def _input_keys(cfg, prefix: str = "") -> set[str]:
    """The dotted keys of ``cfg`` that name a data source or a spec (`SOURCE_KEYS`, `SPEC_KEYS`)."""
    keys = set()
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        names = next((n for cls, n in SOURCE_KEYS.items() if isinstance(value, cls)), None)
        if names:
            keys |= {f"{prefix}{f.name}.{n}" for n in names}
        elif dataclasses.is_dataclass(value):
            keys |= _input_keys(value, f"{prefix}{f.name}.")
        elif f.name in SPEC_KEYS or f.name in LIST_KEYS:
            keys.add(f"{prefix}{f.name}")
    return keys


def _get(cfg, key: str):
    for name in key.split("."):
        cfg = getattr(cfg, name)
    return cfg


def _set(cfg, key: str, value) -> None:
    *path, last = key.split(".")
    for name in path:
        cfg = getattr(cfg, name)
    setattr(cfg, last, [value] if last in LIST_KEYS else value)


@pytest.mark.parametrize("kind", COMMAND_NAMES)
def test_a_config_declares_every_input_it_has(kind):
    cfg = COMMANDS[kind].config_class()()
    for key in _input_keys(cfg):  # a judge or policy is declared when it is set
        if _get(cfg, key) in ([], ""):
            _set(cfg, key, "x")
    declared = {key for key, _, _ in cfg.inputs()}
    assert _input_keys(cfg), f"{kind}: no data or spec key found; SOURCE_KEYS/SPEC_KEYS out of date?"
    assert _input_keys(cfg) <= declared, f"{kind}: inputs() leaves out {sorted(_input_keys(cfg) - declared)}"
    assert declared <= _input_keys(cfg), f"{kind}: inputs() names no such key: {sorted(declared - _input_keys(cfg))}"


@pytest.mark.parametrize("kind", COMMAND_NAMES)
def test_each_declared_check_reads_its_own_value(kind, tmp_path):
    """Every input set to a file that does not exist: each check fails on its own value, and the
    values are the config's."""
    cfg = COMMANDS[kind].config_class()()
    if hasattr(cfg, "ptx"):
        cfg.ptx.coef = 0.1  # the PTX data is read only when its term is on
    for key in _input_keys(cfg):
        _set(cfg, key, str(tmp_path / f"missing-{key}.jsonl"))
    inputs = cfg.inputs()
    assert {(key, value) for key, value, _ in inputs} == {(k, str(tmp_path / f"missing-{k}.jsonl"))
                                                          for k in _input_keys(cfg)}
    for key, value, check in inputs:
        with pytest.raises((ValueError, FileNotFoundError, ImportError), match=f"missing-{key}"):
            check()


def test_the_inputs_of_a_list_of_sources_are_one_per_source(tmp_path):
    from conftest import write_jsonl

    from rlhfkit.config import SFTConfig

    good = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "Hi", "response": "Hello."}])
    cfg = SFTConfig(data=DataSection(train=[str(good), "task:sentimnet"]))
    (k1, v1, c1), (k2, v2, c2), (k3, v3, _) = cfg.inputs()
    assert (k1, v1, k2, v2, k3, v3) == ("data.train", str(good), "data.train", "task:sentimnet", "data.eval", "")
    assert len(c1()) == 1
    with pytest.raises(FileNotFoundError, match="no built-in task 'sentimnet'"):
        c2()


@pytest.mark.parametrize("config, error", [
    ({"prompts": {"train": "task:sentiment/prompts_eval.jsonl"}, "gold": "task:arithmetic"},
     r"stages\[1\] \(eval\): gold: prompts\.train \(task:sentiment/prompts_eval\.jsonl\): .*reference"),
    ({"prompts": {"train": "task:sentiment/prompts_evl.jsonl"}},
     r"stages\[1\] \(eval\): prompts\.train: .*prompts_evl"),
    ({"policies": ["${sft}", "runs/nowhere/ppo/model"]}, r"stages\[1\] \(eval\): policies: .*runs/nowhere/ppo/model"),
    ({"judges": ["task:sentimnet"]}, r"stages\[1\] \(eval\): judges: .*sentimnet"),
    ({"alignment_tax": {"sft_data": "MISSING/sft.jsonl"}}, r"stages\[1\] \(eval\): alignment_tax\.sft_data: .*MISSING"),
    ({"preference_set": "task:sentiment"}, None),
])
def test_a_pipeline_checks_an_evaluation_stage_before_the_first_stage(tmp_path, tiny_model_dir, config, error):
    """An evaluation's prompts, policies, judges (and what they need of the prompt records) and
    data are checked when the pipeline is planned, not after the stages before it have trained;
    a policy that an earlier stage writes (``${sft}``) is not."""
    import yaml

    from rlhfkit.config import ConfigError
    from rlhfkit.pipeline import plan

    ev = {"policies": ["${sft}"], "baseline": str(tiny_model_dir), **config}
    stages = [{"name": "sft", "kind": "sft", "config": {"data": {"train": "task:sentiment"}}},
              {"name": "eval", "kind": "eval", "config": ev}]
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), "base_model": str(tiny_model_dir),
                                    "stages": stages}))
    if error is None:
        assert [spec.name for spec, _ in plan(str(path))[1]] == ["sft", "eval"]
    else:
        with pytest.raises(ConfigError, match=error):
            plan(str(path))
    assert not (tmp_path / "run").exists()


def test_a_pipeline_reads_each_declared_input_before_the_first_stage(tmp_path, tiny_model_dir):
    """The PTX data of a later stage, declared by its config, is read before the pipeline starts."""
    import yaml

    from rlhfkit.config import ConfigError
    from rlhfkit.pipeline import plan

    stage = {"name": "grpo", "kind": "grpo", "config": {"ptx": {"data": str(tmp_path / "ptx.txt"), "coef": 0.1}}}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), "base_model": str(tiny_model_dir),
                                    "stages": [stage]}))
    with pytest.raises(ConfigError, match=r"stages\[0\] \(grpo\): ptx\.data: data file not found: .*ptx\.txt"):
        plan(str(path))
    (tmp_path / "ptx.txt").write_text("Some plain text.\n")
    assert len(plan(str(path))[1]) == 1


@pytest.mark.parametrize("kind, config, error", [
    ("grpo", {"reward": {"spec": "task:sentiment", "gold": "task:arithmetic"},
              "prompts": {"train": "task:sentiment", "eval": "task:sentiment"}},
     r"stages\[1\] \(grpo\): reward\.gold: prompts\.eval \(task:sentiment\): .*reference"),
    ("grpo", {"reward": {"spec": "task:arithmetic"}, "prompts": {"train": "task:sentiment"}},
     r"stages\[1\] \(grpo\): reward\.spec: prompts\.train \(task:sentiment\): .*reference"),
    ("online-dpo", {"scorer": "task:arithmetic"},
     r"stages\[1\] \(online-dpo\): scorer: prompts\.train \(task:sentiment\): .*reference"),
    ("online-dpo", {"scorer": "annotator:arithmetic"}, r"scorer: prompts\.train \(task:sentiment\): .*reference"),
    ("online-dpo", {"scorer": "task:sentiment", "gold": "task:arithmetic"}, r"gold: prompts\.train .*reference"),
])
def test_a_pipeline_checks_what_a_later_stage_s_judges_need_of_its_prompts(tmp_path, tiny_model_dir, kind, config,
                                                                             error):
    """A reward, scorer or gold judge that cannot score the prompts a later stage gives it (the
    arithmetic judge needs each record's reference) is refused when the pipeline is planned."""
    import yaml

    from rlhfkit.config import ConfigError
    from rlhfkit.pipeline import plan

    stages = [{"name": "sft", "kind": "sft", "config": {"data": {"train": "task:sentiment"}}},
              {"name": kind, "kind": kind, "config": {"model": {"name": "${sft}"}, **config}}]
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), "base_model": str(tiny_model_dir),
                                    "stages": stages}))
    with pytest.raises(ConfigError, match=error):
        plan(str(path))
    arithmetic = {key: "task:arithmetic" for key in config.get("prompts", {"train": ""})}
    stages[1]["config"] = {**stages[1]["config"], "prompts": arithmetic}
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), "base_model": str(tiny_model_dir),
                                    "stages": stages}))
    assert len(plan(str(path))[1]) == 2  # prompts that carry the reference pass
