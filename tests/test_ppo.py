"""PPO: exact first ratio under left padding, reward/value layout, learning, resume, LoRA reference."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from pg_utils import base_config, read_metrics

from rlhfkit.algos import kl_penalized_rewards
from rlhfkit.config import RewardSection, load_config
from rlhfkit.models import token_values
from rlhfkit.models.forward import MIN_SHARED_PREFIX, causal_logprobs
from rlhfkit.parallel import SingleProcess
from rlhfkit.rollout import Experience, rollout
from rlhfkit.trainers.pg_score import response_values, score_experience, score_sequences
from rlhfkit.trainers.pg_setup import Trained, prepare_trained, prompt_batch, setup_run
from rlhfkit.trainers.pg_update import policy_update
from rlhfkit.trainers.ppo import PPOConfig, load_critic, train_ppo
from rlhfkit.training import StepGuard, build_optimizer, build_scheduler

PPO_OVER = dict(critic_init="policy", rollout={"n": 4, "max_new_tokens": 6}, mini_batch_size=16, ppo_epochs=2,
                kl={"coef": 0.0}, vf_coef=0.5, critic_optim={"lr": 1e-2})


def _cfg(tmp_path, tokenizer, **over):
    return load_config(PPOConfig, data=base_config(tmp_path, tokenizer, **{**PPO_OVER, **over}))


def test_first_ratio_is_exactly_one_with_left_padding(tokenizer, tmp_path):
    cfg = _cfg(tmp_path, tokenizer, rollout={"n": 2, "max_new_tokens": 6})
    run = setup_run(cfg, "ppo", SingleProcess())
    items = prompt_batch(run, 0)
    assert len({len(it.ids) for it in items}) > 2, "prompts must differ in length"
    exp = rollout(run.actor, items, cfg.rollout, run.tokenizer)
    assert (exp.prompt_mask == 0).any(), "the batch must be left-padded"
    rollout_logp = exp.logprobs.clone()
    cfg.train.micro_batch_size = 3  # scoring in micro-batches of 3, the update in micro-batches of 5
    exp, _, _ = score_experience(run, exp, items, run.actor)
    mask = exp.response_mask.bool()
    # KV-cache decoding and the full forward agree closely; the stored logp_old is the full forward's
    assert (rollout_logp - exp.logprobs)[mask].abs().max() < 1e-3

    # Training-time forward: train mode, shuffled rows, another micro-batch size -> the same numbers.
    run.actor.train()
    mb = exp.select(torch.randperm(len(exp))[:5])
    assert mb.shared_prefix >= MIN_SHARED_PREFIX  # the system turn is computed once, in both passes
    with torch.no_grad():
        logp = causal_logprobs(run.actor, mb.input_ids(), mb.attention_mask(), keep_last=mb.response_ids.shape[1],
                               shared_prefix=mb.shared_prefix)
    m = mb.response_mask.bool()
    torch.testing.assert_close(logp[m], mb.logprobs[m], atol=1e-6, rtol=0)

    # Through the real update: ratio mean on the first minibatch of the first epoch is 1.
    exp.advantages = torch.where(mask, torch.randn(mask.shape), 0.0)
    cfg.ppo_epochs, cfg.mini_batch_size, cfg.train.micro_batch_size = 1, 8, 5
    upd = policy_update(cfg, run.strategy, StepGuard(), exp, prepare_trained(run, run.actor, cfg.optim))
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

    section = RewardSection(spec="f", clip=3.0, missing_eos_score=-1.0)
    raw, shaped, _ = score_sequences(exp, items, ["x", "y"], fn, section)
    assert raw.tolist() == [5.0, 7.0] and shaped.tolist() == [3.0, -1.0]  # clipped; no-EOS row replaced

    logp = torch.tensor([[-1.0, -2.0, -0.5, 9.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0, -0.5, 9.0], [-1.0, -2.0, -1.0, -1.0]])
    rewards, _ = kl_penalized_rewards(shaped, logp, ref, exp.response_mask, kl_coef=0.1, kl_kind="k1")
    # -beta * (logp - ref) on every token; the score on the last valid token (the EOS token); 0 after
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 3.0, 0.0], [0.0, -0.1, 0.0, -1.0]]))


def test_sequence_kl_sums_the_estimator_over_each_responses_real_tokens(tokenizer):
    from rlhfkit.trainers.pg_score import sequence_kl

    exp = _hand_experience(tokenizer.eos_token_id, tokenizer.pad_token_id)
    exp.logprobs = torch.tensor([[-1.0, -2.0, -0.5, 9.0], [-1.0, -1.0, -1.0, -1.0]])
    exp.ref_logprobs = torch.tensor([[-1.5, -2.0, -1.0, 0.0], [-1.0, -2.0, -1.0, -1.5]])
    # k1 = logp - ref on the real tokens; row 0's padding position (9 - 0) is left out
    torch.testing.assert_close(sequence_kl(exp, "k1"), torch.tensor([1.0, 1.5]))
    # k2 = 0.5 (logp - ref)^2: row 0 0.125 + 0.125, row 1 0.5 + 0.125
    torch.testing.assert_close(sequence_kl(exp, "k2"), torch.tensor([0.25, 0.625]))


def test_kl_and_value_metrics_by_hand():
    from types import SimpleNamespace

    from rlhfkit.trainers.ppo import kl_and_value_metrics

    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    values = torch.tensor([[1.0, 2.0, 50.0], [3.0, 4.0, 5.0]])  # 50: padding, left out
    exp = SimpleNamespace(response_mask=mask, values=values, returns=values.clone())
    kl = torch.tensor([[0.1, 0.2, 0.0], [0.3, 0.2, 0.1]])  # the estimator in the reward, per token
    m = kl_and_value_metrics(exp, torch.tensor([0.5, 1.5]), kl, SimpleNamespace(value=0.2), SingleProcess())
    assert float(m["objective/kl"]) == pytest.approx(1.0) and float(m["objective/kl_penalty"]) == pytest.approx(0.45)
    assert m["objective/kl_coef"] == 0.2 and float(m["objective/non_score_reward"]) == pytest.approx(-0.09)
    assert float(m["value/mean"]) == pytest.approx(3.0)


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


def test_critic_values_of_a_nonzero_head_are_read_at_the_state_before_each_token(tokenizer, tmp_path):
    """A critic started from the policy has a zero head (V = 0, which any layout reproduces); with a
    random head V(t) is the value at the position before response token t, in both rows."""
    from rlhfkit.models.heads import backbone_and_head

    critic = load_critic(_cfg(tmp_path, tokenizer), tokenizer, "cpu").eval()
    _, head = backbone_and_head(critic)
    assert not head.weight.any()
    with torch.no_grad():
        head.weight.normal_(generator=torch.Generator().manual_seed(0))
    exp = _hand_experience(tokenizer.eos_token_id, tokenizer.pad_token_id)
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        v = response_values(critic, exp.input_ids(), exp.attention_mask(), R=4)
        alone0 = token_values(critic, torch.tensor([[11, 12, 5, 6, eos]]), torch.ones(1, 5))
        alone1 = token_values(critic, torch.tensor([[13, 14, 15, 7, 8, 9, 10]]), torch.ones(1, 7))
    assert alone1[0].std() > 1e-3  # the values differ from position to position
    torch.testing.assert_close(v[0, :3], alone0[0, 1:4], atol=1e-5, rtol=0)
    torch.testing.assert_close(v[1], alone1[0, 2:6], atol=1e-5, rtol=0)


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
                "policy/clipfrac", "policy/approx_kl", "policy/approx_kl_trl", "value/explained_variance", "value/clipfrac",
                "response/length_mean", "response/eos_frac", "reward/score_std"):
        assert key in rows[-1], key
    out = tmp_path / "run"
    assert (out / "model" / "config.json").is_file() and (out / "critic" / "config.json").is_file()
    assert (out / "samples.jsonl").read_text().count("\n") >= 8
    results = json.loads((out / "ppo_results.json").read_text())
    assert "RLHFKIT_DECODE_GEMV" in results["decode_products"]  # the rollout kernels this run chose


def _naive_gae(rewards, values, mask, gamma: float, lam: float):
    """Per row, backwards over its valid tokens: delta_t = r_t + gamma V_{t+1} - V_t (V = 0 after the
    last token), A_t = delta_t + gamma lam A_{t+1}; returns A + V. Plain Python floats."""
    adv, ret = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        n = int(mask[b].sum())
        a, v_next = 0.0, 0.0
        for t in reversed(range(n)):
            r, v = float(rewards[b, t]), float(values[b, t])
            a = r + gamma * v_next - v + gamma * lam * a
            adv[b, t], ret[b, t] = a, a + v
            v_next = v
    return adv, ret


def test_iteration_wires_kl_penalty_and_gae_into_the_experience(tokenizer, tmp_path, monkeypatch):
    """What one PPO iteration hands to its update: rewards = -beta (logp_old - logp_ref) on every
    response token plus the score on the last one, and GAE advantages / returns with the configured
    gamma and lam (distinct, so that swapping them shows), checked against naive references."""
    import rlhfkit.trainers.ppo as ppo_mod

    beta, gamma, lam = 0.2, 0.9, 0.8
    cfg = _cfg(tmp_path, tokenizer, kl={"coef": beta}, gamma=gamma, lam=lam, whiten_advantages=False,
               train={"max_steps": 2}, rollout={"n": 2, "max_new_tokens": 5}, ppo_epochs=1)
    seen = []
    real_update = ppo_mod.policy_update

    def spy(cfg_, strategy, guard, exp, *args, **kwargs):
        seen.append({k: getattr(exp, k).detach().clone() for k in
                     ("rewards", "returns", "advantages", "logprobs", "ref_logprobs", "values", "scores",
                      "response_mask")})
        return real_update(cfg_, strategy, guard, exp, *args, **kwargs)

    monkeypatch.setattr(ppo_mod, "policy_update", spy)
    train_ppo(cfg)
    assert len(seen) == 2
    for i, e in enumerate(seen):
        m = e["response_mask"]
        mb = m.bool()
        want = torch.where(mb, -beta * (e["logprobs"] - e["ref_logprobs"]), 0.0)
        last = m.sum(-1) - 1
        assert (last >= 0).all()
        for b in range(len(last)):
            want[b, last[b]] += e["scores"][b]
        torch.testing.assert_close(e["rewards"][mb], want[mb], atol=1e-6, rtol=1e-6)
        adv, ret = _naive_gae(e["rewards"], e["values"], m, gamma, lam)
        torch.testing.assert_close(e["advantages"][mb], adv[mb], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(e["returns"][mb], ret[mb], atol=1e-5, rtol=1e-5)
    # the second iteration's policy has moved from the reference and its critic from V = 0: both
    # the KL penalty and the values (where gamma and lam act differently) are really in play
    e = seen[1]
    mb = e["response_mask"].bool()
    assert (e["logprobs"] - e["ref_logprobs"])[mb].abs().max() > 1e-3
    assert e["values"][mb].abs().max() > 1e-3


def test_the_kl_controller_is_updated_with_the_applied_penalty_and_every_sample(tokenizer, tmp_path, monkeypatch):
    import rlhfkit.trainers.ppo as ppo_mod
    from rlhfkit.algos import FixedKLController

    seen = []

    class Recording(FixedKLController):
        def update(self, current, n_steps):
            seen.append((current, n_steps))

    monkeypatch.setattr(ppo_mod, "kl_controller", lambda kl: Recording(kl.coef))
    cfg = _cfg(tmp_path, tokenizer, kl={"coef": 0.1}, train={"max_steps": 1}, rollout={"n": 2, "max_new_tokens": 4},
               ppo_epochs=1)
    train_ppo(cfg)
    (row,) = read_metrics(tmp_path / "run")
    assert seen == [(pytest.approx(row["objective/kl_penalty"]), cfg.train.batch_size * 2)]


def test_resume_keeps_step_and_kl_controller(tokenizer, tmp_path, monkeypatch):
    import rlhfkit.trainers.ppo as ppo_mod

    ran = []  # the steps each train_ppo call really executed
    real_iteration = ppo_mod.ppo_iteration

    def counting(pr, step, *args, **kwargs):
        ran.append(step)
        return real_iteration(pr, step, *args, **kwargs)

    monkeypatch.setattr(ppo_mod, "ppo_iteration", counting)
    over = dict(kl={"coef": 0.1, "target": 0.5, "horizon": 64}, train={"max_steps": 3, "save_every": 1},
                rollout={"n": 2, "max_new_tokens": 4}, ppo_epochs=1)
    straight = _cfg(tmp_path, tokenizer, **over)
    train_ppo(straight)
    full = read_metrics(tmp_path / "run")

    over["train"] = {**over["train"], "output_dir": str(tmp_path / "resumed"), "max_steps": 2}
    ran.clear()
    train_ppo(_cfg(tmp_path, tokenizer, **over))
    assert ran == [0, 1]
    over["train"] = {**over["train"], "max_steps": 3, "resume": True}
    ran.clear()
    train_ppo(_cfg(tmp_path, tokenizer, **over))
    assert ran == [2]  # the resumed run starts at its checkpoint's step: steps 0 and 1 are not redone
    resumed = read_metrics(tmp_path / "resumed")

    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert full[2]["objective/kl_coef"] != 0.1  # the adaptive controller moved ...
    # ... and the resumed run continues from the saved coefficient, weights, optimizers and RNG
    for key in ("objective/kl_coef", "reward/score_mean", "loss/policy"):
        assert resumed[2][key] == pytest.approx(full[2][key], rel=1e-4, abs=1e-6), key


def test_lora_reference_is_the_base_with_adapters_disabled(tokenizer, tmp_path):
    cfg = _cfg(tmp_path, tokenizer, model={"lora": {"enabled": True, "r": 4, "alpha": 8}},
               train={"max_steps": 2}, rollout={"n": 2, "max_new_tokens": 4})
    run = setup_run(cfg, "ppo", SingleProcess())
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
    exp, _, _ = score_experience(run, exp, items, run.actor)

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


def _trained(model, optim) -> Trained:
    optimizer = build_optimizer(model, optim)
    return Trained(model, optimizer, build_scheduler(optimizer, optim, 1), optim.max_grad_norm)


def _fixed_experience(actor, critic, pad_id: int, seed: int = 0) -> Experience:
    """8 rows with left-padded prompts and responses of unequal lengths (1..7 tokens); stale
    behaviour log-probs (ratios away from 1, so some tokens clip), V_old, returns, advantages and
    reference log-probs filled in as the trainers would."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens, resp_lens = [6, 2, 4, 3, 6, 1, 5, 2], [7, 1, 3, 5, 2, 7, 4, 6]
    P, R = max(prompt_lens), max(resp_lens)
    B = len(prompt_lens)
    prompt_ids = torch.full((B, P), pad_id)
    prompt_mask = torch.zeros(B, P, dtype=torch.long)
    response_ids = torch.full((B, R), pad_id)
    response_mask = torch.zeros(B, R, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_lens, resp_lens)):
        prompt_ids[i, P - p:] = torch.randint(100, 1000, (p,), generator=g)
        prompt_mask[i, P - p:] = 1
        response_ids[i, :r] = torch.randint(100, 1000, (r,), generator=g)
        response_mask[i, :r] = 1
    exp = Experience(prompt_ids, prompt_mask, response_ids, response_mask, logprobs=None,
                     eos=torch.ones(B, dtype=torch.bool), prompt_index=torch.arange(B), pad_token_id=pad_id)
    m = response_mask.bool()

    def noise(scale):
        return torch.where(m, scale * torch.randn(B, R, generator=g), 0.0)

    with torch.no_grad():
        logp = causal_logprobs(actor, exp.input_ids(), exp.attention_mask(), keep_last=R)
        v = response_values(critic, exp.input_ids(), exp.attention_mask(), R)
    exp.logprobs = torch.where(m, logp, 0.0) + noise(0.3)
    exp.ref_logprobs = torch.where(m, logp, 0.0) + noise(0.2)
    exp.values = torch.where(m, v, 0.0) + noise(0.1)
    exp.returns = exp.values + noise(1.0)
    exp.advantages = noise(1.0)
    return exp


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_ppo_update_batch8_equals_batch1_times_accumulation8(agg):
    """One optimizer step of the PPO update (clipped policy loss + clipped value loss + k3 KL term)
    on the same minibatch of 8 responses of unequal lengths: micro-batches of 8 and of 1 give the
    same actor and critic parameters, because every micro-batch divides by the minibatch's global
    normaliser (its token count for token-mean, its row count for the seq-mean modes)."""
    import copy
    from types import SimpleNamespace

    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
    )

    from rlhfkit.config import OptimSection

    strategy = SingleProcess()
    # A small vocabulary keeps this fast; the update does not care which tokens they are.
    config = LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    actor0, critic0 = LlamaForCausalLM(config).train(), LlamaForSequenceClassification(config).train()
    exp = _fixed_experience(actor0, critic0, pad_id=0)
    # adam_eps=1 makes the first Adam step ~ lr * grad: parameter differences track gradient differences
    optim = OptimSection(lr=0.05, adam_eps=1.0, schedule="constant", warmup_ratio=0.0)
    results = {}
    for micro in (8, 1):
        actor, critic = copy.deepcopy(actor0), copy.deepcopy(critic0)
        cfg = SimpleNamespace(ppo_epochs=1, mini_batch_size=8, train=SimpleNamespace(micro_batch_size=micro),
                              clip_eps=0.2, clip_eps_high=None, loss_agg=agg, share_prompt=False, vf_coef=0.5,
                              value_clip_eps=0.2, kl_loss=lambda: (0.1, "k3"),
                              policy_ratio_level=lambda: "token")
        torch.manual_seed(1)
        out = policy_update(cfg, strategy, StepGuard(), exp, _trained(actor, optim), critic=_trained(critic, optim))
        results[micro] = (out, dict(actor.named_parameters()), dict(critic.named_parameters()))
    (o8, a8, c8), (o1, a1, c1) = results[8], results[1]
    assert 0.0 < o8["policy/clipfrac"] < 1.0  # the clipped branch is active on some tokens
    for key in ("loss/policy", "loss/value", "loss/kl", "policy/grad_norm", "value/grad_norm"):
        assert o1[key] == pytest.approx(o8[key], rel=1e-5, abs=1e-7), key
    moved = 0.0
    for p8, p1, p0 in [(a8[k], a1[k], p) for k, p in actor0.named_parameters()] + \
                      [(c8[k], c1[k], p) for k, p in critic0.named_parameters()]:
        torch.testing.assert_close(p8, p1, atol=2e-6, rtol=1e-5)
        moved = max(moved, (p8 - p0).abs().max().item())
    assert moved > 1e-3  # the step did move the weights


