"""Step 2 of PPO, GRPO and RLOO: score the sampled responses, without gradients.

- logp_old: the actor's log-probs of the sampled tokens in eval mode, recomputed with the *same*
  forward (`models.forward`) the update uses, on the same padded tensors: the KV-cache decoding path
  is mathematically equal but not bit-identical, and the first PPO ratio must be exactly 1. The
  rollout's own log-probs are kept only for a diagnostic (`rollout/logprob_diff_max`);
- logp_ref: the reference's (with LoRA: the actor with its adapters switched off);
- V_old: the critic's values (PPO);
- the sequence score: the reward function, clipped, and the fixed score for responses without EOS.
"""

from __future__ import annotations

from typing import Any

import torch

from rlhfkit.algos import kl_estimate, masked_sum
from rlhfkit.judges import reward_metrics
from rlhfkit.models.forward import causal_logprobs, shared_token_values
from rlhfkit.models.packing import packs, shared_prompt_logprobs
from rlhfkit.models.lora import adapters_disabled
from rlhfkit.rollout import Experience, decode_responses, response_metrics


def policy_logprobs(model, mb: Experience, share_prompt: bool, with_entropy: bool = False):
    """(b, R) log-probs of the stored responses under `model`: each [prompt; response] row on its
    own, or with ``share_prompt`` the rows of one prompt packed together (the same values up to
    float rounding, with the prompt computed once per micro-batch). The log-probs are at the
    temperature the responses were sampled at (`Experience.temperature`)."""
    if share_prompt and packs(model):
        return shared_prompt_logprobs(model, mb.prompt_ids, mb.prompt_mask, mb.response_ids, mb.response_mask,
                                      mb.prompt_index, mb.pad_token_id, with_entropy=with_entropy,
                                      temperature=mb.temperature)
    return causal_logprobs(model, mb.input_ids(), mb.attention_mask(), keep_last=mb.response_ids.shape[1],
                           with_entropy=with_entropy, shared_prefix=mb.shared_prefix, temperature=mb.temperature)


def response_values(critic, ids: torch.Tensor, mask: torch.Tensor, R: int, shared_prefix: int = 0) -> torch.Tensor:
    """(B, R) V(t): the critic's output at the state *before* response token t, i.e. at position
    P-1+t of the (B, P+R) sequence (the last prompt token is the state before the first action).
    ``shared_prefix``: the rows' common system turn (`Experience.shared_prefix`), computed once."""
    P = ids.shape[1] - R
    read = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    read[:, P - 1:P - 1 + R] = True
    v = shared_token_values(critic, ids, mask, shared_prefix, read=read)  # (B, P+R)
    return v[:, P - 1:P - 1 + R]


def _batched(fn, exp: Experience, micro: int) -> Any:
    """Apply fn(micro-batch Experience) over row micro-batches and concatenate the outputs."""
    outs = [fn(exp.select(slice(i, i + micro))) for i in range(0, len(exp), micro)]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts, dim=0) for parts in zip(*outs))
    return torch.cat(outs, dim=0)


@torch.no_grad()
def score_logprobs(actor, ref, exp: Experience, micro: int, share_prompt: bool = False,
                   policy: dict | None = None) -> dict:
    """logp_old + entropy (actor, eval mode) and logp_ref, (B, R) each. With ``share_prompt`` each
    micro-batch's rows of one prompt are packed (as the update does), so logp_old comes from the same
    computation as the first minibatch's logp. ``policy``: logp_old and entropy already computed
    (PPO's fused first forward); only the reference runs."""
    def over(model, with_entropy=False):
        return _batched(lambda mb: policy_logprobs(model, mb, share_prompt, with_entropy), exp, micro)

    was_training = actor.training
    actor.eval()
    try:
        logp, ent = over(actor, with_entropy=True) if policy is None else (policy["logp"], policy["entropy"])
        if ref is None:  # LoRA: the reference is the same weights with the adapters switched off
            with adapters_disabled(actor):
                ref_logp = over(actor)
        else:
            ref_logp = over(ref)
    finally:
        actor.train(was_training)
    return {"logp": logp, "entropy": ent, "ref_logp": ref_logp}


@torch.no_grad()
def score_values(critic, exp: Experience, micro: int) -> torch.Tensor:
    R = exp.response_ids.shape[1]
    was_training = critic.training
    critic.eval()
    try:
        return _batched(lambda mb: response_values(critic, mb.input_ids(), mb.attention_mask(), R, mb.shared_prefix),
                        exp, micro)
    finally:
        critic.train(was_training)


