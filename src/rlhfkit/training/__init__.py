"""The training layer every trainer shares: one loop (`fit`), gradient accumulation, the optimizer,
logging, checkpoints and the run directory. Trainers supply a step function and models."""

from rlhfkit.training.accumulate import accumulate, normalizer, supervised_step
from rlhfkit.training.batches import batch_indices, epoch_order, eval_chunks, micro_batches, total_steps
from rlhfkit.training.loop import FitResult, fit
from rlhfkit.training.optim import StepGuard, TrainingDiverged, build_optimizer, build_scheduler
from rlhfkit.training.run import Run, finish, open_run

__all__ = ["FitResult", "Run", "StepGuard", "TrainingDiverged", "accumulate", "batch_indices", "build_optimizer",
           "build_scheduler", "epoch_order", "eval_chunks", "finish", "fit", "micro_batches", "normalizer",
           "open_run", "supervised_step", "total_steps"]
