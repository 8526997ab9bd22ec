"""The KV cache of the rollout engine: transformers' DynamicCache with full-attention layers whose
keys and values are written in place into buffers allocated once for the whole response.

This is the one module that uses transformers' cache internals (``DynamicCache``, ``DynamicLayer``
and their attributes ``keys``, ``values``, ``is_initialized``), which are not a stable public API.
`check_transformers` guards the versions it was written and tested against; outside them the engine
falls back to the plain DynamicCache (correct, slower) rather than mis-write a cache.
"""

from __future__ import annotations

import functools
import logging

import torch
import transformers
from packaging.version import Version
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

log = logging.getLogger("rlhfkit")

TESTED = (Version("5.0"), Version("6.0"))  # [min, max): the transformers versions this module supports


@functools.cache
def check_transformers() -> bool:
    """Whether the installed transformers has the cache internals the preallocated layers rely on."""
    version = Version(transformers.__version__.split("+")[0])
    ok = TESTED[0] <= version < TESTED[1] and all(hasattr(DynamicLayer, a) for a in ("update", "get_seq_length"))
    if not ok:
        log.warning("transformers %s is outside the versions rlhfkit's rollout cache supports (%s to %s): "
                    "using the plain DynamicCache (slower decoding)", transformers.__version__, *TESTED)
    return ok


def new_cache(config) -> DynamicCache:
    return DynamicCache(config=config)


def preallocate(cache, select: torch.Tensor | None, extra: int) -> None:
    """Give each plain full-attention layer of a DynamicCache room for `extra` more tokens, taking
    rows `select` of what it holds (None: all). Other layer types (sliding window, ...) keep their
    own update rule and are only row-selected."""
    if not check_transformers():
        if select is not None:
            cache.batch_select_indices(select)
        return
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.numel() > 0:
            cache.layers[i] = PreallocatedLayer(layer.keys, layer.values, extra, select)
        elif select is not None:
            layer.batch_select_indices(select)


def is_preallocated(layer) -> bool:
    """Whether a cache layer is one `preallocate` made (its `update` writes in place)."""
    return check_transformers() and type(layer) is PreallocatedLayer


class PreallocatedLayer(DynamicLayer):
    """A DynamicLayer that writes new keys/values into buffers allocated once, instead of
    `torch.cat`-ing the whole cache at every step (a copy of the entire cache per layer per
    token, ~13% of a decode step at batch 16). `keys` / `values` are views of the filled part,
    so attention still sees exactly the tokens so far. Grows by doubling if it runs out."""

    def __init__(self, keys, values, extra, select=None):
        super().__init__()
        n = keys.shape[-2]
        if select is not None:
            keys, values = keys[select], values[select]
        self._kbuf = keys.new_empty(*keys.shape[:-2], n + max(extra, 1), keys.shape[-1])
        self._vbuf = values.new_empty(*values.shape[:-2], n + max(extra, 1), values.shape[-1])
        self._kbuf[..., :n, :] = keys
        self._vbuf[..., :n, :] = values
        self._n = n
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._views()

    def _views(self):
        self.keys = self._kbuf[..., :self._n, :]
        self.values = self._vbuf[..., :self._n, :]

    def update(self, key_states, value_states, *args, **kwargs):
        _, _, n = self.reserve(key_states.shape[-2])
        self._kbuf[..., n:n + key_states.shape[-2], :] = key_states
        self._vbuf[..., n:n + key_states.shape[-2], :] = value_states
        self.advance(key_states.shape[-2])
        return self.keys, self.values

    def reserve(self, t: int):
        """Room for `t` more tokens (grown by doubling when the plan was short) -> the key and
        value buffers (b, heads, capacity, hd) and how many positions are filled; a writer
        fills positions n to n + t of both, then calls `advance(t)`."""
        m = self._n + t
        if m > self._kbuf.shape[-2]:
            cap = max(m, 2 * self._kbuf.shape[-2])
            self._kbuf, self._vbuf = (_regrow(b, self._n, cap) for b in (self._kbuf, self._vbuf))
        return self._kbuf, self._vbuf, self._n

    def advance(self, t: int) -> None:
        self._n += t
        self._views()

    def get_seq_length(self) -> int:
        return self._n

    def batch_select_indices(self, indices):
        self._kbuf, self._vbuf = self._kbuf[indices], self._vbuf[indices]
        self._views()

    def batch_repeat_interleave(self, repeats):
        self._kbuf = self._kbuf.repeat_interleave(repeats, dim=0)
        self._vbuf = self._vbuf.repeat_interleave(repeats, dim=0)
        self._views()

    def reorder_cache(self, beam_idx):
        self.batch_select_indices(beam_idx.to(self._kbuf.device))

    def crop(self, tokens_to_remove):
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens")
        self._n = max(0, self._n + tokens_to_remove)
        self._views()

    def reset(self):
        self._n = 0
        self._views()


def _regrow(buf: torch.Tensor, n: int, cap: int) -> torch.Tensor:
    """(..., L, D) buffer whose first n positions are filled -> the same with room for cap positions."""
    new = buf.new_empty(*buf.shape[:-2], cap, buf.shape[-1])
    new[..., :n, :] = buf[..., :n, :]
    return new
