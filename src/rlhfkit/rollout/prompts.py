"""Rollout prompts: records loaded, validated and rendered with the chat template, ready to sample from."""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhfkit.data import load_prompts, render_prompt_ids
from rlhfkit.data.messages import last_user_text
from rlhfkit.data.chat_templates import check_not_rendered
from rlhfkit.data.sources import Input, resolve_source, source_inputs


@dataclass
class PromptItem:
    ids: list[int]  # chat-templated prompt tokens, ending with the assistant header
    messages: list[dict]
    text: str  # plain user text, what reward functions receive
    reference: str | None = None
    fields: dict = field(default_factory=dict)  # the record's other fields: reward functions get them

    @classmethod
    def of(cls, example, ids: list[int]) -> PromptItem:
        """The item of a `data.PromptExample`, with its rendered ``ids``."""
        return cls(ids, example.prompt, last_user_text(example.prompt), example.reference, example.reward_fields())


def prompt_inputs(prompts) -> list[Input]:
    """The `Input`s of a prompts section (``prompts.train``, ``prompts.eval``), read as
    `load_prompt_items` reads them (not rendered: that needs the run's tokenizer)."""
    return [*source_inputs("prompts.train", prompts.train, "prompts", load_prompts),
            *source_inputs("prompts.eval", prompts.eval, "prompts_eval", load_prompts)]


def prompt_records(source: str, kind: str = "prompts", limit: int = 0) -> list[PromptItem]:
    """The records of ``source`` as `PromptItem`s without token ids (no tokenizer needed): what a
    reward function would receive from them, for checking a judge against them before a run."""
    examples = load_prompts(resolve_source(source, kind))
    return [PromptItem.of(ex, []) for ex in (examples[:limit] if limit else examples)]


def load_prompt_items(source: str, tokenizer, *, max_prompt_length: int, limit: int = 0,
                      kind: str = "prompts") -> tuple[list[PromptItem], int]:
    """Load and render the prompts of ``source`` (a file, hf:..., or task:NAME); returns (items,
    number dropped for being longer than ``max_prompt_length`` tokens)."""
    examples = load_prompts(resolve_source(source, kind))
    if limit:
        examples = examples[:limit]
    items, dropped = [], 0
    for ex in examples:
        check_not_rendered(tokenizer, ex.prompt, ex.origin, "prompt")
        ids = render_prompt_ids(tokenizer, ex.prompt)
        if len(ids) > max_prompt_length:
            dropped += 1
            continue
        items.append(PromptItem.of(ex, ids))
    if not items:
        raise ValueError(f"{source}: no prompts left (dropped {dropped} longer than {max_prompt_length} tokens)")
    return items, dropped
