"""GRPO and RLOO: PPO's clipped objective without a critic, with group baselines (SPEC section 5).

    rlhfkit grpo --config configs/grpo.yaml
    rlhfkit rloo --config configs/grpo.yaml      # the same trainer with advantage=rloo

G = rollout.n responses per prompt. GRPO: A_i = (R_i - mean_group) / (std_group + eps) (or no
scaling, Dr. GRPO); RLOO: A_i = R_i - mean of the other G-1. Every token of response i gets A_i.
The KL to the reference is a loss term (k3, kl_coef) by default, or a penalty in the reward.
Rollout, scoring and the update are the same functions PPO uses (`trainers.policy_gradient`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

from rlhfkit.algos import expand_to_tokens, group_advantages, rloo_advantages
from rlhfkit.config import ConfigError, ModelSection, OptimSection
from rlhfkit.trainers.common import RunLogger, StepGuard
from rlhfkit.trainers.pg_update import build_opt, load_ptx, policy_update
from rlhfkit.trainers.policy_gradient import (
    PolicyTrainSection, PromptsSection, PTXSection, RewardSection, RolloutSection, log_samples,
    optimizer_steps_per_iteration, prompt_batch, rollout, sampling_seed, save_final, score_experience,
    sequence_kl, setup_run, shard_trained, Stopwatch, train_loop,
)


@dataclass
class GRPOConfig:
    """GRPO/RLOO hyperparameters. A step: train.batch_size prompts x rollout.n (= G) samples, scored,
    then ppo_epochs passes of mini_batch_size-row minibatches (train.micro_batch_size per forward)."""

    model: ModelSection = field(default_factory=ModelSection)
    """The policy: initialises the actor and the frozen reference (with LoRA: base = reference)."""
    prompts: PromptsSection = field(default_factory=lambda: PromptsSection(train="task:arithmetic"))
    """Where rollout prompts come from."""
    rollout: RolloutSection = field(default_factory=lambda: RolloutSection(n=8))
    """Sampling settings; rollout.n is the group size G (>= 2)."""
    reward: RewardSection = field(default_factory=lambda: RewardSection(spec="task:arithmetic"))
    """The sequence reward (a verifier, task judge, function or reward model)."""
    ptx: PTXSection = field(default_factory=PTXSection)
    """Optional PTX loss on SFT data."""
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-6, schedule="constant", warmup_ratio=0.0))
    """The actor's optimizer (AdamW) and gradient clipping."""
    train: PolicyTrainSection = field(default_factory=lambda: PolicyTrainSection(batch_size=8))
    """Run length (max_steps iterations, or epochs over the prompts), batch sizes, checkpoints."""
    advantage: Literal["grpo", "rloo"] = "grpo"
    """Baseline: group mean (and std) for GRPO, leave-one-out mean for RLOO."""
    scale: Literal["std", "none"] = "std"
    """GRPO only: divide by the group's std ("std") or only centre ("none", Dr. GRPO)."""
    kl_coef: float = 0.04
    """Weight of the KL-to-reference term (0 = none)."""
    kl_kind: Literal["k1", "k2", "k3", "abs"] = "k3"
    """KL estimator; k3 is GRPO's (non-negative, unbiased)."""
    kl_in_reward: bool = False
    """Put the KL in the reward (R_i - kl_coef * sum_t kl_t, before the group baseline) instead of the loss."""
    ppo_epochs: int = 1
    """Passes over each batch of experience (1 = on-policy: the ratio stays 1 and clipping is inert)."""
    mini_batch_size: int = 64
    """Rows (responses) per optimizer step."""
    clip_eps: float = 0.2
    """PPO ratio clip epsilon (lower side; also the upper side unless clip_eps_high is set)."""
    clip_eps_high: Optional[float] = None
    """Upper clip epsilon (DAPO's clip-higher, e.g. 0.28); null = symmetric."""
    loss_agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"] = "token-mean"
    """Token loss reduction; the GRPO paper's is seq-mean-token-mean, DAPO/Dr. GRPO use token-mean."""
    share_prompt: bool = True
    """Score and train each prompt's G responses as one packed sequence: the prompt once, each response
    attending to it and to itself (block attention mask, positions as in its own row). Same log-probs up
    to float rounding, and G*(P+R) tokens per group become P + the responses' real lengths. Minibatches
    are the same shuffled rows either way; within one, the rows of a prompt are packed together.
    false: one padded [prompt; response] row per sample."""

    def validate(self, where: str) -> None:
        if self.rollout.temperature <= 0:
            raise ConfigError(f"{where}.rollout.temperature: training samples need temperature > 0")
        if self.rollout.n < 2:
            raise ConfigError(f"{where}.rollout.n: group baselines need at least 2 samples per prompt")
        rows = self.train.batch_size * self.rollout.n
        if self.ppo_epochs < 1 or self.mini_batch_size < 1 or rows % self.mini_batch_size:
            raise ConfigError(f"{where}.mini_batch_size: {self.mini_batch_size} must divide train.batch_size x "
                              f"rollout.n = {rows} rows (and ppo_epochs >= 1)")
        if self.kl_coef < 0:
            raise ConfigError(f"{where}.kl_coef: must be >= 0")


