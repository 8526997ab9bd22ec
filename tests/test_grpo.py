"""GRPO / RLOO: they learn the same trivial reward; one advantage per response, group-centred."""

from __future__ import annotations

import pytest
import torch
from pg_utils import base_config, read_metrics

from rlhfkit.config import ConfigError, load_config
from rlhfkit.trainers import grpo as grpo_mod
from rlhfkit.trainers.grpo import GRPOConfig, RLOOConfig, train_grpo

GRPO_OVER = dict(rollout={"n": 4, "max_new_tokens": 6}, mini_batch_size=16, kl_coef=0.0)


@pytest.mark.parametrize("cls, advantage, temperature", [
    (GRPOConfig, "grpo", 1.0), (RLOOConfig, "rloo", 1.0), (GRPOConfig, "reinforce", 1.0), (GRPOConfig, "grpo", 0.7)])
def test_group_methods_raise_a_learnable_reward(tokenizer, tmp_path, cls, advantage, temperature):
    """At temperature 0.7 too: the rollout's log-probs and the recomputed ones are both tempered."""
    # 14 steps: at 8 the rise (about +0.1) sat at the threshold and a change of random stream
    # (a new sampler) was enough to fail it
    over = {**GRPO_OVER, "rollout": {**GRPO_OVER["rollout"], "temperature": temperature}}
    cfg = load_config(cls, data=base_config(tmp_path, tokenizer, **over, advantage=advantage,
                                            train={"max_steps": 14}))
    assert cfg.advantage == advantage
    train_grpo(cfg)
    rows = read_metrics(tmp_path / "run")
    assert all(abs(r["policy/ratio_first"] - 1.0) < 1e-6 for r in rows)
    assert all(r["rollout/logprob_diff_max"] < 1e-4 for r in rows)
    first = sum(r["reward/score_mean"] for r in rows[:2]) / 2
    last = sum(r["reward/score_mean"] for r in rows[-3:]) / 3
    assert last > first + 0.1, [round(r["reward/score_mean"], 3) for r in rows]
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    assert (tmp_path / "run" / f"{advantage}_results.json").is_file()


@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_one_advantage_per_response_centred_in_its_group(tokenizer, tmp_path, monkeypatch, advantage):
    seen = []
    real_update = grpo_mod.policy_update

    def spy(cfg, strategy, guard, exp, *args, **kw):
        seen.append(exp)
        return real_update(cfg, strategy, guard, exp, *args, **kw)

    monkeypatch.setattr(grpo_mod, "policy_update", spy)
    cfg = load_config(GRPOConfig, data=base_config(
        tmp_path, tokenizer, **{**GRPO_OVER, "advantage": advantage, "kl_coef": 0.04},
        train={"max_steps": 1}))
    train_grpo(cfg)
    exp = seen[0]
    mask = exp.response_mask.bool()
    adv = exp.advantages
    assert torch.all(adv[~mask] == 0)
    for row in range(len(exp)):
        vals = adv[row][mask[row]]
        assert torch.all(vals == vals[0]), "every token of a response gets the same advantage"
    seq = torch.stack([adv[r][mask[r]][0] for r in range(len(exp))]).view(-1, cfg.rollout.n)
    torch.testing.assert_close(seq.sum(1), torch.zeros(seq.shape[0]), atol=1e-5, rtol=0)  # centred per group
    scores = exp.scores.view(-1, cfg.rollout.n)
    # within a group, a higher score means a higher advantage
    for s, a in zip(scores, seq):
        order = s.argsort()
        assert torch.all(a[order].diff() >= -1e-6)


def _shorter(prompts, responses):
    return [-float(len(r)) for r in responses]


