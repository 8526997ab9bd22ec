"""Experiment trackers (``train.report_to``) through accelerate's tracker classes.

    trackers = start_trackers(["tensorboard", "wandb"], out_dir, "demo/sft", initial_step=0, config=cfg_dict)
    log_scalars(trackers, {"train/loss": 0.7}, step=3)

Each name is one of accelerate's trackers (``accelerate.tracking.LOGGER_TYPE_TO_CLASS``: tensorboard,
wandb, mlflow, trackio, comet_ml, aim, clearml, dvclive, swanlab) or a `GeneralTracker` subclass
registered with ``accelerate.tracking.register_tracker_class``. The config loader has already checked
that each is installed (`config.extras.check_trackers`). Trackers run on the main process only (the
caller, `RunLogger`, exists there only).

- tensorboard writes ``output_dir/tb``; a run resumed at step s purges the events past s.
- wandb: project ``$WANDB_PROJECT`` (default "rlhfkit"), run name "<pipeline dir>/<stage>", local files
  in ``$WANDB_DIR`` if set, else output_dir; the resolved config is the run's config. The W&B run id
  is kept in ``output_dir/wandb_run_id``: a resumed run continues its W&B run, a run started at step
  0 starts a new one (`train.overwrite` deletes the old one's local files with the rest).
- mlflow: experiment ``$MLFLOW_EXPERIMENT_NAME`` (default "rlhfkit") at ``$MLFLOW_TRACKING_URI``; the
  resolved config as parameters.
"""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path
from typing import Any

from rlhfkit.config.extras import resolve_trackers

PROJECT = "rlhfkit"


def start_trackers(names, out_dir: Path, run_name: str, initial_step: int = 0, config: dict | None = None) -> list:
    """Build and start one accelerate tracker per name; the config goes to those that record one."""
    names = resolve_trackers(names)
    if not names:
        return []
    from accelerate import PartialState
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    PartialState()  # accelerate's tracker classes log through its logger, which needs the state (no collective)
    trackers = []
    for name in dict.fromkeys(names):  # each once, in order
        cls = LOGGER_TYPE_TO_CLASS[name]
        if name == "tensorboard":
            # purge_step: a run resumed at step s logs from s+1 on; one restarted at step 0 replaces the curves
            tracker = cls("tb", str(out_dir), purge_step=initial_step + 1 if initial_step > 0 else 0)
        elif name == "wandb":
            tracker = cls(os.environ.get("WANDB_PROJECT", PROJECT), name=run_name, **_wandb_run(out_dir, initial_step))
        elif name == "mlflow":
            tracker = cls(PROJECT, run_name=run_name)
        elif getattr(cls, "requires_logging_directory", False):
            tracker = cls(run_name, str(out_dir))
        else:
            tracker = cls(run_name)
        tracker.main_process_only = False  # RunLogger exists on the main process only
        if hasattr(tracker, "start"):  # accelerate >= 1.3 starts trackers lazily; older ones in __init__
            tracker.start()
        if config and name != "tensorboard":  # TensorBoard has the config in output_dir/*_config.yaml
            tracker.store_init_configuration(flatten(config))
        trackers.append(tracker)
    return trackers


def _wandb_run(out_dir: Path, initial_step: int) -> dict:
    """wandb.init's id / resume / dir: one W&B run per rlhfkit run, continued when the run resumes."""
    path = Path(out_dir) / "wandb_run_id"
    run_id = path.read_text().strip() if initial_step > 0 and path.is_file() else ""
    if not run_id:
        run_id = uuid.uuid4().hex[:12]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
    kw = {"id": run_id, "resume": "allow"}
    return kw if os.environ.get("WANDB_DIR") else {**kw, "dir": str(out_dir)}


def log_scalars(trackers: list, metrics: dict[str, Any], step: int) -> None:
    """The finite numbers of ``metrics`` to every tracker."""
    values = {k: v for k, v in metrics.items()
              if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    if values:
        for t in trackers:
            t.log(values, step=step)


def log_text(trackers: list, tag: str, text: str, step: int) -> None:
    """Text (e.g. sampled responses) to the trackers that show it (TensorBoard)."""
    for t in trackers:
        if t.name == "tensorboard":
            t.log({tag: text}, step=step)


def finish_trackers(trackers: list) -> None:
    for t in trackers:
        t.finish()


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-5}} -> {"train.lr": 1e-5}; lists and None as strings (trackers take scalars)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return out
