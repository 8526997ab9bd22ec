"""The token head of a reward model (`algos.token_head`, `models.token_head`, `rm` with head_hidden):
its fit learns what a pooled linear head cannot, the arithmetic against naive references, the
saved directory loads back with the same scores, and the trainer fits, saves and refuses as it says."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_jsonl
from hypothesis import given, settings
from hypothesis import strategies as st
from trainer_rows import pref_rows, read_metrics, trainer_cfg

from rlhfkit.algos import fit_bt_probe, fit_token_head_bt, token_head_scores
from rlhfkit.algos.token_head import reply_rows
from rlhfkit.config import ConfigError, RewardConfig
from rlhfkit.trainers.reward import train_reward_model


def _pairs(n, seed, dim=6, width=5):
    """Every reply has `width` tokens near 0; the chosen reply's third token has feature 0 at
    +-3, of random sign. (tokens (T, dim), counts (2n,))."""
    g = torch.Generator().manual_seed(seed)
    replies = []
    for _ in range(n):
        c, r = 0.3 * torch.randn(width, dim, generator=g), 0.3 * torch.randn(width + 1, dim, generator=g)
        c[2, 0] = 3.0 if torch.rand(1, generator=g) < 0.5 else -3.0
        replies += [c, r]
    return torch.cat(replies), torch.tensor([len(t) for t in replies])


def _accuracy(tokens, counts, weights):
    r = token_head_scores(tokens, counts, **weights)
    return float((r[0::2] > r[1::2]).double().mean())


def test_the_token_head_learns_a_preference_no_pooled_linear_head_can():
    """|feature 0| of one token decides; its sign is random. The mean-pooled difference then has a
    random sign (a linear probe on it ranks held-out pairs at chance); the token head learns |x|."""
    tokens, counts = _pairs(256, 0)
    held_t, held_c = _pairs(128, 1)
    weights, info = fit_token_head_bt(tokens, counts, 16, epochs=60, lr=1e-2, weight_decay=0.01)
    assert info["train_accuracy"] > 0.9 and _accuracy(held_t, held_c, weights) > 0.9

    def pooled(t, c):
        which = torch.repeat_interleave(torch.arange(len(c)), c)
        m = torch.zeros(len(c), t.shape[1]).index_add(0, which, t) / c[:, None]
        return m[0::2] - m[1::2]

    w, _ = fit_bt_probe(pooled(tokens, counts))
    assert 0.3 < float(((pooled(held_t, held_c).double() @ w) > 0).double().mean()) < 0.7


def test_the_fit_does_not_depend_on_each_feature_s_offset_and_scale():
    """The features are standardised for the fit and the returned weights undo it: fitted on
    a * h + b (a > 0 per feature), the head scores the transformed held-out tokens as the head
    fitted on h scores the originals."""
    tokens, counts = _pairs(64, 0)
    held_t, held_c = _pairs(32, 1)
    a, b = torch.tensor([0.5, 3.0, 1.0, 10.0, 0.1, 2.0]), torch.tensor([1.0, -2.0, 0.0, 5.0, 0.3, -1.0])
    plain, _ = fit_token_head_bt(tokens, counts, 8, epochs=3, seed=1)
    moved, _ = fit_token_head_bt(tokens * a + b, counts, 8, epochs=3, seed=1)
    torch.testing.assert_close(token_head_scores(held_t * a + b, held_c, **moved),
                               token_head_scores(held_t, held_c, **plain), atol=1e-4, rtol=1e-4)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=6), st.data())
def test_reply_rows_and_scores_match_a_loop_over_replies(counts, data):
    """`reply_rows` picks each chosen reply's own rows in order; `token_head_scores` is the mean of
    w2 . gelu(W1 h + b1) over each reply's tokens, as a plain loop computes it."""
    counts_t = torch.tensor(counts)
    offsets = torch.cumsum(counts_t, 0) - counts_t
    replies = torch.tensor(data.draw(st.lists(st.integers(0, len(counts) - 1), min_size=1, max_size=5)))
    rows, which = reply_rows(offsets, counts_t, replies)
    expected = [(int(offsets[j]) + k, i) for i, j in enumerate(replies.tolist()) for k in range(counts[j])]
    assert list(zip(rows.tolist(), which.tolist())) == expected
    g = torch.Generator().manual_seed(len(counts))
    tokens = torch.randn(sum(counts), 4, generator=g, dtype=torch.float64)
    w1, b1, w2 = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((3, 4), (3,), (1, 3)))
    got = token_head_scores(tokens, counts_t, w1, b1, w2)
    for j, (o, n) in enumerate(zip(offsets.tolist(), counts)):
        naive = sum(float(w2[0] @ torch.nn.functional.gelu(w1 @ tokens[o + k] + b1)) for k in range(n)) / n
        assert got[j].item() == pytest.approx(naive, rel=1e-9, abs=1e-12)


