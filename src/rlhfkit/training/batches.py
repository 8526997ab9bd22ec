"""Which examples each optimizer step sees: deterministic epochs, micro-batches, evaluation shards.

Everything is a function of (seed, step), so a resumed run needs no data-loader state: step s of a
run reads exactly the examples step s of the uninterrupted run read, at any world size.
"""

from __future__ import annotations

import math

import torch

from rlhfkit.config.errors import ConfigError


def micro_batches(items: list, micro_batch_size: int) -> list[list]:
    return [items[i:i + micro_batch_size] for i in range(0, len(items), micro_batch_size)]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Deterministic shuffle of range(n) for an epoch: resuming only needs (seed, epoch, position)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def batch_indices(n: int, batch_size: int, step: int, seed: int, drop_last: bool = True) -> list[int]:
    """Example indices of optimizer step ``step``, walking shuffled epochs back to back.

    drop_last: an epoch is n // batch_size batches and the rest of its shuffle is left out (a
    different rest each epoch); otherwise the epochs are laid end to end and a batch that reaches
    an epoch's end is completed from the next epoch's shuffle. Every batch has batch_size examples."""
    if drop_last:
        epoch, pos = divmod(step, max(n // batch_size, 1))
        return epoch_order(n, seed, epoch)[pos * batch_size:(pos + 1) * batch_size]
    out: list[int] = []
    start = step * batch_size
    while len(out) < batch_size:
        epoch, pos = divmod(start + len(out), n)
        out += epoch_order(n, seed, epoch)[pos:pos + batch_size - len(out)]
    return out


def left_out(n: int, train, total: int | None = None) -> int:
    """Examples of each epoch that no batch takes (`batch_indices` with ``train.drop_last``); with
    ``total``, the run's steps, 0 when it never reaches an epoch's end (it leaves nothing out)."""
    if not train.drop_last or n <= train.batch_size or (total is not None and total < n // train.batch_size):
        return 0
    return n % train.batch_size


def check_enough(n: int, train, key: str, unit: str, said: str = "", per: str = "") -> None:
    """Fewer than ``train.batch_size`` (``n`` of ``unit`` from ``key``) with ``drop_last`` would make
    every batch that short, silently: the learning-rate schedule, the minibatches and the
    processes' shares are sized for the configured batch (and a process may get none). Refused
    before anything is written, naming the counts (``said``: more about them; ``per``: after the
    batch size, e.g. " per iteration")."""
    if train.drop_last and n < train.batch_size:
        raise ConfigError(f"{key}: {n} {unit}{said}, fewer than train.batch_size {train.batch_size}{per}: lower "
                          f"train.batch_size, or set train.drop_last=false to fill each batch from the next pass "
                          f"over the {unit}")


def total_steps(n: int, train) -> int:
    """Optimizer steps (iterations, for the policy-gradient trainers) of a run over ``n`` examples
    (prompts): ``train.max_steps`` when set, else ``train.epochs`` passes: of n // batch_size
    steps each with ``train.drop_last``, else ceil(epochs x n / batch_size) steps in all (at least
    one; 0 only for epochs 0, which only `rlhfkit rm` accepts: the probe alone)."""
    if train.max_steps > 0:
        return train.max_steps
    if train.epochs == 0:
        return 0
    if train.drop_last:
        return max(1, int(math.floor(train.epochs * max(n // train.batch_size, 1))))
    return max(1, math.ceil(train.epochs * n / train.batch_size - 1e-9))


def eval_chunks(examples: list, micro_batch_size: int, strategy=None):
    """Yield ``(chunk, real)`` over an evaluation set: all of it on one process; this rank's shard
    on N. When forwards are collectives (FSDP), every rank must run as many as the busiest one: the
    short ones add stand-in chunks (``real=False``) whose results the caller discards. Callers sum
    over real chunks and reduce the sums with ``strategy.sum``."""
    if strategy is None or strategy.world_size == 1:
        yield from ((chunk, True) for chunk in micro_batches(examples, micro_batch_size))
        return
    mine = micro_batches(strategy.shard(examples), micro_batch_size)
    most = int(strategy.max(torch.tensor(len(mine))))
    for chunk in mine:
        yield chunk, True
    if strategy.lockstep_forwards:
        for _ in range(most - len(mine)):
            yield examples[:1], False
