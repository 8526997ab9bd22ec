"""The one forward pass every trainer uses to get token log-probs from a causal LM.

Keeping this in one place is what makes rollout-time and training-time log-probs agree:
same position ids (from the attention mask, so left padding is harmless), same dtype path.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import contextmanager

import torch

from rlhfkit.algos import entropy_from_logits, token_logprobs
from rlhfkit.models import segments
from rlhfkit.models.heads import (
    backbone_and_head,
    has_pad_token,
    position_ids_from_mask,
    token_values,
    unwrap_model,
)


def causal_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                    keep_last: int | None = None, with_entropy: bool = False,
                    position_ids: torch.Tensor | None = None, shared_prefix: int = 0, temperature: float = 1.0):
    """Log-probs of each token given the ones before it, under softmax(logits / temperature).

    input_ids, attention_mask: (B, T). Returns logp (B, T-1) where ``logp[:, t-1] = log p(x_t | x_<t)``,
    or, with ``keep_last=K``, only the last K of those: (B, K) for tokens x_{T-K}..x_{T-1}
    (the response block of a prompt+response batch; avoids materialising (B, T, V) logits for
    the prompt). With ``with_entropy`` also returns the policy entropy at the same positions.
    Packed batches pass their own ``position_ids`` (restarting per example) and a 4D
    block-diagonal ``attention_mask`` (see ``rlhfkit.data.PackedSFTCollator``).
    ``shared_prefix=L``: every row's first L real tokens are the same (the chat template's system
    turn, `common_prefix_len`); where `can_share_prefix` allows, they are computed once
    (`prefix_shared_forward`), the same values up to float rounding. On CPU the rows run as one
    row (`rows_as_one_row`); log-probs (and entropies) are then 0 where the token or the one before
    it is padding.
    """
    T = input_ids.shape[1]
    k = T - 1 if keep_last is None else keep_last
    if position_ids is None and (row := rows_as_one_row(model, input_ids, attention_mask, shared_prefix)):
        # the row positions of the tokens that predict the last k: (B, k)
        logits, keep = one_row_logits(model, row, row[1][:, T - k - 1:T - 1], attention_mask[:, T - k:])
        logits = logits[None]  # (1, N, V)
        placed = lambda v: v.new_zeros(keep.shape).index_put((keep,), v[0])  # noqa: E731
        logp = placed(token_logprobs(logits, input_ids[:, T - k:][keep][None], temperature=temperature))
        return (logp, placed(entropy_from_logits(logits, temperature=temperature))) if with_entropy else logp
    if (position_ids is None and shared_prefix >= MIN_SHARED_PREFIX and can_share_prefix(model, attention_mask)
            and int(attention_mask.long().argmax(-1).max()) + shared_prefix + k < T):  # the kept logits after it
        out = prefix_shared_forward(model, input_ids, attention_mask, shared_prefix, logits_to_keep=k + 1)
    else:
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        out = model(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids, use_cache=False,
                    logits_to_keep=k + 1)
    logits = out.logits[:, :-1].float()  # (B, k, V): position t predicts token t+1
    targets = input_ids[:, T - k:]  # (B, k)
    logp = token_logprobs(logits, targets, temperature=temperature)
    if with_entropy:
        return logp, entropy_from_logits(logits, temperature=temperature)
    return logp


# --------------------------------------------------------------------------- a prefix every row shares

# Set to False to run every row's prefix itself (benchmarks compare the two).
SHARE_PREFIX = True
# Below this many shared tokens the second forward call costs more than it saves.
MIN_SHARED_PREFIX = 8


def can_share_prefix(model, attention_mask: torch.Tensor | None = None) -> bool:
    """Whether `prefix_shared_forward` may run for ``model``: a plain 2-D mask (None: a packed
    batch, `models.packing`) and a model whose forward may be split (`segments.splittable`) and
    that has no sliding-window attention (`segments.windowed`)."""
    if not SHARE_PREFIX or (attention_mask is not None and attention_mask.dim() != 2):
        return False
    return segments.splittable(model) and not segments.windowed(model)


def rows_as_one_row(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, shared_prefix: int):
    """`segments.rows_one_row` of the (B, T) rows, with their first ``shared_prefix`` real tokens
    once (``SHARE_PREFIX`` on), where the model may run them so (`segments.usable`, a 2-D mask);
    None otherwise."""
    if attention_mask.dim() != 2 or not segments.usable(model, input_ids.device):
        return None
    return segments.rows_one_row(input_ids, attention_mask, shared_prefix if SHARE_PREFIX else 0)


def one_row_logits(model, row: tuple, pred: torch.Tensor, next_real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits (N, V) of the one-row forward (`rows_as_one_row`'s ``row``) at the row positions
    ``pred`` of the predicting tokens, where both the token and the one it predicts are real
    (``next_real``, the mask at the predicted tokens, same shape), and that selection ``keep``."""
    inputs, _, plan = row
    keep = (pred >= 0) & next_real.bool()
    with segments.attending(model, plan, pred[keep]):
        return logits_at(model, pred[keep], **inputs), keep


