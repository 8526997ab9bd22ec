"""A lean prefill and decode step for Llama models on CPU: fused, pre-packed weights, no HF machinery.

A decode step of a small model at 8-16 rows is many small operations: per layer three projections
for q, k and v, two for the MLP's gate and up, the norms, rotary embedding, the cache update and
attention, each through transformers' modules (mask building, per-layer dispatch, peft's LoRA
branches). `LlamaDecoder` runs the same arithmetic with fewer, larger kernels:

- per call, q/k/v are concatenated into one matrix (one product instead of three small ones) and
  any active peft LoRA adapter is merged in (W + scale * B @ A): the adapters cost nothing during
  decoding. A call of at most 8 rows can multiply through `cpu_gemv` (a kernel that streams the
  weights as they are and needs no packing): `gemv_wins` times it against oneDNN once per
  process and keeps the faster. Otherwise a call reads the weights once into oneDNN's packed
  layout (as `cpu_linears.packed_linears` does). Gate and up stay two matrices: fused, they were
  no faster per step and the concatenation (212 MB for the default model) added to every call's
  packing;
- per step, the rotary cos/sin (the model's own rotary module) and the additive attention mask
  are computed once for all layers; with numba, the norms, residual adds, rotary, cache append
  and attention over the preallocated KV cache (`kv_cache`) are three kernels per layer
  (`cpu_step`); without it, q and k are rotated together, attention is two batched products per
  layer with the query heads of a KV head grouped (no repeated keys), and norms are one kernel each;
- the prefill (`prefill`: several tokens per row, causal and padding mask) runs on the same packed
  weights, so a call packs once (the model's forward would run its unpacked weights, or pack them
  a second time).

Outputs equal the transformers forward up to float32 rounding (tests/test_rollout_fast.py). Only
plain or peft-LoRA-wrapped `LlamaForCausalLM` in float32 on CPU, with default RoPE, no biases,
SiLU MLP, sdpa or eager attention and no forward hooks (their effect would be skipped; the
gradient-only hook of gradient checkpointing excepted) take this path; `LlamaDecoder.build` returns None for anything else and the
engine uses the model's forward.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM

import rlhfkit.rollout.cpu_gemv as cpu_gemv
import rlhfkit.rollout.cpu_step as cpu_step
from rlhfkit.rollout.cpu_linears import PACK_CPU_LINEARS, _available_memory
from rlhfkit.rollout.kv_cache import check_transformers, is_preallocated

log = logging.getLogger("rlhfkit")

# Set to False to decode every model through its own forward (benchmarks compare the two).
LEAN_DECODE = True


def _mkldnn_ok() -> bool:
    ops = getattr(torch.ops, "mkldnn", None)
    return (PACK_CPU_LINEARS and torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


class _Linear:
    """y = x @ W^T for one (fused) weight: through `cpu_gemv` when the call decodes at most
    `cpu_gemv.ROWS` rows (``gemv``; more rows, as in the prefill, take torch's kernel), else
    packed for oneDNN when available (``pack``), else torch's kernel."""

    def __init__(self, weight: torch.Tensor, rows: int, pack: bool, gemv: bool = False):
        self.packed = pack and not gemv
        self.gemv = cpu_gemv.GemvLinear(weight) if gemv else None
        self.w = torch.ops.mkldnn._reorder_linear_weight(weight, max(rows, 1)) if self.packed else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemv is not None and x.shape[0] <= cpu_gemv.ROWS:
            return self.gemv(x)
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.w, None, "none", [], "")
        return F.linear(x, self.w)


def effective_weight(m: nn.Module) -> torch.Tensor | None:
    """The (out, in) matrix a bias-free linear module applies: an nn.Linear's weight, or a peft LoRA
    Linear's base weight plus its active adapters' deltas. None for anything else."""
    if "forward" in m.__dict__ or _hooked(m):
        return None
    if type(m) is nn.Linear:
        return m.weight.detach() if m.bias is None else None
    base = getattr(m, "base_layer", None)
    if type(base) is not nn.Linear or base.bias is not None or not hasattr(m, "get_delta_weight"):
        return None
    w = base.weight.detach()
    if m.disable_adapters or m.merged:  # peft runs the base layer alone (merged: deltas already in it)
        return None if m.disable_adapters and m.merged else w
    for name in m.active_adapters:
        if name not in m.lora_A:
            continue
        if name in getattr(m, "lora_variant", {}) or m.lora_B[name].bias is not None:
            return None  # DoRA and other variants, LoRA biases: not a plain delta
        w = w + m.get_delta_weight(name).detach()
    return w


