"""Step 5 of PPO / GRPO / RLOO: epochs of clipped-surrogate updates over minibatches of the stored
experience, micro-batched with a global normaliser so that gradient accumulation is exact; the
value loss when there is a critic, the KL-to-reference loss term (GRPO) and the PTX term.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlhfkit.algos import agg_loss, kl_estimate, ppo_policy_loss, value_loss
from rlhfkit.models import token_values
from rlhfkit.models.forward import causal_logprobs, shared_prompt_logprobs
from rlhfkit.rollout import Experience
from rlhfkit.trainers.common import (
    Runtime, StepGuard, batch_indices, build_optimizer, build_scheduler, micro_batches, optimizer_step,
)

@dataclass
class UpdateSettings:
    """How step 5 runs: epochs over shuffled minibatches, micro-batched, with a global normaliser."""

    epochs: int
    mini_batch_size: int  # rows per optimizer step (this rank)
    micro_batch_size: int  # rows per forward/backward
    clip_eps: float
    clip_eps_high: float | None = None
    agg: str = "token-mean"
    vf_coef: float = 0.0  # PPO: weight of the value loss (needs a critic)
    value_clip_eps: float | None = 0.2
    kl_coef: float = 0.0  # GRPO: weight of the KL-to-reference loss term
    kl_kind: str = "k3"
    max_grad_norm: float = 1.0
    critic_max_grad_norm: float = 1.0
    share_prompt: bool = False  # GRPO/RLOO: pack each prompt's responses into one sequence (prompt once)


def policy_logprobs(model, mb: Experience, share_prompt: bool, with_entropy: bool = False):
    """(b, R) log-probs of the stored responses under `model`: each [prompt; response] row on its
    own, or with ``share_prompt`` the rows of one prompt packed together (the same values up to
    float rounding, with the prompt computed once per micro-batch)."""
    if share_prompt:
        return shared_prompt_logprobs(model, mb.prompt_ids, mb.prompt_mask, mb.response_ids, mb.response_mask,
                                      mb.prompt_index, mb.pad_token_id, with_entropy=with_entropy)
    return causal_logprobs(model, mb.input_ids(), mb.attention_mask(), keep_last=mb.response_ids.shape[1],
                           with_entropy=with_entropy)


def rows_by_prompt(rows: list[int], prompt_index: torch.Tensor) -> list[int]:
    """A minibatch's rows reordered so that rows of one prompt are adjacent (stable: the shuffled
    order is kept within a prompt). The minibatch, and so its gradient, is the same set of rows;
    its micro-batches then hold runs of one prompt's responses to pack (``share_prompt``)."""
    idx = prompt_index.tolist()
    return sorted(rows, key=lambda r: idx[r])


def response_values(critic, ids: torch.Tensor, mask: torch.Tensor, R: int) -> torch.Tensor:
    """(B, R) V(t): the critic's output at the state *before* response token t, i.e. at position
    P-1+t of the (B, P+R) sequence (the last prompt token is the state before the first action)."""
    v = token_values(critic, ids, mask)  # (B, P+R)
    P = ids.shape[1] - R
    return v[:, P - 1:P - 1 + R]


def _micro_loss(actor, critic, mb: Experience, s: UpdateSettings, normalizer: float,
                first: FirstForward | None = None) -> tuple[torch.Tensor, dict]:
    """Loss of one micro-batch (already divided by the minibatch-global normaliser) and its metrics.
    ``first``: this micro-batch's forwards, already run (`FirstForward`)."""
    R = mb.response_ids.shape[1]
    rmask = mb.response_mask
    logp = first.logp if first is not None else policy_logprobs(actor, mb, s.share_prompt)  # (b, R) with grad
    loss, pm = ppo_policy_loss(logp, mb.logprobs, mb.advantages, rmask, clip_eps=s.clip_eps,
                               clip_eps_high=s.clip_eps_high, agg=s.agg, normalizer=normalizer)
    metrics = {"loss/policy": loss.detach(), "policy/clipfrac": pm["clipfrac"],
               "policy/approx_kl": pm["approx_kl"], "policy/ratio_mean": pm["ratio_mean"]}
    if critic is not None and s.vf_coef > 0:
        v = first.values if first is not None else response_values(critic, mb.input_ids(), mb.attention_mask(), R)
        vl, vm = value_loss(v, mb.values, mb.returns, rmask, clip_eps=s.value_clip_eps, agg=s.agg,
                            normalizer=normalizer)
        loss = loss + s.vf_coef * vl
        metrics.update({"loss/value": vl.detach(), "value/clipfrac": vm["vf_clipfrac"]})
    if s.kl_coef > 0:
        kl = kl_estimate(logp, mb.ref_logprobs, s.kl_kind)
        kl_loss = agg_loss(kl, rmask, mode=s.agg, normalizer=normalizer)
        loss = loss + s.kl_coef * kl_loss
        metrics["loss/kl"] = kl_loss.detach()
    return loss, metrics