def test_a_reward_function_set_in_python_is_written_by_name_and_resumes(tokenizer, tmp_path):
    """reward.spec may hold Python callables (the Python API): the run writes its config with the
    function as module:qualname (no object YAML cannot hold) and fingerprints it the same way in
    every process, so the run resumes; the trainer returns its metrics as Python numbers."""
    import json

    import yaml

    data = base_config(tmp_path, tokenizer, **GRPO_OVER, train={"max_steps": 2, "save_every": 1},
                       reward={"spec": ["task:sentiment", {"spec": _shorter, "weight": 0.5}]})
    metrics = train_grpo(load_config(GRPOConfig, data=data))
    assert all(type(v) in (int, float) for v in metrics.values()), metrics  # numbers, as the results file
    written = yaml.safe_load((tmp_path / "run" / "grpo_config.yaml").read_text())
    assert written["reward"]["spec"] == ["task:sentiment", {"spec": f"{__name__}:_shorter", "weight": 0.5}]
    data["train"] = {**data["train"], "max_steps": 3, "resume": True}
    train_grpo(load_config(GRPOConfig, data=data))
    history = json.loads((tmp_path / "run" / "grpo_run.json").read_text())["history"]
    assert history[-1]["differences"] == ["train.max_steps 2 -> 3"]
    assert len(read_metrics(tmp_path / "run")) == 3


def test_group_size_must_be_at_least_two(tmp_path):
    with pytest.raises(ConfigError, match="at least 2"):
        load_config(GRPOConfig, data={"rollout": {"n": 1}, "mini_batch_size": 8})


