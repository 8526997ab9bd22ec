"""Resumable checkpoints: ``out_dir/checkpoints/step-N``, each whole or absent (written to a
temporary directory, then renamed), holding the trainable models, optimizer and scheduler states,
every rank's RNG state and the trainer's own state; plus loading a checkpoint's weights back.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from rlhfkit.trainers import zero
from rlhfkit.trainers.common import rng_state, set_rng_state, set_seed
from rlhfkit.trainers.fsdp import (
    full_optimizer_state, gathered_copy, is_sharded, load_adapter_state, load_model_state, load_optimizer_state,
)

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

    A checkpoint holds the trainable model(s) in transformers/peft format, the optimizer and
    scheduler states, every rank's RNG state and a ``trainer_state.json`` (step, data position,
    controllers). Under data parallelism the weights and optimizer states are replicas, so the
    main process alone writes them and a run may resume on a different number of processes:
    the data position is global (`batch_indices`), not per rank.
    """

    def __init__(self, out_dir: str | Path, keep: int = 2, enabled: bool = True):
        self.root = Path(out_dir) / "checkpoints"
        self.keep = keep
        self.enabled = enabled

    def save(self, step: int, models: dict[str, Any], optimizers: dict[str, Any], state: dict,
             tokenizer=None) -> Path | None:
        """Write checkpoint ``step``. Call it on every rank: each contributes its RNG state (a
        collective), and the main process (``enabled``) writes; the caller then waits for it.
        Sharded (FSDP) models and their optimizers are gathered into full tensors first, so the
        checkpoint has the same form as an unsharded run's (optimizer state keyed by name)."""
        rng = _all_rng_states()
        models = dict(models)
        opt_states = {}
        for k, opt in optimizers.items():
            owner = _sharded_owner(opt, models.values())
            if owner is not None:
                opt_states[k] = full_optimizer_state(owner, opt)
            elif zero.is_zero_optimizer(opt):  # ZeRO partitions, gathered per parameter (collectives)
                opt_states[k] = zero.full_optimizer_state(opt)
        for name, model in models.items():
            if is_sharded(model):
                models[name] = gathered_copy(model, keep=self.enabled)
        if not self.enabled:
            return None

        def write(tmp: Path) -> None:
            for name, model in models.items():
                model.save_pretrained(tmp / name, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / "tokenizer")
            torch.save({k: opt_states[k] if k in opt_states else v.state_dict()
                        for k, v in optimizers.items() if v is not None}, tmp / "optim.pt")
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
    def load_state(path: Path, optimizers: dict[str, Any], models=()) -> dict:
        """Restore optimizer/scheduler states and this rank's RNG; returns trainer_state.json.
        With ``models`` (the trained models, sharded or not) an optimizer's state may come from a
        sharded run (keyed by parameter name) or from an unsharded one, at any world size: each
        optimizer is matched to the model whose parameters it updates."""
        opt_states = torch.load(path / "optim.pt", weights_only=False)
        for k, opt in optimizers.items():
            if opt is None or k not in opt_states:
                continue
            if zero.is_zero_optimizer(opt):
                zero.load_optimizer_state(opt, opt_states[k])
                continue
            owner = _owner(opt, models)
            if owner is not None:
                load_optimizer_state(owner, opt, opt_states[k])
            else:
                opt.load_state_dict(opt_states[k])
        state = json.loads((path / "trainer_state.json").read_text())
        _restore_rng(torch.load(path / "rng.pt", weights_only=False), state["step"])
        return state


def _owner(optimizer, models) -> Any:
    """The model (sharded or not) whose parameters ``optimizer`` updates, if any."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        return None
    mine = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for model in models:
        if any(id(p) in mine for p in model.parameters()):
            return model
    return None


def _sharded_owner(optimizer, models) -> Any:
    """The sharded model whose parameters ``optimizer`` updates, if any."""
    owner = _owner(optimizer, models)
    return owner if owner is not None and is_sharded(owner) else None


def _dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_rng_states() -> dict:
    """Every rank's RNG state, gathered on all ranks: ``{"world_size": W, "ranks": [state_0, ...]}``."""
    rank, world = _dist_info()
    states = [rng_state()]
    if world > 1:
        import torch.distributed as dist

        states = [None] * world
        dist.all_gather_object(states, rng_state())
    return {"world_size": world, "ranks": states}


def _restore_rng(saved: dict, step: int) -> None:
    """This rank's saved RNG state. Resumed on more processes than were saved, a new rank gets a
    fresh stream seeded from (step, rank): the run continues, but not bit for bit."""
    rank, _ = _dist_info()
    if "ranks" not in saved:  # a checkpoint from before per-rank states: one state for everyone
        set_rng_state(saved)
    elif rank < len(saved["ranks"]):
        set_rng_state(saved["ranks"][rank])
    else:
        set_seed(1_000_003 * step + rank)


def load_weights_into(model: torch.nn.Module, ckpt_model_dir: Path) -> None:
    """Copy weights saved by save_pretrained (full model or peft adapter) into ``model``
    (unwrapped, or sharded by FSDP2)."""
    from safetensors.torch import load_file

    adapter = ckpt_model_dir / "adapter_model.safetensors"
    if adapter.is_file():
        if is_sharded(model):  # FSDP2: each rank keeps its shard of the adapter's full tensors
            load_adapter_state(model, load_file(str(adapter)))
            return
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(adapter)))
        zero.weights_changed(model.parameters())  # DeepSpeed ZeRO: into its fp32 master copy too
        return
    state = {}
    for f in sorted(ckpt_model_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    if is_sharded(model):  # FSDP2: each rank keeps its shard of the full tensors
        load_model_state(model, state)
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "lm_head" not in k]  # tied embeddings are saved once
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {ckpt_model_dir} does not match the model: "
                           f"missing={missing[:5]} unexpected={unexpected[:5]}")
    zero.weights_changed(model.parameters())  # DeepSpeed ZeRO: into its fp32 master copy too
