"""PPO with four models: actor, reference, reward and critic (docs/concepts.md, "PPO").

    rlhfkit ppo --config configs/ppo.yaml reward.spec=rm:runs/rm/model

One iteration = 1 rollout, 2 score, 3 per-token rewards, 4 GAE advantages, 5 PPO update. Two rules
keep the first PPO ratio exactly 1: logp_old is recomputed after the rollout with the same forward
the update uses (`trainers.pg_score`), and the experience keeps one padded width (P prompt + R
response columns) from scoring to update, so every row is computed on identical inputs both times.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

from rlhfkit.algos import (
    AdaptiveKLController,
    FixedKLController,
    explained_variance,
    gae_advantages,
    kl_penalized_rewards,
    masked_sum,
    masked_whiten,
)
from rlhfkit.config import ConfigError, OptimSection, validate
from rlhfkit.judges.rewards import find_rm_dir
from rlhfkit.models import load_scalar_model
from rlhfkit.models.heads import backbone_and_head
from rlhfkit.models.loading import to_device, trained_dtype
from rlhfkit.models.lora import (
    apply_lora,
    disable_dropout,
    enable_gradient_checkpointing,
    share_frozen_base,
)
from rlhfkit.parallel import Strategy, make_strategy
from rlhfkit.rollout import rank_stream_seed, rollout
from rlhfkit.rollout.llama_decode import decode_choices
from rlhfkit.trainers.pg_eval import evaluate_policy
from rlhfkit.trainers.pg_score import (
    log_samples,
    score_experience,
    score_values,
    sequence_kl,
)
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
class KLSection:
    """The KL penalty in the per-token reward (step 3)."""

    coef: float = 0.05
    """beta: the fixed KL coefficient, or the adaptive controller's starting value."""
    kind: Literal["k1", "k2", "k3", "abs"] = "k1"
    """Per-token estimator in the reward: k1 = log p/q, k2 = 0.5 (log p/q)^2, k3 = q/p - 1 - log q/p."""
    target: float = 0.0
    """Adaptive controller's target sequence KL in nats (Ziegler et al. 2019); 0 = fixed coefficient."""
    horizon: float = 10000.0
    """Adaptive controller's horizon in samples: how fast beta moves toward the target."""

    def validate(self, where: str) -> None:
        if self.coef < 0 or self.target < 0 or self.horizon <= 0:
            raise ConfigError(f"{where}: coef and target must be >= 0, horizon > 0")
        if self.target > 0 and self.coef == 0:  # the controller multiplies the coefficient: 0 stays 0
            raise ConfigError(f"{where}.target: {self.target} with coef 0: the adaptive controller scales the "
                              f"coefficient, so from 0 it never moves; set {where}.coef > 0 as its starting value")