@dataclass
class FirstForward:
    """The update's first forwards, run before the advantages existed (PPO's fused scoring): the
    actor's log-probs and the critic's values of every row, with their graphs. They serve as the
    first minibatch's forwards when that minibatch is the whole batch in one micro-batch: the
    weights have not moved since the rollout, so logp_old and V_old are these values, detached,
    and no separate scoring forward is needed. Rows are in the order of the Experience."""

    logp: torch.Tensor  # (B, R), with grad
    values: torch.Tensor | None  # (B, R), with grad (None without a critic)

    def select(self, rows: list[int]) -> FirstForward:
        idx = torch.as_tensor(rows, device=self.logp.device)
        return FirstForward(self.logp[idx], None if self.values is None else self.values[idx])


def fusable(n_rows: int, s: UpdateSettings, *models) -> bool:
    """Whether the first minibatch can reuse forwards run before the advantages (`FirstForward`):
    it must be the whole batch in one micro-batch, and the models must compute the same function
    in train mode as in eval mode (no active dropout), since logp_old is defined in eval mode."""
    if n_rows > s.mini_batch_size or n_rows > s.micro_batch_size:
        return False
    for model in models:
        if model is None:
            continue
        config = getattr(model, "config", None)
        if any(float(getattr(config, k, 0.0) or 0.0) > 0 for k in ("attention_dropout", "hidden_dropout",
                                                                     "resid_pdrop", "attn_pdrop", "embd_pdrop")):
            return False
        if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
            return False
    return True


def _normalizer(mb: Experience, agg: str, rt: Runtime) -> float:
    """Denominator of the whole minibatch (all micro-batches and ranks) for exact accumulation."""
    count = mb.response_mask.sum() if agg == "token-mean" else torch.tensor(float(len(mb)))
    return max(float(rt.sum(count.float())), 1.0) / rt.world_size  # DDP averages gradients over ranks


def _ptx_backward(actor, ptx, rt: Runtime, opt_step: int) -> torch.Tensor:
    """PTX term: gamma_ptx * token NLL of the actor on a batch of SFT data (SPEC 4.5)."""
    from rlhfkit.trainers.sft import sft_batch_loss

    idx = batch_indices(len(ptx.examples), ptx.batch_size, opt_step, ptx.seed)
    chunk_all = rt.shard([ptx.examples[i] for i in idx])
    n_tok = sum(sum(1 for lab in ex["labels"][1:] if lab != -100) for ex in chunk_all)
    normalizer = max(float(rt.sum(torch.tensor(float(n_tok)))), 1.0) / rt.world_size
    total = torch.zeros(())
    chunks = micro_batches(chunk_all, ptx.micro_batch_size)
    for i, chunk in enumerate(chunks):
        batch = {k: v.to(rt.device) for k, v in ptx.collator(chunk).items() if isinstance(v, torch.Tensor)}
        loss, nll_sum, _ = sft_batch_loss(actor, batch, normalizer)
        with _sharded_sync([(actor, i == len(chunks) - 1)]):  # the actor's last backward before its step
            rt.backward(ptx.coef * loss)
        total += nll_sum.cpu()
    # this rank's share of the global token mean (its NLL sum over global tokens / W): the mean
    # over ranks, as the metrics are reduced, is then the global batch's mean NLL
    return total / normalizer


