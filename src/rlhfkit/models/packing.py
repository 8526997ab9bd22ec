"""Packed sequences: several rows that share a prompt as one sequence, the prompt computed once
(GRPO's group, a preference pair's chosen and rejected reply, the replies an RM scores), each
reply attending to the prompt and to itself. The log-probs and values equal the rows' own
(`models.forward`), up to float rounding."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from rlhfkit.algos import entropy_from_logits, token_logprobs
from rlhfkit.data.collate import additive_mask
from rlhfkit.models import forward, segments
from rlhfkit.models.forward import (
    MIN_SHARED_PREFIX,
    can_share_prefix,
    common_prefix_len,
    logits_at,
    mask_dtype,
    prefix_cache,
)
from rlhfkit.models.heads import token_values


def packs(model) -> bool:
    """Whether ``model`` may score packed sequences: not with sliding-window attention, whose window
    counts columns of the packed sequence, where a second response sits further from its prompt
    than in its own row (`segments.windowed`). Callers then score the padded rows."""
    return not segments.windowed(model)


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
    itself (where a scalar head reads it), ``target`` (N,) those tokens, ``row``/``col`` (N,)
    where they go in the (B, R) output, ``lengths`` ``[(prompt length, [response lengths]), ...]``
    per group, and ``shared_prefix``: how many first tokens every prompt shares (the chat
    template's system turn; `packed_forward` computes them once).

    Position ids restart the responses at the prompt length, so every response sees exactly the
    positions and context it has in its own unpacked row: the log-probs agree with
    `causal_logprobs` up to float rounding. Work per group of G rows falls from G*(P+R) tokens to
    P + the responses' real lengths.
    """
    seqs, segs, poss, lengths = [], [], [], []
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
            pred += [(k, start + t - 1 if t else p - 1) for t in range(n)]
            own += [(k, start + t) for t in range(n)]
            target += resp.tolist()
            row += [b] * n
            col += range(n)
            start += n
        seqs.append(torch.cat(parts))
        lengths.append((p, [resp.shape[0] for _, resp in responses]))
        segs.append(seg)
        poss.append(pos)
    input_ids, position_ids, allowed = _padded_groups(seqs, segs, poss, pad_token_id)
    L, dev = input_ids.shape[1], seqs[0].device
    return {"input_ids": input_ids.to(dev), "position_ids": position_ids.to(dev), "allowed": allowed.to(dev),
            "pred": torch.tensor([k * L + t for k, t in pred], dtype=torch.long, device=dev),
            "own": torch.tensor([k * L + t for k, t in own], dtype=torch.long, device=dev),
            "target": torch.tensor(target, dtype=torch.long, device=dev),
            "row": torch.tensor(row, dtype=torch.long, device=dev),
            "col": torch.tensor(col, dtype=torch.long, device=dev), "shape": tuple(shape), "lengths": lengths,
            "shared_prefix": common_prefix_len([prompt.tolist() for prompt, _ in groups])}


def _padded_groups(seqs: list, segs: list, poss: list, pad_token_id: int):
    """`pack_groups`' sequences, their segment ids (0 the prompt, j response j) and positions ->
    (K, L) input_ids and position_ids, right-padded, and (K, 1, L, L) ``allowed``: causal, within a
    segment, or a response seeing its prompt."""
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
    return input_ids, position_ids, allowed[:, None]


@contextlib.contextmanager
def packed_forward(model, packed: dict, read: torch.Tensor | None = None):
    """The model inputs of a `pack_groups` batch and the map of its flat (K*T) positions to the
    output's, for a forward run inside the block: on CPU as one row with per-segment attention
    (`models.segments`), else as K rows (`packed_inputs`). ``read``: the flat positions whose
    outputs the caller reads; as one row, the last decoder layer computes only those
    (`models.final_layer`), so no other position may be read."""
    if segments.usable(model, packed["input_ids"].device):
        inputs, where, plan = segments.one_row(packed, forward.SHARE_PREFIX)
        with segments.attending(model, plan, None if read is None else where[read]):
            yield inputs, lambda flat: where[flat]
    else:
        yield packed_inputs(model, packed)