def test_an_ensemble_of_token_heads_scores_the_mean_of_its_members():
    """members=3 from seed 1: one head of width 3 x 4 whose scores are the mean of the three heads
    fitted alone from seeds 1, 2 and 3, and each of them is what a single fit from its seed gives."""
    tokens, counts = _pairs(32, 0)
    held_t, held_c = _pairs(16, 1)
    ensemble, info = fit_token_head_bt(tokens, counts, 4, epochs=2, seed=1, members=3)
    assert ensemble["w1"].shape == (12, 6) and ensemble["b1"].shape == (12,) and ensemble["w2"].shape == (1, 12)
    alone = [fit_token_head_bt(tokens, counts, 4, epochs=2, seed=s)[0] for s in (1, 2, 3)]
    torch.testing.assert_close(ensemble["w1"][4:8], alone[1]["w1"], atol=0, rtol=0)
    mean = sum(token_head_scores(held_t, held_c, **w) for w in alone) / 3
    torch.testing.assert_close(token_head_scores(held_t, held_c, **ensemble), mean, atol=1e-6, rtol=1e-5)
    assert 0.0 <= info["train_accuracy"] <= 1.0
    with pytest.raises(ValueError, match="members"):
        fit_token_head_bt(tokens, counts, 4, members=0)


def test_the_fit_refuses_counts_that_do_not_describe_the_tokens():
    tokens, counts = _pairs(4, 0)
    with pytest.raises(ValueError, match="add up to"):
        fit_token_head_bt(tokens[:-1], counts, 4)
    with pytest.raises(ValueError, match="two replies per pair"):
        fit_token_head_bt(tokens, counts[:-1], 4)
    with pytest.raises(ValueError, match="hidden"):
        fit_token_head_bt(tokens, counts, 0)


def _scores(model, tokenizer, texts):
    from rlhfkit.models import sequence_scores

    enc = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return sequence_scores(model.eval(), enc["input_ids"], enc["attention_mask"], pooling="mean_all")


