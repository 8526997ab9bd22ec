"""Wiring of the policy-gradient update's loss terms, checked against naive references computed
here: the KL-to-reference loss term (GRPO) adds +kl_coef x the token-mean k3 KL to the actor loss."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from pg_utils import base_config

from rlhfkit.config import load_config
from rlhfkit.models import tiny_causal_lm
from rlhfkit.rollout import Experience
from rlhfkit.trainers.grpo import GRPOConfig
from rlhfkit.trainers.pg_update import micro_loss


def _naive_response_logprobs(model, prompts: list[list[int]], responses: list[list[int]], R: int) -> torch.Tensor:
    """(B, R) log p(response token | everything before it), each row run alone without padding; 0 after."""
    out = torch.zeros(len(prompts), R)
    with torch.no_grad():
        for b, (p, r) in enumerate(zip(prompts, responses)):
            ids = torch.tensor([p + r])
            logits = model(input_ids=ids).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1)
            for t, tok in enumerate(r):
                out[b, t] = logp[len(p) + t - 1, tok]
    return out


def test_kl_loss_term_by_hand_and_the_bias_correction_weights_k3_by_the_ratio_to_the_rollout_policy():
    from types import SimpleNamespace

    from rlhfkit.trainers.pg_update import kl_loss_term

    logp, old, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -2.0]]), torch.tensor([[-1.2, -1.0]])
    mb = SimpleNamespace(logprobs=old, ref_logprobs=ref)
    k3 = (ref - logp).exp() - 1 - (ref - logp)  # q/p - 1 - log q/p, q the reference
    torch.testing.assert_close(kl_loss_term("k1", logp, mb), logp - ref)
    torch.testing.assert_close(kl_loss_term("k3", logp, mb), k3)
    torch.testing.assert_close(kl_loss_term("k3-bias-corrected", logp, mb), (logp - old).exp() * k3)


def test_kl_loss_term_adds_coef_times_token_mean_k3_to_the_actor_loss(tokenizer, tmp_path):
    ref = tiny_causal_lm(tokenizer, hidden_size=32, layers=1, heads=2, seed=0).eval()
    actor = copy.deepcopy(ref)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move the policy away from the reference, so that the KL is clearly > 0
        for p in actor.parameters():
            p.add_(0.5 * p.abs().mean() * torch.randn(p.shape, generator=gen))
    actor.train()

    pad = tokenizer.pad_token_id
    prompts = [[101, 102], [103, 104, 105], [106]]
    responses = [[201, 202, 203], [204, 205, 206, 207], [208, 209]]
    P, R = max(map(len, prompts)), max(map(len, responses))
    exp = Experience(
        prompt_ids=torch.tensor([[pad] * (P - len(p)) + p for p in prompts]),
        prompt_mask=torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts]),
        response_ids=torch.tensor([r + [pad] * (R - len(r)) for r in responses]),
        response_mask=torch.tensor([[1] * len(r) + [0] * (R - len(r)) for r in responses]),
        logprobs=None, eos=torch.tensor([True] * 3), prompt_index=torch.tensor([0, 1, 2]), pad_token_id=pad)
    mask = exp.response_mask.float()
    logp_actor = _naive_response_logprobs(actor, prompts, responses, R)
    logp_ref = _naive_response_logprobs(ref, prompts, responses, R)
    exp.logprobs = logp_actor.clone()  # on-policy: ratio 1
    exp.ref_logprobs = logp_ref
    exp.advantages = torch.tensor([[1.0, -0.5, 0.25, 0.0], [0.5, 0.5, -1.0, 2.0], [-1.0, 0.3, 0.0, 0.0]]) * mask

    # naive token-mean k3 = E[q/p - 1 - log(q/p)] over the valid response tokens
    log_q_over_p = logp_ref - logp_actor
    k3 = torch.exp(log_q_over_p) - 1.0 - log_q_over_p
    n_tokens = float(mask.sum())
    kl_mean = float((k3 * mask).sum()) / n_tokens
    assert kl_mean > 1e-3, kl_mean  # the perturbation really moved the policy

    coef = 0.5
    over = dict(rollout={"n": 2, "max_new_tokens": 4}, mini_batch_size=16, kl_coef=coef, kl_kind="k3",
                loss_agg="token-mean")
    cfg = load_config(GRPOConfig, data=base_config(tmp_path, tokenizer, **over))
    assert cfg.kl_loss() == (coef, "k3")
    no_kl = dataclasses.replace(cfg, kl_coef=0.0)
    with_kl, m = micro_loss(cfg, actor, None, exp, n_tokens)
    without, _ = micro_loss(no_kl, actor, None, exp, n_tokens)
    # the KL term's contribution: +coef x the token-mean KL (a penalty: it raises the loss)
    diff = with_kl["actor"] - without["actor"]
    assert float(diff.detach()) > 0
    assert abs(float(diff.detach()) - coef * kl_mean) < 1e-4 * max(1.0, coef * kl_mean)
    assert abs(float(m["loss/kl"]) - kl_mean) < 1e-4 * max(1.0, kl_mean)
    # on-policy with these advantages, the surrogate alone is -token-mean(A)
    assert abs(float(without["actor"].detach()) + float((exp.advantages * mask).sum()) / n_tokens) < 1e-5

    # and its gradient is coef x the gradient of the naive KL
    actor.zero_grad()
    diff.backward()
    g = {n: p.grad.clone() for n, p in actor.named_parameters() if p.grad is not None}
    actor.zero_grad()
    logp_all = []
    for p, r in zip(prompts, responses):
        row = torch.tensor([p + r])
        lp = torch.log_softmax(actor(input_ids=row).logits[0].float(), dim=-1)
        logp_all.append(torch.stack([lp[len(p) + t - 1, tok] for t, tok in enumerate(r)]))
    naive = sum(((torch.exp(logp_ref[b, :len(r)] - lp) - 1.0 - (logp_ref[b, :len(r)] - lp)).sum()
                 for b, (lp, r) in enumerate(zip(logp_all, responses)))) / n_tokens
    (coef * naive).backward()
    for n, p in actor.named_parameters():
        if n in g:
            torch.testing.assert_close(g[n], p.grad, atol=1e-5, rtol=1e-3)


def test_heldout_kl_is_the_policy_minus_reference_logprob_summed_over_each_response(tokenizer, monkeypatch):
    """eval/kl: sum_t log pi(a_t) - log pi_ref(a_t) per response (k1), averaged over prompts; one
    sample per prompt, whatever rollout.n."""
    from rlhfkit.config import RolloutSection
    from rlhfkit.parallel import SingleProcess
    from rlhfkit.rollout.prompts import PromptItem, render_prompt_ids
    from rlhfkit.trainers import pg_eval

    # a reference 0.5 nats below the policy on every token: KL = 0.5 x the response length
    monkeypatch.setattr(pg_eval, "score_logprobs",
                        lambda *a, policy, **k: {"logp": policy["logp"], "ref_logp": policy["logp"] - 0.5})
    msgs = [[{"role": "user", "content": t}] for t in ("a", "b", "c")]
    items = [PromptItem(render_prompt_ids(tokenizer, m), m, m[0]["content"]) for m in msgs]
    out = pg_eval.heldout_metrics(tiny_causal_lm(tokenizer), None, items,
                                  RolloutSection(n=4, temperature=1.0, max_new_tokens=6), tokenizer, SingleProcess(),
                                  gold=lambda texts, responses, **kw: [float(t == "a") for t in texts])
    assert out["eval/prompts"] == 3 and out["eval/length_mean"] > 0
    assert out["eval/kl"] == pytest.approx(0.5 * out["eval/length_mean"])
    assert out["eval/gold_mean"] == pytest.approx(1 / 3)
