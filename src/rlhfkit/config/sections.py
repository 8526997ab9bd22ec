"""The config sections every trainer shares (model, optimizer, run, data), and the SFT config.
The reward model's config is in `config.reward`, the sampling and policy-gradient sections in
`config.policy`.

Every field is declared once, with its type, default and an attribute docstring (the string right
below it): `rlhfkit CMD --help`, `--print-config --explain` and docs/configuration.md are generated
from them (`config.reference`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Literal, Union

from rlhfkit.config.errors import ConfigError
from rlhfkit.config.extras import check_trackers, tracker_names


@dataclass
class LoraSection:
    """Low-rank adapters (peft's LoRA) instead of training every weight."""

    enabled: bool = False
    """Train LoRA adapters; the frozen base then also serves as the reference (adapters off)."""
    r: int = 16
    """Rank of each adapter."""
    alpha: int = 32
    """Scaling numerator: the adapter's update is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""
    target_modules: Union[str, list] = "all-linear"
    """Layers that get adapters: peft's "all-linear" (every linear layer but the head), a list of names, one name
    (q_proj, as [q_proj]), or a regex over full module names."""

    def unused_keys(self) -> tuple[list[str], str]:
        """(keys set that nothing reads while the section is off, the key that turns it on, or a
        tuple of keys any of which does): the config loader warns about them."""
        return [] if self.enabled else changed_keys(self, but=("enabled",)), "enabled"

    def validate(self, where: str) -> None:
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{where}.dropout: must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, str) and self.target_modules.isidentifier() and \
                self.target_modules != "all-linear":
            # peft reads a string as a regex over full module names: a bare name would match nothing
            self.target_modules = [self.target_modules]
        elif isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise ConfigError(f"{where}.target_modules: {self.target_modules!r} is not a regular expression "
                                  f"({e})") from None
        elif isinstance(self.target_modules, list) and not all(isinstance(t, str) and t for t in self.target_modules):
            raise ConfigError(f"{where}.target_modules: module names are non-empty strings, got {self.target_modules}")


def changed_keys(section, but: tuple[str, ...] = ()) -> list[str]:
    """The keys of a config section set away from their defaults (``but`` left out)."""
    default = type(section)()
    return [f.name for f in dataclasses.fields(section)
            if f.name not in but and getattr(section, f.name) != getattr(default, f.name)]


@dataclass
class ModelSection:
    """The model to train (and, where the method needs one, the reference it starts from)."""

    name: str = "smollm2-135m-instruct"
    """The built-in default, a local transformers directory, a LoRA adapter directory, a .gguf file or a hub id."""
    dtype: str = "auto"
    """Compute precision: auto (bf16 on GPUs that support it, fp32 on CPU), float32, bfloat16 or float16.
    Trained weights and optimizer state stay fp32 (master weights); forwards run under autocast in this
    dtype, frozen references computing as the trained model does; float16 adds loss scaling (docs/distributed.md §8)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of storing them (less memory, more compute)."""
    lora: LoraSection = field(default_factory=LoraSection)
    """LoRA adapters."""

    def validate(self, where: str) -> None:
        if self.dtype not in ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"):
            raise ConfigError(f"{where}.dtype: unknown dtype {self.dtype!r}")


@dataclass
class OptimSection:
    """AdamW, its learning-rate schedule and gradient clipping."""

    lr: float = 2e-5
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norm weights)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after the warm-up."""
    warmup_ratio: float = 0.03
    """Fraction of the optimizer steps spent warming up linearly."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    head_lr: float = 0.0
    """Learning rate of a scalar head (reward model, critic); 0 = the same as lr."""

    def validate(self, where: str) -> None:
        if self.lr <= 0:
            raise ConfigError(f"{where}.lr: must be > 0, got {self.lr}")
        if self.head_lr < 0:
            raise ConfigError(f"{where}.head_lr: must be >= 0 (0 = same as lr), got {self.head_lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"{where}.warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: must be in [0, 1), got {getattr(self, name)}")
        if self.adam_eps <= 0:
            raise ConfigError(f"{where}.adam_eps: must be > 0, got {self.adam_eps}")


@dataclass
class TrainSection:
    """Run length, batch sizes, evaluation, checkpoints and the parallel layout."""

    output_dir: str = "runs/default"
    """Directory of the run: model, checkpoints, metrics.jsonl, results."""
    seed: int = 0
    """Seed of every random generator (the same on every rank)."""
    epochs: float = 1.0
    """Passes over the training data; may be fractional. max_steps > 0 wins."""
    max_steps: int = 0
    """Optimizer steps (iterations for PPO/GRPO/RLOO); 0 = from epochs."""
    batch_size: int = 8
    """Global batch: examples (SFT with packing: packed rows) per optimizer step, over all ranks and micro-batches."""
    micro_batch_size: int = 8
    """Examples per forward/backward on one rank; accumulation = batch_size / (micro_batch_size x ranks)."""
    drop_last: bool = True
    """true: an epoch is n // batch_size batches, the rest of its shuffle left out (a different rest each epoch; the
    run says how many); false: nothing is left out, a batch that reaches an epoch's end is completed from the next
    epoch's shuffle (epochs x n / batch_size steps, rounded up). With true, fewer examples (prompts) than
    batch_size are refused: every batch would be that short."""
    eval_every: int = 0
    """Steps between held-out evaluations (also at step 0 and at the end); 0 = at step 0 and the end only."""
    select_best: str = ""
    """A held-out metric of the command (e.g. eval/loss, eval/accuracy, eval/gold_mean; another name
    is refused before the run starts): keep the model of the best evaluation as the final model
    (step 0, the starting point, included); empty = the last model."""
    select_best_mode: Literal["auto", "max", "min"] = "auto"
    """Whether select_best is maximised or minimised; auto = minimise losses, perplexities and KLs. A
    resume must keep it (the restored best was chosen by it)."""
    early_stopping_patience: int = 0
    """Stop after this many evaluations without an improvement of select_best; 0 = never."""
    save_every: int = 0
    """Steps between resumable checkpoints (and one at the last step, so the run can be continued for longer); 0 = only
    the final model, not resumable."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (the newest); 0 = all of them."""
    log_every: int = 1
    """Steps between metric records."""
    max_bad_steps: int = 3
    """Consecutive non-finite losses or gradients tolerated (those steps are skipped) before stopping."""
    resume: Union[bool, Literal["auto"]] = False
    """false: start a new run (refused if output_dir holds one: see overwrite); true: continue the run in
    output_dir from its latest complete checkpoint (refused if there is none, or if its config or data
    differ); auto: continue if there is something to continue, else start (a run there that saved no
    checkpoint is refused)."""
    overwrite: bool = False
    """Start over in an output_dir that holds a run, deleting that run's outputs (checkpoints, metrics,
    models, results); other files are left alone."""
    resume_mismatch_ok: bool = False
    """Continue even though the config or data differ from those the run in output_dir started with."""
    progress: bool = True
    """Show a progress bar (false: no bar at all, transformers' loading and saving bars included)."""
    report_to: Union[str, list, None] = field(default_factory=lambda: ["auto"])
    """Experiment trackers that get the metrics besides metrics.jsonl (always written): tensorboard
    (output_dir/tb), wandb, mlflow, or any other tracker of accelerate (trackio, comet_ml, aim, clearml,
    dvclive, swanlab); auto = tensorboard when it is installed; [] or none = metrics.jsonl only; all =
    every one of those that is installed; one name alone (wandb) = [wandb]. A tracker named explicitly must be
    installed (e.g. pip install 'rlhfkit[wandb]')."""
    fsdp: bool = False
    """On N processes: shard the trained and frozen models with torch FSDP2 instead of replicating them."""
    zero_stage: int = 0
    """On N processes: DeepSpeed ZeRO stage 1 (optimizer state) or 2 (and gradients) partitioned; 0 = off."""

    def validate(self, where: str) -> None:
        if self.batch_size < 1 or self.micro_batch_size < 1:
            raise ConfigError(f"{where}.batch_size/micro_batch_size: must be >= 1")
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(
                f"{where}.batch_size: {self.batch_size} is not divisible by micro_batch_size {self.micro_batch_size}")
        self.check_length(where)
        if self.seed >= 2**32:
            raise ConfigError(f"{where}.seed: must be < 2**32, got {self.seed}")
        if self.overwrite and self.resume is True:
            raise ConfigError(f"{where}: choose one of resume (continue the run in output_dir) and overwrite "
                              "(start over, deleting it)")
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"{where}.zero_stage: 0 (off), 1 or 2, got {self.zero_stage} (stage 3 is not supported: "
                              "use train.fsdp=true to shard the weights)")
        if self.zero_stage and self.fsdp:
            raise ConfigError(f"{where}: choose one of fsdp and zero_stage")
        self.report_to = tracker_names(self.report_to)  # as TRL takes it: one name, none or all too
        check_trackers(self.report_to, f"{where}.report_to")
        if self.early_stopping_patience < 0:
            raise ConfigError(f"{where}.early_stopping_patience: must be >= 0")
        if self.early_stopping_patience and not self.select_best:
            raise ConfigError(f"{where}.early_stopping_patience: needs select_best (the metric to watch)")
        if self.select_best_mode != "auto" and not self.select_best:
            raise ConfigError(f"{where}.select_best_mode: {self.select_best_mode} needs select_best (the metric it "
                              "maximises or minimises)")
        if self.select_best and not self.select_best.startswith("eval/"):
            raise ConfigError(f"{where}.select_best: a held-out metric (eval/...), got {self.select_best!r}")

    def check_length(self, where: str) -> None:
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError(f"{where}.epochs: set epochs > 0 or max_steps > 0")