@dataclass
class PPOConfig(PolicyGradientConfig):
    """`rlhfkit ppo`. A step is one iteration: train.batch_size prompts x rollout.n samples are
    generated, scored, and learned from for ppo_epochs passes of mini_batch_size-row minibatches
    (train.micro_batch_size rows per forward/backward)."""

    kl: KLSection = field(default_factory=KLSection)
    """KL penalty in the per-token reward (step 3)."""
    critic_optim: OptimSection = field(
        default_factory=lambda: OptimSection(lr=1e-5, schedule="constant", warmup_ratio=0.0))
    """The critic's own optimizer: critics usually want a larger learning rate than the actor."""
    critic_init: Literal["reward", "policy"] = "reward"
    """Initialise the critic from the reward model (needs reward.spec=rm:DIR) or from the policy backbone."""
    critic_model: str = ""
    """Explicit critic initialisation (a model dir); overrides critic_init when set."""
    ppo_epochs: int = 4
    """Passes over each batch of experience."""
    vf_coef: float = 0.1
    """Scale c_v of the value loss. The critic is its own model with its own optimizer (critic_optim), so this
    is not its share of one combined loss as in TRL: under AdamW the critic's step barely depends on it, except
    where critic_optim.max_grad_norm clips the scaled gradient. Set the critic's pace with critic_optim.lr;
    0 = the critic is not trained."""
    value_clip_eps: Optional[float] = 0.2
    """Clip range of the value loss around V_old (reward units); null = unclipped."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """Whiten advantages over the batch's valid tokens (every rank's)."""
    def validate(self, where: str) -> None:
        super().validate(where)
        if self.critic_init == "reward" and not self.critic_model and self.reward.rm_dir() is None:
            raise ConfigError(f"{where}.critic_init: 'reward' needs reward.spec=rm:DIR (or set critic_model, "
                              "or critic_init: policy)")


def load_critic(cfg: PPOConfig, tokenizer, device, actor=None):
    """The critic V_psi: a scalar-head model, initialised from the RM (its head predicts the final
    score from the start) or from the policy backbone with a zero head (V = 0 at first).

    With LoRA and a critic started from the policy, the critic's frozen backbone *is* the LoRA
    actor's frozen base (the same tensors, `share_frozen_base`): actor, reference and critic then
    hold one copy of the base weights, and the critic owns only its adapters and head."""
    if cfg.critic_model:
        src = cfg.critic_model
    elif cfg.critic_init == "reward":
        src = str(find_rm_dir(cfg.reward.rm_dir()))
    else:
        src = cfg.model.name
    dtype = trained_dtype(cfg.model.dtype, cfg.model.lora.enabled)
    critic = load_scalar_model(src, dtype, pad_token_id=tokenizer.pad_token_id)
    if src == cfg.model.name:
        # A fresh head starts at V = 0 instead of load_scalar_model's small random head: random
        # values add noise of the head's output scale to every advantage (often larger than the
        # reward's spread) until the critic has learned; V = 0 makes the first iterations plain
        # REINFORCE with whitened returns.
        with torch.no_grad():
            _, head = backbone_and_head(critic)
            head.weight.zero_()
    if cfg.model.lora.enabled and actor is not None and src == cfg.model.name:
        share_frozen_base(critic, actor)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(critic)
    critic = to_device(apply_lora(critic, cfg.model.lora, "SEQ_CLS"), device)
    if cfg.disable_dropout:
        disable_dropout(critic)
    critic.train()
    return critic


def kl_controller(kl: KLSection):
    if kl.target > 0:
        return AdaptiveKLController(kl.coef, kl.target, kl.horizon)
    return FixedKLController(kl.coef)


def ppo_iteration(pr: PolicyRun, step: int, actor: Trained, critic: Trained, kl_ctl, ptx) -> dict:
    cfg, strategy, micro = pr.cfg, pr.strategy, pr.cfg.train.micro_batch_size
    items = prompt_batch(pr, step)
    clock = Stopwatch()

    # 1. Rollout: n samples per prompt from the current policy (left-padded prompts, stop at EOS).
    seed = None if strategy.world_size == 1 else rank_stream_seed(cfg.train.seed, step, strategy.rank)
    exp = rollout(actor.model, items, cfg.rollout, pr.tokenizer, seed=seed, strategy=strategy)
    clock.lap("rollout")

    # 2. Score: logp_old (actor, eval mode), logp_ref, V_old, sequence scores, without gradients.
    #    Fused (cfg.fuse_scoring, when the rank's batch is one minibatch and one micro-batch): the
    #    first update step's actor and critic forwards run now, with their graphs, and give
    #    logp_old and V_old; the first minibatch then runs only its backward.
    first, policy = first_forward(cfg, strategy, exp, pr.local_mini_batch(), actor.model, critic.model)
    exp, metrics, responses = score_experience(pr, exp, items, actor.model, policy=policy)
    if first is not None:
        exp.values = first.values.detach()
    else:
        with strategy.autocast():
            exp.values = score_values(critic.model, exp, micro)
    metrics["score/fused"] = float(first is not None)
    mask = exp.response_mask
    clock.lap("score")

    # 3. Per-token rewards: -beta * kl_t, plus the score at the last response token.
    exp.rewards, kl = kl_penalized_rewards(exp.scores, exp.logprobs, exp.ref_logprobs, mask,
                                           kl_ctl.value, cfg.kl.kind)
    seq_kl = sequence_kl(exp, "k1")

    # 4. Advantages by GAE, whitened over the batch's valid tokens (every rank's: reduce=strategy.sum);
    #    returns are the value targets.
    adv, exp.returns = gae_advantages(exp.rewards, exp.values, mask, cfg.gamma, cfg.lam)
    exp.advantages = masked_whiten(adv, mask, reduce=strategy.sum) if cfg.whiten_advantages else adv

    # 5. Update: ppo_epochs x minibatches, clipped policy + value losses (+ PTX), two optimizers.
    metrics.update(policy_update(cfg, strategy, pr.run.guard, exp, actor, critic, ptx=ptx,
                                 opt_step=step * pr.optimizer_steps_per_iteration(), first=first))
    clock.lap("update")
    metrics.update(kl_and_value_metrics(exp, seq_kl, kl, kl_ctl, strategy))
    kl_ctl.update(float(metrics["objective/kl_penalty"]), n_steps=cfg.train.batch_size * cfg.rollout.n)  # same beta everywhere
    if strategy.is_main:
        log_samples(pr, step + 1, exp, items, responses)
    clock.lap("other")
    metrics.update(clock.times)
    metrics["time/gen_tokens_per_s"] = float(strategy.sum(mask.sum().float())) / max(clock.times["time/rollout"], 1e-9)
    return metrics


def kl_and_value_metrics(exp, seq_kl, kl, kl_ctl, strategy) -> dict:
    """The KL (k1 summed per response), the penalty actually applied, and the critic's fit, over
    every rank's rows."""
    mask = exp.response_mask
    per_row = strategy.gather(torch.stack([seq_kl, kl.sum(-1)], dim=1))  # (N, 2)
    values = strategy.sum(torch.stack([masked_sum(exp.values, mask), mask.sum().float()]))
    penalty = per_row[:, 1].mean()
    return {"objective/kl": per_row[:, 0].mean(), "objective/kl_penalty": penalty,
            "objective/kl_coef": kl_ctl.value, "objective/non_score_reward": -kl_ctl.value * penalty,
            "value/explained_variance": explained_variance(exp.values, exp.returns, mask, reduce=strategy.sum),
            "value/mean": values[0] / values[1].clamp(min=1)}


