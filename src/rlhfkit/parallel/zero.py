"""DeepSpeed ZeRO stages 1 and 2 for every trainer: ``train.zero_stage: 1|2`` on N processes.

Stage 1 partitions the AdamW state over the ranks, stage 2 also the gradients; the weights stay
whole on every rank, so forwards, evaluation and the final save are unchanged. rlhfkit calls
``deepspeed.initialize`` itself, as it calls FSDP2 itself: accelerate (1.x) selects DeepSpeed only
on GPU-like devices (docs/distributed.md), and the direct call is the same on gloo and NCCL.

How the trainers' loop maps onto the engine:
- the micro-batch losses are already divided by the global count, so ``engine.backward(loss,
  scale_wrt_gas=False)``; the accumulation boundary is the backward the trainers mark ``sync``;
- ``engine.step()`` clips to ``optim.max_grad_norm`` (DeepSpeed's ``gradient_clipping``) and steps
  the trainers' own AdamW on the flat partitions; a step whose gradient norm is not finite is
  skipped by DeepSpeed, and `StepGuard` counts it;
- the learning-rate schedule stays the trainers' own (its lr reaches the partitions' groups);
- checkpoints keep rlhfkit's format, full tensors with the optimizer state keyed by parameter
  name (`full_optimizer_state` / `load_optimizer_state`, built on DeepSpeed's per-parameter
  ``safe_get/set_full_*`` functions), so a ZeRO run resumes unsharded, under FSDP, or under ZeRO
  at another world size, and the other way round.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import torch

from rlhfkit.config import ConfigError
from rlhfkit.config.extras import require
from rlhfkit.parallel.ddp import DataParallel
from rlhfkit.parallel.optim_state import by_name, index_keyed


def is_engine(model) -> bool:
    """Whether ``model`` is a DeepSpeed engine (without importing DeepSpeed: a run that never
    asked for ZeRO never loads it)."""
    if "deepspeed" not in sys.modules:
        return False
    from deepspeed import DeepSpeedEngine

    return isinstance(model, DeepSpeedEngine)


def is_zero_optimizer(optimizer) -> bool:
    return hasattr(optimizer, "rlhfkit_names")


def require_deepspeed() -> None:
    require("deepspeed", "deepspeed", "train.zero_stage")


def initialize(model, optimizer, stage: int, micro_batch_size: int, world_size: int, max_grad_norm: float):
    """``deepspeed.initialize`` with the trainers' optimizer (built on the plain model, not stepped
    yet). Returns (engine, ZeRO optimizer); the latter remembers each group's parameter names."""
    import deepspeed

    if optimizer.state:
        raise RuntimeError("initialize ZeRO before the optimizer takes a step")
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [[name_of[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    params = {n: p for n, p in model.named_parameters()}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,  # the boundary is the backward marked sync (Zero.backward)
        "train_batch_size": micro_batch_size * world_size,
        "gradient_clipping": float(max_grad_norm or 0.0),
        # buckets of 5e7 elements (200 MB in fp32) instead of DeepSpeed's 5e8 (2 GB), which on a
        # small model cost more memory than the partitioning saves (docs/distributed.md)
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000},
        "zero_allow_untested_optimizer": True,  # torch's AdamW, the trainers' own parameter groups
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    engine, zopt, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                              dist_init_required=False)
    zopt.rlhfkit_names = names
    zopt.rlhfkit_params = params
    return engine, zopt


def backward(engine, loss: torch.Tensor, boundary: bool) -> None:
    engine.set_gradient_accumulation_boundary(boundary)
    engine.backward(loss, scale_wrt_gas=False)


def step(engine, scheduler, loss_value: torch.Tensor, guard) -> tuple[bool, float]:
    """The optimizer step through the engine (clip, AdamW on the partitions); then the schedule.
    DeepSpeed skips a step whose gradient norm is not finite; the guard counts it and stops the
    run after too many."""
    engine.step()
    norm = engine.get_global_grad_norm()
    norm = torch.as_tensor(float("nan") if norm is None or norm < 0 else float(norm))
    stepped = guard.check(loss_value, norm)
    if stepped and scheduler is not None:
        scheduler.step()
    return stepped, float(norm)


def full_optimizer_state(zopt) -> dict[str, Any]:
    """The AdamW state with every tensor whole, keyed by parameter name, in the form of torch's
    ``get_optimizer_state_dict(full_state_dict=True)`` (a collective: call it on every rank)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    base = zopt.optimizer
    _relink(zopt)
    state: dict[str, dict] = {}
    groups = []
    for g, (group, names) in enumerate(zip(base.param_groups, zopt.rlhfkit_names)):
        flat_state = base.state.get(group["params"][0], {})
        keys = [k for k, v in flat_state.items() if torch.is_tensor(v) and v.dim() > 0]
        for name in names:
            p = zopt.rlhfkit_params[name]
            entry = {k: safe_get_full_optimizer_state(p, k).detach().cpu().clone() for k in keys}
            if "step" in flat_state:
                entry["step"] = flat_state["step"].detach().cpu().clone()
            if entry:
                state[name] = entry
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": list(names)})
    return {"state": state, "param_groups": groups}


def _relink(zopt) -> None:
    """Point every parameter at its fragment of the partitions' AdamW state. DeepSpeed (0.19.8)
    links them once, right after the *first group's* first step, when the other groups have no
    state yet, and never again: their parameters would report no state at all."""
    zopt._hp_optimizer_states_linked = False
    zopt._lazy_init_hp_params_optimizer_state()


def load_optimizer_state(zopt, saved: dict[str, Any]) -> None:
    """A saved AdamW state (name-keyed, or an unsharded run's index-keyed ``state_dict()``) into
    the ZeRO partitions; hyperparameters of the groups too."""
    from deepspeed.utils import safe_set_full_optimizer_state

    names = [n for group in zopt.rlhfkit_names for n in group]
    if index_keyed(saved):
        saved = by_name(saved, names)
    base = zopt.optimizer
    if len(saved["param_groups"]) != len(base.param_groups):
        raise RuntimeError(f"checkpoint optimizer has {len(saved['param_groups'])} parameter groups, "
                           f"the model {len(base.param_groups)}")
    for group, g_saved, group_names in zip(base.param_groups, saved["param_groups"], zopt.rlhfkit_names):
        if list(g_saved["params"]) != list(group_names):
            raise RuntimeError("checkpoint optimizer groups hold other parameters than the model's")
        group.update({k: v for k, v in g_saved.items() if k != "params"})
        first = saved["state"].get(group_names[0], {})
        flat = group["params"][0]
        if not first:
            continue
        if flat not in base.state or not base.state[flat]:  # never stepped: create the state to fill
            base.state[flat] = {k: torch.zeros_like(flat) for k, v in first.items() if k != "step"}
        if "step" in first:
            base.state[flat]["step"] = first["step"].clone().to(torch.float32)
    _relink(zopt)
    for name in names:
        for key, value in saved["state"].get(name, {}).items():
            if key != "step":
                safe_set_full_optimizer_state(zopt.rlhfkit_params[name], value.to(torch.float32), key)


def weights_changed(params) -> None:
    """After weights were written into the module (a checkpoint loaded, the RM probe head set),
    copy them into ZeRO's fp32 master partitions, which the next step would otherwise restore.
    A no-op for parameters ZeRO does not manage."""
    from_ds = None
    for p in params:
        if getattr(p, "_hp_mapping", None) is None:
            continue
        if from_ds is None:
            from deepspeed.utils import safe_set_full_fp32_param as from_ds
        from_ds(p, p.detach().float())


class Zero(DataParallel):
    """``train.zero_stage: 1|2`` on N processes: each trained model becomes a DeepSpeed engine.

    The weights stay whole on every rank (forwards, generation and saving use them as they are);
    the engine partitions the optimizer state (stage 1) and the gradients (stage 2), reduces the
    gradients at the backward marked ``sync``, clips and steps. A trainer with several trained
    models (PPO's actor and critic) gets one engine each; their losses are backpropagated
    separately (`training.accumulate`), since two engines cannot share one backward.
    """

    def __init__(self, stage: int, precision: str = "fp32"):
        if precision == "fp16":  # the engine's backward and step bypass the loss scaler
            raise ConfigError("model.dtype: float16 is not supported with train.zero_stage (no loss scaling "
                              "through the DeepSpeed engine); use bfloat16")
        require_deepspeed()
        self.stage = stage
        self.name = f"zero{stage}"
        super().__init__(precision)

    def prepare(self, model, optimizer, *, micro_batch_size: int = 1, max_grad_norm: float = 0.0):
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        engine, zopt = initialize(model, optimizer, self.stage, micro_batch_size, self.world_size, max_grad_norm)
        self.layout.update({"param_elements": total, "param_elements_on_rank": total,
                            "optimizer_elements_on_rank": sum(p.numel() for g in zopt.optimizer.param_groups
                                                              for p in g["params"]),
                            "optimizer_elements": trainable})
        return engine, zopt

    def backward(self, loss, model, sync: bool = True) -> None:
        if is_engine(model):
            backward(model, loss, sync)
        else:
            super().backward(loss, model, sync)

    def step(self, model, optimizer, scheduler, max_grad_norm, loss_value, guard):
        if is_engine(model):  # DeepSpeed clips and steps (and skips a non-finite step itself)
            return step(model, scheduler, loss_value, guard)
        return super().step(model, optimizer, scheduler, max_grad_norm, loss_value, guard)

    def unwrap(self, model):
        return model.module if is_engine(model) else model

    def optimizer_state(self, model, optimizer) -> dict:
        if is_zero_optimizer(optimizer):
            return full_optimizer_state(optimizer)
        return super().optimizer_state(model, optimizer)

    def load_optimizer_state(self, model, optimizer, saved: dict) -> None:
        if is_zero_optimizer(optimizer):
            load_optimizer_state(optimizer, saved)
        else:
            super().load_optimizer_state(model, optimizer, saved)

    def load_weights(self, model, directory) -> None:
        super().load_weights(model, directory)
        weights_changed(self.unwrap(model).parameters())  # into ZeRO's fp32 master copy too

    @contextlib.contextmanager
    def writing_weights(self, model):
        yield
        weights_changed(self.unwrap(model).parameters())  # into ZeRO's fp32 master copy too
