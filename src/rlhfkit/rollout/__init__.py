"""Rollouts: prompts, batched KV-cache generation, and the Experience record every trainer consumes."""

from rlhfkit.rollout.engine import generate, left_pad
from rlhfkit.rollout.experience import Experience
from rlhfkit.rollout.prompts import PromptItem, load_prompt_items
from rlhfkit.rollout.sampling import decode_responses, rank_stream_seed, response_metrics, rollout

__all__ = ["Experience", "PromptItem", "decode_responses", "generate", "left_pad", "load_prompt_items",
           "rank_stream_seed", "response_metrics", "rollout"]
