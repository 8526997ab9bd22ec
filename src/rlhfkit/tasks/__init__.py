"""Built-in tasks: prompts, a gold judge and a simulated annotator for RLHF without humans.

    task = get_task("sentiment")          # or "arithmetic"
    task.train_prompts(n=256, seed=0)     # [{"prompt": ..., "category": ...}, ...]
    task.gold_scores(prompts, responses)  # r*(x, a)
    task.annotator(beta=5.0).label(prompts, a1s, a2s)

Shipped demo data (built with `rlhfkit make-data`) lives in `data_dir(name)`.
"""

from __future__ import annotations

from pathlib import Path

from rlhfkit.tasks.annotator import SimulatedAnnotator
from rlhfkit.tasks.arithmetic import ArithmeticTask
from rlhfkit.tasks.base import Task
from rlhfkit.tasks.sentiment import SentimentTask

_TASKS: dict[str, type[Task]] = {t.name: t for t in (SentimentTask, ArithmeticTask)}
_INSTANCES: dict[str, Task] = {}


def list_tasks() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str | Task) -> Task:
    """The task called `name` (one shared instance per name); a Task passes through."""
    if isinstance(name, Task):
        return name
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(list_tasks())}")
    if name not in _INSTANCES:
        _INSTANCES[name] = _TASKS[name]()
    return _INSTANCES[name]


def data_dir(name: str) -> Path:
    """Directory of the data shipped with task `name` (may not exist for every task)."""
    return Path(__file__).resolve().parent / "data" / name


__all__ = ["ArithmeticTask", "SentimentTask", "SimulatedAnnotator", "Task", "data_dir", "get_task", "list_tasks"]