def _state_dict(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def _paired_runs(tokenizer, tmp_path, monkeypatch, spied: str, toggle: str, over: dict, train: dict):
    """Two GRPO runs, ``toggle`` False then True (k=0.04 KL, lr 1e-2 constant), counting the calls of
    ``pg_score.<spied>``: per toggle value, the logged metrics, the final weights and the call count."""
    from rlhfkit.trainers import pg_score

    calls = []
    real = getattr(pg_score, spied)
    monkeypatch.setattr(pg_score, spied, lambda *a, **k: calls.append(1) or real(*a, **k))
    metrics, weights, n_calls = {}, {}, {}
    for on in (False, True):
        calls.clear()
        out = tmp_path / f"run-{on}"
        cfg = load_config(GRPOConfig, data=base_config(
            tmp_path, tokenizer, **{**GRPO_OVER, "kl_coef": 0.04, **over, toggle: on,
                                    "optim": {"lr": 1e-2, "schedule": "constant", "warmup_ratio": 0.0}},
            train={**train, "output_dir": str(out)}))
        train_grpo(cfg)
        metrics[on], n_calls[on] = read_metrics(out), len(calls)
        weights[on] = _state_dict(out / "model")
    return metrics, weights, n_calls


def test_shared_prompt_packing_gives_the_same_update(tokenizer, tmp_path, monkeypatch):
    """One iteration of two minibatches, micro-batches of 6 rows that cut groups of 4: packed and
    unpacked scoring and training take the same minibatches (the same shuffle), leave the random
    stream in the same state for the next iteration's sampling, and land on the same weights. (A
    second iteration would compare two rollouts, and float rounding can flip a sampled token.)"""
    rng_after = []
    real_update = grpo_mod.policy_update
    monkeypatch.setattr(grpo_mod, "policy_update", lambda *a, **k: (
        real_update(*a, **k), rng_after.append(torch.get_rng_state()))[0])
    metrics, weights, calls = _paired_runs(
        tokenizer, tmp_path, monkeypatch, "shared_prompt_logprobs", "share_prompt",
        over={"mini_batch_size": 16}, train={"max_steps": 1, "micro_batch_size": 6})
    # 32 rows in micro-batches of 6: 6 packed forwards for logp_old, 6 for logp_ref, and 2
    # minibatches of 16 rows = 3 + 3 in the update
    assert calls == {False: 0, True: 18}
    assert len(rng_after) == 2 and torch.equal(rng_after[0], rng_after[1])
    for a, b in zip(metrics[False], metrics[True], strict=True):
        for key in ("reward/score_mean", "loss/policy", "loss/kl", "policy/entropy", "objective/kl",
                    "policy/grad_norm", "policy/clipfrac"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
        assert abs(b["policy/ratio_first"] - 1.0) < 1e-6
    assert metrics[True][0]["loss/kl"] > 0  # the second minibatch is off the reference: the test has teeth
    for a, b in zip(metrics[False], metrics[True]):  # packing computes each micro-batch's prompts once
        assert 0 < b["update/tokens"] < a["update/tokens"]
    base = _state_dict(tmp_path / "policy")
    moved = max((weights[False][k] - base[k]).abs().max().item() for k in base)
    assert moved > 1e-3  # the step did something ...
    for k in base:  # ... and the same thing both ways (Adam's first step is about lr * sign(g), so
        # entries whose gradient is ~0 can differ by rounding: 1% of the step size allowed)
        torch.testing.assert_close(weights[True][k], weights[False][k], atol=1e-4, rtol=0)


@pytest.mark.parametrize("share", [False, True])
def test_fused_scoring_skips_the_actor_scoring_forward_and_lands_in_the_same_place(tokenizer, tmp_path, monkeypatch,
                                                                                  share):
    """When the batch is one minibatch in one micro-batch, the first update forward also gives
    logp_old: one actor forward fewer, and the same metrics and weights after two epochs (one
    iteration: in a second, float rounding can flip a sampled token)."""
    metrics, weights, n_calls = _paired_runs(
        tokenizer, tmp_path, monkeypatch, "shared_prompt_logprobs" if share else "causal_logprobs", "fuse_scoring",
        over={"mini_batch_size": 16, "share_prompt": share, "ppo_epochs": 2},
        train={"batch_size": 4, "max_steps": 1, "micro_batch_size": 16})
    # actor scoring + reference + 2 epochs -> the reference + 2 epochs
    assert n_calls == {False: 4, True: 3}
    for a, b in zip(metrics[False], metrics[True], strict=True):
        assert (a["score/fused"], b["score/fused"]) == (0.0, 1.0)
        for key in ("reward/score_mean", "loss/policy", "loss/kl", "policy/entropy", "objective/kl",
                    "policy/grad_norm", "policy/clipfrac"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
        assert abs(b["policy/ratio_first"] - 1.0) < 1e-6
        assert b["policy/clipfrac"] > 0  # the second epoch is off logp_old: the test has teeth
    base = _state_dict(tmp_path / "policy")
    assert max((weights[True][k] - base[k]).abs().max().item() for k in base) > 1e-3
    # Adam's steps are about lr * sign(g): an entry whose gradient is ~0 can move differently by
    # rounding, so a few entries (not more than 0.1%) may differ by more than 1% of lr
    off = sum(int(((weights[True][k] - weights[False][k]).abs() > 1e-4).sum()) for k in base)
    assert off <= 1e-3 * sum(base[k].numel() for k in base), off


def test_forward_tokens_counts_each_packed_prompt_once():
    from rlhfkit.rollout import Experience
    from rlhfkit.trainers.pg_update import forward_tokens

    # prompts of 3 and 2 tokens (left-padded to 4); rows 0, 1, 3 share prompt 0, row 2 has prompt 1
    prompt_mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]])
    response_mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]])
    exp = Experience(prompt_mask * 7, prompt_mask, response_mask * 9, response_mask, logprobs=None,
                     eos=torch.ones(4, dtype=torch.bool), prompt_index=torch.tensor([0, 0, 1, 0]))
    assert forward_tokens(exp, share_prompt=False) == (3 + 3 + 2 + 3) + 8
    assert forward_tokens(exp, share_prompt=True) == (3 + 2) + 8
    assert forward_tokens(exp.select([2, 3]), share_prompt=True) == (2 + 3) + 3


def _spy_run(tokenizer, tmp_path, monkeypatch, cls, steps=1, **over):
    """Train ``steps`` iterations; returns (cfg, the Experience of each iteration, calls of the
    surrogate and KL functions the update used)."""
    import rlhfkit.trainers.pg_update as upd

    seen, calls = [], []
    real_update = grpo_mod.policy_update

    def spy(cfg, strategy, guard, exp, *args, **kw):
        seen.append(exp)
        return real_update(cfg, strategy, guard, exp, *args, **kw)

    def record(name, fn):
        def wrapped(*a, **kw):
            calls.append((name, kw.get("log_ratio")))
            return fn(*a, **kw)
        monkeypatch.setattr(upd, name, wrapped)

    for name in ("ppo_policy_loss", "sequence_policy_loss", "bias_corrected_kl", "kl_estimate"):
        record(name, getattr(upd, name))
    monkeypatch.setattr(grpo_mod, "policy_update", spy)
    cfg = load_config(cls, data=base_config(tmp_path, tokenizer, **{**GRPO_OVER, **over}, train={"max_steps": steps}))
    train_grpo(cfg)
    return cfg, seen, calls