def test_ppo_update_steps_each_model_per_minibatch_and_epoch_with_its_own_settings(monkeypatch):
    """ppo_epochs passes of n / mini_batch_size steps, each model clipped by its own max_grad_norm; the
    value loss is the clipped PPO2 form against the returns (checked by hand), weighted by vf_coef."""
    from types import SimpleNamespace

    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from rlhfkit.config import OptimSection

    config = LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0)
    torch.manual_seed(0)
    actor0, critic0 = LlamaForCausalLM(config).train(), LlamaForSequenceClassification(config).train()
    exp = _fixed_experience(actor0, critic0, pad_id=0)
    m = exp.response_mask.bool()
    with torch.no_grad():
        v = response_values(critic0, exp.input_ids(), exp.attention_mask(), exp.response_ids.shape[1])
    eps = 0.01  # small: the clipped term is the larger one on many tokens
    clipped = exp.values + (v - exp.values).clamp(-eps, eps)
    want_vl = (0.5 * torch.maximum((v - exp.returns) ** 2, (clipped - exp.returns) ** 2))[m].mean()
    optim = OptimSection(lr=0.0, schedule="constant", warmup_ratio=0.0)
    runs = {}
    class TwoRanks(SingleProcess):  # this rank's 8 rows are half of a global batch of 16
        def sum(self, t):
            return t * 2

    for epochs, mini, vf_coef, ranks in [(1, 8, 0.5, 1), (1, 8, 1.0, 1), (3, 4, 0.5, 1), (1, 8, 0.5, 2)]:
        actor, critic = copy.deepcopy(actor0), copy.deepcopy(critic0)
        a, c = _trained(actor, optim), _trained(critic, optim)
        a.max_grad_norm, c.max_grad_norm = 1.0, 2.5
        strategy, steps = (SingleProcess() if ranks == 1 else TwoRanks()), []
        strategy.world_size = ranks

        def spy(model, optimizer, scheduler, max_grad_norm, *args, _step=strategy.step, _critic=critic):
            grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
            steps.append((model is _critic, max_grad_norm, float(torch.cat(grads).norm())))
            return _step(model, optimizer, scheduler, max_grad_norm, *args)

        monkeypatch.setattr(strategy, "step", spy)
        cfg = SimpleNamespace(ppo_epochs=epochs, mini_batch_size=mini, train=SimpleNamespace(micro_batch_size=8),
                              clip_eps=0.2, clip_eps_high=None, loss_agg="token-mean", share_prompt=False,
                              vf_coef=vf_coef, value_clip_eps=eps, kl_loss=lambda: (0.0, "k1"),
                              policy_ratio_level=lambda: "token")
        out = policy_update(cfg, strategy, StepGuard(), exp, a, critic=c)
        runs[(epochs, mini, vf_coef, ranks)] = (out, steps)
    out, steps = runs[(1, 8, 0.5, 1)]
    assert out["loss/value"] == pytest.approx(float(want_vl), rel=1e-5)
    assert [(is_critic, norm) for is_critic, norm, _ in steps] == [(False, 1.0), (True, 2.5)]
    # the critic's gradient scales with vf_coef (lr 0: the weights stay put between the runs)
    assert runs[(1, 8, 1.0, 1)][1][1][2] == pytest.approx(2 * steps[1][2], rel=1e-4)
    assert len(runs[(3, 4, 0.5, 1)][1]) == 3 * 2 * 2  # 3 epochs x 2 minibatches x (actor, critic)
    assert len(runs[(1, 8, 0.5, 2)][1]) == 2 * 2  # mini_batch_size counts the rows of every rank


