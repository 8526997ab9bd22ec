"""Rollouts: prompts, backends that sample (own KV-cache engine, plain generate), and the Experience record every trainer consumes."""

from rlhfkit.rollout.backends import (
           BACKENDS,
           HFGenerate,
           OwnEngine,
           RolloutBackend,
           make_backend,
)
from rlhfkit.rollout.engine import generate, left_pad
from rlhfkit.rollout.experience import Experience
from rlhfkit.rollout.prompts import PromptItem, load_prompt_items
from rlhfkit.rollout.sampling import (
           decode_responses,
           rank_stream_seed,
           response_metrics,
           rollout,
)

__all__ = ["BACKENDS", "Experience", "HFGenerate", "OwnEngine", "PromptItem", "RolloutBackend", "decode_responses",
           "generate", "left_pad", "load_prompt_items", "make_backend", "rank_stream_seed", "response_metrics",
           "rollout"]
