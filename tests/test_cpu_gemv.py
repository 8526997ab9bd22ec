"""The decode step's few-row product (`rollout.cpu_gemv`): equal to ``x @ w.T`` up to float32
rounding at every row count it takes and any shape; used by the lean decoder only for calls of at
most 8 rows, always with RLHFKIT_DECODE_GEMV=1, never with 0, and unset when a timed trial on the
model's own matrices finds it faster than oneDNN."""

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
    monkeypatch.setenv("RLHFKIT_DECODE_GEMV", "1")
    m = tiny_causal_lm(tokenizer, seed=0).eval()
    with torch.inference_mode():
        small, large = llama_decode.LlamaDecoder.build(m, 8), llama_decode.LlamaDecoder.build(m, 9)
    assert small.head.gemv is not None and all(lin.gemv is not None for lin in small.layers[0][1:3])
    assert large.head.gemv is None and not any(lin.gemv is not None for lin in large.layers[0][1:3])
    monkeypatch.setenv("RLHFKIT_DECODE_GEMV", "0")
    assert not cpu_gemv.available()
    with torch.inference_mode():
        assert llama_decode.LlamaDecoder.build(m, 8).head.gemv is None
    monkeypatch.setenv("RLHFKIT_DECODE_GEMV", "1")
    monkeypatch.setattr(cpu_gemv, "numba", None)  # a build without numba decodes through oneDNN
    assert not cpu_gemv.available()
    with torch.inference_mode():
        assert llama_decode.LlamaDecoder.build(m, 8).head.gemv is None


@pytest.mark.skipif(not llama_decode._mkldnn_ok(), reason="no oneDNN packing to time against")
def test_unset_the_decoder_times_both_kernels_once_and_keeps_the_faster(tokenizer, monkeypatch):
    """Without RLHFKIT_DECODE_GEMV the first decoder of a row count times the two kernels on its
    own matrices (a real trial), later ones reuse the result; the 4- and 8-row variants have
    their own trial."""
    monkeypatch.delenv("RLHFKIT_DECODE_GEMV", raising=False)
    monkeypatch.setattr(llama_decode, "TRIALS", {})
    m = tiny_causal_lm(tokenizer, seed=0).eval()
    real, timed = llama_decode._time_both, []
    monkeypatch.setattr(llama_decode, "_time_both", lambda rows, ws: timed.append((rows, len(ws))) or real(rows, ws))
    rng = torch.get_rng_state()
    with torch.inference_mode():
        first = llama_decode.LlamaDecoder.build(m, 8)
    assert torch.equal(torch.get_rng_state(), rng)  # the trial leaves the random stream as it was
    with torch.inference_mode():
        llama_decode.LlamaDecoder.build(m, 6)
        llama_decode.LlamaDecoder.build(m, 3)
    layers = m.config.num_hidden_layers
    assert timed == [(8, 5 * layers + 1), (4, 5 * layers + 1)]  # qkv, o, gate, up, down per layer; the head
    (key8, (gemv_s, onednn_s)), _ = llama_decode.TRIALS.items()
    assert key8[0] == 8 and gemv_s > 0 and onednn_s > 0
    assert (first.head.gemv is not None) == (gemv_s < onednn_s)
    choices = llama_decode.decode_choices()  # what the trainers' results record
    assert choices["RLHFKIT_DECODE_GEMV"] == "auto"
    assert choices[f"rows 8, threads {key8[1]}"]["kernel"] == ("few-row kernel" if gemv_s < onednn_s else "oneDNN")
    for times, used in (((1.0, 2.0), True), ((2.0, 1.0), False)):  # the faster one is used
        monkeypatch.setattr(llama_decode, "TRIALS", {k: times for k in llama_decode.TRIALS})
        with torch.inference_mode():
            dec = llama_decode.LlamaDecoder.build(m, 8)
        assert (dec.head.gemv is not None) == used and dec.head.packed != used
    assert len(timed) == 2


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
    monkeypatch.setenv("RLHFKIT_DECODE_GEMV", "1")
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
