"""Batched sampling with a KV cache, producing an `Experience`.

Our own loop instead of `model.generate` because RLHF needs things `generate` does not give
cheaply and exactly:
- log pi(a_t) of each sampled token under the tempered distribution it was drawn from (before
  top-k / top-p), from the same forward pass that chose it (no second scoring pass);
- position ids that count only real tokens under left padding, so a padded row produces exactly
  what the same prompt produces alone, and exactly what a training forward pass recomputes
  (`position_ids_from_mask`), which is what makes PPO's first ratio 1;
- a fixed record layout (left-padded prompts, right-padded responses, masks that include EOS).

Speed on CPU: the prompt is prefilled in one pass with logits for the last position only
(`logits_to_keep=1`: the LM head over every prompt position is wasted work); each decode step is
one forward of a (B, 1) batch; all per-step bookkeeping is vectorised over rows; the attention
mask is allocated once and sliced; identical prompts and the prefix common to all prompts are
prefilled once (`_prefill`); rows that finished are dropped from the batch. The weights are
prepared once per call (`decode_weights`): for a plain or peft-LoRA Llama in float32,
`llama_decode.LlamaDecoder` runs the prefill and every decode step itself, with q/k/v fused, LoRA
merged in, the products packed for oneDNN (or, at most 8 rows, through `cpu_gemv` where a timed
trial finds it faster), the small operations in numba kernels (`cpu_step`), and no per-step
transformers machinery (1.36-1.41x faster per decode step than the model's forward at batch 8
and 16, docs/benchmarks.md); any other model runs its
own forward with its float32 linear layers packed for the call (`cpu_linears.packed_linears`,
~1.7x faster than torch's default kernel at a few rows). The KV cache is written in place into
buffers sized for the whole response (`kv_cache`) instead of being re-concatenated per layer per
token; and sampling plus the token's log-prob take a few passes over the logits, without (B, V)
allocations (`sampler.Sampler`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import replace

import torch

from rlhfkit.models.forward import accepts_logits_to_keep
from rlhfkit.models.heads import position_ids_from_mask
from rlhfkit.models.segments import windowed
from rlhfkit.rollout.cpu_linears import packed_linears
from rlhfkit.rollout.experience import Experience, common_prefix_len
from rlhfkit.rollout.kv_cache import new_cache, preallocate
from rlhfkit.rollout.llama_decode import LlamaDecoder
from rlhfkit.rollout.sampler import Sampler


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
    return_logprobs: store log pi(a_t) at the sampling temperature (see `Experience.logprobs`).

    Returns an Experience on the model's device with B = len(prompt_ids) * n rows.
    """
    _check(prompt_ids, eos_token_id, temperature, top_p, top_k, n)
    device = model_device(model)
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
        with torch.inference_mode(), decode_weights(model, min(mbs, len(rows)), n_forwards) as decoder:
            parts = [_sample_rows(model, rows[start:start + mbs], prompt_index[start:start + mbs], eos_ids=eos_ids,
                                  pad_token_id=pad_token_id, temperature=temperature, decoder=decoder,
                                  max_new_tokens=max_new_tokens, top_p=top_p, top_k=top_k, generator=generator,
                                  return_logprobs=return_logprobs)
                     for start in range(0, len(rows), mbs)]
    finally:
        model.train(was_training)
    # Tensors made under inference_mode cannot be saved for backward or modified in place; copy
    # them into normal tensors so trainers may use them freely (cat outside inference_mode copies).
    return Experience.cat(parts) if len(parts) > 1 else _clone(parts[0])


def _sample_rows(model, rows: list[list[int]], prompt_index: torch.Tensor, *, eos_ids: torch.Tensor, pad_token_id: int,
                 temperature: float, **sampling) -> Experience:
    """One micro-batch of `generate`: its rows' responses as an Experience (prompts left-padded)."""
    resp, logp, eos = _sample(model, rows, eos_ids=eos_ids, pad_token_id=pad_token_id, temperature=temperature,
                              **sampling)
    ids, mask = left_pad(rows, pad_token_id, eos_ids.device)
    return Experience(prompt_ids=ids, prompt_mask=mask, response_ids=resp, response_mask=response_mask(resp, eos_ids),
                      logprobs=logp, eos=eos, prompt_index=prompt_index, pad_token_id=pad_token_id,
                      temperature=temperature or 1.0)


def _check(prompt_ids, eos_token_id, temperature: float, top_p: float, top_k: int, n: int) -> None:
    if len(prompt_ids) == 0:
        raise ValueError("generate needs at least one prompt")
    if eos_token_id is None:
        raise ValueError("eos_token_id is None: pass the tokenizer's end-of-turn id(s), or [] for none")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("empty prompt: every prompt needs at least one token")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or n < 1:
        raise ValueError(f"bad sampling settings: temperature={temperature} top_p={top_p} top_k={top_k} n={n}")


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


@contextlib.contextmanager
def decode_weights(model, rows: int, steps: int):
    """Prepare the weights once for a call of `steps` decode forwards of up to `rows` rows: a
    `LlamaDecoder` (fused, packed, LoRA merged) when the model is one it runs, yielded; otherwise
    the model's own linear layers packed for the call (`packed_linears`), and None yielded."""
    decoder = LlamaDecoder.build(model, rows) if steps >= 8 else None
    if decoder is not None:
        yield decoder
    else:
        with packed_linears(model, rows, steps):
            yield None


