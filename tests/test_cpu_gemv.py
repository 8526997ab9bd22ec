"""The decode step's few-row product (`rollout.cpu_gemv`): equal to ``x @ w.T`` up to float32
rounding at every row count it takes and any shape, and chosen by the lean decoder exactly when a
call decodes at most 8 rows."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from rlhfkit.models import tiny_causal_lm
from rlhfkit.rollout import cpu_gemv, generate, llama_decode

pytestmark = pytest.mark.skipif(not cpu_gemv.available(), reason="numba is not installed")


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, cpu_gemv.ROWS), out=st.integers(1, 200), inner=st.integers(1, 160),
       seed=st.integers(0, 2**16))
@example(rows=cpu_gemv.ROWS, out=33, inner=17, seed=0)  # every accumulator of the 8-row kernel in use
@example(rows=4, out=33, inner=17, seed=0)  # and of the 4-row kernel
@example(rows=1, out=1, inner=1, seed=1)
def test_equals_the_matrix_product(rows, out, inner, seed):
    g = torch.Generator().manual_seed(seed)
    w, x = torch.randn(out, inner, generator=g), torch.randn(rows, inner, generator=g)
    y = cpu_gemv.GemvLinear(w)(x)
    assert y.shape == (rows, out) and y.dtype == torch.float32
    ref = (x.double() @ w.double().T).float()
    torch.testing.assert_close(y, ref, atol=1e-5 * inner ** 0.5, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [1, 4, 5, 8])
def test_on_the_calling_thread_and_across_numba_threads(rows, threads):
    """One thread runs the kernel on the calling thread; more split the output rows in blocks
    (here 70 rows: blocks of 3, the last one short)."""
    g = torch.Generator().manual_seed(rows)
    w, x = torch.randn(70, 40, generator=g), torch.randn(rows, 40, generator=g)
    try:
        cpu_gemv.set_threads(threads)
        torch.testing.assert_close(cpu_gemv.GemvLinear(w)(x), x @ w.T, atol=1e-5, rtol=1e-5)
    finally:
        cpu_gemv.set_threads(1)


def test_strided_inputs_and_weights():
    """A transposed weight and a column slice of a wider input (the decoder's views) give the same."""
    g = torch.Generator().manual_seed(0)
    w_t = torch.randn(48, 96, generator=g).T  # (96, 48), not contiguous
    x_wide = torch.randn(5, 100, generator=g)
    x = x_wide[:, 2:50]  # (5, 48), row stride 100
    torch.testing.assert_close(cpu_gemv.GemvLinear(w_t)(x), x @ w_t.T, atol=1e-5, rtol=1e-5)


def test_refuses_more_rows_than_it_holds():
    with pytest.raises(ValueError, match="at most 8 rows"):
        cpu_gemv.GemvLinear(torch.randn(4, 4))(torch.randn(cpu_gemv.ROWS + 1, 4))


def test_decoder_uses_it_for_calls_of_at_most_8_rows(tokenizer, monkeypatch):
    m = tiny_causal_lm(tokenizer, seed=0).eval()
    with torch.inference_mode():
        small, large = llama_decode.LlamaDecoder.build(m, 8), llama_decode.LlamaDecoder.build(m, 9)
    assert small.head.gemv is not None and all(lin.gemv is not None for lin in small.layers[0][1:3])
    assert large.head.gemv is None and not any(lin.gemv is not None for lin in large.layers[0][1:3])
    monkeypatch.setenv("RLHFKIT_DECODE_GEMV", "0")
    assert not cpu_gemv.available()
    with torch.inference_mode():
        assert llama_decode.LlamaDecoder.build(m, 8).head.gemv is None
    monkeypatch.delenv("RLHFKIT_DECODE_GEMV")
    monkeypatch.setattr(cpu_gemv, "numba", None)  # a build without numba decodes through oneDNN
    assert not cpu_gemv.available()
    with torch.inference_mode():
        assert llama_decode.LlamaDecoder.build(m, 8).head.gemv is None


def test_rollout_tokens_and_logprobs_match_the_onednn_path(tokenizer, monkeypatch):
    """8 rows decoded greedily with the kernel and without it: the same tokens, and log-probs equal
    up to float32 rounding."""
    g = torch.Generator().manual_seed(0)
    m = tiny_causal_lm(tokenizer, seed=0).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    prompts = [tokenizer.encode(t) for t in ["Hello there, how", "Hi", "Tell me a story about a cat", "Why"]]
    kw = {"n": 2, "max_new_tokens": 12, "eos_token_id": [], "pad_token_id": 0, "temperature": 0}
    calls = []
    real = cpu_gemv.GemvLinear.__call__
    monkeypatch.setattr(cpu_gemv.GemvLinear, "__call__", lambda self, x: calls.append(1) or real(self, x))
    with_gemv = generate(m, prompts, **kw)
    assert calls, "the kernel did not run"
    monkeypatch.setenv("RLHFKIT_DECODE_GEMV", "0")
    calls.clear()
    without = generate(m, prompts, **kw)
    assert not calls
    assert torch.equal(with_gemv.response_ids, without.response_ids)
    torch.testing.assert_close(with_gemv.logprobs, without.logprobs, atol=1e-4, rtol=0)