class _Means:
    """Weighted running means of metrics (token-weighted or per minibatch)."""

    def __init__(self):
        self.num: dict[str, float] = {}
        self.den: dict[str, float] = {}

    def add(self, metrics: dict, weight: float = 1.0) -> None:
        for k, v in metrics.items():
            self.num[k] = self.num.get(k, 0.0) + float(v) * weight
            self.den[k] = self.den.get(k, 0.0) + weight

    def merge(self, other: _Means) -> None:
        for k in other.num:
            self.num[k] = self.num.get(k, 0.0) + other.num[k]
            self.den[k] = self.den.get(k, 0.0) + other.den[k]

    def result(self) -> dict:
        return {k: v / self.den[k] for k, v in self.num.items() if self.den[k] > 0}

    def reduced(self, rt: Runtime) -> _Means:
        """The same means over every rank's data: numerators and weights summed over ranks.
        A per-rank loss is its share sum / (global count / W), so for the losses (weight 1 per
        minibatch on each rank) this gives their mean over ranks = the global minibatch loss."""
        if rt.world_size == 1:
            return self
        keys = sorted(self.num)  # the same keys on every rank (the same code ran), in one order
        both = dict(zip(keys, rt.sum(torch.tensor([[self.num[k], self.den[k]] for k in keys],
                                                  dtype=torch.float64)).tolist()))
        out = _Means()
        for k in self.num:  # keep the logging order
            out.num[k], out.den[k] = both[k]
        return out


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


def _sharded_sync(models: list[tuple[Any, bool]]):
    """FSDP: for each (model, sync), reduce-scatter that model's gradients in this backward only if
    ``sync`` (its last backward before the optimizer step); otherwise they accumulate unsharded on
    the rank, as DDP's ``no_sync``. Unsharded models are averaged once per step instead
    (`Runtime.average_gradients`), so for them this does nothing."""
    import contextlib

    from rlhfkit.trainers.fsdp import gradient_sync, is_sharded

    stack = contextlib.ExitStack()
    for model, sync in models:
        if model is not None and is_sharded(model):
            stack.enter_context(gradient_sync(model, sync))
    return stack


def _minibatch_backward(actor, critic, mb: Experience, s: UpdateSettings, rt: Runtime,
                        token_means: _Means, first: FirstForward | None = None, ptx_follows: bool = False) -> dict:
    """Forward/backward of one minibatch in micro-batches; returns its (detached) loss terms.
    ``first``: the minibatch's forwards, already run (then it is one micro-batch).
    ``ptx_follows``: the PTX backward comes next, so the actor's last backward is that one."""
    normalizer = _normalizer(mb, s.agg, rt)
    losses: dict[str, float] = {"update/tokens": 0.0}
    micros = micro_batches(list(range(len(mb))), s.micro_batch_size)
    for i, rows in enumerate(micros):
        micro = mb.select(rows)
        loss, m = _micro_loss(actor, critic, micro, s, normalizer, first)
        last = i == len(micros) - 1
        with _sharded_sync([(actor, last and not ptx_follows), (critic, last)]):
            rt.backward(loss)
        losses["update/tokens"] += forward_tokens(micro, s.share_prompt)
        for k in [k for k in m if k.startswith("loss/")]:  # shares of the minibatch loss: sum them
            losses[k] = losses.get(k, 0.0) + float(m.pop(k))
        token_means.add(m, weight=float(micro.response_mask.sum()))
    return losses


