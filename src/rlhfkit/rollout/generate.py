"""Batched sampling with a KV cache, producing an `Experience`.

Our own loop instead of `model.generate` because RLHF needs things `generate` does not give
cheaply and exactly:
- log pi(a_t) of each sampled token under the *untempered* distribution, from the same forward
  pass that chose it (no second scoring pass);
- position ids that count only real tokens under left padding, so a padded row produces exactly
  what the same prompt produces alone, and exactly what a training forward pass recomputes
  (`position_ids_from_mask`), which is what makes PPO's first ratio 1;
- a fixed record layout (left-padded prompts, right-padded responses, masks that include EOS).

Speed on CPU: the prompt is prefilled in one pass with logits for the last position only
(`logits_to_keep=1`: the LM head over every prompt position is wasted work); each decode step is
one forward of a (B, 1) batch; all per-step bookkeeping is vectorised over rows; the attention
mask is allocated once and sliced; identical prompts and the prefix common to all prompts are
prefilled once (`_prefill`); rows that finished are dropped from the batch. Measured at batch 16
on the default model (benchmarks/bench_generate.py), almost all of a decode step is the model's
matrix multiplies, so three things matter: the float32 linear layers run with weights packed once
per call (`_packed_linears`, ~1.7x faster than torch's default kernel at a few rows); the KV cache
is written in place into buffers sized for the whole response (`_PreallocatedLayer`) instead of
being re-concatenated per layer per token; and sampling plus the token's log-prob take a few
passes over the logits, without (B, V) allocations (`_Sampler`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Sequence

import torch

from rlhfkit.models.heads import position_ids_from_mask
from rlhfkit.rollout.experience import Experience

# Run the model's float32 nn.Linear layers on CPU through oneDNN with weights packed once per
# `generate` call (see `_packed_linears`). Set to False to use torch's default (MKL) kernels.
PACK_CPU_LINEARS = True


def generate(
    model,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    n: int = 1,
    micro_batch_size: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    return_logprobs: bool = True,
) -> Experience:
    """Sample `n` responses for each prompt.

    prompt_ids: token ids of each prompt (already chat-templated), unpadded.
    eos_token_id: one id or several; generation of a row stops at the first of them.
    temperature: 0 means greedy. top_k=0 / top_p=1 disable those filters.
    n: samples per prompt; rows [i*n, (i+1)*n) belong to prompt i (`prompt_index`).
    micro_batch_size: rows per forward pass (bounds memory); None = all rows at once.
        Sampled tokens depend on the split because the random stream is consumed per batch.
    seed / generator: a seed builds a fresh generator; otherwise the given one (or torch's
        global RNG) is used.
    return_logprobs: store log pi(a_t) at temperature 1 (see `Experience.logprobs`).

    Returns an Experience on the model's device with B = len(prompt_ids) * n rows.
    """
    if len(prompt_ids) == 0:
        raise ValueError("generate needs at least one prompt")
    if eos_token_id is None:
        raise ValueError("eos_token_id is None: pass the tokenizer's end-of-turn id(s), or [] for none")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("empty prompt: every prompt needs at least one token")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or n < 1:
        raise ValueError(f"bad sampling settings: temperature={temperature} top_p={top_p} top_k={top_k} n={n}")
    device = _model_device(model)
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    eos_ids = torch.as_tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                              dtype=torch.long, device=device)

    prompts = [p.tolist() if hasattr(p, "tolist") else list(p) for p in prompt_ids]  # tensors too
    rows = [p for p in prompts for _ in range(n)]
    prompt_index = torch.arange(len(prompts), device=device).repeat_interleave(n)
    mbs = micro_batch_size or len(rows)

    n_forwards = max_new_tokens * -(-len(rows) // mbs)  # decode steps at most, over all micro-batches

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _packed_linears(model, min(mbs, len(rows)), n_forwards):
            parts = []
            for start in range(0, len(rows), mbs):
                chunk = rows[start:start + mbs]
                resp, logp, eos = _sample(
                    model, chunk, max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_token_id=pad_token_id,
                    temperature=temperature, top_p=top_p, top_k=top_k, generator=generator,
                    return_logprobs=return_logprobs,
                )
                resp_mask = _response_mask(resp, eos_ids)
                ids, mask = left_pad(chunk, pad_token_id, device)
                parts.append(Experience(
                    prompt_ids=ids, prompt_mask=mask, response_ids=resp, response_mask=resp_mask,
                    logprobs=logp, eos=eos, prompt_index=prompt_index[start:start + mbs],
                    pad_token_id=pad_token_id,
                ))
    finally:
        model.train(was_training)
    # Tensors made under inference_mode cannot be saved for backward or modified in place; copy
    # them into normal tensors so trainers may use them freely (cat outside inference_mode copies).
    return Experience.cat(parts) if len(parts) > 1 else _clone(parts[0])


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids (B, P), mask (B, P)) left-padded to the longest row."""
    P = max(len(r) for r in rows)
    ids = torch.full((len(rows), P), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), P), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, P - len(r):] = torch.as_tensor(r, dtype=torch.long)
            mask[i, P - len(r):] = 1
    return ids.to(device), mask.to(device)