def _seq(exp, x):
    return torch.stack([x[r][exp.response_mask[r].bool()].sum() for r in range(len(exp))])


def test_rloo_default_is_the_paper_form(tokenizer, tmp_path, monkeypatch):
    """`rlhfkit rloo`: k1 KL summed into the reward before the leave-one-out baseline, and one
    importance ratio per response (summed log-ratio); no KL loss term."""
    cfg, seen, calls = _spy_run(tokenizer, tmp_path, monkeypatch, RLOOConfig, steps=2, kl_coef=0.5)
    assert (cfg.ratio_level, cfg.kl_kind, cfg.kl_in_reward) == ("sequence", "k1", True)
    exp = seen[1]  # the second iteration: the policy has moved away from the reference
    k1 = _seq(exp, exp.logprobs - exp.ref_logprobs)
    assert k1.abs().max() > 1e-3
    R = (exp.scores.double() - 0.5 * k1.double()).view(-1, cfg.rollout.n)
    G = cfg.rollout.n
    want = (R - (R.sum(1, keepdim=True) - R) / (G - 1)).reshape(-1)
    n_tok = exp.response_mask.sum(-1)
    torch.testing.assert_close(_seq(exp, exp.advantages).double() / n_tok, want, atol=1e-5, rtol=1e-5)
    assert ("sequence_policy_loss", "sum") in calls and not any(c[0] == "ppo_policy_loss" for c in calls)
    assert not any(c[0] in ("kl_estimate", "bias_corrected_kl") for c in calls)