def policy_update(exp: Experience, actor, actor_opt: dict, s: UpdateSettings, rt: Runtime, guard: StepGuard, *,
                  critic=None, critic_opt: dict | None = None, ptx: PTXData | None = None,
                  opt_step: int = 0, first: FirstForward | None = None) -> dict:
    """Step 5: s.epochs passes over shuffled minibatches of the stored experience.

    Each minibatch is one optimizer step of the actor (and of the critic, with its own optimizer
    and clipping), accumulated over micro-batches whose losses are divided by the minibatch's
    global token (or row) count, so the accumulated gradient equals the full-minibatch gradient
    exactly. Metrics are token-weighted over the whole update (losses: mean over minibatches);
    ``update/tokens`` counts the real tokens the actor's training forwards ran (all ranks).
    `policy/ratio_first` is the ratio mean on the first minibatch of the first epoch: it must be 1.
    ``first``: the first minibatch's forwards, run by the caller before the advantages (see
    `FirstForward`); the first minibatch then runs only its backward.

    On N processes each rank updates on its own rows (s.mini_batch_size is per rank) and the
    gradients are averaged with `Runtime.average_gradients` before each optimizer step. The models
    are not DDP-wrapped: the actor also serves the rollout engine and the reference (adapters off),
    and one explicit all-reduce per step is simpler than keeping every other use off the wrapper.
    The metrics are reduced over ranks, so they describe the global batch.
    """
    token_means, step_means = _Means(), _Means()
    ratio_first = None
    computed = 0.0  # real tokens through the actor's training forwards (all epochs)
    n = len(exp)
    if first is not None and not fusable(n, s):
        raise ValueError("a FirstForward needs the whole batch in the first minibatch and micro-batch")
    for _ in range(s.epochs):
        order = torch.randperm(n).tolist()
        for start in range(0, n, s.mini_batch_size):
            rows = order[start:start + s.mini_batch_size]
            rows = rows_by_prompt(rows, exp.prompt_index) if s.share_prompt else rows
            mb = exp.select(rows)
            mb_means = _Means()
            reuse, first = (first.select(rows) if first is not None else None), None  # the first minibatch only
            losses = _minibatch_backward(actor, critic, mb, s, rt, mb_means, reuse, ptx_follows=ptx is not None)
            if ratio_first is None:
                ratio_first = mb_means.reduced(rt).result()["policy/ratio_mean"]
            token_means.merge(mb_means)
            computed += losses.pop("update/tokens")
            if ptx is not None:
                losses["loss/ptx"] = float(_ptx_backward(actor, ptx, rt, opt_step))
            rt.average_gradients(actor)
            rt.average_gradients(critic)
            total = torch.tensor(sum(losses.values()))
            _, gnorm = optimizer_step(actor, actor_opt["optimizer"], actor_opt["scheduler"], s.max_grad_norm,
                                      total, guard)
            losses["policy/grad_norm"] = gnorm
            if critic is not None:
                _, losses["value/grad_norm"] = optimizer_step(
                    critic, critic_opt["optimizer"], critic_opt["scheduler"], s.critic_max_grad_norm, total, guard)
            step_means.add(losses)
            opt_step += 1
    out = {**token_means.reduced(rt).result(), **step_means.reduced(rt).result(), "policy/ratio_first": ratio_first,
           "update/tokens": float(rt.sum(torch.tensor(computed, dtype=torch.float64)))}
    out.pop("policy/ratio_mean", None)
    return out


def build_opt(model, optim, total_steps: int) -> dict:
    optimizer = build_optimizer(model, optim)
    return {"optimizer": optimizer, "scheduler": build_scheduler(optimizer, optim, total_steps)}


# --------------------------------------------------------------------------- PTX data

@dataclass
class PTXData:
    examples: list
    collator: Any
    coef: float
    batch_size: int
    micro_batch_size: int
    seed: int


def load_ptx(section, tokenizer, micro_batch_size: int, seed: int) -> PTXData | None:
    """Tokenised SFT examples for the PTX term, prepared exactly as `rlhfkit sft` prepares them."""
    if not section.data or section.coef <= 0:
        return None
    from rlhfkit.config import DataSection, SFTConfig, TrainSection
    from rlhfkit.data import SFTCollator
    from rlhfkit.trainers.sft import prepare_sft_data

    sft_cfg = SFTConfig(data=DataSection(train=section.data, eval_fraction=0.0, max_length=section.max_length),
                        train=TrainSection(seed=seed))
    train, _, _ = prepare_sft_data(sft_cfg, tokenizer)
    return PTXData(train, SFTCollator(tokenizer.pad_token_id), section.coef, section.batch_size,
                   micro_batch_size, seed)

