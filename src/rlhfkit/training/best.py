"""``train.select_best``: the best evaluation so far and its models (`training.loop`).

After each evaluation that improves METRIC the models are written to ``output_dir/best-pending``;
the next checkpoint, which records that best, makes them ``output_dir/best`` (and so does the end
of the run). ``best/`` therefore always holds the best step of the newest checkpoint: a run killed
between a new best and its checkpoint resumes with the best that checkpoint knew, its models in
place, and the pending ones (of steps the resumed run does again) are dropped, never mixed in.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from rlhfkit.config import ConfigError
from rlhfkit.io import copy_tree_atomic, write_json_atomic
from rlhfkit.training.checkpoint import CKPT_PREFIX, Checkpointer

log = logging.getLogger("rlhfkit")

LOWER_IS_BETTER = ("loss", "ppl", "kl", "perplexity", "nll")
BEST, PENDING = "best", "best-pending"  # directories in output_dir
BEST_STEP = "step.json"  # in each: the step its models are from, written after them


def greater_is_better(metric: str, mode: str = "auto") -> bool:
    """Direction of ``metric``: explicit ``mode`` "max"/"min", or inferred from its name (losses,
    perplexities and KLs are minimised, anything else maximised)."""
    if mode != "auto":
        return mode == "max"
    leaf = metric.rsplit("/", 1)[-1].lower()
    return not any(word in leaf for word in LOWER_IS_BETTER)


@dataclass
class Best:
    """The best evaluation so far of ``metric`` (for ``select_best`` and early stopping)."""

    metric: str
    higher: bool
    step: int | None = None
    value: float | None = None
    stale: int = 0  # evaluations since the last improvement

    def update(self, step: int, metrics: dict) -> bool:
        """Record an evaluation; returns whether it is the new best."""
        if self.metric not in metrics:
            raise ConfigError(f"train.select_best: {self.metric!r} is not among the evaluation metrics "
                              f"{sorted(k for k in metrics if k.startswith('eval/'))}")
        v = float(metrics[self.metric])
        better = math.isfinite(v) and (self.value is None or (v > self.value if self.higher else v < self.value))
        if better:
            self.step, self.value, self.stale = step, v, 0
        else:
            self.stale += 1
        return better

    def state_dict(self) -> dict:
        return {"step": self.step, "value": self.value, "stale": self.stale}

    def load_state_dict(self, state: dict | None) -> None:
        state = state or {}
        self.step, self.value, self.stale = state.get("step"), state.get("value"), int(state.get("stale", 0))

    def reset(self) -> None:
        self.step, self.value, self.stale = None, None, 0


def best_tracker(train) -> Best | None:
    """A `Best` for ``train.select_best`` (its direction by ``select_best_mode``), None without one."""
    metric = getattr(train, "select_best", "")
    if not metric:
        return None
    return Best(metric, greater_is_better(metric, getattr(train, "select_best_mode", "auto")))


def saved_step(out: Path, name: str = BEST) -> int | None:
    """The step whose models ``out/name`` holds (complete), or None."""
    try:
        return int(json.loads((Path(out) / name / BEST_STEP).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def consider(run, best: Best | None, step: int, metrics: dict, models: dict) -> None:
    """Write the models to ``best-pending`` when this evaluation is the best so far (a collective)."""
    if best is None or not best.update(step, metrics):
        return
    pending = run.out / PENDING
    if run.is_main:
        (pending / BEST_STEP).unlink(missing_ok=True)  # a crash between the models: no step claimed
    for name, model in models.items():
        run.strategy.save_model(model, run.tokenizer, pending / name)
    if run.is_main:
        write_json_atomic(pending / BEST_STEP, {"step": step})


def promote(run) -> None:
    """``best-pending`` (complete) becomes ``best``: after a checkpoint that records it, and at the
    end of the run. A collective; the main process moves the directories."""
    if run.is_main and saved_step(run.out, PENDING) is not None:
        _move_pending(run.out)
    run.strategy.wait()


def _move_pending(out: Path) -> None:
    old = out / f".{BEST}.old-promote"
    shutil.rmtree(old, ignore_errors=True)
    if (out / BEST).exists():
        (out / BEST).rename(old)
    (out / PENDING).rename(out / BEST)
    shutil.rmtree(old, ignore_errors=True)


def restore(run, ckpt: Checkpointer, best: Best, models: dict) -> None:
    """On resume, with ``best`` loaded from the checkpoint: ``best-pending`` becomes ``best`` if it
    holds the checkpoint's best (killed between the checkpoint and the move), else it is dropped (a
    best of steps after the checkpoint). Then ``best`` must hold the best step's models: if it does
    not (a crash while it was written), they are copied from that step's checkpoint when there is
    one; otherwise the best is chosen again from the evaluations that follow, and a warning says so."""
    # rank 0's readings, before any write: every rank then decides alike
    pending, saved = run.strategy.gather_objects([(saved_step(run.out, PENDING), saved_step(run.out))])[0]
    recorded = pending is not None and pending == best.step
    if run.is_main:
        if recorded:
            _move_pending(run.out)
        else:
            shutil.rmtree(run.out / PENDING, ignore_errors=True)
    run.strategy.wait()
    if recorded:
        saved = pending
    if best.step is None or saved == best.step:
        return
    source = next((p for p in ckpt.all() if p.name == f"{CKPT_PREFIX}{best.step:08d}"), None)
    if source is not None and all((source / name).is_dir() for name in models):
        if run.is_main:
            (run.out / BEST / BEST_STEP).unlink(missing_ok=True)
            for name in models:
                copy_tree_atomic(source / name, run.out / BEST / name)
            write_json_atomic(run.out / BEST / BEST_STEP, {"step": best.step})
        run.strategy.wait()
        return
    log.warning("[%s] %s does not hold step %d, the best %s so far, and no checkpoint does: the best is chosen "
                "again from the evaluations that follow", run.kind, run.out / BEST, best.step, best.metric)
    best.reset()
