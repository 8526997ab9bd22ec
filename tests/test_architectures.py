"""Architectures other than the default Llama: their log-probs, dropout and layer lists.

- Sliding-window attention (Mistral, Phi-3, Gemma2, Qwen2 with use_sliding_window) takes no
  shared-prefix or packed path: the window counts cache columns, so a prefix computed once, or a
  second response packed after the first, would see other keys than in its own row. Every
  log-prob path must equal a plain forward of each row alone.
- Dropout (GPT-2's modules, OPT's functional rates) is off in policy-gradient and DPO training, so
  PPO's first ratio is exactly 1 and the first KL 0.
- A reward model's backbone is cut or frozen whatever its layer list is called (GPT-2's h, OPT's
  decoder.layers).
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def windowed_model(tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=8, initializer_range=0.25,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    config._attn_implementation = "sdpa"
    return MistralForCausalLM(config).eval()


def _chat(tokenizer, text: str) -> list[int]:
    from rlhfkit.data import render_prompt_ids

    return render_prompt_ids(tokenizer, [{"role": "user", "content": text}])


def _plain(model, exp) -> torch.Tensor:
    """(B, R) log-probs of the responses, each row alone with no padding."""
    out = torch.zeros_like(exp.logprobs)
    with torch.no_grad():
        for r in range(len(exp)):
            p = exp.prompt_ids[r][exp.prompt_mask[r].bool()]
            n = int(exp.response_mask[r].sum())
            resp = exp.response_ids[r][:n]
            lp = model(torch.cat([p, resp])[None]).logits.float().log_softmax(-1)[0, len(p) - 1:-1]
            out[r, :n] = lp.gather(-1, resp[:, None])[:, 0]
    return out


def test_windowed_is_told_apart(windowed_model, tiny_model):
    from transformers import Gemma2Config, Qwen2Config

    from rlhfkit.models.segments import windowed

    assert windowed(windowed_model) and not windowed(tiny_model)

    class Holder(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.config = config

    qwen = Qwen2Config(sliding_window=8, use_sliding_window=False)
    qwen._attn_implementation = "sdpa"
    assert not windowed(Holder(qwen))
    gemma = Gemma2Config(num_hidden_layers=2)
    gemma._attn_implementation = "sdpa"
    assert windowed(Holder(gemma))


def test_every_logprob_path_of_a_windowed_model_equals_each_row_alone(windowed_model, tokenizer):
    """The rollout's own log-probs, the scoring forward with the rows' shared system turn, and the
    packed share_prompt path, on prompts + responses longer than the window."""
    from rlhfkit.models.forward import causal_logprobs
    from rlhfkit.rollout import generate
    from rlhfkit.rollout.experience import common_prefix_len
    from rlhfkit.trainers.pg_score import policy_logprobs

    prompts = [_chat(tokenizer, t) for t in ("Write a short note about the sea.", "Hi",
                                              "Describe a quiet morning in a small town.")]
    exp = generate(windowed_model, prompts, n=2, max_new_tokens=12, eos_token_id=[], seed=1, temperature=1.0,
                   pad_token_id=tokenizer.pad_token_id)
    exp.shared_prefix = common_prefix_len([prompts[i] for i in exp.prompt_index.tolist()])
    exp.pad_token_id = tokenizer.pad_token_id
    assert exp.shared_prefix > 8 and exp.response_mask.sum(1).min() == 12  # past the window
    ref, m = _plain(windowed_model, exp), exp.response_mask.bool()
    torch.testing.assert_close(exp.logprobs[m], ref[m], atol=1e-4, rtol=0)
    with torch.no_grad():
        shared = causal_logprobs(windowed_model, exp.input_ids(), exp.attention_mask(),
                                 keep_last=exp.response_ids.shape[1], shared_prefix=exp.shared_prefix)
        packed = policy_logprobs(windowed_model, exp, share_prompt=True)
    torch.testing.assert_close(shared[m], ref[m], atol=1e-4, rtol=0)
    torch.testing.assert_close(packed[m], ref[m], atol=1e-4, rtol=0)


def test_dpo_pairs_of_a_windowed_model_score_as_their_own_rows(windowed_model, tokenizer):
    from rlhfkit.data import PreferenceCollator, tokenize_preference
    from rlhfkit.data.formats import PreferenceExample
    from rlhfkit.trainers.dpo_logps import pair_logps

    ex = [PreferenceExample([{"role": "user", "content": "Tell me about the weather today please."}],
                            "It is sunny and warm with a light breeze from the west.", "Rain.")]
    feats = [tokenize_preference(tokenizer, e, 256) for e in ex]
    with torch.no_grad():
        packed = pair_logps(windowed_model, PreferenceCollator(tokenizer.pad_token_id, share_prompt=True)(feats))
        rows = pair_logps(windowed_model, PreferenceCollator(tokenizer.pad_token_id, share_prompt=False)(feats))
    torch.testing.assert_close(torch.stack(packed), torch.stack(rows), atol=1e-4, rtol=0)


def _tiny(kind: str, tokenizer, dropout: float = 0.1):
    from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                                          resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout))
    return OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=256,
                                    dropout=dropout, attention_dropout=dropout, pad_token_id=tokenizer.pad_token_id))


@pytest.mark.parametrize("kind", ["gpt2", "opt"])
def test_disable_dropout_makes_train_mode_deterministic(kind, tokenizer):
    """GPT-2 drops through nn.Dropout modules, OPT through the float rates its layers read."""
    from rlhfkit.models.lora import disable_dropout, has_dropout
    from rlhfkit.trainers.pg_update import fusable

    model = _tiny(kind, tokenizer).train()
    ids = torch.tensor([tokenizer.encode("a few words to read")])
    assert has_dropout(model) and not fusable(1, 8, 8, model)
    assert not torch.equal(model(ids).logits, model(ids).logits)
    disable_dropout(model)
    assert not has_dropout(model) and fusable(1, 8, 8, model)
    torch.testing.assert_close(model(ids).logits, model.eval()(ids).logits, atol=0, rtol=0)
    assert model.config.to_dict()["dropout" if kind == "opt" else "resid_pdrop"] == 0.1  # the saved config keeps it


@pytest.mark.parametrize("kind", ["gpt2", "opt"])
def test_grpo_on_a_model_with_dropout_starts_at_ratio_one_and_kl_zero(kind, tokenizer, tmp_path):
    import json

    from rlhfkit.cli import main

    model = tmp_path / kind
    _tiny(kind, tokenizer).save_pretrained(model)
    tokenizer.save_pretrained(model)
    out = tmp_path / "run"
    assert main(["grpo", f"model.name={model}", "prompts.train=task:sentiment", "prompts.max_prompt_length=128",
                 "reward.spec=task:sentiment",
                 "train.max_steps=1", "train.batch_size=2", "rollout.n=2", "rollout.max_new_tokens=4",
                 "train.micro_batch_size=4", "mini_batch_size=4", "train.report_to=[]", "train.progress=false",
                 f"train.output_dir={out}"]) == 0
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["policy/ratio_first"] == 1.0 and abs(first["objective/kl"]) < 1e-6


@pytest.mark.parametrize("kind", ["gpt2", "opt"])
def test_a_reward_backbone_is_cut_and_frozen_whatever_its_layer_list_is_called(kind, tokenizer, tmp_path):
    from rlhfkit.models import load_scalar_model
    from rlhfkit.models.heads import freeze_lower_layers, keep_lower_layers

    path = tmp_path / kind
    _tiny(kind, tokenizer, dropout=0.0).save_pretrained(path)
    model = load_scalar_model(path, pad_token_id=tokenizer.pad_token_id)
    assert keep_lower_layers(model, 1) == 2 and model.config.num_hidden_layers == 1
    trainable = freeze_lower_layers(model, 1)
    assert trainable and all(".0." in n or "ln_f" in n or "final_layer_norm" in n or "score" in n for n in trainable)
    model.save_pretrained(tmp_path / "cut")
    again = type(model).from_pretrained(tmp_path / "cut")
    ids = torch.tensor([tokenizer.encode("score me")])
    torch.testing.assert_close(again.eval()(ids).logits, model.eval()(ids).logits)
