"""Optimizer state in checkpoints: one portable form for every layout.

A checkpoint's optimizer state is either ``optimizer.state_dict()``'s index-keyed form (written by an
unsharded run) or keyed by parameter name (written by FSDP or ZeRO runs, whose partitions have no
stable indices). `load_optimizer_state` takes either into a sharded or plain model, so a run resumes
at any world size and layout.
"""

from __future__ import annotations

from typing import Any

from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule


def load_optimizer_state(model, optimizer, saved: dict[str, Any]) -> None:
    """A saved optimizer state into ``optimizer``: name-keyed (written by a sharded run) or, from
    an unsharded run, ``optimizer.state_dict()``'s index-keyed form, into a sharded or plain model."""
    if index_keyed(saved):
        if not isinstance(model, FSDPModule):
            optimizer.load_state_dict(saved)
            return
        # index i is the i-th parameter over the groups in order, which `shard_model` keeps
        # (it rebinds each group's list in place)
        name_of = {id(p): n for n, p in model.named_parameters()}
        saved = by_name(saved, [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]])
    set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))


def index_keyed(saved: dict) -> bool:
    """Whether a saved optimizer state is ``optimizer.state_dict()``'s (parameters by index)."""
    groups = saved.get("param_groups", [])
    return bool(groups) and all(isinstance(i, int) for g in groups for i in g["params"])


def by_name(saved: dict, names: list[str]) -> dict:
    """Index-keyed optimizer state -> keyed by parameter name; ``names``: the parameters' names
    in the optimizer's order (over its groups)."""
    ids = [i for g in saved["param_groups"] for i in g["params"]]
    if len(ids) != len(names):
        raise RuntimeError(f"checkpoint optimizer has {len(ids)} parameters, the model {len(names)}")
    to_name = dict(zip(ids, names))
    return {"state": {to_name[i]: s for i, s in saved["state"].items()},
            "param_groups": [{**g, "params": [to_name[i] for i in g["params"]]} for g in saved["param_groups"]]}