@pytest.mark.parametrize("line, field, fragment", [
    ('{"prompt": "unclosed', None, "invalid JSON"),
    (json.dumps({"text": "x"}), "prompt", "missing"),
    (json.dumps({"prompt": 3}), "prompt", "got int"),
    (json.dumps({"prompt": "  "}), "prompt", "empty or whitespace-only text"),
    (json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
     "messages", "must end with a user turn"),
])
def test_bad_prompts_name_file_line_and_field_before_any_model_loads(tokenizer, tmp_path, monkeypatch, line, field,
                                                                      fragment):
    import transformers

    from rlhfkit.data import DataError

    cfg = _cfg(tmp_path, tokenizer)  # writes the tiny policy and the prompts
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n' + line + "\n")

    def loaded(*a, **k):
        raise AssertionError("a model was loaded before the prompts were validated")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", loaded)
    monkeypatch.setattr(cfg.prompts, "train", str(bad))
    with pytest.raises(DataError) as info:
        train_ppo(cfg)
    msg = str(info.value)
    assert msg.startswith(f"{bad}:2: ") and (field is None or f"field '{field}'" in msg) and fragment in msg, msg


def test_fused_scoring_is_the_unfused_computation(tokenizer, tmp_path, monkeypatch):
    """The whole batch is one minibatch and one micro-batch: the first update step's actor and
    critic forwards also give logp_old and V_old. Two iterations land where the separate scoring
    forwards land, with two forwards fewer per iteration."""
    from transformers import AutoModelForCausalLM

    from rlhfkit.trainers import pg_score

    calls = []
    real = pg_score.causal_logprobs
    monkeypatch.setattr(pg_score, "causal_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    metrics, weights, n_calls = {}, {}, {}
    for fuse in (False, True):
        calls.clear()
        out = tmp_path / f"run-{fuse}"
        cfg = _cfg(tmp_path, tokenizer, rollout={"n": 2, "max_new_tokens": 6}, mini_batch_size=8, fuse_scoring=fuse,
                   kl={"coef": 0.05}, train={"batch_size": 4, "micro_batch_size": 8, "max_steps": 2,
                                             "output_dir": str(out)})
        train_ppo(cfg)
        metrics[fuse], n_calls[fuse] = read_metrics(out), len(calls)
        weights[fuse] = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    # per iteration: actor scoring + reference + 2 epochs -> the reference + 2 epochs
    assert n_calls == {False: 2 * 4, True: 2 * 3}
    for a, b in zip(metrics[False], metrics[True], strict=True):
        assert (a["score/fused"], b["score/fused"]) == (0.0, 1.0)
        for key in ("reward/score_mean", "objective/kl", "policy/entropy", "loss/policy", "loss/value",
                    "policy/grad_norm", "value/grad_norm", "value/explained_variance", "value/mean"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
        assert abs(b["policy/ratio_first"] - 1.0) < 1e-6
    assert metrics[True][1]["objective/kl"] > 0  # the second iteration is off the reference
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "policy").state_dict()
    assert max((weights[True][k] - base[k]).abs().max().item() for k in base) > 1e-3
    for k in base:
        torch.testing.assert_close(weights[True][k], weights[False][k], atol=1e-4, rtol=0)


def test_fusable_needs_one_minibatch_one_micro_batch_and_no_dropout(tiny_model):
    from rlhfkit.trainers.pg_update import fusable

    assert fusable(8, 8, 8, tiny_model, None)
    assert not fusable(16, 8, 8, tiny_model)  # two minibatches: the second starts from moved weights
    assert not fusable(8, 8, 4, tiny_model)
    for m in tiny_model.modules():  # train-mode forwards would differ from logp_old's eval mode
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.1
    assert not fusable(8, 8, 8, tiny_model)


def _ptx_file(path):
    from conftest import write_jsonl

    words = ["blue", "green", "sea", "sky", "story", "red"]
    return write_jsonl(path, [{"prompt": f"Say {w} {i}", "response": " ".join([w] * (1 + i % 4)) + " again"}
                              for i, w in enumerate(words * 3)])


def test_ptx_gradient_is_coef_times_the_token_mean_nll_of_its_batch(tokenizer, tmp_path):
    """The PTX term adds gamma * (mean NLL over the batch's response tokens). Computed in
    padded micro-batches of unequal size, its gradient must equal that of a naive per-example
    computation of the same quantity."""
    from rlhfkit.config import PTXSection
    from rlhfkit.models import tiny_causal_lm
    from rlhfkit.trainers.pg_setup import load_ptx
    from rlhfkit.trainers.pg_update import ptx_backward
    from rlhfkit.training import batch_indices

    section = PTXSection(data=str(_ptx_file(tmp_path / "ptx.jsonl")), coef=0.5, batch_size=6, max_length=64)
    ptx = load_ptx(section, tokenizer, micro_batch_size=4, seed=3)  # micro-batches of 4 and 2 rows
    model = tiny_causal_lm(tokenizer, seed=1)
    mean_nll = ptx_backward(SingleProcess(), model, ptx, opt_step=2)
    fast = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    total, tokens = 0.0, 0
    for i in batch_indices(len(ptx.examples), 6, 2, 3):  # the same examples, one at a time, unpadded
        ex = ptx.examples[i]
        ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor(ex["labels"][1:])
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        keep = labels != -100
        total = total - logp[keep].gather(-1, labels[keep][:, None]).sum()
        tokens += int(keep.sum())
    (0.5 * total / tokens).backward()
    assert tokens >= 20 and abs(float(mean_nll) - float(total.detach()) / tokens) < 1e-4
    for n, p in model.named_parameters():
        torch.testing.assert_close(fast[n], p.grad, rtol=1e-4, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")


def test_ppo_with_ptx_learns_its_data_alongside_the_reward(tokenizer, tmp_path):
    """With ptx.coef > 0 the actor's NLL on the PTX data (logged as loss/ptx) falls over the run."""
    cfg = _cfg(tmp_path, tokenizer, ptx={"data": str(_ptx_file(tmp_path / "ptx.jsonl")), "coef": 1.0,
                                         "batch_size": 6, "max_length": 64})
    train_ppo(cfg)
    rows = read_metrics(tmp_path / "run")
    ptx = [r["loss/ptx"] for r in rows]
    assert len(ptx) == 8 and sum(ptx[-2:]) / 2 < 0.8 * sum(ptx[:2]) / 2, ptx


def test_ppo_with_plain_text_ptx_learns_the_text(tokenizer, tmp_path):
    """Plain pretraining text as PTX data (a .txt file): loss/ptx, the NLL of all its tokens, falls."""
    txt = tmp_path / "ptx.txt"
    txt.write_text("\n\n".join(" ".join([w] * 6) + " again" for w in ["blue", "green", "sea", "sky", "story", "red"]))
    cfg = _cfg(tmp_path, tokenizer, ptx={"data": str(txt), "coef": 1.0, "batch_size": 6, "max_length": 64})
    train_ppo(cfg)
    ptx = [r["loss/ptx"] for r in read_metrics(tmp_path / "run")]
    assert len(ptx) == 8 and sum(ptx[-2:]) / 2 < 0.8 * sum(ptx[:2]) / 2, ptx


@pytest.mark.parametrize("head", [{}, {"head_hidden": 4, "head_embeddings": True, "head_ensemble": 2}])
def test_ppo_takes_a_cut_reward_model_as_reward_and_critic(tokenizer, tmp_path, head):
    """A reward model cut to 1 of the policy's 2 layers (rm backbone_layers) scores PPO's samples
    through rm:DIR and initialises the critic (critic_init: reward), which stays 1 layer deep;
    with a token head reading the input embeddings (an ensemble of two), the critic keeps it."""
    import json as _json
    import math

    from rlhfkit.config import RewardConfig
    from rlhfkit.trainers.reward import train_reward_model

    policy = _cfg(tmp_path, tokenizer).model.name  # writes the tiny policy
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(_json.dumps({"prompt": f"Say {w}", "chosen": f"{w} is lovely.", "rejected": f"{w}."})
                             + "\n" for w in ("red", "blue", "green", "pink") * 4))
    rm = load_config(RewardConfig, data={
        "model": {"name": policy}, "data": {"train": str(pairs), "max_length": 48}, "head_init": "probe",
        "pooling": "mean", "backbone_layers": 1, **head,
        "train": {"output_dir": str(tmp_path / "rm"), "epochs": 0, "batch_size": 8, "micro_batch_size": 8,
                  "progress": False}})
    train_reward_model(rm)
    # the critic barely moves (lr 1e-12), so what it saves is what it started from: the RM itself
    cfg = _cfg(tmp_path, tokenizer, critic_init="reward", reward={"spec": f"rm:{tmp_path / 'rm'}"},
               train={"max_steps": 2}, critic_optim={"lr": 1e-12})
    train_ppo(cfg)
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss/value"]) for r in rows)
    critic = _json.loads((tmp_path / "run" / "critic" / "config.json").read_text())
    assert critic["num_hidden_layers"] == 1
    assert (critic.get("reward_head_hidden"), critic.get("reward_head_embeddings")) == (
        (8, True) if head else (None, None))
    from safetensors.torch import load_file

    started, saved = (load_file(str(d / "model.safetensors"))
                      for d in (tmp_path / "rm" / "model", tmp_path / "run" / "critic"))
    assert set(saved) == set(started) and any(k.startswith("score") for k in saved)
    for k, w in started.items():  # every weight, the (token) head's included, is the RM's
        torch.testing.assert_close(saved[k], w, atol=1e-6, rtol=0, msg=k)
