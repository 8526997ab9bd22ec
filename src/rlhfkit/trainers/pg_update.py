"""Step 5 of PPO, GRPO and RLOO: epochs of clipped-surrogate updates over minibatches of the stored
experience, reading the config under the names users write (ppo_epochs, mini_batch_size, clip_eps,
clip_eps_high, loss_agg, share_prompt; PPO's vf_coef and value_clip_eps; GRPO's KL loss term).

Each minibatch is one optimizer step of the actor (and of the critic, with its own optimizer and
clipping), accumulated over micro-batches (`training.accumulate`) whose losses are divided by the
minibatch's global token (or row) count, so the accumulated gradient equals the full-minibatch
gradient exactly, on any number of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhfkit.algos import (
    agg_loss,
    bias_corrected_kl,
    kl_estimate,
    masked_sum,
    ppo_policy_loss,
    sequence_policy_loss,
    value_loss,
)
from rlhfkit.data import batch_to_device
from rlhfkit.models.lora import has_dropout
from rlhfkit.rollout import Experience
from rlhfkit.trainers.pg_score import policy_logprobs, response_values
from rlhfkit.trainers.pg_setup import PTXData, Trained
from rlhfkit.trainers.sft import labelled_tokens, sft_batch_loss
from rlhfkit.training import accumulate, batch_indices, micro_batches, normalizer


@dataclass
class FirstForward:
    """The update's first forwards, run before the advantages existed (fused scoring): the
    actor's log-probs and the critic's values of every row, with their graphs. They serve as the
    first minibatch's forwards when that minibatch is the whole batch in one micro-batch: the
    weights have not moved since the rollout, so logp_old and V_old are these values, detached,
    and no separate scoring forward is needed. Rows are in the order of the Experience."""

    logp: torch.Tensor  # (B, R), with grad
    values: torch.Tensor | None  # (B, R), with grad (None without a critic)

    def select(self, rows: list[int]) -> FirstForward:
        idx = torch.as_tensor(rows, device=self.logp.device)
        return FirstForward(self.logp[idx], None if self.values is None else self.values[idx])


def first_forward(cfg, strategy, exp: Experience, mini_batch_size: int, actor, critic=None
                  ) -> tuple[FirstForward | None, dict | None]:
    """Fused scoring (``cfg.fuse_scoring``, when `fusable`): run the update's first forwards now,
    with their graphs (the actor's log-probs and entropy; the critic's values when there is one).
    Returns the `FirstForward` and the detached {"logp", "entropy"} that scoring takes as logp_old,
    or (None, None) when the batch cannot be fused."""
    if not (cfg.fuse_scoring and fusable(len(exp), mini_batch_size, cfg.train.micro_batch_size, actor, critic)):
        return None, None
    with strategy.autocast():
        logp, ent = policy_logprobs(actor, exp, cfg.share_prompt, with_entropy=True)
        values = None if critic is None else response_values(critic, exp.input_ids(), exp.attention_mask(),
                                                             exp.response_ids.shape[1], exp.shared_prefix)
    return FirstForward(logp, values), {"logp": logp.detach(), "entropy": ent.detach()}


def fusable(n_rows: int, mini_batch_size: int, micro_batch_size: int, *models) -> bool:
    """Whether the first minibatch can reuse forwards run before the advantages (`FirstForward`):
    it must be the whole batch in one micro-batch, and the models must compute the same function
    in train mode as in eval mode (no active dropout), since logp_old is defined in eval mode."""
    if n_rows > mini_batch_size or n_rows > micro_batch_size:
        return False
    return not any(model is not None and has_dropout(model) for model in models)


def rows_by_prompt(rows: list[int], prompt_index: torch.Tensor) -> list[int]:
    """A minibatch's rows reordered so that rows of one prompt are adjacent, in row order within a
    prompt. The minibatch, and so its gradient, is the same set of rows; its micro-batches then
    hold runs of one prompt's responses to pack (``share_prompt``), and, when the minibatch is the
    whole batch, the same rows in the same order as the scoring forward's micro-batches: in
    bf16/fp16 the first minibatch's ratio is then exactly 1, not 1 +- rounding."""
    idx = prompt_index.tolist()
    return sorted(rows, key=lambda r: (idx[r], r))


def forward_tokens(mb: Experience, share_prompt: bool) -> int:
    """Real tokens a policy forward over ``mb`` runs: every row's prompt and response, or with
    ``share_prompt`` each distinct prompt once plus the responses (for FLOP counts)."""
    prompt_lens = mb.prompt_mask.sum(-1)
    if share_prompt:
        one_row_each: dict[int, int] = {}
        for b, g in enumerate(mb.prompt_index.tolist()):
            one_row_each.setdefault(g, b)
        prompt_lens = prompt_lens[list(one_row_each.values())]
    return int(prompt_lens.sum()) + int(mb.response_mask.sum())


