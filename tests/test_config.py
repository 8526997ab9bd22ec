"""Config loading: YAML + dotted overrides, validated with located messages."""

import pytest

from rlhfkit.config import ConfigError, RewardConfig, SFTConfig, load_config


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  train: a.jsonl\noptim:\n  lr: 3e-5\ntrain:\n  batch_size: 16\n  micro_batch_size: 4\n")
    cfg = load_config(SFTConfig, p, ["optim.lr=1e-4", "train.epochs=2"])
    assert cfg.optim.lr == 1e-4 and cfg.train.batch_size == 16 and cfg.train.epochs == 2.0
    assert isinstance(cfg.optim.lr, float)
    assert load_config(RewardConfig, overrides=["data.train=x"]).optim.lr == 1e-5


@pytest.mark.parametrize("overrides,match", [
    (["data.train=x", "optim.lrr=1"], r"optim\.lrr: unknown key \(did you mean optim\.lr\?\)"),
    (["data.train=x", "train.batch_size=abc"], r"train\.batch_size: expected an integer, got str 'abc'"),
    (["data.train=x", "train.batch_size=12", "train.micro_batch_size=8"], r"not divisible by micro_batch_size"),
    (["optim.lr=1e-5"], r"data\.train: a training data source is required"),
    (["data.train=x", "data.truncation=middle"], r"data\.truncation: must be one of"),
    (["data.train=x", "optim.lr=-1"], r"optim\.lr: must be > 0"),
    (["data.train=x", "model=3"], r"model: expected a mapping"),
    (["nokey"], r"expected key\.path=value"),
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
