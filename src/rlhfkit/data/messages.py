"""Chat messages: validation, and the "\\n\\nHuman: ...\\n\\nAssistant: ..." transcript form.

A message is ``{"role": "system" | "user" | "assistant", "content": str}``; other keys of the
input (``name``, ``tool_calls``, ``reasoning_content``...) are not passed to the chat template: one
that holds a value is said once per file and key, since a template may have rendered it.
Content is kept verbatim (no stripping), except in string transcripts, where the whitespace
around each turn is an artefact of the "\\n\\nHuman: " separators and is removed.
"""

from __future__ import annotations

import logging
import re

from rlhfkit.data.errors import DataError, location, type_name

log = logging.getLogger("rlhfkit")

ROLES = ("system", "user", "assistant")

# Turn markers of the Anthropic HH format. The first turn may start the string without "\n\n".
_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")
_ROLE_OF = {"Human": "user", "Assistant": "assistant"}


def check_text(value, origin, field: str) -> str:
    """A non-empty, not whitespace-only string, else DataError naming `field`."""
    if value is None:
        raise DataError.at(origin, field, "missing (or null)")
    if not isinstance(value, str):
        raise DataError.at(origin, field, f"expected a string, got {type_name(value)}")
    if not value.strip():
        raise DataError.at(origin, field, "empty or whitespace-only text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate ("\\ud800" in JSON): no tokenizer can read it
        raise DataError.at(origin, field, f"not valid Unicode text: a lone surrogate {value[e.start]!r} at character "
                                          f"{e.start}") from None
    return value


def check_messages(value, origin, field: str) -> list[dict]:
    """Validate a list of chat messages and return clean ``{"role", "content"}`` copies."""
    if not isinstance(value, list):
        raise DataError.at(origin, field, f"expected a list of messages, got {type_name(value)}")
    if not value:
        raise DataError.at(origin, field, "empty list of messages")
    out = []
    for i, msg in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(msg, dict):
            raise DataError.at(origin, where,
                               f"expected a message object with 'role' and 'content', got {type_name(msg)}")
        role = msg.get("role")
        if role is None:
            raise DataError.at(origin, f"{where}.role", "missing (or null)")
        if role not in ROLES:
            raise DataError.at(origin, f"{where}.role",
                               f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        out.append({"role": role, "content": check_text(msg.get("content"), origin, f"{where}.content")})
        _warn_dropped(msg, origin, where)
    return out


_DROPPED: set[tuple] = set()  # (file, key): a message key not passed to the template, said once


def _warn_dropped(msg: dict, origin, where: str) -> None:
    source = origin[0] if origin else None
    for key, value in msg.items():
        if key in ("role", "content") or value in (None, "", [], {}) or (source, key) in _DROPPED:
            continue
        _DROPPED.add((source, key))
        at = location(*origin) if origin else "data"
        log.warning("%s: field %r is not used: a message's role and content are passed to the chat template, "
                    "nothing else (said once for this file)", at, f"{where}.{key}")


def check_starts_with_user(messages: list[dict], origin, field: str) -> None:
    """The first non-system turn must be the user's.

    Chat templates insert a default system prompt or refuse otherwise, and the label masking
    renders the conversation before each assistant turn, which cannot be empty.
    """
    i = next((k for k, m in enumerate(messages) if m["role"] != "system"), None)
    if i is None:
        raise DataError.at(origin, field, "only system messages; expected a user turn")
    if messages[i]["role"] != "user":
        raise DataError.at(origin, f"{field}[{i}].role",
                           f"the first non-system message must be a user turn, got {messages[i]['role']!r}")


def is_transcript_string(text: str) -> bool:
    """True for "\\n\\nHuman: ... \\n\\nAssistant: ..." strings (Anthropic HH style)."""
    return bool(re.match(r"\s*Human:", text)) and "\n\nAssistant:" in text


def parse_transcript_string(text: str, origin, field: str, allow_open_end: bool = False) -> list[dict]:
    """Split an HH-style string into messages.

    allow_open_end: accept a final empty "Assistant:" turn (a prompt waiting for its answer) and
    drop it; otherwise every turn must have content.
    """
    lead = len(text) - len(text.lstrip())
    body = text[lead:]
    marks = list(_TURN.finditer(body))
    if not marks or marks[0].start() != 0:
        raise DataError.at(origin, field, "not a transcript: expected it to start with 'Human:'")
    messages = []
    for k, m in enumerate(marks):
        end = marks[k + 1].start() if k + 1 < len(marks) else len(body)
        messages.append({"role": _ROLE_OF[m.group(1)], "content": body[m.end():end].strip()})
    if allow_open_end and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    for i, msg in enumerate(messages):
        if not msg["content"]:
            who = "Human" if msg["role"] == "user" else "Assistant"
            raise DataError.at(origin, field, f"turn {i + 1} ({who}:) is empty")
    return messages


def prompt_messages(value, origin, field: str = "prompt") -> list[dict]:
    """A prompt as messages ending with a user turn.

    A plain string becomes one user message, unless it is an HH transcript ending in an open
    "Assistant:" turn (as in datasets that split HH into prompt / response), which is parsed.
    """
    if isinstance(value, str):
        check_text(value, origin, field)
        if is_transcript_string(value) and value.rstrip().endswith("Assistant:"):
            messages = parse_transcript_string(value, origin, field, allow_open_end=True)
        else:
            return [{"role": "user", "content": value}]
    elif isinstance(value, list):
        messages = check_messages(value, origin, field)
    else:
        raise DataError.at(origin, field, f"expected a string or a list of messages, got {type_name(value)}")
    check_starts_with_user(messages, origin, field)
    if messages[-1]["role"] != "user":
        raise DataError.at(origin, field, f"a prompt must end with a user turn, got {messages[-1]['role']!r}")
    return messages


def first_difference(a: list[dict], b: list[dict]) -> int:
    """Index of the first message that differs between two lists (len of the shorter if a prefix)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def last_user_text(messages: list[dict] | str) -> str:
    """The plain user text of a prompt: the last user message (or the string itself)."""
    if isinstance(messages, str):
        return messages
    users = [m["content"] for m in messages if m.get("role") == "user"]
    return users[-1] if users else (messages[-1]["content"] if messages else "")
