"""Held-out evaluation during policy-gradient training (``prompts.eval`` and ``train.eval_every``).

One response per held-out prompt from the current policy, sampled from a random stream of its own
(the same at every evaluation, so successive evaluations differ by the policy, not by the dice,
and the training stream is left untouched), then:
- eval/proxy_mean: the training reward (the reward model for PPO), unclipped; with
  ``reward.combine: normalize_then_sum`` the weighted sum of the raw scores (z-scores within the
  evaluation batch would average to 0);
- eval/gold_mean: the gold judge ``reward.gold``, when set: proxy rising while gold falls is
  over-optimisation;
- eval/kl: KL(pi || pi_ref) per response at the sampling temperature, the k1 estimate summed over its tokens;
- eval/length_mean, eval/eos_frac.
"""

from __future__ import annotations

import dataclasses

import torch

from rlhfkit.rollout import decode_responses, rank_stream_seed, rollout
from rlhfkit.trainers.pg_score import score_logprobs

EVAL_STREAM = -1  # the "step" of the evaluation's sampling stream (training uses steps >= 0)


def evaluate_policy(pr, actor) -> dict:
    """The held-out metrics of the module docstring for a policy-gradient run's actor."""
    cfg = pr.cfg
    return heldout_metrics(actor, pr.ref, pr.eval_prompts, cfg.rollout, pr.tokenizer, pr.strategy,
                           proxy=pr.reward_fn.absolute(), gold=pr.gold_fn, seed=cfg.train.seed,
                           micro_batch_size=cfg.train.micro_batch_size)


@torch.no_grad()
def heldout_metrics(policy, ref, prompts, rollout_settings, tokenizer, strategy, *, proxy=None, gold=None,
                    seed: int = 0, micro_batch_size: int = 8) -> dict:
    """One sample per prompt of ``prompts`` from ``policy``, scored as the module docstring says, over
    every rank's share. ``ref``: the reference model, or None for ``policy`` with its LoRA adapters
    off. ``proxy`` / ``gold``: pointwise reward functions (either may be None). Every prompt is
    scored, on any number of processes, except that sharded models (whose forwards are collectives)
    take equal shares: the last ``len(prompts) % world_size`` are then left out (``eval/prompts``)."""
    usable = len(prompts) - len(prompts) % strategy.world_size if strategy.lockstep_forwards else len(prompts)
    if not usable:
        return {}
    items = strategy.shard(prompts[:usable])
    names = ["kl", "length", "eos", *(name for name, fn in (("proxy", proxy), ("gold", gold)) if fn is not None)]
    if items:
        columns = _scored(policy, ref, items, rollout_settings, tokenizer, strategy, proxy, gold, seed,
                          micro_batch_size)
        local = torch.stack([columns[name].float() for name in names], dim=1)
    else:  # fewer prompts than processes: this rank still joins the gather, with no rows
        local = torch.zeros((0, len(names)), device="cpu")  # as the scored columns; the gather moves it
    table = strategy.gather(local)  # (N, columns)
    means = table.mean(0).tolist()
    out = {f"eval/{name}_mean" if name in ("proxy", "gold", "length") else f"eval/{name}": m
           for name, m in zip(names, means)}
    out["eval/eos_frac"] = out.pop("eval/eos")
    out["eval/prompts"] = len(table)
    return out


def _scored(policy, ref, items, rollout_settings, tokenizer, strategy, proxy, gold, seed: int,
            micro_batch_size: int) -> dict[str, torch.Tensor]:
    """Column -> (rows,) of this rank's prompts: kl, length, eos, and proxy and gold where given."""
    settings = dataclasses.replace(rollout_settings, n=1)
    exp = rollout(policy, items, settings, tokenizer, strategy=strategy,
                  seed=rank_stream_seed(seed, EVAL_STREAM, strategy.rank))
    with strategy.autocast():  # the rollout's own log-probs (at its temperature); only the reference runs
        lp = score_logprobs(policy, ref, exp, micro_batch_size, share_prompt=False,
                            policy={"logp": exp.logprobs, "entropy": None})
    mask = exp.response_mask.bool()
    kl = torch.where(mask, lp["logp"] - lp["ref_logp"], 0.0).sum(-1)  # (B,) k1 per response
    responses = decode_responses(exp, tokenizer)
    texts, messages = [it.text for it in items], [it.messages for it in items]
    columns = {"kl": kl.cpu(), "length": exp.response_lengths().float().cpu(), "eos": exp.eos.float().cpu()}
    fields = [it.fields for it in items]
    for name, fn in (("proxy", proxy), ("gold", gold)):
        if fn is not None:
            columns[name] = torch.tensor(fn(texts, responses, messages=messages, fields=fields))
    return columns
