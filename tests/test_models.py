"""Model loading, saving and scalar heads."""

from __future__ import annotations

import json

import pytest
import torch

from rlhfkit.models import (
    last_token_index,
    load_causal_lm,
    load_scalar_model,
    pooled_features,
    position_ids_from_mask,
    resolve_model_path,
    reward_pooling,
    save_pretrained_atomic,
    sequence_scores,
    set_reward_pooling,
    tiny_causal_lm,
    token_values,
)
from rlhfkit.models.heads import pool_mask


def test_default_tokenizer_has_distinct_pad(tokenizer):
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_template


def test_position_ids_and_last_index():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 1, 2, 3, 4]]
    assert last_token_index(mask).tolist() == [4, 2, 4]


def test_resolve_paths(tmp_path, monkeypatch):
    from rlhfkit import hub

    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_path(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_model_path(str(tmp_path / "missing" / "dir"))
    with pytest.raises(FileNotFoundError, match="GGUF"):
        resolve_model_path(str(tmp_path / "x.gguf"))
    # a hub id not in the cache is passed through unchanged for from_pretrained to download, when
    # the hub can be reached; without a network it is refused at once (tests/test_errors.py)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub, "reachable", lambda url, timeout=3.0: True)
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    monkeypatch.setattr(hub, "reachable", lambda url, timeout=3.0: False)
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


def _tiny_rm(tokenizer, seed=0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    rm = LlamaForSequenceClassification(config).eval()
    with torch.no_grad():
        rm.score.weight.normal_()  # HF's init is tiny; a visible head makes the poolings differ clearly
    return rm


def test_pool_mask_by_hand():
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]])  # left- and right-padded rows
    resp = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])  # the last padding position is not real: ignored
    assert pool_mask(mask, None, "last").tolist() == [[0, 0, 0, 1], [0, 0, 1, 0]]
    assert pool_mask(mask, resp, "mean").tolist() == [[0, 0, 0.5, 0.5], [0, 0.5, 0.5, 0]]
    third = 1 / 3
    torch.testing.assert_close(pool_mask(mask, None, "mean_all"),
                               torch.tensor([[0, third, third, third], [third, third, third, 0]]))
    with pytest.raises(ValueError, match="response_mask"):
        pool_mask(mask, None, "mean")
    with pytest.raises(ValueError, match="no token"):
        pool_mask(mask, torch.zeros_like(mask), "mean")
    with pytest.raises(ValueError, match="pooling must be one of"):
        pool_mask(mask, resp, "max")


def test_sequence_scores_poolings_against_a_naive_loop(tokenizer):
    """Each pooling equals averaging token_values over its positions one row at a time, is the
    same for left and right padding, and commutes with the linear head (pooled_features)."""
    rm = _tiny_rm(tokenizer)
    pad = tokenizer.pad_token_id
    rows = [([5, 6, 7], [8, 9, 2]), ([11, 12], [13, 2]), ([3, 4, 5, 6], [7, 8, 9, 10, 2])]  # (prompt, reply)
    T = max(len(p) + len(r) for p, r in rows)
    batches = {}
    for side in ("right", "left"):
        ids, mask, resp = [], [], []
        for p, r in rows:
            n = T - len(p) - len(r)
            row, m, rm_ = p + r, [1] * (len(p) + len(r)), [0] * len(p) + [1] * len(r)
            ids.append(row + [pad] * n if side == "right" else [pad] * n + row)
            mask.append(m + [0] * n if side == "right" else [0] * n + m)
            resp.append(rm_ + [0] * n if side == "right" else [0] * n + rm_)
        batches[side] = tuple(torch.tensor(x) for x in (ids, mask, resp))
    for pooling in ("last", "mean", "mean_all"):
        ids, mask, resp = batches["right"]
        got = sequence_scores(rm, ids, mask, pooling, resp)
        want = []
        for p, r in rows:  # naive: one unpadded row at a time
            one = torch.tensor([p + r])
            v = token_values(rm, one, torch.ones_like(one))[0]
            want.append({"last": v[-1], "mean": v[len(p):].mean(), "mean_all": v.mean()}[pooling])
        torch.testing.assert_close(got, torch.stack(want), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sequence_scores(rm, *batches["left"][:2], pooling, batches["left"][2]), got,
                                   atol=1e-5, rtol=1e-5)
        _, h = token_values(rm, ids, mask, with_features=True)  # (B, T, H)
        via_features = rm.score(pooled_features(h, mask, pooling, resp)).squeeze(-1)
        torch.testing.assert_close(via_features, got, atol=1e-5, rtol=1e-5)
    ids, mask, resp = batches["right"]
    assert not torch.allclose(sequence_scores(rm, ids, mask, "mean", resp), sequence_scores(rm, ids, mask, "last"))


