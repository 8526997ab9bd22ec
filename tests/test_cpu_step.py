"""The decode step's fused small operations (`rollout.cpu_step`): the RMS norms and the rotary +
cache append + attention kernel against torch written out naively, masked cache positions not
mattering, the cache growing when it runs out, and the lean decoder using them (and not, when
switched off) with the same logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from decode_utils import context_dependent

from rlhfkit.models import tiny_causal_lm
from rlhfkit.rollout import cpu_gemv, cpu_step, generate, llama_decode
from rlhfkit.rollout.kv_cache import PreallocatedLayer

pytestmark = pytest.mark.skipif(not cpu_step.available(), reason="numba is not installed")
MIN = torch.finfo(torch.float32).min


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 9), h=st.integers(1, 130), seed=st.integers(0, 2**16))
def test_rms_norm_and_the_residual_add_equal_torch(b, h, seed):
    g = torch.Generator().manual_seed(seed)
    x, d, w = torch.randn(b, h, generator=g) * 3, torch.randn(b, h, generator=g), torch.randn(h, generator=g)
    torch.testing.assert_close(cpu_step.rms_norm(x, w, 1e-5), F.rms_norm(x, (h,), w, 1e-5), atol=1e-5, rtol=1e-5)
    stream = x.clone()
    out = cpu_step.add_rms_norm(stream, d, w, 1e-6)
    assert torch.equal(stream, x + d)  # the residual stream is updated in place
    torch.testing.assert_close(out, F.rms_norm(x + d, (h,), w, 1e-6), atol=1e-5, rtol=1e-5)


def _rotate(x, cos, sin):
    """transformers' rotary: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def _reference(qkv, cos, sin, keys, values, mask, scale, nh, nkv, hd):
    """Naive attention of one new token per row: rotate, append, softmax over the unmasked positions."""
    b = qkv.shape[0]
    q = _rotate(qkv[:, :nh * hd].view(b, nh, hd), cos[:, None], sin[:, None])
    k = _rotate(qkv[:, nh * hd:(nh + nkv) * hd].view(b, nkv, hd), cos[:, None], sin[:, None])
    v = qkv[:, (nh + nkv) * hd:].view(b, nkv, hd)
    keys, values = torch.cat([keys, k[:, :, None]], 2), torch.cat([values, v[:, :, None]], 2)
    out = torch.empty(b, nh, hd)
    for i in range(b):
        for head in range(nh):
            kv = head // (nh // nkv)
            live = mask[i].bool()
            s = (keys[i, kv, live] @ q[i, head]) * scale
            out[i, head] = s.softmax(0) @ values[i, kv, live]
    return out.view(b, nh * hd), keys, values


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 5), nkv=st.integers(1, 3), g=st.integers(1, 3), half=st.integers(1, 8),
       n=st.integers(0, 9), room=st.integers(1, 3), seed=st.integers(0, 2**16))
@example(b=2, nkv=2, g=3, half=4, n=5, room=1, seed=0)  # the cache's last free position
@example(b=1, nkv=1, g=1, half=1, n=0, room=1, seed=1)  # an empty cache: the token attends to itself
def test_attend_equals_naive_attention_and_masked_positions_do_not_matter(b, nkv, g, half, n, room, seed):
    gen = torch.Generator().manual_seed(seed)
    nh, hd = nkv * g, 2 * half
    qkv = torch.randn(b, (nh + 2 * nkv) * hd, generator=gen)
    ang = torch.rand(b, hd, generator=gen) * 6
    cos, sin = ang.cos(), ang.sin()
    signed = sin * torch.cat([-torch.ones(half), torch.ones(half)])  # the decoder's roll form
    keys, values = torch.randn(b, nkv, n, hd, generator=gen), torch.randn(b, nkv, n, hd, generator=gen)
    mask = torch.ones(b, n + 1)
    mask[:, :n] = (torch.rand(b, n, generator=gen) > 0.4).float()  # padding; the new token always counts
    layer = PreallocatedLayer(keys.clone(), values.clone(), room)
    hidden = mask[:, :n] == 0
    layer._kbuf[:, :, :n][hidden[:, None, :, None].expand(b, nkv, n, hd)] = 1e4  # what masking must hide
    layer._vbuf[:, :, :n][hidden[:, None, :, None].expand(b, nkv, n, hd)] = -1e4
    bias = torch.zeros(b, n + 1).masked_fill_(mask == 0, MIN)
    out = cpu_step.attend(qkv, cos, signed, layer, bias, 0.3, (nh, nkv, hd))
    ref, ref_keys, ref_values = _reference(qkv, cos, sin, keys, values, mask, 0.3, nh, nkv, hd)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert layer.get_seq_length() == n + 1
    torch.testing.assert_close(layer.keys[:, :, n], ref_keys[:, :, n], atol=1e-6, rtol=1e-6)
    assert torch.equal(layer.values[:, :, n], ref_values[:, :, n])


