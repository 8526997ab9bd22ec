"""Resumable checkpoints: ``out_dir/checkpoints/step-N``, each whole or absent (written to a temporary
directory, then renamed), holding the trained models, optimizer and scheduler states, every rank's
RNG state and the trainer's own state.

The files have one form whatever the layout that wrote them (the strategy gathers sharded weights
and optimizer states into full tensors before they reach `Checkpointer.save`), so a run resumes at
any world size, sharded or not.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from rlhfkit.rng import rng_state, set_rng_state, set_seed

CKPT_PREFIX = "step-"


def _atomic_dir_write(final: Path, write: Callable[[Path], None]) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write(tmp)
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


class Checkpointer:
    """Resumable checkpoints under ``out_dir/checkpoints/step-N``; each one is whole or absent.

    A checkpoint holds the trained model(s) in transformers/peft format, the optimizer and
    scheduler states, every rank's RNG state and a ``trainer_state.json`` (step, controllers). The
    main process alone writes (``enabled``); the data position is global (`batch_indices`), not per
    rank, so a run may resume on a different number of processes.
    """

    def __init__(self, out_dir: str | Path, keep: int = 2, enabled: bool = True):
        self.root = Path(out_dir) / "checkpoints"
        self.keep = keep
        self.enabled = enabled

    def save(self, step: int, models: dict[str, Any], optimizer_states: dict[str, dict], rng: dict,
             state: dict, tokenizer=None) -> Path | None:
        """Write checkpoint ``step`` (main process). ``models``: objects with ``save_pretrained``
        (whole weights); ``optimizer_states``: full state dicts by name; ``rng``: every rank's RNG
        state (`gather_rng_states`)."""
        if not self.enabled:
            return None

        def write(tmp: Path) -> None:
            for name, model in models.items():
                model.save_pretrained(tmp / name, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / "tokenizer")
            torch.save(optimizer_states, tmp / "optim.pt")
            torch.save(rng, tmp / "rng.pt")
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=1))

        path = _atomic_dir_write(self.root / f"{CKPT_PREFIX}{step:08d}", write)
        self._prune()
        return path

    def all(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir()
                      if p.name.startswith(CKPT_PREFIX) and (p / "trainer_state.json").is_file())

    def latest(self) -> Path | None:
        ckpts = self.all()
        return ckpts[-1] if ckpts else None

    def _prune(self) -> None:
        for p in self.all()[:-self.keep] if self.keep > 0 else []:
            shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(".*.tmp-*"):  # leftovers of a write that was killed
            shutil.rmtree(p, ignore_errors=True)

    @staticmethod
    def load(path: Path) -> tuple[dict[str, dict], dict, dict]:
        """(optimizer states by name, saved RNG states, trainer_state.json) of checkpoint ``path``."""
        opt_states = torch.load(path / "optim.pt", weights_only=False)
        rng = torch.load(path / "rng.pt", weights_only=False)
        state = json.loads((path / "trainer_state.json").read_text())
        return opt_states, rng, state


def gather_rng_states(strategy) -> dict:
    """Every rank's RNG state, gathered on all ranks: ``{"world_size": W, "ranks": [state_0, ...]}``."""
    return {"world_size": strategy.world_size, "ranks": strategy.gather_objects([rng_state()])}


def restore_rng(saved: dict, step: int, rank: int) -> None:
    """This rank's saved RNG state. Resumed on more processes than were saved, a new rank gets a
    fresh stream seeded from (step, rank): the run continues, but not bit for bit."""
    if "ranks" not in saved:  # one state for everyone
        set_rng_state(saved)
    elif rank < len(saved["ranks"]):
        set_rng_state(saved["ranks"][rank])
    else:
        set_seed(1_000_003 * step + rank)


def _owner(optimizer, models: dict) -> Any:
    """The model whose parameters ``optimizer`` updates (None for schedulers and ZeRO's optimizers)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        return None
    mine = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for model in models.values():
        if any(id(p) in mine for p in model.parameters()):
            return model
    return None


def save_checkpoint(ckpt: Checkpointer, strategy, step: int, models: dict, optimizers: dict, state: dict) -> None:
    """Checkpoint ``step`` of the trained ``models`` and ``optimizers`` (and schedulers) on any layout.
    A collective: call it on every rank (sharded weights and optimizer states are gathered)."""
    rng = gather_rng_states(strategy)
    opt_states = {name: strategy.optimizer_state(_owner(opt, models), opt)
                  for name, opt in optimizers.items() if opt is not None}
    saveable = {name: strategy.saveable(model, keep=strategy.is_main) for name, model in models.items()}
    scaler = strategy.precision.state_dict()  # fp16's loss scale; {} otherwise
    ckpt.save(step, saveable, opt_states, rng, {**state, "grad_scaler": scaler} if scaler else state)


def load_checkpoint(path: Path, strategy, models: dict, optimizers: dict) -> dict:
    """Load checkpoint ``path`` into ``models`` and ``optimizers`` (whatever layout wrote it) and
    restore this rank's RNG; returns trainer_state.json."""
    for name, model in models.items():
        strategy.load_weights(model, path / name)
    opt_states, rng, state = Checkpointer.load(path)
    for name, opt in optimizers.items():
        if opt is not None and name in opt_states:
            strategy.load_optimizer_state(_owner(opt, models), opt, opt_states[name])
    restore_rng(rng, state["step"], strategy.rank)
    strategy.precision.load_state_dict(state.get("grad_scaler", {}))
    return state
