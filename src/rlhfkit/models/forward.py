"""The one forward pass every trainer uses to get token log-probs from a causal LM.

Keeping this in one place is what makes rollout-time and training-time log-probs agree:
same position ids (from the attention mask, so left padding is harmless), same dtype path.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch

from rlhfkit.algos import entropy_from_logits, token_logprobs
from rlhfkit.data.collate import additive_mask
from rlhfkit.models.heads import (
    backbone_and_head,
    has_pad_token,
    position_ids_from_mask,
    token_values,
    unwrap_model,
)


def causal_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                    keep_last: int | None = None, with_entropy: bool = False,
                    position_ids: torch.Tensor | None = None, shared_prefix: int = 0):
    """Log-probs of each token given the ones before it.

    input_ids, attention_mask: (B, T). Returns logp (B, T-1) where ``logp[:, t-1] = log p(x_t | x_<t)``,
    or, with ``keep_last=K``, only the last K of those: (B, K) for tokens x_{T-K}..x_{T-1}
    (the response block of a prompt+response batch; avoids materialising (B, T, V) logits for
    the prompt). With ``with_entropy`` also returns the policy entropy at the same positions.
    Packed batches pass their own ``position_ids`` (restarting per example) and a 4D
    block-diagonal ``attention_mask`` (see ``rlhfkit.data.PackedSFTCollator``).
    ``shared_prefix=L``: every row's first L real tokens are the same (the chat template's system
    turn, `rollout.experience.common_prefix_len`); where `can_share_prefix` allows, they are computed once
    (`prefix_shared_forward`), the same values up to float rounding.
    """
    T = input_ids.shape[1]
    k = T - 1 if keep_last is None else keep_last
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
    logp = token_logprobs(logits, targets)
    if with_entropy:
        return logp, entropy_from_logits(logits)
    return logp


# --------------------------------------------------------------------------- a prefix every row shares

# Set to False to run every row's prefix itself (benchmarks compare the two).
SHARE_PREFIX = True
# Below this many shared tokens the second forward call costs more than it saves.
MIN_SHARED_PREFIX = 8


def can_share_prefix(model, attention_mask: torch.Tensor) -> bool:
    """Whether `prefix_shared_forward` may run for ``model``: a plain 2-D mask, a model that is
    neither wrapped (DDP, DeepSpeed), sharded across processes nor gradient-checkpointed (each
    of those expects one forward call per backward). The answer depends on the run, not on the
    batch, so scoring and update always take the same path (the first PPO ratio stays exactly 1)."""
    if not SHARE_PREFIX or attention_mask.dim() != 2 or unwrap_model(model) is not model:
        return False
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        return False
    flag = "is_activation_checkpointing" if hasattr(model, "is_activation_checkpointing") else "is_gradient_checkpointing"
    return not getattr(model, flag, False)


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
    dev = input_ids.device
    span, src = prefix_columns(attention_mask, L)
    prefix = input_ids.gather(1, span)
    if not (bool((prefix == prefix[:1]).all()) and bool(attention_mask.gather(1, span).bool().all())):
        raise ValueError(f"shared_prefix={L}: the rows' first {L} real tokens differ")
    rest_ids, rest_mask = input_ids.gather(1, src), attention_mask.gather(1, src)
    full_mask = torch.cat([rest_mask.new_ones(B, L), rest_mask], dim=1)
    keep = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}  # the prefix's logits are not used
    pre = model(input_ids=prefix[:1], position_ids=torch.arange(L, device=dev)[None], use_cache=True, **keep)
    cache = pre.past_key_values
    cache.batch_select_indices(torch.zeros(B, dtype=torch.long, device=dev))
    return {"input_ids": rest_ids, "attention_mask": full_mask, "position_ids": position_ids_from_mask(full_mask)[:, L:],
            "past_key_values": cache, "use_cache": True}


def prefix_columns(attention_mask: torch.Tensor, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(span (B, L), rest (B, T - L)): the columns of each row's first L real tokens, and the other
    columns in order (the row without its prefix). Together they are a permutation of 0..T-1."""
    B, T = attention_mask.shape
    dev = attention_mask.device
    start = attention_mask.long().argmax(-1)  # (B,) first real column
    span = start[:, None] + torch.arange(L, device=dev)[None]
    cols = torch.arange(T - L, device=dev)[None]
    return span, cols + L * (cols >= start[:, None]).long()


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
                        shared_prefix: int = 0) -> torch.Tensor:
    """`models.token_values` (B, T) of a scalar-head model (critic, RM), with the rows' first
    ``shared_prefix`` real tokens computed once where `can_share_prefix` allows: the same values up
    to float rounding, gradients included (the prefix's values are its one computation's)."""
    L, (B, T) = shared_prefix, input_ids.shape
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
    if position_ids is None and L >= MIN_SHARED_PREFIX and can_share_prefix(model, attention_mask):
        if bool((cols < attention_mask.long().argmax(-1)[rows] + L).any()):
            raise ValueError(f"shared_prefix={L}: a labelled position lies inside the shared prefix")
        # the hidden state at t predicts token t+1; past the prefix, column t is column t - L of the rest
        logits = _logits_at(model, rows * (T - L) + cols - L, **prefix_inputs(model, input_ids, attention_mask, L))
    else:
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        logits = _logits_at(model, rows * T + cols, input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids)
    return token_logprobs(logits[None], input_ids[rows, cols + 1][None])[0]


