"""A packed batch, or a batch of padded rows, as one row with per-segment attention (CPU).

`models.packing.pack_groups` lays K groups out as K rows: the prompt, then each response, each
response attending to the prompt and to itself. Run as a (K, T) batch, that costs a separate
forward for the prompts' common first tokens (the chat template's system turn, `prefix_cache`),
whose products have only a few rows and run far below the matmul peak, plus the padding of the
shorter rows; and every layer's attention computes all T x T scores of each row, masked.

Here the same tokens run as one row, ``[common prefix | group 1 after it | group 2 after it | ...]``:
every product runs once over all real tokens (no padding, no second forward), and attention runs
segment by segment (`attention`): a group's prompt attends causally to the prefix and itself, a
response to the prefix, its prompt and itself, causally. Each token sees exactly the keys, at
exactly the positions, it sees in its own unpacked row, so log-probs, values and gradients equal
the row-by-row forward up to float rounding (tests/test_segments.py).

A batch of (B, T) rows with padding (PPO's actor, critic and reference forwards, SFT's loss, the
log-probs of evaluation) is laid out the same way by `rows_one_row`: the rows' common first L real
tokens once, then each row's other real tokens, each row attending to the prefix and to itself.
The padding is not computed at all, and the prefix has no separate forward.

The layout is used where the model is a plain (or peft-wrapped) single-process CPU model whose
attention is transformers' sdpa or eager (`usable`); the attention implementation is switched for
the forward call only (`attending`). docs/benchmarks.md ("Packed sequences as one row") has the
measured speed-up.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from rlhfkit.models import final_layer
from rlhfkit.models.heads import position_ids_from_mask, unwrap_model

# Set to False to run packed batches as K rows and padded rows as they come (benchmarks compare).
SEGMENT_ATTENTION = True
NAME = "rlhfkit_segments"
_PLAN: contextvars.ContextVar = contextvars.ContextVar("rlhfkit_segment_plan", default=None)


@dataclass(frozen=True)
class Segment:
    """Queries [q0, q1) of the row attend to the keys of ``ctx`` (ranges, in order): causally
    (``mask`` None: the keys are the queries themselves, a square causal block) or by ``mask``
    (q1 - q0, keys) bool, True = may attend."""
    q0: int
    q1: int
    ctx: tuple[tuple[int, int], ...]
    mask: torch.Tensor | None


@dataclass(frozen=True)
class Plan:
    """The segments of one row, and the row cut into key blocks at every boundary a segment's
    ranges have: ``sizes`` the blocks' lengths in order, ``uses[i]`` the blocks segment i attends
    to. `attention` splits queries, keys and values once per layer (one copy in the backward)
    and concatenates blocks, rather than slicing each segment's ranges (a full-size gradient per
    slice)."""
    segments: list[Segment]
    sizes: list[int]
    uses: list[tuple[int, ...]]
    _additive: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, segments: list[Segment]) -> Plan:
        end = segments[-1].q1
        cuts = sorted({0, end} | {x for s in segments for r in s.ctx for x in r})
        uses = [tuple(i for a, b in s.ctx for i in range(cuts.index(a), cuts.index(b))) for s in segments]
        return cls(segments, [b - a for a, b in zip(cuts, cuts[1:])], uses)

    def additive(self, dtype: torch.dtype) -> list[torch.Tensor | None]:
        """Each segment's mask as SDPA's additive float mask (0 where it may attend, -inf where
        not), made once per forward rather than converted by SDPA in every layer."""
        if dtype not in self._additive:
            self._additive[dtype] = [None if s.mask is None else
                                     torch.zeros(s.mask.shape, dtype=dtype, device=s.mask.device)
                                     .masked_fill_(~s.mask, float("-inf")) for s in self.segments]
        return self._additive[dtype]

    def key_rows(self, positions: torch.Tensor) -> torch.Tensor:
        """(N, T) bool: the keys of the row each query at ``positions`` (N,) may attend to."""
        T, dev = self.segments[-1].q1, positions.device
        rows = torch.zeros(positions.numel(), T, dtype=torch.bool, device=dev)
        cols = torch.arange(T, device=dev)
        for s in self.segments:
            i = ((positions >= s.q0) & (positions < s.q1)).nonzero(as_tuple=True)[0]
            if not i.numel():
                continue
            p = positions[i]
            if s.mask is None:  # a square causal block: keys q0 .. p
                rows[i] = (cols >= s.q0) & (cols[None] <= p[:, None])
                continue
            keys = torch.cat([torch.arange(a, b, device=dev) for a, b in s.ctx])
            rows[i[:, None], keys[None]] = s.mask[p - s.q0]
        return rows


def splittable(model) -> bool:
    """Whether ``model``'s forward may be split into calls or laid out anew (a shared prefix computed
    once, a batch as one row): a model that is neither wrapped (DDP, DeepSpeed), sharded across
    processes nor gradient-checkpointed, each of which expects one forward call per backward, in
    the batch's own shape. The answer depends on the run, not on the batch, so PPO's scoring and
    update always take the same path (the first ratio stays exactly 1)."""
    if unwrap_model(model) is not model:
        return False
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        return False
    flag = "is_activation_checkpointing" if hasattr(model, "is_activation_checkpointing") else "is_gradient_checkpointing"
    return not getattr(model, flag, False)


def usable(model, device: torch.device) -> bool:
    """Whether `model`'s forwards may run as one row (module docstring)."""
    if not (SEGMENT_ATTENTION and device.type == "cpu" and splittable(model)):
        return False
    configs = _attention_configs(model)
    return bool(configs) and all(
        getattr(c, "_attn_implementation", None) in ("sdpa", "eager")
        and not getattr(c, "sliding_window", None) and not getattr(c, "attn_logit_softcapping", None)
        for c in configs)