def _sample(model, rows, *, max_new_tokens, eos_ids, pad_token_id, temperature, top_p, top_k,
            generator, return_logprobs):
    """The decode loop for one micro-batch: B prompts -> (B, R) tokens, (B, R) logprobs, (B,) eos."""
    B, device = len(rows), eos_ids.device
    tokens = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    if max_new_tokens == 0:
        no_eos = torch.zeros(B, dtype=torch.bool, device=device)
        return tokens, (torch.zeros(B, 0, device=device) if return_logprobs else None), no_eos

    keep = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    # (B, V) logits, a cache with room for every response token, (B, K) mask
    logits, cache, mask = _prefill(model, rows, pad_token_id, device, keep, extra=max_new_tokens)
    logps = torch.zeros((B, max_new_tokens), dtype=logits.dtype, device=device) if return_logprobs else None
    K = mask.shape[1]
    # Allocated once; step t attends to attn[:, :K+t+1]. Finished rows keep feeding pad tokens with
    # mask 1 until they are dropped: their outputs are discarded and causality keeps the tokens up
    # to EOS unaffected.
    attn = torch.cat([mask, mask.new_ones(B, max_new_tokens)], dim=1)  # (B, K+R)
    next_pos = mask.sum(-1, keepdim=True)  # (B, 1) position of the first response token
    alive = torch.arange(B, device=device)  # (b,) original row of each row still in the batch
    finished = torch.zeros(B, dtype=torch.bool, device=device)  # (b,) emitted EOS, not yet dropped
    can_drop = hasattr(cache, "batch_select_indices")
    sampler = _Sampler(temperature, top_p, top_k, generator)
    steps = 0
    for t in range(max_new_tokens):
        tok, lp = sampler(logits, return_logprobs)  # (b,), (b,) or None
        tok.masked_fill_(finished, pad_token_id)
        tokens[alive, t] = tok
        if logps is not None:
            logps[alive, t] = lp.masked_fill_(finished, 0.0)
        finished |= torch.isin(tok, eos_ids)
        steps = t + 1
        n_fin = int(finished.sum())
        if steps == max_new_tokens or n_fin == len(alive):
            break
        if can_drop and n_fin >= max(1, len(alive) // 8):
            # Drop finished rows: the cache copy costs less than computing 1/8 of the batch
            # for the rest of the response (responses of an SFT model vary a lot in length).
            keep_rows = (~finished).nonzero().squeeze(1)
            cache.batch_select_indices(keep_rows)
            alive, attn, next_pos, tok = alive[keep_rows], attn[keep_rows], next_pos[keep_rows], tok[keep_rows]
            finished = finished[keep_rows]
        out = model(input_ids=tok[:, None], attention_mask=attn[:, :K + t + 1], position_ids=next_pos + t,
                    past_key_values=cache, use_cache=True, **keep)
        logits = _upcast(out.logits[:, -1])  # (b, V)
        del out
    tokens = tokens[:, :steps]
    done = torch.isin(tokens, eos_ids).any(-1)
    return tokens, (logps[:, :steps] if logps is not None else None), done


def _prefill(model, rows, pad_token_id, device, keep, extra=0):
    """Run the prompts through the model once, sharing work between rows.

    Two savings, both exact up to float rounding (attention sees the same keys at the same
    positions, only stored in a different order):
    - identical prompts (the n samples of a prompt) are computed once and the cache rows copied;
    - the longest prefix common to all prompts (the chat template's system turn) is computed once.
    The cache then holds [common prefix | left-padded suffixes], so the returned mask (B, K) has
    the layout [1..1 | 0..0 1..1], not the left-padded layout of `Experience.prompt_ids`;
    positions come from the mask either way.
    Returns next-token logits (B, V) (at least float32), the cache, and that mask. The cache's
    full-attention layers get room for `extra` more tokens (`_PreallocatedLayer`).
    """
    from transformers import DynamicCache

    uniq: dict[tuple[int, ...], int] = {}
    row_to_u = torch.tensor([uniq.setdefault(tuple(r), len(uniq)) for r in rows], device=device)
    prompts = list(uniq)  # insertion order = index
    U = len(prompts)
    cache = DynamicCache(config=model.config)
    can_copy = hasattr(cache, "batch_select_indices")
    L = _common_prefix_len(prompts) if U > 1 and can_copy else 0
    L = min(L, min(len(p) for p in prompts) - 1)  # every row keeps >= 1 suffix token for its logits
    if L > 0:
        model(input_ids=torch.tensor([prompts[0][:L]], device=device), position_ids=torch.arange(L, device=device)[None],
              past_key_values=cache, use_cache=True, **keep)
        cache.batch_select_indices(torch.zeros(U, dtype=torch.long, device=device))
    if not can_copy:  # caches without row selection: no deduplication either
        prompts, row_to_u, U = [list(r) for r in rows], torch.arange(len(rows), device=device), len(rows)
    ids, smask = left_pad([p[L:] for p in prompts], pad_token_id, device)  # (U, S)
    mask = torch.cat([smask.new_ones(U, L), smask], dim=1)  # (U, L+S)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)[:, L:],
                past_key_values=cache, use_cache=True, **keep)
    logits = _upcast(out.logits[:, -1])  # (U, V)
    select = None
    if U != len(rows):
        select = row_to_u
        logits, mask = logits[row_to_u], mask[row_to_u]
    _preallocate(cache, select, extra)
    return logits, cache, mask


