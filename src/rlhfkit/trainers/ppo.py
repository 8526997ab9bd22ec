"""PPO with four models: actor, reference, reward and critic (SPEC section 4).

    rlhfkit ppo --config configs/ppo.yaml reward.spec=rm:runs/demo/rm/model

One iteration = 1 rollout, 2 score, 3 per-token rewards, 4 GAE advantages, 5 PPO update;
the pieces shared with GRPO/RLOO live in `trainers.policy_gradient`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

from rlhfkit.algos import (
    AdaptiveKLController, FixedKLController, explained_variance, gae_advantages, kl_penalized_rewards,
    masked_sum, masked_whiten,
)
from rlhfkit.config import ConfigError, ModelSection, OptimSection
from rlhfkit.models import load_scalar_model
from rlhfkit.models.loading import to_device
from rlhfkit.models.heads import backbone_and_head
from rlhfkit.models.lora import apply_lora, enable_gradient_checkpointing, share_frozen_base
from rlhfkit.trainers.common import RunLogger, StepGuard
from rlhfkit.trainers.pg_update import (
    FirstForward, build_opt, fusable, load_ptx, policy_logprobs, policy_update, response_values,
)
from rlhfkit.trainers.policy_gradient import (
    PolicyTrainSection, PromptsSection, PTXSection, RewardSection, RolloutSection, log_samples,
    optimizer_steps_per_iteration, prompt_batch, rollout, sampling_seed, save_final, score_experience,
    score_values, sequence_kl, setup_run, shard_trained, Stopwatch, train_loop,
)


@dataclass
class KLSection:
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


@dataclass
class PPOConfig:
    """PPO hyperparameters. A "step" is one iteration: train.batch_size prompts x rollout.n samples are
    generated, scored, and learned from for ppo_epochs passes of mini_batch_size-row minibatches
    (train.micro_batch_size rows per forward/backward)."""

    model: ModelSection = field(default_factory=ModelSection)
    """The policy: initialises the actor and the frozen reference (with LoRA: base = reference)."""
    prompts: PromptsSection = field(default_factory=PromptsSection)
    """Where rollout prompts come from."""
    rollout: RolloutSection = field(default_factory=RolloutSection)
    """Sampling settings of step 1."""
    reward: RewardSection = field(default_factory=RewardSection)
    """The sequence score of step 2 (usually rm:DIR), clipping and the missing-EOS score."""
    kl: KLSection = field(default_factory=KLSection)
    """KL penalty in the per-token reward (step 3)."""
    ptx: PTXSection = field(default_factory=PTXSection)
    """Optional PTX loss on SFT data (the alignment-tax guard)."""
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-6, schedule="constant", warmup_ratio=0.0))
    """The actor's optimizer (AdamW) and gradient clipping."""
    critic_optim: OptimSection = field(
        default_factory=lambda: OptimSection(lr=1e-5, schedule="constant", warmup_ratio=0.0))
    """The critic's own optimizer: critics usually want a larger learning rate than the actor."""
    train: PolicyTrainSection = field(default_factory=PolicyTrainSection)
    """Run length (max_steps iterations, or epochs over the prompts), batch sizes, checkpoints."""
    critic_init: Literal["reward", "policy"] = "reward"
    """Initialise the critic from the reward model (needs reward.spec=rm:DIR) or from the policy backbone."""
    critic_model: str = ""
    """Explicit critic initialisation (a model dir); overrides critic_init when set."""
    ppo_epochs: int = 4
    """Passes over each batch of experience."""
    mini_batch_size: int = 16
    """Rows (responses) per optimizer step of the update."""
    clip_eps: float = 0.2
    """PPO ratio clip epsilon."""
    vf_coef: float = 0.1
    """Weight c_v of the value loss in the total loss."""
    value_clip_eps: Optional[float] = 0.2
    """Clip range of the value loss around V_old (reward units); null = unclipped."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """Whiten advantages over the batch's valid tokens (SPEC 4.4)."""
    loss_agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"] = "token-mean"
    """How token losses reduce to a scalar (agg_loss)."""
    fuse_scoring: bool = True
    """When a rank's whole batch is one minibatch and one micro-batch (mini_batch_size and
    train.micro_batch_size >= its rows: TRL's defaults), the first update step's actor and critic
    forwards also give logp_old and V_old, and the two scoring forwards are skipped. Exact: the
    weights have not moved since the rollout. Costs keeping that forward's graph while the
    reference and reward model score. Models with active dropout are never fused."""

    def validate(self, where: str) -> None:
        if self.rollout.temperature <= 0:
            raise ConfigError(f"{where}.rollout.temperature: training samples need temperature > 0")
        if self.ppo_epochs < 1 or self.mini_batch_size < 1:
            raise ConfigError(f"{where}: ppo_epochs and mini_batch_size must be >= 1")
        rows = self.train.batch_size * self.rollout.n
        if rows % self.mini_batch_size:
            raise ConfigError(f"{where}.mini_batch_size: {self.mini_batch_size} must divide train.batch_size x "
                              f"rollout.n = {rows} rows")
        if self.critic_init == "reward" and not self.critic_model and not self.reward.spec.startswith("rm:"):
            raise ConfigError(f"{where}.critic_init: 'reward' needs reward.spec=rm:DIR (or set critic_model, "
                              "or critic_init: policy)")