def prefix_shared_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, L: int, **kwargs):
    """The model's forward over (B, T) left-padded rows whose first L real tokens are the same,
    with those L tokens computed once (`prefix_inputs`). The outputs at the last T - L columns
    equal the plain forward's there, up to float rounding. Returns the model output of the second
    call (its columns are the input's last T - L)."""
    return model(**prefix_inputs(model, input_ids, attention_mask, L), **kwargs)


def prefix_inputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, L: int) -> dict:
    """Run the rows' common first L real tokens once (1 row) and return the model inputs for the
    rest of each row: its key/value cache repeated for the B rows, then each row without its prefix
    (left padding kept, (B, T - L)) attending to it. Positions come from the mask, so every token
    sees what it sees in the plain forward. Gradients flow through the repeated cache to the one
    prefix computation. Works with any padding side (rows start at their first real column)."""
    B = input_ids.shape[0]
    span, src = prefix_columns(attention_mask, L)
    prefix = input_ids.gather(1, span)
    if not (bool((prefix == prefix[:1]).all()) and bool(attention_mask.gather(1, span).bool().all())):
        raise ValueError(f"shared_prefix={L}: the rows' first {L} real tokens differ")
    rest_ids, rest_mask = input_ids.gather(1, src), attention_mask.gather(1, src)
    full_mask = torch.cat([rest_mask.new_ones(B, L), rest_mask], dim=1)
    return {"input_ids": rest_ids, "attention_mask": full_mask, "position_ids": position_ids_from_mask(full_mask)[:, L:],
            "past_key_values": prefix_cache(model, prefix[:1], B), "use_cache": True}


def prefix_cache(model, prefix: torch.Tensor, rows: int):
    """The key/value cache of the (1, L) ``prefix`` at positions 0..L-1, repeated for ``rows`` rows:
    a broadcast view of the one computation, so that the gradients of every row flow back to it as
    a plain sum. (A row selection, ``cache.batch_select_indices``, would do the same forward, but its
    backward accumulates with atomic adds on CPU threads, in a different order every run: the
    gradients, and every step after, would not be bitwise reproducible.)"""
    keep = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}  # the prefix's logits are not used
    pre = model(input_ids=prefix, position_ids=torch.arange(prefix.shape[1], device=prefix.device)[None],
                use_cache=True, **keep)
    cache = pre.past_key_values
    for layer in cache.layers:
        layer.keys = layer.keys.expand(rows, *layer.keys.shape[1:])
        layer.values = layer.values.expand(rows, *layer.values.shape[1:])
    return cache


def prefix_columns(attention_mask: torch.Tensor, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(span (B, L), rest (B, T - L)): the columns of each row's first L real tokens, and the other
    columns in order (the row without its prefix). Together they are a permutation of 0..T-1."""
    B, T = attention_mask.shape
    dev = attention_mask.device
    start = attention_mask.long().argmax(-1)  # (B,) first real column
    span = start[:, None] + torch.arange(L, device=dev)[None]
    cols = torch.arange(T - L, device=dev)[None]
    return span, cols + L * (cols >= start[:, None]).long()


def common_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all ``rows`` (token lists) share, leaving every row at least one
    token of its own (the one that predicts what follows); 0 for fewer than two rows. The
    rollout engine prefills this prefix once; the log-prob forwards compute it once
    (`Experience.shared_prefix`)."""
    if len(rows) < 2:
        return 0
    first, cap = rows[0], min(len(r) for r in rows) - 1
    for i in range(max(cap, 0)):
        if any(r[i] != first[i] for r in rows):
            return i
    return max(cap, 0)


def common_prefix_of_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          labelled: torch.Tensor | None = None) -> int:
    """How many first real tokens all (B, T) rows share (a batch's `shared_prefix`), capped so that
    each row keeps a token of its own and, with ``labelled`` (B, T-1) (the positions whose next token
    is scored), every labelled position comes after the prefix. 0 for fewer than two rows."""
    if input_ids.shape[0] < 2:
        return 0
    start = attention_mask.long().argmax(-1)
    n = int(attention_mask.long().sum(-1).min()) - 1
    if labelled is not None and bool(labelled.any()):
        rows, cols = labelled.nonzero(as_tuple=True)
        n = min(n, int((cols - start[rows]).min()))  # hidden state t predicts token t + 1: t >= start + L
    if n <= 0:
        return 0
    toks = input_ids.gather(1, start[:, None] + torch.arange(n, device=input_ids.device)[None])
    return int((toks == toks[:1]).all(0).long().cumprod(0).sum())


