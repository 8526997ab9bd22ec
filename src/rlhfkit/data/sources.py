"""Resolve the data sources named in configs, including the built-in tasks' shipped files."""

from __future__ import annotations

import random
from pathlib import Path

TASK_FILES = {"sft": "sft.jsonl", "preference": "preference.jsonl", "prompts": "prompts_train.jsonl",
              "prompts_eval": "prompts_eval.jsonl"}


def task_data_dir(task: str) -> Path:
    return Path(__file__).resolve().parent.parent / "tasks" / "data" / task


def resolve_source(spec: str, kind: str) -> str:
    """``task:NAME`` -> the file of that kind shipped with built-in task NAME; anything else unchanged.

    ``task:NAME/file.jsonl`` names a specific shipped file.
    """
    if not spec.startswith("task:"):
        return spec
    name = spec[len("task:"):]
    if "/" in name:
        name, fname = name.split("/", 1)
    else:
        fname = TASK_FILES[kind]
    path = task_data_dir(name) / fname
    if not path.is_file():
        raise FileNotFoundError(f"{spec}: built-in task data {path} not found "
                                f"(generate it with `rlhfkit make-data --task {name}`)")
    return str(path)


def split_eval(examples: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """Deterministically hold out ``eval_fraction`` of ``examples`` (at least one when > 0)."""
    if eval_fraction <= 0 or len(examples) < 2:
        return examples, []
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, int(round(len(examples) * eval_fraction)))
    held = set(idx[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]