@dataclass
class DataSection:
    """Training and held-out data."""

    train: str | list[str] = ""
    """A file (.jsonl/.json/.parquet/.csv), hf:org/name[:split], or task:NAME for a built-in task's data;
    or a list of them, read in order as one set."""
    eval: str | list[str] = ""
    """Held-out set (same forms); empty = split eval_fraction off the training data."""
    eval_fraction: float = 0.05
    """Share of the training data held out when eval is empty."""
    max_length: int = 512
    """Tokens of prompt + response."""
    truncation: Literal["error", "left", "right"] = "error"
    """Longer examples: error (stop with file, line and field), or cut them (counted and reported): SFT's left drops
    tokens from the start, right from the end; for pairs (rm, dpo, pm) both keep the end of the prompt (cut from the
    left, to no less than max_length // 2), then cut the responses from the right."""
    limit: int = 0
    """Use only the first N training examples; 0 = all."""
    chat_template: str = ""
    """Chat template for a model whose tokenizer has none (a base model): a Jinja template file or a
    named one ("chatml"); empty = the tokenizer's own. The trained model's tokenizer keeps it."""

    def unused_keys(self) -> tuple[list[str], str]:
        return [k for k in changed_keys(self) if k == "eval_fraction" and self.eval], "eval"

    def validate(self, where: str) -> None:
        if not self.train:
            raise ConfigError(f"{where}.train: a training data source is required")
        for key in ("train", "eval"):
            value = getattr(self, key)
            if isinstance(value, list) and not all(value):
                raise ConfigError(f"{where}.{key}: an empty source in the list {value!r}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"{where}.eval_fraction: must be in [0, 1)")
        if self.max_length < 8:
            raise ConfigError(f"{where}.max_length: must be >= 8")
        if self.chat_template:
            from pathlib import Path

            from rlhfkit.data.chat_templates import NAMED_TEMPLATES

            if self.chat_template not in NAMED_TEMPLATES and not Path(self.chat_template).is_file():
                raise ConfigError(f"{where}.chat_template: {self.chat_template!r} is neither a template file nor "
                                  f"a named template ({', '.join(sorted(NAMED_TEMPLATES))})")


# --------------------------------------------------------------------------- policy-gradient sections

SUPERVISED_EVAL_METRICS = ("eval/loss", "eval/ppl", "eval/tokens")


@dataclass
class SFTConfig:
    """`rlhfkit sft`: supervised fine-tuning, the loss on the assistant tokens only."""

    model: ModelSection = field(default_factory=ModelSection)
    """The model to fine-tune."""
    data: DataSection = field(default_factory=DataSection)
    """Conversations {"messages"} or {"prompt", "response"} records."""
    optim: OptimSection = field(default_factory=OptimSection)
    """Optimizer and schedule."""
    train: TrainSection = field(default_factory=TrainSection)
    """Run length, batch sizes, evaluation, checkpoints."""
    packing: bool = False
    """Pack several short examples per row, attention restricted to each (fewer padding tokens); train.batch_size and
    micro_batch_size then count packed rows."""

    def eval_metrics(self) -> tuple[str, ...]:
        """What its held-out evaluation logs (train.select_best is one of them)."""
        return SUPERVISED_EVAL_METRICS

    def inputs(self) -> list:
        """What it reads that may exist before it runs: ``(key, value, check)`` per data source, the
        check reading the source as the run does (`rlhfkit.pipeline` checks every stage's up front)."""
        from rlhfkit.data import load_sft
        from rlhfkit.data.sources import data_inputs

        return data_inputs(self.data, "sft", load_sft)
