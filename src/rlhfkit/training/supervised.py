"""What the supervised trainers (SFT, reward model, DPO) share around their loss: the optimizer and
schedule prepared by the strategy, the step over one global batch, and the loop.

    model, optimizer, scheduler = prepare_optimization(strategy, model, cfg.optim, cfg.train, total)
    result = fit_supervised(run, model, optimizer, scheduler, train, loss_fn, total=total, ...)
"""

from __future__ import annotations

from typing import Callable

from rlhfkit.parallel.precision import keep_master_fp32
from rlhfkit.training.accumulate import accumulate, normalizer
from rlhfkit.training.batches import batch_indices, left_out, micro_batches
from rlhfkit.training.loop import FitResult, fit
from rlhfkit.training.optim import build_optimizer, build_scheduler


def prepare_optimization(strategy, model, optim, train, total: int):
    """AdamW and its schedule over ``total`` steps, then the strategy's preparation of ``model`` (sharded,
    a ZeRO engine, or as it is). Returns (model, optimizer, scheduler). Trained parameters are made
    fp32 first (master weights, whatever the model was loaded in), so the optimizer state is fp32."""
    keep_master_fp32(model)
    optimizer = build_optimizer(model, optim)
    scheduler = build_scheduler(optimizer, optim, total)
    model, optimizer = strategy.prepare(model, optimizer, micro_batch_size=train.micro_batch_size,
                                        max_grad_norm=optim.max_grad_norm)
    return model, optimizer, scheduler


def supervised_step(run, model, optimizer, scheduler, examples: list, loss_fn: Callable, max_grad_norm: float,
                    count: Callable[[list], int] = len, count_name: str | None = None) -> Callable[[int], dict]:
    """The step function of the supervised trainers (SFT, reward model, DPO) for `training.fit`.

    Step ``i`` takes its global batch (``train.batch_size`` examples, `batch_indices`), this rank's
    share in micro-batches, and accumulates ``loss_fn(chunk, normalizer) -> (loss, sums)``. The
    logged metrics are ``train/<k>`` = the global sum of ``sums[k]`` / ``count(global batch)`` (tokens
    for SFT, pairs for RM and DPO); ``count_name`` also logs that count.
    """
    strategy, train = run.strategy, run.train

    def step(i: int) -> dict:
        global_batch = [examples[j] for j in batch_indices(len(examples), train.batch_size, i, train.seed,
                                                           train.drop_last)]
        counted = count(global_batch)
        n = max(counted, 1)
        norm = normalizer(strategy, n)
        chunks = micro_batches(strategy.shard(global_batch), train.micro_batch_size)
        sums = accumulate(strategy, model, chunks, lambda chunk: loss_fn(chunk, norm))
        metrics = {f"train/{k}": strategy.sum(v) / n for k, v in sums.items()}
        lr = scheduler.get_last_lr()[0]  # the rate this step's update runs at (the scheduler then moves on)
        _, gnorm = strategy.step(model, optimizer, scheduler, max_grad_norm, metrics["train/loss"], run.guard)
        metrics.update({"train/grad_norm": gnorm, "train/lr": lr})
        if count_name:
            metrics[f"train/{count_name}"] = counted
        return metrics

    return step


def fit_supervised(run, model, optimizer, scheduler, examples: list, loss_fn: Callable, *, total: int,
                   max_grad_norm: float, evaluate: Callable[[], dict] | None, truncation: dict, max_length: int,
                   show: tuple[str, ...], count: Callable[[list], int] = len, count_name: str | None = None,
                   on_start: Callable[[int], None] | None = None) -> FitResult:
    """`fit` with `supervised_step`: checkpoints hold the model, optimizer and scheduler; the data's
    truncation summary (`data.TruncationStats` by split) is written when the run starts."""
    def start(step: int) -> None:
        rest = left_out(len(examples), run.train, total)
        if rest:
            run.logger.write(f"[{run.kind}] batches of {run.train.batch_size} leave {rest} of the {len(examples)} "
                             "training examples out of each epoch (a different few each epoch); "
                             "train.drop_last=false keeps them")
        for split, st in truncation.items():
            if st.truncated or st.dropped:
                run.logger.write(f"[{run.kind}] {split} truncation (max_length {max_length}): {st.summary()}")
        if on_start is not None:
            on_start(step)

    step = supervised_step(run, model, optimizer, scheduler, examples, loss_fn, max_grad_norm, count=count,
                           count_name=count_name)
    return fit(run, step, total, models={"model": model}, optimizers={"optimizer": optimizer, "scheduler": scheduler},
               evaluate=evaluate, on_start=start, show=show)
