"""Sampling a batch of prompts with a policy (step 1 of every online method): responses, their
decoded text, per-rank random streams, and what the responses look like (length, EOS, degeneration)."""

from __future__ import annotations

import contextlib
import hashlib

import torch

from rlhfkit.data import end_of_turn_ids
from rlhfkit.rollout.backends import RolloutBackend, make_backend
from rlhfkit.rollout.experience import Experience, common_prefix_len
from rlhfkit.rollout.prompts import PromptItem


def rollout(model, items: list[PromptItem], settings, tokenizer, seed: int | None = None,
            strategy=None, backend: RolloutBackend | None = None) -> Experience:
    """Sample ``settings.n`` responses per prompt (rows i*n..i*n+n-1 belong to items[i]).

    settings: a `config.RolloutSection`; its ``backend`` names what samples (`backends.BACKENDS`)
    unless a ``backend`` object is given. ``seed`` gives the sampling its own generator (see
    `rank_stream_seed`); None = torch's global RNG. With a ``strategy`` the model's weights are whole
    for the duration (FSDP gathers them once, so each rank decodes on its own and stops at its own
    EOS) and a wrapped model is unwrapped; the backend's weights are synced from them, and the
    forwards run in the strategy's compute precision (autocast).
    """
    backend = backend if backend is not None else make_backend(settings.backend)
    whole = strategy.full_weights(model) if strategy is not None else contextlib.nullcontext()
    plain = strategy.unwrap(model) if strategy is not None else model
    autocast = strategy.autocast() if strategy is not None else contextlib.nullcontext()
    with whole, autocast:
        backend.sync_weights(plain)
        exp = backend.generate([it.ids for it in items], settings, eos_token_id=stop_ids(plain, tokenizer),
                               pad_token_id=tokenizer.pad_token_id, seed=seed)
    exp.shared_prefix = common_prefix_len([items[i].ids for i in exp.prompt_index.tolist()])
    return exp


def stop_ids(model, tokenizer) -> list[int]:
    """The ids a response ends at: the tokenizer's eos, the end-of-turn tokens of its vocabulary
    (`data.end_of_turn_ids`: a chat template's turn end, e.g. <|im_end|> on a base model whose eos
    is <|endoftext|>) and the model's ``generation_config.eos_token_id`` (one id or a list)."""
    ids = set(end_of_turn_ids(tokenizer))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([configured] if isinstance(configured, int) else configured or [])
    return sorted(ids)


def rank_stream_seed(seed: int, step: int, rank: int) -> int:
    """A rank's own sampling seed for iteration ``step``: a function of (seed, step, rank) only.

    Ranks must not share a stream: with the training seed on every rank (which identical model
    initialisation needs), rank 1 would draw the very same uniforms as rank 0 for its different
    prompts, and the samples of the shards would be correlated. Needing no RNG state in a
    checkpoint, a run resumed on the same number of processes draws what the uninterrupted one drew.
    """
    digest = hashlib.sha256(f"rollout:{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # a non-negative int64


def decode_responses(exp: Experience, tokenizer) -> list[str]:
    lengths = exp.response_lengths().tolist()
    return [tokenizer.decode(row[:n], skip_special_tokens=True).strip()
            for row, n in zip(exp.response_ids.tolist(), lengths)]


def response_metrics(exp: Experience, responses: list[str], strategy=None) -> dict:
    """Length, EOS rate and two degeneration alarms: empty answers and repeated bigrams
    (means over every rank's responses when ``strategy`` is given)."""
    distinct = []
    for row, n in zip(exp.response_ids.tolist(), exp.response_lengths().tolist()):
        bigrams = list(zip(row[:n - 1], row[1:n]))
        distinct.append(len(set(bigrams)) / len(bigrams) if bigrams else 1.0)
    per_row = torch.stack([exp.response_lengths().float().cpu(), exp.eos.float().cpu(),
                           torch.tensor([float(not r) for r in responses]), torch.tensor(distinct)], dim=1)  # (B, 4)
    if strategy is not None:
        per_row = strategy.gather(per_row)
    means = per_row.mean(0) if len(per_row) else per_row.new_zeros(4)
    return {"response/length_mean": means[0], "response/eos_frac": means[1],
            "response/empty_frac": float(means[2]), "response/distinct2": float(means[3])}
