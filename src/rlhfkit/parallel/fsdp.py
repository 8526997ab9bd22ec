"""Fully sharded data parallelism with torch's FSDP2 (``torch.distributed.fsdp.fully_shard``).

`train.fsdp: true` on N processes shards every transformer block, and the root (embeddings, final
norm, LM or scalar head), over the ranks: each rank holds 1/N of every parameter, gradient and
optimizer state; a block's weights are all-gathered for its forward and backward, and gradients
are reduce-scattered (averaged over ranks, as DDP does) after it. rlhfkit calls torch directly
rather than through accelerate, because accelerate (1.x) enables FSDP only on GPU-like devices
(docs/distributed.md), and torch's own API is the same on CPU (gloo) and GPU (NCCL).

What the trainers need besides the forward/backward:
- the optimizer is built before sharding (its parameter groups come from the unsharded names);
  `shard_model` points its groups at the sharded parameters, by name;
- checkpoints and the final model hold **full** (unsharded) tensors, gathered from the shards, in
  the same formats as unsharded runs: weights in transformers' safetensors layout, optimizer state
  keyed by parameter name. A run therefore resumes at any world size, sharded or not
  (`load_model_state`, `load_optimizer_state`);
- micro-batch accumulation skips the reduce-scatter on all but the last micro-batch
  (`gradient_sync`);
- a LoRA (peft) model is sharded as it is, frozen base and adapters alike; its saves gather only
  the trainable tensors into a peft adapter directory (`AdapterWeights`, `load_adapter_state`);
- the policy-gradient trainers' actor also generates: token-by-token decoding with EOS stopping
  runs a different number of forwards on each rank, which per-forward all-gathers cannot do, so
  `full_weights` gathers the actor once for the whole rollout and frees it afterwards.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from peft import get_peft_model_state_dict
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from rlhfkit.models.loading import is_structure_only, structure_only
from rlhfkit.models.lora import is_peft
from rlhfkit.models.token_head import restore_token_head
from rlhfkit.models.weights import saved_weights
from rlhfkit.parallel.base import Strategy


def is_sharded(model) -> bool:
    return isinstance(model, FSDPModule)


def _blocks(model) -> list[torch.nn.Module]:
    """The transformer blocks: the entries of the decoder's layer list (``model.layers``, ``h``,
    ...), found as the longest ModuleList of identical module types."""
    best: list[torch.nn.Module] = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > len(best):
            if len({type(m) for m in module}) == 1:
                best = list(module)
    return best


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy | None:
    """FSDP2's casting for a run's compute precision: under bf16 (fp16) the gathered parameters are
    bf16 (fp16), halving the all-gather, while gradients are reduce-scattered in fp32 and the shards
    (the master weights the optimizer updates) stay fp32. None under fp32 (no casting)."""
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if low is None:
        return None
    return MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)


def shard_model(model, optimizer, device: torch.device, mp_policy: MixedPrecisionPolicy | None = None):
    """fully_shard each block, then the root, and fill every rank's shards from rank 0's weights;
    rebind ``optimizer`` (not stepped yet) to the sharded parameters. Returns (model, optimizer):
    the same objects, now sharded.

    Only rank 0 needs real weights: the other ranks may pass the model built on the meta device
    (`models.loading.structure_only`), which then gets its shards allocated (``to_empty``) and
    filled by a broadcast from rank 0 (``set_model_state_dict(..., broadcast_from_rank0=True)``),
    buffers too. Rank 0 holds its full weights until then; the others never do."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    rank0 = dist.get_rank() == 0
    empty = is_structure_only(model)
    if empty and rank0:
        raise RuntimeError("rank 0 must hold the weights that the other ranks' shards are filled from")
    full = model.state_dict() if rank0 else {}  # plain tensors, alive until broadcast
    name_of = {id(p): n for n, p in model.named_parameters()}
    extra = {"mp_policy": mp_policy} if mp_policy is not None else {}
    for block in _blocks(model):
        fully_shard(block, mesh=mesh, **extra)
    fully_shard(model, mesh=mesh, **extra)
    if empty:
        model.to_empty(device=device)
    set_model_state_dict(model, full, options=_full_options(broadcast_from_rank0=True))
    del full
    for buf in model.buffers():  # constants outside the state dict too (rotary tables): rank 0's
        dist.broadcast(buf.data, src=0)
    sharded = dict(model.named_parameters())
    if optimizer is not None:
        if optimizer.state:
            raise RuntimeError("shard the model before the optimizer takes a step")
        for group in optimizer.param_groups:
            group["params"] = [sharded[name_of[id(p)]] for p in group["params"]]
            # the fused CPU kernel takes plain tensors; DTensor shards go through foreach
            if group.get("fused"):
                group["fused"], group["foreach"] = False, True
        optimizer.defaults["fused"] = False
    return model, optimizer


