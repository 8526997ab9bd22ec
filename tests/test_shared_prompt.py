"""Prompt sharing: G responses to one prompt scored as one packed sequence must give the same
log-probs (and gradients) as scoring each [prompt; response] row on its own."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.models.forward import causal_logprobs
from rlhfkit.models.packing import pack_shared_prompts, shared_prompt_logprobs


def _batch(tokenizer, seed=0, groups=3, G=4, R=7):
    """Left-padded prompts of different lengths, G right-padded responses each (some shorter than R)."""
    gen = torch.Generator().manual_seed(seed)
    pad = tokenizer.pad_token_id
    plens = [5, 9, 3][:groups]
    P = max(plens)
    prompt_ids = torch.full((groups * G, P), pad)
    prompt_mask = torch.zeros((groups * G, P), dtype=torch.long)
    response_ids = torch.full((groups * G, R), pad)
    response_mask = torch.zeros((groups * G, R), dtype=torch.long)
    for g, p in enumerate(plens):
        prompt = torch.randint(10, 5000, (p,), generator=gen)
        for j in range(G):
            b = g * G + j
            prompt_ids[b, P - p:] = prompt
            prompt_mask[b, P - p:] = 1
            n = int(torch.randint(1, R + 1, (1,), generator=gen))
            response_ids[b, :n] = torch.randint(10, 5000, (n,), generator=gen)
            response_mask[b, :n] = 1
    index = torch.arange(groups).repeat_interleave(G)
    return prompt_ids, prompt_mask, response_ids, response_mask, index


def _unpacked(model, pi, pm, ri, rm, with_entropy=False):
    R = ri.shape[1]
    out = causal_logprobs(model, torch.cat([pi, ri], 1), torch.cat([pm, rm], 1), keep_last=R,
                          with_entropy=with_entropy)
    if with_entropy:
        return out[0] * rm, out[1] * rm
    return out * rm


def test_packed_logprobs_match_unpacked_rows(tiny_model, tokenizer):
    tiny_model.eval()
    pi, pm, ri, rm, idx = _batch(tokenizer)
    with torch.no_grad():
        ref_lp, ref_ent = _unpacked(tiny_model, pi, pm, ri, rm, with_entropy=True)
        lp, ent = shared_prompt_logprobs(tiny_model, pi, pm, ri, rm, idx, tokenizer.pad_token_id,
                                         with_entropy=True)
    assert lp.shape == ref_lp.shape
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent * rm, atol=1e-5, rtol=1e-5)
    assert (lp[rm == 0] == 0).all()


def test_packed_logprobs_ignore_pad_values_and_row_order(tiny_model, tokenizer):
    """Values in masked positions do not matter; rows of a group need not be contiguous."""
    tiny_model.eval()
    pi, pm, ri, rm, idx = _batch(tokenizer, seed=1)
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        lp = shared_prompt_logprobs(tiny_model, pi, pm, ri, rm, idx, pad)
        ri2 = ri.masked_fill(rm == 0, 777)
        pi2 = pi.masked_fill(pm == 0, 555)
        torch.testing.assert_close(shared_prompt_logprobs(tiny_model, pi2, pm, ri2, rm, idx, pad), lp,
                                   atol=1e-6, rtol=0)
        perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(0))
        lp_perm = shared_prompt_logprobs(tiny_model, pi[perm], pm[perm], ri[perm], rm[perm], idx[perm], pad)
    torch.testing.assert_close(lp_perm, lp[perm], atol=1e-5, rtol=1e-5)


def test_packed_gradients_match_unpacked(tiny_model, tokenizer):
    pi, pm, ri, rm, idx = _batch(tokenizer, seed=2, groups=2, G=3)
    w = torch.randn(ri.shape, generator=torch.Generator().manual_seed(3))

    def grads(fn):
        tiny_model.zero_grad()
        (fn() * w).sum().backward()
        return [p.grad.clone() for p in tiny_model.parameters() if p.grad is not None]

    a = grads(lambda: _unpacked(tiny_model, pi, pm, ri, rm))
    b = grads(lambda: shared_prompt_logprobs(tiny_model, pi, pm, ri, rm, idx, tokenizer.pad_token_id))
    assert len(a) == len(b) > 0
    for ga, gb in zip(a, b):
        torch.testing.assert_close(gb, ga, atol=1e-5, rtol=1e-4)


def test_pack_layout_counts_prompt_once(tokenizer):
    pi, pm, ri, rm, idx = _batch(tokenizer, groups=3, G=4)
    packed = pack_shared_prompts(pi, pm, ri, rm, idx, tokenizer.pad_token_id)
    K, L = packed["input_ids"].shape
    assert K == 3
    real = [int(pm[g * 4].sum() + rm[g * 4:(g + 1) * 4].sum()) for g in range(3)]
    assert L == max(real)
    assert packed["target"].numel() == int(rm.sum())
    # a response never sees another response of its group
    allowed = packed["allowed"][0, 0]
    p, n1 = int(pm[0].sum()), int(rm[0].sum())
    assert allowed[p + n1, :p].all() and not allowed[p + n1, p:p + n1].any()


def test_pack_rejects_rows_whose_prompts_differ(tokenizer):
    pi, pm, ri, rm, idx = _batch(tokenizer, groups=2, G=2)
    idx = torch.zeros_like(idx)  # claim all rows share prompt 0
    with pytest.raises(ValueError, match="share prompt_index"):
        pack_shared_prompts(pi, pm, ri, rm, idx, tokenizer.pad_token_id)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_logprobs_through_lora_and_with_adapters_disabled(tokenizer, checkpointing):
    """The LM-head pre-hook finds the head through a peft wrapper; the reference (adapters off)
    and the policy (adapters on) both match their unpacked rows, with and without checkpointing."""
    from rlhfkit.config import LoraSection
    from rlhfkit.models import tiny_causal_lm
    from rlhfkit.models.lora import (
        adapters_disabled,
        apply_lora,
        enable_gradient_checkpointing,
    )

    model = tiny_causal_lm(tokenizer, seed=0)
    if checkpointing:
        enable_gradient_checkpointing(model)
    model = apply_lora(model, LoraSection(enabled=True, r=4, alpha=8), "CAUSAL_LM").train()
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pi, pm, ri, rm, idx = _batch(tokenizer, seed=4, groups=2, G=3)
    pad = tokenizer.pad_token_id
    on = shared_prompt_logprobs(model, pi, pm, ri, rm, idx, pad)
    torch.testing.assert_close(on, _unpacked(model, pi, pm, ri, rm), atol=1e-5, rtol=1e-5)
    on.sum().backward()  # gradients reach the adapters through the hooked head
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n and p.requires_grad)
    with torch.no_grad(), adapters_disabled(model):
        off = shared_prompt_logprobs(model, pi, pm, ri, rm, idx, pad)
        torch.testing.assert_close(off, _unpacked(model, pi, pm, ri, rm), atol=1e-5, rtol=1e-5)
    assert (off - on.detach()).abs().max() > 1e-3  # the adapters matter, so both checks mean something
