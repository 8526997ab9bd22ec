"""Batches of token ids: padding, the three collators, and packing for SFT.

Conventions: masks are aligned to input positions (mask[t] describes token t); the causal
shift happens in `rlhfkit.algos.logprobs.shift_for_causal`. Training batches are right-padded,
generation batches left-padded (then position ids must come from the mask:
`rlhfkit.models.position_ids_from_mask`).

Packing: several SFT examples share one row. In transformers 5 (Llama, sdpa or eager attention),
passing a 4D *additive float* mask of shape (B, 1, T, T) that is causal within each example and
-inf across examples, together with position ids that restart at 0 for each example, gives the
same per-token log-probs as running the examples one by one (exactly equal in float64, within
float32 rounding, ~1e-7, in float32). Pitfalls checked on transformers 5.23:
- a *bool* 4D mask is right for sdpa but silently wrong for eager attention (it is added as 0/1);
- position ids alone (attention_mask=None) also give block attention, through transformers'
  packed-sequence detection, but only with use_cache=False: with the default use_cache=True the
  detection is skipped and examples attend to each other, silently. That is the path for
  flash-attention, which takes no 4D mask.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

import torch

from rlhfkit.data.tokenize import IGNORE_INDEX


def pad_sequences(seqs: Sequence[Sequence[int]], pad_value: int, side: str = "right",
                  dtype: torch.dtype = torch.long) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists of ids -> (padded (B, T), mask (B, T) long, 1 on real tokens). T = longest sequence."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    B = len(seqs)
    T = max((len(s) for s in seqs), default=0)
    out = torch.full((B, T), pad_value, dtype=dtype)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s)
        if n == 0:
            continue
        cols = slice(0, n) if side == "right" else slice(T - n, T)
        out[i, cols] = torch.as_tensor(s, dtype=dtype)
        mask[i, cols] = 1
    return out, mask


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of up to ``batch_size`` rows of similar length (sorted by
    length, ties in input order), so that padding each batch to its longest row wastes little
    compute. Every index appears exactly once; callers put results back by index."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    size = max(1, batch_size)
    return [order[i:i + size] for i in range(0, len(order), size)]


@dataclass
class SFTCollator:
    """features {"input_ids", "labels"} -> input_ids, attention_mask, labels (B, T), right-padded;
    labels are -100 on padding."""

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_sequences([f["input_ids"] for f in features], self.pad_token_id)
        labels, _ = pad_sequences([f["labels"] for f in features], IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass
class PreferenceCollator:
    """features {"prompt_ids", "chosen_ids", "rejected_ids"[, "category", "margin"]} -> one forward pass:

    input_ids, attention_mask, loss_mask: (2B, T), right-padded. Rows 0..B-1 are prompt+chosen,
    rows B..2B-1 prompt+rejected (same order), so ``logps[:B]`` / ``logps[B:]`` split them.
    loss_mask[t] = 1 where token t is a response token. Also "category" (list, None where absent)
    and "margin" ((B,) float, 0 where absent) when any feature has them. With ``share_prompt``
    also "prompt_lengths" (B,): the log-prob code then scores each pair as one packed sequence,
    the prompt once (`rlhfkit.trainers.dpo.pair_logps`).
    """

    pad_token_id: int
    share_prompt: bool = False

    def __call__(self, features: list[dict]) -> dict:
        rows, masks = [], []
        for key in ("chosen_ids", "rejected_ids"):
            for f in features:
                p, r = list(f["prompt_ids"]), list(f[key])
                rows.append(p + r)
                masks.append([0] * len(p) + [1] * len(r))
        input_ids, attention_mask = pad_sequences(rows, self.pad_token_id)
        loss_mask, _ = pad_sequences(masks, 0)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
        if self.share_prompt:
            batch["prompt_lengths"] = torch.tensor([len(f["prompt_ids"]) for f in features], dtype=torch.long)
        if any(f.get("category") is not None for f in features):
            batch["category"] = [f.get("category") for f in features]
        if any(f.get("margin") is not None for f in features):
            batch["margin"] = torch.tensor([float(f.get("margin") or 0.0) for f in features])
        return batch


@dataclass
class PromptCollator:
    """features {"input_ids", ...} -> left-padded input_ids, attention_mask (B, T) for generation;
    every other key is passed through as a list (messages, reference, meta)."""

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict:
        input_ids, attention_mask = pad_sequences([f["input_ids"] for f in features], self.pad_token_id, side="left")
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        for key in features[0] if features else ():
            if key != "input_ids":
                batch[key] = [f.get(key) for f in features]
        return batch


# --------------------------------------------------------------------------------------- packing

def pack_sft(examples: Sequence[dict], block_size: int) -> list[dict]:
    """Pack tokenized SFT examples ({"input_ids", "labels"}) into blocks of <= block_size tokens.

    Best-fit: each example goes into the open block with the least room that still fits it
    (O(n log n)), so blocks fill well while examples keep their relative order within a block.
    Returns one dict per block: input_ids, labels, position_ids (restart at 0 for each example),
    seq_lens (lengths of the examples in the block) and segment_ids (0, 1, ... per example).
    The first label of every example is set to -100: in the packed row it would be predicted
    from the previous example's last token (unpacked, position 0 is never predicted either).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    blocks: list[list[int]] = []  # example indices per block
    free: list[tuple[int, int]] = []  # sorted (room left, block index)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        if n > block_size:
            raise ValueError(f"example {i} has {n} tokens, more than block_size={block_size}; "
                             "tokenize with max_length <= block_size")
        if n == 0:
            continue
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
        else:
            room, b = block_size, len(blocks)
            blocks.append([])
        blocks[b].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    return [_make_block([examples[i] for i in idx]) for idx in blocks]