def _sample(model, rows, *, max_new_tokens, eos_ids, pad_token_id, temperature, top_p, top_k,
            generator, return_logprobs, decoder=None):
    """The decode loop for one micro-batch: B prompts -> (B, R) tokens, (B, R) logprobs, (B,) eos."""
    B, device = len(rows), eos_ids.device
    tokens = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    if max_new_tokens == 0:
        no_eos = torch.zeros(B, dtype=torch.bool, device=device)
        return tokens, (torch.zeros(B, 0, device=device) if return_logprobs else None), no_eos

    keep = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    # (B, V) logits, a cache with room for every response token, (B, K) mask
    logits, cache, mask = _prefill(model, rows, pad_token_id, device, keep, extra=max_new_tokens, decoder=decoder)
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
    decoder = decoder if decoder is not None and decoder.accepts(cache) else None
    sampler = Sampler(temperature, top_p, top_k, generator)
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
        logits = decode_step(model, decoder, tok, attn[:, :K + t + 1], next_pos + t, cache, keep)  # (b, V)
    tokens = tokens[:, :steps]
    done = torch.isin(tokens, eos_ids).any(-1)
    return tokens, (logps[:, :steps] if logps is not None else None), done


def decode_step(model, decoder, tok, mask, position, cache, keep) -> torch.Tensor:
    """One decode forward: (b,) tokens, (b, ctx) mask, (b, 1) positions -> next-token logits (b, V)."""
    if decoder is not None:
        return decoder.step(tok, position, mask, cache)
    out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=position,
                past_key_values=cache, use_cache=True, **keep)
    return _upcast(out.logits[:, -1])


def _prefill(model, rows, pad_token_id, device, keep, extra=0, decoder=None):
    """Run the prompts through the model once, sharing work between rows.

    Two savings, both exact up to float rounding (attention sees the same keys at the same
    positions, only stored in a different order):
    - identical prompts (the n samples of a prompt) are computed once and the cache rows copied;
    - the longest prefix common to all prompts (the chat template's system turn) is computed once.
    The cache then holds [common prefix | left-padded suffixes], so the returned mask (B, K) has
    the layout [1..1 | 0..0 1..1], not the left-padded layout of `Experience.prompt_ids`;
    positions come from the mask either way.
    Returns next-token logits (B, V) (at least float32), the cache, and that mask. The cache's
    full-attention layers get room for `extra` more tokens (`kv_cache.preallocate`).
    """
    uniq: dict[tuple[int, ...], int] = {}
    row_to_u = torch.tensor([uniq.setdefault(tuple(r), len(uniq)) for r in rows], device=device)
    prompts = list(uniq)  # insertion order = index
    U = len(prompts)
    cache = new_cache(model.config)
    can_copy = hasattr(cache, "batch_select_indices")
    # every row keeps >= 1 suffix token for its logits; a sliding window counts the cache's columns,
    # so a windowed model's rows hold their whole prompts
    L = common_prefix_len(prompts) if can_copy and not windowed(model) else 0
    if L > 0:
        _prefill_forward(model, decoder, torch.tensor([prompts[0][:L]], device=device), None,
                         torch.arange(L, device=device)[None], cache, keep)
        cache.batch_select_indices(torch.zeros(U, dtype=torch.long, device=device))
    if not can_copy:  # caches without row selection: no deduplication either
        prompts, row_to_u, U = [list(r) for r in rows], torch.arange(len(rows), device=device), len(rows)
    ids, smask = left_pad([p[L:] for p in prompts], pad_token_id, device)  # (U, S)
    mask = torch.cat([smask.new_ones(U, L), smask], dim=1)  # (U, L+S)
    logits = _prefill_forward(model, decoder, ids, mask, position_ids_from_mask(mask)[:, L:], cache, keep)  # (U, V)
    select = None
    if U != len(rows):
        select = row_to_u
        logits, mask = logits[row_to_u], mask[row_to_u]
    preallocate(cache, select, extra)
    return logits, cache, mask


def _prefill_forward(model, decoder, ids, mask, position, cache, keep) -> torch.Tensor:
    """(b, S) prompt tokens after what `cache` holds -> next-token logits (b, V) of the last one."""
    if decoder is not None:
        return decoder.prefill(ids, position, mask, cache)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=cache, use_cache=True,
                **keep)
    return _upcast(out.logits[:, -1])


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits -> float32 (log-softmax in bf16 loses ~2 digits); float32/64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def response_mask(resp: torch.Tensor, eos_ids: torch.Tensor) -> torch.Tensor:
    """(B, R) 1 up to and including the first EOS, 0 after."""
    is_eos = torch.isin(resp, eos_ids).long()
    before = is_eos.cumsum(-1) - is_eos  # number of EOS strictly before each position
    return (before == 0).long()


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _clone(exp: Experience) -> Experience:
    return replace(exp, **{k: v.clone() for k, v in exp._tensor_items()})
