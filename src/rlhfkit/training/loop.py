"""The one training loop every trainer runs: resume, step, evaluate, keep the best, log, checkpoint.

    result = fit(run, step_fn, total, models={"model": model}, optimizers={...}, evaluate=evaluate)

``step_fn(step) -> metrics`` is the method: one optimizer step of SFT, the reward model or DPO
(`accumulate.supervised_step`), one PPO/GRPO iteration, one online-DPO iteration. Everything around
it is the same for all of them and lives here:
- resume from the newest complete checkpoint (weights, optimizer and scheduler states, RNG, the
  step guard, the best-so-far record and the trainer's own state);
- a held-out evaluation at step 0 and every ``train.eval_every`` steps and at the end;
- ``train.select_best: METRIC``: after each evaluation the models are kept (``output_dir/best``) when
  METRIC improved; at the end the best ones become the final model, so no run silently ends worse
  than its best evaluation (the starting point, step 0, included);
- ``train.early_stopping_patience``: stop after that many evaluations without improvement;
- metrics every ``train.log_every`` steps, a checkpoint every ``train.save_every`` steps and at the
  last one (0: none).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rlhfkit.config import ConfigError
from rlhfkit.io import copy_tree_atomic, read_jsonl_lenient, to_builtin, write_json_atomic
from rlhfkit.training.checkpoint import CKPT_PREFIX, Checkpointer, load_checkpoint, save_checkpoint
from rlhfkit.training.logger import RunLogger

log = logging.getLogger("rlhfkit")

LOWER_IS_BETTER = ("loss", "ppl", "kl", "perplexity", "nll")


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


@dataclass
class FitResult:
    metrics: dict  # the last step's metrics (with the last evaluation's), as Python numbers
    steps: int  # steps done (fewer than planned after early stopping)
    best: dict = field(default_factory=dict)  # {"metric", "step", "value"} with select_best


def fit(run, step_fn: Callable[[int], dict], total: int, *, models: dict, optimizers: dict,
        evaluate: Callable[[], dict] | None = None, state_fn: Callable[[], dict] = dict,
        load_state: Callable[[dict], None] | None = None, on_start: Callable[[int], None] | None = None,
        show: tuple[str, ...] = ()) -> FitResult:
    """Run ``step_fn`` for steps [start, total) with everything a run needs around it (module doc).

    models / optimizers: what a checkpoint holds (with the RNG state); ``state_fn()`` adds the
    trainer's own state (e.g. the KL controller), which ``load_state(state)`` restores on resume.
    ``on_start(start)`` runs once the logger exists and before step 0's evaluation (the RM's probe).
    """
    strategy, train = run.strategy, run.train
    ckpt = Checkpointer(run.out, train.keep_checkpoints, enabled=run.is_main)
    best = _best_tracker(train)
    start = _resume(run, ckpt, models, optimizers, best, load_state) if train.resume else 0
    run.logger = RunLogger(run.out, total, enabled=run.is_main, progress=train.progress, desc=run.kind,
                           initial_step=start, report_to=getattr(train, "report_to", ("auto",)),
                           config=run.config)
    if on_start is not None:
        on_start(start)
    # a run that stopped early is finished: resuming it takes no more steps
    stopped_at = None
    if start and best is not None and 0 < train.early_stopping_patience <= best.stale:
        stopped_at = start
        run.logger.write(f"[{run.kind}] the run stopped early at step {start} ({best.metric} had not improved for "
                         f"{best.stale} evaluations): nothing to continue")
        total = start
    # a run resumed with nothing left to do keeps its last logged metrics as its final ones
    metrics: dict = last_logged(run.out, start) if start >= total and run.is_main else {}
    if start == 0 and evaluate is not None:
        first = evaluate()
        run.logger.log(0, first)
        _consider(run, best, 0, first, models)
        metrics = dict(first)  # the final metrics of a run of 0 steps (an RM that is its probe alone)
    done = start
    for step in range(start, total):
        metrics = step_fn(step)
        metrics["train/skipped_steps"] = run.guard.skipped_total
        stop = evaluated = False
        if evaluate is not None and ((train.eval_every and (step + 1) % train.eval_every == 0) or step + 1 == total):
            metrics.update(evaluate())
            _consider(run, best, step + 1, metrics, models)
            stop, evaluated = best is not None and 0 < train.early_stopping_patience <= best.stale, True
        if (step + 1) % train.log_every == 0 or step + 1 == total or stop or evaluated:  # every evaluation
            run.logger.log(step + 1, metrics, show=show)
        run.logger.advance()
        # every save_every steps, and at the end (so that a finished run can be continued for longer)
        if train.save_every and ((step + 1) % train.save_every == 0 or step + 1 == total or stop):
            state = {"kind": run.kind, "guard": run.guard.state_dict(), **state_fn()}
            if best is not None:
                state["best"] = best.state_dict()
            save_checkpoint(ckpt, strategy, step + 1, models, optimizers, state, run.tokenizer)
        strategy.wait()
        done = step + 1
        if stop:
            stopped_at = done
            run.logger.write(f"[{run.kind}] early stopping at step {done}: {best.metric} has not improved "
                             f"for {best.stale} evaluations (best {best.value:.4g} at step {best.step})")
            break
    result = FitResult({k: to_builtin(v) for k, v in metrics.items()}, done)  # numbers, not tensors
    if best is not None and best.step is not None:
        result.best = {"metric": best.metric, "step": best.step, "value": best.value}
        if stopped_at is not None:  # train.early_stopping_patience ended the run there
            result.best["stopped_early_at"] = stopped_at
        if best.step != done:  # the final model is the best one
            if _best_saved_step(run.out) != best.step:
                raise RuntimeError(f"{run.out / 'best'} does not hold step {best.step}, the best {best.metric}: "
                                   "not loading another step's weights as the final model")
            for name, model in models.items():
                strategy.load_weights(model, run.out / "best" / name)
            _describe_the_kept_model(run, result, best.step)
            run.logger.write(f"[{run.kind}] final model: step {best.step}, the best {best.metric} ({best.value:.4g})")
    run.logger.close()
    return result


def _describe_the_kept_model(run, result: FitResult, step: int) -> None:
    """The final eval/* metrics become those of the kept step's evaluation (the model the run
    writes); the last step's move to ``best["last_eval"]``. Rank 0 reads them from metrics.jsonl."""
    kept = {k: v for k, v in last_logged(run.out, step).items() if k.startswith("eval/")} if run.is_main else {}
    if kept:
        result.best["last_eval"] = {k: v for k, v in result.metrics.items() if k.startswith("eval/")}
        result.metrics = {**{k: v for k, v in result.metrics.items() if not k.startswith("eval/")}, **kept}


def last_logged(out, step: int) -> dict:
    """The metrics logged at ``step`` in ``out/metrics.jsonl`` (the last such line), without the
    step and time; {} if there is none."""
    rows = [r for r in read_jsonl_lenient(Path(out) / "metrics.jsonl") if r.get("step") == step]
    return {k: v for k, v in rows[-1].items() if k not in ("step", "time")} if rows else {}


def _best_tracker(train) -> Best | None:
    metric = getattr(train, "select_best", "")
    if not metric:
        return None
    return Best(metric, greater_is_better(metric, getattr(train, "select_best_mode", "auto")))


BEST_STEP = "step.json"  # in output_dir/best: the step its models are from, written after them


def _best_saved_step(out: Path) -> int | None:
    try:
        return int(json.loads((Path(out) / "best" / BEST_STEP).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _save_best(run, step: int, models: dict) -> None:
    if run.is_main:
        (run.out / "best" / BEST_STEP).unlink(missing_ok=True)  # a crash between the models: no step claimed
    for name, model in models.items():
        run.strategy.save_model(model, run.tokenizer, run.out / "best" / name)
    if run.is_main:
        write_json_atomic(run.out / "best" / BEST_STEP, {"step": step})


def _consider(run, best: Best | None, step: int, metrics: dict, models: dict) -> None:
    """Keep the models under ``output_dir/best`` when this evaluation is the best so far."""
    if best is None or not best.update(step, metrics):
        return
    _save_best(run, step, models)


def _restore_best(run, ckpt: Checkpointer, best: Best, models: dict) -> None:
    """``best/`` must hold the models of the restored best step. A run killed after writing a new
    best but before the checkpoint of that step leaves ``best/`` one step ahead of the checkpoint:
    its models are then taken from the checkpoint of the best step when there is one; otherwise the
    best is chosen again from the evaluations that follow, and a warning says so."""
    saved = run.strategy.gather_objects([_best_saved_step(run.out)])[0]  # rank 0's reading, before any write
    if best.step is None or saved == best.step:
        return
    source = next((p for p in ckpt.all() if p.name == f"{CKPT_PREFIX}{best.step:08d}"), None)
    if source is not None and all((source / name).is_dir() for name in models):
        if run.is_main:
            (run.out / "best" / BEST_STEP).unlink(missing_ok=True)
            for name in models:
                copy_tree_atomic(source / name, run.out / "best" / name)
            write_json_atomic(run.out / "best" / BEST_STEP, {"step": best.step})
        run.strategy.wait()
        return
    log.warning("[%s] %s does not hold step %d, the best %s so far, and no checkpoint does: the best is chosen "
                "again from the evaluations that follow", run.kind, run.out / "best", best.step, best.metric)
    best.reset()


def _resume(run, ckpt: Checkpointer, models: dict, optimizers: dict, best: Best | None,
            load_state: Callable[[dict], None] | None) -> int:
    """Load the newest complete checkpoint into the models and optimizers; returns its step (0: none)."""
    last = ckpt.latest()
    if last is None:
        return 0
    state: dict[str, Any] = load_checkpoint(last, run.strategy, models, optimizers)
    run.guard.load_state_dict(state.get("guard"))
    if best is not None:
        best.load_state_dict(state.get("best"))
        _restore_best(run, ckpt, best, models)
    if load_state is not None:
        load_state(state)
    return int(state["step"])