def test_pooling_is_stored_in_config_json_and_used_by_rm_scoring(tokenizer, tmp_path):
    """set_reward_pooling writes config.json's reward_pooling; a reloaded model and an rm:DIR
    scorer pool that way without being told; models without the key pool at the last token."""
    from rlhfkit.data import PreferenceExample, tokenize_preference
    from rlhfkit.judges.rewards import build_reward_fn

    rm = _tiny_rm(tokenizer)
    assert reward_pooling(rm) == "last"
    set_reward_pooling(rm, "mean")
    save_pretrained_atomic(rm, tokenizer, tmp_path / "rm")
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["reward_pooling"] == "mean"
    assert reward_pooling(load_scalar_model(tmp_path / "rm")) == "mean"

    msgs = [[{"role": "user", "content": "Say something nice."}], [{"role": "user", "content": "Hi"}]]
    replies = ["You are great!", "Hello there, friend. How are you?"]
    got = build_reward_fn(f"rm:{tmp_path / 'rm'}", batch_size=2)(["a", "b"], replies, messages=msgs)
    for m, reply, score in zip(msgs, replies, got):
        f = tokenize_preference(tokenizer, PreferenceExample(m, reply, "x"), 512)
        ids = torch.tensor([f["prompt_ids"] + f["chosen_ids"]])
        resp = torch.tensor([[0] * len(f["prompt_ids"]) + [1] * len(f["chosen_ids"])])
        with torch.no_grad():
            mean = sequence_scores(rm, ids, torch.ones_like(ids), "mean", resp).item()
            last = sequence_scores(rm, ids, torch.ones_like(ids), "last").item()
        assert score == pytest.approx(mean, abs=1e-5) and abs(mean - last) > 1e-3

    with pytest.raises(ValueError, match="pooling must be one of"):
        set_reward_pooling(rm, "max")
    rm.config.reward_pooling = "max"
    with pytest.raises(ValueError, match="reward_pooling='max'"):
        reward_pooling(rm)


def test_stored_reward_pooling_reads_config_json_and_falls_back_to_last(tmp_path):
    from rlhfkit.models.heads import stored_reward_pooling

    for name, config in [("mean", {"reward_pooling": "mean"}), ("odd", {"reward_pooling": "max"}), ("none", {})]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    assert stored_reward_pooling(tmp_path / "mean") == "mean"
    assert stored_reward_pooling(tmp_path / "odd") == "last"  # not a pooling: never passed on
    assert stored_reward_pooling(tmp_path / "none") == "last"
    assert stored_reward_pooling(tmp_path / "missing") == "last"
    (tmp_path / "adapter").mkdir()  # a LoRA adapter directory: its base's pooling
    base = {"base_model_name_or_path": str(tmp_path / "mean")}
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(base))
    assert stored_reward_pooling(tmp_path / "adapter") == "mean"


