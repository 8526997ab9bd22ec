"""Alignment tax: what a trained policy lost on its SFT data and on a capability probe, next to
the baseline (`rlhfkit eval`, key `alignment_tax`).

- held-out SFT-data NLL: the token-mean negative log-likelihood of the responses of an SFT set the
  policies were not trained on (lower = the policy still models that data);
- capability probe: greedy exact match on a verifiable task's held-out prompts (task:arithmetic:
  the last number of the answer equals the sum).
A rise of the NLL or a fall of the exact match from the baseline to a policy is the tax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhfkit.config import ConfigError, RolloutSection, under_key
from rlhfkit.config.sections import changed_keys
from rlhfkit.data import (
    IGNORE_INDEX,
    SFTCollator,
    batch_to_device,
    load_sft,
    tokenize_dataset,
)
from rlhfkit.data.sources import resolve_source
from rlhfkit.judges.rewards import build_reward_fn
from rlhfkit.models.forward import causal_logprobs
from rlhfkit.rng import set_seed
from rlhfkit.rollout import decode_responses, load_prompt_items, rollout
from rlhfkit.tasks import get_task, list_tasks


@dataclass
class AlignmentTaxSection:
    """Held-out SFT-data NLL and a capability probe, for the baseline and every policy."""

    sft_data: str = ""
    """SFT data the policies were not trained on (a file, or task:NAME for the task's shipped sft.jsonl:
    held out only for a policy whose SFT stage did not train on it), whose response NLL is measured;
    empty = skip."""
    capability: str = ""
    """A verifiable task, task:NAME (e.g. task:arithmetic): greedy exact match on its held-out prompts
    (prompts_eval.jsonl), scored by the task's reward; empty = skip."""
    limit: int = 64
    """Examples of each (SFT rows, capability prompts)."""
    max_length: int = 512
    """Tokens of an SFT row (prompt + response); longer rows are cut from the right and counted
    (``sft_truncated`` in eval_results.json)."""
    max_new_tokens: int = 24
    """Tokens generated per capability prompt."""

    def unused_keys(self) -> tuple[list[str], tuple[str, ...]]:
        """With neither sft_data nor capability nothing is measured: the other keys are not read;
        max_length is read only with sft_data, max_new_tokens only with capability."""
        if not (self.sft_data or self.capability):
            return changed_keys(self, but=("sft_data", "capability")), ("sft_data", "capability")
        if self.sft_data and self.capability:
            return [], ()
        off, key = ("capability", "max_new_tokens") if self.sft_data else ("sft_data", "max_length")
        return [k for k in changed_keys(self) if k == key], (off,)

    def validate(self, where: str) -> None:
        if self.capability:
            kind, _, name = self.capability.partition(":")
            try:
                task = get_task(name) if kind == "task" else None
            except ValueError as e:
                raise ConfigError(f"{where}.capability: {e}") from None
            if task is None:
                raise ConfigError(f"{where}.capability: expected task:NAME, got {self.capability!r}")
            if not task.verifiable:
                verifiable = [t for t in list_tasks() if get_task(t).verifiable]
                raise ConfigError(f"{where}.capability: task {name} has no exact answer to match; a verifiable "
                                  f"task is needed ({', '.join(f'task:{t}' for t in verifiable)})")
        if self.limit < 1:
            raise ConfigError(f"{where}.limit: must be >= 1")


class AlignmentTax:
    """The section's data, loaded once; ``measure(model)`` gives one model's numbers."""

    def __init__(self, cfg: AlignmentTaxSection, tokenizer, batch_size: int, device):
        self.cfg, self.tokenizer, self.batch_size, self.device = cfg, tokenizer, batch_size, device
        self.sft = []
        if cfg.sft_data:
            with under_key("alignment_tax.sft_data"):
                rows = load_sft(resolve_source(cfg.sft_data, "sft"))[:cfg.limit]
                self.sft, self.cut = tokenize_dataset(tokenizer, rows, "sft", cfg.max_length, "right")
        self.items, self.score = [], None
        if cfg.capability:
            self.items = load_prompt_items(f"{cfg.capability}/prompts_eval.jsonl", tokenizer, max_prompt_length=256,
                                           limit=cfg.limit,
                                           kind="prompts_eval")[0]
            self.score = build_reward_fn(cfg.capability)

    @property
    def enabled(self) -> bool:
        return bool(self.sft or self.items)

    def described(self) -> dict:
        """What is measured: the SFT data and its number of examples, the probe's task and its number
        of prompts (eval_results.json's top-level ``alignment_tax``)."""
        out = {}
        if self.sft:
            out.update(sft_data=self.cfg.sft_data, sft_examples=len(self.sft), sft_truncated=self.cut.truncated,
                       sft_dropped=self.cut.dropped)
        if self.items:
            out.update(capability=self.cfg.capability, capability_prompts=len(self.items))
        return out

    @torch.no_grad()
    def measure(self, model) -> dict:
        out = {}
        if self.sft:
            out["sft_nll"] = heldout_nll(model, self.sft, self.tokenizer.pad_token_id, self.batch_size, self.device)
        if self.items:
            out["capability_exact_match"] = self.exact_match(model)
        return out

    def exact_match(self, model) -> float:
        set_seed(0)
        greedy = RolloutSection(n=1, temperature=0.0, max_new_tokens=self.cfg.max_new_tokens,
                                micro_batch_size=self.batch_size)
        exp = rollout(model, self.items, greedy, self.tokenizer)
        rows = [self.items[i] for i in exp.prompt_index.tolist()]
        scores = self.score([r.text for r in rows], decode_responses(exp, self.tokenizer),
                            messages=[r.messages for r in rows], fields=[r.fields for r in rows])
        return sum(float(s) >= 1.0 for s in scores) / len(scores)


def tax_deltas(policy: dict, baseline: dict) -> dict:
    """A policy's numbers and their change from the baseline's (``KEY_delta`` = policy - baseline)."""
    return {**policy, **{f"{k}_delta": v - baseline[k] for k, v in policy.items() if k in baseline}}


@torch.no_grad()
def heldout_nll(model, examples: list[dict], pad_id: int, batch_size: int, device) -> float:
    """Token-mean NLL of the labelled (response) tokens of tokenised SFT ``examples``."""
    collator, total, count = SFTCollator(pad_id), 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = batch_to_device(collator(examples[i:i + batch_size]), device)
        logp = causal_logprobs(model, batch["input_ids"], batch["attention_mask"])  # (B, T-1)
        mask = batch["labels"][:, 1:] != IGNORE_INDEX
        total -= float(logp[mask].sum())
        count += int(mask.sum())
    return total / max(count, 1)
