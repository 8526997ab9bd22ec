"""Resumable checkpoints: ``out_dir/checkpoints/step-N``, each whole or absent, holding the trained
models, optimizer and scheduler states, every rank's RNG state and the trainer's own state.

A checkpoint is written into a temporary sibling directory, its ``manifest.json`` (every file with
its size and SHA-256) last; the files and the directory are fsynced, the directory renamed into
place and its parent fsynced. It counts as complete only if its manifest verifies, so a checkpoint
cut short, truncated or edited afterwards is skipped (with a warning) in favour of the previous one.
Nothing in a checkpoint is unpickled into code: the ``.pt`` files load with
``torch.load(weights_only=True)`` (tensors and plain containers; RNG states are stored as tensors
and lists, `rlhfkit.rng.plain_rng_state`), the weights are safetensors.

The files have one form whatever the layout that wrote them (the strategy gathers sharded weights
and optimizer states into full tensors before they reach `Checkpointer.save`), so a run resumes at
any world size, sharded or not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from rlhfkit.io import as_os_error, fsync_path, make_temp_dir, umask_modes
from rlhfkit.rng import plain_rng_state, set_plain_rng_state, set_seed

log = logging.getLogger("rlhfkit")

CKPT_PREFIX = "step-"
MANIFEST = "manifest.json"
RNG_FORMAT = 2  # rng.pt holds plain tensors/lists (`rlhfkit.rng.plain_rng_state`)
# Fault-injection hook for tests: seconds to sleep between the files of a checkpoint write, so that a
# kill can land inside one. Unset (0) in normal use.
_SLEEP_ENV = "RLHFKIT_TEST_CHECKPOINT_SLEEP"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: not loadable safely, or damaged."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(root: Path) -> dict:
    """``root/manifest.json``: every file under ``root`` with its size and SHA-256."""
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(root).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    manifest = {"files": files, "created": round(time.time(), 3)}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def verify_manifest(root: Path, hashes: bool = True) -> str | None:
    """None if ``root`` is complete (its manifest lists every file with the right size and, with
    ``hashes``, SHA-256, and no file is there that it does not list); else the reason it is not."""
    try:
        files = json.loads((root / MANIFEST).read_text())["files"]
        items = list(files.items())
    except FileNotFoundError:
        return "no manifest (the write did not finish)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"unreadable manifest ({e.__class__.__name__})"
    for rel, meta in items:
        if not (isinstance(rel, str) and isinstance(meta, dict) and isinstance(meta.get("size"), int)
                and isinstance(meta.get("sha256"), str)):
            return f"unreadable manifest (its entry for {rel!r} is not {{size, sha256}})"
        p = root / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != meta["size"]:
            return f"{rel} has {p.stat().st_size} bytes, the manifest says {meta['size']}"
        if hashes and sha256_file(p) != meta["sha256"]:
            return f"{rel} does not match its SHA-256 in the manifest"
    listed = {rel for rel, _ in items} | {MANIFEST}
    extra = sorted(rel for p in root.rglob("*")
                   if p.is_file() and (rel := p.relative_to(root).as_posix()) not in listed)
    if extra:  # a loader reads every weight file of a model directory, listed or not
        return f"{extra[0]} is not in the manifest (added after the checkpoint was written)"
    return None


def _torch_save(obj: Any, path: Path) -> None:
    """torch.save through a Python file, so that a full disk is an OSError (ENOSPC), not the
    RuntimeError torch's own writer raises for a short write."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def _atomic_dir_write(final: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)``, add the manifest, fsync, then rename ``tmp`` to ``final``. A failed
    write (a full disk...) leaves no trace and raises an OSError naming ``final``."""
    tmp = make_temp_dir(final)
    try:
        write(tmp)
        _fault_sleep()
        write_manifest(tmp)  # last: a checkpoint without one is incomplete
        umask_modes(tmp)
        for p in [*tmp.rglob("*"), tmp]:
            fsync_path(p)
        if final.exists():
            discard(final)
        os.replace(tmp, final)
        fsync_path(final.parent)  # the rename itself survives a power cut
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        converted = as_os_error(e, final) if isinstance(e, Exception) else e
        if converted is e:
            raise
        raise converted from e
    return final


def _fault_sleep() -> None:
    delay = float(os.environ.get(_SLEEP_ENV) or 0)
    if delay > 0:
        time.sleep(delay)


def discard(path: Path) -> None:
    """Delete a directory by renaming it to a temporary name first: a kill during the deletion
    leaves a leftover that `remove_leftovers` clears, never a half-deleted checkpoint in place."""
    doomed = path.with_name(f".{path.name}.tmp-del-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_leftovers(root: Path) -> list[str]:
    """Delete temporary files and directories left by writes that were killed; returns their names."""
    found = sorted(root.glob(".*.tmp-*")) if root.is_dir() else []
    for p in found:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return [p.name for p in found]


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
        state (`gather_rng_states`); ``tokenizer``: saved with each model, so that every model
        directory of a checkpoint loads on its own (``from_pretrained``, its chat template included)."""
        if not self.enabled:
            return None

        def write(tmp: Path) -> None:
            for name, model in models.items():
                model.save_pretrained(tmp / name, safe_serialization=True)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp / name)
            _fault_sleep()
            _torch_save(optimizer_states, tmp / "optim.pt")
            _fault_sleep()
            _torch_save(rng, tmp / "rng.pt")
            _fault_sleep()
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=1))

        path = _atomic_dir_write(self.root / f"{CKPT_PREFIX}{step:08d}", write)
        self._prune()
        return path

    def all(self) -> list[Path]:
        """Checkpoint directories that have a manifest, oldest first (not verified: see `latest`)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.name.startswith(CKPT_PREFIX) and (p / MANIFEST).is_file())

    def latest(self, verify: bool = True, skipped: list[str] | None = None) -> Path | None:
        """The newest complete checkpoint: its manifest verifies (sizes and, with ``verify``,
        SHA-256). Each newer one that does not is skipped with a warning naming what is wrong, or,
        given a ``skipped`` list, with that line appended to it instead."""
        if not self.root.is_dir():
            return None
        for p in sorted((p for p in self.root.iterdir() if p.name.startswith(CKPT_PREFIX)), reverse=True):
            problem = verify_manifest(p, hashes=verify)
            if problem is None:
                return p
            if skipped is None:
                log.warning("skipping checkpoint %s: %s", p, problem)
            else:
                skipped.append(f"{p.name}: {problem}")
        return None

    def _prune(self) -> None:
        for p in self.all()[:-self.keep] if self.keep > 0 else []:
            discard(p)
        remove_leftovers(self.root)

    @staticmethod
    def load(path: Path) -> tuple[dict[str, dict], dict, dict]:
        """(optimizer states by name, saved RNG states, trainer_state.json) of checkpoint ``path``.
        Raises `CheckpointError` for a file that is not plain tensor data (it is never executed)."""
        opt_states = safe_load(path / "optim.pt")
        rng = safe_load(path / "rng.pt")
        try:
            state = json.loads((path / "trainer_state.json").read_text())
            int(state["step"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path / 'trainer_state.json'}: unreadable ({e.__class__.__name__}: {e})") from None
        return opt_states, rng, state


def safe_load(path: Path) -> Any:
    """``torch.load`` of tensors and plain containers only: anything else (a pickled object that
    would run code when loaded) is refused with a `CheckpointError`, never executed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = " ".join(str(e).split())
        raise CheckpointError(
            f"{path}: refused to load: it holds more than tensors and plain data (possibly code; "
            f"torch.load weights_only said: {reason[:160]})") from None
    except (RuntimeError, EOFError) as e:  # a damaged file
        raise CheckpointError(f"{path}: unreadable ({' '.join(str(e).split())[:200]})") from None


