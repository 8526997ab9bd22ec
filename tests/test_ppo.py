"""PPO: exact first ratio under left padding, reward/value layout, learning, resume, LoRA reference."""

from __future__ import annotations

import pytest
import torch

from pg_utils import base_config, read_metrics
from rlhfkit.algos import kl_penalized_rewards
from rlhfkit.config import load_config
from rlhfkit.models import token_values
from rlhfkit.models.forward import causal_logprobs
from rlhfkit.rollout import Experience
from rlhfkit.trainers.common import StepGuard
from rlhfkit.trainers.pg_update import UpdateSettings, build_opt, policy_update, response_values
from rlhfkit.trainers.policy_gradient import (
    RewardSection, prompt_batch, rollout, score_experience, score_sequences, setup_run,
)
from rlhfkit.trainers.ppo import PPOConfig, load_critic, train_ppo

PPO_OVER = dict(critic_init="policy", rollout={"n": 4, "max_new_tokens": 6}, mini_batch_size=16, ppo_epochs=2,
                kl={"coef": 0.0}, vf_coef=0.5, critic_optim={"lr": 1e-2})


def _cfg(tmp_path, tokenizer, **over):
    return load_config(PPOConfig, data=base_config(tmp_path, tokenizer, **{**PPO_OVER, **over}))


def test_first_ratio_is_exactly_one_with_left_padding(tokenizer, tmp_path):
    cfg = _cfg(tmp_path, tokenizer, rollout={"n": 2, "max_new_tokens": 6})
    run = setup_run(cfg, "ppo", epochs=1, mini_batch_size=16, clip_eps=0.2)
    items = prompt_batch(run, 0)
    assert len({len(it.ids) for it in items}) > 2, "prompts must differ in length"
    exp = rollout(run.actor, items, cfg.rollout, run.tokenizer)
    assert (exp.prompt_mask == 0).any(), "the batch must be left-padded"
    rollout_logp = exp.logprobs.clone()
    exp, _, _ = score_experience(exp, items, run.reward_fn, cfg.reward, run.actor, run.ref, run.tokenizer, micro=3)
    mask = exp.response_mask.bool()
    # KV-cache decoding and the full forward agree closely; the stored logp_old is the full forward's
    assert (rollout_logp - exp.logprobs)[mask].abs().max() < 1e-3

    # Training-time forward: train mode, shuffled rows, another micro-batch size -> the same numbers.
    run.actor.train()
    mb = exp.select(torch.randperm(len(exp))[:5])
    with torch.no_grad():
        logp = causal_logprobs(run.actor, mb.input_ids(), mb.attention_mask(), keep_last=mb.response_ids.shape[1])
    m = mb.response_mask.bool()
    torch.testing.assert_close(logp[m], mb.logprobs[m], atol=1e-6, rtol=0)

    # Through the real update: ratio mean on the first minibatch of the first epoch is 1.
    exp.advantages = torch.where(mask, torch.randn(mask.shape), 0.0)
    settings = UpdateSettings(epochs=1, mini_batch_size=8, micro_batch_size=5, clip_eps=0.2)
    upd = policy_update(exp, run.actor, build_opt(run.actor, cfg.optim, 10), settings, run.rt, StepGuard())
    assert abs(upd["policy/ratio_first"] - 1.0) < 1e-6


def _hand_experience(eos_id: int, pad_id: int) -> Experience:
    # row 0: prompt of 2 tokens (left-padded), response "5 6 EOS" then padding
    # row 1: prompt of 3 tokens, response "7 8 9 10" that never emitted EOS
    return Experience(
        prompt_ids=torch.tensor([[pad_id, 11, 12], [13, 14, 15]]), prompt_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]),
        response_ids=torch.tensor([[5, 6, eos_id, pad_id], [7, 8, 9, 10]]),
        response_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]), logprobs=None,
        eos=torch.tensor([True, False]), prompt_index=torch.tensor([0, 1]), pad_token_id=pad_id)


def test_score_and_per_token_reward_layout(tokenizer):
    exp = _hand_experience(tokenizer.eos_token_id, tokenizer.pad_token_id)
    items = [type("I", (), {"text": "a", "messages": [{"role": "user", "content": "a"}]})()] * 2

    def fn(prompts, responses, messages=None):
        return [5.0, 7.0]

    raw, shaped = score_sequences(exp, items, ["x", "y"], fn, RewardSection(spec="f", clip=3.0, missing_eos_score=-1.0))
    assert raw.tolist() == [5.0, 7.0] and shaped.tolist() == [3.0, -1.0]  # clipped; no-EOS row replaced

    logp = torch.tensor([[-1.0, -2.0, -0.5, 9.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0, -0.5, 9.0], [-1.0, -2.0, -1.0, -1.0]])
    rewards, _ = kl_penalized_rewards(shaped, logp, ref, exp.response_mask, kl_coef=0.1, kl_kind="k1")
    # -beta * (logp - ref) on every token; the score on the last valid token (the EOS token); 0 after
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 3.0, 0.0], [0.0, -0.1, 0.0, -1.0]]))


