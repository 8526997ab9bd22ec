"""Seeding and the random-generator state a checkpoint carries (Python, NumPy, torch CPU and CUDA)."""

from __future__ import annotations

import random

import numpy as np
import torch


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


def plain_rng_state() -> dict:
    """`rng_state` as data that ``torch.load(weights_only=True)`` accepts: Python's Mersenne Twister
    as a list of ints, NumPy's as a tensor, torch's as tensors (a checkpoint never holds objects
    whose unpickling could run code)."""
    state = rng_state()
    version, internal, gauss = state["python"]
    name, key, pos, has_gauss, cached = state["numpy"]
    return {"python": [int(version), [int(x) for x in internal], gauss],
            "numpy": {"name": str(name), "key": torch.from_numpy(np.asarray(key, dtype=np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": state["torch"], "cuda": state.get("cuda")}


def set_plain_rng_state(plain: dict) -> None:
    """Restore a state saved by `plain_rng_state`."""
    version, internal, gauss = plain["python"]
    n = plain["numpy"]
    set_rng_state({"python": (version, tuple(internal), gauss),
                   "numpy": (n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]),
                   "torch": plain["torch"], "cuda": plain.get("cuda")})
