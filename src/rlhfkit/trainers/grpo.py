"""GRPO and RLOO: PPO's clipped objective without a critic, with group baselines
(docs/concepts.md, "GRPO and RLOO").

    rlhfkit grpo --config configs/grpo.yaml
    rlhfkit rloo --config configs/rloo.yaml      # the same trainer, RLOO's defaults

G = rollout.n responses per prompt. GRPO: A_i = (R_i - mean_group) / (std_group + eps) (or the batch
std, or no scaling, Dr. GRPO); RLOO: A_i = R_i - mean of the other G-1; REINFORCE: A_i = R_i - the
global batch mean. Every token of response i gets A_i. GRPO's KL to the reference is a loss term (k3,
kl_coef) by default; `rlhfkit rloo` follows the RLOO paper (k1 summed into the reward, one importance
ratio per response, `ratio_level`).
Rollout, scoring and the update are the same functions PPO uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from rlhfkit.algos import (
    batch_mean_advantages,
    expand_to_tokens,
    group_advantages,
    rloo_advantages,
)
from rlhfkit.config import (
    ConfigError,
    PolicyTrainSection,
    PromptsSection,
    RewardSection,
    RolloutSection,
    validate,
)
from rlhfkit.parallel import Strategy, make_strategy
from rlhfkit.rollout import rank_stream_seed, rollout
from rlhfkit.rollout.llama_decode import decode_choices
from rlhfkit.trainers.pg_eval import evaluate_policy
from rlhfkit.trainers.pg_score import log_samples, score_experience, sequence_kl
from rlhfkit.trainers.pg_setup import (
    TIME_SPLIT,
    PolicyGradientConfig,
    PolicyRun,
    Stopwatch,
    Trained,
    prepare_trained,
    prompt_batch,
    setup_run,
)
from rlhfkit.trainers.pg_update import first_forward, policy_update
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
    advantage: Literal["grpo", "rloo", "reinforce"] = "grpo"
    """Baseline: grpo = group mean (and std, see scale); rloo = leave-one-out mean of the other G-1;
    reinforce = REINFORCE with the global batch mean as baseline (`algos.batch_mean_advantages`; needs
    no groups, so rollout.n may be 1). `rlhfkit rloo` fixes this to rloo."""
    scale: Literal["std", "group", "batch", "none"] = "std"
    """advantage grpo only (batch or none with rloo or reinforce is an error): divide the group-centred
    reward by the group's std ("std" = "group", TRL's default),
    by the std of the whole global batch ("batch", TRL scale_rewards="batch"), or not at all ("none",
    Dr. GRPO)."""
    ratio_level: Literal["token", "sequence", "sequence-mean"] = "token"
    """Importance ratio of the clipped surrogate: per token (PPO/GRPO); one per response from the summed
    log-ratio ("sequence": the RLOO paper and TRL's RLOOTrainer); one per response from the mean
    log-ratio ("sequence-mean": GSPO, TRL GRPO importance_sampling_level="sequence"). The sequence
    levels average over responses and need the KL in the reward (kl_in_reward) or kl_coef 0."""
    kl_coef: float = 0.04
    """Weight of the KL-to-reference term (0 = none)."""
    kl_kind: Literal["k1", "k2", "k3", "abs"] = "k3"
    """KL estimator (`algos.kl`); k3 is GRPO's. As a loss term, k3's value estimates KL(pi||ref) but its
    gradient is that of KL(ref||pi); see kl_bias_correction."""
    kl_bias_correction: bool = False
    """k3 loss term weighted by pi/pi_old (`algos.bias_corrected_kl`, TRL GRPO use_bias_correction_kl):
    the same value on-policy, and the gradient of KL(pi||ref). Needs kl_kind k3 and the KL in the loss."""
    kl_in_reward: bool = False
    """Put the KL in the reward (R_i - kl_coef * sum_t kl_t, before the baseline) instead of the loss."""

    def kl_loss(self) -> tuple[float, str]:
        kind = "k3-bias-corrected" if self.kl_bias_correction else self.kl_kind
        return (0.0 if self.kl_in_reward else self.kl_coef), kind

    def policy_ratio_level(self) -> str:
        return self.ratio_level

    def unused_keys(self) -> list[tuple[list[str], str]]:
        """A ratio per response averages the loss over responses: loss_agg is not read then; with
        kl_coef 0 there is no KL term, so where it goes and its bias correction are not read (kl_kind
        still names the logged KL)."""
        default = type(self)()
        set_agg = self.loss_agg != default.loss_agg
        kl = [k for k in ("kl_bias_correction", "kl_in_reward") if getattr(self, k) != getattr(default, k)]
        return [(["loss_agg"] if set_agg and self.ratio_level != "token" else [], "ratio_level"),
                (kl if self.kl_coef == 0 else [], "kl_coef")]

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.rollout.n < 2 and self.advantage != "reinforce":
            raise ConfigError(f"{where}.rollout.n: group baselines need at least 2 samples per prompt")
        if self.advantage == "reinforce" and self.train.batch_size * self.rollout.n < 2:
            raise ConfigError(f"{where}.train.batch_size: reinforce's baseline is the mean reward of the global "
                              "batch, so a batch of one response (train.batch_size x rollout.n = 1) has advantage 0 "
                              "and learns nothing; use at least 2")
        if self.advantage != "grpo" and self.scale not in ("std", "group"):
            raise ConfigError(f"{where}.scale: {self.scale!r} applies to advantage grpo only; {self.advantage} "
                              "does not scale its advantages (remove the key)")
        if self.kl_coef < 0:
            raise ConfigError(f"{where}.kl_coef: must be >= 0")
        if self.kl_bias_correction and (self.kl_kind != "k3" or self.kl_in_reward):
            raise ConfigError(f"{where}.kl_bias_correction: needs kl_kind k3 and kl_in_reward false")
        if self.ratio_level != "token" and self.kl_coef > 0 and not self.kl_in_reward:
            raise ConfigError(f"{where}.ratio_level: {self.ratio_level} puts no KL term in the loss; "
                              "set kl_in_reward: true (or kl_coef: 0)")


@dataclass
class RLOOConfig(GRPOConfig):
    """`rlhfkit rloo`: REINFORCE leave-one-out as in the paper (Ahmadian et al. 2024) and TRL's
    RLOOTrainer: one importance ratio per response and the k1 KL summed into the reward. The per-token
    form (GRPO's update with the RLOO baseline): ratio_level=token kl_in_reward=false kl_kind=k3."""

    advantage: Literal["grpo", "rloo", "reinforce"] = "rloo"
    """Fixed to rloo by the sub-command (any other value is an error; use `rlhfkit grpo` for those)."""
    ratio_level: Literal["token", "sequence", "sequence-mean"] = "sequence"
    """Importance ratio: one per response from the summed log-ratio (the paper's); token = per token."""
    kl_coef: float = 0.05
    """Weight of the KL penalty (TRL RLOO's beta)."""
    kl_kind: Literal["k1", "k2", "k3", "abs"] = "k1"
    """KL estimator; k1 = log pi - log ref, summed over the response, the paper's."""
    kl_in_reward: bool = True
    """The KL is a penalty in the reward, before the leave-one-out baseline (false: a loss term)."""

    def validate(self, where: str) -> None:
        if self.advantage != "rloo":
            raise ConfigError(f"{where}.advantage: {self.advantage!r} under `rlhfkit rloo`, which always uses "
                              f"rloo; remove the key or run `rlhfkit grpo`")
        super().validate(where)


def sequence_advantages(rewards, group_size: int, advantage: str, scale: str, reduce=None):
    """(N,) sequence rewards -> (N,) advantages, groups of `group_size` contiguous rows. ``reduce`` sums
    over ranks (scale "batch" and the REINFORCE batch mean are over the global batch)."""
    if advantage == "rloo":
        return rloo_advantages(rewards, group_size)
    if advantage == "reinforce":
        return batch_mean_advantages(rewards, reduce)
    return group_advantages(rewards, group_size, scale=scale, reduce=reduce)


def grpo_iteration(pr: PolicyRun, step: int, actor: Trained, ptx) -> dict:
    cfg, strategy = pr.cfg, pr.strategy
    items = prompt_batch(pr, step)
    clock = Stopwatch()

    # 1. Rollout: G samples per prompt (rows i*G..i*G+G-1 belong to prompt i).
    seed = None if strategy.world_size == 1 else rank_stream_seed(cfg.train.seed, step, strategy.rank)
    exp = rollout(actor.model, items, cfg.rollout, pr.tokenizer, seed=seed, strategy=strategy)
    clock.lap("rollout")

    # 2. Score, no gradients: logp_old (actor, eval mode), logp_ref, sequence scores. Fused
    #    (cfg.fuse_scoring, when the rank's batch is one minibatch and one micro-batch): the first
    #    update step's actor forward runs now, with its graph, and gives logp_old.
    first, policy = first_forward(cfg, strategy, exp, pr.local_mini_batch(), actor.model)
    exp, metrics, responses = score_experience(pr, exp, items, actor.model, policy=policy)
    metrics["score/fused"] = float(first is not None)
    seq_kl = sequence_kl(exp, cfg.kl_kind)
    clock.lap("score")

    # 3. Sequence rewards: the score, minus the KL penalty when it goes in the reward.
    rewards = exp.scores - cfg.kl_coef * seq_kl if cfg.kl_in_reward else exp.scores

    # 4. Advantages: group baseline, the same value for every token of a response.
    seq_adv = sequence_advantages(rewards, cfg.rollout.n, cfg.advantage, cfg.scale, reduce=strategy.sum)
    exp.advantages = expand_to_tokens(seq_adv, exp.response_mask)

    # 5. Update: clipped surrogate (+ KL loss to the reference, + PTX), no critic.
    metrics.update(policy_update(cfg, strategy, pr.run.guard, exp, actor, ptx=ptx,
                                 opt_step=step * pr.optimizer_steps_per_iteration(), first=first))
    clock.lap("update")
    groups = exp.scores.view(-1, cfg.rollout.n)
    per_row = strategy.gather(torch.stack([sequence_kl(exp, "k1"), seq_kl, seq_adv.abs()], dim=1))  # (N, 3)
    spread = groups.std(dim=1) if cfg.rollout.n > 1 else torch.zeros_like(groups[:, 0])
    flat = (groups.max(dim=1).values == groups.min(dim=1).values).float()
    per_group = strategy.gather(torch.stack([spread, flat], dim=1))  # (G, 2)
    metrics.update({
        "objective/kl": per_row[:, 0].mean(), f"objective/kl_{cfg.kl_kind}": per_row[:, 1].mean(),
        "objective/kl_coef": cfg.kl_coef, "advantage/abs_mean": per_row[:, 2].mean(),
        "reward/group_std_mean": per_group[:, 0].mean(),
    })
    if cfg.advantage != "reinforce":  # a flat group has zero advantages only under a group baseline
        metrics["reward/flat_group_frac"] = per_group[:, 1].mean()
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
    validate(cfg)  # a config changed in Python after load_config is checked as a loaded one is
    strategy = strategy or make_strategy(cfg.train, cfg.model)
    pr = setup_run(cfg, cfg.advantage, strategy)
    actor = prepare_trained(pr, pr.actor, cfg.optim)
    pr.actor = actor.model
    result = fit(pr.run, lambda step: grpo_iteration(pr, step, actor, pr.ptx), pr.total,
                 models={"actor": actor.model},
                 optimizers={"actor": actor.optimizer, "actor_scheduler": actor.scheduler},
                 evaluate=(lambda: evaluate_policy(pr, actor.model)) if pr.eval_prompts else None, show=SHOW,
                 on_start=pr.announce)
    finish(pr.run, {"model": actor.model}, pr.tokenizer, {**result.metrics, "steps": result.steps}, best=result.best,
           decode_products=decode_choices())
    return result.metrics
