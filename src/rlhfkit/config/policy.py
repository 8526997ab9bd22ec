"""The config sections of the commands that sample from a policy (PPO, GRPO, RLOO, online DPO,
eval): prompts, the policy-gradient run, rollout, reward and the PTX term.

Fields are documented as in `config.sections`: an attribute docstring under each, from which
`rlhfkit CMD --help` and docs/configuration.md are generated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Literal, Optional, Union

from rlhfkit.config.errors import ConfigError
from rlhfkit.config.sections import TrainSection, changed_keys


@dataclass
class PromptsSection:
    """Where rollout prompts come from (records {"prompt"} or {"messages"}, optional "reference")."""

    train: str = "task:sentiment"
    """Prompt source: a .jsonl/.json/.parquet/.csv file, hf:org/name[:split], or task:NAME (its prompts_train.jsonl)."""
    max_prompt_length: int = 256
    """Prompts longer than this many tokens (after the chat template) are dropped and counted."""
    limit: int = 0
    """Use only the first N prompts; 0 = all."""
    eval: str = ""
    """Held-out prompts for the evaluations during training (train.eval_every): one sample each, scored
    by the training reward (eval/proxy_mean), the gold judge (reward.gold; online DPO: gold) as
    eval/gold_mean, and by the KL to the reference (eval/kl); empty = no held-out evaluation."""
    eval_limit: int = 64
    """Use only the first N held-out prompts; 0 = all (only with prompts.eval)."""

    def validate(self, where: str) -> None:
        if not self.train:
            raise ConfigError(f"{where}.train: a prompt source is required")
        if self.max_prompt_length < 1:
            raise ConfigError(f"{where}.max_prompt_length: must be >= 1")
        if self.eval_limit < 0:
            raise ConfigError(f"{where}.eval_limit: must be >= 0")
        if not self.eval and self.eval_limit != PromptsSection.eval_limit:  # set, but nothing reads it
            raise ConfigError(f"{where}.eval_limit: limits the held-out prompts, and {where}.eval names none; set "
                              f"{where}.eval too, or drop eval_limit")


@dataclass
class PolicyTrainSection(TrainSection):
    """TrainSection with the policy-gradient meaning of the batch sizes: batch_size is the number of
    *prompts* per iteration (each sampled rollout.n times), micro_batch_size the number of *rows*
    (responses) per forward/backward, so the two need not divide each other."""

    batch_size: int = 16
    """Prompts per iteration (each sampled rollout.n times)."""
    micro_batch_size: int = 8
    """Responses per forward/backward on one rank."""
    max_steps: int = 20
    """Iterations (rollout + update); 0 = from epochs over the prompts."""

    def validate(self, where: str) -> None:
        batch, micro = self.batch_size, self.micro_batch_size
        try:
            self.micro_batch_size = 1  # prompts and rows need not divide each other here
            super().validate(where)
        finally:
            self.micro_batch_size = micro
        if micro < 1 or batch < 1:
            raise ConfigError(f"{where}.batch_size/micro_batch_size: must be >= 1")


@dataclass
class RolloutSection:
    """How responses are sampled."""

    n: int = 1
    """Responses sampled per prompt (GRPO/RLOO's group size G; eval: per prompt and model)."""
    max_new_tokens: int = 48
    """Response budget in tokens; responses that reach it without EOS count as truncated."""
    temperature: float = 1.0
    """Sampling temperature; 0 = greedy (evaluation only). The log-probs of the ratio and the KL are
    taken at the same temperature, softmax(logits / T), as in TRL and verl (greedy: T = 1)."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1 = off."""
    top_k: int = 0
    """Top-k filter; 0 = off."""
    micro_batch_size: int = 0
    """Rows per generation forward; 0 = all rows of a step at once."""
    backend: Literal["own", "hf"] = "own"
    """What samples the responses (docs/rollout_backends.md): own = rlhfkit's KV-cache engine
    (in-place cache, packed CPU matmuls, shared prompt prefixes; the fastest here); hf = plain
    transformers model.generate (same greedy tokens; a different random stream when sampling)."""

    def validate(self, where: str) -> None:
        if self.n < 1 or self.max_new_tokens < 1:
            raise ConfigError(f"{where}: n and max_new_tokens must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"{where}: need temperature >= 0 (0 = greedy) and 0 < top_p <= 1")


@dataclass
class RewardSection:
    """The sequence score of each sampled response."""

    spec: Union[str, list, Callable] = ""
    """Reward source: rm:DIR (trained reward model), task:NAME (gold judge), module:function or
    file.py:function; or a list of them (each a string or {spec, weight, name}) whose scores are
    combined. In Python, a function f(prompts, responses, **fields) or a list of functions also works.
    Each function receives the prompt record's other fields (e.g. reference) as keyword arguments."""
    weights: list = field(default_factory=list)
    """One weight per reward function of the list; empty = 1 each (or the entries' own weights)."""
    combine: Literal["sum", "normalize_then_sum"] = "sum"
    """Several rewards: their weighted sum, or normalize_then_sum (each standardised within the
    prompt's group first; TRL's multi_objective_aggregation). A function may return None for a
    response it cannot score: it is left out of that response's sum."""
    unscorable: Union[str, float] = "error"
    """A response that no function could score: error (stop and name it) or a number to use as its score."""
    clip: float = 0.0
    """Clip the sequence score to [-clip, clip]; 0 = no clipping."""
    missing_eos_score: Optional[float] = None
    """Score given *instead of* the reward to responses that never emitted EOS; null = off."""
    batch_size: int = 16
    """Reward-model scoring micro-batch (rows per forward)."""
    gold: str = ""
    """A gold judge for the held-out evaluations (task:NAME or module:function), reported as
    eval/gold_mean next to the training reward: the gap between the two shows over-optimisation."""

    def validate(self, where: str) -> None:
        if not self.spec:
            raise ConfigError(f"{where}.spec: a reward source is required (rm:DIR, task:NAME, module:function)")
        if callable(self.spec):  # a Python function alone, as a list of one
            self.spec = [self.spec]
        entries = self.spec if isinstance(self.spec, list) else [self.spec]
        for i, e in enumerate(entries):
            ok = (isinstance(e, str) and e.strip()) or callable(e) or (
                isinstance(e, dict) and e.get("spec") and set(e) <= {"spec", "weight", "name"})
            if not ok:
                raise ConfigError(f"{where}.spec[{i}]: expected a spec string or {{spec, weight, name}}, got {e!r}")
        if self.weights and len(self.weights) != len(entries):
            raise ConfigError(f"{where}.weights: {len(self.weights)} weights for {len(entries)} reward functions")
        if not (self.unscorable == "error" or (isinstance(self.unscorable, float) and math.isfinite(self.unscorable))):
            raise ConfigError(f"{where}.unscorable: 'error' or a finite number, got {self.unscorable!r}")
        if self.clip < 0:
            raise ConfigError(f"{where}.clip: must be >= 0")

    def sources(self) -> list:
        """Each reward function's source: the spec of each entry of the list (or the one spec)."""
        entries = self.spec if isinstance(self.spec, list) else [self.spec]
        return [e.get("spec") if isinstance(e, dict) else e for e in entries]

    def rm_dir(self) -> str | None:
        """The reward model's path when the reward is one rm:DIR (PPO may start its critic from it)."""
        rms = [s[3:] for s in self.sources() if isinstance(s, str) and s.startswith("rm:")]
        return rms[0] if len(rms) == 1 else None


@dataclass
class PTXSection:
    """The PTX term: the actor's language-modelling loss on SFT or pretraining data (the alignment-tax guard)."""

    data: str = ""
    """Data for the PTX loss: plain text (a .txt file of documents separated by blank lines, or records
    {"text"}; every token trained) or SFT conversations (the formats of `rlhfkit sft`; the assistant
    tokens trained); empty = no PTX term."""
    coef: float = 0.0
    """gamma_ptx: weight of the actor's token NLL on that data in the total loss."""
    batch_size: int = 8
    """PTX examples per optimizer step."""
    max_length: int = 512
    """Tokens per example: longer plain text is split into windows of this length; a longer
    conversation is an error, as in `rlhfkit sft`."""

    def unused_keys(self) -> tuple[list[str], str]:
        """With coef 0 there is no PTX term: its data and batch settings are read by nothing."""
        return changed_keys(self, but=("coef",)) if self.coef == 0 else [], "coef"

    def validate(self, where: str) -> None:
        if self.coef < 0 or (self.coef > 0 and not self.data):
            raise ConfigError(f"{where}: coef must be >= 0 and needs ptx.data when > 0")


# --------------------------------------------------------------------------- trainer configs
