"""The strategy interface: how one run uses its processes, and the collectives every strategy shares.

A strategy is chosen once per run (`make_strategy`, called by the CLI) and passed to every trainer:

    strategy = make_strategy(cfg.train, cfg.model)
    with strategy.loading():                  # FSDP: only rank 0 reads the weights
        model = load(...)
    model, optimizer = strategy.prepare(model, optimizer, micro_batch_size=..., max_grad_norm=...)
    for j, chunk in enumerate(chunks):        # see `training.accumulate`
        with strategy.autocast():
            loss = ...
        strategy.backward(loss, model, sync=j == len(chunks) - 1)
    strategy.step(model, optimizer, scheduler, max_grad_norm, loss_value, guard)

Every rank runs the same trainer code. Each takes its strided share of a global batch (`shard`),
gradients are averaged over ranks by the strategy (in `backward` or `step`), and metrics are sums
over ranks divided by global counts (`sum`, `gather`). On one process every collective returns its
input. The layouts (docs/distributed.md):

    `SingleProcess`   one process;
    `DataParallel`    replicas; gradients averaged with one all-reduce per optimizer step;
    `FullySharded`    torch FSDP2: parameters, gradients and optimizer state sharded (parallel/fsdp.py);
    `Zero`            DeepSpeed ZeRO 1/2: optimizer state (and gradients) partitioned (parallel/zero.py).
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
import torch.distributed as dist

from rlhfkit.config import ConfigError
from rlhfkit.models.saving import save_pretrained_atomic
from rlhfkit.models.weights import load_weights_into
from rlhfkit.parallel.malloc import keep_freed_memory
from rlhfkit.parallel.optim_state import load_optimizer_state
from rlhfkit.parallel.precision import Precision
from rlhfkit.rng import set_seed

log = logging.getLogger("rlhfkit")


def init_distributed() -> tuple[torch.device, int, int]:
    """(device, rank, world size), initialising the process group from the launcher's environment
    (``torchrun`` and ``accelerate launch`` both set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).
    NCCL on GPUs, gloo on CPU processes. Idempotent: a second call reuses the group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if dist.is_initialized():
        return device, dist.get_rank(), dist.get_world_size()
    return device, 0, 1


