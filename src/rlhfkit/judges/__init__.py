"""Judges: gold oracles, reward functions, reward-model scoring."""

from rlhfkit.judges.rewards import (
    RewardFn,
    RewardFunctionError,
    build_reward_fn,
    prompt_text,
    python_reward_fn,
    reward_model_fn,
    task_reward_fn,
)

__all__ = ["RewardFn", "RewardFunctionError", "build_reward_fn", "prompt_text", "python_reward_fn",
           "reward_model_fn", "task_reward_fn"]