def load_critic(cfg: PPOConfig, tokenizer, device, actor=None):
    """The critic V_psi: a scalar-head model, initialised from the RM (its head predicts the final
    score from the start) or from the policy backbone with a zero head (V = 0 at first).

    With LoRA and a critic started from the policy, the critic's frozen backbone *is* the LoRA
    actor's frozen base (the same tensors, `share_frozen_base`): actor, reference and critic then
    hold one copy of the base weights, and the critic owns only its adapters and head."""
    from rlhfkit.judges.rewards import find_rm_dir

    if cfg.critic_model:
        src = cfg.critic_model
    elif cfg.critic_init == "reward":
        src = str(find_rm_dir(cfg.reward.spec[3:]))
    else:
        src = cfg.model.name
    critic = load_scalar_model(src, cfg.model.dtype, pad_token_id=tokenizer.pad_token_id)
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
    critic.train()
    return critic


def kl_controller(kl: KLSection):
    if kl.target > 0:
        return AdaptiveKLController(kl.coef, kl.target, kl.horizon)
    return FixedKLController(kl.coef)


def ppo_iteration(run, step: int, critic, opts: dict, kl_ctl, guard: StepGuard, ptx, logger: RunLogger) -> dict:
    cfg, micro = run.cfg, run.cfg.train.micro_batch_size
    items = prompt_batch(run, step)
    clock = Stopwatch()

    # 1. Rollout: n samples per prompt from the current policy (left-padded prompts, stop at EOS).
    exp = rollout(run.actor, items, cfg.rollout, run.tokenizer, seed=sampling_seed(run, step))
    clock.lap("rollout")

    # 2. Score: logp_old (actor, eval mode), logp_ref, V_old, sequence scores, without gradients.
    #    Fused (cfg.fuse_scoring, when the rank's batch is one minibatch and one micro-batch): the
    #    first update step's actor and critic forwards run now, with their graphs, and give
    #    logp_old and V_old; the first minibatch then runs only its backward.
    first = policy = None
    if cfg.fuse_scoring and fusable(len(exp), run.settings, run.actor, critic):
        logp, ent = policy_logprobs(run.actor, exp, False, with_entropy=True)
        values = response_values(critic, exp.input_ids(), exp.attention_mask(), exp.response_ids.shape[1])
        first = FirstForward(logp, values)
        policy = {"logp": logp.detach(), "entropy": ent.detach()}
    exp, metrics, responses = score_experience(exp, items, run.reward_fn, cfg.reward, run.actor, run.ref,
                                               run.tokenizer, micro, run.rt, policy=policy)
    exp.values = first.values.detach() if first is not None else score_values(critic, exp, micro)
    metrics["score/fused"] = float(first is not None)
    mask = exp.response_mask
    clock.lap("score")

    # 3. Per-token rewards: -beta * kl_t, plus the score at the last response token.
    exp.rewards, kl = kl_penalized_rewards(exp.scores, exp.logprobs, exp.ref_logprobs, mask,
                                           kl_ctl.value, cfg.kl.kind)
    seq_kl = sequence_kl(exp, "k1")

    # 4. Advantages by GAE, whitened over the batch's valid tokens (every rank's: reduce=rt.sum);
    #    returns are the value targets.
    adv, exp.returns = gae_advantages(exp.rewards, exp.values, mask, cfg.gamma, cfg.lam)
    exp.advantages = masked_whiten(adv, mask, reduce=run.rt.sum) if cfg.whiten_advantages else adv

    # 5. Update: ppo_epochs x minibatches, clipped policy + value losses (+ PTX), two optimizers.
    upd = policy_update(exp, run.actor, opts["actor"], run.settings, run.rt, guard, critic=critic,
                        critic_opt=opts["critic"], ptx=ptx, opt_step=step * optimizer_steps_per_iteration(run),
                        first=first)
    clock.lap("update")
    metrics.update(upd)
    metrics.update(clock.times)
    metrics["time/gen_tokens_per_s"] = float(run.rt.sum(mask.sum().float())) / max(clock.times["time/rollout"], 1e-9)
    per_row = run.rt.gather(torch.stack([seq_kl, kl.sum(-1)], dim=1))  # (N, 2) over every rank's rows
    values = run.rt.sum(torch.stack([masked_sum(exp.values, mask), mask.sum().float()]))
    metrics.update({
        "objective/kl": per_row[:, 0].mean(), "objective/kl_penalty": per_row[:, 1].mean(),
        "objective/kl_coef": kl_ctl.value,
        "objective/non_score_reward": -kl_ctl.value * per_row[:, 1].mean(),
        "value/explained_variance": explained_variance(exp.values, exp.returns, mask, reduce=run.rt.sum),
        "value/mean": values[0] / values[1].clamp(min=1),
    })
    kl_ctl.update(float(per_row[:, 1].mean()), n_steps=run.rows_per_step)  # the same beta on every rank
    log_samples(run, logger, step + 1, exp, items, responses)
    return metrics


