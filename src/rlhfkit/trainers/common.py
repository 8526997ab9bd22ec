"""Machinery every trainer shares: run directory, logging, optimizer/schedule, the accumulation
step with non-finite guards, and atomic resumable checkpoints.

Distributed execution goes through ``accelerate`` (DDP / FSDP / DeepSpeed as configured by
``accelerate launch``); on one CPU process it is a thin pass-through.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from rlhfkit.config import dump_config

log = logging.getLogger("rlhfkit")


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses or gradients."""


# --------------------------------------------------------------------------- runtime

class Runtime:
    """Device, ranks and collective ops, backed by an ``accelerate.Accelerator``."""

    def __init__(self, seed: int = 0):
        from accelerate import Accelerator

        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.device = self.accelerator.device
        self.world_size = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        set_seed(seed)

    def prepare(self, *objs):
        return self.accelerator.prepare(*objs)

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model)

    def backward(self, loss):
        self.accelerator.backward(loss)

    def no_sync(self, model, skip: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
        return self.accelerator.no_sync(model) if (skip and self.world_size > 1) else contextlib.nullcontext()

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(x.to(self.device), reduction="sum") if self.world_size > 1 else x

    def wait(self):
        self.accelerator.wait_for_everyone()

    def shard(self, items: list) -> list:
        """This rank's share of a global batch (strided, so every rank gets the same count)."""
        return items[self.rank::self.world_size]


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- logging

class RunLogger:
    """metrics.jsonl + TensorBoard + a tqdm progress bar, written by the main process only."""

    def __init__(self, out_dir: str | Path, total_steps: int, enabled: bool = True, progress: bool = True,
                 desc: str = "train", initial_step: int = 0):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.tb = None
        self.bar = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        if initial_step > 0:
            self._truncate_after(initial_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(self.out_dir / "tb"), purge_step=initial_step or None)
        except Exception as e:  # tensorboard missing: jsonl is still written
            log.warning("TensorBoard logging disabled: %s", e)
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop records written after the checkpoint we resumed from."""
        if not self.metrics_path.exists():
            return
        keep = [ln for ln in self.metrics_path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= step]
        self.metrics_path.write_text("".join(k + "\n" for k in keep))

    def log(self, step: int, metrics: dict[str, Any], show: tuple[str, ...] = ()) -> None:
        if not self.enabled:
            return
        clean = {k: _to_float(v) for k, v in metrics.items()}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, "time": round(time.time(), 3), **clean}) + "\n")
        if self.tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
        if self.bar is not None and show:
            self.bar.set_postfix({k.split("/")[-1]: f"{clean[k]:.4g}" for k in show if k in clean}, refresh=False)

    def text(self, step: int, tag: str, text: str) -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_text(tag, text, step)

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
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


def _to_float(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().float().item()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


# --------------------------------------------------------------------------- optimisation

def build_optimizer(model: torch.nn.Module, optim, extra_groups: list[dict] | None = None) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (the usual transformer recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]] + list(extra_groups or [])
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_eps)


def build_scheduler(optimizer, optim, total_steps: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[optim.schedule]
    warmup = int(math.ceil(optim.warmup_ratio * total_steps))
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=max(total_steps, 1))


@dataclass
class StepGuard:
    """Skips an update whose loss or gradient is not finite; stops after too many in a row."""

    max_bad_steps: int = 3
    consecutive: int = 0
    skipped_total: int = 0

    def check(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        ok = bool(torch.isfinite(loss).all()) and bool(torch.isfinite(grad_norm).all())
        if ok:
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.skipped_total += 1
        if self.consecutive >= self.max_bad_steps:
            raise TrainingDiverged(
                f"{self.consecutive} consecutive updates had a non-finite loss or gradient "
                f"(loss={float(loss):.4g}, grad_norm={float(grad_norm):.4g}); stopping. "
                "The last good checkpoint is intact; lower the learning rate or check the data.")
        return False


def optimizer_step(model, optimizer, scheduler, max_grad_norm: float, loss_value: torch.Tensor,
                   guard: StepGuard) -> tuple[bool, float]:
    """Clip, check for non-finite values, then step (or skip). Returns (stepped, grad_norm)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if max_grad_norm and max_grad_norm > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        grads = [p.grad.detach().norm() for p in params if p.grad is not None]
        grad_norm = torch.stack(grads).norm() if grads else torch.tensor(0.0)
    stepped = guard.check(loss_value, grad_norm)
    if stepped:
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return stepped, float(grad_norm)


def micro_batches(items: list, micro_batch_size: int) -> list[list]:
    return [items[i:i + micro_batch_size] for i in range(0, len(items), micro_batch_size)]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Deterministic shuffle of range(n) for an epoch: resuming only needs (seed, epoch, position)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices of optimizer step ``step`` when walking shuffled epochs back to back."""
    steps_per_epoch = max(n // batch_size, 1)
    epoch, pos = divmod(step, steps_per_epoch)
    order = epoch_order(n, seed, epoch)
    return order[pos * batch_size:(pos + 1) * batch_size]


def total_steps_for(n: int, train) -> int:
    if train.max_steps > 0:
        return train.max_steps
    return max(1, int(math.floor(train.epochs * max(n // train.batch_size, 1))))


# --------------------------------------------------------------------------- checkpoints

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
    scheduler states, RNG states and a ``trainer_state.json`` (step, data position, controllers).
    """

    def __init__(self, out_dir: str | Path, keep: int = 2, enabled: bool = True):
        self.root = Path(out_dir) / "checkpoints"
        self.keep = keep
        self.enabled = enabled

    def save(self, step: int, models: dict[str, Any], optimizers: dict[str, Any], state: dict,
             tokenizer=None) -> Path | None:
        if not self.enabled:
            return None

        def write(tmp: Path) -> None:
            for name, model in models.items():
                model.save_pretrained(tmp / name, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / "tokenizer")
            torch.save({k: v.state_dict() for k, v in optimizers.items() if v is not None}, tmp / "optim.pt")
            torch.save(rng_state(), tmp / "rng.pt")
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
    def load_state(path: Path, optimizers: dict[str, Any]) -> dict:
        opt_states = torch.load(path / "optim.pt", weights_only=False)
        for k, opt in optimizers.items():
            if opt is not None and k in opt_states:
                opt.load_state_dict(opt_states[k])
        set_rng_state(torch.load(path / "rng.pt", weights_only=False))
        return json.loads((path / "trainer_state.json").read_text())


def load_weights_into(model: torch.nn.Module, ckpt_model_dir: Path) -> None:
    """Copy weights saved by save_pretrained (full model or peft adapter) into ``model``."""
    from safetensors.torch import load_file

    adapter = ckpt_model_dir / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(adapter)))
        return
    state = {}
    for f in sorted(ckpt_model_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "lm_head" not in k]  # tied embeddings are saved once
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {ckpt_model_dir} does not match the model: "
                           f"missing={missing[:5]} unexpected={unexpected[:5]}")


# --------------------------------------------------------------------------- run directory

def prepare_run_dir(cfg, kind: str, is_main: bool = True) -> Path:
    out = Path(cfg.train.output_dir)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / f"{kind}_config.yaml")
    return out


def write_json_atomic(path: str | Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=_to_float))
    os.replace(tmp, path)
