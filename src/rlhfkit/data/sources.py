"""Resolve the data sources named in configs, including the built-in tasks' shipped files."""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path
from typing import Any, Callable

# What a config reads before it runs (its `inputs()`): (config key, value, a check that reads the
# value as the run does, raising ValueError, FileNotFoundError or ImportError)
Input = tuple[str, Any, Callable[[], object]]

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
    if not name or not task_data_dir(name).is_dir():
        shipped = sorted(d.name for d in task_data_dir("").iterdir() if d.is_dir() and not d.name.startswith("_"))
        raise FileNotFoundError(f"{spec}: no built-in task {name!r} (tasks with data: {', '.join(shipped)})")
    path = task_data_dir(name) / fname
    if not path.is_file():
        have = sorted(f.name for f in task_data_dir(name).glob("*.jsonl"))
        raise FileNotFoundError(f"{spec}: task {name} ships no {fname} (it ships {', '.join(have) or 'no data'}); "
                                f"`rlhfkit make-data --task {name} --out DIR` writes one to give as DIR/{fname}")
    return str(path)


def source_list(spec: str | list[str]) -> list[str]:
    """The sources of a data key: one spec, or a list of specs read in order."""
    return [spec] if isinstance(spec, str) else list(spec)


def load_sources(spec: str | list[str], kind: str, load: Callable[[str], list]) -> list:
    """The examples of every source in ``spec`` (`source_list`, each through `resolve_source`),
    concatenated in order; ``load`` validates each file (errors name that file and line)."""
    return [ex for one in source_list(spec) for ex in load(resolve_source(one, kind))]


def source_inputs(key: str, spec: str | list[str], kind: str, load: Callable[[str], list]) -> list[Input]:
    """One `Input` per source of a data key, its check reading that source as `load_sources` does."""
    return [(key, one, partial(load_sources, one, kind, load)) for one in source_list(spec)]


def data_inputs(data, kind: str, load: Callable[[str], list]) -> list[Input]:
    """The `Input`s of a data section (``data.train``, ``data.eval``), read as `train_and_eval` reads them."""
    return [*source_inputs("data.train", data.train, kind, load), *source_inputs("data.eval", data.eval, kind, load)]


def train_and_eval(data, kind: str, load: Callable[[str], list], seed: int) -> tuple[list, list]:
    """A data section's training examples (the first ``data.limit`` when set) and held-out ones:
    ``data.eval``'s, or ``data.eval_fraction`` of the training examples split off by ``seed``."""
    train = load_sources(data.train, kind, load)
    if data.limit:
        train = train[:data.limit]
    if data.eval:
        return train, load_sources(data.eval, kind, load)
    return split_eval(train, data.eval_fraction, seed)


def split_eval(examples: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """Deterministically hold out ``eval_fraction`` of ``examples`` (at least one when > 0)."""
    if eval_fraction <= 0 or len(examples) < 2:
        return examples, []
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, int(round(len(examples) * eval_fraction)))
    held = set(idx[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]