def _preallocate(cache, select: torch.Tensor | None, extra: int) -> None:
    """Give each plain full-attention layer of a DynamicCache room for `extra` more tokens, taking
    rows `select` of what it holds (None: all). Other layer types (sliding window, ...) keep their
    own update rule and are only row-selected."""
    from transformers.cache_utils import DynamicLayer

    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.numel() > 0:
            cache.layers[i] = _preallocated_layer_class()(layer.keys, layer.values, extra, select)
        elif select is not None:
            layer.batch_select_indices(select)


@functools.cache
def _preallocated_layer_class():  # transformers is imported on first use, not with rlhfkit
    from transformers.cache_utils import DynamicLayer

    class _PreallocatedLayer(DynamicLayer):
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
            m = self._n + key_states.shape[-2]
            if m > self._kbuf.shape[-2]:  # more tokens than planned: grow by doubling
                cap = max(m, 2 * self._kbuf.shape[-2])
                self._kbuf, self._vbuf = (_regrow(b, self._n, cap) for b in (self._kbuf, self._vbuf))
            self._kbuf[..., self._n:m, :] = key_states
            self._vbuf[..., self._n:m, :] = value_states
            self._n = m
            self._views()
            return self.keys, self.values

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

    return _PreallocatedLayer


def _regrow(buf: torch.Tensor, n: int, cap: int) -> torch.Tensor:
    """(..., L, D) buffer whose first n positions are filled -> the same with room for cap positions."""
    new = buf.new_empty(*buf.shape[:-2], cap, buf.shape[-1])
    new[..., :n, :] = buf[..., :n, :]
    return new


