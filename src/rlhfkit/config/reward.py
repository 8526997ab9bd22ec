"""`rlhfkit rm`'s config: the Bradley-Terry reward model, its head (linear, or a token head) and
the backbone it reads.

Every field is declared once, with its type, default and an attribute docstring, as in
`config.sections`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlhfkit.config.errors import ConfigError
from rlhfkit.config.sections import DataSection, ModelSection, OptimSection, TrainSection


@dataclass
class RewardTrainSection(TrainSection):
    """TrainSection of `rlhfkit rm`, where epochs 0 (with max_steps 0) is a run: no fine-tuning, the
    model is the backbone with the head fitted as a linear probe (head_init: probe)."""

    def check_length(self, where: str) -> None:
        if not (self.epochs == 0 and self.max_steps == 0):
            super().check_length(where)


@dataclass
class RewardConfig:
    """`rlhfkit rm`: a Bradley-Terry reward model, a scalar head read at the last token or pooled."""

    model: ModelSection = field(default_factory=ModelSection)
    """Backbone (usually the SFT model); a causal LM gets a fresh scalar head."""
    data: DataSection = field(default_factory=DataSection)
    """Preference pairs {prompt, chosen, rejected} (optional category, margin)."""
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-5))
    """Optimizer and schedule (head_lr gives the head its own rate)."""
    train: RewardTrainSection = field(default_factory=RewardTrainSection)
    """Run length, batch sizes, evaluation, checkpoints. epochs 0 with head_init probe: the probe
    alone, no fine-tuning (one forward pass over the pairs)."""
    use_margin: bool = False
    """Subtract each pair's "margin" field inside the Bradley-Terry sigmoid."""
    center_rewards_coef: float = 0.0
    """Weight of a penalty (r_chosen + r_rejected)^2 that keeps scores near zero."""
    label_smoothing: float = 0.0
    """Share e of labels assumed flipped (noisy raters): the loss is -(1-e) log s(d) - e log s(-d),
    in the probe's fit and in fine-tuning; 0 = the plain Bradley-Terry loss."""
    head_init: Literal["random", "probe"] = "random"
    """probe: before fine-tuning, fit the head alone as a linear Bradley-Terry model on the frozen
    backbone's features of the training pairs (L2 by cross-validation), then fine-tune everything
    from there (linear probing, then fine-tuning; train.epochs 0: the probe alone). random: the
    usual fresh head."""
    pooling: Literal["last", "mean", "mean_all"] = "last"
    """How the per-token head outputs become the reward: last (the value at the last real token),
    mean (the mean over the response tokens) or mean_all (over all tokens). Saved in the model's
    config.json as reward_pooling, so that rm:DIR scores the way the model was trained."""
    head_hidden: int = 0
    """> 0: the head is a small MLP of this width applied at every token, w2 . gelu(W1 h + b1),
    pooled as pooling says, instead of one linear map (a token can count by what it is, as in a
    word list). With head_init probe it is fitted alone on the frozen backbone's per-token
    features first (AdamW, 3 epochs, weight decay 0.3). Saved in config.json as reward_head_hidden;
    rlhfkit loads it back (rm:DIR, critic_init: reward), plain transformers does not. 0: linear."""
    head_embeddings: bool = False
    """With head_hidden: the token head also reads each token's own input embedding (divided by its
    root mean square) next to the last layer's features, W1 [h; e] + b1: the word itself, which the
    layers above may have blurred. Saved in config.json as reward_head_embeddings."""
    head_ensemble: int = 1
    """With head_hidden and head_init probe: fit this many token heads from different seeds and
    average them, stored as one head of width head_ensemble x head_hidden (their first layers
    stacked): less of the fit's seed-to-seed spread. 1: one head."""
    share_prompt: bool = True
    """Score each pair as one packed sequence: the prompt once, then the chosen and the rejected
    response, each seeing the prompt and itself (the same scores up to float rounding, fewer
    tokens). pooling mean_all reads the prompt too and always scores the two rows apart."""
    train_top_layers: int = 0
    """> 0: fine-tune only the top N decoder layers (with the final norm and the head); 0: all."""
    backbone_layers: int = 0
    """> 0: keep only the backbone's first N decoder layers; the final norm and the head read layer
    N. The saved RM is an ordinary N-layer model, cheaper to train and to score. 0: all layers."""

    def eval_metrics(self) -> tuple[str, ...]:
        """What its held-out evaluation logs; ``eval/accuracy/CATEGORY`` per category of the data."""
        return ("eval/accuracy", "eval/margin", "eval/pairs", "eval/accuracy/")

    def inputs(self) -> list:
        """What it reads that may exist before it runs, as `SFTConfig.inputs`: the preference pairs."""
        from rlhfkit.data import load_preference
        from rlhfkit.data.sources import data_inputs

        return data_inputs(self.data, "preference", load_preference)

    def validate(self, where: str) -> None:
        if self.train.epochs == 0 and self.train.max_steps == 0 and self.head_init != "probe":
            raise ConfigError(f"{where}.train.epochs: 0 (no fine-tuning) needs head_init: probe; "
                              "with a random head the model would score at chance")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"{where}.label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if self.train_top_layers < 0:
            raise ConfigError(f"{where}.train_top_layers: must be >= 0, got {self.train_top_layers}")
        if self.backbone_layers < 0:
            raise ConfigError(f"{where}.backbone_layers: must be >= 0, got {self.backbone_layers}")
        if self.backbone_layers and self.model.lora.enabled:
            # an adapter directory is loaded onto the full base model: the cut would be lost
            raise ConfigError(f"{where}.backbone_layers: not with model.lora.enabled (an adapter is loaded "
                              "onto the whole base model)")
        if self.train_top_layers and self.backbone_layers and self.train_top_layers > self.backbone_layers:
            raise ConfigError(f"{where}.train_top_layers: {self.train_top_layers} is more than "
                              f"backbone_layers: {self.backbone_layers}")
        if self.train_top_layers and self.model.lora.enabled:
            raise ConfigError(f"{where}.train_top_layers: not with model.lora.enabled (LoRA already freezes the base)")
        if self.head_hidden < 0:
            raise ConfigError(f"{where}.head_hidden: must be >= 0, got {self.head_hidden}")
        if self.head_ensemble < 1 or (self.head_ensemble > 1 and not (self.head_hidden and self.head_init == "probe")):
            raise ConfigError(f"{where}.head_ensemble: {self.head_ensemble}; must be >= 1, and above 1 it averages "
                              "token heads fitted by head_init: probe (set head_hidden and head_init: probe)")
        if self.head_embeddings and not self.head_hidden:
            raise ConfigError(f"{where}.head_embeddings: reading the input embeddings is a token head's; "
                              "set head_hidden (16 in configs/rm_token.yaml)")
        if self.head_hidden and self.model.lora.enabled:
            raise ConfigError(f"{where}.head_hidden: a token head cannot be stored with a LoRA adapter "
                              "(it has no config.json to record it in); train without LoRA")
        if self.pooling != "last" and self.model.lora.enabled:
            # a LoRA run saves an adapter directory, which has no config.json to record the pooling in
            raise ConfigError(f"{where}.pooling: {self.pooling!r} cannot be stored with a LoRA adapter; "
                              "use pooling: last with model.lora.enabled, or train without LoRA")