# --------------------------------------------------------------------------- prompt sharing

def pack_shared_prompts(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
                        response_mask: torch.Tensor, prompt_index: torch.Tensor, pad_token_id: int) -> dict:
    """Rows that share a prompt -> one packed sequence per prompt (see `pack_groups`).

    Inputs as in `Experience`: (B, P) left-padded prompts, (B, R) right-padded responses, (B,)
    prompt_index (rows with the same index must carry the same prompt tokens).
    """
    lengths = response_mask.sum(-1).tolist()
    rows_of: dict[int, list[int]] = {}
    for b, g in enumerate(prompt_index.tolist()):
        rows_of.setdefault(g, []).append(b)
    groups = []
    for rows in rows_of.values():
        prompt = prompt_ids[rows[0]][prompt_mask[rows[0]].bool()]
        for b in rows[1:]:
            other = prompt_ids[b][prompt_mask[b].bool()]
            if other.shape != prompt.shape or not torch.equal(other, prompt):
                raise ValueError(f"rows {rows[0]} and {b} share prompt_index but not their prompt tokens")
        groups.append((prompt, [(b, response_ids[b, :int(lengths[b])]) for b in rows]))
    return pack_groups(groups, tuple(response_ids.shape), pad_token_id)


def pack_groups(groups: list, shape: tuple[int, int], pad_token_id: int) -> dict:
    """One packed sequence per group: the prompt once, then each response (its real tokens only),
    each response attending to the prompt and to itself.

    groups: ``[(prompt (p,), [(row, response (n,)), ...]), ...]``; ``shape`` = (B, R) of the output
    the rows' log-probs go into. Returns the model inputs for K = len(groups) sequences of length
    L: ``input_ids``/``position_ids`` (K, L) and ``allowed`` (K, 1, L, L) bool (query may attend
    key; see `additive_mask`); plus where the log-probs live: ``pred`` (N,) flat index into the
    K*L positions of the one predicting each response token, ``own`` (N,) that of the token
    itself (where a scalar head reads it), ``target`` (N,) those tokens, and ``row``/``col`` (N,)
    where they go in the (B, R) output.

    Position ids restart the responses at the prompt length, so every response sees exactly the
    positions and context it has in its own unpacked row: the log-probs agree with
    `causal_logprobs` up to float rounding. Work per group of G rows falls from G*(P+R) tokens to
    P + the responses' real lengths.
    """
    seqs, segs, poss = [], [], []
    pred, own, target, row, col = [], [], [], [], []
    for k, (prompt, responses) in enumerate(groups):
        p = prompt.shape[0]
        if p == 0:
            raise ValueError(f"row {responses[0][0]}: empty prompt (a packed response needs a token to condition on)")
        parts, seg, pos = [prompt], [0] * p, list(range(p))
        start = p
        for j, (b, resp) in enumerate(responses, start=1):
            n = resp.shape[0]
            parts.append(resp)
            seg += [j] * n
            pos += range(p, p + n)
            # token t of the response is predicted at the position before it: the last prompt
            # token for t = 0, else the response's own token t-1
            pred += [(k, p - 1)] + [(k, start + t - 1) for t in range(1, n)]
            own += [(k, start + t) for t in range(n)]
            target += resp.tolist()
            row += [b] * n
            col += range(n)
            start += n
        seqs.append(torch.cat(parts))
        segs.append(seg)
        poss.append(pos)
    K, L = len(seqs), max(s.shape[0] for s in seqs)
    input_ids = torch.full((K, L), pad_token_id, dtype=torch.long)
    seg_ids = torch.full((K, L), -1, dtype=torch.long)  # padding: its own segment (no all-masked row)
    position_ids = torch.zeros((K, L), dtype=torch.long)
    for k, (sq, sg, ps) in enumerate(zip(seqs, segs, poss)):
        input_ids[k, :len(sq)] = sq
        seg_ids[k, :len(sq)] = torch.tensor(sg)
        position_ids[k, :len(sq)] = torch.tensor(ps)
        position_ids[k, len(sq):] = torch.arange(L - len(sq))
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    q, kk = seg_ids[:, :, None], seg_ids[:, None, :]
    allowed = causal & ((q == kk) | ((kk == 0) & (q > 0)))  # own segment, or a response seeing the prompt
    dev = seqs[0].device
    return {"input_ids": input_ids.to(dev), "position_ids": position_ids.to(dev), "allowed": allowed[:, None].to(dev),
            "pred": torch.tensor([k * L + t for k, t in pred], dtype=torch.long, device=dev),
            "own": torch.tensor([k * L + t for k, t in own], dtype=torch.long, device=dev),
            "target": torch.tensor(target, dtype=torch.long, device=dev),
            "row": torch.tensor(row, dtype=torch.long, device=dev),
            "col": torch.tensor(col, dtype=torch.long, device=dev), "shape": tuple(shape)}