def packed_inputs(model, packed: dict) -> tuple[dict, Callable[[torch.Tensor], torch.Tensor]]:
    """The model inputs of a `pack_groups` batch, and a map of its flat (K*T) positions to the
    flat positions of the output. Every sequence starts with its prompt, so the prompts' common
    first L tokens (``shared_prefix``, the chat template's system turn) sit in the first L
    columns of every sequence: where `can_share_prefix` allows, they are computed once
    (`prefix_cache`) and the sequences start after them, attending to them."""
    ids, pos, allowed = packed["input_ids"], packed["position_ids"], packed["allowed"]
    (K, T), L = ids.shape, packed.get("shared_prefix", 0)
    if L < MIN_SHARED_PREFIX or not can_share_prefix(model):
        return {"input_ids": ids, "position_ids": pos, "attention_mask": additive_mask(allowed, mask_dtype(model))}, \
            lambda flat: flat
    allowed = torch.cat([allowed.new_ones(K, 1, T - L, L), allowed[:, :, L:, L:]], dim=-1)
    inputs = {"input_ids": ids[:, L:], "position_ids": pos[:, L:],
              "past_key_values": prefix_cache(model, ids[:1, :L], K),
              "attention_mask": additive_mask(allowed, mask_dtype(model)), "use_cache": True}
    return inputs, lambda flat: flat - L * (flat // T + 1)  # k*T + t -> k*(T-L) + t-L


def shared_prompt_logprobs(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
                           response_mask: torch.Tensor, prompt_index: torch.Tensor, pad_token_id: int, *,
                           with_entropy: bool = False, temperature: float = 1.0):
    """(B, R) log p(response token t | prompt, response tokens < t), as
    ``causal_logprobs(model, [prompt; response], mask, keep_last=R)`` gives, but with the rows that
    share a prompt packed into one sequence (see `pack_shared_prompts`). 0 where response_mask is 0.
    With ``with_entropy`` also the (B, R) entropies (0 where masked); both of softmax(logits / temperature)."""
    packed = pack_shared_prompts(prompt_ids, prompt_mask, response_ids, response_mask, prompt_index, pad_token_id)
    return packed_logprobs(model, packed, with_entropy=with_entropy, temperature=temperature)


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


def packed_token_values(model, packed: dict, *, with_features: bool = False, last_only: bool = False):
    """A scalar-head model (RM, critic) on a `pack_groups` batch: its (B, R) per-token values at
    the response tokens (0 elsewhere) and their (B, R) 0/1 mask; with ``with_features`` also the
    (B, R, H) features the head reads. Equal, up to float rounding, to `models.token_values` on
    each row unpacked (the positions and context of every response token are its own row's).
    ``last_only``: the values at each response's last token only (0 at its others; all a reward
    read at the last token needs), which lets the last decoder layer skip the rest."""
    (B, R), where = packed["shape"], (packed["row"], packed["col"])
    keep = _last_of_rows(packed["row"], packed["col"]) if last_only and not with_features else None
    read = packed["own"] if keep is None else packed["own"][keep]
    with packed_forward(model, packed, read) as (inputs, moved):
        out = token_values(model, inputs["input_ids"], inputs["attention_mask"], with_features=with_features,
                           position_ids=inputs["position_ids"], past_key_values=inputs.get("past_key_values"))
    values, features = out if with_features else (out, None)
    own = moved(packed["own"])
    picked = values.reshape(-1)[own]
    if keep is not None:
        picked = picked.where(keep, 0.0)
    placed = values.new_zeros((B, R)).index_put(where, picked)
    mask = torch.zeros((B, R), dtype=torch.long, device=own.device).index_put(where, torch.ones_like(own))
    if not with_features:
        return placed, mask
    flat = features.reshape(-1, features.shape[-1])[own]
    return placed, mask, features.new_zeros((B, R, flat.shape[-1])).index_put(where, flat)


def _last_of_rows(row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """(N,) bool: which of the N (row, col) entries is the last (largest col) of its row."""
    last = torch.full((int(row.max()) + 1,), -1, dtype=col.dtype, device=col.device).scatter_reduce(
        0, row, col, reduce="amax")
    return col == last[row]


def packed_logprobs(model, packed: dict, *, with_entropy: bool = False, temperature: float = 1.0):
    """The (B, R) response-token log-probs (and entropies) of a `pack_groups` batch, of
    softmax(logits / temperature); 0 elsewhere."""
    with packed_forward(model, packed, packed["pred"]) as (inputs, moved):
        logits = logits_at(model, moved(packed["pred"]), **inputs)[None]  # (1, N, V)
    B, R = packed["shape"]

    def place(v: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(B, R, dtype=v.dtype, device=v.device)
        return full.index_put((packed["row"], packed["col"]), v[0])

    logp = place(token_logprobs(logits, packed["target"][None], temperature=temperature))
    if with_entropy:
        return logp, place(entropy_from_logits(logits, temperature=temperature))
    return logp
