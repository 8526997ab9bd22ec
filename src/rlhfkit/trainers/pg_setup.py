"""What PPO, GRPO and RLOO share before their first iteration: the config fields of the clipped
update, prompts, the reward function, the actor and its reference, and the PTX data.

An iteration is 1 rollout (`rollout.sampling`), 2 score (`trainers.pg_score`), 3 rewards and
4 advantages (in each trainer: GAE with a critic, or group baselines), 5 update (`trainers.pg_update`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, Optional

import torch

from rlhfkit.config import (
    ConfigError,
    DataSection,
    ModelSection,
    OptimSection,
    PolicyTrainSection,
    PromptsSection,
    PTXSection,
    RewardSection,
    RolloutSection,
    SFTConfig,
    TrainSection,
    under_key,
)
from rlhfkit.data import SFTCollator, load_plain_text, load_sft, tokenize_plain_text
from rlhfkit.data.sources import Input, resolve_source
from rlhfkit.judges import RewardFn, RewardSet, build_reward_fn, build_reward_set, check_reward_set, check_reward_spec
from rlhfkit.judges.reward_set import check_on_prompts, check_record_fields
from rlhfkit.models import check_model_path, load_causal_lm, load_tokenizer
from rlhfkit.models.loading import check_context_length, store_linears_in, to_device, trained_dtype
from rlhfkit.models.lora import apply_lora, disable_dropout, enable_gradient_checkpointing
from rlhfkit.models.start import check_policy_start
from rlhfkit.parallel import precision
from rlhfkit.rollout import PromptItem, load_prompt_items
from rlhfkit.rollout.prompts import prompt_inputs
from rlhfkit.trainers.sft import prepare_sft_data
from rlhfkit.training import (
    Run,
    batch_indices,
    check_enough,
    left_out,
    open_run,
    prepare_optimization,
    total_steps,
)

log = logging.getLogger("rlhfkit")

LossAgg = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]


HELD_OUT_POLICY_METRICS = ("eval/proxy_mean", "eval/kl", "eval/length_mean", "eval/eos_frac", "eval/prompts")


@dataclass
class PolicyGradientConfig:
    """The fields every policy-gradient trainer has. A step (iteration): train.batch_size prompts x
    rollout.n samples are generated, scored, and learned from for ppo_epochs passes of
    mini_batch_size-row minibatches (train.micro_batch_size rows per forward/backward)."""

    model: ModelSection = field(default_factory=ModelSection)
    """The policy: initialises the actor and the frozen reference (with LoRA: base = reference)."""
    prompts: PromptsSection = field(default_factory=PromptsSection)
    """Where rollout prompts (and held-out evaluation prompts) come from."""
    rollout: RolloutSection = field(default_factory=RolloutSection)
    """Sampling settings of step 1."""
    reward: RewardSection = field(default_factory=RewardSection)
    """The sequence score of step 2, clipping, the missing-EOS score, the gold judge for evaluation."""
    ptx: PTXSection = field(default_factory=PTXSection)
    """Optional PTX loss on plain text or SFT data (the alignment-tax guard)."""
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-6, schedule="constant", warmup_ratio=0.0))
    """The actor's optimizer (AdamW) and gradient clipping."""
    train: PolicyTrainSection = field(default_factory=PolicyTrainSection)
    """Run length (max_steps iterations, or epochs over the prompts), batch sizes, checkpoints."""
    ppo_epochs: int = 1
    """Passes over each batch of experience."""
    mini_batch_size: int = 16
    """Rows (responses) per optimizer step of the update, over all ranks."""
    clip_eps: float = 0.2
    """PPO ratio clip epsilon (the lower side; also the upper side unless clip_eps_high is set)."""
    clip_eps_high: Optional[float] = None
    """Upper clip epsilon (DAPO's clip-higher, e.g. 0.28); null = symmetric."""
    loss_agg: LossAgg = "token-mean"
    """How token losses reduce to a scalar (`algos.agg_loss`). GRPO/RLOO with a ratio per response
    (ratio_level sequence or sequence-mean) average over responses and do not read it."""
    share_prompt: bool = False
    """Score and train each prompt's responses as one packed sequence (the prompt once)."""
    fuse_scoring: bool = True
    """When a rank's whole batch is one minibatch and one micro-batch (mini_batch_size and
    train.micro_batch_size >= its rows: TRL's defaults), the first update step's forwards (the actor's,
    and PPO's critic's) also give logp_old (and V_old), and those scoring forwards are skipped. Exact:
    the weights have not moved since the rollout. Costs keeping that forward's graph while the
    reference and reward model score. Models with active dropout are never fused."""
    disable_dropout: bool = True
    """Turn every dropout of the actor (and PPO's critic) off, LoRA's included (TRL's and OpenRLHF's
    default): with dropout the rollout's log-probs (eval mode) and the update's (train mode) differ,
    the first ratio is not 1 and the KL is noise. false keeps the model's own rates."""

    def kl_loss(self) -> tuple[float, str]:
        """(coefficient, estimator) of a KL-to-reference term in the loss; PPO puts the KL in the reward."""
        return 0.0, "k3"

    def policy_ratio_level(self) -> str:
        """Importance ratio of the surrogate: "token", or one per response ("sequence", "sequence-mean")."""
        return "token"

    def eval_metrics(self) -> tuple[str, ...]:
        """What its held-out evaluation logs (`trainers.pg_eval`); eval/gold_mean with reward.gold."""
        return (*HELD_OUT_POLICY_METRICS, *(("eval/gold_mean",) if self.reward.gold else ()))

    def inputs(self) -> list[Input]:
        """What it reads that may exist before it runs: ``(key, value, check)`` per prompt source,
        reward and gold spec and the PTX data (when its coef is > 0), the check reading the value as
        the run does, without loading a model (`rlhfkit.pipeline` checks every stage's up front)."""
        r, ptx = self.reward, self.ptx
        return [*prompt_inputs(self.prompts),
                *(("reward.spec", s, partial(check_reward_on_prompts, s, self.prompts)) for s in r.sources()),
                ("reward.gold", r.gold, partial(check_reward_on_prompts, r.gold, self.prompts, gold=True)),
                ("ptx.data", ptx.data if ptx.coef > 0 else "", partial(read_ptx, ptx.data))]

    def validate(self, where: str) -> None:
        if self.rollout.temperature <= 0:
            raise ConfigError(f"{where}.rollout.temperature: training samples need temperature > 0")
        if self.reward.gold and not self.prompts.eval:
            raise ConfigError(f"{where}.reward.gold: the gold judge scores the held-out evaluation, which needs "
                              "prompts.eval (and train.eval_every); set them, or leave reward.gold empty")
        if self.ppo_epochs < 1 or self.mini_batch_size < 1:
            raise ConfigError(f"{where}: ppo_epochs and mini_batch_size must be >= 1")
        if self.clip_eps_high is not None and self.clip_eps_high < self.clip_eps:
            raise ConfigError(f"{where}.clip_eps_high: {self.clip_eps_high} is below clip_eps {self.clip_eps}; it is "
                              "the wider upper side (DAPO's clip-higher), null for symmetric")
        if self.reward.combine == "normalize_then_sum" and self.rollout.n < 2:
            raise ConfigError(f"{where}.reward.combine: normalize_then_sum standardises each reward within a "
                              f"prompt's group of rollout.n samples; with rollout.n = {self.rollout.n} every reward "
                              "would be 0: set rollout.n >= 2, or combine: sum")
        rows = self.train.batch_size * self.rollout.n
        if rows % self.mini_batch_size:
            raise ConfigError(f"{where}.mini_batch_size: {self.mini_batch_size} must divide train.batch_size x "
                              f"rollout.n = {rows} rows")


