"""Model loading, saving and scalar heads."""

from __future__ import annotations

import json

import pytest
import torch

from rlhfkit.models import (
    last_token_index, load_causal_lm, load_scalar_model, position_ids_from_mask, resolve_model_path,
    save_pretrained_atomic, sequence_scores, tiny_causal_lm, token_values,
)


def test_default_tokenizer_has_distinct_pad(tokenizer):
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_template


def test_position_ids_and_last_index():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 1, 2, 3, 4]]
    assert last_token_index(mask).tolist() == [4, 2, 4]


def test_resolve_paths(tmp_path, monkeypatch):
    from rlhfkit.models import loading

    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_path(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_model_path(str(tmp_path / "missing" / "dir"))
    with pytest.raises(FileNotFoundError, match="GGUF"):
        resolve_model_path(str(tmp_path / "x.gguf"))
    # a hub id not in the cache is passed through unchanged for from_pretrained to download, when
    # the hub can be reached; without a network it is refused at once (tests/test_errors.py)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(loading, "_reachable", lambda url, timeout=3.0: True)
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    monkeypatch.setattr(loading, "_reachable", lambda url, timeout=3.0: False)
    with pytest.raises(FileNotFoundError, match="cannot be reached"):
        resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_saved_policy_and_reward_model_load_with_auto_classes(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    policy = tiny_causal_lm(tokenizer)
    save_pretrained_atomic(policy, tokenizer, tmp_path / "policy")
    assert not list(tmp_path.glob(".policy.tmp-*"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    ids = torch.tensor([[1, 5, 9, 13]])
    torch.testing.assert_close(policy(ids).logits, reloaded(ids).logits)

    rm = load_scalar_model(tmp_path / "policy", pad_token_id=tokenizer.pad_token_id)
    assert rm.score.weight.abs().max() < 1.0  # small fresh head
    save_pretrained_atomic(rm, tokenizer, tmp_path / "rm")
    cfg = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert cfg["architectures"][0].endswith("ForSequenceClassification")
    auto = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    ours = load_scalar_model(tmp_path / "rm")
    # the trained head is kept (not re-initialised) and HF's own pooling agrees with ours
    torch.testing.assert_close(ours.score.weight, rm.score.weight)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                                         return_tensors="pt", return_dict=True)
    ids, mask = text["input_ids"], text["attention_mask"]
    torch.testing.assert_close(auto(input_ids=ids, attention_mask=mask).logits.squeeze(-1),
                               sequence_scores(ours, ids, mask), atol=1e-5, rtol=1e-5)


def test_sequence_score_ignores_padding_side(tokenizer):
    policy = tiny_causal_lm(tokenizer)
    from transformers import LlamaForSequenceClassification

    cfg = policy.config
    cfg.num_labels = 1
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(cfg).eval()
    a, b = [5, 6, 7, 8, 2], [9, 10, 2]
    pad = tokenizer.pad_token_id
    right = torch.tensor([a, b + [pad, pad]])
    rmask = torch.tensor([[1] * 5, [1] * 3 + [0, 0]])
    left = torch.tensor([a, [pad, pad] + b])
    lmask = torch.tensor([[1] * 5, [0, 0] + [1] * 3])
    torch.testing.assert_close(sequence_scores(rm, right, rmask), sequence_scores(rm, left, lmask), atol=1e-5, rtol=1e-5)
    v = token_values(rm, right, rmask)
    assert v.shape == (2, 5)


def test_atomic_save_keeps_previous_on_failure(tokenizer, tmp_path):
    policy = tiny_causal_lm(tokenizer)
    save_pretrained_atomic(policy, tokenizer, tmp_path / "m")
    before = sorted(p.name for p in (tmp_path / "m").iterdir())

    class Boom(RuntimeError):
        pass

    def fail(*a, **k):
        raise Boom("disk full")

    policy.save_pretrained = fail
    with pytest.raises(Boom):
        save_pretrained_atomic(policy, tokenizer, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.")]


@pytest.mark.e2e
def test_default_model_loads_and_generates(tokenizer):
    model = load_causal_lm("smollm2-135m-instruct")
    assert model.config.num_hidden_layers == 30 and model.dtype == torch.float32
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(text.strip()) > 0


@pytest.mark.e2e
def test_default_model_rollout_logprobs_match_training_forward(tokenizer):
    """On the real model: left-padded rollout log-probs equal the training forward (PPO ratio 1)."""
    from rlhfkit.data import render_prompt_ids
    from rlhfkit.models.forward import causal_logprobs
    from rlhfkit.rollout import generate

    model = load_causal_lm("smollm2-135m-instruct")
    prompts = [render_prompt_ids(tokenizer, [{"role": "user", "content": t}])
               for t in ("Hi.", "Describe a sunny afternoon at the beach in one sentence.")]
    exp = generate(model, prompts, max_new_tokens=8, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id, temperature=1.0, seed=0)
    with torch.no_grad():
        logp = causal_logprobs(model, exp.input_ids(), exp.attention_mask(), keep_last=exp.response_ids.shape[1])
    m = exp.response_mask.bool()
    ratio = torch.exp(logp[m] - exp.logprobs[m])
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-4)
