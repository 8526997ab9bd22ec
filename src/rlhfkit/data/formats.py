"""The three example types the trainers consume, parsed and validated from raw records.

- `SFTExample`: a conversation ending with an assistant turn (every assistant turn is trained).
- `PreferenceExample`: a prompt (messages) with a chosen and a rejected response (strings).
- `PromptExample`: a prompt for rollouts, with an optional reference answer and any other fields
  of its record (for reward functions); parsed in `data.prompt_records`.

Accepted record shapes are listed on each `parse_*` function. Validation fails on the first bad
record with a `DataError` naming file, line and field; nothing is silently skipped.
Each example keeps ``origin = (source, line)`` so that tokenization errors point back to the file.
"""

from __future__ import annotations

import difflib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from rlhfkit.data.errors import DataError, Origin, location, type_name
from rlhfkit.data.messages import (
    check_messages,
    check_starts_with_user,
    check_text,
    first_difference,
    is_transcript_string,
    parse_transcript_string,
    prompt_messages,
)
from rlhfkit.data.records import Record, load_records

_NO_ORIGIN = Origin(None, None)
log = logging.getLogger("rlhfkit")


@dataclass
class SFTExample:
    messages: list[dict]  # system? user, assistant, (user, assistant)*; ends with assistant
    origin: Origin = field(default=_NO_ORIGIN, compare=False, repr=False)
    # the record key named in errors; "messages" trains every assistant turn, any other (a prompt's
    # response or completion, a pair's chosen reply) the last one only
    field: str = field(default="messages", compare=False, repr=False)
    token_ids: tuple[list[int], list[int]] | None = None  # (prompt, reply) as sampled (`TOKEN_FIELDS`)


@dataclass
class PreferenceExample:
    prompt: list[dict]  # messages, ending with a user turn
    chosen: str  # content of the preferred assistant reply
    rejected: str
    category: str | None = None  # e.g. chat / chat-hard / safety / reasoning, for per-category metrics
    margin: float | None = None  # optional preference strength, for a margin term in the RM loss
    origin: Origin = field(default=_NO_ORIGIN, compare=False, repr=False)
    token_ids: tuple[list[int], list[int], list[int]] | None = None  # (prompt, chosen, rejected) as sampled


@dataclass
class PromptExample:
    prompt: list[dict]  # messages, ending with a user turn
    reference: str | None = None  # reference answer for verifiable rewards, if any
    meta: dict[str, Any] = field(default_factory=dict)  # every other field of the record, as JSON values
    origin: Origin = field(default=_NO_ORIGIN, compare=False, repr=False)
    set_fields: tuple[str, ...] = field(default=(), compare=False, repr=False)  # the fields of its whole set

    def reward_fields(self) -> dict[str, Any]:
        """What a reward function receives for this prompt (`judges.rewards`): every field of the
        record but the prompt, with ``reference`` as a string (from ``reference`` or ``answer``),
        and None for a field that other records of its set have and this one lacks (so a batch in
        which no record has it still passes the field, as a list of None)."""
        out = dict.fromkeys(self.set_fields)
        out.update(self.meta)
        if self.reference is not None:
            out["reference"] = self.reference
        return out


# Token ids a record may carry besides its text: the tokens a policy sampled (online DPO's pairs,
# RSFT's best replies), trained as they are rather than the text rendered again, which would differ
# where decoding and re-encoding do not round-trip and would close a reply cut at max_new_tokens
# with an end-of-turn token the policy never produced.
TOKEN_FIELDS = {"sft": ("prompt_ids", "response_ids"), "preference": ("prompt_ids", "chosen_ids", "rejected_ids")}


