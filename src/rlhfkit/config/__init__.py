"""Typed configuration: dataclass sections with documented fields, loaded from YAML plus dotted overrides.

    cfg = load_config(SFTConfig, "configs/sft.yaml", ["optim.lr=1e-5", "train.batch_size=16"])
"""

from rlhfkit.config.errors import ConfigError, under_key
from rlhfkit.config.loader import (
    build,
    dump_config,
    load_config,
    merge,
    parse_overrides,
    to_dict,
    validate,
)
from rlhfkit.config.policy import (
    PolicyTrainSection,
    PromptsSection,
    PTXSection,
    RewardSection,
    RolloutSection,
)
from rlhfkit.config.reward import RewardConfig
from rlhfkit.config.sections import (
    DataSection,
    LoraSection,
    ModelSection,
    OptimSection,
    SFTConfig,
    TrainSection,
)

__all__ = [
    "ConfigError", "DataSection", "LoraSection", "ModelSection", "OptimSection", "PTXSection", "PolicyTrainSection",
    "PromptsSection", "RewardConfig", "RewardSection", "RolloutSection", "SFTConfig", "TrainSection", "dump_config",
    "build", "load_config", "merge", "parse_overrides", "to_dict", "validate",
]
