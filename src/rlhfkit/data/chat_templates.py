"""Chat templates: the named ones (``data.chat_template``), giving a tokenizer one, and refusing
text that a template has already rendered.

A tokenizer without a chat template (a base model) gets one from ``data.chat_template``
(`apply_chat_template`): a Jinja file or a named template (`NAMED_TEMPLATES`), whose markers must
be tokens of the vocabulary.
"""

from __future__ import annotations

import weakref
from pathlib import Path

from rlhfkit.data.errors import DataError

# ChatML (<|im_start|>role\n...<|im_end|>\n), the format of SmolLM2, Qwen and many others. Its header
# ends with a newline, so a reply's first token rarely merges with it (data.render locates replies).
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
NAMED_TEMPLATES = {"chatml": CHATML}


class MissingChatTemplate(ValueError):
    """The tokenizer has no chat template and none was configured (``data.chat_template``)."""


def resolve_chat_template(value: str) -> str:
    """A named template (`NAMED_TEMPLATES`) or the text of a Jinja template file."""
    if value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    path = Path(value).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data.chat_template: {value!r} is neither a template file nor a named template "
                                f"({', '.join(sorted(NAMED_TEMPLATES))})")
    return path.read_text()


def apply_chat_template(tokenizer, value: str = ""):
    """Give ``tokenizer`` the chat template ``value`` (a name or a file; "" keeps its own).
    ``tokenizer.save_pretrained`` then writes it with the model, so later stages find it."""
    if value:
        if value in NAMED_TEMPLATES:
            _check_named_tokens(tokenizer, value)
        tokenizer.chat_template = resolve_chat_template(value)
    return tokenizer


_NAMED_TOKENS = {"chatml": ("<|im_start|>", "<|im_end|>")}


def _check_named_tokens(tokenizer, name: str) -> None:
    """A named template's markers must be single tokens of the vocabulary: a marker the tokenizer
    splits into pieces (a base model without ChatML's tokens) is no end-of-turn token, so the model
    could never learn to stop and rollouts would never stop."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    missing = [t for t in _NAMED_TOKENS.get(name, ()) if t not in vocab]
    if missing:
        pieces = len(tokenizer(missing[-1], add_special_tokens=False)["input_ids"])
        raise ValueError(f"data.chat_template: {name} needs {' and '.join(_NAMED_TOKENS[name])} as tokens of this "
                         f"tokenizer's vocabulary, and it splits {missing[-1]} into {pieces} pieces (the model could "
                         "not learn to stop); give a Jinja template file that ends each reply with the tokenizer's "
                         f"eos {tokenizer.eos_token!r}")


def require_chat_template(tokenizer) -> None:
    """Raise `MissingChatTemplate`, naming the config key that fixes it, for a template-less tokenizer."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "this model"
        raise MissingChatTemplate(f"{name} has no chat template (a base model?): in sft, rm, dpo and pm set "
                                  "data.chat_template to a Jinja template file or to one of: "
                                  f"{', '.join(sorted(NAMED_TEMPLATES))}; ppo, grpo, rloo, online-dpo and eval take "
                                  "the template from the model: start from a model trained so (it saves the template)")


_markers_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _template_markers(tokenizer) -> tuple[str, ...]:
    """The special tokens the chat template writes itself (``<|im_start|>``, ``<|im_end|>``...)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    try:
        cached = _markers_cache.get(tokenizer)
    except TypeError:
        cached = None
    if cached is not None and cached[0] == template:
        return cached[1]
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    specials |= {t.content for t in decoder.values() if getattr(t, "special", False)}
    markers = tuple(sorted(t for t in specials if t and isinstance(template, str) and t in template))
    try:
        _markers_cache[tokenizer] = (template, markers)
    except TypeError:
        pass
    return markers


def check_not_rendered(tokenizer, messages: list[dict], origin, field: str) -> None:
    """Text that already holds the template's control tokens (a dataset rendered with
    ``apply_chat_template(tokenize=False)``) would be wrapped a second time, its markers read as
    real turn boundaries: refused, naming the token."""
    markers = _template_markers(tokenizer)
    for m in messages:
        hit = next((t for t in markers if t in m["content"]), None)
        if hit is not None:
            raise DataError.at(origin, field, f"the text holds the chat template's control token {hit!r}: it looks "
                                              "rendered with the template already; give plain text or messages, and "
                                              "rlhfkit applies the template")