def gather_rng_states(strategy) -> dict:
    """Every rank's RNG state, gathered on all ranks: ``{"world_size": W, "ranks": [state_0, ...]}``."""
    return {"format": RNG_FORMAT, "world_size": strategy.world_size,
            "ranks": strategy.gather_objects([plain_rng_state()])}


def restore_rng(saved: dict, step: int, rank: int) -> None:
    """This rank's saved RNG state. Resumed on more processes than were saved, a new rank gets a
    fresh stream seeded from (step, rank): the run continues, but not bit for bit."""
    if not isinstance(saved, dict) or saved.get("format") != RNG_FORMAT:
        raise CheckpointError("rng.pt: not in this version's format (tensors and lists); the checkpoint was "
                              "written by an older rlhfkit and cannot be resumed safely")
    if rank < len(saved["ranks"]):
        set_plain_rng_state(saved["ranks"][rank])
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


def save_checkpoint(ckpt: Checkpointer, strategy, step: int, models: dict, optimizers: dict, state: dict,
                    tokenizer=None) -> None:
    """Checkpoint ``step`` of the trained ``models`` and ``optimizers`` (and schedulers) on any layout.
    A collective: call it on every rank (sharded weights and optimizer states are gathered)."""
    rng = gather_rng_states(strategy)
    opt_states = {name: strategy.optimizer_state(_owner(opt, models), opt)
                  for name, opt in optimizers.items() if opt is not None}
    saveable = {name: strategy.saveable(model, keep=strategy.is_main) for name, model in models.items()}
    scaler = strategy.precision.state_dict()  # fp16's loss scale; {} otherwise
    ckpt.save(step, saveable, opt_states, rng, {**state, "grad_scaler": scaler} if scaler else state, tokenizer)


def _apply_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set the optimizer's learning rates for the step after the checkpoint's by the schedule as
    built now. The loaded optimizer state holds the rates the saved run's schedule gave: a run
    continued for longer (train.max_steps raised) would take its first step at the old schedule's
    last rate (0 at the end of a cosine or linear one) and follow its new length only after it."""
    groups = scheduler.optimizer.param_groups
    for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]


def load_checkpoint(path: Path, strategy, models: dict, optimizers: dict) -> dict:
    """Load checkpoint ``path`` into ``models`` and ``optimizers`` (whatever layout wrote it) and
    restore this rank's RNG; returns trainer_state.json."""
    for name, model in models.items():
        strategy.load_weights(model, path / name)
    opt_states, rng, state = Checkpointer.load(path)
    for name, opt in optimizers.items():
        if opt is not None and name in opt_states:
            strategy.load_optimizer_state(_owner(opt, models), opt, opt_states[name])
    for opt in optimizers.values():
        if isinstance(opt, torch.optim.lr_scheduler.LambdaLR):
            _apply_schedule(opt)
    restore_rng(rng, state["step"], strategy.rank)
    strategy.precision.load_state_dict(state.get("grad_scaler", {}))
    return state
