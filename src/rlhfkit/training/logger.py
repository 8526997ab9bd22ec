"""What a run writes while it trains: metrics.jsonl, the experiment trackers (TensorBoard, W&B,
MLflow, ...) and a tqdm progress bar."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rlhfkit.io import rewrite_jsonl, strict_json, to_builtin
from rlhfkit.training.trackers import (
    finish_trackers,
    log_scalars,
    log_text,
    start_trackers,
)


class RunLogger:
    """metrics.jsonl + the trackers of ``report_to`` (`training.trackers`) + a tqdm progress bar,
    written by the main process only. ``config`` (the resolved config as a dict) goes to the trackers
    that record one (W&B, MLflow)."""

    def __init__(self, out_dir: str | Path, total_steps: int, enabled: bool = True, progress: bool = True,
                 desc: str = "train", initial_step: int = 0, report_to=("auto",),
                 config: dict | None = None):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.trackers: list = []
        self.bar = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.samples_path = self.out_dir / "samples.jsonl"
        self.initial_step = initial_step
        self._samples_started = False  # samples.jsonl is truncated on the first `samples` call (a
        # trainer that logs none leaves a samples.jsonl of someone else's, e.g. online DPO's, alone)
        _truncate_after(self.metrics_path, initial_step)
        run_name = f"{self.out_dir.resolve().parent.name}/{desc}"
        self.trackers = start_trackers(report_to, self.out_dir, run_name, initial_step, config)
        if progress and total_steps > 0:  # no bar for a run with no steps (an RM that is its probe alone)
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, Any], show: tuple[str, ...] = ()) -> None:
        if not self.enabled:
            return
        clean = {k: to_builtin(v) for k, v in metrics.items()}
        with open(self.metrics_path, "a") as f:
            # strict JSON (jq, JSON.parse): a non-finite value is written as null; trackers get it as is
            f.write(json.dumps(strict_json({"step": step, "time": round(time.time(), 3), **clean})) + "\n")
        log_scalars(self.trackers, clean, step)
        if self.bar is not None and show:
            self.bar.set_postfix({k.split("/")[-1]: f"{clean[k]:.4g}" for k in show if k in clean}, refresh=False)

    def text(self, step: int, tag: str, text: str) -> None:
        if self.enabled:
            log_text(self.trackers, tag, text, step)

    def samples(self, step: int, rows: list[dict]) -> None:
        """A few {prompt, response, score, ...} records of this step to samples.jsonl and TensorBoard."""
        if not self.enabled or not rows:
            return
        if not self._samples_started:
            _truncate_after(self.samples_path, self.initial_step)
            self._samples_started = True
        with open(self.samples_path, "a") as f:
            for r in rows:
                f.write(json.dumps({"step": step, **r}) + "\n")
        self.text(step, "samples", "\n\n".join(
            f"**prompt:** {r['prompt']}\n\n**response:** {r['response']}\n\n**score:** {r['score']:.3f}" for r in rows))

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def write(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        finish_trackers(self.trackers)
        self.trackers = []


def _truncate_after(path: Path, step: int) -> None:
    """On resume, drop the records a file got after the checkpoint the run resumed from. A run
    starting at step 0 (killed before its first checkpoint, or rerun in place) drops them all: it
    logs every step, step 0's evaluation included, again. A line torn by a crash or a full disk is
    dropped, not a JSONDecodeError (`rlhfkit.io.rewrite_jsonl`)."""
    rewrite_jsonl(path, lambda r: step > 0 and r.get("step", 0) <= step)
