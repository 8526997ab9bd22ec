"""Parallelism strategies: one process, data parallel, FSDP2, DeepSpeed ZeRO 1/2 (`parallel.base`).

    strategy = make_strategy(cfg.train, cfg.model)   # once per run; every trainer takes it
"""

from __future__ import annotations

import logging
import os

from rlhfkit.parallel.base import SingleProcess, Strategy, init_distributed
from rlhfkit.parallel.ddp import DataParallel
from rlhfkit.parallel.fsdp import FullySharded
from rlhfkit.parallel.precision import Precision, resolve
from rlhfkit.parallel.zero import Zero

log = logging.getLogger("rlhfkit")

__all__ = ["DataParallel", "FullySharded", "Precision", "SingleProcess", "Strategy", "Zero", "init_distributed",
           "make_strategy"]


def make_strategy(train=None, model=None) -> Strategy:
    """The strategy a run's ``train`` section asks for on the processes it was launched on.

    ``train.fsdp`` / ``train.zero_stage`` choose FSDP2 or ZeRO on N processes (on one process there
    is nothing to shard, and the run trains as it is); otherwise N processes are data parallel.
    ``model.dtype`` chooses the compute precision (`parallel.precision.resolve`).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    fsdp = bool(getattr(train, "fsdp", False))
    zero = int(getattr(train, "zero_stage", 0) or 0)
    _warn_if_launcher_fsdp(fsdp)
    device, _, _ = init_distributed()
    precision = resolve(getattr(model, "dtype", "fp32") if model is not None else "fp32", device)
    if world == 1:
        return SingleProcess(precision)
    if fsdp:
        return FullySharded(precision)
    if zero:
        return Zero(zero, precision)
    return DataParallel(precision)


def _warn_if_launcher_fsdp(fsdp: bool) -> None:
    """``accelerate launch --use_fsdp`` sets ACCELERATE_USE_FSDP, which rlhfkit does not read: the
    layout comes from the config. Say so instead of letting the user believe weights are sharded."""
    wants = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    if wants and not fsdp and os.environ.get("RANK", "0") == "0":
        log.warning("accelerate was launched with FSDP, but rlhfkit shards only with train.fsdp=true: "
                    "parameters are replicated (data parallel)")