def shared_token_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        shared_prefix: int = 0, read: torch.Tensor | None = None) -> torch.Tensor:
    """`models.token_values` (B, T) of a scalar-head model (critic, RM), with the rows' first
    ``shared_prefix`` real tokens computed once where `can_share_prefix` allows: the same values up
    to float rounding, gradients included (the prefix's values are its one computation's). As one
    row (`rows_as_one_row`), the values are 0 at padding, and with ``read`` ((B, T) bool, the
    positions the caller reads) 0 at every other position too: the last decoder layer then
    computes only those (`models.final_layer`)."""
    L, (B, T) = shared_prefix, input_ids.shape
    if row := rows_as_one_row(model, input_ids, attention_mask, L):
        inputs, where, plan = row
        real = where >= 0
        if read is not None:
            real = real & read.bool()
        with segments.attending(model, plan, None if read is None else where[real]):
            values = token_values(model, inputs["input_ids"], inputs["attention_mask"],
                                  position_ids=inputs["position_ids"])[0]
        return values.new_zeros(B, T).index_put((real,), values[where[real]])
    if not (MIN_SHARED_PREFIX <= L < T and has_pad_token(model) and can_share_prefix(model, attention_mask)):
        return token_values(model, input_ids, attention_mask)
    _, head = backbone_and_head(model)
    seen: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, _args, out: seen.append(out))
    try:
        prefix_shared_forward(model, input_ids, attention_mask, L)
    finally:
        handle.remove()
    span, rest = prefix_columns(attention_mask, L)
    values = torch.cat([seen[0].squeeze(-1).float().expand(B, L), seen[-1].squeeze(-1).float()], dim=1)
    return values.new_zeros(B, T).scatter(1, torch.cat([span, rest], dim=1), values)


def accepts_logits_to_keep(model) -> bool:
    """True if the (possibly peft-wrapped) model's forward takes `logits_to_keep` (transformers >= 4.50;
    causal LMs, not the *ForSequenceClassification heads)."""
    m = unwrap_model(model)
    m = m.get_base_model() if hasattr(m, "get_base_model") else m
    try:
        return "logits_to_keep" in inspect.signature(m.forward).parameters
    except (TypeError, ValueError):
        return False


def labelled_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labelled: torch.Tensor, *,
                      position_ids: torch.Tensor | None = None, shared_prefix: int = 0) -> torch.Tensor:
    """(N,) log p(x_{t+1} | x_<=t) of the N tokens where ``labelled`` (B, T-1) is true (row-major
    order), as ``causal_logprobs(...)[labelled]`` gives. The LM head runs on those N positions
    only, so neither the head's product nor the (B, T, V) logits and their gradient are made for
    prompt and padding tokens (a third of a typical SFT batch). Masks and positions as
    `causal_logprobs`; ``shared_prefix=L`` (`common_prefix_of_rows` with ``labelled``): the rows'
    first L real tokens, which every labelled position follows, computed once."""
    B, T = input_ids.shape
    rows, cols = labelled.nonzero(as_tuple=True)
    L = shared_prefix
    if position_ids is None and (row := rows_as_one_row(model, input_ids, attention_mask, L)):
        logits, keep = one_row_logits(model, row, row[1][rows, cols], attention_mask[rows, cols + 1])
        logp = token_logprobs(logits[None], input_ids[rows, cols + 1][keep][None])[0]
        return logp.new_zeros(rows.shape).index_put((keep,), logp)
    if position_ids is None and L >= MIN_SHARED_PREFIX and can_share_prefix(model, attention_mask):
        if bool((cols < attention_mask.long().argmax(-1)[rows] + L).any()):
            raise ValueError(f"shared_prefix={L}: a labelled position lies inside the shared prefix")
        # the hidden state at t predicts token t+1; past the prefix, column t is column t - L of the rest
        logits = logits_at(model, rows * (T - L) + cols - L, **prefix_inputs(model, input_ids, attention_mask, L))
    else:
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        logits = logits_at(model, rows * T + cols, input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids)
    return token_logprobs(logits[None], input_ids[rows, cols + 1][None])[0]


def logits_at(model, flat_positions: torch.Tensor, **inputs) -> torch.Tensor:
    """(N, V) float32 logits at ``flat_positions`` of the flattened (B*T) batch: the model's forward
    on ``inputs`` with the LM head run on those positions only (`_head_on_positions`)."""
    with _head_on_positions(model, flat_positions) as gathered:
        out = model(**{"use_cache": False, **inputs})
    logits = out.logits.float()
    return logits if gathered else logits.flatten(0, 1).index_select(0, flat_positions)


@contextmanager
def _head_on_positions(model, flat_positions: torch.Tensor):
    """Run the LM head only on the hidden states at ``flat_positions`` of the flattened (K*L) batch:
    a pre-hook on the output embedding swaps its (K, L, H) input for those (N, H) rows, so the
    model returns (N, V) logits and the head's matmul (a fifth of this model's FLOPs per token)
    skips the prompt and padding positions. Yields whether the hook is in place (no output
    embedding found: the caller gathers from the full logits instead)."""
    inner = unwrap_model(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None:
        yield False
        return

    def swap(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("input")
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat_positions)
        return (picked, *args[1:]), kwargs

    handle = head.register_forward_pre_hook(swap, with_kwargs=True)
    try:
        yield True
    finally:
        handle.remove()


def mask_dtype(model) -> torch.dtype:
    """The additive mask in the model's compute dtype (its most negative value must not overflow)."""
    try:
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    except StopIteration:
        return torch.float32
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
