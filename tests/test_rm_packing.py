"""A reward model scores each preference pair as one packed sequence (the prompt once): the scores,
pooled features and gradients equal the two rows scored apart, and the trainer packs by default."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import write_jsonl

from rlhfkit.config import RewardConfig, load_config
from rlhfkit.data import PreferenceCollator, load_preference, tokenize_dataset
from rlhfkit.models import set_reward_pooling
from rlhfkit.parallel import SingleProcess
from rlhfkit.trainers.reward import _pooled_pair_features, pair_scores, train_reward_model

WORDS = "good bad lovely awful bright dull calm noisy warm cold kind rude".split()


def _pairs(n, seed):
    """Pairs whose prompts and responses differ in length, so the padded rows differ in padding."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = "Describe " + " ".join(rng.choices(WORDS, k=rng.randint(1, 9))) + "."
        rows.append({"prompt": prompt, "chosen": " ".join(rng.choices(WORDS, k=rng.randint(1, 12))),
                     "rejected": " ".join(rng.choices(WORDS, k=rng.randint(1, 12)))})
    return rows


@pytest.fixture()
def rm(tiny_model_dir, tokenizer):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1,
                                                               pad_token_id=tokenizer.pad_token_id)
    return model.float()


def _batches(tmp_path, tokenizer, seed, n=6):
    examples = load_preference(str(write_jsonl(tmp_path / "p.jsonl", _pairs(n, seed))))
    features, _ = tokenize_dataset(tokenizer, examples, "preference", 96)
    rows = PreferenceCollator(tokenizer.pad_token_id)(features)
    packed = PreferenceCollator(tokenizer.pad_token_id, share_prompt=True)(features)
    assert "prompt_lengths" in packed and "prompt_lengths" not in rows
    return rows, packed


