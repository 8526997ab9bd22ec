"""Tokenised training examples: which tokens are trained, truncation, and whole datasets.

Labelled tokens: the reply content and the end-of-turn token (``<|im_end|>``), so the model
learns to stop. Template text *after* the end-of-turn token (ChatML's "\\n") is -100: generation
stops at the end-of-turn token, so that newline is never sampled; it is a separator that the
template re-inserts when the conversation continues. The assistant header is prompt (-100).
Where each reply's tokens are: `data.render.assistant_spans`.
"""

from __future__ import annotations

import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

from rlhfkit.data.chat_templates import check_not_rendered, require_chat_template
from rlhfkit.data.errors import DataError
from rlhfkit.data.formats import TOKEN_FIELDS, PreferenceExample, PromptExample, SFTExample
from rlhfkit.data.render import assistant_spans, end_of_turn_ids, render_located, render_reply

log = logging.getLogger("rlhfkit")

IGNORE_INDEX = -100
TRUNCATION_MODES = ("error", "left", "right")


# ------------------------------------------------------------------------------------ statistics

@dataclass
class TruncationStats:
    """Per-dataset counts of what truncation did, for the trainer to report.

    by_source[source] = {"examples", "truncated", "dropped", "tokens_removed"}; "dropped" counts
    examples left with nothing to train on (all labels masked) and removed from the dataset.
    """

    by_source: dict[str, dict[str, int]] = field(default_factory=dict)

    def _row(self, source: str | None) -> dict[str, int]:
        return self.by_source.setdefault(source or "<data>",
                                         {"examples": 0, "truncated": 0, "dropped": 0, "tokens_removed": 0})

    def add(self, source: str | None, removed: int = 0) -> None:
        row = self._row(source)
        row["examples"] += 1
        if removed > 0:
            row["truncated"] += 1
            row["tokens_removed"] += removed

    def drop(self, source: str | None) -> None:
        self._row(source)["dropped"] += 1

    def merge(self, other: TruncationStats) -> TruncationStats:
        for source, counts in other.by_source.items():
            row = self._row(source)
            for k, v in counts.items():
                row[k] += v
        return self

    def _total(self, key: str) -> int:
        return sum(row[key] for row in self.by_source.values())

    @property
    def examples(self) -> int:
        return self._total("examples")

    @property
    def truncated(self) -> int:
        return self._total("truncated")

    @property
    def dropped(self) -> int:
        return self._total("dropped")

    def summary(self) -> str:
        """One line per dataset, e.g. ``train.jsonl: 3/120 truncated (412 tokens removed), 1 dropped``."""
        return "\n".join(f"{src}: {r['truncated']}/{r['examples']} truncated ({r['tokens_removed']} tokens removed), "
                         f"{r['dropped']} dropped" for src, r in self.by_source.items())

    def metrics(self, prefix: str = "data/") -> dict[str, float]:
        n = max(self.examples, 1)
        return {f"{prefix}truncated_frac": self.truncated / n, f"{prefix}dropped": float(self.dropped),
                f"{prefix}tokens_removed": float(self._total("tokens_removed"))}


def _check_mode(truncation: str) -> None:
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")


def _too_long(origin, field: str, n: int, max_length: int, what: str) -> DataError:
    return DataError.at(origin, field, f"{what} is {n} tokens, longer than max_length={max_length} "
                                       "(raise max_length, shorten the example, or set truncation='left'/'right')")


def _too_long_sft(example: SFTExample, n: int, before_reply: int, max_length: int) -> DataError:
    """A prompt/response record names the part that is over: the prompt when it alone (with the
    reply's header) fills max_length, else the response. Any other record names its own field (a
    messages record 'messages'; pm's A/B question, built around the pair, 'chosen')."""
    if example.field in ("response", "completion") and before_reply >= max_length:
        return _too_long(example.origin, "prompt", before_reply, max_length, "the prompt")
    return _too_long(example.origin, example.field, n, max_length, "the conversation")


# ----------------------------------------------------------------------------------- tokenizers