@pytest.mark.parametrize("embeddings", [False, True])
def test_a_saved_token_head_loads_back_with_the_same_scores(tmp_path, tiny_model_dir, tokenizer, embeddings):
    """set_token_head + save_pretrained: config.json records the width (and the embeddings), and
    `load_scalar_model` rebuilds the head and reads its weights; a directory whose weights lack
    them is refused."""
    from rlhfkit.models import load_scalar_model
    from rlhfkit.models.token_head import EMBED_KEY, HEAD_KEY, TokenHead, set_token_head, stored_token_head

    model = load_scalar_model(tiny_model_dir, pad_token_id=tokenizer.pad_token_id)
    head = set_token_head(model, 8, embeddings)
    with torch.no_grad():
        head.out.weight.normal_()
    model.save_pretrained(tmp_path / "rm")
    saved = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert saved[HEAD_KEY] == 8 and saved.get(EMBED_KEY, False) is embeddings
    assert stored_token_head(tmp_path / "rm") == (8, embeddings) and stored_token_head(tiny_model_dir) == (0, False)
    back = load_scalar_model(tmp_path / "rm", pad_token_id=tokenizer.pad_token_id)
    assert isinstance(back.score, TokenHead) and back.score.dense.out_features == 8
    assert (back.score.join is not None) is embeddings
    texts = ["It is a wonderful thing.", "No."]
    torch.testing.assert_close(_scores(back, tokenizer, texts), _scores(model, tokenizer, texts))

    from safetensors.torch import load_file, save_file

    state = {k: v for k, v in load_file(str(tmp_path / "rm" / "model.safetensors")).items()
             if not k.startswith("score.out")}
    save_file(state, str(tmp_path / "rm" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="score.out.weight"):
        load_scalar_model(tmp_path / "rm", pad_token_id=tokenizer.pad_token_id)


def test_rm_with_a_token_head_fits_it_first_and_rm_dir_scores_with_it(tmp_path, tiny_model_dir):
    """head_hidden with head_init probe: the head is fitted on the frozen features before any step
    (the step-0 evaluation already ranks held-out pairs), fine-tuning then trains through it, and
    the saved RM scored through rm:DIR gives the run's own held-out accuracy."""
    from rlhfkit.data import load_preference
    from rlhfkit.eval.preference_sets import reward_accuracy
    from rlhfkit.judges.rewards import build_reward_fn
    from rlhfkit.models.token_head import stored_token_head

    train = write_jsonl(tmp_path / "train.jsonl", pref_rows(64, 0))
    held = write_jsonl(tmp_path / "eval.jsonl", pref_rows(24, 1, held_out=True))
    cfg = trainer_cfg(RewardConfig, tmp_path, tiny_model_dir, train, held, train__max_steps=2,
                      head_init="probe", pooling="mean", head_hidden=8)
    final = train_reward_model(cfg)
    m = read_metrics(tmp_path / "run")
    step0 = next(r for r in m if r["step"] == 0 and "eval/accuracy" in r)
    assert next(r for r in m if "probe/train_accuracy" in r)["probe/train_accuracy"] >= 0.95
    assert step0["eval/accuracy"] >= 0.95 and any("train/loss" in r for r in m)
    assert stored_token_head(tmp_path / "run" / "model") == (8, False)
    scorer = build_reward_fn(f"rm:{tmp_path / 'run' / 'model'}")
    got = reward_accuracy(scorer, load_preference(str(held)))
    assert got["accuracy"] == pytest.approx(final["eval/accuracy"])
    assert got["margin"] == pytest.approx(final["eval/margin"], rel=1e-4)  # the same head, not just the same signs


def test_token_head_settings_that_cannot_work_are_refused_in_one_line(tmp_path, tiny_model_dir):
    """A negative width, a token head with LoRA (an adapter has no config.json), and a start
    model whose token head has another width: a ConfigError naming the key, before training."""
    from rlhfkit.models import load_scalar_model
    from rlhfkit.models.token_head import set_token_head

    train = write_jsonl(tmp_path / "train.jsonl", pref_rows(16, 0))
    with pytest.raises(ConfigError, match="head_hidden: must be >= 0"):
        trainer_cfg(RewardConfig, tmp_path, tiny_model_dir, train, train, head_hidden=-1)
    with pytest.raises(ConfigError, match="head_hidden: a token head cannot be stored with a LoRA adapter"):
        trainer_cfg(RewardConfig, tmp_path, tiny_model_dir, train, train, head_hidden=4,
                    model={"name": str(tiny_model_dir), "lora": {"enabled": True}})
    model = load_scalar_model(tiny_model_dir, pad_token_id=0)
    set_token_head(model, 4)
    model.save_pretrained(tmp_path / "rm4")
    cfg = trainer_cfg(RewardConfig, tmp_path, tmp_path / "rm4", train, train, head_hidden=8)
    with pytest.raises(ConfigError, match=r"model.name.*token head of width 4, head_embeddings false"):
        train_reward_model(cfg)
    cfg = trainer_cfg(RewardConfig, tmp_path, tmp_path / "rm4", train, train, head_hidden=4, head_embeddings=True)
    with pytest.raises(ConfigError, match=r"continue it with head_hidden x head_ensemble and head_embeddings the same"):
        train_reward_model(cfg)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="head_embeddings: reading the input embeddings is a token head's"):
        trainer_cfg(RewardConfig, tmp_path, tiny_model_dir, train, train, head_embeddings=True)
    for bad in ({"head_ensemble": 0, "head_hidden": 4, "head_init": "probe"},
                {"head_ensemble": 2, "head_init": "probe"}, {"head_ensemble": 2, "head_hidden": 4}):
        with pytest.raises(ConfigError, match=r"head_ensemble: \d; must be >= 1"):
            trainer_cfg(RewardConfig, tmp_path, tiny_model_dir, train, train, **bad)


def _embedding_reading_rm(tiny_model_dir, tokenizer):
    from rlhfkit.models import load_scalar_model
    from rlhfkit.models.token_head import set_token_head

    model = load_scalar_model(tiny_model_dir, pad_token_id=tokenizer.pad_token_id).eval()
    head = set_token_head(model, 6, embeddings=True)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0.0, 0.5)
    return model


