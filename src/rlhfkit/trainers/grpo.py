"""GRPO and RLOO: PPO's clipped objective without a critic, with group baselines
(docs/concepts.md, "GRPO and RLOO").

    rlhfkit grpo --config configs/grpo.yaml
    rlhfkit rloo --config configs/grpo.yaml      # the same trainer with advantage=rloo

G = rollout.n responses per prompt. GRPO: A_i = (R_i - mean_group) / (std_group + eps) (or no
scaling, Dr. GRPO); RLOO: A_i = R_i - mean of the other G-1. Every token of response i gets A_i.
The KL to the reference is a loss term (k3, kl_coef) by default, or a penalty in the reward.
Rollout, scoring and the update are the same functions PPO uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from rlhfkit.algos import expand_to_tokens, group_advantages, rloo_advantages
from rlhfkit.config import ConfigError, PolicyTrainSection, PromptsSection, RewardSection, RolloutSection
from rlhfkit.parallel import Strategy, make_strategy
from rlhfkit.rollout import rank_stream_seed, rollout
from rlhfkit.trainers.pg_eval import evaluate_policy
from rlhfkit.trainers.pg_score import log_samples, score_experience, sequence_kl
from rlhfkit.trainers.pg_setup import (
    TIME_SPLIT, PolicyGradientConfig, PolicyRun, Stopwatch, Trained, load_ptx, prepare_trained, prompt_batch,
    setup_run,
)
from rlhfkit.trainers.pg_update import policy_update
from rlhfkit.training import finish, fit


@dataclass
class GRPOConfig(PolicyGradientConfig):
    """`rlhfkit grpo` / `rlhfkit rloo`. A step: train.batch_size prompts x rollout.n (= G) samples,
    scored, then ppo_epochs passes of mini_batch_size-row minibatches (train.micro_batch_size per forward)."""

    prompts: PromptsSection = field(default_factory=lambda: PromptsSection(train="task:arithmetic"))
    """Where rollout prompts (and held-out evaluation prompts) come from."""
    rollout: RolloutSection = field(default_factory=lambda: RolloutSection(n=8))
    """Sampling settings; rollout.n is the group size G (>= 2)."""
    reward: RewardSection = field(default_factory=lambda: RewardSection(spec="task:arithmetic"))
    """The sequence reward (a verifier, task judge, function or reward model)."""
    train: PolicyTrainSection = field(default_factory=lambda: PolicyTrainSection(batch_size=8))
    """Run length (max_steps iterations, or epochs over the prompts), batch sizes, checkpoints."""
    mini_batch_size: int = 64
    """Rows (responses) per optimizer step of the update, over all ranks."""
    share_prompt: bool = True
    """Score and train each prompt's G responses as one packed sequence: the prompt once, each response
    attending to it and to itself (block attention mask, positions as in its own row). Same log-probs up
    to float rounding, and G*(P+R) tokens per group become P + the responses' real lengths. Minibatches
    are the same shuffled rows either way; within one, the rows of a prompt are packed together.
    false: one padded [prompt; response] row per sample."""
    advantage: Literal["grpo", "rloo"] = "grpo"
    """Baseline: group mean (and std) for GRPO, leave-one-out mean for RLOO."""
    scale: Literal["std", "none"] = "std"
    """GRPO only: divide by the group's std ("std") or only centre ("none", Dr. GRPO)."""
    kl_coef: float = 0.04
    """Weight of the KL-to-reference term (0 = none)."""
    kl_kind: Literal["k1", "k2", "k3", "abs"] = "k3"
    """KL estimator (`algos.kl`); k3 is GRPO's."""
    kl_in_reward: bool = False
    """Put the KL in the reward (R_i - kl_coef * sum_t kl_t, before the group baseline) instead of the loss."""

    def kl_loss(self) -> tuple[float, str]:
        return (0.0 if self.kl_in_reward else self.kl_coef), self.kl_kind

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.rollout.n < 2:
            raise ConfigError(f"{where}.rollout.n: group baselines need at least 2 samples per prompt")
        if self.kl_coef < 0:
            raise ConfigError(f"{where}.kl_coef: must be >= 0")


@dataclass
class RLOOConfig(GRPOConfig):
    """`rlhfkit rloo`: GRPOConfig with the leave-one-out baseline (Ahmadian et al. 2024)."""

    advantage: Literal["grpo", "rloo"] = "rloo"
    """Baseline: leave-one-out mean (RLOO) by default here."""