def tokenize_sft(tokenizer, example: SFTExample, max_length: int, truncation: str = "error",
                 stats: TruncationStats | None = None) -> dict[str, list[int]]:
    """-> {"input_ids", "labels"}: labels = token id on every assistant reply token (content and
    end-of-turn token), -100 elsewhere. Every assistant turn of a ``messages`` conversation is
    trained; of a prompt and its response (or completion, or a preference pair's chosen reply) only
    the response: assistant turns inside a multi-turn prompt are context, as the user's are.

    truncation: "error" raises a DataError for sequences over max_length; "left" drops tokens from
    the start (keeps the latest turns), "right" drops them from the end.
    """
    _check_mode(truncation)
    msgs, o = example.messages, example.origin
    if example.token_ids:  # the tokens as sampled (`formats.TOKEN_FIELDS`)
        p, r = (_known_ids(tokenizer, ids, o, key) for ids, key in zip(example.token_ids, TOKEN_FIELDS["sft"]))
        full, labels = p + r, [IGNORE_INDEX] * len(p) + r
    else:
        if example.field == "messages":
            for i, m in enumerate(msgs):
                check_not_rendered(tokenizer, [m], o, f"messages[{i}].content")
        else:  # {"prompt", "response"}: the reply is the last message
            check_not_rendered(tokenizer, msgs[:-1], o, "prompt")
            check_not_rendered(tokenizer, msgs[-1:], o, example.field)
        full, spans = assistant_spans(tokenizer, msgs, o, example.field)
        if example.field != "messages":
            spans = spans[-1:]  # the reply alone: earlier assistant turns belong to the prompt
        labels = [IGNORE_INDEX] * len(full)
        for start, stop in spans:
            labels[start:stop] = full[start:stop]
    removed = max(0, len(full) - max_length)
    if removed:
        if truncation == "error":
            raise _too_long_sft(example, len(full), len(full) - len(r) if example.token_ids else spans[-1][0],
                                max_length)
        keep = slice(removed, None) if truncation == "left" else slice(0, max_length)
        full, labels = full[keep], labels[keep]
    if stats is not None:
        stats.add(o[0], removed)
    return {"input_ids": full, "labels": labels}