def test_freeze_lower_layers_and_keep_lower_layers_by_layer_count():
    from transformers import LlamaConfig, LlamaForSequenceClassification, Qwen2Config, Qwen2ForSequenceClassification

    from rlhfkit.models.heads import freeze_lower_layers, keep_lower_layers

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=0)

    def trained(n):
        names = freeze_lower_layers(LlamaForSequenceClassification(config), n)
        assert "score.weight" in names and "model.norm.weight" in names and not any("embed" in k for k in names)
        return sorted({int(k.split(".")[2]) for k in names if k.startswith("model.layers.")})

    assert trained(1) == [2] and trained(2) == [1, 2] and trained(3) == [0, 1, 2]  # all of them: only embeddings frozen
    with pytest.raises(ValueError, match="top 4 layers of a 3-layer model"):
        trained(4)
    # Qwen2's config lists an attention kind per layer: cut with the layers
    model = Qwen2ForSequenceClassification(Qwen2Config(**config.to_diff_dict()))
    assert keep_lower_layers(model, 3) == 3 and len(model.model.layers) == 3  # the whole depth: a no-op
    assert keep_lower_layers(model, 2) == 3 and len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
    assert model.config.layer_types == ["full_attention"] * 2
    with pytest.raises(ValueError, match="backbone_layers: 3, but the model has 2"):
        keep_lower_layers(model, 3)


def test_evaluate_sft_is_the_token_mean_of_the_summed_nll(monkeypatch):
    import math

    import rlhfkit.trainers.sft as sft_mod
    from rlhfkit.parallel import SingleProcess

    # every micro-batch: summed NLL 6 over 4 labelled tokens
    monkeypatch.setattr(sft_mod, "sft_batch_loss", lambda *args: (None, torch.tensor(6.0), torch.tensor(4)))
    examples = [{"i": i} for i in range(3)]
    out = sft_mod.evaluate_sft(torch.nn.Linear(1, 1), examples, lambda chunk: {}, 2, SingleProcess())
    assert out == {"eval/loss": 1.5, "eval/ppl": pytest.approx(math.exp(1.5)), "eval/tokens": 8}  # 2 micro-batches


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


def test_labelled_logprobs_equal_the_full_forward_at_the_labelled_tokens(tokenizer):
    """The LM head on the labelled positions only gives causal_logprobs' values there, in row-major
    order, with the same gradient; a batch with no labelled token gives an empty tensor."""
    from rlhfkit.models.forward import causal_logprobs, labelled_logprobs

    model = tiny_causal_lm(tokenizer)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, 6:] = 0  # right padding
    labelled = torch.zeros(3, 8, dtype=torch.bool)
    labelled[0, 4:] = True
    labelled[1, 2:7] = True
    labelled[2, 1:5] = True
    full = causal_logprobs(model, ids, mask)
    got = labelled_logprobs(model, ids, mask, labelled)
    torch.testing.assert_close(got, full[labelled], atol=1e-6, rtol=1e-6)
    (ga,) = torch.autograd.grad(got.sum(), model.lm_head.weight)
    (gb,) = torch.autograd.grad(causal_logprobs(model, ids, mask)[labelled].sum(), model.lm_head.weight)
    torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-5)
    assert labelled_logprobs(model, ids, mask, torch.zeros_like(labelled)).shape == (0,)


def test_a_pad_token_apart_from_eos_where_the_vocabulary_has_one(caplog):
    """Llama/Mistral vocabularies have <unk> but no pad: pad with it, not with the eos a last-pooled
    reward model is read at; with no spare token, pad = eos and a warning says what that means."""
    from rlhfkit.models.loading import _prepare_tokenizer

    class Tok:
        name_or_path, eos_token, pad_token = "llama-like", "</s>", None

        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

        @property
        def eos_token_id(self):
            return self.vocab[self.eos_token]

        @property
        def pad_token_id(self):
            return None if self.pad_token is None else self.vocab[self.pad_token]

    with caplog.at_level("WARNING", logger="rlhfkit"):
        assert _prepare_tokenizer(Tok({"<unk>": 0, "<s>": 1, "</s>": 2})).pad_token == "<unk>"
        assert "pad = eos" not in caplog.text
        assert _prepare_tokenizer(Tok({"<s>": 1, "</s>": 2})).pad_token == "</s>"
    assert "llama-like: no spare token to pad with, so pad = eos ('</s>')" in caplog.text