def _common_prefix_len(seqs) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        tok = first[i]
        if any(s[i] != tok for s in seqs):
            return i
    return n


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits -> float32 (log-softmax in bf16 loses ~2 digits); float32/64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _pick(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator) -> torch.Tensor:
    """(B, V) raw logits -> (B,) sampled token ids."""
    return _Sampler(temperature, top_p, top_k, generator)(logits, False)[0]


def _filtered(logits: torch.Tensor, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """Tempered logits with tokens outside top-k / top-p set to -inf; `logits` itself if nothing to do."""
    if temperature == 1.0 and not (top_k and top_k < logits.shape[-1]) and top_p >= 1.0:
        return logits
    z = logits / temperature if temperature != 1.0 else logits.clone()
    if top_k and top_k < z.shape[-1]:
        kth = z.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        z.masked_fill_(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = z.sort(dim=-1, descending=True)
        cum = sorted_z.softmax(-1).cumsum(-1)
        # Drop a token when the mass *before* it already reaches top_p (the top token always stays).
        drop_sorted = (cum - sorted_z.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z.masked_fill_(drop, float("-inf"))
    return z


class _Sampler:
    """One decode step's token choice and its log pi at temperature 1, with few passes over the
    (B, V) logits and no (B, V) allocation after the first step.

    Inverse-CDF sampling with one uniform per row (same distribution as torch.multinomial, which
    draws V exponentials per row: ~20 ms per step for 16 x 49k on CPU), done in two levels so that
    only block sums and one block of `BLOCK` tokens are summed cumulatively, in float64: a single
    float32 cumulative sum over a 49k vocabulary would round away the mass of its tail (absolute
    error ~6e-8 per token near a total of 1), while here every error is relative to a block's mass.
    Unnormalised weights exp(z - max z) go into a buffer reused across steps; their total also
    gives logsumexp, so the log-prob costs no extra pass when sampling at temperature 1 without
    filters.
    """

    BLOCK = 256

    def __init__(self, temperature: float, top_p: float, top_k: int, generator):
        self.temperature, self.top_p, self.top_k, self.generator = temperature, top_p, top_k, generator
        self.buf: torch.Tensor | None = None

    def _buffer(self, z: torch.Tensor) -> torch.Tensor:
        """(b, n_blocks * BLOCK) buffer; columns from V on stay zero (padding of the last block)."""
        b, V = z.shape
        width = -(-V // self.BLOCK) * self.BLOCK
        buf = self.buf
        if buf is None or buf.shape[0] < b or buf.shape[1] != width or buf.dtype != z.dtype or buf.device != z.device:
            buf = self.buf = torch.zeros((b, width), dtype=z.dtype, device=z.device)
        return buf[:b]

    def __call__(self, logits: torch.Tensor, want_logp: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(b, V) raw logits -> (b,) token ids, (b,) log-softmax(logits) at those ids (or None)."""
        if self.temperature == 0:
            tok = logits.argmax(-1)
            return tok, (_token_logprob(logits, tok) if want_logp else None)
        z = _filtered(logits, self.temperature, self.top_p, self.top_k)
        b, V = z.shape
        m = z.amax(-1, keepdim=True)  # (b, 1), finite: the top token is never filtered out
        buf = self._buffer(z)
        torch.sub(z, m, out=buf[:, :V]).exp_()  # weights in (0, 1], 0 for filtered tokens
        blocks = buf.view(b, -1, self.BLOCK)  # (b, nb, BLOCK)
        cum = blocks.sum(-1).double().cumsum_(-1)  # (b, nb); block sums have relative error ~1e-7
        total = cum[:, -1:]  # (b, 1) >= 1 (the max contributes exp(0))
        zero = torch.zeros_like(total)
        u = torch.rand((b, 1), generator=self.generator, device=z.device, dtype=torch.float64)
        # First block / token whose cumulative weight exceeds the target (right=True): a token of
        # weight 0 can never be that first one. The target is kept strictly below the total.
        target = torch.minimum(u * total, total.nextafter(zero))
        blk = torch.searchsorted(cum, target, right=True)  # (b, 1)
        before = torch.where(blk > 0, cum.gather(-1, (blk - 1).clamp_(min=0)), zero)
        inner = blocks.gather(1, blk[:, :, None].expand(b, 1, self.BLOCK)).squeeze(1).cumsum(-1, dtype=torch.float64)
        rest = torch.minimum(target - before, inner[:, -1:].nextafter(zero[:, :1]))
        tok = (blk * self.BLOCK + torch.searchsorted(inner, rest, right=True)).squeeze(-1)  # (b,)
        if not want_logp:
            return tok, None
        if z is logits:  # log pi = z - max - log(sum exp(z - max)), the log-softmax formula
            lse = m.squeeze(-1) + total.squeeze(-1).log().to(logits.dtype)
            return tok, logits.gather(-1, tok[:, None]).squeeze(-1) - lse
        return tok, _token_logprob(logits, tok)


def _token_logprob(logits: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    """(b, V), (b,) -> (b,) log-softmax(logits) at tok, without materialising the (b, V) result."""
    return logits.gather(-1, tok[:, None]).squeeze(-1) - logits.logsumexp(-1)


@contextlib.contextmanager
def _packed_linears(model, rows: int, steps: int):
    """Temporarily run every float32 CPU `nn.Linear` of `model` with oneDNN and a pre-packed weight.

    A decode step multiplies a few rows by every weight matrix. torch's default CPU kernel (MKL
    sgemm) re-packs the weight at each call, and at 16 rows that dominates: on the 2-core AMD
    machine of the benchmark it moves weights at ~2 GB/s where a plain read reaches ~10. Packing
    once for oneDNN (what torch.compile's weight freezing does) makes the linear layers ~1.7x
    faster. Packing the 135M default model takes ~0.35 s and as much memory as its weights, for
    the duration of the call, so it is skipped for short calls (`steps` forwards) and when memory
    is short. Only the matrix-multiply kernel changes, not the layers: results differ from the MKL
    path by float32 rounding (~1e-5 on log-probs, like any change of batch shape).
    Modules that already carry an instance-level `forward` (accelerate hooks) are left alone.
    """
    ops = getattr(torch.ops, "mkldnn", None)
    usable = (PACK_CPU_LINEARS and steps >= 8 and torch.backends.mkldnn.is_available()
              and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")
              and not torch.is_autocast_enabled("cpu"))
    linears = []
    if usable:
        linears = [m for m in model.modules()
                   if type(m) is torch.nn.Linear and "forward" not in m.__dict__
                   and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"]
        weights = {id(m.weight): m.weight for m in linears}  # tied weights count once
        if sum(w.numel() * 4 for w in weights.values()) > _available_memory() // 2:
            linears = []
    patched = []
    try:
        packed: dict[int, torch.Tensor] = {}
        for m in linears:
            if id(m.weight) not in packed:
                packed[id(m.weight)] = ops._reorder_linear_weight(m.weight.detach(), max(rows, 1))
            m.forward = functools.partial(_packed_linear_forward, m, packed[id(m.weight)])
            patched.append(m)
    except (RuntimeError, NotImplementedError):  # a build without these kernels: keep MKL
        for m in patched:
            m.__dict__.pop("forward", None)
        patched = []
    try:
        yield
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)


def _available_memory() -> int:
    """Bytes of memory available (Linux MemAvailable); 8 GiB if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def _packed_linear_forward(module: torch.nn.Linear, packed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32 or x.device.type != "cpu":
        return torch.nn.functional.linear(x, module.weight, module.bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, module.bias, "none", [], "")


def _response_mask(resp: torch.Tensor, eos_ids: torch.Tensor) -> torch.Tensor:
    """(B, R) 1 up to and including the first EOS, 0 after."""
    is_eos = torch.isin(resp, eos_ids).long()
    before = is_eos.cumsum(-1) - is_eos  # number of EOS strictly before each position
    return (before == 0).long()


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _accepts_logits_to_keep(model) -> bool:
    """True if the (possibly peft-wrapped) model's forward takes `logits_to_keep` (transformers >= 4.50)."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(m.forward).parameters
    except (TypeError, ValueError):
        return False


def _clone(exp: Experience) -> Experience:
    from dataclasses import replace

    return replace(exp, **{k: v.clone() for k, v in exp._tensor_items()})