@dataclass
class RLOOConfig(GRPOConfig):
    """GRPOConfig preset with the leave-one-out baseline (Ahmadian et al. 2024)."""

    advantage: Literal["grpo", "rloo"] = "rloo"
    """Baseline: leave-one-out mean (RLOO) by default here."""


def sequence_advantages(rewards, group_size: int, advantage: str, scale: str):
    """(N,) sequence rewards -> (N,) advantages, groups of `group_size` contiguous rows."""
    if advantage == "rloo":
        return rloo_advantages(rewards, group_size)
    return group_advantages(rewards, group_size, scale=scale)


def grpo_iteration(run, step: int, opts: dict, guard: StepGuard, ptx, logger: RunLogger) -> dict:
    cfg, micro = run.cfg, run.cfg.train.micro_batch_size
    items = prompt_batch(run, step)
    clock = Stopwatch()

    # 1. Rollout: G samples per prompt (rows i*G..i*G+G-1 belong to prompt i).
    exp = rollout(run.actor, items, cfg.rollout, run.tokenizer, seed=sampling_seed(run, step))
    clock.lap("rollout")

    # 2. Score, no gradients: logp_old (actor, eval mode), logp_ref, sequence scores.
    exp, metrics, responses = score_experience(exp, items, run.reward_fn, cfg.reward, run.actor, run.ref,
                                               run.tokenizer, micro, run.rt, share_prompt=cfg.share_prompt)
    seq_kl = sequence_kl(exp, cfg.kl_kind)
    clock.lap("score")

    # 3. Sequence rewards: the score, minus the KL penalty when it goes in the reward.
    rewards = exp.scores - cfg.kl_coef * seq_kl if cfg.kl_in_reward else exp.scores

    # 4. Advantages: group baseline, the same value for every token of a response.
    seq_adv = sequence_advantages(rewards, cfg.rollout.n, cfg.advantage, cfg.scale)
    exp.advantages = expand_to_tokens(seq_adv, exp.response_mask)

    # 5. Update: clipped surrogate (+ k3 KL loss to the reference, + PTX), no critic.
    upd = policy_update(exp, run.actor, opts["actor"], run.settings, run.rt, guard, ptx=ptx,
                        opt_step=step * optimizer_steps_per_iteration(run))
    clock.lap("update")
    metrics.update(upd)
    metrics.update(clock.times)
    gen_tokens = float(run.rt.sum(exp.response_mask.sum().float()))  # all ranks' rollouts
    metrics["time/gen_tokens_per_s"] = gen_tokens / max(clock.times["time/rollout"], 1e-9)
    groups = exp.scores.view(-1, cfg.rollout.n)
    per_row = run.rt.gather(torch.stack([sequence_kl(exp, "k1"), seq_kl, seq_adv.abs()], dim=1))  # (N, 3)
    per_group = run.rt.gather(torch.stack(
        [groups.std(dim=1), (groups.max(dim=1).values == groups.min(dim=1).values).float()], dim=1))  # (G, 2)
    metrics.update({
        "objective/kl": per_row[:, 0].mean(), f"objective/kl_{cfg.kl_kind}": per_row[:, 1].mean(),
        "objective/kl_coef": cfg.kl_coef,
        "reward/group_std_mean": per_group[:, 0].mean(),
        "reward/flat_group_frac": per_group[:, 1].mean(),
        "advantage/abs_mean": per_row[:, 2].mean(),
    })
    log_samples(run, logger, step + 1, exp, items, responses)
    return metrics


SHOW = ("reward/score_mean", "objective/kl", "policy/entropy", "response/length_mean", "policy/ratio_first")


def train_grpo(cfg: GRPOConfig) -> dict:
    """Run GRPO (or RLOO); the trained policy lands in output_dir/model."""
    kind = "rloo" if cfg.advantage == "rloo" else "grpo"
    run = setup_run(cfg, kind, epochs=cfg.ppo_epochs, mini_batch_size=cfg.mini_batch_size, clip_eps=cfg.clip_eps,
                    clip_eps_high=cfg.clip_eps_high, agg=cfg.loss_agg,
                    kl_coef=0.0 if cfg.kl_in_reward else cfg.kl_coef, kl_kind=cfg.kl_kind,
                    share_prompt=cfg.share_prompt)
    n_opt = run.total_steps * optimizer_steps_per_iteration(run)
    opts = {"actor": build_opt(run.actor, cfg.optim, n_opt)}
    run.actor = shard_trained(run, run.actor, opts["actor"])  # train.fsdp
    ptx = load_ptx(cfg.ptx, run.tokenizer, cfg.train.micro_batch_size, cfg.train.seed)

    optimizers = {"actor": opts["actor"]["optimizer"], "actor_scheduler": opts["actor"]["scheduler"]}

    def iterate(step, guard, logger):
        return grpo_iteration(run, step, opts, guard, ptx, logger)

    metrics = train_loop(run, iterate, {"actor": run.actor}, optimizers, show=SHOW)
    save_final(run, {"model": run.actor}, {**metrics, "steps": run.total_steps})
    return metrics
