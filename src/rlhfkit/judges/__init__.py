"""Judges: gold oracles, reward functions, reward-model scoring."""

from rlhfkit.judges.reward_set import (
    RewardScores,
    RewardSet,
    build_reward_set,
    check_reward_set,
    reward_metrics,
)
from rlhfkit.judges.rewards import (
    RewardFn,
    RewardFunctionError,
    RewardSpecError,
    build_reward_fn,
    check_reward_spec,
    field_columns,
    prompt_text,
    python_reward_fn,
    reward_model_fn,
    task_reward_fn,
)

__all__ = ["RewardFn", "RewardFunctionError", "RewardScores", "RewardSet", "RewardSpecError", "build_reward_fn",
           "build_reward_set", "check_reward_set", "check_reward_spec", "field_columns", "prompt_text",
           "python_reward_fn", "reward_metrics", "reward_model_fn", "task_reward_fn"]