def surrogate_loss(cfg, logp, mb: Experience, norm: float):
    """The clipped surrogate at the configured ratio level: per token (advantages (b, R)) or one ratio per
    response (`algos.sequence_policy_loss`, the response's advantage; ``norm`` then counts rows)."""
    rmask = mb.response_mask
    level = cfg.policy_ratio_level()
    if level == "token":
        return ppo_policy_loss(logp, mb.logprobs, mb.advantages, rmask, clip_eps=cfg.clip_eps,
                               clip_eps_high=cfg.clip_eps_high, agg=cfg.loss_agg, normalizer=norm)
    seq_adv = masked_sum(mb.advantages, rmask, dim=-1) / rmask.sum(-1).clamp(min=1)  # constant per row
    return sequence_policy_loss(logp, mb.logprobs, seq_adv, rmask, clip_eps=cfg.clip_eps,
                                clip_eps_high=cfg.clip_eps_high, log_ratio="sum" if level == "sequence" else "mean",
                                normalizer=norm)


def kl_loss_term(kind: str, logp, mb: Experience) -> torch.Tensor:
    """(b, R) per-token KL-to-reference loss: `kl_estimate` of ``kind``, or the bias-corrected k3."""
    if kind == "k3-bias-corrected":
        return bias_corrected_kl(logp, mb.ref_logprobs, mb.logprobs)
    return kl_estimate(logp, mb.ref_logprobs, kind)


def micro_loss(cfg, actor, critic, mb: Experience, norm: float, first: FirstForward | None = None):
    """Losses of one micro-batch (already divided by the minibatch's global normaliser), by model
    ({"actor": ..., "critic": ...}), and its metrics. ``first``: its forwards, already run."""
    rmask = mb.response_mask
    logp = first.logp if first is not None else policy_logprobs(actor, mb, cfg.share_prompt)  # (b, R) with grad
    loss, pm = surrogate_loss(cfg, logp, mb, norm)
    metrics = {"loss/policy": loss.detach(), "policy/clipfrac": pm["clipfrac"],
               "policy/approx_kl": pm["approx_kl"], "policy/ratio_mean": pm["ratio_mean"]}
    if "approx_kl_trl" in pm:
        metrics["policy/approx_kl_trl"] = pm["approx_kl_trl"]
    losses = {"actor": loss}
    kl_coef, kl_kind = cfg.kl_loss()
    if kl_coef > 0:
        kl = agg_loss(kl_loss_term(kl_kind, logp, mb), rmask, mode=cfg.loss_agg, normalizer=norm)
        losses["actor"] = loss + kl_coef * kl
        metrics["loss/kl"] = kl.detach()
    if critic is not None and cfg.vf_coef > 0:
        R = mb.response_ids.shape[1]
        v = first.values if first is not None else response_values(critic, mb.input_ids(), mb.attention_mask(), R,
                                                                                  mb.shared_prefix)
        vl, vm = value_loss(v, mb.values, mb.returns, rmask, clip_eps=cfg.value_clip_eps, agg=cfg.loss_agg,
                            normalizer=norm)
        losses["critic"] = cfg.vf_coef * vl
        metrics.update({"loss/value": vl.detach(), "value/clipfrac": vm["vf_clipfrac"]})
    return losses, metrics


def ptx_backward(strategy, actor, ptx: PTXData, opt_step: int) -> float:
    """PTX term: gamma_ptx x the actor's token NLL on a batch of SFT data, backpropagated (it is the
    actor's last backward before its step). Returns this rank's share of the global token mean (the
    mean over ranks, as metrics are reduced, is the global batch's mean NLL)."""
    idx = batch_indices(len(ptx.examples), ptx.batch_size, opt_step, ptx.seed)
    mine = strategy.shard([ptx.examples[i] for i in idx])
    norm = normalizer(strategy, labelled_tokens(mine), per_rank=True)

    def loss_fn(chunk):
        loss, nll_sum, _ = sft_batch_loss(actor, batch_to_device(ptx.collator(chunk), strategy.device), norm)
        return ptx.coef * loss, {"nll": nll_sum.cpu()}

    sums = accumulate(strategy, actor, micro_batches(mine, ptx.micro_batch_size), loss_fn)
    return float(sums["nll"] / norm)


class Means:
    """Weighted running means of metrics (token-weighted or per minibatch)."""

    def __init__(self):
        self.num: dict[str, float] = {}
        self.den: dict[str, float] = {}

    def add(self, metrics: dict, weight: float = 1.0) -> None:
        for k, v in metrics.items():
            self.num[k] = self.num.get(k, 0.0) + float(v) * weight
            self.den[k] = self.den.get(k, 0.0) + weight

    def merge(self, other: Means) -> None:
        for k in other.num:
            self.num[k] = self.num.get(k, 0.0) + other.num[k]
            self.den[k] = self.den.get(k, 0.0) + other.den[k]

    def result(self) -> dict:
        return {k: v / self.den[k] for k, v in self.num.items() if self.den[k] > 0}

    def reduced(self, strategy) -> Means:
        """The same means over every rank's data: numerators and weights summed over ranks.
        A per-rank loss is its share sum / (global count / W), so for the losses (weight 1 per
        minibatch on each rank) this gives their mean over ranks = the global minibatch loss."""
        if strategy.world_size == 1:
            return self
        keys = sorted(self.num)  # the same keys on every rank (the same code ran), in one order
        both = dict(zip(keys, strategy.sum(torch.tensor([[self.num[k], self.den[k]] for k in keys],
                                                        dtype=torch.float64)).tolist()))
        out = Means()
        for k in self.num:  # keep the logging order
            out.num[k], out.den[k] = both[k]
        return out


