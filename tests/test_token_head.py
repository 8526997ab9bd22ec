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


def test_a_saved_token_head_loads_back_with_the_same_scores(tmp_path, tiny_model_dir, tokenizer):
    """set_token_head + save_pretrained: config.json records the width, and `load_scalar_model`
    rebuilds the head and reads its weights; a directory whose weights lack them is refused."""
    from rlhfkit.models import load_scalar_model
    from rlhfkit.models.token_head import HEAD_KEY, TokenHead, set_token_head, stored_token_head_width

    model = load_scalar_model(tiny_model_dir, pad_token_id=tokenizer.pad_token_id)
    head = set_token_head(model, 8)
    with torch.no_grad():
        head.out.weight.normal_()
    model.save_pretrained(tmp_path / "rm")
    assert json.loads((tmp_path / "rm" / "config.json").read_text())[HEAD_KEY] == 8
    assert stored_token_head_width(tmp_path / "rm") == 8 and stored_token_head_width(tiny_model_dir) == 0
    back = load_scalar_model(tmp_path / "rm", pad_token_id=tokenizer.pad_token_id)
    assert isinstance(back.score, TokenHead) and back.score.dense.out_features == 8
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
    from rlhfkit.models.token_head import stored_token_head_width

    train = write_jsonl(tmp_path / "train.jsonl", pref_rows(64, 0))
    held = write_jsonl(tmp_path / "eval.jsonl", pref_rows(24, 1))
    cfg = trainer_cfg(RewardConfig, tmp_path, tiny_model_dir, train, held, train__max_steps=2,
                      head_init="probe", pooling="mean", head_hidden=8)
    final = train_reward_model(cfg)
    m = read_metrics(tmp_path / "run")
    step0 = next(r for r in m if r["step"] == 0 and "eval/accuracy" in r)
    assert next(r for r in m if "probe/train_accuracy" in r)["probe/train_accuracy"] >= 0.95
    assert step0["eval/accuracy"] >= 0.95 and any("train/loss" in r for r in m)
    assert stored_token_head_width(tmp_path / "run" / "model") == 8
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
    with pytest.raises(ConfigError, match=r"model.name.*token head of width 4.*head_hidden: 4"):
        train_reward_model(cfg)
    assert not (tmp_path / "run").exists()
