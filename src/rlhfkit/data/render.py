"""Chat rendering with the tokenizer's own chat template, and where each reply's tokens are.

Assistant spans are found by rendering prefixes of the conversation, not by searching for marker
strings: for assistant turn i,
    before = template(messages[:i], add_generation_prompt=True)   # ... <|im_start|>assistant\\n
    upto   = template(messages[:i+1])                              # ... reply<|im_end|>\\n
and the reply's tokens are upto[len(before):] when both are token prefixes of the whole rendering
("prefix-stable"). When a merge crosses a boundary (a reply starting with spaces or newlines
right after the "assistant\\n" header, or a template whose turn separator merges with the next
header), the rendered text is cut at the same places and each piece is tokenized on its own:
the prompt's tokens are then exactly the generation prompt's, and the reply's are those a model
writes after it, as in a rollout. A template that rewrites earlier turns (the renderings are not
even text prefixes of each other) is a DataError. A reply's span ends at its end-of-turn token:
the template's separator after it is not trained.

A tokenizer without a chat template (a base model) gets one from ``data.chat_template``
(`data.chat_templates.apply_chat_template`).
"""

from __future__ import annotations

import weakref

from rlhfkit.data.chat_templates import require_chat_template
from rlhfkit.data.errors import DataError

# End-of-turn tokens of common templates; the tokenizer's eos is always included.
_EOT_CANDIDATES = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>", "</s>")
_eot_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def render_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of the chat-template rendering (special tokens come from the template itself)."""
    require_chat_template(tokenizer)
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                        return_dict=False)
    if isinstance(out, dict) or hasattr(out, "keys"):  # BatchEncoding from older / custom tokenizers
        out = out["input_ids"]
    return list(out)


def render_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt as the model sees it before answering: template + generation header."""
    return render_ids(tokenizer, messages, add_generation_prompt=True)


def end_of_turn_ids(tokenizer) -> frozenset[int]:
    """Ids that close an assistant turn: eos plus the known end-of-turn tokens in the vocabulary."""
    try:
        return _eot_cache[tokenizer]
    except (KeyError, TypeError):
        pass
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}  # a stand-in with eos_token_id only
    ids = {vocab[t] for t in _EOT_CANDIDATES if t in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    ids = frozenset(ids)
    try:
        _eot_cache[tokenizer] = ids
    except TypeError:
        pass
    return ids


def render_located(tokenizer, messages, gen: bool, origin, field: str) -> list[int]:
    """`render_ids`; a template that refuses the conversation is a DataError at ``origin``/``field``."""
    import jinja2

    try:
        return render_ids(tokenizer, messages, add_generation_prompt=gen)
    except (jinja2.TemplateError, ValueError) as e:
        raise DataError.at(origin, field, f"the chat template refused this conversation: {e}") from None


def _render_text(tokenizer, messages, gen: bool, origin, field: str) -> str:
    import jinja2

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    except (jinja2.TemplateError, ValueError) as e:
        raise DataError.at(origin, field, f"the chat template refused this conversation: {e}") from None


def _to_eot(ids, start: int, stop: int, eot) -> tuple[int, int]:
    """[start, stop) cut after the last end-of-turn token in it (the template's separator after it is not trained)."""
    for j in range(stop - 1, start - 1, -1):
        if ids[j] in eot:
            return start, j + 1
    return start, stop


def assistant_spans(tokenizer, messages: list[dict], origin=None, field: str = "messages"
                    ) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids of the whole conversation, [start, stop) of each assistant turn up to its end-of-turn token).

    The template's own tokenization when every turn boundary is prefix-stable; otherwise the text
    cut at the boundaries, each piece tokenized alone (module docstring)."""
    full, spans, _ = _spans(tokenizer, messages, origin, field)
    return full, spans


def _spans(tokenizer, messages, origin, field):
    """`assistant_spans`, and whether the template's own tokenization was used (each turn's
    prefix then is exactly its generation prompt's rendering)."""
    full = render_located(tokenizer, messages, False, origin, field)
    eot = end_of_turn_ids(tokenizer)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    spans = []
    for i in turns:
        before = render_located(tokenizer, messages[:i], True, origin, field)
        upto = full if i == len(messages) - 1 else render_located(tokenizer, messages[:i + 1], False, origin, field)
        if full[:len(before)] != before or full[:len(upto)] != upto or len(upto) <= len(before):
            return (*_text_spans(tokenizer, messages, turns, eot, origin, field), False)
        spans.append(_to_eot(full, len(before), len(upto), eot))
    return full, spans, True


def _text_spans(tokenizer, messages, turns, eot, origin, field):
    full = _render_text(tokenizer, messages, False, origin, field)
    cuts = []
    for i in turns:
        before = _render_text(tokenizer, messages[:i], True, origin, field)
        upto = full if i == len(messages) - 1 else _render_text(tokenizer, messages[:i + 1], False, origin, field)
        if not (full.startswith(before) and full.startswith(upto) and len(upto) > len(before)):
            raise DataError.at(origin, field, (
                f"the chat template is not prefix-stable at message {i}: rendering the conversation up to that "
                "turn is not a prefix of the whole rendering (the template rewrites earlier turns), so the "
                "assistant tokens cannot be located"))
        cuts.append((len(before), len(upto)))
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"] if text else []  # noqa: E731
    ids, spans, pos = [], [], 0
    for b, u in cuts:
        ids += encode(full[pos:b])
        start = len(ids)
        ids += encode(full[b:u])
        spans.append(_to_eot(ids, start, len(ids), eot))
        pos = u
    return ids + encode(full[pos:]), spans


def render_reply(tokenizer, messages: list[dict], response: str, origin=None, field: str = "response"
                 ) -> tuple[list[int], list[int]]:
    """(prompt ids with the generation header, reply ids up to and including its end-of-turn token):
    how `rlhfkit rm` and `dpo` see a response to `messages`. The prompt ids are
    `render_prompt_ids(messages)` whichever way the reply was located."""
    full, spans, exact = _spans(tokenizer, [*messages, {"role": "assistant", "content": response}], origin, field)
    start, stop = spans[-1]
    if exact:  # full[:start] is the generation prompt's rendering, token for token
        return full[:start], full[start:stop]
    prompt = render_located(tokenizer, messages, True, origin, "prompt")
    if full[:start] != prompt:
        raise DataError.at(origin, field, "the chat template renders the prompt differently before this reply "
                                          "than as a generation prompt, so the reply cannot be located")
    return prompt, full[start:stop]