def tokenize_preference(tokenizer, example: PreferenceExample, max_length: int, truncation: str = "error",
                        stats: TruncationStats | None = None) -> dict:
    """-> {"prompt_ids", "chosen_ids", "rejected_ids"} (+ "category", "margin" when set).

    chosen_ids are the reply tokens after the generation header, up to and including the
    end-of-turn token, so prompt_ids + chosen_ids is the template rendering of the conversation.
    max_length bounds prompt + each response. Over it, with truncation "left" or "right" (same
    behaviour here): the prompt keeps its end (it is cut from the left, down to no less than
    max_length // 2 tokens), then responses are cut from the right to fit.
    """
    _check_mode(truncation)
    o = example.origin
    if example.token_ids:  # the tokens as sampled (`formats.TOKEN_FIELDS`)
        p, c, r = (_known_ids(tokenizer, ids, o, key) for ids, key in zip(example.token_ids,
                                                                          TOKEN_FIELDS["preference"]))
    else:
        check_not_rendered(tokenizer, example.prompt, o, "prompt")
        for key in ("chosen", "rejected"):
            check_not_rendered(tokenizer, [{"content": getattr(example, key)}], o, key)
        (p, c), (_, r) = (render_reply(tokenizer, example.prompt, getattr(example, key), o, key)
                          for key in ("chosen", "rejected"))
    longest = max(len(c), len(r))
    removed = 0
    if len(p) + longest > max_length:
        if truncation == "error":
            key = "prompt" if len(p) >= max_length else ("chosen" if len(c) >= len(r) else "rejected")
            n = len(p) if key == "prompt" else len(p) + longest
            raise _too_long(o, key, n, max_length, "the prompt" if key == "prompt" else f"prompt + {key}")
        keep = min(len(p), max(max_length - longest, max_length // 2))
        budget = max_length - keep
        removed = (len(p) - keep) + max(0, len(c) - budget) + max(0, len(r) - budget)
        p, c, r = p[len(p) - keep:], c[:budget], r[:budget]
    if stats is not None:
        stats.add(o[0], removed)
    out = {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
    if example.category is not None:
        out["category"] = example.category
    if example.margin is not None:
        out["margin"] = example.margin
    return out


def _known_ids(tokenizer, ids: list[int], origin, key: str) -> list[int]:
    """A record's own token ids, each one the tokenizer knows."""
    size = len(tokenizer)
    bad = next((t for t in ids if t >= size), None)
    if bad is not None:
        raise DataError.at(origin, key, f"token id {bad} is not in the tokenizer's vocabulary of {size}: ids made "
                                        "with another tokenizer?")
    return list(ids)


def tokenize_prompt(tokenizer, example: PromptExample, max_length: int, truncation: str = "error",
                    stats: TruncationStats | None = None) -> dict:
    """-> {"input_ids", "messages", "reference", "meta"}: the rendered prompt with generation header.

    Over max_length, "left" and "right" both keep the end of the prompt (its generation header
    and latest turn); "error" raises.
    """
    _check_mode(truncation)
    o = example.origin
    check_not_rendered(tokenizer, example.prompt, o, "prompt")
    ids = render_located(tokenizer, example.prompt, True, o, "prompt")
    removed = max(0, len(ids) - max_length)
    if removed:
        if truncation == "error":
            raise _too_long(o, "prompt", len(ids), max_length, "the prompt")
        ids = ids[removed:]
    if stats is not None:
        stats.add(o[0], removed)
    return {"input_ids": ids, "messages": example.prompt, "reference": example.reference, "meta": example.meta}


# -------------------------------------------------------------------------------- whole datasets

_KINDS = {"sft": (tokenize_sft, SFTExample), "preference": (tokenize_preference, PreferenceExample),
          "prompt": (tokenize_prompt, PromptExample)}
_worker_tokenizer = None


def _is_empty(feature: dict, kind: str) -> bool:
    if kind == "sft":
        return all(t == IGNORE_INDEX for t in feature["labels"][1:])  # label 0 is never predicted
    if kind == "preference":
        return not feature["chosen_ids"] or not feature["rejected_ids"]
    return not feature["input_ids"]


def _tokenize_chunk(tokenizer, examples, kind, max_length, truncation):
    fn = _KINDS[kind][0]
    stats = TruncationStats()
    features = []
    for ex in examples:
        feat = fn(tokenizer, ex, max_length, truncation, stats)
        if _is_empty(feat, kind):
            stats.drop(ex.origin[0])
        else:
            features.append(feat)
    return features, stats


def _init_worker(tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _worker_chunk(args):
    return _tokenize_chunk(_worker_tokenizer, *args)


def tokenize_dataset(tokenizer, examples: Sequence, kind: str, max_length: int, truncation: str = "error",
                     num_proc: int = 1) -> tuple[list[dict], TruncationStats]:
    """Tokenize every example up front, so that data errors surface before training starts.

    kind: "sft" | "preference" | "prompt". Examples with nothing left to train on after truncation
    are dropped and counted. The first bad example (in dataset order, also with num_proc > 1)
    raises a DataError naming its file, line and field.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {sorted(_KINDS)}, got {kind!r}")
    _check_mode(truncation)
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    require_chat_template(tokenizer)  # once, not as a located error on the first record
    examples = list(examples)
    cls = _KINDS[kind][1]
    for i, ex in enumerate(examples):
        if not isinstance(ex, cls):
            raise TypeError(f"kind={kind!r} expects {cls.__name__}, got {type(ex).__name__} at index {i}")
    if num_proc <= 1 or len(examples) < 4 * num_proc:
        features, stats = _tokenize_chunk(tokenizer, examples, kind, max_length, truncation)
    else:
        n_chunks = 4 * num_proc
        size = -(-len(examples) // n_chunks)
        jobs = [(examples[k:k + size], kind, max_length, truncation) for k in range(0, len(examples), size)]
        features, stats = [], TruncationStats()
        with ProcessPoolExecutor(num_proc, initializer=_init_worker, initargs=(tokenizer,)) as pool:
            for feats, st in pool.map(_worker_chunk, jobs):  # in order: the first error is the first bad example
                features.extend(feats)
                stats.merge(st)
    if examples and not features:
        raise DataError(f"all {len(examples)} examples were dropped by truncation to max_length={max_length}",
                        source=examples[0].origin[0])
    if kind == "sft":
        sampled = any(ex.token_ids for ex in examples)
        _warn_if_nothing_stops(tokenizer, features, examples[0].origin[0] if examples else None, sampled)
    return features, stats


_NO_STOP_WARNED: set[tuple[int, str]] = set()  # (tokenizer, source): a held-out split of the same file warns once


def _warn_if_nothing_stops(tokenizer, features: list[dict], source, sampled: bool = False) -> None:
    """A template whose replies end in no end-of-turn token (`end_of_turn_ids`), or sampled replies
    (``sampled``: records with token ids) that were all cut, train a model that never learns to
    stop, and rollouts would not stop it either: say so once."""
    eot = end_of_turn_ids(tokenizer)
    if (id(tokenizer), str(source)) in _NO_STOP_WARNED:
        return
    if features and not any(t in eot for f in features for t in f["labels"] if t != IGNORE_INDEX):
        _NO_STOP_WARNED.add((id(tokenizer), str(source)))
        names = ", ".join(tokenizer.convert_ids_to_tokens(sorted(eot)))
        fix = ("every reply given as token ids was cut before its end: sample more new tokens" if sampled else
               "use a chat template that closes each reply with one (e.g. the tokenizer's eos "
               f"{tokenizer.eos_token!r})")
        log.warning("%s: no trained reply ends with an end-of-turn token (%s): the model will not learn to stop; %s",
                    source or "<data>", names, fix)

