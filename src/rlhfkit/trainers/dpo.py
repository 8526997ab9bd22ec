"""Direct preference optimisation and relatives: DPO, IPO, conservative and robust DPO (docs/concepts.md, "DPO").

    rlhfkit dpo --config configs/dpo.yaml data.train=prefs.jsonl dpo.beta=0.1

One training step, per global batch of preference pairs:
  1. one concatenated forward of chosen and rejected rows (chosen first) through the policy;
  2. sequence log-probs summed over response tokens (the collator's loss_mask);
  3. the reference's log-probs of the same pairs: a frozen copy of the starting policy, the
     policy's base with its LoRA adapters disabled (no second copy of the weights), or numbers
     computed once before training (then no reference model is kept at all);
  4. `algos.dpo_loss` summed over pairs and divided by the global number of pairs, so batch 8 x
     accumulation 1 and batch 1 x accumulation 8 give the same update.
The SFT-then-DPO recipe (SFT on the chosen responses first, so the policy starts close to the data's
distribution) is `sft_first.enabled: true`; the SFT model is then also the reference.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

import torch

from rlhfkit.algos import dpo_loss
from rlhfkit.config import (
    ConfigError,
    DataSection,
    ModelSection,
    OptimSection,
    SFTConfig,
    TrainSection,
    under_key,
    validate,
)
from rlhfkit.config.sections import changed_keys
from rlhfkit.data import (
    PreferenceCollator,
    batch_to_device,
    load_preference,
    sft_from_preference,
)
from rlhfkit.data.sources import Input, data_inputs, load_sources
from rlhfkit.io import write_jsonl_atomic
from rlhfkit.models import (
    check_policy_path,
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
)
from rlhfkit.models.loading import check_context_length
from rlhfkit.models.lora import disable_dropout
from rlhfkit.models.start import check_policy_start, load_for_training, merge_adapter
from rlhfkit.parallel import Strategy, make_strategy
from rlhfkit.trainers.dpo_logps import Reference, pair_logps, precompute_or_load, reference_logps
from rlhfkit.trainers.reward import prepare_preference_data
from rlhfkit.trainers.sft import train_sft
from rlhfkit.training import (
    check_enough,
    eval_chunks,
    finish,
    fit_supervised,
    open_run,
    prepare_optimization,
    total_steps,
)


@dataclass
class DPOSection:
    """The DPO objective; shared with online DPO (`trainers/online_dpo.py`)."""

    beta: float = 0.1
    """KL anchor: implicit reward = beta * log(pi/pi_ref); smaller lets the policy move further."""
    loss_type: Literal["sigmoid", "cdpo", "robust", "ipo", "hinge"] = "sigmoid"
    """sigmoid = DPO, cdpo = conservative DPO (Mitchell 2023; with label_smoothing), robust = robust DPO
    (rDPO, Chowdhury et al. 2024; TRL's "robust"; with label_smoothing), ipo = IPO, hinge = SLiC."""
    label_smoothing: float = 0.0
    """The assumed probability that a label is flipped, in [0, 0.5): conservative DPO for sigmoid/cdpo
    (smoothed cross-entropy), robust DPO's unbiased correction for robust. Other losses: must be 0."""
    average_logps: Union[bool, Literal["auto"]] = "auto"
    """Length-normalised (mean over response tokens) sequence log-probs instead of sums. auto = true for
    ipo (as TRL, so IPO's target 1/(2 beta) is per token), false otherwise."""
    precompute_ref_logps: bool = False
    """Compute the reference log-probs once before training and keep no reference model."""
    reference: str = ""
    """Reference model; empty = the starting policy (the SFT model with sft_first)."""
    share_prompt: bool = True
    """Score each pair as one packed sequence (prompt once, then chosen and rejected, each seeing the
    prompt and itself): the same log-probs up to float rounding, fewer tokens per pair."""
    disable_dropout: bool = True
    """Turn every dropout of the policy off, LoRA's included (TRL's default): with dropout the policy's
    log-probs are noisy against the reference's (eval mode). false keeps the model's own rates."""
    temperature: float = 1.0
    """Log-probs of the policy and the reference of softmax(logits / temperature); online DPO sets it
    to rollout.temperature, that of its samples (docs/concepts.md: Sampling temperature)."""

    def validate(self, where: str) -> None:
        for key in ("beta", "temperature"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{where}.{key}: must be > 0, got {getattr(self, key)}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"{where}.label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "cdpo", "robust"):
            raise ConfigError(f"{where}.label_smoothing: only defined for loss_type sigmoid/cdpo/robust")

    @property
    def average(self) -> bool:
        """Whether sequence log-probs are token means (average_logps, with auto resolved)."""
        return self.loss_type == "ipo" if self.average_logps == "auto" else bool(self.average_logps)


@dataclass
class SFTFirstSection:
    """SFT on the chosen responses before DPO (the recipe for off-policy preference data)."""

    enabled: bool = False
    """Run the SFT stage first (into output_dir/sft); its model becomes the policy and the reference."""
    lr: float = 2e-5
    """The SFT stage's own learning rate (optim.lr is DPO's)."""
    epochs: float = 1.0
    """Epochs of the SFT stage."""
    max_steps: int = 0
    """Steps of the SFT stage; > 0 overrides epochs."""

    def unused_keys(self) -> tuple[list[str], str]:
        return [] if self.enabled else changed_keys(self, but=("enabled",)), "enabled"

    def validate(self, where: str) -> None:
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError(f"{where}.epochs: {self.epochs} with max_steps {self.max_steps}: the SFT stage needs "
                              "epochs > 0 or max_steps > 0")


# What a held-out evaluation sums over its pairs (`dpo_batch_loss`'s sums) and adds over ranks.
EVAL_SUMS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen",
             "logps/rejected")


@dataclass
class DPOConfig:
    model: ModelSection = field(default_factory=ModelSection)
    """The starting policy (and, by default, the reference)."""
    data: DataSection = field(default_factory=DataSection)
    """Preference pairs {prompt, chosen, rejected}."""
    # DPO wants small steps: the implicit reward grows without bound on separable data. 5e-7 is
    # the usual value for 7B models; the 135M default model needs ~2e-5 to move measurably in
    # ~15 steps of 8 pairs (docs/results_dpo.md).
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-6, warmup_ratio=0.1))
    """Optimizer and schedule."""
    train: TrainSection = field(default_factory=TrainSection)
    """Run length, batch sizes, evaluation, checkpoints."""
    dpo: DPOSection = field(default_factory=DPOSection)
    """The objective."""
    sft_first: SFTFirstSection = field(default_factory=SFTFirstSection)
    """Optional SFT on the chosen responses before DPO."""

    def eval_metrics(self) -> tuple[str, ...]:
        """What its held-out evaluation logs (train.select_best is one of them)."""
        return (*(f"eval/{k}" for k in EVAL_SUMS), "eval/pairs")

    def inputs(self) -> list[Input]:
        """What it reads that may exist before it runs, as `SFTConfig.inputs`: the preference pairs."""
        return data_inputs(self.data, "preference", load_preference)