def _token_ids(d: dict, o, kind: str) -> tuple[list[int], ...] | None:
    """The record's `TOKEN_FIELDS` (all or none): each a non-empty list of integers >= 0 (the
    tokenizer checks the upper end); None when it has none."""
    keys = TOKEN_FIELDS[kind]
    given = [k for k in keys if d.get(k) is not None]
    if not given:
        return None
    if len(given) < len(keys):
        missing = next(k for k in keys if k not in given)
        raise DataError.at(o, missing, f"missing: token ids come as {', '.join(keys)} together")
    for k in keys:
        v = d[k]
        if not isinstance(v, list) or not v or not all(type(t) is int and t >= 0 for t in v):
            raise DataError.at(o, k, "expected a non-empty list of token ids (integers >= 0)")
    return tuple(list(d[k]) for k in keys)


# ----------------------------------------------------------------------------------------- SFT

def parse_sft(records: Iterable[Record]) -> list[SFTExample]:
    """Records -> SFT conversations.

    Accepted: ``{"messages": [...]}``; ``{"prompt", "response"}`` (or ``"completion"``), where the
    prompt is a string or messages ending with a user turn and the response a string or a
    single assistant message; the latter optionally with ``prompt_ids`` and ``response_ids``
    (`TOKEN_FIELDS`), the tokens trained. A record with both forms trains its ``messages``, said
    once per file.
    """
    warned: set = set()
    out = []
    for rec in records:
        _warn_both_forms(rec, warned)
        out.append(_parse_sft_one(rec))
    return out


def _warn_both_forms(rec: Record, warned: set) -> None:
    """A record with ``messages`` and a prompt's response (or completion) trains the messages alone."""
    other = [k for k in ("response", "completion") if rec.data.get(k) is not None]
    if rec.data.get("messages") is None or not other or rec.origin.source in warned:
        return
    warned.add(rec.origin.source)
    log.warning("%s: field %r is not used: the record has 'messages', which are trained (every assistant "
                "turn); give one form per record (said once for this file)", location(*rec.origin), other[0])


def _parse_sft_one(rec: Record) -> SFTExample:
    d, o = rec.data, rec.origin
    if d.get("messages") is not None:
        if _token_ids(d, o, "sft"):
            raise DataError.at(o, "prompt_ids", "token ids go with 'prompt' and 'response', not 'messages'")
        messages = check_messages(d["messages"], o, "messages")
        check_starts_with_user(messages, o, "messages")
        if messages[-1]["role"] != "assistant":
            raise DataError.at(o, "messages", f"the conversation must end with an assistant turn, "
                                              f"got {messages[-1]['role']!r}")
        return SFTExample(messages, origin=o, field="messages")
    if d.get("prompt") is None:
        raise DataError.at(o, "messages", "missing: an SFT record needs 'messages', or 'prompt' and 'response' (or "
                                          f"'completion'){_fields_of(d)}")
    key = next((k for k in ("response", "completion") if d.get(k) is not None), None)
    if key is None:
        raise DataError.at(o, "response", "missing (or null)")
    prompt = prompt_messages(d["prompt"], o, "prompt")
    reply = _reply_content(d[key], o, key)
    if isinstance(d["prompt"], str) and is_transcript_string(d["prompt"]):
        reply = reply.strip()  # HH split into prompt / response: the reply starts with the space after "Assistant:"
    return SFTExample([*prompt, {"role": "assistant", "content": reply}], origin=o, field=key,
                      token_ids=_token_ids(d, o, "sft"))


def _reply_content(value, origin, key: str) -> str:
    """A response given as a string or as ``[{"role": "assistant", "content": ...}]``."""
    if isinstance(value, list) and len(value) == 1:
        msg = check_messages(value, origin, key)[0]
        if msg["role"] != "assistant":
            raise DataError.at(origin, f"{key}[0].role", f"expected an assistant message, got {msg['role']!r}")
        return msg["content"]
    if isinstance(value, (str, type(None))):
        return check_text(value, origin, key)
    raise DataError.at(origin, key, f"expected a string or a single assistant message, got {type_name(value)}")


# ---------------------------------------------------------------------------------- preferences