def score_sequences(exp: Experience, items, responses: list[str], reward_fn, section,
                    group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(raw, shaped, per-function) sequence scores: raw (B,) the combined reward; shaped = clipped to
    [-clip, clip], then the fixed missing-EOS score for responses that never emitted EOS; per-function
    (B, F) (NaN where a function returned None), or None for a plain reward function. The reward
    functions receive each prompt record's fields."""
    rows = [items[i] for i in exp.prompt_index.tolist()]
    texts, messages = [r.text for r in rows], [r.messages for r in rows]
    per = None
    if hasattr(reward_fn, "score"):  # a RewardSet: several functions, with the records' fields
        out = reward_fn.score(texts, responses, messages=messages, fields=[r.fields for r in rows],
                              group_size=group_size)
        raw, per = out.combined.float(), out.per_function
    else:
        scores = reward_fn(texts, responses, messages=messages)
        raw = torch.tensor(scores, dtype=torch.float32, device=exp.response_ids.device)
    raw = raw.to(exp.response_ids.device)
    shaped = raw.clamp(-section.clip, section.clip) if section.clip > 0 else raw.clone()
    if section.missing_eos_score is not None:
        shaped = torch.where(exp.eos, shaped, torch.full_like(shaped, section.missing_eos_score))
    return raw, shaped, per


def score_experience(pr, exp: Experience, items, actor, policy: dict | None = None) -> tuple[Experience, dict,
                                                                                              list[str]]:
    """Fill logprobs (logp_old), ref_logprobs and scores of this rank's rows; the metrics are over the
    global batch. ``policy`` ({"logp", "entropy"}, detached): logp_old computed by the caller.
    Returns (exp, metrics, decoded responses)."""
    cfg, strategy = pr.cfg, pr.strategy
    mask = exp.response_mask.bool()
    rollout_logp = exp.logprobs
    with strategy.autocast():
        lp = score_logprobs(actor, pr.ref, exp, cfg.train.micro_batch_size, cfg.share_prompt, policy=policy)
    exp.logprobs, exp.ref_logprobs = lp["logp"], lp["ref_logp"]
    responses = decode_responses(exp, pr.tokenizer)
    raw, exp.scores, per_function = score_sequences(exp, items, responses, pr.reward_fn, cfg.reward, cfg.rollout.n)
    raw_all = strategy.gather(raw)
    ent = strategy.sum(torch.stack([masked_sum(lp["entropy"], mask), mask.sum().float()]))  # (sum, count)
    metrics = {
        "reward/score_mean": raw_all.mean(),
        "reward/score_std": raw_all.std() if len(raw_all) > 1 else raw.new_zeros(()),
        "reward/shaped_mean": strategy.gather(exp.scores).mean(),
        "policy/entropy": ent[0] / ent[1].clamp(min=1),
        **response_metrics(exp, responses, strategy),
    }
    if per_function is not None and per_function.shape[1] > 1:  # each function's own scores, by name
        metrics.update(reward_metrics(strategy.gather(per_function), pr.reward_fn.names))
    if rollout_logp is not None:  # KV-cache decoding vs the training forward: should be ~1e-5 or less
        diff = torch.where(mask, (rollout_logp - exp.logprobs).abs(), 0.0).max()
        metrics["rollout/logprob_diff_max"] = strategy.max(diff)
    return exp, metrics, responses


def sequence_kl(exp: Experience, kind: str) -> torch.Tensor:
    """(B,) KL(pi_old || pi_ref) estimate per response: the per-token estimator summed over tokens."""
    kl = kl_estimate(exp.logprobs, exp.ref_logprobs, kind)
    return torch.where(exp.response_mask.bool(), kl, 0.0).sum(-1)


def log_samples(pr, step: int, exp: Experience, items, responses: list[str], k: int = 3) -> None:
    """A few (prompt, response, score) records of this rank-0 batch to samples.jsonl and TensorBoard."""
    rows = []
    for i in range(min(k, len(exp))):
        item = items[int(exp.prompt_index[i])]
        rows.append({"prompt": item.text, "response": responses[i], "score": float(exp.scores[i]),
                     "eos": bool(exp.eos[i])})
    pr.run.logger.samples(step, rows)
