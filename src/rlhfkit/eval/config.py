"""The configuration of ``rlhfkit eval`` (`eval.policy_compare`) and the checks of what it reads,
made before anything is written or a model loads (by the command itself, and by `rlhfkit pipeline`
before its first stage)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal, Union

from rlhfkit.config import ConfigError, RolloutSection
from rlhfkit.data import load_preference, load_prompts, load_sft
from rlhfkit.data.sources import Input, load_sources, source_inputs
from rlhfkit.eval.alignment_tax import AlignmentTaxSection
from rlhfkit.judges.preference import fields_judge, is_pairwise_spec
from rlhfkit.judges.reward_fn import RewardFunctionError
from rlhfkit.judges.reward_set import check_on_prompts
from rlhfkit.judges.rewards import prompt_text, task_reward_fn
from rlhfkit.judges.sample_scorer import check_scorer_spec
from rlhfkit.models import check_policy_path


@dataclass
class EvalPromptsSection:
    """The held-out prompts every model answers (records {"prompt"} or {"messages"})."""

    train: str = "task:sentiment/prompts_eval.jsonl"
    """Prompt source: a .jsonl/.json/.parquet/.csv file, hf:org/name[:split], or task:NAME (its prompts_eval.jsonl)."""
    max_prompt_length: int = 256
    """Prompts longer than this many tokens (after the chat template) are dropped and counted."""
    limit: int = 0
    """Use only the first N prompts; 0 = all."""

    def validate(self, where: str) -> None:
        if not self.train:
            raise ConfigError(f"{where}.train: a prompt source is required")


@dataclass
class EvalRunSection:
    """Where the evaluation writes, and its sampling seed (named ``train`` like every stage's run
    section, so the pipeline can set output_dir and seed)."""

    output_dir: str = "runs/eval"
    """Directory of eval_results.json and the samples."""
    seed: int = 0
    """Sampling seed, the same for every model (common random numbers)."""
    resume: Union[bool, Literal["auto"]] = False
    """Accepted for the pipeline (true, false or auto); an evaluation is always recomputed."""
    progress: bool = True
    """Show progress."""


@dataclass
class EvalConfig:
    """`rlhfkit eval`: policies against a baseline on held-out prompts."""

    policies: list = field(default_factory=list)
    """Policies to evaluate: model directories or names; "label=path" names a row."""
    baseline: str = "smollm2-135m-instruct"
    """The policy every other is compared with (usually the starting policy, the SFT model)."""
    prompts: EvalPromptsSection = field(default_factory=EvalPromptsSection)
    """Held-out prompts (prompts.train; task:NAME means the task's prompts_eval.jsonl)."""
    rollout: RolloutSection = field(default_factory=lambda: RolloutSection(n=2, temperature=1.0, micro_batch_size=64))
    """Sampling: rollout.n responses per prompt and model."""
    gold: str = "task:sentiment"
    """The gold judge: pointwise (task:NAME, module:function, rm:DIR: win rate, mean score and its
    correlation with length) or pairwise (annotator:TASK, pm:DIR, judge:MODEL: win rate only); empty = none."""
    proxy: str = ""
    """Pointwise proxy reward, e.g. rm:DIR; empty = none."""
    judges: list = field(default_factory=list)
    """More win-rate judges: rm:, task:, module:fn, pm:, judge:, annotator:."""
    preference_set: str = ""
    """Preference pairs on which to report the proxy's and the judges' accuracy by category; empty = skip."""
    batch_size: int = 16
    """Rows per scoring forward (reward model, judge, KL)."""
    alignment_tax: AlignmentTaxSection = field(default_factory=AlignmentTaxSection)
    """Held-out SFT-data NLL and a capability probe (greedy exact match), baseline vs each policy."""
    train: EvalRunSection = field(default_factory=EvalRunSection)
    """Output directory and seed."""

    def judge_specs(self) -> list[tuple[str, str]]:
        """(key, spec) of every judge that is set: gold, proxy, then each of judges."""
        return [(k, s) for k, s in [("gold", self.gold), ("proxy", self.proxy), *(("judges", j) for j in self.judges)]
                if s]

    def inputs(self) -> list[Input]:
        """What it reads that may exist before it runs, as `SFTConfig.inputs`: the prompts, every
        policy and the baseline, every judge (its spec, and what it needs of the prompt records and
        the preference pairs), the preference set and the alignment tax's SFT data."""
        p, tax = self.prompts, self.alignment_tax
        models = [("baseline", self.baseline), *(("policies", policy_label(s)[1]) for s in self.policies)]
        return [*source_inputs("prompts.train", p.train, "prompts_eval", load_prompts),
                *((key, path, partial(check_policy_path, path)) for key, path in models),
                *((key, spec, partial(check_judge, self, spec)) for key, spec in self.judge_specs()),
                *source_inputs("preference_set", self.preference_set, "preference", load_preference),
                *source_inputs("alignment_tax.sft_data", tax.sft_data, "sft", load_sft)]

    def fingerprint_sources(self) -> dict[str, str]:
        """Name -> spec of every input whose identity (files' content) the evaluation's record
        (``eval_run.json``) keeps, so that a pipeline does not skip a finished evaluation whose
        prompts, policies or judges have changed since: `training.fingerprint.default_sources`."""
        out: dict[str, str] = {}
        for key, value in [("prompts.train", self.prompts.train), ("baseline", self.baseline),
                           ("policies", [policy_label(s)[1] for s in self.policies]), ("gold", self.gold),
                           ("proxy", self.proxy), ("judges", list(self.judges)),
                           ("preference_set", self.preference_set),
                           ("alignment_tax.sft_data", self.alignment_tax.sft_data)]:
            if isinstance(value, list):
                out.update({f"{key}[{i}]": v for i, v in enumerate(value) if isinstance(v, str) and v})
            elif isinstance(value, str) and value:
                out[key] = value
        return out

    def validate(self, where: str) -> None:
        if not self.policies:
            raise ConfigError(f"{where}.policies: name at least one policy to evaluate")
        if not self.baseline.strip():
            raise ConfigError(f"{where}.baseline: empty; name the model the policies are compared with")
        if not all(isinstance(p, str) and p for p in self.policies + self.judges):
            raise ConfigError(f"{where}: policies and judges must be non-empty strings")
        seen: dict[str, str] = {"baseline": self.baseline}
        for spec in self.policies:  # each label names a row and a samples file: two would overwrite one
            label, path = policy_label(spec)
            if not label or "/" in label or "\\" in label or label.startswith("."):
                raise ConfigError(f"{where}.policies: label {label!r} of {path}: it names the samples file "
                                  f"(samples-LABEL.jsonl), so no '/', '\\' or leading '.'")
            if label in seen:
                raise ConfigError(f"{where}.policies: {path} and {seen[label]} are both labelled {label!r}: "
                                  f"name them, e.g. 'NAME={path}'")
            seen[label] = path
        if self.proxy and is_pairwise_spec(self.proxy):
            raise ConfigError(f"{where}.proxy: {self.proxy} is a pairwise judge; proxy is a pointwise reward (rm:DIR, "
                              "task:NAME, module:function): name a pairwise judge in judges")
        if self.rollout.temperature > 0 and (self.rollout.top_k or self.rollout.top_p < 1):  # filtered, scored unfiltered
            raise ConfigError(f"{where}.rollout: top_k {self.rollout.top_k}, top_p {self.rollout.top_p}: eval samples "
                              "from the whole distribution at rollout.temperature, whose log-probs its KL column "
                              "compares; filtered samples would make that column no KL (set top_k 0, top_p 1)")
        if self.rollout.temperature == 0 and self.rollout.n > 1:  # the intervals would count copies as samples
            raise ConfigError(f"{where}.rollout.n: {self.rollout.n} greedy samples (rollout.temperature 0) per prompt "
                              "are copies of one; use rollout.n=1, or a temperature above 0")


def policy_label(spec: str) -> tuple[str, str]:
    """"label=path" -> (label, path); "runs/x/model" -> ("x", ...); "runs/x" -> ("x", ...)."""
    if "=" in spec:
        label, path = spec.split("=", 1)
        return label, path
    p = Path(spec)
    return (p.parent.name if p.name == "model" and p.parent.name else p.name or spec), spec


def check_judge(cfg: EvalConfig, spec: str) -> None:
    """One judge's spec (`check_scorer_spec`, no model loaded), and what it needs of the prompt
    records (`judges.reward_set.check_on_prompts`, the judge used alone) and of the preference
    set's pairs (a built-in task's judge): a judge that needs a field the records lack (arithmetic's
    ``reference``) or cannot read one is refused, naming the data, before anything is written, not
    after every policy has been sampled. Model judges (pm:, judge:) read no fields."""
    check_scorer_spec(spec)
    pointwise = fields_judge(spec)
    if pointwise is None:
        return
    try:
        check_on_prompts(pointwise, "prompts.train", cfg.prompts.train, "prompts_eval", cfg.prompts.limit, alone=True)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not (cfg.preference_set and pointwise.startswith("task:")):
        return
    try:
        pairs = load_sources(cfg.preference_set, "preference", load_preference)
    except (ValueError, FileNotFoundError):
        return  # the preference_set input says why
    try:
        task_reward_fn(pointwise[5:])([prompt_text(ex.prompt) for ex in pairs], [ex.chosen for ex in pairs])
    except (RewardFunctionError, ValueError) as e:
        raise ConfigError(f"{spec} cannot score the pairs of preference_set {cfg.preference_set} (preference "
                          f"pairs carry no prompt-record fields): {e}") from None