def parse_preference(records: Iterable[Record]) -> list[PreferenceExample]:
    """Records -> preference pairs.

    Accepted:
    - ``{"prompt", "chosen", "rejected"}``: prompt a string or messages; chosen / rejected strings,
      a single assistant message, or full transcripts (messages, or "\n\nHuman: ..." strings,
      whose last turn is the reply and whose earlier turns repeat the prompt);
    - ``{"chosen", "rejected"}`` without a prompt (Anthropic HH style): two full conversations,
      as message lists or "\\n\\nHuman: ...\\n\\nAssistant: ..." strings, split at the last
      assistant turn; the turns before it must be identical in both.
    Optional: ``category`` (string), ``margin`` (number), and with a prompt ``prompt_ids``,
    ``chosen_ids`` and ``rejected_ids`` (`TOKEN_FIELDS`), the tokens trained.
    """
    warned: set = set()
    out = []
    for rec in records:
        out.append(_parse_preference_one(rec))
        _warn_misspelled(rec, _PREFERENCE_OPTIONAL, warned)
    return out


# Optional preference fields: a misspelled one would be ignored (other extra fields are, as
# datasets' extra columns are), so a near miss is said once per file and field.
_PREFERENCE_OPTIONAL = ("category", "margin")


def _warn_misspelled(rec: Record, optional: tuple[str, ...], warned: set) -> None:
    for key in rec.data:
        if key in optional or (rec.origin.source, key) in warned:
            continue
        near = difflib.get_close_matches(key.lower(), optional, n=1, cutoff=0.8)
        if near and near[0] not in rec.data:
            warned.add((rec.origin.source, key))
            log.warning("%s: field %r is not used: did you mean %r? (said once for this file)",
                        location(*rec.origin), key, near[0])


def _fields_of(d: dict) -> str:
    """The fields a record does have, for an error about one it lacks (a dataset of other columns)."""
    names = sorted(str(k) for k in d)
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    return f"; the record's fields: {shown}" if names else "; the record is empty"


def _parse_preference_one(rec: Record) -> PreferenceExample:
    d, o = rec.data, rec.origin
    for key in ("chosen", "rejected"):
        if d.get(key) is None:
            raise DataError.at(o, key, f"missing (or null){'' if key in d else _fields_of(d)}")
    token_ids = _token_ids(d, o, "preference")
    if d.get("prompt") is not None:
        prompt, chosen, rejected = _pair_with_prompt(d, o)
    elif token_ids:
        raise DataError.at(o, "prompt", "missing: token ids go with 'prompt', 'chosen' and 'rejected'")
    else:
        prompt, chosen, rejected = _pair_from_transcripts(d, o)
    if chosen.strip() == rejected.strip():
        raise DataError.at(o, "rejected", "identical to 'chosen': a pair needs two different responses")
    return PreferenceExample(prompt, chosen, rejected, category=_category(d, o), margin=_margin(d, o), origin=o,
                             token_ids=token_ids)


def _pair_with_prompt(d: dict, o) -> tuple[list[dict], str, str]:
    prompt = prompt_messages(d["prompt"], o, "prompt")
    replies, prefixes = {}, {}
    for key in ("chosen", "rejected"):
        value = d[key]
        if isinstance(value, str) and is_transcript_string(value):  # "\n\nHuman: ...\n\nAssistant: ..." in full
            value = parse_transcript_string(check_text(value, o, key), o, key)
        if isinstance(value, list) and len(value) > 1:
            prefixes[key], replies[key] = _split_transcript(value, o, key)
        else:
            replies[key] = _reply_content(value, o, key)
    for key, prefix in prefixes.items():
        # A transcript must repeat the prompt; with a string prompt, its last user turn suffices
        # (then the transcript's prefix, which may hold a system message, becomes the prompt).
        same = prefix == prompt or (isinstance(d["prompt"], str) and prefix[-1] == prompt[-1])
        if not same:
            raise DataError.at(o, key, "the transcript before the last assistant turn does not match 'prompt' "
                                       f"(first difference at message {first_difference(prefix, prompt)})")
    if len(prefixes) == 2 and prefixes["chosen"] != prefixes["rejected"]:
        i = first_difference(prefixes["chosen"], prefixes["rejected"])
        raise DataError.at(o, "rejected",
                           f"conversation before the last assistant turn differs from 'chosen' at message {i}")
    if prefixes:
        prompt = next(iter(prefixes.values()))
    if isinstance(d["prompt"], str) and is_transcript_string(d["prompt"]):
        # HH split into prompt / response: replies start with the space after "Assistant:"
        replies = {k: v.strip() for k, v in replies.items()}
    return prompt, replies["chosen"], replies["rejected"]