SHOW = ("reward/score_mean", "objective/kl", "policy/entropy", "response/length_mean", "policy/ratio_first",
        *TIME_SPLIT)


def train_ppo(cfg: PPOConfig, strategy: Strategy | None = None) -> dict:
    """Run PPO; the actor lands in output_dir/model, the critic in output_dir/critic."""
    validate(cfg)  # a config changed in Python after load_config is checked as a loaded one is
    strategy = strategy or make_strategy(cfg.train, cfg.model)
    pr = setup_run(cfg, "ppo", strategy, models={"critic_model": cfg.critic_model} if cfg.critic_model else None)
    with strategy.loading():  # FSDP: rank 0 reads the weights, the others get their shards from it
        critic_model = load_critic(cfg, pr.tokenizer, strategy.device, actor=pr.actor)
    # both trained models prepared (sharded, engines); the layout describes the actor, prepared last
    critic = prepare_trained(pr, critic_model, cfg.critic_optim)
    actor = prepare_trained(pr, pr.actor, cfg.optim)
    pr.actor = actor.model
    kl_ctl = kl_controller(cfg.kl)

    result = fit(pr.run, lambda step: ppo_iteration(pr, step, actor, critic, kl_ctl, pr.ptx), pr.total,
                 models={"actor": actor.model, "critic": critic.model},
                 optimizers={"actor": actor.optimizer, "actor_scheduler": actor.scheduler,
                             "critic": critic.optimizer, "critic_scheduler": critic.scheduler},
                 evaluate=(lambda: evaluate_policy(pr, actor.model)) if pr.eval_prompts else None,
                 state_fn=lambda: {"kl_controller": kl_ctl.state_dict()},
                 load_state=lambda st: kl_ctl.load_state_dict(st["kl_controller"]), show=SHOW,
                 on_start=pr.announce)
    finish(pr.run, {"model": actor.model, "critic": critic.model}, pr.tokenizer,
           {**result.metrics, "steps": result.steps, "kl_coef_final": kl_ctl.value}, best=result.best,
           decode_products=decode_choices())
    return result.metrics