SHOW = ("reward/score_mean", "objective/kl", "policy/entropy", "response/length_mean", "policy/ratio_first")


def train_ppo(cfg: PPOConfig) -> dict:
    """Run PPO; the actor lands in output_dir/model, the critic in output_dir/critic."""
    run = setup_run(cfg, "ppo", epochs=cfg.ppo_epochs, mini_batch_size=cfg.mini_batch_size,
                    clip_eps=cfg.clip_eps, agg=cfg.loss_agg, vf_coef=cfg.vf_coef, value_clip_eps=cfg.value_clip_eps,
                    critic_max_grad_norm=cfg.critic_optim.max_grad_norm)
    with run.rt.loading_shards():  # FSDP: rank 0 reads the weights, the others get their shards from it
        critic = load_critic(cfg, run.tokenizer, run.rt.device, actor=run.actor)
    run.rt.broadcast_params(critic)
    n_opt = run.total_steps * optimizer_steps_per_iteration(run)
    opts = {"actor": build_opt(run.actor, cfg.optim, n_opt), "critic": build_opt(critic, cfg.critic_optim, n_opt)}
    # train.fsdp: both trained models sharded (the results' layout describes the actor, sharded last)
    critic = shard_trained(run, critic, opts["critic"])
    run.actor = shard_trained(run, run.actor, opts["actor"])
    ptx = load_ptx(cfg.ptx, run.tokenizer, cfg.train.micro_batch_size, cfg.train.seed)
    kl_ctl = kl_controller(cfg.kl)

    optimizers = {"actor": opts["actor"]["optimizer"], "actor_scheduler": opts["actor"]["scheduler"],
                  "critic": opts["critic"]["optimizer"], "critic_scheduler": opts["critic"]["scheduler"]}

    def iterate(step, guard, logger):
        return ppo_iteration(run, step, critic, opts, kl_ctl, guard, ptx, logger)

    metrics = train_loop(run, iterate, {"actor": run.actor, "critic": critic}, optimizers,
                         state_fn=lambda: {"kl_controller": kl_ctl.state_dict()},
                         load_state=lambda st: kl_ctl.load_state_dict(st["kl_controller"]), show=SHOW)
    save_final(run, {"model": run.actor, "critic": critic},
               {**metrics, "steps": run.total_steps, "kl_coef_final": kl_ctl.value})
    return metrics