def _plain_llama(model) -> LlamaForCausalLM | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(base, LlamaForCausalLM) or base.training:
        return None
    c = base.config
    rope = getattr(c, "rope_parameters", None) or {}
    ok = (c.hidden_act == "silu" and not c.attention_bias and not getattr(c, "mlp_bias", False)
          and getattr(c, "pretraining_tp", 1) == 1 and rope.get("rope_type", "default") == "default"
          and c._attn_implementation in ("sdpa", "eager"))
    p = base.lm_head.weight
    if not ok or p.dtype != torch.float32 or p.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        return None
    hooked = any(_hooked(m) for m in model.modules())
    return None if hooked or nn.modules.module._global_forward_hooks else base


# transformers' enable_input_require_grads hook (gradient checkpointing) only marks the embedding
# output as requiring grad: no effect on values, none under inference mode
GRAD_ONLY_HOOKS = ("make_inputs_require_grads",)


def _hooked(m: nn.Module) -> bool:
    """Whether `m` has forward hooks that could change values (the lean step would skip them)."""
    hooks = [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
    return any(getattr(h, "__name__", "") not in GRAD_ONLY_HOOKS for h in hooks)


TRIALS: dict[tuple, tuple[float, float]] = {}  # (rows, threads, shapes) -> seconds (few-row kernel, oneDNN)


def gemv_wins(rows: int, weights: list[torch.Tensor]) -> bool:
    """Whether the few-row kernel (`cpu_gemv`) multiplies `rows` rows by `weights` (one decode
    step's matrices) faster than oneDNN's packed kernel on this machine: timed once per process,
    row count (4 or 8, the kernel's variants), thread count and shapes, the two alternating, the
    best of three passes each after a warm-up (the trial holds a packed copy of the matrices until
    it ends); the times are kept in `TRIALS`."""
    rows = cpu_gemv.variant(rows)
    key = (rows, torch.get_num_threads(), tuple(tuple(w.shape) for w in weights))
    if key not in TRIALS:
        cpu_gemv.set_threads(torch.get_num_threads())
        try:
            TRIALS[key] = _time_both(rows, weights)
        except (RuntimeError, NotImplementedError):  # a build without the oneDNN kernels
            TRIALS[key] = (0.0, float("inf"))
        log.info("decode products at %d rows: few-row kernel %.1f ms, oneDNN %.1f ms per step",
                 rows, *(1e3 * t for t in TRIALS[key]))
    gemv_s, onednn_s = TRIALS[key]
    return gemv_s < onednn_s


def decode_choices() -> dict:
    """The decode products this process chose, per row count: ``{"rows 8": {"kernel": "oneDNN",
    "few_row_ms": .., "onednn_ms": ..}}`` from the timed trials, or the pinned setting. Recorded in
    the policy-gradient trainers' results: the two kernels round differently, so two runs sample
    the same tokens only when they made the same choice (``RLHFKIT_DECODE_GEMV=0`` or ``1`` pins it)."""
    pinned = cpu_gemv.setting()
    out: dict = {"RLHFKIT_DECODE_GEMV": pinned}
    for (rows, threads, _), (gemv_s, onednn_s) in sorted(TRIALS.items()):
        out[f"rows {rows}, threads {threads}"] = {
            "kernel": "few-row kernel" if gemv_s < onednn_s else "oneDNN",
            "few_row_ms": round(1e3 * gemv_s, 2), "onednn_ms": round(1e3 * onednn_s, 2)}
    return out


def _time_both(rows: int, weights: list[torch.Tensor]) -> tuple[float, float]:
    kernels = ([cpu_gemv.GemvLinear(w) for w in weights], [_Linear(w, rows, True) for w in weights])
    gen = torch.Generator().manual_seed(0)  # not the global stream: a trial must not change what is sampled
    xs = {w.shape[1]: torch.randn(rows, w.shape[1], generator=gen) for w in weights}
    best = [float("inf"), float("inf")]
    for rep in range(4):  # the first pass of each warms up (numba's cached code, oneDNN's primitives)
        for side, linears in enumerate(kernels):
            t = time.perf_counter()
            for lin, w in zip(linears, weights):
                lin(xs[w.shape[1]])
            if rep:
                best[side] = min(best[side], time.perf_counter() - t)
    return best[0], best[1]


class LlamaDecoder:
    """The weights of one `generate` call, fused and packed, and the decode step that uses them."""

    def __init__(self, base: LlamaForCausalLM, layers: list[tuple], head: torch.Tensor, rows: int, pack: bool,
                 gemv: bool = False):
        c = base.config
        self.H, self.hd = c.hidden_size, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.nh, self.nkv = c.num_attention_heads, c.num_key_value_heads
        self.eps = c.rms_norm_eps
        self.embed = base.model.embed_tokens.weight.detach()
        self.final_norm = base.model.norm.weight.detach()
        self.rotary = base.model.rotary_emb
        self.layers = [(ln1, *(_Linear(w, rows, pack, gemv) for w in (qkv, o)), ln2,
                        *(_Linear(w, rows, pack, gemv) for w in (g, u, down)), scale)
                       for ln1, qkv, o, ln2, g, u, down, scale in layers]
        self.head = _Linear(head, rows, pack, gemv)
        half = self.hd // 2
        self.sign = torch.cat([-torch.ones(half), torch.ones(self.hd - half)]).to(self.embed)
        self.fused = cpu_step.available() and self.hd % 2 == 0  # the step's small operations in numba kernels
        if gemv or self.fused:
            cpu_gemv.set_threads(torch.get_num_threads())

    @classmethod
    def build(cls, model, rows: int) -> LlamaDecoder | None:
        """The decoder for `model`, or None when the model is not one it runs exactly (module docstring)."""
        base = _plain_llama(model) if LEAN_DECODE else None
        if base is None or not check_transformers():
            return None
        pack = _mkldnn_ok() and sum(p.numel() * 4 for p in base.parameters()) < _available_memory() // 2
        norms = [m for layer in base.model.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)]
        if type(base.model.embed_tokens) is not nn.Embedding or any(
                not type(n).__name__.endswith("RMSNorm") for n in [*norms, base.model.norm]):
            return None
        layers = []
        for layer in base.model.layers:
            a, m = layer.self_attn, layer.mlp
            ws = [effective_weight(x) for x in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj,
                                               m.down_proj)]
            if any(w is None for w in ws):
                return None
            q, k, v, o, g, u, d = ws
            layers.append((layer.input_layernorm.weight.detach(), torch.cat([q, k, v]), o,
                           layer.post_attention_layernorm.weight.detach(), g, u, d, a.scaling))
        head = effective_weight(base.lm_head)
        if head is None:
            return None
        matrices = [*(w for lay in layers for w in (lay[1], lay[2], *lay[4:7])), head]  # qkv, o, g, u, down
        gemv = rows <= cpu_gemv.ROWS and cpu_gemv.available() and (
            not pack or cpu_gemv.setting() == "1" or gemv_wins(rows, matrices))
        try:
            return cls(base, layers, head, rows, pack, gemv)
        except (RuntimeError, NotImplementedError):  # a build without the oneDNN kernels
            return cls(base, layers, head, rows, False, gemv) if pack else None

    def accepts(self, cache) -> bool:
        """Whether `cache` is one whose layers this step can update (the engine's preallocated layers)."""
        return len(cache.layers) == len(self.layers) and all(is_preallocated(layer) for layer in cache.layers)

    def step(self, tok: torch.Tensor, position: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        """(b,) tokens at positions (b, 1), attention mask (b, ctx) over the cache plus this token
        -> next-token logits (b, V); appends the tokens' keys and values to `cache`, a cache that
        `accepts` took (the engine checks once per call)."""
        b, H, hd, nh, nkv = tok.shape[0], self.H, self.hd, self.nh, self.nkv
        x = F.embedding(tok, self.embed)  # (b, H)
        cos, sin = self.rotary(x, position)  # (b, 1, hd) each
        sin = sin * self.sign  # rotate_half(x) * sin == roll(x, hd/2) * (sign * sin)
        # the most negative finite value, as transformers uses: exp() of it is 0 next to any real score
        bias = torch.zeros(mask.shape, dtype=x.dtype).masked_fill_(mask == 0, torch.finfo(x.dtype).min)
        if self.fused:
            return self._fused_step(x, cos.reshape(b, hd), sin.reshape(b, hd), bias, cache)
        bias = bias[:, None, None, :]
        for i, (ln1, qkv_proj, o_proj, ln2, gate_proj, up_proj, down_proj, scale) in enumerate(self.layers):
            qkv = qkv_proj(F.rms_norm(x, (H,), ln1, self.eps))  # (b, (nh + 2 nkv) hd)
            qk = qkv[:, :(nh + nkv) * hd].view(b, nh + nkv, hd)
            qk = qk * cos + qk.roll(hd // 2, -1) * sin
            q = qk[:, :nh].view(b, nkv, nh // nkv, hd)  # query heads grouped by their KV head
            keys, values = cache.layers[i].update(qk[:, nh:, None], qkv[:, (nh + nkv) * hd:].view(b, nkv, 1, hd))
            scores = torch.matmul(q, keys.transpose(-1, -2)).mul_(scale).add_(bias)  # (b, nkv, g, ctx)
            attn = torch.matmul(scores.softmax(-1), values).view(b, nh * hd)
            x = x + o_proj(attn)
            h = F.rms_norm(x, (H,), ln2, self.eps)
            x = x + down_proj(F.silu(gate_proj(h)).mul_(up_proj(h)))
        return self.head(F.rms_norm(x, (H,), self.final_norm, self.eps))

    def _fused_step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
                    cache) -> torch.Tensor:
        """`step` with its norms, residual adds, rotary, cache append and attention in
        `cpu_step`'s kernels (x (b, H) is the residual stream, updated in place), the products as
        in `step`."""
        heads, eps = (self.nh, self.nkv, self.hd), self.eps
        h, mlp = cpu_step.rms_norm(x, self.layers[0][0], eps), None
        for i, (ln1, qkv_proj, o_proj, ln2, gate_proj, up_proj, down_proj, scale) in enumerate(self.layers):
            if mlp is not None:
                h = cpu_step.add_rms_norm(x, mlp, ln1, eps)
            attn = cpu_step.attend(qkv_proj(h), cos, sin, cache.layers[i], bias, scale, heads)
            h = cpu_step.add_rms_norm(x, o_proj(attn), ln2, eps)
            mlp = down_proj(F.silu(gate_proj(h)).mul_(up_proj(h)))
        return self.head(cpu_step.add_rms_norm(x, mlp, self.final_norm, eps))

    def prefill(self, ids: torch.Tensor, position: torch.Tensor, mask: torch.Tensor | None, cache) -> torch.Tensor:
        """(b, S) tokens at positions (b, S) after what `cache` holds, attention mask (b, ctx) over
        the cache plus them (None: all 1) -> next-token logits (b, V) of the last position. Causal
        within the S tokens; appends their keys and values to `cache` (any transformers Cache).
        The products run on the real tokens only (`_real_tokens`: left padding of prompts of
        different lengths is a third of a typical batch); the padding's keys and values are 0,
        masked like any padding."""
        (b, S), H, hd, nh, nkv = ids.shape, self.H, self.hd, self.nh, self.nkv
        g, ctx = nh // nkv, cache.get_seq_length() + S
        x = F.embedding(ids, self.embed).view(b * S, H)
        cos, sin = self.rotary(x.view(b, S, H), position)  # (b, S, hd) each
        cos, sin = cos[:, :, None], (sin * self.sign)[:, :, None]
        allowed = torch.arange(ctx) <= torch.arange(ctx - S, ctx)[:, None]  # (S, ctx) causal
        allowed = allowed & (mask[:, None, :] != 0) if mask is not None else allowed.expand(b, S, ctx)
        bias = torch.zeros((b, S, ctx), dtype=x.dtype).masked_fill_(~allowed, torch.finfo(x.dtype).min)
        bias = bias[:, None, None].expand(b, 1, g, S, ctx).reshape(b, 1, g * S, ctx)
        keep, last = _real_tokens(mask, b, S)
        if keep is not None:
            x = x.index_select(0, keep)  # (N, H): the residual stream of the real tokens
        for i, (ln1, qkv_proj, o_proj, ln2, gate_proj, up_proj, down_proj, scale) in enumerate(self.layers):
            qkv = qkv_proj(F.rms_norm(x, (H,), ln1, self.eps))
            if keep is not None:
                qkv = qkv.new_zeros(b * S, qkv.shape[1]).index_copy_(0, keep, qkv)
            qkv = qkv.view(b, S, nh + 2 * nkv, hd)
            qk = qkv[:, :, :nh + nkv]
            qk = qk * cos + qk.roll(hd // 2, -1) * sin  # (b, S, nh + nkv, hd)
            q = qk[:, :, :nh].reshape(b, S, nkv, g, hd).permute(0, 2, 3, 1, 4).reshape(b, nkv, g * S, hd)
            keys, values = cache.update(qk[:, :, nh:].transpose(1, 2), qkv[:, :, nh + nkv:].transpose(1, 2), i)
            scores = torch.matmul(q, keys.transpose(-1, -2)).mul_(scale).add_(bias)  # (b, nkv, g S, ctx)
            attn = torch.matmul(scores.softmax(-1), values).view(b, nkv, g, S, hd).permute(0, 3, 1, 2, 4)
            attn = attn.reshape(b * S, nh * hd)
            x = x + o_proj(attn if keep is None else attn.index_select(0, keep))
            h = F.rms_norm(x, (H,), ln2, self.eps)
            x = x + down_proj(F.silu(gate_proj(h)).mul_(up_proj(h)))
        return self.head(F.rms_norm(x.index_select(0, last), (H,), self.final_norm, self.eps))


def _real_tokens(mask: torch.Tensor | None, b: int, S: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(keep, last) for a prefill of (b, S) tokens whose mask (b, ctx) ends with theirs: keep (N,)
    the flat (b*S) indices of the real tokens (None when all are real), last (b,) where each row's
    last token is among the rows the products run on. Each row's last token must be real (prompts
    are left-padded); otherwise every token runs."""
    last = torch.arange(b) * S + S - 1
    if mask is None:
        return None, last
    real = (mask[:, -S:] != 0).reshape(-1)
    if bool(real.all()) or not bool(real[last].all()):
        return None, last
    return real.nonzero().squeeze(1), real.long().cumsum(0)[last] - 1