def _make_block(parts: list[dict]) -> dict:
    ids, labels, pos, seg, lens = [], [], [], [], []
    for s, ex in enumerate(parts):
        n = len(ex["input_ids"])
        ids.extend(ex["input_ids"])
        labels.extend([IGNORE_INDEX, *ex["labels"][1:]])
        pos.extend(range(n))
        seg.extend([s] * n)
        lens.append(n)
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "segment_ids": seg, "seq_lens": lens}


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, T) segment ids -> (B, 1, T, T) additive mask: 0 where query t may attend key s
    (s <= t, same segment), the dtype's most negative value elsewhere.

    Float, not bool: transformers' eager attention adds the mask to the scores, so a bool mask
    would be added as 0/1 there. Memory is B*T*T elements (T=2048, B=8: 128 MB in float32).
    """
    T = segment_ids.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = causal & (segment_ids[:, :, None] == segment_ids[:, None, :])  # (B, T, T)
    return additive_mask(allowed[:, None], dtype)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Bool "may attend" -> 0 there, the dtype's most negative value elsewhere. Float, not bool:
    transformers' eager attention adds the mask to the scores."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


@dataclass
class PackedSFTCollator:
    """Blocks from `pack_sft` -> input_ids, labels, position_ids, segment_ids (B, T) and
    attention_mask (B, 1, T, T), the block-diagonal causal mask (see `block_causal_mask`).

    Call the model as ``model(input_ids=..., attention_mask=..., position_ids=...)``. Padding at
    the end of a row forms its own segment (positions from 0, labels -100), so that no row of the
    mask is all -inf (which would give NaN in sdpa). With flash-attention, drop attention_mask
    and pass position_ids with use_cache=False instead.
    """

    pad_token_id: int
    mask_dtype: torch.dtype = torch.float32

    def __call__(self, blocks: list[dict]) -> dict[str, torch.Tensor]:
        T = max(len(b["input_ids"]) for b in blocks)
        input_ids, _ = pad_sequences([b["input_ids"] for b in blocks], self.pad_token_id)
        labels, _ = pad_sequences([b["labels"] for b in blocks], IGNORE_INDEX)
        pos, seg = [], []
        for b in blocks:
            n_pad = T - len(b["input_ids"])
            pos.append([*b["position_ids"], *range(n_pad)])
            seg.append([*b["segment_ids"], *[len(b["seq_lens"])] * n_pad])
        position_ids, segment_ids = torch.tensor(pos, dtype=torch.long), torch.tensor(seg, dtype=torch.long)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "segment_ids": segment_ids,
                "attention_mask": block_causal_mask(segment_ids, self.mask_dtype)}


def batch_to_device(batch: dict, device) -> dict:
    """A collated batch's tensors on ``device`` (its non-tensor fields, e.g. categories, left out)."""
    return {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