@contextlib.contextmanager
def full_weights(model):
    """Inside the block every parameter of a sharded ``model`` is whole on every rank: each FSDP
    unit is all-gathered once on entry (a collective) and kept whole by the forwards, which then
    run no collectives at all, so the ranks may run different numbers of them (generation that
    stops at EOS). On exit the units are resharded and reshard after forward again. The
    root keeps FSDP's own choice (it does not reshard after forward). A no-op for unsharded models.
    Memory: one full copy of the weights for the duration of the block."""
    if not is_sharded(model):
        yield
        return
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    inner = [m for m in units if m is not model]
    for m in inner:
        m.set_reshard_after_forward(False, recurse=False)
    for m in units:
        m.unshard()
    try:
        yield
    finally:
        for m in inner:
            m.set_reshard_after_forward(True, recurse=False)
        for m in units:
            m.reshard()


def gradient_sync(model, sync: bool):
    """Context for one micro-batch's backward: reduce-scatter gradients only when ``sync`` (the last
    micro-batch of an accumulation); the others accumulate unsharded gradients locally."""
    if not is_sharded(model):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def ctx():
        model.set_requires_gradient_sync(sync)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    return ctx()


def _full_options(**kw):
    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The unsharded weights on rank 0's CPU (other ranks get an empty dict), keyed as in the
    unsharded model; ``trainable_only`` leaves the frozen ones out, ungathered (a collective:
    call it on every rank)."""
    return get_model_state_dict(model, options=_full_options(cpu_offload=True, ignore_frozen_params=trainable_only))


def unsharded_copy(model, state: dict[str, torch.Tensor]):
    """A plain (unsharded) instance of the model's class holding ``state`` (from `full_model_state`),
    for ``save_pretrained``: the saved directory is exactly what an unsharded run writes (class
    name in config.json, tied weights once). Built on the meta device, so no weights are
    initialised or copied twice."""
    cls = next(b for b in type(model).__bases__ if b is not FSDPModule)
    with torch.device("meta"):
        plain = cls(model.config)
        restore_token_head(plain, None)  # a token head's structure, as the live model has it
    plain.load_state_dict(state, strict=True, assign=True)
    for name, buf in list(plain.named_buffers()):  # non-persistent buffers (rotary tables): from the live model
        if buf.is_meta:
            owner, _, leaf = name.rpartition(".")
            live = model.get_buffer(name)
            plain.get_submodule(owner).register_buffer(leaf, live.detach().cpu().clone(), persistent=False)
    if getattr(model.config, "tie_word_embeddings", False):
        plain.tie_weights()
    return plain.eval()


def gathered_copy(model, keep: bool):
    """A collective (call it on every rank): the sharded model's full weights, as an unsharded
    copy (`unsharded_copy`) on the ranks that ``keep`` it, else None. A LoRA (peft) model gives
    its adapter instead (`AdapterWeights`): only the trainable tensors are gathered, never the
    frozen base."""
    if is_peft(model):
        state = full_model_state(model, trainable_only=True)
        return AdapterWeights(model, state) if keep else None
    state = full_model_state(model)
    return unsharded_copy(model, state) if keep else None


class AdapterWeights:
    """A sharded peft model's adapter (and ``modules_to_save`` heads), gathered whole: saves
    exactly the directory an unsharded LoRA run writes (peft's format, adapter_config.json)."""

    def __init__(self, model, state: dict[str, torch.Tensor]):
        self.model, self.state = model, state

    def save_pretrained(self, path, safe_serialization: bool = True) -> None:
        # peft picks the adapter's tensors out of the state dict it is given, as from its own
        self.model.save_pretrained(path, safe_serialization=safe_serialization, state_dict=self.state)


def load_adapter_state(model, saved: dict[str, torch.Tensor]) -> None:
    """An adapter file's tensors (peft's saved names) into a sharded peft model, each rank keeping
    its shard. The names are mapped by peft's own saving rule, applied to the trainable names."""

    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    saved_name = get_peft_model_state_dict(model, state_dict={n: torch.tensor(i) for i, n in enumerate(trainable)})
    to_model = {k: trainable[int(v)] for k, v in saved_name.items()}
    unknown, missing = sorted(saved.keys() - to_model.keys()), sorted(to_model.keys() - saved.keys())
    if unknown or missing:
        raise RuntimeError(f"adapter does not match the model: missing={missing[:5]} unexpected={unknown[:5]}")
    set_model_state_dict(model, {to_model[k]: v for k, v in saved.items()}, options=_full_options(strict=False))


def full_optimizer_state(model, optimizer) -> dict[str, Any]:
    """The optimizer state with every tensor unsharded, keyed by parameter name (a collective)."""
    return get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))


