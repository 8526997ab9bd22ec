"""Rollout backends: what samples a rollout's responses (`rollout.backend`; docs/rollout_backends.md).

A backend takes the weights of the policy being trained (`sync_weights`) and samples responses
to chat-templated prompts (`generate`), returning an `Experience` (prompt and response ids with
their masks, the EOS flags and each sampled token's log-probability at the sampling temperature). Two run in the
training process, on the live model, so syncing copies nothing:
- `OwnEngine` ("own"): `engine.generate`, KV-cache decoding made for RLHF (the default);
- `HFGenerate` ("hf"): plain transformers `model.generate`, with its raw logits for the log-probs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from transformers import GenerationConfig

from rlhfkit.rollout.engine import generate as engine_generate
from rlhfkit.rollout.engine import left_pad, model_device, response_mask
from rlhfkit.rollout.experience import Experience
from rlhfkit.rollout.sampler import token_logprob


@runtime_checkable
class RolloutBackend(Protocol):
    name: str

    def sync_weights(self, model) -> None:
        """Make the next `generate` sample from ``model``'s current weights (a transformers or
        peft causal LM, whole: under FSDP the caller gathers it first)."""

    def generate(self, prompt_ids: Sequence[Sequence[int]], settings, *, eos_token_id: int | Sequence[int],
                 pad_token_id: int, seed: int | None = None) -> Experience:
        """``settings.n`` responses per prompt, rows i*n..i*n+n-1 for prompt i. ``settings``: a
        `config.RolloutSection` (n, max_new_tokens, temperature, top_p, top_k, micro_batch_size).
        ``seed``: the sampling's own random stream; None = torch's global RNG."""


class _InProcess:
    """A backend that samples with the trained model itself: syncing keeps a reference."""

    name = ""

    def __init__(self):
        self.model = None

    def sync_weights(self, model) -> None:
        self.model = model

    def _synced(self):
        if self.model is None:
            raise RuntimeError(f"rollout backend {self.name!r}: call sync_weights(model) before generate")
        return self.model


class OwnEngine(_InProcess):
    name = "own"

    def generate(self, prompt_ids, settings, *, eos_token_id, pad_token_id, seed=None) -> Experience:
        return engine_generate(self._synced(), prompt_ids, max_new_tokens=settings.max_new_tokens,
                               eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                               temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
                               n=settings.n, micro_batch_size=settings.micro_batch_size or None, seed=seed)


class HFGenerate(_InProcess):
    """transformers' `model.generate`. The model's own generation_config (a hub model's top_k 50,
    repetition penalty, ...) is set aside for the call: only the rollout settings apply. Keeps
    each step's (rows, vocabulary) logits until the batch ends: bound memory with
    `rollout.micro_batch_size`."""

    name = "hf"

    def generate(self, prompt_ids, settings, *, eos_token_id, pad_token_id, seed=None) -> Experience:
        model = self._synced()
        device = model_device(model)
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        eos_ids = torch.tensor(eos, dtype=torch.long, device=device)
        prompts = [p.tolist() if hasattr(p, "tolist") else list(p) for p in prompt_ids]
        rows = [p for p in prompts for _ in range(settings.n)]
        index = torch.arange(len(prompts), device=device).repeat_interleave(settings.n)
        mbs = settings.micro_batch_size or len(rows)
        was_training = model.training
        model.eval()
        try:
            with _seeded(seed, device), _default_generation_config(model), torch.no_grad():
                parts = [self._chunk(model, rows[i:i + mbs], index[i:i + mbs], settings, eos, eos_ids, pad_token_id)
                         for i in range(0, len(rows), mbs)]
        finally:
            model.train(was_training)
        return Experience.cat(parts) if len(parts) > 1 else parts[0]

    @staticmethod
    def _chunk(model, rows, index, settings, eos, eos_ids, pad_token_id) -> Experience:
        ids, mask = left_pad(rows, pad_token_id, eos_ids.device)
        sample = settings.temperature > 0
        knobs = dict(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k) if sample else {}
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=settings.max_new_tokens,
                             do_sample=sample, eos_token_id=eos, pad_token_id=pad_token_id,
                             return_dict_in_generate=True, output_logits=True, **knobs)
        resp = out.sequences[:, ids.shape[1]:]  # (B, R), pad after EOS
        rmask = response_mask(resp, eos_ids)
        T = settings.temperature or 1.0  # out.logits are the raw logits, before any logits processor
        logp = torch.stack([token_logprob(step.float() / T, resp[:, t]) for t, step in enumerate(out.logits)], dim=1)
        return Experience(prompt_ids=ids, prompt_mask=mask, response_ids=resp, response_mask=rmask,
                          logprobs=logp.masked_fill(rmask == 0, 0.0), eos=torch.isin(resp, eos_ids).any(-1),
                          prompt_index=index, pad_token_id=pad_token_id, temperature=T)


BACKENDS: dict[str, type] = {"own": OwnEngine, "hf": HFGenerate}


def make_backend(name: str) -> RolloutBackend:
    if name not in BACKENDS:
        raise ValueError(f"rollout.backend: unknown backend {name!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[name]()


@contextlib.contextmanager
def _default_generation_config(model):
    """transformers' defaults in place of ``model``'s generation_config (generate fills every
    setting not passed from it) for the duration."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = target.generation_config
    target.generation_config = GenerationConfig()
    try:
        yield
    finally:
        target.generation_config = saved


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """torch's RNG seeded with ``seed`` for the duration, then restored (model.generate draws from it)."""
    if seed is None:
        yield
        return
    devices = [device] if device.type != "cpu" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.manual_seed(seed)
        yield