def test_attend_on_numba_threads_gives_the_same_result():
    """On more than one thread the rows are split across numba's threads, each row computed as on one."""
    gen = torch.Generator().manual_seed(3)
    b, nh, nkv, hd, n = 5, 6, 2, 8, 7
    qkv, ang = torch.randn(b, (nh + 2 * nkv) * hd, generator=gen), torch.rand(b, hd, generator=gen)
    keys, values = torch.randn(b, nkv, n, hd, generator=gen), torch.randn(b, nkv, n, hd, generator=gen)
    bias = torch.zeros(b, n + 1).masked_fill_(torch.rand(b, n + 1, generator=gen) > 0.7, MIN)
    bias[:, -1] = 0
    outs = []
    try:
        for threads in (1, 2):
            cpu_gemv.set_threads(threads)
            layer = PreallocatedLayer(keys.clone(), values.clone(), 2)
            outs.append((cpu_step.attend(qkv, ang.cos(), ang.sin(), layer, bias, 0.5, (nh, nkv, hd)), layer.keys))
    finally:
        cpu_gemv.set_threads(1)
    # the parallel version compiles each row's code for strided slices: the same sums, maybe reassociated
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-6, rtol=1e-5)


def test_attend_grows_a_full_cache():
    """Past the planned capacity the cache grows (by doubling) and keeps what it held."""
    b, nkv, hd = 2, 1, 4
    keys, values = torch.randn(b, nkv, 3, hd), torch.randn(b, nkv, 3, hd)
    layer = PreallocatedLayer(keys.clone(), values.clone(), 1)
    for step in range(3):
        n = layer.get_seq_length()
        bias = torch.zeros(b, n + 1)
        cpu_step.attend(torch.randn(b, 3 * hd), torch.ones(b, hd), torch.zeros(b, hd), layer, bias, 1.0, (1, 1, hd))
    assert layer.get_seq_length() == 6 and layer._kbuf.shape[-2] >= 6
    assert torch.equal(layer.keys[:, :, :3], keys) and torch.equal(layer.values[:, :, :3], values)


def test_the_lean_decoder_fuses_its_step_and_matches_the_unfused_one(tokenizer, monkeypatch):
    """Sampled rollouts (left padding, rows of different lengths) with the fused step and with
    ``RLHFKIT_DECODE_FUSED=0``: the fused step runs only in the first, and the tokens and
    log-probs agree."""
    model = context_dependent(tiny_causal_lm(tokenizer, seed=0))
    prompts = [tokenizer.encode(t) for t in ["Hello there, how", "Hi", "Tell me a very long story about a cat"]]
    runs, used = {}, []
    real = llama_decode.LlamaDecoder._fused_step
    monkeypatch.setattr(llama_decode.LlamaDecoder, "_fused_step", lambda self, *a: used.append(1) or real(self, *a))
    for fused in ("1", "0"):
        monkeypatch.setenv("RLHFKIT_DECODE_FUSED", fused)
        used.clear()
        torch.manual_seed(0)
        runs[fused] = generate(model, prompts, max_new_tokens=10, eos_token_id=[], pad_token_id=0, temperature=1.0)
        assert bool(used) == (fused == "1")
    assert torch.equal(runs["1"].response_ids, runs["0"].response_ids)
    torch.testing.assert_close(runs["1"].logprobs, runs["0"].logprobs, atol=1e-4, rtol=0)