@pytest.mark.parametrize("pooling", ["last", "mean"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packed_pair_scores_and_gradients_equal_the_rows_apart(rm, tokenizer, tmp_path, monkeypatch, pooling, seed):
    import rlhfkit.trainers.reward as reward

    calls = []
    packed_values = reward.packed_token_values
    monkeypatch.setattr(reward, "packed_token_values", lambda *a, **k: calls.append(1) or packed_values(*a, **k))
    set_reward_pooling(rm, pooling)
    rows, packed = _batches(tmp_path, tokenizer, seed)
    out = []
    for batch in (rows, packed):
        rm.zero_grad()
        c, r = pair_scores(rm, batch)
        (c.sum() - 2 * r.sum() + (c * r).sum()).backward()
        out.append((torch.cat([c, r]).detach(), [p.grad.clone() for p in rm.parameters()]))
    (a, ga), (b, gb) = out
    assert calls == [1]  # the packed batch took the packed forward, the rows the plain one
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pooling", ["last", "mean", "mean_all"])
def test_packed_probe_features_equal_the_rows_apart(rm, tokenizer, tmp_path, pooling):
    set_reward_pooling(rm, pooling)
    rows, packed = _batches(tmp_path, tokenizer, 3)
    strategy = SingleProcess()
    with torch.no_grad():
        a = _pooled_pair_features(rm, rows, strategy)
        b = _pooled_pair_features(rm, packed, strategy)
    assert a.shape == b.shape == (12, rm.config.hidden_size)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_mean_all_reads_the_prompt_so_it_scores_the_rows_apart(rm, tokenizer, tmp_path, monkeypatch):
    set_reward_pooling(rm, "mean_all")
    _, packed = _batches(tmp_path, tokenizer, 4)
    import rlhfkit.trainers.reward as reward

    monkeypatch.setattr(reward, "packed_token_values", lambda *a, **k: pytest.fail("mean_all was packed"))
    c, r = pair_scores(rm, packed)
    assert c.shape == r.shape == (6,)


def test_trainer_packs_by_default_and_trains_the_same(tmp_path, tiny_model_dir):
    """One step of `rlhfkit rm` with and without share_prompt: the same metrics and weights."""
    train = write_jsonl(tmp_path / "train.jsonl", _pairs(8, 5))

    def one_step(name, share):
        data = {"model": {"name": str(tiny_model_dir)}, "data": {"train": str(train), "max_length": 96, "eval_fraction": 0.0},
                "train": {"output_dir": str(tmp_path / name), "batch_size": 8, "micro_batch_size": 8,
                          "max_steps": 1, "progress": False, "seed": 0},
                "optim": {"lr": 0.05, "adam_eps": 1.0, "warmup_ratio": 0.0, "schedule": "constant"},
                "pooling": "mean", "share_prompt": share}
        cfg = load_config(RewardConfig, data=data)
        metrics = train_reward_model(cfg)
        from safetensors.torch import load_file

        return metrics, load_file(str(tmp_path / name / "model" / "model.safetensors"))

    assert RewardConfig().share_prompt
    (m_rows, w_rows), (m_packed, w_packed) = one_step("rows", False), one_step("packed", True)
    assert float(m_rows["train/loss"]) == pytest.approx(float(m_packed["train/loss"]), abs=1e-5)
    for k in w_rows:
        torch.testing.assert_close(w_packed[k], w_rows[k], atol=1e-5, rtol=1e-4)


def test_shared_prompt_groups_by_hand():
    from rlhfkit.judges.reward_model import shared_prompt_groups

    parts = [([1, 2], [5]), ([3], [6]), ([1, 2], [7, 8]), ([], [9]), ([3], []), ([1, 2], [4]), ([4], [1])]
    # rows 0, 2, 5 share a prompt; row 1's only partner (4) has an empty reply; row 3 has no prompt
    assert shared_prompt_groups(parts) == ([[0, 2, 5]], [1, 3, 4, 6])
    assert shared_prompt_groups([([1], [2]), ([1], [3])]) == ([[0, 1]], [])


@pytest.mark.parametrize("pooling", ["last", "mean", "mean_all"])
def test_scorer_packs_replies_to_one_prompt_and_scores_as_each_row_alone(rm, tokenizer, monkeypatch, pooling):
    """`rm:DIR` scoring of GRPO-style groups (several replies per prompt, rows in any order): the
    replies to one prompt are one packed sequence, and every score equals that row scored alone, in
    the input order. A prompt seen once, and every row under mean_all pooling, take the plain path."""
    import rlhfkit.judges.reward_model as reward_model

    set_reward_pooling(rm, pooling)
    packed_rows = []
    real_pack = reward_model.pack_groups
    monkeypatch.setattr(reward_model, "pack_groups",
                        lambda groups, *a, **k: packed_rows.append(sum(len(g[1]) for g in groups)) or
                        real_pack(groups, *a, **k))
    rng = random.Random(3)
    prompts = {k: [{"role": "user", "content": "Describe " + " ".join(rng.choices(WORDS, k=rng.randint(1, 8)))}]
               for k in "ABC"}
    order = list("ABCACAAC")
    replies = [" ".join(rng.choices(WORDS, k=rng.randint(1, 12))) for _ in order]
    scorer = reward_model.RewardModelScorer(rm, tokenizer, batch_size=4)
    got = scorer([""] * len(order), replies, messages=[prompts[k] for k in order])
    packed_total = sum(packed_rows)
    alone = [scorer([""], [r], messages=[prompts[k]])[0] for k, r in zip(order, replies)]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(alone), atol=1e-5, rtol=1e-5)
    assert packed_total == (0 if pooling == "mean_all" else 7)  # A's 4 and C's 3 replies; B alone
    assert len(set(round(v, 4) for v in got)) > 4  # the rows really score differently


@pytest.mark.parametrize("seed", [0, 1])
def test_packed_pairs_compute_the_system_turn_once(rm, tiny_model, tokenizer, tmp_path, monkeypatch, seed):
    """Every packed pair starts with the chat template's system turn: as K rows it is computed once
    per batch (`models.packing.packed_inputs`), and the RM's scores and gradients, and a policy's
    packed log-probs (DPO's), equal those with every pair computing it. (The one-row layout of
    `models.segments`, which has no separate pass: tests/test_segments.py.)"""
    from rlhfkit.models import forward, packing, segments

    monkeypatch.setattr(segments, "SEGMENT_ATTENTION", False)
    _, packed = _batches(tmp_path, tokenizer, seed)
    pairs = packing.pack_pairs(packed)
    assert pairs["shared_prefix"] >= forward.MIN_SHARED_PREFIX
    calls = []
    real = packing.prefix_cache
    monkeypatch.setattr(packing, "prefix_cache", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = []
    for share in (True, False):
        monkeypatch.setattr(forward, "SHARE_PREFIX", share)
        rm.zero_grad()
        c, r = pair_scores(rm, packed)
        (c.sum() - 2 * r.sum() + (c * r).sum()).backward()
        logp = packing.packed_logprobs(tiny_model, pairs)
        out.append((torch.cat([c, r]).detach(), [p.grad.clone() for p in rm.parameters()], logp))
    assert calls == [1, 1]  # the RM's and the policy's forward, with sharing on
    (a, ga, la), (b, gb, lb) = out
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("reply", ["  two spaces", "\n\nParagraph", "    def f():\n        return 1"])
def test_scorer_reads_a_reply_that_merges_with_the_header_as_rm_trained_on_it(rm, tokenizer, reply):
    """A reply starting with whitespace: `rm:DIR` scores the ids `rlhfkit rm` trains on
    (tokenize_preference), read at the end-of-turn token, not the template's trailing newline."""
    from rlhfkit.data import PreferenceExample, tokenize_preference
    from rlhfkit.judges.reward_model import RewardModelScorer

    prompt = [{"role": "user", "content": "question 1"}]
    pair = tokenize_preference(tokenizer, PreferenceExample(prompt, reply, "other"), 96)
    scorer = RewardModelScorer(rm, tokenizer)
    assert scorer.render_parts(prompt, reply) == (pair["prompt_ids"], pair["chosen_ids"])
    ids = torch.tensor([pair["prompt_ids"] + pair["chosen_ids"]])
    set_reward_pooling(rm, "last")
    torch.testing.assert_close(torch.tensor(scorer([""], [reply], messages=[prompt])), rm(ids).logits[:, 0])
