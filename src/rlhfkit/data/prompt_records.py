"""Rollout prompts (PPO, GRPO, RLOO, online DPO, eval) from raw records: the prompt, an optional
reference answer, and every other field of the record kept for reward functions."""

from __future__ import annotations

from typing import Iterable

from rlhfkit.data.errors import DataError, type_name
from rlhfkit.data.formats import PromptExample
from rlhfkit.data.messages import check_text, prompt_messages
from rlhfkit.data.records import Record, load_records

_PROMPT_KEYS = ("prompt", "messages", "reference")
# Reward functions receive the prompts and responses under these names (judges.rewards).
_RESERVED_KEYS = ("prompts", "responses")


def parse_prompts(records: Iterable[Record]) -> list[PromptExample]:
    """Records -> rollout prompts.

    Accepted: ``{"prompt": str | messages}`` or ``{"messages": [...]}`` ending with a user turn;
    optional ``reference`` (or ``answer``): a string or a number (kept as its string).
    Every other field goes to ``meta`` unchanged (``answer`` included), for reward functions,
    which receive them by name: any JSON value (string, number, boolean, null, list, object).
    ``prompts`` and ``responses`` are reserved (reward functions take those names).
    """
    examples = [_parse_prompt_one(rec) for rec in records]
    names = tuple(dict.fromkeys(k for ex in examples for k in ex.reward_fields()))
    for ex in examples:
        ex.set_fields = names
    return examples


def _parse_prompt_one(rec: Record) -> PromptExample:
    d, o = rec.data, rec.origin
    if d.get("prompt") is not None:
        prompt = prompt_messages(d["prompt"], o, "prompt")
    elif d.get("messages") is not None:
        prompt = prompt_messages(d["messages"], o, "messages")
    else:
        raise DataError.at(o, "prompt", "missing: a prompt record needs 'prompt' or 'messages'")
    ref_key = "reference" if d.get("reference") is not None else "answer"
    ref = d.get(ref_key)
    if ref is not None:
        if isinstance(ref, bool) or not isinstance(ref, (str, int, float)):
            raise DataError.at(o, ref_key, f"expected a string or a number, got {type_name(ref)}")
        ref = check_text(str(ref), o, ref_key)
    meta = {k: _json_value(v, o, k) for k, v in d.items() if k not in _PROMPT_KEYS}
    reserved = [k for k in meta if k in _RESERVED_KEYS]
    if reserved:
        raise DataError.at(o, reserved[0], "reserved name: reward functions receive the prompts and responses "
                                           "under it; rename this field")
    return PromptExample(prompt, reference=ref, meta=meta, origin=o)


def _json_value(value, o, key: str):
    """`value` if it is made of JSON values only (so that it can be logged, saved and sent
    between processes like the rest of the record), else a DataError naming the field path."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(v, o, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str):
                raise DataError.at(o, key, f"object keys must be strings, got {type_name(k)} {k!r}")
        return {k: _json_value(v, o, f"{key}.{k}") for k, v in value.items()}
    raise DataError.at(o, key, f"expected a JSON value (string, number, boolean, null, list or object), "
                               f"got {type_name(value)}")


def load_prompts(source, **kw) -> list[PromptExample]:
    """`load_records` + `parse_prompts`."""
    return parse_prompts(load_records(source, **kw))