def shared_prompt_logprobs(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
                           response_mask: torch.Tensor, prompt_index: torch.Tensor, pad_token_id: int, *,
                           with_entropy: bool = False):
    """(B, R) log p(response token t | prompt, response tokens < t), as
    ``causal_logprobs(model, [prompt; response], mask, keep_last=R)`` gives, but with the rows that
    share a prompt packed into one sequence (see `pack_shared_prompts`). 0 where response_mask is 0.
    With ``with_entropy`` also the (B, R) entropies (0 where masked)."""
    packed = pack_shared_prompts(prompt_ids, prompt_mask, response_ids, response_mask, prompt_index, pad_token_id)
    return packed_logprobs(model, packed, with_entropy=with_entropy)


def pack_pairs(batch: dict) -> dict:
    """A `data.PreferenceCollator` batch (B chosen rows, then the B rejected ones, right-padded,
    with "prompt_lengths") -> `pack_groups` inputs: each pair one sequence, the prompt once, then
    the chosen and the rejected response, each seeing the prompt and itself. The output rows are
    the batch's rows (chosen 0..B-1, rejected B..2B-1); R is the longest response."""
    ids, plens = batch["input_ids"], batch["prompt_lengths"].tolist()
    n = len(plens)
    rlens = [int(r) for r in batch["loss_mask"].sum(-1).tolist()]
    groups = [(ids[i, :p], [(b, ids[b, p:p + rlens[b]]) for b in (i, n + i)]) for i, p in enumerate(plens)]
    return pack_groups(groups, (2 * n, max(1, *rlens)), pad_token_id=0)


def packed_token_values(model, packed: dict, *, with_features: bool = False):
    """A scalar-head model (RM, critic) on a `pack_groups` batch: its (B, R) per-token values at
    the response tokens (0 elsewhere) and their (B, R) 0/1 mask; with ``with_features`` also the
    (B, R, H) features the head reads. Equal, up to float rounding, to `models.token_values` on
    each row unpacked (the positions and context of every response token are its own row's)."""
    out = token_values(model, packed["input_ids"], additive_mask(packed["allowed"], _mask_dtype(model)),
                       with_features=with_features, position_ids=packed["position_ids"])
    values, features = out if with_features else (out, None)
    (B, R), where, own = packed["shape"], (packed["row"], packed["col"]), packed["own"]
    placed = values.new_zeros((B, R)).index_put(where, values.reshape(-1)[own])
    mask = torch.zeros((B, R), dtype=torch.long, device=own.device).index_put(where, torch.ones_like(own))
    if not with_features:
        return placed, mask
    flat = features.reshape(-1, features.shape[-1])[own]
    return placed, mask, features.new_zeros((B, R, flat.shape[-1])).index_put(where, flat)


def packed_logprobs(model, packed: dict, *, with_entropy: bool = False):
    """The (B, R) response-token log-probs (and entropies) of a `pack_groups` batch; 0 elsewhere."""
    logits = _logits_at(model, packed["pred"], input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                        attention_mask=additive_mask(packed["allowed"], _mask_dtype(model)))[None]  # (1, N, V)
    B, R = packed["shape"]

    def place(v: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(B, R, dtype=v.dtype, device=v.device)
        return full.index_put((packed["row"], packed["col"]), v[0])

    logp = place(token_logprobs(logits, packed["target"][None]))
    if with_entropy:
        return logp, place(entropy_from_logits(logits))
    return logp


def _logits_at(model, flat_positions: torch.Tensor, **inputs) -> torch.Tensor:
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


def _mask_dtype(model) -> torch.dtype:
    """The additive mask in the model's compute dtype (its most negative value must not overflow)."""
    try:
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    except StopIteration:
        return torch.float32
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