# --------------------------------------------------------------------------- the loss on a batch

def dpo_batch_loss(policy, reference, chunk: list[dict], collator, dcfg: DPOSection, normalizer: float,
                   device) -> tuple[torch.Tensor, dict]:
    """DPO loss of one micro-batch, summed over its pairs and divided by ``normalizer`` (the
    global number of pairs). Returns (loss to backpropagate, metric sums over the chunk's pairs)."""
    batch = batch_to_device(collator(chunk), device)
    pc, pr = pair_logps(policy, batch, dcfg.average, dcfg.temperature)
    rc, rr = reference_logps(chunk, batch, reference, dcfg.average, dcfg.temperature)
    loss, m = dpo_loss(pc, pr, rc, rr, beta=dcfg.beta, loss_type=dcfg.loss_type,
                       label_smoothing=dcfg.label_smoothing, reduction="sum")
    sums = {k: v * len(chunk) for k, v in m.items()}  # metrics are chunk means
    sums["loss"] = loss.detach()
    return loss / normalizer, sums


@torch.no_grad()
def evaluate_dpo(policy, reference, examples: list[dict], collator, dcfg: DPOSection, micro_batch_size: int,
                 strategy: Strategy) -> dict:
    """Held-out DPO loss and implicit-reward metrics (accuracy = share of pairs whose chosen
    response gets the larger implicit reward); each rank scores its shard, sums added over ranks."""
    if not examples:
        return {}
    was_training = policy.training
    policy.eval()
    totals = dict.fromkeys(EVAL_SUMS, 0.0)  # the same keys on every rank, one that scored no pair included
    for chunk, real in eval_chunks(examples, micro_batch_size, strategy):
        with strategy.autocast():
            _, sums = dpo_batch_loss(policy, reference, chunk, collator, dcfg, 1.0, strategy.device)
        for k in EVAL_SUMS:
            totals[k] += float(sums[k]) if real else 0.0
    policy.train(was_training)
    if strategy.world_size > 1:
        summed = strategy.sum(torch.tensor(list(totals.values()), dtype=torch.float64)).tolist()
        totals = dict(zip(totals, summed))
    out = {f"eval/{k}": v / len(examples) for k, v in totals.items()}
    out["eval/pairs"] = len(examples)
    return out