def one_row(packed: dict, share_prefix: bool = True) -> tuple[dict, torch.Tensor, Plan]:
    """A `pack_groups` batch as one row: (model inputs, (K*T,) map of the batch's flat positions to
    the row's, the row's segments). The prompts' shared first L tokens (``shared_prefix``; none
    without ``share_prefix``) come once, at positions 0..L-1; then each group without them, its
    positions as in its own row."""
    ids, pos = packed["input_ids"], packed["position_ids"]
    (K, T), L, dev = ids.shape, packed["shared_prefix"] if share_prefix else 0, ids.device
    parts, positions, segments, offsets = [ids[0, :L]], [pos[0, :L]], [], []
    start = L
    for k, (p, lengths) in enumerate(packed["lengths"]):
        n = p + sum(lengths)
        parts.append(ids[k, L:n])
        positions.append(pos[k, L:n])
        offsets.append(start - L)  # row index = flat column + offset
        prompt = (start, start + p - L)
        segments.append(_segment(prompt, ((0, L), prompt), dev))
        r = prompt[1]
        for m in lengths:
            if m:
                segments.append(_segment((r, r + m), ((0, L), prompt, (r, r + m)), dev))
            r += m
        start = r
    if L:
        segments.insert(0, _segment((0, L), ((0, L),), dev))
    inputs = {"input_ids": torch.cat(parts)[None], "position_ids": torch.cat(positions)[None],
              # not read: `attention` masks by the segments (transformers passes a 4-D mask through)
              "attention_mask": torch.ones(1, 1, 1, 1, dtype=torch.bool, device=dev)}
    where = torch.arange(K * T, device=dev)
    moved = where % T + torch.tensor(offsets, dtype=torch.long, device=dev)[where // T]
    return inputs, moved, Plan.of(_merge_square(segments))


def rows_one_row(input_ids: torch.Tensor, attention_mask: torch.Tensor, L: int) -> tuple[dict, torch.Tensor, Plan]:
    """(B, T) rows with a 0/1 ``attention_mask`` (padding on either side, or both) as one row: (model
    inputs, (B, T) position in the row of every real token (-1 at padding), the row's segments).
    The rows' first L real tokens, which must be the same in every row, come once, at positions
    0..L-1 (each row's map points its prefix tokens there); then each row's other real tokens,
    attending to the prefix and causally to themselves, at the positions they have in their own
    row (the count of real tokens before them)."""
    real = attention_mask.bool()
    B, dev = input_ids.shape[0], input_ids.device
    n = real.sum(1)
    rank = position_ids_from_mask(attention_mask)  # each real token's position in its row
    if L:
        prefix = input_ids[real & (rank < L)].view(B, L)
        if int(n.min()) <= L or not bool((prefix == prefix[:1]).all()):
            raise ValueError(f"shared_prefix={L}: the rows' first {L} real tokens differ, or a row has no other")
    own = (n - L).tolist()
    starts = list(itertools.accumulate(own[:-1], initial=L))  # where each row's own tokens begin
    start = torch.tensor(starts, dtype=torch.long, device=dev)[:, None]
    where = torch.where(rank < L, rank, start + rank - L).masked_fill(~real, -1)
    N = L + sum(own)
    row_ids = input_ids.new_zeros(N).index_put_((where[real],), input_ids[real])
    positions = rank.new_zeros(N).index_put_((where[real],), rank[real])
    segments = [_segment((s, s + m), ((0, L), (s, s + m)), dev) for s, m in zip(starts, own) if m]
    if L:
        segments.insert(0, _segment((0, L), ((0, L),), dev))
    inputs = {"input_ids": row_ids[None], "position_ids": positions[None],
              "attention_mask": torch.ones(1, 1, 1, 1, dtype=torch.bool, device=dev)}  # not read: `attention`
    return inputs, where, Plan.of(_merge_square(segments))


def _segment(q: tuple[int, int], ctx: tuple[tuple[int, int], ...], device) -> Segment:
    """Queries q attend to ctx, the last range of which is q itself (causal within it)."""
    merged: list[list[int]] = []
    for a, b in ctx:
        if b <= a:
            continue
        if merged and merged[-1][1] == a:
            merged[-1][1] = b
        else:
            merged.append([a, b])
    keys = sum(b - a for a, b in merged)
    nq = q[1] - q[0]
    square = len(merged) == 1 and tuple(merged[0]) == q
    mask = None if square else torch.ones(nq, keys, dtype=torch.bool, device=device).tril(keys - nq)
    return Segment(q[0], q[1], tuple(tuple(r) for r in merged), mask)


def _merge_square(segments: list[Segment]) -> list[Segment]:
    """A causal block from 0 followed by a segment that attends to everything from 0 through itself
    are one causal block: the prefix and the first group's prompt, or, with no prefix, the first
    prompt and its first response."""
    if len(segments) > 1 and segments[0].mask is None and segments[1].ctx == ((0, segments[1].q1),):
        return [Segment(0, segments[1].q1, ((0, segments[1].q1),), None), *segments[2:]]
    return segments


@contextlib.contextmanager
def attending(model, plan: Plan, read: torch.Tensor | None = None):
    """Run `model`'s attention by `plan` inside the block (the forward; backward needs nothing).
    ``read``: the row positions whose outputs are read, the only ones the last decoder layer then
    computes (`models.final_layer`; every other position of the output must be ignored)."""
    configs = _attention_configs(model)
    before = [c._attn_implementation for c in configs]
    token = _PLAN.set(plan)
    try:
        for c in configs:
            c._attn_implementation = NAME
        with final_layer.final_layer_on(model, read, plan.key_rows):
            yield
    finally:
        for c, b in zip(configs, before):
            c._attn_implementation = b
        _PLAN.reset(token)


def attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
              dropout: float = 0.0, scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface: query (1, heads, N, d), key/value (1, kv heads,
    N, d) -> (1, N, heads, d), segment by segment (`one_row`)."""
    plan = _PLAN.get()
    if plan is None or query.shape[0] != 1:
        raise RuntimeError(f"{NAME} attention runs only inside segments.attending, on one row")
    if any(kwargs.get(k) is not None for k in ("sliding_window", "softcap", "s_aux", "position_bias")):
        raise RuntimeError(f"{NAME} attention: sliding windows, soft-capping, attention sinks and position "
                           "biases are not supported")
    gqa = query.shape[1] != key.shape[1]  # grouped-query attention: SDPA maps query heads to KV heads
    queries = query.split([s.q1 - s.q0 for s in plan.segments], 2)
    keys, values = key.split(plan.sizes, 2), value.split(plan.sizes, 2)
    out = []
    for q, use, mask in zip(queries, plan.uses, plan.additive(query.dtype)):
        k, v = (keys[use[0]], values[use[0]]) if len(use) == 1 else (
            torch.cat([keys[i] for i in use], 2), torch.cat([values[i] for i in use], 2))
        out.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None,
                                                  scale=scaling, enable_gqa=gqa))
    return torch.cat(out, 2).transpose(1, 2).contiguous(), None


def windowed(model) -> bool:
    """Whether some attention layer of ``model`` sees only a sliding window of keys (Mistral, Phi-3,
    Gemma2, Qwen2 with use_sliding_window): its window counts cache columns, so a prefix computed
    once and put before left-padded rows would move keys in or out of it. Such models take no
    shared-prefix path."""
    for c in _attention_configs(model):
        if getattr(c, "sliding_window", None) and getattr(c, "use_sliding_window", True) is not False:
            return True
        if "sliding_attention" in (getattr(c, "layer_types", None) or ()):
            return True
    return False


def _attention_configs(model) -> list:
    """The distinct config objects the model's modules read their attention implementation from."""
    seen: dict[int, object] = {}
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and hasattr(c, "_attn_implementation"):
            seen.setdefault(id(c), c)
    return list(seen.values())


AttentionInterface.register(NAME, attention)
