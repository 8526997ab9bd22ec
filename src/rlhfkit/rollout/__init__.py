"""Rollouts: batched KV-cache generation and the Experience record every trainer consumes."""

from rlhfkit.rollout.experience import Experience
from rlhfkit.rollout.generate import generate, left_pad

__all__ = ["Experience", "generate", "left_pad"]