def test_critic_values_are_states_before_each_token(tokenizer, tmp_path):
    cfg = _cfg(tmp_path, tokenizer)
    critic = load_critic(cfg, tokenizer, "cpu").eval()
    exp = _hand_experience(tokenizer.eos_token_id, tokenizer.pad_token_id)
    with torch.no_grad():
        v = response_values(critic, exp.input_ids(), exp.attention_mask(), R=4)  # (2, 4)
        alone = token_values(critic, torch.tensor([[11, 12, 5, 6, tokenizer.eos_token_id]]), torch.ones(1, 5))
    # V(t) is read at the token *before* response token t: the last prompt token for t = 0;
    # left padding does not change it (position ids come from the mask)
    torch.testing.assert_close(v[0, :3], alone[0, 1:4], atol=1e-5, rtol=0)


def test_ppo_raises_a_learnable_reward(tokenizer, tmp_path):
    cfg = _cfg(tmp_path, tokenizer)
    train_ppo(cfg)
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(abs(r["policy/ratio_first"] - 1.0) < 1e-6 for r in rows)
    first = sum(r["reward/score_mean"] for r in rows[:2]) / 2
    last = sum(r["reward/score_mean"] for r in rows[-2:]) / 2
    assert last > first + 0.1, (first, last)
    for key in ("objective/kl", "objective/kl_coef", "policy/entropy", "loss/policy", "loss/value",
                "policy/clipfrac", "policy/approx_kl", "value/explained_variance", "value/clipfrac",
                "response/length_mean", "response/eos_frac", "reward/score_std"):
        assert key in rows[-1], key
    out = tmp_path / "run"
    assert (out / "model" / "config.json").is_file() and (out / "critic" / "config.json").is_file()
    assert (out / "samples.jsonl").read_text().count("\n") >= 8
    assert (out / "ppo_results.json").is_file()


def test_resume_keeps_step_and_kl_controller(tokenizer, tmp_path):
    over = dict(kl={"coef": 0.1, "target": 0.5, "horizon": 64}, train={"max_steps": 3, "save_every": 1},
                rollout={"n": 2, "max_new_tokens": 4}, ppo_epochs=1)
    straight = _cfg(tmp_path, tokenizer, **over)
    train_ppo(straight)
    full = read_metrics(tmp_path / "run")

    over["train"] = {**over["train"], "output_dir": str(tmp_path / "resumed"), "max_steps": 2}
    train_ppo(_cfg(tmp_path, tokenizer, **over))
    over["train"] = {**over["train"], "max_steps": 3, "resume": True}
    train_ppo(_cfg(tmp_path, tokenizer, **over))
    resumed = read_metrics(tmp_path / "resumed")

    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert full[2]["objective/kl_coef"] != 0.1  # the adaptive controller moved ...
    # ... and the resumed run continues from the saved coefficient, weights, optimizers and RNG
    for key in ("objective/kl_coef", "reward/score_mean", "loss/policy"):
        assert resumed[2][key] == pytest.approx(full[2][key], rel=1e-4, abs=1e-6), key


def test_lora_reference_is_the_base_with_adapters_disabled(tokenizer, tmp_path):
    cfg = _cfg(tmp_path, tokenizer, model={"lora": {"enabled": True, "r": 4, "alpha": 8}},
               train={"max_steps": 2}, rollout={"n": 2, "max_new_tokens": 4})
    run = setup_run(cfg, "ppo", epochs=1, mini_batch_size=16, clip_eps=0.2)
    assert run.ref is None  # no second copy: the reference is the actor without its adapters
    base_params = [p for n, p in run.actor.named_parameters() if "lora_" not in n]
    assert all(not p.requires_grad for p in base_params)
    n_base = sum(p.numel() for p in base_params)
    assert len({p.data_ptr() for p in base_params}) == len(base_params)
    with torch.no_grad():  # make the adapters matter
        for n, p in run.actor.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    items = prompt_batch(run, 0)
    exp = rollout(run.actor, items, cfg.rollout, run.tokenizer)
    exp, _, _ = score_experience(exp, items, run.reward_fn, cfg.reward, run.actor, run.ref, run.tokenizer, micro=8)

    from rlhfkit.models import load_causal_lm

    base = load_causal_lm(cfg.model.name).eval()
    assert sum(p.numel() for p in base.parameters()) == n_base  # the actor holds exactly one base copy
    with torch.no_grad():
        want = causal_logprobs(base, exp.input_ids(), exp.attention_mask(), keep_last=exp.response_ids.shape[1])
    m = exp.response_mask.bool()
    torch.testing.assert_close(exp.ref_logprobs[m], want[m], atol=1e-5, rtol=0)
    assert (exp.logprobs - exp.ref_logprobs)[m].abs().max() > 1e-3  # the adapters were on for the actor

    train_ppo(cfg)  # end to end with LoRA: adapters saved
    assert (tmp_path / "run" / "model" / "adapter_config.json").is_file()