# --------------------------------------------------------------------------- models

def build_policy_and_reference(cfg, tokenizer=None):
    """The trainable policy and its reference (docs/concepts.md, "DPO"; the LoRA rule).

    - Full fine-tuning: a frozen deep copy of the starting policy, taken before any update.
    - LoRA: the reference is the same module with its adapters disabled (one copy of the base
      weights in memory). A LoRA adapter directory as ``model.name`` continues training that
      adapter; with ``dpo.reference`` = its base model (online DPO's pi_0) the reference is again
      the adapters-disabled module.
    - ``dpo.reference`` naming another model: loaded and frozen.
    - ``dpo.precompute_ref_logps``: the untrained policy itself serves as the reference; the
      caller computes the numbers once, before any update, and then drops the Reference.
    Returns (policy, Reference).
    """
    policy, adapter_base = load_for_training(cfg.model, "CAUSAL_LM")
    if cfg.dpo.disable_dropout:
        disable_dropout(policy)
    if tokenizer is not None and policy.config.pad_token_id is None:
        policy.config.pad_token_id = tokenizer.pad_token_id
    fresh_lora = cfg.model.lora.enabled and adapter_base is None
    policy.train()
    ref_name = cfg.dpo.reference
    if adapter_base is not None and ref_name and _same_model(ref_name, adapter_base):
        return policy, Reference(policy, adapters_off=True)
    if ref_name and not _same_model(ref_name, cfg.model.name):
        return policy, Reference(_frozen(load_causal_lm(ref_name, cfg.model.dtype)))
    if fresh_lora or cfg.dpo.precompute_ref_logps:
        return policy, Reference(policy, adapters_off=fresh_lora)
    return policy, Reference(_frozen(copy.deepcopy(policy)))


def _same_model(a: str, b: str) -> bool:
    ra, rb = resolve_model_path(a), resolve_model_path(b)
    return ra == rb or (Path(ra).exists() and Path(rb).exists() and Path(ra).resolve() == Path(rb).resolve())


def _frozen(model):
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------- the trainer

