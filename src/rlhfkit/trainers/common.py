"""Machinery every trainer shares: run directory, logging, optimizer/schedule, the accumulation
step with non-finite guards (resumable checkpoints: `rlhfkit.trainers.checkpoint`).

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
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from rlhfkit.config import dump_config
from rlhfkit.trainers.malloc import keep_freed_memory

log = logging.getLogger("rlhfkit")


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses or gradients."""


# --------------------------------------------------------------------------- runtime

class Runtime:
    """Device, ranks and collective ops, backed by an ``accelerate.Accelerator``.

    Launched with ``torchrun`` / ``accelerate launch`` on N processes, every rank runs the same
    trainer code: each takes its strided share of every global batch (`shard`), gradients are
    averaged by DDP (or by `average_gradients` for models used outside a wrapper), and metrics are
    sums over ranks divided by global counts (`sum`, `gather`). Every helper is a no-op on one
    process. docs/distributed.md has the whole picture.
    """

    def __init__(self, seed: int = 0, fsdp: bool = False, zero_stage: int = 0):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        # cpu=True when there is no GPU: without it accelerate ignores a torchrun environment on a
        # CPU-only machine and every process trains alone (DistributedType.NO, world size 1).
        # broadcast_buffers=False: the only buffers here are constants (rotary inv_freq), and DDP
        # would otherwise broadcast them in forward, a collective that makes ranks running
        # different numbers of forwards (evaluation shards) wait for each other forever. (torch 2.13
        # renamed the flag forward_sync_buffers and warns; the old name works on every torch >= 2.4.)
        warnings.filterwarnings("ignore", message=r".*`broadcast_buffers` is deprecated", category=FutureWarning)
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                                       kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
        self.device = self.accelerator.device
        self.world_size = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        # train.fsdp: torch's FSDP2 shards the trained model over the ranks (rlhfkit/trainers/fsdp.py);
        # on one process there is nothing to shard and the model trains as it is
        self.fsdp = bool(fsdp) and self.world_size > 1
        # train.zero_stage: DeepSpeed ZeRO 1/2 partitions optimizer state (and gradients) instead
        # (rlhfkit/trainers/zero.py); like FSDP, nothing to partition on one process
        self.zero = int(zero_stage) if self.world_size > 1 else 0
        if self.zero:
            from rlhfkit.trainers.zero import require_deepspeed

            require_deepspeed()
        self._engine = None  # the DeepSpeed engine of the trained model, once prepared
        self._frozen_sharded: list[str] = []  # frozen models sharded by `shard_frozen` (FSDP)
        self._zero_boundary = True
        strategy = "fsdp" if self.fsdp else f"zero{self.zero}" if self.zero else "ddp" if self.world_size > 1 else "single"
        self.layout: dict = {"world_size": self.world_size, "strategy": strategy}
        if not self.fsdp:
            _warn_if_fsdp_ignored(self.accelerator)
        if self.device.type == "cpu":
            keep_freed_memory()  # big gradient buffers reuse their pages instead of faulting each step
        set_seed(seed)  # the same on every rank: models built from it are identical replicas

    def prepare(self, model, optimizer, micro_batch_size: int = 1, max_grad_norm: float = 0.0):
        """Wrap the trained model for N processes: DDP through accelerate, FSDP2 shards with
        ``fsdp`` (the optimizer, built on the unsharded model, is pointed at the shards), or a
        DeepSpeed ZeRO engine with ``zero`` (which then clips to ``max_grad_norm`` and steps)."""
        total = sum(p.numel() for p in model.parameters())
        if self.zero:
            from rlhfkit.trainers.zero import initialize

            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            model, optimizer = initialize(model, optimizer, self.zero, micro_batch_size, self.world_size,
                                          max_grad_norm)
            self._engine = model
            self.layout = {"world_size": self.world_size, "strategy": f"zero{self.zero}", "param_elements": total,
                           "param_elements_on_rank": total,
                           "optimizer_elements_on_rank": sum(p.numel() for g in optimizer.optimizer.param_groups
                                                             for p in g["params"]),
                           "optimizer_elements": trainable}
            return model, optimizer
        if not self.fsdp:
            self.layout = {"world_size": self.world_size, "strategy": "ddp" if self.world_size > 1 else "single",
                           "param_elements": total, "param_elements_on_rank": total}
            return self.accelerator.prepare(model, optimizer)
        from rlhfkit.models.loading import is_structure_only
        from rlhfkit.trainers.fsdp import shard_model

        read = self.gather_objects([not is_structure_only(model)])  # which ranks read the weights
        model, optimizer = shard_model(model, optimizer, self.device)
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
        self.layout = {"world_size": self.world_size, "strategy": "fsdp", "param_elements": total,
                       "param_elements_on_rank": local, "weights_read_by_ranks": [r for r, x in enumerate(read) if x]}
        if self._frozen_sharded:
            self.layout["sharded_frozen"] = sorted(self._frozen_sharded)
        if self.is_main:
            log.info("FSDP over %d processes: rank 0 holds %d of %d parameter elements", self.world_size, local, total)
        return model, optimizer

    def loading_shards(self):
        """Context for loading models that FSDP will shard: rank 0 reads the weights, every other
        rank builds the model on the meta device (`models.loading.structure_only`) and receives its
        shards from rank 0 when it is sharded (`fsdp.shard_model`), so only rank 0 ever holds a
        whole copy. Without FSDP every rank loads as usual. Every model loaded inside must be
        sharded (`prepare`, `shard_frozen`) before its first forward."""
        from rlhfkit.models.loading import structure_only

        return structure_only(self.fsdp and self.rank != 0)

    def shard_frozen(self, model, name: str):
        """``train.fsdp``: shard a frozen model (a reference, a reward model) like the trained ones,
        instead of keeping a whole copy on every rank. Its forwards become collectives, so every
        rank must run the same number of them (true of the callers: equal shares of every batch).
        Recorded in the results' layout under ``sharded_frozen``. A no-op without FSDP."""
        if not self.fsdp or model is None:
            return model
        from rlhfkit.trainers.fsdp import is_sharded, shard_model

        if not is_sharded(model):
            shard_model(model, None, self.device)
        self._frozen_sharded.append(name)
        self.layout["sharded_frozen"] = sorted(self._frozen_sharded)
        return model

    def save_model(self, model, tokenizer, out_dir: Path) -> None:
        """The trained model as a transformers directory, written once (by rank 0). Call it on
        every rank: a sharded model's full weights are gathered first."""
        from rlhfkit.models import save_pretrained_atomic
        from rlhfkit.trainers.fsdp import gathered_copy, is_sharded

        plain = gathered_copy(model, keep=self.is_main) if is_sharded(model) else self.unwrap(model)
        if self.is_main:
            save_pretrained_atomic(plain, tokenizer, out_dir)

    def unwrap(self, model):
        from rlhfkit.trainers.zero import is_engine

        if is_engine(model):
            return model.module
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return model.module
        if not hasattr(model, "_orig_mod"):  # not wrapped at all (one process, FSDP2, the PG trainers)
            return model
        # torch.compile'd: accelerate's unwrap (which also imports DeepSpeed when installed,
        # printing its accelerator banner, so the plain cases above do not go through it)
        return self.accelerator.unwrap_model(model)

    def backward(self, loss):
        if self._engine is not None:
            from rlhfkit.trainers.zero import backward

            backward(self._engine, loss, self._zero_boundary)
            return
        self.accelerator.backward(loss)

    def no_sync(self, model, skip: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
        if self.zero:
            from rlhfkit.trainers.zero import boundary

            return boundary(self, sync=not skip)
        if self.fsdp:
            from rlhfkit.trainers.fsdp import gradient_sync

            return gradient_sync(model, sync=not skip)
        return self.accelerator.no_sync(model) if (skip and self.world_size > 1) else contextlib.nullcontext()

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(x.to(self.device), reduction="sum") if self.world_size > 1 else x

    def max(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return x
        x = x.detach().to(self.device).clone()
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX)
        return x

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x`` along dim 0 (in rank order); shapes must agree past dim 0."""
        if self.world_size == 1:
            return x
        x = x.detach().to(self.device)
        sizes = self.accelerator.gather(torch.tensor([x.shape[0]], device=self.device)).tolist()
        if len(set(sizes)) == 1:
            return self.accelerator.gather(x.contiguous())
        padded = self.accelerator.pad_across_processes(x, dim=0)
        parts = self.accelerator.gather(padded).split(max(sizes))
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    def gather_objects(self, items: list) -> list:
        """Concatenate every rank's list of picklable objects (in rank order)."""
        if self.world_size == 1:
            return list(items)
        from accelerate.utils import gather_object

        return gather_object(list(items))

    def wait(self):
        self.accelerator.wait_for_everyone()

    def shard(self, items: list) -> list:
        """This rank's share of a global batch (strided: rank r takes items r, r+W, r+2W, ...)."""
        return items[self.rank::self.world_size]

    def unshard(self, mine: list) -> list:
        """The inverse of `shard`: every rank's share (results computed item by item, in order)
        gathered back into the global order, on every rank."""
        if self.world_size == 1:
            return list(mine)
        everyone, W = self.gather_objects(mine), self.world_size
        n = len(everyone)
        out: list = [None] * n
        for i, item in zip((i for r in range(W) for i in range(r, n, W)), everyone):
            out[i] = item
        return out

    def shard_chunks(self, items: list, micro_batch_size: int) -> list[list | None]:
        """This rank's share of ``items`` (an evaluation set) in micro-batches, padded with ``None``
        so that every rank has as many as the busiest one: FSDP and ZeRO-3 gather weights inside
        each forward, so a rank that stops early would leave the others waiting. Callers run a
        forward on a stand-in for a ``None`` and discard it (see `lockstep_forwards`)."""
        mine = micro_batches(self.shard(items), micro_batch_size)
        if self.world_size == 1:
            return mine
        most = int(self.max(torch.tensor(len(mine))))
        return mine + [None] * (most - len(mine))

    @property
    def lockstep_forwards(self) -> bool:
        """True when a forward is itself a collective (FSDP, DeepSpeed), not only the backward."""
        from accelerate.utils import DistributedType

        return self.fsdp or self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)

    def check_divisible(self, n: int, what: str) -> None:
        """Equal shares on every rank: each must run the same number of synchronised backwards."""
        if n % self.world_size:
            from rlhfkit.config import ConfigError

            raise ConfigError(f"{what}: {n} does not split evenly over {self.world_size} processes")

    def broadcast_params(self, model) -> None:
        """Copy rank 0's parameters to every rank (models trained outside a DDP wrapper). Under
        FSDP sharding does it (`fsdp.shard_model` fills every shard from rank 0)."""
        if self.world_size == 1 or model is None or self.fsdp:
            return
        for p in model.parameters():
            torch.distributed.broadcast(p.data, src=0)

    def average_gradients(self, model) -> None:
        """Average the accumulated gradients over ranks, in one flat all-reduce: what DDP does,
        for models that are not wrapped (the policy-gradient trainers run the actor through the
        rollout engine and the critic through `token_values`). A parameter must have a gradient on
        every rank or on none (true of every model here: each forward uses all of its weights)."""
        if self.world_size == 1 or model is None:
            return
        from rlhfkit.trainers.fsdp import is_sharded

        if is_sharded(model):  # FSDP2 reduce-scattered (and averaged) them in backward
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world_size
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))

    def check_replicas(self, model, what: str = "model") -> float:
        """Raise if the ranks' copies of ``model`` differ; returns the largest difference found.

        Data parallelism keeps replicas identical only if every gradient went through the
        all-reduce; one forward that bypassed a DDP wrapper would let the ranks drift apart
        silently (and rank 0 alone writes the model). Compares one float64 sum per parameter.
        """
        if self.world_size == 1:
            return 0.0
        from torch.distributed.tensor import DTensor

        params = [p for p in self.unwrap(model).parameters() if not isinstance(p, DTensor)]  # FSDP2: sharded
        if not params:
            return 0.0
        sums = torch.stack([p.detach().double().sum() for p in params]).to(self.device)
        lo, hi = -self.max(-sums), self.max(sums)
        diff = float((hi - lo).abs().max())
        scale = float(sums.abs().max()) + 1.0
        if diff > 1e-9 * scale:
            raise RuntimeError(f"{what}: the {self.world_size} data-parallel replicas differ (largest per-parameter "
                               f"sum difference {diff:.3g}); a gradient missed the all-reduce")
        return diff