def minibatch_backward(cfg, strategy, actor, critic, mb: Experience, token_means: Means,
                       first: FirstForward | None = None, ptx_follows: bool = False) -> dict:
    """Forward/backward of one minibatch in micro-batches; returns its (detached) loss terms.
    ``ptx_follows``: the PTX backward comes next, so the actor's last backward is that one."""
    per_token = cfg.loss_agg == "token-mean" and cfg.policy_ratio_level() == "token"
    count = mb.response_mask.sum() if per_token else torch.tensor(float(len(mb)), device=mb.response_mask.device)
    norm = normalizer(strategy, count, per_rank=True)
    models = {"actor": actor, "critic": critic}
    losses: dict[str, float] = {"update/tokens": 0.0}

    def loss_fn(rows):
        micro = mb.select(rows)
        parts, m = micro_loss(cfg, actor, critic, micro, norm, first)
        losses["update/tokens"] += forward_tokens(micro, cfg.share_prompt)
        for k in [k for k in m if k.startswith("loss/")]:  # shares of the minibatch loss: sum them
            losses[k] = losses.get(k, 0.0) + float(m.pop(k))
        token_means.add(m, weight=float(micro.response_mask.sum()))
        return parts, {}

    accumulate(strategy, models, micro_batches(list(range(len(mb))), cfg.train.micro_batch_size), loss_fn,
               sync={"actor": not ptx_follows, "critic": True})
    return losses


def policy_update(cfg, strategy, guard, exp: Experience, actor: Trained, critic: Trained | None = None,
                  ptx: PTXData | None = None, opt_step: int = 0, first: FirstForward | None = None) -> dict:
    """Step 5: ``cfg.ppo_epochs`` passes over shuffled minibatches of the stored experience.

    cfg: the trainer's config (`pg_setup.PolicyGradientConfig`); ``strategy`` averages or reduces the
    gradients; ``guard`` (`training.StepGuard`) skips non-finite steps.

    Metrics are token-weighted over the whole update (losses: mean over minibatches) and reduced over
    ranks; ``update/tokens`` counts the real tokens the actor's training forwards ran (all ranks).
    `policy/ratio_first` is the ratio mean on the first minibatch of the first epoch: it must be 1.
    ``first``: the first minibatch's forwards, run by the caller before the advantages.
    """
    mini = cfg.mini_batch_size // strategy.world_size  # rows per optimizer step on this rank
    token_means, step_means = Means(), Means()
    ratio_first, computed, n = None, 0.0, len(exp)
    if first is not None and not fusable(n, mini, cfg.train.micro_batch_size):
        raise ValueError("a FirstForward needs the whole batch in the first minibatch and micro-batch")
    critic_model = critic.model if critic is not None else None
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(n).tolist()
        for start in range(0, n, mini):
            rows = rows_by_prompt(order[start:start + mini], exp.prompt_index)
            mb_means = Means()
            reuse, first = (first.select(rows) if first is not None else None), None  # the first minibatch only
            losses = minibatch_backward(cfg, strategy, actor.model, critic_model, exp.select(rows), mb_means, reuse,
                                        ptx_follows=ptx is not None)
            if ratio_first is None:
                ratio_first = mb_means.reduced(strategy).result()["policy/ratio_mean"]
            token_means.merge(mb_means)
            computed += losses.pop("update/tokens")
            if ptx is not None:
                losses["loss/ptx"] = ptx_backward(strategy, actor.model, ptx, opt_step)
            total = torch.tensor(sum(losses.values()))
            _, losses["policy/grad_norm"] = strategy.step(actor.model, actor.optimizer, actor.scheduler,
                                                          actor.max_grad_norm, total, guard)
            if critic is not None:
                _, losses["value/grad_norm"] = strategy.step(critic.model, critic.optimizer, critic.scheduler,
                                                             critic.max_grad_norm, total, guard)
            step_means.add(losses)
            opt_step += 1
    out = {**token_means.reduced(strategy).result(), **step_means.reduced(strategy).result(),
           "policy/ratio_first": ratio_first,
           "update/tokens": float(strategy.sum(torch.tensor(computed, dtype=torch.float64)))}
    out.pop("policy/ratio_mean", None)
    return out
