"""One trainer's run: its directory, strategy and step guard; the final save and the results file.

    run = open_run(cfg, "sft", strategy)       # after the config and data were validated
    ...                                          # models, then `training.fit(run, step, ...)`
    finish(run, {"model": model}, tokenizer, metrics, truncation=...)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlhfkit.config import to_dict
from rlhfkit.io import write_json_atomic
from rlhfkit.models.lora import adapter_config
from rlhfkit.training.logger import RunLogger
from rlhfkit.training.optim import StepGuard
from rlhfkit.training.rundir import open_run as open_rundir
from rlhfkit.training.runlock import release

log = logging.getLogger("rlhfkit")


@dataclass
class Run:
    """What a trainer's loop needs besides its models: ``kind`` names the files (``{kind}_results.json``,
    ``{kind}_config.yaml``) and the progress bar; ``train`` is the config's train section."""

    kind: str
    out: Path
    strategy: Any
    train: Any
    guard: StepGuard
    logger: RunLogger | None = None
    extra: dict = field(default_factory=dict)
    config: dict | None = None  # the resolved config, for the experiment trackers
    tokenizer: Any = None  # saved with the models of checkpoints and best/, so each directory loads on its own
    checkpoint: Path | None = None  # the checkpoint `open_run` verified to continue from (None: start)
    run_id: str = ""  # the run record's id, written into each checkpoint (`training.rundir`)

    @property
    def is_main(self) -> bool:
        return self.strategy.is_main


def open_run(cfg, kind: str, strategy, tokenizer=None) -> Run:
    """Start a trainer's run: decide start / continue for ``train.output_dir`` and refuse a used
    directory, nothing to resume or a different config or data (`rlhfkit.training.rundir.open_run`, which
    also writes ``{kind}_config.yaml`` and the run's fingerprint), then seed every generator with
    ``train.seed`` (`Strategy.start`). Call it after validation: nothing is written before."""
    rundir = open_rundir(cfg, kind, is_main=strategy.is_main)
    strategy.start(cfg.train.seed)
    return Run(kind, rundir.path, strategy, cfg.train, StepGuard(cfg.train.max_bad_steps), config=to_dict(cfg),
               tokenizer=tokenizer, checkpoint=rundir.checkpoint, run_id=rundir.record.get("run_id", ""))


def _warn_if_chained(model_dir: Path) -> None:
    """An adapter whose base is itself an adapter loads through rlhfkit (and `rlhfkit merge`), not
    through peft alone, which applies one level: say so, with the command that makes it one model."""
    config = adapter_config(model_dir)
    base = (config or {}).get("base_model_name_or_path")
    if base and adapter_config(base):
        log.warning("%s is an adapter on top of the adapter %s: peft's from_pretrained applies one level only; "
                    "`rlhfkit merge %s --out DIR` writes the whole chain as one model for transformers/peft",
                    model_dir, base, model_dir)


def finish(run: Run, models: dict[str, Any], tokenizer, metrics: dict, **results: Any) -> None:
    """The trained models as plain transformers/peft directories (``output_dir/<name>``) and
    ``{kind}_results.json`` with the final metrics, the layout and ``results``. Call it on every rank:
    sharded models are gathered (a collective), rank 0 writes."""
    for name, model in models.items():
        run.strategy.check_replicas(model, name)
    for name, model in models.items():
        run.strategy.save_model(model, tokenizer, run.out / name)
    if run.is_main:
        for name in models:
            _warn_if_chained(run.out / name)
        final = {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}
        final["distributed"] = run.strategy.layout
        final.update(results)
        write_json_atomic(run.out / f"{run.kind}_results.json", final)
        release(run.out)  # the run is complete: another process may continue or replace it
    run.strategy.wait()