def check_reward_on_prompts(spec, prompts, gold: bool = False) -> None:
    """A reward's spec (`check_reward_spec`) and what it needs of the prompt records it will score
    (`judges.reward_set.check_on_prompts`): the training and held-out prompts for a reward of the
    set, the held-out ones for the gold judge (used alone), as the run checks them when it starts."""
    check_reward_spec(spec)
    if not gold:
        check_on_prompts(spec, "prompts.train", prompts.train, "prompts", prompts.limit)
    check_on_prompts(spec, "prompts.eval", prompts.eval, "prompts_eval", prompts.eval_limit, alone=gold)


@dataclass
class PolicyRun:
    """Everything a policy-gradient loop holds besides its algorithm-specific models."""

    cfg: Any
    run: Run
    tokenizer: Any
    prompts: list[PromptItem]
    eval_prompts: list[PromptItem]
    reward_fn: RewardSet
    gold_fn: RewardFn | None
    actor: Any
    ref: Any
    total: int
    ptx: PTXData | None = None

    @property
    def strategy(self):
        return self.run.strategy

    def local_mini_batch(self) -> int:
        """Rows per optimizer step on this rank."""
        return self.cfg.mini_batch_size // self.strategy.world_size

    def announce(self, start: int) -> None:
        """`fit`'s on_start: what the run says once its logger exists (the prompts each pass over
        them leaves out with drop_last, as the supervised trainers say of their examples)."""
        train, n = self.cfg.train, len(self.prompts)
        rest = left_out(n, train, self.total)
        if rest:
            self.run.logger.write(f"[{self.run.kind}] batches of {train.batch_size} prompts leave {rest} of the {n} "
                                  "out of each pass (a different few each pass); train.drop_last=false keeps them")

    def optimizer_steps_per_iteration(self) -> int:
        local_rows = self.cfg.train.batch_size * self.cfg.rollout.n // self.strategy.world_size
        return self.cfg.ppo_epochs * -(-local_rows // self.local_mini_batch())



def prompt_batch(pr: PolicyRun, step: int) -> list[PromptItem]:
    """This rank's prompts for iteration `step` (deterministic in (seed, step): resumable)."""
    train = pr.cfg.train
    idx = batch_indices(len(pr.prompts), train.batch_size, step, train.seed, train.drop_last)
    return pr.strategy.shard([pr.prompts[i] for i in idx])


def load_actor(model_cfg, device, dropout_off: bool = True, sharded: bool = False):
    """(actor, reference). Without LoRA the reference is the starting policy in fp32 with its linear
    layers' weights in the compute dtype (`store_linears_in`): under the run's autocast it computes as
    the actor does. With LoRA the reference is None: scoring then runs the actor with its
    adapters disabled, so the base weights exist once in memory. The reference is the starting
    policy, so a LoRA adapter as model.name (a LoRA SFT run) is merged into its base first and fresh
    adapters go on top; `rlhfkit merge` follows that chain back. ``dropout_off``: the actor's dropout
    is turned off (``disable_dropout``). ``sharded``: the reference will be sharded by FSDP, whose
    mixed-precision policy casts all its parameters for both models (it keeps one storage dtype)."""
    actor = load_causal_lm(model_cfg.name, trained_dtype(model_cfg.dtype, model_cfg.lora.enabled))
    if model_cfg.gradient_checkpointing:
        enable_gradient_checkpointing(actor)
    actor = to_device(apply_lora(actor, model_cfg.lora, "CAUSAL_LM"), device)
    if dropout_off:
        disable_dropout(actor)
    ref = None
    if not model_cfg.lora.enabled:
        # the actor's fp32 master weights under autocast, as the actor computes: KL exactly 0 at step 0
        ref = load_causal_lm(model_cfg.name, "float32")
        compute = precision.NAMES[precision.resolve(model_cfg.dtype or "auto", torch.device(device))]
        if compute != torch.float32 and not sharded:  # FSDP's mixed precision casts every parameter anyway
            store_linears_in(ref, compute)
        ref = to_device(ref, device)
        ref.eval().requires_grad_(False)
    actor.train()
    return actor, ref


def setup_run(cfg, kind: str, strategy, models: Mapping[str, str] | None = None) -> PolicyRun:
    """Data, reward function, actor + reference. Validates the batch arithmetic against the ranks,
    and reads or checks every input (prompts, PTX data, the reward and gold specs, the other
    ``models`` the run loads later, by config key) before the run directory is written or a model loads."""
    # Each rank takes whole prompts (a group never straddles ranks) and an equal share of every
    # minibatch, so all ranks make the same number of optimizer steps (each one a collective).
    strategy.check_divisible(cfg.train.batch_size, "train.batch_size (prompts per step)")
    strategy.check_divisible(cfg.mini_batch_size, "mini_batch_size")
    if strategy.lockstep_forwards and cfg.ptx.coef > 0:
        strategy.check_divisible(cfg.ptx.batch_size, "ptx.batch_size")  # sharded forwards run in lockstep
    p = cfg.prompts
    check_policy_start(cfg.model, p.max_prompt_length + cfg.rollout.max_new_tokens, "rollout.max_new_tokens",
                       "prompts.max_prompt_length + rollout.max_new_tokens")
    tokenizer = load_tokenizer(cfg.model.name)
    if cfg.ptx.coef > 0:
        with under_key("ptx.max_length"):
            check_context_length(cfg.model.name, cfg.ptx.max_length)
    prompts, dropped = load_prompt_items(p.train, tokenizer, max_prompt_length=p.max_prompt_length, limit=p.limit)
    if dropped:
        log.warning("[%s] dropped %d prompts longer than %d tokens", kind, dropped, p.max_prompt_length)
    eval_prompts = []
    if p.eval:
        eval_prompts, _ = load_prompt_items(p.eval, tokenizer, max_prompt_length=p.max_prompt_length,
                                            limit=p.eval_limit, kind="prompts_eval")
    ptx = load_ptx(cfg.ptx, tokenizer, cfg.train.micro_batch_size, cfg.train.seed)
    _check_enough(cfg, len(prompts), dropped, ptx)
    with under_key("reward.spec"):
        check_reward_set(cfg.reward.spec, weights=cfg.reward.weights or None, combine=cfg.reward.combine,
                         unscorable=cfg.reward.unscorable)
        check_record_fields(cfg.reward.spec, prompts, f"prompts.train ({p.train})")
        check_record_fields(cfg.reward.spec, eval_prompts, f"prompts.eval ({p.eval})")
    with under_key("reward.gold"):
        if cfg.reward.gold:
            check_reward_spec(cfg.reward.gold)
            check_record_fields(cfg.reward.gold, eval_prompts, f"prompts.eval ({p.eval})", alone=True)
    for key, name in (models or {}).items():
        with under_key(key):
            check_model_path(name)
    run = open_run(cfg, kind, strategy, tokenizer)
    with strategy.loading():  # FSDP: rank 0 reads the weights, the others get their shards from it
        reward_fn = build_reward_set(cfg.reward.spec, weights=cfg.reward.weights or None,
                                     combine=cfg.reward.combine, unscorable=cfg.reward.unscorable,
                                     tokenizer=tokenizer, device=strategy.device, batch_size=cfg.reward.batch_size)
        actor, ref = load_actor(cfg.model, strategy.device, cfg.disable_dropout, sharded=strategy.lockstep_forwards)
    gold_fn = build_reward_fn(cfg.reward.gold) if cfg.reward.gold else None
    # frozen models sharded like the actor under FSDP: their scoring forwards gather block by block,
    # the same number on every rank (equal rows per rank; the RM's micro-batches of reward.batch_size)
    strategy.prepare_frozen(ref, "reference")
    for i, model in enumerate(reward_fn.models):
        strategy.prepare_frozen(model, "reward_model" if i == 0 else f"reward_model_{i}")
    return PolicyRun(cfg, run, tokenizer, prompts, eval_prompts, reward_fn, gold_fn, actor, ref,
                     total_steps(len(prompts), cfg.train), ptx)


@dataclass
class Trained:
    """A trained model (as its strategy prepared it) with its optimizer, schedule and clipping threshold."""

    model: Any
    optimizer: Any
    scheduler: Any
    max_grad_norm: float


def prepare_trained(pr: PolicyRun, model, optim: OptimSection) -> Trained:
    """AdamW and its schedule over every optimizer step of the run, then the strategy's preparation
    of ``model`` (sharded, a ZeRO engine, or as it is)."""
    n_opt = pr.total * pr.optimizer_steps_per_iteration()
    model, optimizer, scheduler = prepare_optimization(pr.strategy, model, optim, pr.cfg.train, n_opt)
    return Trained(model, optimizer, scheduler, optim.max_grad_norm)


# --------------------------------------------------------------------------- PTX data

@dataclass
class PTXData:
    examples: list
    collator: Any
    coef: float
    batch_size: int
    micro_batch_size: int
    seed: int


def read_ptx(source: str) -> list:
    """The PTX data's documents or conversations, read as `load_ptx` reads them (not tokenised)."""
    path = resolve_source(source, "sft")
    docs = load_plain_text(path)
    return docs if docs is not None else load_sft(path)


def _check_enough(cfg, prompts: int, dropped: int, ptx: PTXData | None) -> None:
    """Fewer prompts than train.batch_size (or PTX examples than ptx.batch_size) with drop_last
    would make every batch that short, silently: the schedule, the minibatches and the processes'
    shares are sized for the configured batch. Refused, naming the counts."""
    said = f" ({dropped} more were longer than prompts.max_prompt_length)" if dropped else ""
    check_enough(prompts, cfg.train, "prompts.train", "prompts", said, " per iteration")
    if ptx is not None and len(ptx.examples) < ptx.batch_size:
        raise ConfigError(f"ptx.data: {len(ptx.examples)} examples, fewer than ptx.batch_size {ptx.batch_size}: "
                          "lower ptx.batch_size")


def load_ptx(section: PTXSection, tokenizer, micro_batch_size: int, seed: int) -> PTXData | None:
    """The PTX term's examples: plain text (`data.plain_text`, every token trained) or SFT
    conversations, prepared exactly as `rlhfkit sft` prepares them (the assistant tokens trained)."""
    if not section.data or section.coef <= 0:
        return None
    docs = load_plain_text(resolve_source(section.data, "sft"))
    if docs is not None:
        train = tokenize_plain_text(tokenizer, docs, section.max_length)
    else:
        sft_cfg = SFTConfig(data=DataSection(train=section.data, eval_fraction=0.0, max_length=section.max_length),
                            train=TrainSection(seed=seed))
        train, _, _ = prepare_sft_data(sft_cfg, tokenizer)
    return PTXData(train, SFTCollator(tokenizer.pad_token_id), section.coef, section.batch_size,
                   micro_batch_size, seed)


# Where an iteration's wall time goes: logged as time/<phase> seconds every iteration, shown in the
# progress line, and drawn by the report (`report.plots`).
TIME_SPLIT = ("time/rollout", "time/score", "time/update", "time/other")


class Stopwatch:
    """Wall time of consecutive phases of an iteration, as time/<phase> metrics (`TIME_SPLIT`)."""

    def __init__(self):
        self.start = self.t = time.perf_counter()
        self.times: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.times[f"time/{phase}"] = now - self.t
        self.t = now
