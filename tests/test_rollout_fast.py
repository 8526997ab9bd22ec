"""The lean Llama decode step (`rollout.llama_decode`) against the model's own forward: the same
greedy tokens and log-probs up to float32 rounding, with left padding, EOS stopping and row
dropping, with and without a peft LoRA adapter; and the models it must decline."""

from __future__ import annotations

import pytest
import torch
from decode_utils import context_dependent

from rlhfkit.models import position_ids_from_mask, tiny_causal_lm
from rlhfkit.rollout import engine, generate, llama_decode

PAD = 0
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def model(tokenizer):
    return context_dependent(tiny_causal_lm(tokenizer, seed=0))


@pytest.fixture(scope="module")
def lora_model(tokenizer):
    from peft import LoraConfig, get_peft_model

    base = context_dependent(tiny_causal_lm(tokenizer, seed=1))
    # random B (not peft's zeros) so the adapter changes the outputs
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False, lora_dropout=0.1)
    return get_peft_model(base, cfg).eval()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    texts = ["Hello there, how", "Hello there, what is the capital of", "Hi", "Tell me a very long story about a cat"]
    return [tokenizer.encode(t) for t in texts]


def _both(monkeypatch, model, prompts, **kw):
    """(lean, model forward) Experiences of the same call."""
    kw = {"max_new_tokens": 12, "eos_token_id": [], "pad_token_id": PAD, "temperature": 0, **kw}
    used = []
    real = llama_decode.LlamaDecoder.step
    monkeypatch.setattr(llama_decode.LlamaDecoder, "step", lambda self, *a: used.append(1) or real(self, *a))
    lean = generate(model, prompts, **kw)
    assert used, "the lean decoder did not run"
    monkeypatch.setattr(llama_decode, "LEAN_DECODE", False)
    used.clear()
    ref = generate(model, prompts, **kw)
    assert not used
    monkeypatch.setattr(llama_decode, "LEAN_DECODE", True)
    return lean, ref


def _assert_same(lean, ref):
    assert torch.equal(lean.response_ids, ref.response_ids)
    assert torch.equal(lean.response_mask, ref.response_mask) and torch.equal(lean.eos, ref.eos)
    torch.testing.assert_close(lean.logprobs, ref.logprobs, atol=1e-4, rtol=0)


def _fresh_logprobs(model, exp):
    ids, mask = exp.input_ids(), exp.attention_mask()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    P = exp.prompt_ids.shape[1]
    lp = logits[:, P - 1:-1].log_softmax(-1).gather(-1, exp.response_ids[..., None]).squeeze(-1)
    return lp.masked_fill(exp.response_mask == 0, 0.0)


@pytest.mark.parametrize("which", ["plain", "lora"])
def test_greedy_tokens_and_logprobs_equal_the_model_forward(which, model, lora_model, prompts, monkeypatch):
    m = model if which == "plain" else lora_model
    lean, ref = _both(monkeypatch, m, prompts, n=2)  # left padding, duplicate prompts
    _assert_same(lean, ref)
    torch.testing.assert_close(lean.logprobs, _fresh_logprobs(m, lean), atol=1e-4, rtol=0)


@pytest.mark.parametrize("which", ["plain", "lora"])
def test_eos_stopping_and_row_dropping_equal_the_model_forward(which, model, lora_model, prompts, monkeypatch):
    m = model if which == "plain" else lora_model
    free = generate(m, prompts, max_new_tokens=12, eos_token_id=[], pad_token_id=PAD, temperature=0)
    eos = [int(free.response_ids[0, 2]), int(free.response_ids[1, 5])]  # rows stop at different steps
    lean, ref = _both(monkeypatch, m, prompts, n=3, eos_token_id=eos)
    assert lean.eos.any() and not lean.eos.all()
    _assert_same(lean, ref)
    # sampled: a uniform near a token boundary may pick differently from logits equal up to
    # rounding, so the check is against a fresh forward over what was sampled
    free = generate(m, prompts, n=3, max_new_tokens=12, eos_token_id=[], pad_token_id=PAD, temperature=1.0, seed=5)
    eos = sorted({int(x) for x in free.response_ids[:, 1:6].flatten()})[:8]
    lean, _ = _both(monkeypatch, m, prompts, n=3, eos_token_id=eos, temperature=1.0, seed=5)
    torch.testing.assert_close(lean.logprobs, _fresh_logprobs(m, lean), atol=1e-4, rtol=0)
    lengths = lean.response_lengths()
    assert len(set(lengths.tolist())) > 1
    for i, k in enumerate(lengths.tolist()):
        assert bool(lean.eos[i]) == (int(lean.response_ids[i, k - 1]) in eos)


