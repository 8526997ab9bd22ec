"""Sequence log-probs of preference pairs under the policy and the reference (for DPO's loss), and
the reference's precomputed once and cached in the run directory (``ref_logps.json``).

A batch is `data.PreferenceCollator`'s: the B chosen rows first, then the B rejected ones. Sequence
log-probs sum the response tokens' log-probs (or average them: IPO as TRL computes it).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from rlhfkit.algos import sequence_logps
from rlhfkit.data import batch_to_device
from rlhfkit.models.forward import causal_logprobs
from rlhfkit.models.packing import pack_pairs, packed_logprobs, packs
from rlhfkit.models.lora import adapters_disabled
from rlhfkit.io import write_json_atomic
from rlhfkit.training import eval_chunks
from rlhfkit.training.fingerprint import identify

log = logging.getLogger("rlhfkit")

REF_KEYS = ("ref_chosen_logp", "ref_rejected_logp")  # precomputed values stored on each example


def pair_logps(model, batch: dict, average: bool = False, temperature: float = 1.0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs of the chosen and rejected responses under softmax(logits / temperature):
    (B,), (B,).

    batch: input_ids (2B, T), loss_mask (2B, T) 1 on response tokens. Logits are only computed from
    the earliest response token of the batch on (`keep_last`): the LM head over prompt positions
    would be wasted. When the batch carries "prompt_lengths" (``PreferenceCollator(share_prompt=True)``)
    each pair is one packed sequence, prompt + chosen + rejected, each response seeing the prompt
    and itself.
    """
    if "prompt_lengths" in batch and packs(model):
        logp, lmask = _shared_pair_token_logps(model, batch, temperature)
        seq = sequence_logps(logp, lmask, average=average)
        n = seq.shape[0] // 2
        return seq[:n], seq[n:]
    ids, attn, lmask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    T = ids.shape[1]
    has_resp = lmask.bool().any(0).nonzero()
    first = int(has_resp[0]) if len(has_resp) else T - 1
    k = min(T - first, T - 1)
    logp = causal_logprobs(model, ids, attn, keep_last=k, temperature=temperature)  # (2B, k): tokens T-k .. T-1
    seq = sequence_logps(logp, lmask[:, T - k:], average=average)  # (2B,)
    n = seq.shape[0] // 2
    return seq[:n], seq[n:]


def _shared_pair_token_logps(model, batch: dict, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B, R) response-token log-probs and mask, each pair one packed sequence (prompt once)."""
    rlens = batch["loss_mask"].sum(-1)
    packed = pack_pairs(batch)
    R = packed["shape"][1]
    mask = (torch.arange(R, device=rlens.device)[None] < rlens[:, None]).long()
    return packed_logprobs(model, packed, temperature=temperature), mask


class Reference:
    """pi_ref's sequence log-probs: a frozen model, or the policy's base with adapters disabled."""

    def __init__(self, model, adapters_off: bool = False):
        self.model = model
        self.adapters_off = adapters_off

    @torch.no_grad()
    def logps(self, batch: dict, average: bool = False, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        was_training = self.model.training
        self.model.eval()  # no dropout in the reference
        try:
            if self.adapters_off:
                with adapters_disabled(self.model):
                    return pair_logps(self.model, batch, average, temperature)
            return pair_logps(self.model, batch, average, temperature)
        finally:
            self.model.train(was_training)


def reference_logps(chunk: list[dict], batch: dict, reference: Reference | None, average: bool,
                    temperature: float = 1.0):
    """The chunk's reference log-probs: precomputed ones when the examples carry them."""
    if REF_KEYS[0] in chunk[0]:
        device = batch["input_ids"].device
        return tuple(torch.tensor([ex[k] for ex in chunk], dtype=torch.float32, device=device) for k in REF_KEYS)
    if reference is None:
        raise RuntimeError("no reference model and no precomputed reference log-probs")
    return reference.logps(batch, average, temperature)


@torch.no_grad()
def precompute_reference(examples: list[dict], reference: Reference, collator, micro_batch_size: int,
                         strategy, average: bool = False, temperature: float = 1.0) -> None:
    """Store pi_ref's log-probs on each example (keys REF_KEYS), in place. Each rank scores its shard
    and the numbers are exchanged: every rank ends with all of them."""
    found = []  # (example index, chosen logp, rejected logp)
    # under FSDP padded with stand-ins so that every rank runs the same number of (collective) forwards
    for idx, real in eval_chunks(list(range(len(examples))), micro_batch_size, strategy):
        with strategy.autocast():
            batch = batch_to_device(collator([examples[i] for i in idx]), strategy.device)
            rc, rr = reference.logps(batch, average, temperature)
        if real:
            found += zip(idx, rc.tolist(), rr.tolist())
    for i, c, r in strategy.gather_objects(found):
        examples[i][REF_KEYS[0]], examples[i][REF_KEYS[1]] = c, r


def precompute_or_load(cfg, out: Path, train, evals, reference, collator, strategy) -> None:
    """Fill REF_KEYS on every example, from ``out/ref_logps.json`` when it was computed from the
    same reference, data and settings (`ref_cache_key`), else by computing them (and saving them
    with their key). The numbers are the starting policy's: computed before any update."""
    path = out / "ref_logps.json"
    key = ref_cache_key(cfg, train, evals)
    saved = _read_ref_cache(path, key)
    if saved is not None:
        for name, exs in (("train", train), ("eval", evals)):
            for ex, (c, r) in zip(exs, saved[name]):
                ex[REF_KEYS[0]], ex[REF_KEYS[1]] = c, r
        return
    for exs in (train, evals):
        precompute_reference(exs, reference, collator, cfg.train.micro_batch_size, strategy, cfg.dpo.average,
                             cfg.dpo.temperature)
    if strategy.is_main:
        write_json_atomic(path, {"key": key, **{name: [[ex[k] for k in REF_KEYS] for ex in exs]
                                                for name, exs in (("train", train), ("eval", evals))}})


def ref_cache_key(cfg, train: list[dict], evals: list[dict]) -> dict:
    """What precomputed reference log-probs depend on: the reference model (name and files), how
    it is run (dtype, LoRA adapters off, summed or averaged log-probs, shared prompts) and the
    tokenised pairs themselves (a digest of their token ids, train and eval in order)."""
    tokens = hashlib.sha256()
    for exs in (train, evals):
        for ex in exs:
            tokens.update(json.dumps([ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]]).encode())
        tokens.update(b"|")
    ref = cfg.dpo.reference or cfg.model.name
    return {"reference": identify(ref), "policy": identify(cfg.model.name), "dtype": cfg.model.dtype,
            "lora": cfg.model.lora.enabled, "average_logps": cfg.dpo.average_logps,
            "temperature": cfg.dpo.temperature, "share_prompt": cfg.dpo.share_prompt,
            "pairs": [len(train), len(evals)], "tokens": tokens.hexdigest()}


def _read_ref_cache(path: Path, key: dict) -> dict | None:
    """The saved numbers if ``path`` holds them for ``key``; None (they are recomputed) otherwise."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = None
    if isinstance(saved, dict) and saved.get("key") == json.loads(json.dumps(key)):
        return saved
    log.warning("%s was computed from another reference, data or settings: recomputing", path)
    return None
