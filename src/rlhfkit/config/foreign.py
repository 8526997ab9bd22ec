"""Keys of TRL, OpenRLHF and transformers' TrainingArguments that a user may type into an rlhfkit
config, and the rlhfkit key that does the same: named in the unknown-key error instead of the
closest spelling, which for these names is often another setting (docs/coming_from_trl.md)."""

from __future__ import annotations

import dataclasses
import difflib

from rlhfkit.config.reference import keys

# name -> the rlhfkit keys that do the same, in order; the first the command has is named. An
# empty tuple: rlhfkit has no such setting.
FOREIGN_KEYS: dict[str, tuple[str, ...]] = {
    "learning_rate": ("optim.lr",), "lr": ("optim.lr",), "actor_learning_rate": ("optim.lr",),
    "critic_learning_rate": ("critic_optim.lr",),
    "weight_decay": ("optim.weight_decay",), "max_grad_norm": ("optim.max_grad_norm",),
    "warmup_ratio": ("optim.warmup_ratio",), "lr_scheduler_type": ("optim.schedule",),
    "lr_warmup_ratio": ("optim.warmup_ratio",),
    "per_device_train_batch_size": ("train.micro_batch_size",), "micro_train_batch_size": ("train.micro_batch_size",),
    "gradient_accumulation_steps": ("mini_batch_size", "train.batch_size"),
    "train_batch_size": ("mini_batch_size", "train.batch_size"),
    "rollout_batch_size": ("train.batch_size",),
    "num_train_epochs": ("train.epochs",), "max_epochs": ("ppo_epochs", "train.epochs"),
    "max_steps": ("train.max_steps",), "output_dir": ("train.output_dir",), "seed": ("train.seed",),
    "logging_steps": ("train.log_every",), "save_steps": ("train.save_every",), "eval_steps": ("train.eval_every",),
    "save_total_limit": ("train.keep_checkpoints",), "report_to": ("train.report_to",),
    "load_best_model_at_end": ("train.select_best",), "metric_for_best_model": ("train.select_best",),
    "gradient_checkpointing": ("model.gradient_checkpointing",),
    "model_name_or_path": ("model.name",), "pretrain": ("model.name",), "reward_pretrain": ("reward.spec",),
    "use_peft": ("model.lora.enabled",), "lora_r": ("model.lora.r",), "lora_rank": ("model.lora.r",),
    "lora_alpha": ("model.lora.alpha",), "lora_dropout": ("model.lora.dropout",),
    "lora_target_modules": ("model.lora.target_modules",), "target_modules": ("model.lora.target_modules",),
    "beta": ("dpo.beta", "kl_coef", "kl.coef"), "init_kl_coef": ("kl.coef", "kl_coef"),
    "kl_coef": ("kl.coef",), "target_kl": ("kl.target",), "kl_target": ("kl.target",), "kl_horizon": ("kl.horizon",),
    "kl_estimator": ("kl_kind", "kl.kind"), "use_kl_loss": ("kl_in_reward",),
    "loss_type": ("dpo.loss_type", "loss_agg"), "label_smoothing": ("dpo.label_smoothing", "label_smoothing"),
    "num_generations": ("rollout.n",), "n_samples_per_prompt": ("rollout.n",),
    "max_completion_length": ("rollout.max_new_tokens",), "generate_max_len": ("rollout.max_new_tokens",),
    "response_length": ("rollout.max_new_tokens",), "max_new_tokens": ("rollout.max_new_tokens",),
    "max_prompt_length": ("prompts.max_prompt_length",), "prompt_max_len": ("prompts.max_prompt_length",),
    "max_len": ("data.max_length", "max_length"), "max_seq_length": ("data.max_length", "max_length"),
    "max_length": ("data.max_length",),
    "temperature": ("rollout.temperature",), "top_p": ("rollout.top_p",), "top_k": ("rollout.top_k",),
    "epsilon": ("clip_eps",), "cliprange": ("clip_eps",), "eps_clip": ("clip_eps",),
    "epsilon_high": ("clip_eps_high",), "cliprange_value": ("value_clip_eps",), "value_clip": ("value_clip_eps",),
    "num_iterations": ("ppo_epochs",), "num_ppo_epochs": ("ppo_epochs",),
    "num_mini_batches": ("mini_batch_size",), "scale_rewards": ("scale",), "advantage_estimator": ("advantage",),
    "importance_sampling_level": ("ratio_level",), "use_bias_correction_kl": ("kl_bias_correction",),
    "whiten_rewards": (), "delta": (), "top_entropy_quantile": (), "entropy_coef": (),
}


# (name, rlhfkit key) -> what differs in meaning, where the value does not carry over as it is.
NOTES = {
    ("num_mini_batches", "mini_batch_size"): "rows per minibatch, not a count of minibatches",
    ("gradient_accumulation_steps", "train.batch_size"): "the global batch; accumulation is train.batch_size / "
                                                         "train.micro_batch_size",
    ("gradient_accumulation_steps", "mini_batch_size"): "rows per optimizer step; accumulation is mini_batch_size / "
                                                        "train.micro_batch_size",
    ("train_batch_size", "mini_batch_size"): "rows per optimizer step; train.batch_size counts prompts",
    ("per_device_train_batch_size", "train.micro_batch_size"): "rows per forward",
    ("micro_train_batch_size", "train.micro_batch_size"): "rows per forward",
    ("load_best_model_at_end", "train.select_best"): "it names the metric to keep the best model by",
    ("metric_for_best_model", "train.select_best"): "a metric name as logged, e.g. eval/loss",
    ("use_kl_loss", "kl_in_reward"): "the other way round: true puts the KL in the reward, false in the loss",
    ("max_epochs", "ppo_epochs"): "passes over each rollout batch",
}


def key_hint(key: str, cls, names: set[str], prefix: str, root=None) -> str:
    """The hint of an unknown key of section ``cls`` at ``prefix``: another library's name for it
    (`foreign_hint`; ``root``, the whole config, or ``cls`` at the top), else the nearest spelling."""
    extra = foreign_hint(key, root or (None if prefix else cls), cls, prefix)
    if extra is None:
        close = difflib.get_close_matches(key, names, n=1)
        extra = f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)" if close else ""
    return extra


def foreign_hint(name: str, root, section=None, prefix: str = "") -> str | None:
    """The phrase for an unknown key another library names so (None if it is not one): the rlhfkit
    key of config class ``root`` that does the same, or that rlhfkit has none. Typed inside a
    section (``section``, at ``prefix``), that section's own key comes first (critic_optim's lr,
    not optim's)."""
    if name not in FOREIGN_KEYS:
        return None
    if prefix and section is not None:
        leaves = {k.rpartition(".")[2] for k in FOREIGN_KEYS[name]}
        own = [f.name for f in dataclasses.fields(section) if f.name in leaves]
        if own:
            return f" (rlhfkit's key for it: {prefix}.{own[0]}; docs/coming_from_trl.md)"
    paths = {k.path for k in keys(root)} if root is not None else set()
    have = [k for k in FOREIGN_KEYS[name] if k in paths]
    if have:
        note = f", {NOTES[name, have[0]]}" if (name, have[0]) in NOTES else ""
        return f" (rlhfkit's key for it: {have[0]}{note}; docs/coming_from_trl.md)"
    return " (a key of another library; rlhfkit has no such setting here: docs/coming_from_trl.md)"