def test_the_kl_in_the_reward_is_the_configured_estimator(tokenizer, tmp_path, monkeypatch):
    """kl_kind k2 in the reward: R_i - kl_coef * sum_t 0.5 (logp - ref)^2, not the k1 sum."""
    cfg, seen, _ = _spy_run(tokenizer, tmp_path, monkeypatch, RLOOConfig, steps=2, kl_coef=0.5, kl_kind="k2")
    exp = seen[1]
    d = exp.logprobs - exp.ref_logprobs
    k2, k1 = _seq(exp, 0.5 * d * d), _seq(exp, d)
    assert (k2 - k1).abs().max() > 1e-3
    R = (exp.scores.double() - 0.5 * k2.double()).view(-1, cfg.rollout.n)
    want = (R - (R.sum(1, keepdim=True) - R) / (cfg.rollout.n - 1)).reshape(-1)
    got = _seq(exp, exp.advantages).double() / exp.response_mask.sum(-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_rloo_token_form_is_an_option(tokenizer, tmp_path, monkeypatch):
    _, _, calls = _spy_run(tokenizer, tmp_path, monkeypatch, RLOOConfig, ratio_level="token",
                           kl_in_reward=False, kl_kind="k3", kl_coef=0.04)
    names = {c[0] for c in calls}
    assert {"ppo_policy_loss", "kl_estimate"} <= names and "sequence_policy_loss" not in names


def test_grpo_batch_scale_divides_by_the_batch_std(tokenizer, tmp_path, monkeypatch):
    cfg, seen, _ = _spy_run(tokenizer, tmp_path, monkeypatch, GRPOConfig, scale="batch")
    exp = seen[0]
    R = exp.scores.double().view(-1, cfg.rollout.n)
    want = ((R - R.mean(1, keepdim=True)) / (R.std() + 1e-4)).reshape(-1)
    got = _seq(exp, exp.advantages).double() / exp.response_mask.sum(-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    group_scaled = ((R - R.mean(1, keepdim=True)) / (R.std(1, keepdim=True) + 1e-4)).reshape(-1)
    assert (got - group_scaled).abs().max() > 1e-3  # a different number from the default


def test_grpo_kl_bias_correction_uses_the_weighted_k3(tokenizer, tmp_path, monkeypatch):
    _, _, calls = _spy_run(tokenizer, tmp_path, monkeypatch, GRPOConfig, kl_coef=0.04, kl_bias_correction=True)
    assert any(c[0] == "bias_corrected_kl" for c in calls)
    _, _, calls = _spy_run(tokenizer, tmp_path / "plain", monkeypatch, GRPOConfig, kl_coef=0.04)
    assert not any(c[0] == "bias_corrected_kl" for c in calls) and any(c[0] == "kl_estimate" for c in calls)


def test_reinforce_baseline_is_the_batch_mean_and_needs_no_groups(tokenizer, tmp_path, monkeypatch):
    cfg, seen, _ = _spy_run(tokenizer, tmp_path, monkeypatch, GRPOConfig, advantage="reinforce",
                            rollout={"n": 1, "max_new_tokens": 6}, mini_batch_size=8)
    exp = seen[0]
    want = exp.scores.double() - exp.scores.double().mean()
    torch.testing.assert_close(_seq(exp, exp.advantages).double() / exp.response_mask.sum(-1), want,
                               atol=1e-5, rtol=1e-5)
    logged = {k for r in read_metrics(cfg.train.output_dir) for k in r}  # groups of one are "flat", yet their advantages are not 0
    assert "advantage/abs_mean" in logged and "reward/flat_group_frac" not in logged


@pytest.mark.parametrize("over, match", [
    ({"advantage": "grpo"}, "advantage: 'grpo' under `rlhfkit rloo`"),
    ({"ratio_level": "sequence", "kl_in_reward": False}, "ratio_level: sequence puts no KL term in the loss"),
    ({"kl_bias_correction": True}, "kl_bias_correction: needs kl_kind k3 and kl_in_reward false"),
])
def test_rloo_config_errors(over, match):
    with pytest.raises(ConfigError, match=match):
        load_config(RLOOConfig, data={"mini_batch_size": 8, **over})


@pytest.mark.parametrize("command", ["grpo", "ppo"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_full_fine_tuning_in_half_precision_starts_at_kl_zero_and_ratio_one(tiny_model_dir, tmp_path, command, dtype):
    """The reference computes as the actor does under autocast (fp32 master weights), and the update
    packs a prompt's responses in the order the scoring forward did: exactly 0 and 1 at step 0, as in fp32."""
    import json

    from rlhfkit.cli import main

    out = tmp_path / "run"
    assert main([command, f"model.name={tiny_model_dir}", f"model.dtype={dtype}", "model.lora.enabled=false",
                 "prompts.train=task:sentiment", "prompts.limit=8", "reward.spec=task:sentiment",
                 "train.max_steps=1", "train.batch_size=2", "rollout.n=4", "rollout.max_new_tokens=8",
                 "train.micro_batch_size=4", "mini_batch_size=8", "train.report_to=[]", "train.progress=false",
                 "train.save_every=0", f"train.output_dir={out}", *(["critic_init=policy"] if command == "ppo" else [])]) == 0
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["policy/ratio_first"] == 1.0 and first["objective/kl"] == 0.0, first


def test_rows_of_one_prompt_keep_their_row_order():
    from rlhfkit.trainers.pg_update import rows_by_prompt

    assert rows_by_prompt([5, 1, 4, 0, 3, 2], torch.tensor([0, 0, 0, 1, 1, 1])) == [0, 1, 2, 3, 4, 5]


def test_update_metric_means_are_weighted_and_merge_sums_numerators_and_weights():
    from rlhfkit.trainers.pg_update import Means

    a, b = Means(), Means()
    a.add({"x": 1.0, "y": 4.0}, weight=3.0)
    a.add({"x": 3.0}, weight=1.0)
    b.add({"x": 5.0}, weight=4.0)
    a.merge(b)
    assert a.result() == {"x": (3 * 1.0 + 1 * 3.0 + 4 * 5.0) / 8, "y": 4.0}


def test_surrogate_loss_by_hand_at_each_ratio_level_with_an_upper_clip():
    """The clipped surrogate reads the configured ratio level and clip range: per token, or one ratio per
    response from the summed or the mean log-ratio, with the response's mean advantage."""
    import math
    from types import SimpleNamespace

    from rlhfkit.trainers.pg_update import surrogate_loss

    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    old = torch.tensor([[-1.1, -1.2, 0.0], [-1.0, -0.9, -1.0]])
    logp = torch.tensor([[-1.0, -1.0, 5.0], [-1.0, -1.0, -1.0]])
    adv = torch.tensor([[2.0, 2.0, 9.0], [-1.0, -1.0, -1.0]])  # per-row means over real tokens: 2, -1
    mb = SimpleNamespace(response_mask=mask, logprobs=old, advantages=adv)

    def naive(log_ratios, advantages, high):
        return sum(-min(math.exp(x) * a, min(max(math.exp(x), 0.8), 1 + high) * a)
                   for x, a in zip(log_ratios, advantages))

    def loss(level, high, norm):
        cfg = SimpleNamespace(clip_eps=0.2, clip_eps_high=high, loss_agg="token-mean",
                              policy_ratio_level=lambda: level)
        return float(surrogate_loss(cfg, logp, mb, norm)[0])

    tokens = ([0.1, 0.2, 0.0, -0.1, 0.0], [2.0, 2.0, -1.0, -1.0, -1.0])
    assert loss("token", None, 5.0) == pytest.approx(naive(*tokens, 0.2) / 5, rel=1e-5)
    assert loss("token", 0.5, 5.0) == pytest.approx(naive(*tokens, 0.5) / 5, rel=1e-5)
    assert loss("sequence", None, 2.0) == pytest.approx(naive([0.3, -0.1], [2.0, -1.0], 0.2) / 2, rel=1e-5)
    assert loss("sequence", 0.5, 2.0) == pytest.approx(naive([0.3, -0.1], [2.0, -1.0], 0.5) / 2, rel=1e-5)
    assert loss("sequence-mean", None, 2.0) == pytest.approx(naive([0.15, -0.1 / 3], [2.0, -1.0], 0.2) / 2, rel=1e-5)


@pytest.mark.parametrize("share_prompt", [False, True])
def test_the_trainers_log_probs_are_at_the_sampling_temperature(tokenizer, share_prompt):
    """logp_old, logp_theta and logp_ref (`policy_logprobs`, their one computation) of rows sampled
    at T are log softmax(logits / T) from a plain forward, and agree with the rollout's own."""
    from rlhfkit.models import position_ids_from_mask, tiny_causal_lm
    from rlhfkit.rollout import generate
    from rlhfkit.trainers.pg_score import policy_logprobs

    model = tiny_causal_lm(tokenizer, seed=4).eval()
    prompts = [tokenizer.encode(t) for t in ("Hello there, how", "Write a line about the sea")]
    exp = generate(model, prompts, max_new_tokens=6, eos_token_id=[], pad_token_id=tokenizer.pad_token_id,
                   temperature=0.6, n=3, seed=0)
    ids, mask = exp.input_ids(), exp.attention_mask()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        got = policy_logprobs(model, exp, share_prompt)
    P = exp.prompt_ids.shape[1]
    want = (logits[:, P - 1:-1] / 0.6).log_softmax(-1).gather(-1, exp.response_ids[..., None]).squeeze(-1)
    rmask = exp.response_mask.bool()
    torch.testing.assert_close(got[rmask], want[rmask], atol=1e-4, rtol=0)
    torch.testing.assert_close(exp.logprobs[rmask], want[rmask], atol=1e-4, rtol=0)


def test_prompts_left_out_of_each_pass_are_said(tokenizer, tmp_path, capsys):
    """10 prompts in batches of 4 with drop_last: each pass over the prompts takes 2 batches and
    leaves 2 prompts out, which the run says once (as the supervised trainers do)."""
    data = base_config(tmp_path, tokenizer, **GRPO_OVER, prompts={"limit": 10},
                       train={"batch_size": 4, "micro_batch_size": 8, "max_steps": 2})
    train_grpo(load_config(GRPOConfig, data={**data, "mini_batch_size": 8}))
    assert "[grpo] batches of 4 prompts leave 2 of the 10 out of each pass" in capsys.readouterr().out