def sequence_advantages(rewards, group_size: int, advantage: str, scale: str):
    """(N,) sequence rewards -> (N,) advantages, groups of `group_size` contiguous rows."""
    if advantage == "rloo":
        return rloo_advantages(rewards, group_size)
    return group_advantages(rewards, group_size, scale=scale)


def grpo_iteration(pr: PolicyRun, step: int, actor: Trained, ptx) -> dict:
    cfg, strategy = pr.cfg, pr.strategy
    items = prompt_batch(pr, step)
    clock = Stopwatch()

    # 1. Rollout: G samples per prompt (rows i*G..i*G+G-1 belong to prompt i).
    seed = None if strategy.world_size == 1 else rank_stream_seed(cfg.train.seed, step, strategy.rank)
    exp = rollout(actor.model, items, cfg.rollout, pr.tokenizer, seed=seed, strategy=strategy)
    clock.lap("rollout")

    # 2. Score, no gradients: logp_old (actor, eval mode), logp_ref, sequence scores.
    exp, metrics, responses = score_experience(pr, exp, items, actor.model)
    seq_kl = sequence_kl(exp, cfg.kl_kind)
    clock.lap("score")

    # 3. Sequence rewards: the score, minus the KL penalty when it goes in the reward.
    rewards = exp.scores - cfg.kl_coef * seq_kl if cfg.kl_in_reward else exp.scores

    # 4. Advantages: group baseline, the same value for every token of a response.
    seq_adv = sequence_advantages(rewards, cfg.rollout.n, cfg.advantage, cfg.scale)
    exp.advantages = expand_to_tokens(seq_adv, exp.response_mask)

    # 5. Update: clipped surrogate (+ KL loss to the reference, + PTX), no critic.
    metrics.update(policy_update(cfg, strategy, pr.run.guard, exp, actor, ptx=ptx,
                                 opt_step=step * pr.optimizer_steps_per_iteration()))
    clock.lap("update")
    groups = exp.scores.view(-1, cfg.rollout.n)
    per_row = strategy.gather(torch.stack([sequence_kl(exp, "k1"), seq_kl, seq_adv.abs()], dim=1))  # (N, 3)
    per_group = strategy.gather(torch.stack(
        [groups.std(dim=1), (groups.max(dim=1).values == groups.min(dim=1).values).float()], dim=1))  # (G, 2)
    metrics.update({
        "objective/kl": per_row[:, 0].mean(), f"objective/kl_{cfg.kl_kind}": per_row[:, 1].mean(),
        "objective/kl_coef": cfg.kl_coef,
        "reward/group_std_mean": per_group[:, 0].mean(),
        "reward/flat_group_frac": per_group[:, 1].mean(),
        "advantage/abs_mean": per_row[:, 2].mean(),
    })
    if strategy.is_main:
        log_samples(pr, step + 1, exp, items, responses)
    clock.lap("other")
    metrics.update(clock.times)
    gen_tokens = float(strategy.sum(exp.response_mask.sum().float()))  # all ranks' rollouts
    metrics["time/gen_tokens_per_s"] = gen_tokens / max(clock.times["time/rollout"], 1e-9)
    return metrics


SHOW = ("reward/score_mean", "objective/kl", "policy/entropy", "response/length_mean", "policy/ratio_first",
        *TIME_SPLIT)


def train_grpo(cfg: GRPOConfig, strategy: Strategy | None = None) -> dict:
    """Run GRPO (or RLOO); the trained policy lands in output_dir/model."""
    strategy = strategy or make_strategy(cfg.train, cfg.model)
    pr = setup_run(cfg, "rloo" if cfg.advantage == "rloo" else "grpo", strategy)
    actor = prepare_trained(pr, pr.actor, cfg.optim)
    pr.actor = actor.model
    ptx = load_ptx(cfg.ptx, pr.tokenizer, cfg.train.micro_batch_size, cfg.train.seed)
    result = fit(pr.run, lambda step: grpo_iteration(pr, step, actor, ptx), pr.total,
                 models={"actor": actor.model},
                 optimizers={"actor": actor.optimizer, "actor_scheduler": actor.scheduler},
                 evaluate=(lambda: evaluate_policy(pr, actor.model)) if pr.eval_prompts else None, show=SHOW)
    finish(pr.run, {"model": actor.model}, pr.tokenizer, {**result.metrics, "steps": result.steps}, best=result.best)
    return result.metrics
