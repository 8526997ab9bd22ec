"""Rollout backends (`rollout.backend`): rlhfkit's engine and plain transformers `generate` give the
same greedy tokens and log-probs, valid sampled rollouts, and both drive PPO and GRPO."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from pg_utils import base_config, read_metrics, write_prompts
from transformers import GenerationConfig

from rlhfkit.config import ConfigError, RolloutSection, load_config
from rlhfkit.models import position_ids_from_mask, tiny_causal_lm
from rlhfkit.rollout import (
    BACKENDS,
    HFGenerate,
    OwnEngine,
    RolloutBackend,
    load_prompt_items,
    make_backend,
    rollout,
)
from rlhfkit.trainers.grpo import GRPOConfig, train_grpo
from rlhfkit.trainers.ppo import PPOConfig, train_ppo


@pytest.fixture(scope="module")
def policy_and_items(tokenizer, tmp_path_factory):
    work = tmp_path_factory.mktemp("backends")
    policy = tiny_causal_lm(tokenizer, seed=0)
    # large random weights: every token depends on the context (see tests/test_rollout.py)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "embed" in name else 0.2))
    items, _ = load_prompt_items(str(write_prompts(work / "prompts.jsonl", n=6)), tokenizer, max_prompt_length=128)
    return policy, items


def _fresh_logprobs(model, exp, temperature: float = 1.0) -> torch.Tensor:
    """(B, R) log softmax(logits / temperature) of the response tokens from one forward over prompt + response."""
    ids, mask = exp.input_ids(), exp.attention_mask()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    P = exp.prompt_ids.shape[1]
    lp = (logits[:, P - 1:-1] / temperature).log_softmax(-1).gather(-1, exp.response_ids[..., None]).squeeze(-1)
    return lp.masked_fill(exp.response_mask == 0, 0.0)


def _assert_valid(exp, items, n, max_new_tokens, eos_id):
    assert len(exp) == len(items) * n and exp.response_ids.shape[1] <= max_new_tokens
    assert exp.prompt_index.tolist() == [i for i in range(len(items)) for _ in range(n)]
    for row, item in zip(range(len(exp)), [it for it in items for _ in range(n)]):
        plen = int(exp.prompt_mask[row].sum())
        assert exp.prompt_ids[row, -plen:].tolist() == item.ids  # left-padded prompt
        length = int(exp.response_mask[row].sum())
        tokens = exp.response_ids[row].tolist()
        assert exp.response_mask[row, :length].all() and not exp.response_mask[row, length:].any()
        assert bool(exp.eos[row]) == (eos_id in tokens[:length])  # the mask ends at the first EOS
        if exp.eos[row]:
            assert tokens.index(eos_id) == length - 1


def test_both_backends_implement_the_protocol_and_unknown_names_fail():
    assert set(BACKENDS) == {"own", "hf"}
    assert isinstance(make_backend("own"), OwnEngine) and isinstance(make_backend("hf"), HFGenerate)
    assert all(isinstance(make_backend(name), RolloutBackend) for name in BACKENDS)
    with pytest.raises(ValueError, match="rollout.backend"):
        make_backend("vllm")
    with pytest.raises(RuntimeError, match="sync_weights"):
        make_backend("hf").generate([[1, 2]], RolloutSection(), eos_token_id=2, pad_token_id=0)
    with pytest.raises(ConfigError, match="rollout.backend"):
        load_config(GRPOConfig, data={"rollout": {"backend": "vllm"}})


def test_greedy_tokens_and_logprobs_are_the_same_from_both_backends(policy_and_items, tokenizer):
    policy, items = policy_and_items
    settings = RolloutSection(n=2, max_new_tokens=12, temperature=0.0, micro_batch_size=5)
    # the tiny policy never says EOS: make a token that some rows write (and others do not) the EOS
    free = rollout(policy, items, settings, tokenizer).response_ids
    eos = next(t for t in free.unique().tolist() if 0 < int((free == t).any(-1).sum()) < len(free))
    tok = SimpleNamespace(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    own = rollout(policy, items, dataclasses.replace(settings, backend="own"), tok, seed=3)
    # a hub model's generation_config must not change what the rollout settings ask for
    saved = policy.generation_config
    policy.generation_config = GenerationConfig(repetition_penalty=5.0, no_repeat_ngram_size=1, min_new_tokens=8)
    try:
        hf = rollout(policy, items, dataclasses.replace(settings, backend="hf"), tok, seed=3)
        assert policy.generation_config.repetition_penalty == 5.0  # restored
    finally:
        policy.generation_config = saved
    assert 0 < int(own.eos.sum()) < len(own)  # some rows stop at EOS, others run to the budget
    for field in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "eos", "prompt_index"):
        assert torch.equal(getattr(own, field), getattr(hf, field)), field
    torch.testing.assert_close(hf.logprobs, own.logprobs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["own", "hf"])
def test_sampled_rollouts_are_valid_seeded_and_carry_tempered_logprobs(policy_and_items, tokenizer, name):
    """Both backends store log softmax(logits / T) before the top-k / top-p filters, and say T."""
    policy, items = policy_and_items
    settings = RolloutSection(n=3, max_new_tokens=10, temperature=0.7, top_k=20, top_p=0.95, backend=name)
    a = rollout(policy, items, settings, tokenizer, seed=11)
    b = rollout(policy, items, settings, tokenizer, seed=11)
    c = rollout(policy, items, settings, tokenizer, seed=12)
    _assert_valid(a, items, 3, 10, tokenizer.eos_token_id)
    assert torch.equal(a.response_ids, b.response_ids) and not torch.equal(a.response_ids, c.response_ids)
    assert a.temperature == 0.7
    torch.testing.assert_close(a.logprobs, _fresh_logprobs(policy, a, 0.7), rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["ppo", "grpo"])
def test_policy_gradient_trainers_run_on_the_hf_backend(tokenizer, tmp_path, monkeypatch, kind):
    calls = []
    real = HFGenerate.generate

    def spy(self, prompt_ids, settings, **kw):
        exp = real(self, prompt_ids, settings, **kw)
        calls.append(exp)
        return exp

    monkeypatch.setattr(HFGenerate, "generate", spy)
    over = dict(rollout={"n": 4, "max_new_tokens": 6, "backend": "hf"}, mini_batch_size=16, train={"max_steps": 2})
    if kind == "ppo":
        cfg = load_config(PPOConfig, data=base_config(tmp_path, tokenizer, **over, critic_init="policy"))
        train_ppo(cfg)
    else:
        cfg = load_config(GRPOConfig, data=base_config(tmp_path, tokenizer, **over, kl_coef=0.04))
        train_grpo(cfg)
    assert len(calls) == 2 and all(len(exp) == 8 * 4 for exp in calls)
    rows = [r for r in read_metrics(tmp_path / "run") if "policy/ratio_first" in r]
    assert len(rows) == 2
    for r in rows:  # the update's first forward reproduces the backend's log-probs
        assert abs(r["policy/ratio_first"] - 1.0) < 1e-6
        assert r["rollout/logprob_diff_max"] < 1e-4
        assert 1 <= r["response/length_mean"] <= 6


def test_cache_internals_are_used_only_on_the_transformers_versions_they_were_written_for(
        policy_and_items, tokenizer, monkeypatch, caplog):
    """Outside kv_cache.TESTED the engine keeps transformers' plain cache: same tokens, a warning."""
    from rlhfkit.rollout import kv_cache

    policy, items = policy_and_items
    settings = RolloutSection(n=2, max_new_tokens=6, temperature=0.0)
    kv_cache.check_transformers.cache_clear()
    assert kv_cache.check_transformers()
    fast = rollout(policy, items, settings, tokenizer)
    built = []

    class Counted(kv_cache.PreallocatedLayer):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(kv_cache, "PreallocatedLayer", Counted)
    monkeypatch.setattr(kv_cache.transformers, "__version__", f"{kv_cache.TESTED[1].major}.0.0")
    kv_cache.check_transformers.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="rlhfkit"):
            plain = rollout(policy, items, settings, tokenizer)
        assert not built and "outside the versions" in caplog.text
    finally:
        kv_cache.check_transformers.cache_clear()
    assert torch.equal(fast.response_ids, plain.response_ids)