def train_dpo(cfg: DPOConfig, strategy: Strategy | None = None, desc: str = "dpo") -> dict:
    """Run DPO (after SFT on the chosen responses when ``sft_first.enabled``); returns the final
    metrics. The trained policy lands in ``output_dir/model``."""
    validate(cfg)  # a config changed in Python after load_config is checked as a loaded one is
    strategy = strategy or make_strategy(cfg.train, cfg.model)
    strategy.check_divisible(cfg.train.batch_size, "train.batch_size")  # equal shares of every global batch

    # 1. Data: validated and tokenised before anything is written or the model loads (with the
    #    starting model's tokenizer, which the SFT stage of sft_first saves unchanged with its model).
    check_policy_start(cfg.model, cfg.data.max_length, "data.max_length")
    tokenizer = load_tokenizer(cfg.model.name, chat_template=cfg.data.chat_template)
    train, evals, trunc = prepare_preference_data(cfg, tokenizer)
    check_enough(len(train), cfg.train, "data.train", "pairs")
    with under_key("dpo.reference"):
        if cfg.dpo.reference:
            check_policy_path(cfg.dpo.reference)  # not a reward model or critic
            check_context_length(cfg.dpo.reference, cfg.data.max_length, "data.max_length")
    run = open_run(cfg, desc, strategy, tokenizer)

    # 0. SFT-then-DPO: the SFT model becomes both the starting policy and the reference.
    if cfg.sft_first.enabled:
        sft_model = run_sft_first(cfg, run.out, strategy)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=str(sft_model)))
    collator = PreferenceCollator(tokenizer.pad_token_id, share_prompt=cfg.dpo.share_prompt)

    # 2. Policy and reference (FSDP: rank 0 reads the weights, the others get their shards from it).
    with strategy.loading():
        policy, reference = build_policy_and_reference(cfg, tokenizer)
    total = total_steps(len(train), cfg.train)
    policy, optimizer, scheduler = prepare_optimization(strategy, policy, cfg.optim, cfg.train, total)
    if reference.model is not policy:  # a separate frozen reference
        strategy.prepare_frozen(reference.model, "reference")  # FSDP: forwards in lockstep with the policy's
    if cfg.dpo.precompute_ref_logps:
        # from the models as prepared (under FSDP, sharded); the examples then carry the numbers
        precompute_or_load(cfg, run.out, train, evals, reference, collator, strategy)
        reference = None

    # 3. Optimisation: each step is one global batch of pairs, accumulated over micro-batches.
    mbs = cfg.train.micro_batch_size

    def loss_fn(chunk, norm):
        return dpo_batch_loss(policy, reference, chunk, collator, cfg.dpo, norm, strategy.device)

    evaluate = (lambda: evaluate_dpo(policy, reference, evals, collator, cfg.dpo, mbs, strategy)) if evals else None
    result = fit_supervised(run, policy, optimizer, scheduler, train, loss_fn, total=total,
                            max_grad_norm=cfg.optim.max_grad_norm, evaluate=evaluate, truncation=trunc,
                            max_length=cfg.data.max_length,
                            show=("train/loss", "train/rewards/accuracy", "eval/rewards/accuracy"))

    # 4. The trained policy: a directory transformers (or peft) loads as is.
    finish(run, {"model": policy}, tokenizer, result.metrics, best=result.best,
           truncation={k: v.by_source for k, v in trunc.items()}, pairs={"train": len(train), "eval": len(evals)})
    return result.metrics


# --------------------------------------------------------------------------- SFT first

def run_sft_first(cfg: DPOConfig, out: Path, strategy: Strategy) -> Path:
    """SFT on the chosen responses of ``cfg.data`` into ``out/sft``; returns the model directory.

    Reuses trainers/sft.py whole: the chosen side of every pair becomes a {prompt, response}
    record. A finished stage (``out/sft/model`` present) is not redone, so a resumed run skips it.
    With LoRA the adapter is merged, so DPO starts (and anchors) on a plain model. The main process
    writes the files and the others wait for them.
    """
    sft_dir = out / "sft"
    model_dir = sft_dir / ("merged" if cfg.model.lora.enabled else "model")
    if (model_dir / "config.json").is_file():
        return model_dir
    if strategy.is_main:
        _chosen_as_sft(cfg.data.train, sft_dir / "train.jsonl")
        if cfg.data.eval:
            _chosen_as_sft(cfg.data.eval, sft_dir / "eval.jsonl")
    strategy.wait()
    data = dataclasses.replace(cfg.data, train=str(sft_dir / "train.jsonl"),
                               eval=str(sft_dir / "eval.jsonl") if cfg.data.eval else "")
    sft_cfg = SFTConfig(
        model=cfg.model, data=data,
        optim=dataclasses.replace(cfg.optim, lr=cfg.sft_first.lr, warmup_ratio=0.03),
        # resumes its own checkpoints; with select_best, keeps its best by held-out loss (DPO's metrics are not SFT's)
        train=dataclasses.replace(cfg.train, output_dir=str(sft_dir), epochs=cfg.sft_first.epochs,
                                  max_steps=cfg.sft_first.max_steps, select_best_mode="auto",
                                  select_best="eval/loss" if cfg.train.select_best else ""),
    )
    train_sft(sft_cfg, strategy)
    if cfg.model.lora.enabled and strategy.is_main:
        merge_adapter(sft_dir / "model", model_dir)
    strategy.wait()
    return model_dir


def _chosen_as_sft(source: str | list[str], dest: Path) -> Path:
    """Write the chosen side of preference sources as SFT conversations (``data.sft_from_preference``)."""
    examples = sft_from_preference(load_sources(source, "preference", load_preference))
    write_jsonl_atomic(dest, [{"messages": ex.messages} for ex in examples])
    return dest
