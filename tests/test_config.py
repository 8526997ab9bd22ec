"""Config loading: YAML + dotted overrides, validated with located messages."""

import re
from pathlib import Path

import pytest

from rlhfkit.config import ConfigError, RewardConfig, SFTConfig, load_config


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  train: a.jsonl\noptim:\n  lr: 3e-5\ntrain:\n  batch_size: 16\n  micro_batch_size: 4\n")
    cfg = load_config(SFTConfig, p, ["optim.lr=1e-4", "train.epochs=2"])
    assert cfg.optim.lr == 1e-4 and cfg.train.batch_size == 16 and cfg.train.epochs == 2.0
    assert isinstance(cfg.optim.lr, float)
    assert load_config(RewardConfig, overrides=["data.train=x"]).optim.lr == 1e-5
    listed = load_config(RewardConfig, overrides=["data.train=[a.jsonl, task:sentiment]"])
    assert listed.data.train == ["a.jsonl", "task:sentiment"]  # several sources, read in order as one set


@pytest.mark.parametrize("overrides,match", [
    (["data.train=x", "optim.lrr=1"], r"optim\.lrr: unknown key \(did you mean optim\.lr\?\)"),
    (["data.train=x", "train.batch_size=abc"], r"train\.batch_size: expected an integer, got str 'abc'"),
    (["data.train=x", "train.batch_size=12", "train.micro_batch_size=8"], r"not divisible by micro_batch_size"),
    (["optim.lr=1e-5"], r"data\.train: a training data source is required"),
    (["data.train=x", "data.truncation=middle"], r"data\.truncation: must be one of"),
    (["data.train=x", "optim.lr=-1"], r"optim\.lr: must be > 0"),
    (["data.train=x", "model=3"], r"model: expected a mapping"),
    (["nokey"], r"expected key\.path=value"),
    (["data.train=[a.jsonl, 3]"], r"data\.train\[1\]: expected a string, got int 3"),
    (["data.train=[a.jsonl, '']"], r"data\.train: an empty source in the list \['a\.jsonl', ''\]"),
    (["data.train=x", "data.eval={a: 1}"], r"data\.eval: expected string or list, got dict"),
    (["data.train=x", "train.seed=true"], r"train\.seed: expected an integer, got bool True"),
    (["data.train=x", "train.batch_size=false"], r"train\.batch_size: expected an integer, got bool False"),
])
def test_errors_are_located(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(SFTConfig, overrides=overrides)


def test_yaml_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(SFTConfig, p)
    p.write_text("train:\n  seed: 1.5\ndata:\n  train: x\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: train\.seed: expected an integer"):
        load_config(SFTConfig, p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(SFTConfig, tmp_path / "missing.yaml")
    p.write_text("data:\n  train: x\noptim:\n  lr: 1e-5\n  lr: 1e-3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: .*key 'lr' given twice in one mapping"):
        load_config(SFTConfig, p)


@pytest.mark.parametrize("value", ["nan", ".inf", "-inf"])
def test_non_finite_numbers_are_refused_even_without_validation(value):
    """check=False skips the checks across keys, not the types: nan / inf is never a number a key can hold."""
    with pytest.raises(ConfigError, match=rf"optim\.lr: must be a finite number, got {value.lstrip('.')}"):
        load_config(SFTConfig, overrides=[f"optim.lr={value}"], check=False)


@pytest.mark.parametrize("kind, overrides, match", [
    ("ppo", ["kl.targt=1"], r"kl\.targt: unknown key \(did you mean kl\.target\?\)"),
    ("ppo", ["ppo_epoch=2"], r"ppo_epoch: unknown key \(did you mean ppo_epochs\?\)"),
    ("ppo", ["rollout.n=two"], r"rollout\.n: expected an integer, got str 'two'"),
    ("ppo", ["kl.target=abc"], r"kl\.target: expected a number, got str 'abc'"),
    ("ppo", ["mini_batch_size=5"], r"mini_batch_size: 5 must divide train\.batch_size x rollout\.n = 16 rows"),
    ("ppo", ["critic_init=reward"], r"critic_init: 'reward' needs reward\.spec=rm:DIR"),
    ("ppo", ["kl.horizon=0"], r"kl: coef and target must be >= 0, horizon > 0"),
    ("ppo", ["kl.coef=0", "kl.target=1"], r"kl\.target: 1\.0 with coef 0: the adaptive controller scales the "
                                          r"coefficient, so from 0 it never moves; set kl\.coef > 0"),
    ("dpo", ["dpo.bta=0.1"], r"dpo\.bta: unknown key \(did you mean dpo\.beta\?\)"),
    ("dpo", ["dpo.loss_type=foo"], r"dpo\.loss_type: must be one of \['sigmoid', 'cdpo', 'robust', 'ipo', 'hinge'\], got 'foo'"),
    ("dpo", ["train.batch_size=6", "train.micro_batch_size=4"], r"train\.batch_size: 6 is not divisible by "
                                                                r"micro_batch_size 4"),
    ("rm", ["label_smoothing=0.5"], r"label_smoothing: must be in \[0, 0\.5\), got 0\.5"),
    ("dpo", ["train.resume=maybe"], r"train\.resume: expected true/false or 'auto', got str 'maybe'"),
    ("dpo", ["train.select_best_mode=max"], r"train\.select_best_mode: max needs select_best \(the metric it "),
])
def test_trainer_config_errors_are_located(kind, overrides, match):
    from rlhfkit.registry import COMMANDS

    base = {"ppo": ["reward.spec=m:f", "critic_init=policy"], "dpo": ["data.train=x"], "rm": ["data.train=x"]}[kind]
    with pytest.raises(ConfigError, match=match):
        load_config(COMMANDS[kind].config_class(), overrides=[*base, *overrides])


@pytest.mark.parametrize("kind, key, named", [
    ("ppo", "kl_coef=0.1", "kl.coef"),  # the nearest spelling is vf_coef, another setting
    ("grpo", "beta=0.04", "kl_coef"),
    ("dpo", "beta=0.1", "dpo.beta"),
    ("grpo", "num_generations=4", "rollout.n"),
    ("grpo", "max_completion_length=32", "rollout.max_new_tokens"),
    ("sft", "per_device_train_batch_size=4", "train.micro_batch_size"),
    ("rm", "optim.learning_rate=1e-5", "optim.lr"),
    ("ppo", "num_mini_batches=2", "mini_batch_size, rows per minibatch, not a count of minibatches"),
    ("ppo", "max_epochs=2", "ppo_epochs, passes over each rollout batch"),
    ("sft", "max_epochs=2", "train.epochs"),
    ("ppo", "critic_optim.learning_rate=1e-5", "critic_optim.lr"),  # the section's own key, not optim.lr
    ("ppo", "ptx.max_len=64", "ptx.max_length"),
    ("grpo", "train_batch_size=32", "mini_batch_size, rows per optimizer step; train.batch_size counts prompts"),
    ("grpo", "gradient_accumulation_steps=4", "mini_batch_size, rows per optimizer step; accumulation is "
                                              "mini_batch_size / train.micro_batch_size"),
    ("sft", "gradient_accumulation_steps=4", "train.batch_size, the global batch"),
    ("sft", "max_seq_length=512", "data.max_length"),
    ("ppo", "critic_learning_rate=1e-5", "critic_optim.lr"),
])
def test_a_trl_or_openrlhf_key_names_the_rlhfkit_key_for_it(kind, key, named):
    """Keys of TRL, OpenRLHF and transformers' TrainingArguments are named with the rlhfkit key that
    does the same for this command, not the closest spelling (which is often another setting)."""
    from rlhfkit.registry import COMMANDS

    base = {"ppo": ["reward.spec=m:f", "critic_init=policy"], "dpo": ["data.train=x"], "rm": ["data.train=x"],
            "sft": ["data.train=x"]}.get(kind, ["reward.spec=m:f"])
    typed = key.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{re.escape(typed)}: unknown key \(rlhfkit's key for it: {re.escape(named)}[;,]"):
        load_config(COMMANDS[kind].config_class(), overrides=[*base, key])
    with pytest.raises(ConfigError, match=r"whiten_rewards: unknown key \(a key of another library; rlhfkit has no such"):
        load_config(COMMANDS[kind].config_class(), overrides=[*base, "whiten_rewards=true"])


def test_yaml_unknown_key_suggests_the_known_one(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("trian:\n  seed: 1\ndata:\n  train: x\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: trian: unknown key \(did you mean train\?\)"):
        load_config(SFTConfig, p)


@pytest.mark.parametrize("argv, match", [
    (["sft", "data.train=x.jsonl", "train.batch_size=6", "train.micro_batch_size=4"],
     "train.batch_size: 6 is not divisible by micro_batch_size 4"),
    (["sft", "data.train=x.jsonl", "optim.lrr=1e-5"], "optim.lrr: unknown key (did you mean optim.lr?)"),
    (["ppo", "reward.spec=m:f", "critic_init=policy", "mini_batch_size=5"],
     "mini_batch_size: 5 must divide train.batch_size x rollout.n = 16 rows"),
    # the sub-command is not silently overridden by the YAML's estimator
    (["rloo", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "grpo.yaml")],
     "advantage: 'grpo' under `rlhfkit rloo`, which always uses rloo"),
])
def test_cli_reports_config_errors_before_any_model_loads(tmp_path, capsys, argv, match):
    """Exit status 2 and one located line on stderr; the model named does not exist, so reaching
    a model load (or any training) would fail differently, and no run directory is created."""
    from rlhfkit.cli import main

    out = tmp_path / "run"
    code = main([*argv, f"model.name={tmp_path / 'no-such-model'}", f"train.output_dir={out}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"rlhfkit {argv[0]}: error: ") and match in err, err
    assert not out.exists()


def test_every_shipped_config_validates():
    """configs/*.yaml load into their typed configs (a renamed or retyped field fails here, not in
    a user's run); TRAINER_VARIANT.yaml (rm_token) is a variant of TRAINER's; the demo pipeline
    plans all its stages."""
    from pathlib import Path

    from rlhfkit.pipeline import plan
    from rlhfkit.registry import COMMANDS

    root = Path(__file__).resolve().parents[1] / "configs"
    seen = []
    for path in sorted(root.glob("*.yaml")):
        kind = path.stem.replace("_", "-")
        kind = kind if kind in COMMANDS else kind.rsplit("-", 1)[0]
        if path.stem == "demo":
            _, stages = plan(str(path))
            assert [s.kind for s, _ in stages] == ["sft", "rm", "ppo", "eval", "eval"]
        else:
            assert kind in COMMANDS, f"{path.name}: no trainer named {kind!r}"
            load_config(COMMANDS[kind].config_class(), str(path))
        seen.append(path.stem)
    assert {"demo", "sft", "rm", "rm_token", "ppo", "grpo", "dpo", "online_dpo", "pm"} <= set(seen)


@pytest.mark.parametrize("kind, overrides, match", [
    ("sft", ["data.train=x.jsonl", "train.zero_stage=3"], "zero_stage: 0 \\(off\\), 1 or 2"),
    ("sft", ["data.train=x.jsonl", "train.zero_stage=2", "train.fsdp=true"], "one of fsdp and zero_stage"),
    ("ppo", ["train.zero_stage=3", "reward.spec=task:sentiment", "critic_init=policy"], "zero_stage: 0 \\(off\\), 1 or 2"),
    ("grpo", ["train.zero_stage=2", "train.fsdp=true", "reward.spec=task:sentiment"], "one of fsdp and zero_stage"),
])
def test_zero_stage_is_validated(kind, overrides, match):
    """DeepSpeed ZeRO: stages 1 and 2 (every trainer), not together with FSDP."""
    from rlhfkit.registry import COMMANDS

    cls = COMMANDS[kind].config_class()
    with pytest.raises(ConfigError, match=match):
        load_config(cls, overrides=overrides)


# ---------------------------------------------------------------------------# --------------------------------------------------------------------------- numeric fields

@pytest.mark.parametrize("override, match", [
    ("train.log_every=0", r"train\.log_every: must be >= 1, got 0"),
    ("train.save_every=-1", r"train\.save_every: must be >= 0, got -1"),
    ("train.eval_every=-2", r"train\.eval_every: must be >= 0, got -2"),
    ("train.keep_checkpoints=-1", r"train\.keep_checkpoints: must be >= 0"),
    ("train.max_bad_steps=-1", r"train\.max_bad_steps: must be >= 1"),
    ("train.max_bad_steps=0", r"train\.max_bad_steps: must be >= 1"),
    ("data.limit=-1", r"data\.limit: must be >= 0, got -1"),
    ("optim.lr=nan", r"optim\.lr: must be a finite number, got nan"),
    ("optim.lr=.inf", r"optim\.lr: must be a finite number, got inf"),
    ("optim.lr=inf", r"optim\.lr: must be a finite number, got inf"),
    ("train.epochs=nan", r"train\.epochs: must be a finite number, got nan"),
    ("optim.max_grad_norm=-1", r"optim\.max_grad_norm: must be >= 0"),
    ("optim.weight_decay=-0.1", r"optim\.weight_decay: must be >= 0"),
    ("optim.adam_beta2=1", r"optim\.adam_beta2: must be in \[0, 1\)"),
    ("optim.adam_eps=0", r"optim\.adam_eps: must be > 0"),
    ("model.lora.r=0", r"model\.lora\.r: must be >= 1"),
    ("model.lora.dropout=1.5", r"model\.lora\.dropout: must be in \[0, 1\)"),
    ("train.output_dir=", r"train\.output_dir: must name a directory"),
    ("train.output_dir=' '", r"train\.output_dir: must name a directory"),
    ("train.seed=-1", r"train\.seed: must be >= 0"),
    ("train.seed=99999999999", r"train\.seed: must be < 2\*\*32"),
    ("data.chat_template=no-such-template", r"data\.chat_template: 'no-such-template' is neither"),
])
def test_numeric_and_path_fields_are_checked(override, match):
    """Each of these passed validation and then crashed after the model loaded, trained silently
    wrong (lr=inf, limit=-1 dropping the last example) or wrote into the current directory."""
    with pytest.raises(ConfigError, match=match):
        load_config(SFTConfig, overrides=["data.train=x", override])


@pytest.mark.parametrize("kind, override, match", [
    ("ppo", "train.log_every=0", r"train\.log_every: must be >= 1"),  # PolicyTrainSection overrides validate
    ("ppo", "train.output_dir=", r"train\.output_dir: must name a directory"),
    ("ppo", "reward.batch_size=0", r"reward\.batch_size: must be >= 1"),
    ("ppo", "ptx.max_length=0", r"ptx\.max_length: must be >= 1"),
    ("ppo", "vf_coef=-1", r"vf_coef: must be >= 0"),
    ("ppo", "clip_eps=0", r"clip_eps: must be > 0"),
    ("ppo", "gamma=nan", r"gamma: must be a finite number"),
    ("ppo", "gamma=1.5", r"gamma: must be between 0 and 1, got 1.5"),
    ("ppo", "lam=1.01", r"lam: must be between 0 and 1"),
    ("ppo", "gamma=1", None),
    ("ppo", "clip_eps_high=0.1", r"clip_eps_high: 0.1 is below clip_eps 0.2; it is the wider upper side"),
    ("ppo", "clip_eps_high=0.28", None),
    ("grpo", "advantage=rloo scale=batch", r"scale: 'batch' applies to advantage grpo only; rloo does not scale"),
    ("grpo", "advantage=reinforce scale=none", r"scale: 'none' applies to advantage grpo only"),
    ("grpo", "advantage=grpo scale=batch", None),
    ("grpo", "advantage=reinforce rollout.n=1 train.batch_size=1 mini_batch_size=1",
     r"train\.batch_size: reinforce's baseline is the mean reward of the global batch"),
    ("grpo", "advantage=reinforce rollout.n=1 train.batch_size=2 mini_batch_size=2", None),
    ("ppo", "reward.missing_eos_score=-1", None),  # a score: negative is fine
    ("ppo", "reward.unscorable=-1", None),  # a score too
    ("online-dpo", "mode=rsft rsft_min_score=-0.2", None),  # a threshold on scores (VADER, RMs go negative)
    ("ppo", "rollout.micro_batch_size=0", None),  # documented: 0 = all rows at once
    ("dpo", "sft_first.lr=0", r"sft_first\.lr: must be > 0"),
    ("online-dpo", "scorer_batch_size=0", r"scorer_batch_size: must be >= 1"),
    ("pm", "eval_batch_size=0", r"eval_batch_size: must be >= 1"),
    ("eval", "batch_size=0", r"batch_size: must be >= 1"),
])
def test_every_config_class_gets_the_numeric_checks(kind, override, match):
    from rlhfkit.registry import COMMANDS

    base = {"ppo": ["reward.spec=task:sentiment", "critic_init=policy"], "dpo": ["data.train=x"],
            "online-dpo": [], "pm": ["data.train=x"], "eval": ["policies=[a]"], "grpo": []}[kind]
    cls = COMMANDS[kind].config_class()
    if match is None:
        load_config(cls, overrides=[*base, *override.split()])
        return
    with pytest.raises(ConfigError, match=match):
        load_config(cls, overrides=[*base, *override.split()])


@pytest.mark.parametrize("kind, overrides, metric, ok", [
    ("sft", ["data.train=x"], "eval/loss", True),
    ("sft", ["data.train=x"], "eval/accuracy", False),
    ("rm", ["data.train=x"], "eval/accuracy/food", True),  # one category's accuracy
    ("rm", ["data.train=x"], "eval/loss", False),
    ("pm", ["data.train=x"], "eval/ppl", True),
    ("dpo", ["data.train=x"], "eval/rewards/margin", True),
    ("dpo", ["data.train=x"], "eval/margin", False),
    ("grpo", ["prompts.eval=p.jsonl"], "eval/kl", True),
    ("ppo", ["prompts.eval=p.jsonl", "reward.spec=task:sentiment", "critic_init=policy"], "eval/gold_mean", False),
    ("ppo", ["prompts.eval=p.jsonl", "reward.spec=task:sentiment", "critic_init=policy", "reward.gold=task:sentiment"],
     "eval/gold_mean", True),
    ("online-dpo", ["prompts.eval=p.jsonl"], "eval/proxy_mean", True),
    ("online-dpo", ["prompts.eval=p.jsonl", "scorer=annotator:sentiment"], "eval/proxy_mean", False),  # pairwise
])
def test_select_best_names_a_metric_the_run_evaluates_before_anything_runs(kind, overrides, metric, ok):
    from rlhfkit.registry import COMMANDS

    overrides = [*overrides, f"train.select_best={metric}"]
    if ok:
        assert load_config(COMMANDS[kind].config_class(), overrides=overrides).train.select_best == metric
        return
    with pytest.raises(ConfigError, match=rf"train\.select_best: '{metric}' is not among the held-out metrics"):
        load_config(COMMANDS[kind].config_class(), overrides=overrides)


def test_resume_is_tri_state_and_excludes_overwrite():
    assert load_config(SFTConfig, overrides=["data.train=x", "train.resume=auto"]).train.resume == "auto"
    assert load_config(SFTConfig, overrides=["data.train=x", "train.resume=true"]).train.resume is True
    with pytest.raises(ConfigError, match="choose one of resume .* and overwrite"):
        load_config(SFTConfig, overrides=["data.train=x", "train.resume=true", "train.overwrite=true"])


def test_yaml_syntax_error_is_one_line_with_line_and_column(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  seed: [1,\n")
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, p)
    assert "\n" not in str(e.value) and "bad.yaml: invalid YAML at line 3, column 1" in str(e.value)


def test_a_datasets_object_as_a_data_source_says_how_to_give_it(tmp_path):
    """TRL takes a datasets.Dataset; a config holds files: the error says how to make one, and the
    file it names trains."""
    datasets = pytest.importorskip("datasets")
    from rlhfkit.data import load_sft

    ds = datasets.Dataset.from_list([{"prompt": f"say {i}", "response": f"{i}"} for i in range(3)])
    with pytest.raises(ConfigError, match=r"(?s)data\.train: expected string or list, got Dataset .*"
                                          r"save the dataset with \.to_json\('data\.jsonl'\) and give that path"):
        load_config(SFTConfig, data={"data": {"train": ds}})
    ds.to_json(tmp_path / "data.jsonl")
    cfg = load_config(SFTConfig, data={"data": {"train": str(tmp_path / "data.jsonl")}})
    assert [ex.messages[-1]["content"] for ex in load_sft(cfg.data.train)] == ["0", "1", "2"]


def _sections():
    """(command, section) for every section whose command gives it defaults of its own."""
    import dataclasses
    import typing

    from rlhfkit.registry import COMMANDS

    out = []
    for name, command in COMMANDS.items():
        cls = command.config_class()
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(hints[f.name]):
                out.append((name, f.name))
    return out


@pytest.mark.parametrize("command, section", _sections())
def test_setting_one_key_of_a_section_keeps_the_commands_defaults_for_the_others(command, section):
    """`rlhfkit grpo optim.lr=1e-3` once reset GRPO's constant schedule to the optim class's
    cosine one, and `rlhfkit eval rollout.max_new_tokens=64` eval's rollout.n from 2 to 1: a
    section given in part takes the rest from its command's defaults, on the command line, in
    YAML and from Python."""
    import dataclasses

    from rlhfkit.registry import COMMANDS

    from rlhfkit.config.loader import merge

    cls = COMMANDS[command].config_class()
    required = {"eval": {"policies": ["some/model"]},
                "ppo": {"reward": {"spec": "task:sentiment"}, "critic_init": "policy"}}.get(
        command, {"data": {"train": "pairs.jsonl"}} if command in ("sft", "rm", "dpo", "pm") else {})
    default = dataclasses.asdict(load_config(cls, data=required))
    key, value = next((k, v) for k, v in default[section].items() if not isinstance(v, (dict, list)))
    touched = load_config(cls, data=merge(required, {section: {key: value}}))
    assert dataclasses.asdict(touched) == default
    if (command, section) == ("grpo", "optim"):
        cfg = load_config(cls, overrides=["optim.lr=0.001"])
        assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_ratio) == (0.001, "constant", 0.0)


@pytest.mark.parametrize("command, over, match", [
    ("sft", {"data": {"train": "x.jsonl", "eval_fraction": 0.0}}, r"needs held-out data: set data\.eval"),
    ("dpo", {"data": {"train": "x.jsonl", "eval_fraction": 0.0}}, "needs held-out data"),
    ("grpo", {}, r"needs held-out prompts: set prompts\.eval"),
    ("online-dpo", {}, "needs held-out prompts"),
])
def test_select_best_or_eval_every_without_a_held_out_evaluation_is_refused(command, over, match):
    """They used to be ignored without a word: no evaluation, and the last model kept, not the best."""
    from rlhfkit.config.loader import merge
    from rlhfkit.registry import COMMANDS

    cls = COMMANDS[command].config_class()
    with pytest.raises(ConfigError, match=r"train\.select_best: eval/loss " + match):
        load_config(cls, data=merge(over, {"train": {"select_best": "eval/loss", "eval_every": 2}}))
    with pytest.raises(ConfigError, match=r"train\.eval_every: 2 " + match):
        load_config(cls, data=merge(over, {"train": {"eval_every": 2}}))
    with pytest.raises(ConfigError, match=r"train\.select_best: eval/loss " + match):
        load_config(cls, data=merge(over, {"train": {"select_best": "eval/loss"}}))
    held_out = {"data": {"eval": "y.jsonl"}} if "data" in over else {"prompts": {"eval": "task:sentiment"}}
    metric = "eval/loss" if "data" in over else "eval/kl"  # one the run evaluates
    assert load_config(cls, data=merge(merge(over, held_out), {"train": {"select_best": metric}}))


def test_string_keys_take_paths_and_say_how_to_quote_numbers(tmp_path):
    from pathlib import Path

    cfg = load_config(SFTConfig, data={"data": {"train": Path("x.jsonl")}, "train": {"output_dir": tmp_path / "r"}})
    assert cfg.data.train == "x.jsonl" and cfg.train.output_dir == str(tmp_path / "r")
    with pytest.raises(ConfigError, match=r"train\.output_dir: expected a string, got int 2024 \(YAML reads it so: "
                                          r"write it quoted, e\.g\. train\.output_dir='\"2024\"'\)"):
        load_config(SFTConfig, overrides=["data.train=x", "train.output_dir=2024"])
    assert load_config(SFTConfig, overrides=["data.train=x", 'train.output_dir="2024"']).train.output_dir == "2024"


def test_a_top_level_check_names_its_key_without_a_config_prefix():
    from rlhfkit.config import RewardConfig

    with pytest.raises(ConfigError, match=r"overrides: train\.epochs: 0 \(no fine-tuning\) needs head_init: probe"):
        load_config(RewardConfig, overrides=["data.train=x", "train.epochs=0"])


@pytest.mark.parametrize("command", ["ppo", "grpo", "rloo", "online-dpo"])
def test_an_eval_limit_without_held_out_prompts_is_refused(command):
    """prompts.eval_limit limits prompts.eval: set without it, it would limit nothing."""
    from rlhfkit.registry import COMMANDS

    cls = COMMANDS[command].config_class()
    base = {"reward": {"spec": "task:sentiment"}, "critic_init": "policy"} if command == "ppo" else {}
    with pytest.raises(ConfigError, match=r"prompts\.eval_limit: limits the held-out prompts, and prompts\.eval"):
        load_config(cls, data={**base, "prompts": {"eval_limit": 8}})
    cfg = load_config(cls, data={**base, "prompts": {"eval_limit": 8, "eval": "task:sentiment"}})
    assert cfg.prompts.eval_limit == 8


def test_kl_keys_with_kl_coef_0_are_named_next_to_another_unused_key(caplog, monkeypatch):
    """GRPO with kl_coef 0 has no KL term: kl_bias_correction is not read (one warning), and a
    section can name several groups of unused keys, each with its own switch."""
    import logging

    from rlhfkit.config import loader
    from rlhfkit.trainers.grpo import GRPOConfig

    monkeypatch.setattr(loader, "_WARNED", set())
    base = ["reward.spec=task:sentiment", "kl_coef=0", "kl_bias_correction=true"]
    with caplog.at_level(logging.WARNING, logger="rlhfkit"):
        load_config(GRPOConfig, overrides=[*base, "ratio_level=sequence", "loss_agg=seq-mean-token-sum"])
    assert [r.getMessage() for r in caplog.records] == [
        "command-line overrides: loss_agg set but not used: ratio_level is sequence",
        "command-line overrides: kl_bias_correction set but not used: kl_coef is 0.0"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rlhfkit"):
        load_config(GRPOConfig, overrides=[*base[:1], "kl_coef=0.1", "kl_bias_correction=true"])
    assert not [r for r in caplog.records if "not used" in r.getMessage()]


@pytest.mark.parametrize("on, key, off", [("capability=task:arithmetic", "max_length=256", "sft_data"),
                                          ("sft_data=task:sentiment", "max_new_tokens=8", "capability")])
def test_an_alignment_tax_key_of_the_half_that_is_off_is_named(on, key, off, caplog, monkeypatch):
    """alignment_tax.max_length is read only with sft_data and max_new_tokens only with capability:
    with the other half alone, the key is named in the not-used warning; with both on, nothing is."""
    import logging

    from rlhfkit.config import loader
    from rlhfkit.eval.config import EvalConfig

    monkeypatch.setattr(loader, "_WARNED", set())
    base = ["policies=[a]", f"alignment_tax.{on}", f"alignment_tax.{key}"]
    with caplog.at_level(logging.WARNING, logger="rlhfkit"):
        load_config(EvalConfig, overrides=base)
    assert [r.getMessage() for r in caplog.records] == [
        f"command-line overrides: alignment_tax.{key.split('=')[0]} set but not used: alignment_tax.{off} is empty"]
    caplog.clear()
    both = "sft_data=task:sentiment" if off == "sft_data" else "capability=task:arithmetic"
    with caplog.at_level(logging.WARNING, logger="rlhfkit"):
        load_config(EvalConfig, overrides=[*base, f"alignment_tax.{both}"])
    assert not [r for r in caplog.records if "not used" in r.getMessage()]


@pytest.mark.parametrize("cls, overrides, warning", [
    ("SFTConfig", ["model.lora.r=8", "model.lora.alpha=16"],
     "model.lora.r, model.lora.alpha set but not used: model.lora.enabled is false"),
    ("PPOConfig", ["ptx.data=x.jsonl"], "ptx.data set but not used: ptx.coef is 0.0"),
    ("DPOConfig", ["sft_first.lr=1e-4"], "sft_first.lr set but not used: sft_first.enabled is false"),
    ("SFTConfig", ["data.eval=h.jsonl", "data.eval_fraction=0.2"], "data.eval_fraction set but not used: data.eval "
                                                                   "is h.jsonl"),
    ("RLOOConfig", ["loss_agg=seq-mean-token-mean"], "loss_agg set but not used: ratio_level is sequence"),
    ("GRPOConfig", ["ratio_level=sequence-mean", "kl_coef=0", "loss_agg=seq-mean-token-sum"],
     "loss_agg set but not used: ratio_level is sequence-mean"),
    ("EvalConfig", ["alignment_tax.limit=8"], "alignment_tax.limit set but not used: alignment_tax.sft_data is empty "
                                              "and alignment_tax.capability is empty"),
])
def test_keys_of_a_section_that_is_off_are_named_in_one_warning(cls, overrides, warning, caplog, monkeypatch):
    """model.lora.r without model.lora.enabled, ptx.data with ptx.coef 0, sft_first.* without
    sft_first.enabled: nothing reads them, and the run would silently do without; one warning
    names them (once per config), and none when the section is on."""
    import logging

    import rlhfkit.config as config
    from rlhfkit.config import loader
    from rlhfkit.trainers.dpo import DPOConfig
    from rlhfkit.eval.config import EvalConfig
    from rlhfkit.trainers.grpo import GRPOConfig, RLOOConfig
    from rlhfkit.trainers.ppo import PPOConfig

    monkeypatch.setattr(loader, "_WARNED", set())
    klass = {"SFTConfig": config.SFTConfig, "PPOConfig": PPOConfig, "DPOConfig": DPOConfig, "GRPOConfig": GRPOConfig,
             "RLOOConfig": RLOOConfig, "EvalConfig": EvalConfig}[cls]
    needed = {"SFTConfig": ["data.train=task:sentiment"], "DPOConfig": ["data.train=task:sentiment"],
              "PPOConfig": ["reward.spec=task:sentiment", "critic_init=policy"],
              "EvalConfig": ["policies=[a]"]}.get(cls, ["reward.spec=task:sentiment"])
    overrides = [*needed, *overrides]
    with caplog.at_level(logging.WARNING, logger="rlhfkit"):
        cfg = config.load_config(klass, overrides=overrides)
        config.validate(cfg)
    assert [r.getMessage() for r in caplog.records] == [f"command-line overrides: {warning}"]
    caplog.clear()
    switch = {"SFTConfig": "model.lora.enabled=true", "PPOConfig": "ptx.coef=0.1",
              "DPOConfig": "sft_first.enabled=true", "GRPOConfig": "ratio_level=token",
              "RLOOConfig": "ratio_level=token", "EvalConfig": "alignment_tax.capability=task:arithmetic"}[cls]
    if "data.eval=h.jsonl" in overrides:
        overrides, switch = [o for o in overrides if o != "data.eval=h.jsonl"], "data.eval="
    with caplog.at_level(logging.WARNING, logger="rlhfkit"):
        config.load_config(klass, overrides=[*overrides, switch])
    assert not [r for r in caplog.records if "not used" in r.getMessage()]


@pytest.mark.parametrize("value, trackers", [("none", []), ("[none]", []), ("[NONE]", []), ("null", []),
                                             ("tensorboard", ["tensorboard"]), ("[tensorboard]", ["tensorboard"]),
                                             ("[]", []), ("all", ["tensorboard"])])
def test_report_to_takes_one_name_none_or_all_as_trl_does(value, trackers, monkeypatch):
    from rlhfkit.config import extras

    monkeypatch.setattr(extras, "installed", lambda module: module == "tensorboard")  # all: the installed ones
    cfg = load_config(SFTConfig, overrides=["data.train=task:sentiment", f"train.report_to={value}"])
    assert cfg.train.report_to == trackers


def test_eval_refuses_several_greedy_samples_per_prompt():
    """At temperature 0 the n samples of a prompt are one response n times: the win rate's
    interval would count copies as independent samples."""
    from rlhfkit.eval.config import EvalConfig

    with pytest.raises(ConfigError, match=r"rollout\.n: 2 greedy samples \(rollout\.temperature 0\) per prompt are "
                                          r"copies of one; use rollout\.n=1"):
        load_config(EvalConfig, overrides=["policies=[a]", "rollout.temperature=0"])
    assert load_config(EvalConfig, overrides=["policies=[a]", "rollout.temperature=0", "rollout.n=1"]).rollout.n == 1


@pytest.mark.parametrize("override", ["rollout.top_k=50", "rollout.top_p=0.9"])
def test_eval_refuses_filtered_sampling(override):
    """A top-k or top-p sample is drawn from a filtered distribution, while the KL column compares
    the whole distribution's log-probs: its figure would be no KL."""
    from rlhfkit.eval.config import EvalConfig

    with pytest.raises(ConfigError, match=r"rollout: top_k \d+, top_p [\d.]+: eval samples from the whole "
                                          r"distribution .* \(set top_k 0, top_p 1\)$"):
        load_config(EvalConfig, overrides=["policies=[a]", override])
    # greedy decoding is what it is whatever the filter
    assert load_config(EvalConfig, overrides=["policies=[a]", override, "rollout.temperature=0", "rollout.n=1"])


def test_a_foreign_key_is_named_when_a_section_is_built_alone():
    from rlhfkit.config.loader import build

    with pytest.raises(ConfigError, match=r"learning_rate: unknown key \(rlhfkit's key for it: optim\.lr;"):
        build(SFTConfig, {"learning_rate": 1e-5}, "", "api")


def test_every_unknown_key_of_a_section_is_named_in_the_one_line(tmp_path):
    """A YAML written for another library has several unknown keys: all of one section are named at
    once, each with its hint, rather than one per run."""
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  train: x\nlearning_rate: 1.0e-5\nnum_train_epochs: 2\ntrian: {seed: 1}\n")
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, p)
    assert str(e.value).startswith(
        f"{p}: learning_rate: unknown key (rlhfkit's key for it: optim.lr; docs/coming_from_trl.md); "
        "num_train_epochs: unknown key (rlhfkit's key for it: train.epochs; docs/coming_from_trl.md); "
        "trian: unknown key (did you mean train?); known keys: ")


@pytest.mark.parametrize("attr, value, match", [
    ("optim.schedule", "linaer", r"config: optim\.schedule: must be one of \['cosine', 'linear', 'constant'\], got "
                                 r"'linaer'"),
    ("advantage", "rlooo", r"config: advantage: must be one of \['grpo', 'rloo', 'reinforce'\]"),
    ("optim.lr", "abc", r"config: optim\.lr: expected a number, got str 'abc'"),
    ("train.batch_size", 8.0, r"config: train\.batch_size: expected an integer, got float 8\.0"),
    ("rollout.n", "8", r"config: rollout\.n: expected an integer, got str '8'"),
    ("train.not_a_key", 3, r"config: train\.not_a_key: unknown key"),
    ("reward.spec", 3, r"config: reward\.spec: expected string or list or a function, got int 3"),
])
def test_a_config_changed_in_python_after_loading_is_checked_as_a_loaded_one(attr, value, match):
    """Every train_* starts with validate(cfg): a key set in Python after load_config gets the
    checks load_config gives (type, allowed values, unknown keys), not a run of another option or
    a traceback from deep inside."""
    from rlhfkit.config import validate
    from rlhfkit.trainers.grpo import GRPOConfig

    cfg = load_config(GRPOConfig, overrides=["reward.spec=task:sentiment"])
    *path, last = attr.split(".")
    obj = cfg
    for p in path:
        obj = getattr(obj, p)
    setattr(obj, last, value)
    with pytest.raises(ConfigError, match=match):
        validate(cfg)


def test_a_path_a_mapping_or_a_function_set_in_python_after_loading_is_taken_as_loading_takes_it(tmp_path):
    from rlhfkit.config import validate
    from rlhfkit.trainers.grpo import GRPOConfig

    def shorter(prompts, responses):
        return [-float(len(r)) for r in responses]

    cfg = load_config(GRPOConfig, overrides=["reward.spec=task:sentiment"])
    cfg.train.output_dir, cfg.optim, cfg.reward.spec = tmp_path / "run", {"lr": 1e-4}, shorter
    validate(cfg)
    assert cfg.train.output_dir == str(tmp_path / "run") and cfg.reward.spec == [shorter]
    assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_ratio) == (1e-4, "constant", 0.0)  # GRPO's defaults
    assert load_config(GRPOConfig, data={"reward": {"spec": shorter}}).reward.spec == [shorter]
