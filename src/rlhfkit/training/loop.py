"""The one training loop every trainer runs: resume, step, evaluate, keep the best, log, checkpoint.

    result = fit(run, step_fn, total, models={"model": model}, optimizers={...}, evaluate=evaluate)

``step_fn(step) -> metrics`` is the method: one optimizer step of SFT, the reward model or DPO
(`accumulate.supervised_step`), one PPO/GRPO iteration, one online-DPO iteration. Everything around
it is the same for all of them and lives here:
- resume from the newest complete checkpoint (weights, optimizer and scheduler states, RNG, the
  step guard, the best-so-far record and the trainer's own state);
- a held-out evaluation at step 0 and every ``train.eval_every`` steps and at the end;
- ``train.select_best: METRIC``: after each evaluation the models are kept when METRIC improved
  (`training.best`: ``output_dir/best`` once a checkpoint records them); at the end the best ones
  become the final model, so no run silently ends worse than its best evaluation (the starting
  point, step 0, included);
- ``train.early_stopping_patience``: stop after that many evaluations without improvement;
- metrics every ``train.log_every`` steps, a checkpoint every ``train.save_every`` steps and at the
  last one (0: none).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rlhfkit.io import read_jsonl_lenient, to_builtin
from rlhfkit.training.best import BEST, Best, best_tracker, consider, promote, restore, saved_step
from rlhfkit.training.checkpoint import Checkpointer, load_checkpoint, save_checkpoint
from rlhfkit.training.logger import RunLogger
from rlhfkit.training.rundir import RunDirError


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
    best = best_tracker(train)
    start = _resume(run, ckpt, models, optimizers, best, load_state) if train.resume else 0
    if start > total:  # a length by epochs below the checkpoint's step (max_steps: refused by open_run)
        raise RunDirError(f"cannot continue {run.out} to step {total}: its newest checkpoint is step {start}, past "
                          f"the new length (train.epochs); give a length of at least {start} steps, or start over "
                          "with train.overwrite=true")
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
        consider(run, best, 0, first, models)
        metrics = dict(first)  # the final metrics of a run of 0 steps (an RM that is its probe alone)
    done = start
    for step in range(start, total):
        metrics = step_fn(step)
        metrics["train/skipped_steps"] = run.guard.skipped_total
        stop = evaluated = False
        if evaluate is not None and ((train.eval_every and (step + 1) % train.eval_every == 0) or step + 1 == total):
            metrics.update(evaluate())
            consider(run, best, step + 1, metrics, models)
            stop, evaluated = best is not None and 0 < train.early_stopping_patience <= best.stale, True
        if (step + 1) % train.log_every == 0 or step + 1 == total or stop or evaluated:  # every evaluation
            run.logger.log(step + 1, metrics, show=show)
        run.logger.advance()
        # every save_every steps, and at the end (so that a finished run can be continued for longer)
        if train.save_every and ((step + 1) % train.save_every == 0 or step + 1 == total or stop):
            _save(run, ckpt, step + 1, models, optimizers, best, state_fn)
        strategy.wait()
        done = step + 1
        if stop:
            stopped_at = done
            run.logger.write(f"[{run.kind}] early stopping at step {done}: {best.metric} has not improved "
                             f"for {best.stale} evaluations (best {best.value:.4g} at step {best.step})")
            break
    result = FitResult({k: to_builtin(v) for k, v in metrics.items()}, done)  # numbers, not tensors
    if best is not None and best.step is not None:
        _keep_best(run, best, result, models, stopped_at)
    run.logger.close()
    return result


def _save(run, ckpt: Checkpointer, step: int, models: dict, optimizers: dict, best: Best | None,
          state_fn: Callable[[], dict]) -> None:
    """A checkpoint of ``step`` with the guard, the best-so-far record and the trainer's state."""
    state = {"kind": run.kind, "run_id": run.run_id, "guard": run.guard.state_dict(), **state_fn()}
    if best is not None:
        state["best"] = best.state_dict()
    save_checkpoint(ckpt, run.strategy, step, models, optimizers, state, run.tokenizer)
    if best is not None:
        promote(run)  # the checkpoint records the best: its models become best/


def _keep_best(run, best: Best, result: FitResult, models: dict, stopped_at: int | None) -> None:
    """The run is over: record the best evaluation in ``result.best`` and, unless it is the last
    step, load its models from ``output_dir/best`` as the final ones."""
    result.best = {"metric": best.metric, "step": best.step, "value": best.value}
    if stopped_at is not None:  # train.early_stopping_patience ended the run there
        result.best["stopped_early_at"] = stopped_at
    promote(run)  # the last best is final
    if best.step == result.steps:
        return
    if saved_step(run.out) != best.step:
        raise RuntimeError(f"{run.out / BEST} does not hold step {best.step}, the best {best.metric}: "
                           "not loading another step's weights as the final model")
    for name, model in models.items():
        run.strategy.load_weights(model, run.out / BEST / name)
    _describe_the_kept_model(run, result, best.step)
    run.logger.write(f"[{run.kind}] final model: step {best.step}, the best {best.metric} ({best.value:.4g})")


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


def _resume(run, ckpt: Checkpointer, models: dict, optimizers: dict, best: Best | None,
            load_state: Callable[[dict], None] | None) -> int:
    """Load the newest complete checkpoint into the models and optimizers; returns its step (0: none).
    The one `open_run` chose and verified is loaded without hashing it again."""
    last = run.checkpoint or ckpt.latest()
    if last is None:
        return 0
    state: dict[str, Any] = load_checkpoint(last, run.strategy, models, optimizers)
    run.guard.load_state_dict(state.get("guard"))
    if best is not None:
        best.load_state_dict(state.get("best"))
        restore(run, ckpt, best, models)
    if load_state is not None:
        load_state(state)
    return int(state["step"])
