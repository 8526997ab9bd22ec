"""Helpers for the policy-gradient tests: a tiny peaked policy, prompts of unequal lengths and a
trivially learnable reward written as a plain Python file (the way users plug rewards in)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

WORDS = "tell me a short story about the sea and the sky please now".split()

# Reward: the share of the response's characters that are the letter "e". A random policy writes
# some; a policy that learns to prefer e-heavy tokens writes many. Dense, so a few steps suffice.
REWARD_SRC = """
def e_share(prompts, responses):
    return [r.count("e") / max(len(r), 1) for r in responses]
"""


def write_prompts(path: Path, n: int = 48, seed: int = 0) -> Path:
    """Prompts of 1..12 words: their chat renderings differ in length, so batches are left-padded."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))}) + "\n")
    return path


def write_reward(path: Path) -> str:
    path.write_text(REWARD_SRC)
    return f"{path}:e_share"


def tiny_policy_dir(tokenizer, out: Path, seed: int = 0, scale: float = 20.0) -> Path:
    """A 1-layer random Llama with the real vocabulary, saved as a model directory.

    The embeddings (tied to the LM head) are scaled up so that the next-token distribution is
    peaked, like a trained LM's, instead of uniform over 49k tokens: policy gradient then has
    a few likely tokens to choose between and learns in a handful of steps.
    """
    from rlhfkit.models import save_pretrained_atomic, tiny_causal_lm

    model = tiny_causal_lm(tokenizer, hidden_size=32, layers=1, heads=2, seed=seed)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(scale)
    save_pretrained_atomic(model, tokenizer, out)
    return out


def base_config(tmp_path: Path, tokenizer, **over) -> dict:
    """Config dict shared by the PPO/GRPO tests (the trainers' own defaults are for real models)."""
    model_dir = tmp_path / "policy"
    if not model_dir.exists():
        tiny_policy_dir(tokenizer, model_dir)
    cfg = {
        "model": {"name": str(model_dir)},
        "prompts": {"train": str(write_prompts(tmp_path / "prompts.jsonl"))},
        "reward": {"spec": write_reward(tmp_path / "reward_fn.py")},
        "optim": {"lr": 1e-2},
        "train": {"output_dir": str(tmp_path / "run"), "batch_size": 8, "micro_batch_size": 16, "max_steps": 8,
                  "progress": False},
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