def test_a_token_head_reading_the_embeddings_scores_what_its_formula_says(tiny_model_dir, tokenizer):
    """At every token w2 . gelu(W1 [h; e / rms(e)] + b1), h the last layer's output and e the
    token's input embedding, against those computed by hand; the same values from a deep copy of
    the model (its hook keeps the copy's own embeddings) and `token_values`' features are [h; e / rms(e)]."""
    import copy

    from rlhfkit.models import token_values

    model = _embedding_reading_rm(tiny_model_dir, tokenizer)
    enc = tokenizer(["It is a wonderful thing.", "No, it is not."], return_tensors="pt", padding=True)
    with torch.no_grad():
        values, features = token_values(model, enc["input_ids"], enc["attention_mask"], with_features=True)
        out = model.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                          position_ids=(enc["attention_mask"].cumsum(-1) - 1).clamp(min=0))
        e = model.model.embed_tokens(enc["input_ids"])
        eps = model.config.rms_norm_eps
        x = torch.cat([out.last_hidden_state, e / (e.pow(2).mean(-1, keepdim=True) + eps).sqrt()], -1)
        head = model.score
        by_hand = (torch.nn.functional.gelu(x @ head.dense.weight.T + head.dense.bias) @ head.out.weight.T)[..., 0]
        copied = token_values(copy.deepcopy(model), enc["input_ids"], enc["attention_mask"])
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(values[real], by_hand[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features[real], x[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(copied, values)
    torch.testing.assert_close(head(out.last_hidden_state)[..., 0][real], by_hand[real])  # takes e of the last call
    with pytest.raises(RuntimeError, match="inside the model's own forward"):  # ... once: nothing kept now
        head(out.last_hidden_state)


def test_a_token_head_reading_the_embeddings_passes_its_gradient_to_them(tiny_model_dir, tokenizer):
    """Fine-tuning trains the input embeddings through the head too. On a backbone whose final norm
    is zeroed (its output, and so its gradient to the embeddings, is 0), the embeddings' gradient
    of the summed token values is that of w2 . gelu(W1 [0; e / rms(e)] + b1) by hand, and not 0."""
    from rlhfkit.models import token_values

    model = _embedding_reading_rm(tiny_model_dir, tokenizer).train()
    with torch.no_grad():
        model.model.norm.weight.zero_()
    enc = tokenizer(["It is a wonderful thing.", "No, it is not."], return_tensors="pt", padding=True)
    real = enc["attention_mask"].bool()
    token_values(model, enc["input_ids"], enc["attention_mask"])[real].sum().backward()
    got = model.model.embed_tokens.weight.grad

    table = model.model.embed_tokens.weight.detach().clone().requires_grad_()
    e = table[enc["input_ids"]]
    eps, head = model.config.rms_norm_eps, model.score
    x = torch.cat([torch.zeros_like(e), e / (e.pow(2).mean(-1, keepdim=True) + eps).sqrt()], -1)
    by_hand = (torch.nn.functional.gelu(x @ head.dense.weight.T + head.dense.bias) @ head.out.weight.T)[..., 0]
    by_hand[real].sum().backward()
    assert got is not None and got[enc["input_ids"][real]].abs().sum() > 0
    torch.testing.assert_close(got, table.grad, atol=1e-5, rtol=1e-4)


def test_a_token_head_reading_the_embeddings_scores_packed_pairs_as_padded_rows(tiny_model_dir, tokenizer):
    """pair_scores with the prompt shared (one packed sequence per pair) equals the padded rows."""
    from rlhfkit.data import PreferenceCollator, PreferenceExample, tokenize_dataset
    from rlhfkit.models import set_reward_pooling
    from rlhfkit.trainers.reward import pair_scores

    model = _embedding_reading_rm(tiny_model_dir, tokenizer)
    set_reward_pooling(model, "mean")
    examples = [PreferenceExample([{"role": "user", "content": r["prompt"]}], r["chosen"], r["rejected"])
                for r in pref_rows(6, 3)]
    rows, _ = tokenize_dataset(tokenizer, examples, "preference", 128, "error")
    with torch.no_grad():
        packed = pair_scores(model, PreferenceCollator(tokenizer.pad_token_id, share_prompt=True)(rows))
        padded = pair_scores(model, PreferenceCollator(tokenizer.pad_token_id, share_prompt=False)(rows))
    for a, b in zip(packed, padded):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_a_token_head_reads_the_words_through_the_embeddings_when_the_last_layer_is_blind(
        tmp_path, tiny_model_dir, tokenizer):
    """A backbone whose final norm is zeroed outputs 0 at every token: a token head on it alone
    ties every held-out pair (accuracy 1/2); with head_embeddings the fitted head (here an
    ensemble of two) reads the words ("wonderful", "love" against "terrible", "hate") and ranks
    the held-out pairs, and rm:DIR scores the saved RM, one head of width 2 x 8, as the run did."""
    from transformers import AutoModelForCausalLM

    from rlhfkit.data import load_preference
    from rlhfkit.eval.preference_sets import reward_accuracy
    from rlhfkit.judges.rewards import build_reward_fn
    from rlhfkit.models import save_pretrained_atomic
    from rlhfkit.models.token_head import stored_token_head

    blind = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        blind.model.norm.weight.zero_()
    save_pretrained_atomic(blind, tokenizer, tmp_path / "blind")
    train = write_jsonl(tmp_path / "train.jsonl", pref_rows(48, 0))
    held = write_jsonl(tmp_path / "eval.jsonl", pref_rows(24, 1, held_out=True))
    got = {}
    for embeddings in (False, True):
        cfg = trainer_cfg(RewardConfig, tmp_path / str(embeddings), tmp_path / "blind", train, held, train__epochs=0,
                          head_init="probe", pooling="mean", head_hidden=8, head_embeddings=embeddings,
                          head_ensemble=1 + embeddings)
        got[embeddings] = train_reward_model(cfg)["eval/accuracy"]
    assert got[False] == 0.5 and got[True] >= 0.95
    assert stored_token_head(tmp_path / "True" / "run" / "model") == (16, True)
    scorer = build_reward_fn(f"rm:{tmp_path / 'True' / 'run' / 'model'}")
    assert reward_accuracy(scorer, load_preference(str(held)))["accuracy"] == pytest.approx(got[True])


def test_a_lora_critic_started_from_an_embedding_reading_token_head_rm_values_as_it_does(tmp_path, tiny_model_dir,
                                                                                         tokenizer):
    """PPO with LoRA and critic_init: reward from configs/rm_token.yaml's kind of RM: peft copies
    the head to train it (modules_to_save), and the copy must read the same model's embeddings
    (it raised, reading a detached copy's). The critic's values are the RM's token values, and
    its saved adapter, with the trained head changed, loads back with the same values."""
    from pg_utils import base_config

    from rlhfkit.config import load_config
    from rlhfkit.models import load_scalar_model, save_pretrained_atomic, token_values
    from rlhfkit.trainers.pg_score import response_values
    from rlhfkit.trainers.ppo import PPOConfig, load_critic

    rm = _embedding_reading_rm(tiny_model_dir, tokenizer)
    save_pretrained_atomic(rm, tokenizer, tmp_path / "rm")
    lora = {"name": str(tiny_model_dir), "lora": {"enabled": True, "r": 4}}
    cfg = load_config(PPOConfig, data=base_config(tmp_path, tokenizer, model=lora, critic_init="reward",
                                                  mini_batch_size=8, reward={"spec": f"rm:{tmp_path / 'rm'}"}))
    critic = load_critic(cfg, tokenizer, "cpu").eval()
    enc = tokenizer(["I loved the bright morning sun today", "No, it was a sad day."], return_tensors="pt",
                    padding=True, padding_side="left")
    ids, mask, R = enc["input_ids"], enc["attention_mask"], 3  # [left-padded prompt; 3 response tokens]
    P = ids.shape[1] - R
    with torch.no_grad():
        want = token_values(rm, ids, mask)[:, P - 1:P - 1 + R]
        torch.testing.assert_close(response_values(critic, ids, mask, R), want, rtol=1e-5, atol=1e-5)
        trained = critic.get_base_model().score.modules_to_save["default"]
        trained.dense.weight.add_(0.3)  # as training moves the head
        moved = response_values(critic, ids, mask, R)
        assert (moved - want).abs().max() > 1e-3
    critic.save_pretrained(tmp_path / "critic")
    tokenizer.save_pretrained(tmp_path / "critic")
    back = load_scalar_model(tmp_path / "critic", pad_token_id=tokenizer.pad_token_id).eval()
    with torch.no_grad():
        torch.testing.assert_close(response_values(back, ids, mask, R), moved, rtol=1e-5, atol=1e-5)