def _pair_from_transcripts(d: dict, o) -> tuple[list[dict], str, str]:
    split = {}
    for key in ("chosen", "rejected"):
        value = d[key]
        if isinstance(value, str):
            check_text(value, o, key)
            if not is_transcript_string(value):
                raise DataError.at(o, "prompt", f"missing, and '{key}' is not a full conversation "
                                                "(a message list or a '\\n\\nHuman: ...\\n\\nAssistant: ...' string)")
            value = parse_transcript_string(value, o, key)
        elif not isinstance(value, list):
            raise DataError.at(o, key, f"expected a string or a list of messages, got {type_name(value)}")
        split[key] = _split_transcript(value, o, key)
    (p_chosen, chosen), (p_rejected, rejected) = split["chosen"], split["rejected"]
    if p_chosen != p_rejected:
        i = first_difference(p_chosen, p_rejected)
        raise DataError.at(o, "rejected", f"conversation before the last assistant turn differs from 'chosen' "
                                          f"at message {i}: both must share the same prompt")
    return p_chosen, chosen, rejected


def _split_transcript(value: list, o, key: str) -> tuple[list[dict], str]:
    """Messages -> (prompt messages, content of the final assistant turn)."""
    messages = check_messages(value, o, key)
    if messages[-1]["role"] != "assistant":
        raise DataError.at(o, key, f"a conversation must end with the assistant reply, got {messages[-1]['role']!r}")
    prompt = messages[:-1]
    if not prompt:
        raise DataError.at(o, key, "the conversation has no turns before the assistant reply")
    check_starts_with_user(prompt, o, key)
    if prompt[-1]["role"] != "user":
        raise DataError.at(o, key, "the turn before the final assistant reply must be a user turn")
    return prompt, messages[-1]["content"]


def _category(d: dict, o) -> str | None:
    value = d.get("category")
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError.at(o, "category", f"expected a string, got {type_name(value)}")
    return value


def _margin(d: dict, o) -> float | None:
    value = d.get("margin")
    if value is None:
        return None
    if isinstance(value, str):  # CSV cells are strings
        try:
            value = float(value)
        except ValueError:
            raise DataError.at(o, "margin", f"expected a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError.at(o, "margin", f"expected a number, got {type_name(value)}")
    if not math.isfinite(value):
        raise DataError.at(o, "margin", f"expected a finite number, got {value}")
    return float(value)


# ---------------------------------------------------------------------------------- convenience

def load_sft(source, **kw) -> list[SFTExample]:
    """`load_records` (same keywords: split, limit) + `parse_sft`."""
    return parse_sft(load_records(source, **kw))


def load_preference(source, **kw) -> list[PreferenceExample]:
    """`load_records` + `parse_preference`."""
    return parse_preference(load_records(source, **kw))


def sft_from_preference(examples: Iterable[PreferenceExample]) -> list[SFTExample]:
    """SFT on the chosen responses of a preference set: the usual step before off-policy DPO,
    so that the policy starts close to the distribution the pairs were sampled from."""
    return [SFTExample([*ex.prompt, {"role": "assistant", "content": ex.chosen}], origin=ex.origin, field="chosen")
            for ex in examples]