def test_lora_adapter_is_merged_and_a_disabled_adapter_is_not(lora_model, model, prompts, monkeypatch):
    with lora_model.disable_adapter():
        lean, ref = _both(monkeypatch, lora_model, prompts)
    _assert_same(lean, ref)
    with_adapter = generate(lora_model, prompts, max_new_tokens=12, eos_token_id=[], pad_token_id=PAD, temperature=0)
    assert not torch.allclose(with_adapter.logprobs, lean.logprobs)  # the adapter does change the outputs


def test_declines_models_it_would_not_run_exactly(model, lora_model):
    with torch.inference_mode():
        assert llama_decode.LlamaDecoder.build(model, 4) is not None
        assert llama_decode.LlamaDecoder.build(lora_model, 4) is not None
        handle = model.model.layers[0].mlp.register_forward_hook(lambda *a: None)
        try:
            assert llama_decode.LlamaDecoder.build(model, 4) is None  # a hook would be skipped
        finally:
            handle.remove()
        assert llama_decode.LlamaDecoder.build(model.double(), 4) is None  # float32 only
        model.float()
        model.train()
        try:
            assert llama_decode.LlamaDecoder.build(model, 4) is None
        finally:
            model.eval()


def test_short_calls_and_fallback_keep_the_model_forward(model, prompts, monkeypatch):
    """Fewer than 8 forwards: no packing, the model's forward; the same outputs either way."""
    with engine.decode_weights(model, 4, 4) as decoder:
        assert decoder is None
    monkeypatch.setattr(llama_decode, "LEAN_DECODE", False)
    with torch.inference_mode(), engine.decode_weights(model, 4, 40) as decoder:
        assert decoder is None


@pytest.mark.parametrize("which", ["plain", "lora"])
def test_prefill_of_a_shared_prefix_equals_the_model_forward(which, model, lora_model, tokenizer, monkeypatch):
    """A prefix common to every prompt is prefilled once, then the left-padded suffixes after it."""
    m = model if which == "plain" else lora_model
    prefix = tokenizer.encode("You are a helpful assistant. Answer briefly.")
    prompts = [prefix + tokenizer.encode(t) for t in ["Hi", "What is the capital of France", "Tell me a story"]]
    lean, ref = _both(monkeypatch, m, prompts, n=2)
    _assert_same(lean, ref)
    torch.testing.assert_close(lean.logprobs, _fresh_logprobs(m, lean), atol=1e-4, rtol=0)


def test_prefill_runs_the_products_on_real_tokens_only(model, prompts, monkeypatch):
    """Left-padded prompts of different lengths: the prefill's products skip the padding, and the
    tokens and log-probs equal a prefill that runs every position."""
    seen = []
    real = llama_decode._real_tokens
    monkeypatch.setattr(llama_decode, "_real_tokens", lambda *a: seen.append(out := real(*a)) or out)
    kw = {"max_new_tokens": 8, "eos_token_id": [], "pad_token_id": PAD, "temperature": 1.0, "seed": 3}
    compact = generate(model, prompts, **kw)
    keep = seen[-1][0]
    assert keep is not None and 0 < len(keep) < len(prompts) * max(map(len, prompts))  # padding was skipped
    monkeypatch.setattr(llama_decode, "_real_tokens", lambda mask, b, S: (None, torch.arange(b) * S + S - 1))
    full = generate(model, prompts, **kw)
    assert torch.equal(compact.response_ids, full.response_ids)
    torch.testing.assert_close(compact.logprobs, full.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(compact.logprobs, _fresh_logprobs(model, compact), atol=1e-4, rtol=0)


def test_gradient_checkpointing_input_hook_does_not_turn_the_lean_path_off(tokenizer):
    from rlhfkit.models.lora import enable_gradient_checkpointing

    m = tiny_causal_lm(tokenizer, seed=2)
    enable_gradient_checkpointing(m)
    m.eval()
    with torch.inference_mode():
        assert llama_decode.LlamaDecoder.build(m, 4) is not None