def _warn_if_fsdp_ignored(accelerator) -> None:
    """`accelerate launch --use_fsdp` on CPU processes silently runs DDP: accelerate (1.x) only
    turns FSDP on for GPU-like devices. Say so instead of letting the user believe weights are sharded."""
    from accelerate.utils import DistributedType

    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    if wants_fsdp and accelerator.distributed_type != DistributedType.FSDP and accelerator.is_main_process:
        log.warning("FSDP was requested but accelerate runs %s on %s: parameters are replicated, not sharded "
                    "(accelerate enables FSDP only on GPU-like devices)",
                    accelerator.distributed_type.value, accelerator.device)


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
        self._truncate_after(initial_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard drops the earlier events at or past it, as _truncate_after does
            # for the jsonl: a run resumed at step s logs from s+1 on; one restarted at step 0
            # (step 0's evaluation included) replaces the old curves entirely
            self.tb = SummaryWriter(log_dir=str(self.out_dir / "tb"),
                                    purge_step=initial_step + 1 if initial_step > 0 else 0)
        except Exception as e:  # tensorboard missing: jsonl is still written
            log.warning("TensorBoard logging disabled: %s", e)
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop records written after the checkpoint we resumed from. A run starting at
        step 0 (killed before its first checkpoint, or rerun in place) drops them all: it logs
        every step, step 0's evaluation included, again."""
        if not self.metrics_path.exists():
            return
        keep = [ln for ln in self.metrics_path.read_text().splitlines()
                if ln.strip() and step > 0 and json.loads(ln).get("step", 0) <= step]
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
    """AdamW; no weight decay on biases and norm weights (the usual transformer recipe).

    With ``optim.head_lr`` set, the scalar head of a reward/value model gets its own learning rate:
    a freshly initialised head on a pretrained backbone learns far too slowly at a backbone-sized lr
    (schedules scale every group's lr by the same factor, so the ratio holds throughout).
    """
    head_ids: set[int] = set()
    if getattr(optim, "head_lr", 0.0):
        from rlhfkit.models.heads import backbone_and_head

        try:
            head_ids = {id(p) for p in backbone_and_head(model)[1].parameters()}
        except TypeError:  # a causal LM: no scalar head, head_lr does not apply
            head_ids = set()
    decay, no_decay, head = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in head_ids:
            head.append(p)
        else:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0},
              {"params": head, "weight_decay": 0.0, "lr": optim.head_lr}]
    groups = [g for g in groups if g["params"]] + list(extra_groups or [])
    params = [p for g in groups for p in g["params"]]
    # The fused kernel (one pass over each tensor) where torch has it: plain CPU/CUDA float tensors.
    # On CPU torch's default is a per-parameter loop, ~3x slower; FSDP2's DTensors keep the default.
    fused = bool(params) and all(type(p) is torch.nn.Parameter and p.is_floating_point()
                                 and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_eps,
                             fused=fused or None)


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

    def state_dict(self) -> dict:
        """The counters, for a checkpoint's trainer_state.json (a resumed run keeps counting)."""
        return {"consecutive": self.consecutive, "skipped_total": self.skipped_total}

    def load_state_dict(self, state: dict | None) -> StepGuard:
        """Restore the counters (checkpoints written before they were saved carry none: start at 0)."""
        state = state or {}
        self.consecutive = int(state.get("consecutive", 0))
        self.skipped_total = int(state.get("skipped_total", 0))
        return self

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
    from rlhfkit.trainers.zero import is_engine

    if is_engine(model):  # DeepSpeed clips and steps (and skips a non-finite step itself)
        from rlhfkit.trainers.zero import step

        return step(model, scheduler, loss_value, guard)
    params = [p for p in model.parameters() if p.requires_grad]
    if max_grad_norm and max_grad_norm > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        grads = [p.grad for p in params if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: the norm over every rank's shards
        grad_norm = grad_norm.full_tensor()
    stepped = guard.check(loss_value, grad_norm)
    if stepped:
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return stepped, float(grad_norm)


def micro_batches(items: list, micro_batch_size: int) -> list[list]:
    return [items[i:i + micro_batch_size] for i in range(0, len(items), micro_batch_size)]


def eval_chunks(examples: list, micro_batch_size: int, rt: Runtime | None = None):
    """Yield ``(chunk, real)`` over an evaluation set: all of it on one process; this rank's shard
    with ``rt``. ``real=False`` marks a stand-in chunk, run only so that every rank makes the same
    number of forwards when forwards are collectives (FSDP, ZeRO-3); its result is discarded.
    Callers sum over real chunks and reduce the sums with ``rt.sum``."""
    if rt is None or rt.world_size == 1:
        yield from ((chunk, True) for chunk in micro_batches(examples, micro_batch_size))
        return
    for chunk in rt.shard_chunks(examples, micro_batch_size):
        if chunk is not None:
            yield chunk, True
        elif rt.lockstep_forwards:
            yield examples[:1], False


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