class Strategy:
    """One process: the base of every strategy. Collectives work at any world size (identity on one
    process); the model hooks do what one process needs, and subclasses replace them."""

    name = "single"

    def __init__(self, precision: str = "fp32"):
        self.device, self.rank, self.world_size = init_distributed()
        self.is_main = self.rank == 0
        self.precision = Precision(precision, self.device)
        self.layout: dict = {"world_size": self.world_size, "strategy": self.name}
        if self.device.type == "cpu":
            keep_freed_memory()  # big gradient buffers reuse their pages instead of faulting each step

    def start(self, seed: int) -> None:
        """Begin one trainer's run (a pipeline stage, an online-DPO iteration): a fresh layout record,
        and every random generator seeded with ``seed``, the same on every rank, so that models
        initialised from it are identical replicas."""
        self.layout = {"world_size": self.world_size, "strategy": self.name}
        set_seed(seed)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(world_size={self.world_size}, precision={self.precision.name})"

    # ------------------------------------------------------------------ collectives

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks."""
        if self.world_size == 1:
            return x
        x = x.detach().to(self.device).clone()
        dist.all_reduce(x)
        return x

    def max(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return x
        x = x.detach().to(self.device).clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
        return x

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x`` along dim 0 (in rank order); shapes must agree past dim 0."""
        if self.world_size == 1:
            return x
        x = x.detach().to(self.device).contiguous()
        sizes = torch.zeros(self.world_size, dtype=torch.long, device=self.device)
        gather_one = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the older name
        gather_one(sizes, torch.tensor([x.shape[0]], device=self.device))
        most = int(sizes.max())
        padded = torch.zeros((most, *x.shape[1:]), dtype=x.dtype, device=self.device)
        padded[:x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:n] for part, n in zip(parts, sizes.tolist())])

    def gather_objects(self, items: list) -> list:
        """Concatenate every rank's list of picklable objects (in rank order)."""
        if self.world_size == 1:
            return list(items)
        out: list = [None] * self.world_size
        dist.all_gather_object(out, list(items))
        return [x for part in out for x in part]

    def wait(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def shard(self, items: list) -> list:
        """This rank's share of a global batch (strided: rank r takes items r, r+W, r+2W, ...)."""
        return items[self.rank::self.world_size]

    def unshard(self, mine: list) -> list:
        """The inverse of `shard`: every rank's share gathered back into the global order, on every rank."""
        if self.world_size == 1:
            return list(mine)
        everyone, W = self.gather_objects(mine), self.world_size
        n = len(everyone)
        out: list = [None] * n
        for i, item in zip((i for r in range(W) for i in range(r, n, W)), everyone):
            out[i] = item
        return out

    def check_divisible(self, n: int, what: str) -> None:
        """Equal shares on every rank: each must run the same number of synchronised backwards."""
        if n % self.world_size:
            raise ConfigError(f"{what}: {n} does not split evenly over {self.world_size} processes")

    @property
    def lockstep_forwards(self) -> bool:
        """True when a forward is itself a collective (FSDP): every rank must run as many."""
        return False

    # ------------------------------------------------------------------ models

    def loading(self):
        """Context for loading the models this strategy will prepare or shard (see `FullySharded`)."""
        return contextlib.nullcontext()

    def prepare(self, model, optimizer, *, micro_batch_size: int = 1, max_grad_norm: float = 0.0):
        """Make ``model`` (and the ``optimizer`` built on it, not stepped yet) ready for training on
        this layout. Returns (model, optimizer), which the trainer uses from then on."""
        self._record_layout(model)
        return model, optimizer

    def prepare_frozen(self, model, name: str):
        """A frozen model (reference, reward model) on this layout. Only FSDP changes it (shards it)."""
        return model

    def autocast(self):
        """Context for forwards in the run's compute precision (`parallel.precision`)."""
        return self.precision.autocast()

    def backward(self, loss: torch.Tensor, model, sync: bool = True) -> None:
        """Backpropagate one micro-batch's loss of ``model``. ``sync``: the last backward of ``model``
        before its optimizer step (where a sharded or partitioned layout reduces gradients)."""
        self.precision.backward(loss)

    def step(self, model, optimizer, scheduler, max_grad_norm: float, loss_value: torch.Tensor,
             guard) -> tuple[bool, float]:
        """Clip, check for non-finite values, step (or skip) and zero the gradients.
        Returns (stepped, gradient norm)."""
        return clip_and_step(model, optimizer, scheduler, max_grad_norm, loss_value, guard, self.precision)

    def unwrap(self, model):
        """The plain module (for generation and saving)."""
        return model

    def full_weights(self, model):
        """Context in which ``model``'s weights are whole on every rank (FSDP gathers them once for a
        whole rollout); a no-op elsewhere."""
        return contextlib.nullcontext()

    def saveable(self, model, *, keep: bool):
        """What ``save_pretrained`` should be called on: the plain module (FSDP: a gathered copy on
        the ranks that ``keep`` it, a collective). None on ranks that do not keep it."""
        return self.unwrap(model) if keep else None

    def save_model(self, model, tokenizer, out_dir) -> None:
        """The trained model as a transformers/peft directory, written by rank 0. Call on every rank."""
        plain = self.saveable(model, keep=self.is_main)
        if self.is_main:
            save_pretrained_atomic(plain, tokenizer, out_dir)

    def optimizer_state(self, model, optimizer) -> dict:
        """The full state of ``optimizer`` (or a scheduler) for a checkpoint; ``model``: the one it
        updates, if any. A collective under FSDP and ZeRO (states are gathered)."""
        return optimizer.state_dict()

    def load_optimizer_state(self, model, optimizer, saved: dict) -> None:
        """A checkpoint's state into ``optimizer`` (or a scheduler), whatever layout saved it."""
        if model is None:
            optimizer.load_state_dict(saved)
        else:
            load_optimizer_state(model, optimizer, saved)

    def load_weights(self, model, directory) -> None:
        """Weights saved by ``save_pretrained`` (full model or peft adapter) into ``model``."""
        load_weights_into(self.unwrap(model), directory)

    def writing_weights(self, model):
        """Context for writing weights into ``model`` in place (the RM's probe head): FSDP writes into
        the shards, ZeRO copies the result into its fp32 master partitions."""
        return contextlib.nullcontext()

    def check_replicas(self, model, what: str = "model") -> float:
        return 0.0

    def _record_layout(self, model) -> None:
        total = sum(p.numel() for p in model.parameters())
        self.layout.update({"param_elements": total, "param_elements_on_rank": total})


SingleProcess = Strategy


def clip_and_step(model, optimizer, scheduler, max_grad_norm: float, loss_value: torch.Tensor, guard,
                  precision: Precision | None = None) -> tuple[bool, float]:
    """Clip, let ``guard`` (`training.optim.StepGuard`) check for non-finite values, then step (or skip);
    zero the gradients. Returns (stepped, grad_norm). fp16 gradients are unscaled first, and a step
    whose gradients overflowed at the current loss scale is skipped by the scaler (which lowers the
    scale) without counting against the guard."""
    params = [p for p in model.parameters() if p.requires_grad]
    if precision is not None:
        precision.unscale(optimizer)
    if max_grad_norm and max_grad_norm > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        grads = [p.grad for p in params if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: the norm over every rank's shards
        grad_norm = grad_norm.full_tensor()
    if precision is not None and precision.overflowed(loss_value, grad_norm):
        precision.apply(optimizer)  # fp16 overflow: the scaler skips the step and lowers its scale
        stepped = False
    else:
        stepped = guard.check(loss_value, grad_norm)
        if stepped:
            if precision is not None:
                precision.apply(optimizer)
            else:
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
        elif precision is not None:
            precision.skipped(optimizer)
    optimizer.zero_grad(set_to_none=True)
    return stepped, float(grad_norm)
