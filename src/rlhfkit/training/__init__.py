"""The training layer every trainer shares: one loop (`fit`), gradient accumulation, the optimizer,
logging, checkpoints and the run directory. Trainers supply a step function and models."""

from rlhfkit.training.accumulate import accumulate, normalizer
from rlhfkit.training.batches import (
           batch_indices,
           check_enough,
           epoch_order,
           eval_chunks,
           left_out,
           micro_batches,
           total_steps,
)
from rlhfkit.training.loop import FitResult, fit
from rlhfkit.training.optim import (
           StepGuard,
           TrainingDiverged,
           build_optimizer,
           build_scheduler,
)
from rlhfkit.training.run import Run, finish, open_run
from rlhfkit.training.supervised import (
           fit_supervised,
           prepare_optimization,
           supervised_step,
)

__all__ = ["FitResult", "Run", "StepGuard", "TrainingDiverged", "accumulate", "batch_indices", "build_optimizer",
           "build_scheduler", "check_enough", "epoch_order", "eval_chunks", "finish", "fit", "fit_supervised",
           "left_out", "micro_batches", "normalizer", "open_run", "prepare_optimization", "supervised_step",
           "total_steps"]