def load_model_state(model, state: dict[str, torch.Tensor]) -> None:
    """Full weights (e.g. a checkpoint's safetensors) into a sharded model: each rank keeps its shard.
    Tied weights saved once (lm_head = embed_tokens) are filled in from their twin."""

    wanted = set(model.state_dict().keys())
    state = dict(state)
    for key in wanted - state.keys():
        if key.endswith("lm_head.weight"):
            twin = key.replace("lm_head.weight", "model.embed_tokens.weight")
            if twin in state:
                state[key] = state[twin]
    missing, unexpected = sorted(wanted - state.keys()), sorted(state.keys() - wanted)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match the model: missing={missing[:5]} unexpected={unexpected[:5]}")
    set_model_state_dict(model, state, options=_full_options())


class FullySharded(Strategy):
    """``train.fsdp: true`` on N processes: trained and frozen models sharded with FSDP2.

    Loading: inside `loading`, ranks other than 0 build every model on the meta device and receive
    their shards from rank 0 in `prepare` / `prepare_frozen`, so only rank 0 ever holds a whole copy.
    Every model loaded there must be prepared (or frozen-prepared) before its first forward.
    Forwards of a sharded model are collectives: every rank must run as many (`lockstep_forwards`).
    Under bf16/fp16 the shards gather in that dtype and gradients reduce in fp32
    (`mixed_precision_policy`).
    """

    name = "fsdp"

    def __init__(self, precision: str = "fp32"):
        super().__init__(precision)
        self._frozen: list[str] = []

    def start(self, seed: int) -> None:
        super().start(seed)
        self._frozen = []

    @property
    def lockstep_forwards(self) -> bool:
        return True

    def loading(self):
        return structure_only(self.rank != 0)

    def prepare(self, model, optimizer, *, micro_batch_size: int = 1, max_grad_norm: float = 0.0):
        total = sum(p.numel() for p in model.parameters())
        read = self.gather_objects([not is_structure_only(model)])  # which ranks read the weights
        model, optimizer = shard_model(model, optimizer, self.device, mixed_precision_policy(self.precision.name))
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
        self.layout.update({"param_elements": total, "param_elements_on_rank": local,
                            "weights_read_by_ranks": [r for r, x in enumerate(read) if x]})
        return model, optimizer

    def prepare_frozen(self, model, name: str):
        """Shard a frozen model (a reference, a reward model) like the trained ones instead of keeping a
        whole copy on every rank; recorded in the layout under ``sharded_frozen``."""
        if model is None:
            return model
        if not is_sharded(model):
            shard_model(model, None, self.device, mixed_precision_policy(self.precision.name))
        self._frozen.append(name)
        self.layout["sharded_frozen"] = sorted(self._frozen)
        return model

    def backward(self, loss, model, sync: bool = True) -> None:
        with gradient_sync(model, sync):  # reduce-scatter only on the last backward before the step
            super().backward(loss, model, sync)

    def full_weights(self, model):
        return full_weights(model)

    def saveable(self, model, *, keep: bool):
        if is_sharded(model):
            return gathered_copy(model, keep=keep)
        return super().saveable(model, keep=keep)

    def optimizer_state(self, model, optimizer) -> dict:
        if model is not None and is_sharded(model):
            # after a forward (an evaluation) the root may hold gathered copies, which the optimizer
            # does not know: reshard so that its parameters are the sharded ones it steps
            model.reshard()
            return full_optimizer_state(model, optimizer)
        return super().optimizer_state(model, optimizer)

    def load_weights(self, model, directory) -> None:
        if not is_sharded(model):
            return super().load_weights(model, directory)
        state, is_adapter = saved_weights(directory)  # full tensors: each rank keeps its shard
        (load_adapter_state if is_adapter else load_model_state)(model, state)

    @contextlib.contextmanager
    def writing_weights(self, model):
        if is_sharded(model):
            # after a forward the root's weights may still be gathered (the module then holds plain
            # copies that FSDP discards); reshard so that writes land in the shards
            model.reshard()
        yield
