"""What a reward function is to rlhfkit: `RewardFn` (the validated call with the prompt records'
fields), its errors, and the score validator. `judges.rewards` builds RewardFns from config strings
and Python callables; `judges.reward_model` scores with a trained reward model."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from rlhfkit.data import render_ids

Messages = list[dict]
SPEC_FORMS = "rm:DIR, task:NAME, module:function or file.py:function"
# Reward functions receive the prompts and responses under these names: no field may take them.
RESERVED_FIELDS = ("prompts", "responses", "messages")


class RewardFunctionError(RuntimeError):
    """A reward function failed or returned something that is not one number (or None) per response."""


class RewardSpecError(RewardFunctionError, ValueError):
    """A reward spec that cannot be turned into a reward function (bad form, import failure, not a
    reward model). A ValueError too, so callers that validate configs can catch it as one."""


def chat_ids(tokenizer, messages: Messages, add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a conversation rendered with the chat template (`data.render_ids`)."""

    return render_ids(tokenizer, messages, add_generation_prompt=add_generation_prompt)


# --------------------------------------------------------------------------- fields

def field_columns(fields, n: int) -> dict[str, list]:
    """Prompt-record fields for n responses as columns ``{name: [value per response]}``.

    fields: None; columns (a mapping of name -> sequence of n values); or rows (a sequence of n
    mappings, e.g. ``[ex.reward_fields() for ex in examples]``); a field missing from a row is None.
    """
    if fields is None:
        return {}
    if isinstance(fields, Mapping):
        cols = {}
        for k, v in fields.items():
            if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or len(v) != n:
                raise ValueError(f"field {k!r}: expected a list of {n} values (one per response)")
            cols[k] = list(v)
    elif isinstance(fields, Sequence) and not isinstance(fields, (str, bytes)):
        if len(fields) != n:
            raise ValueError(f"fields: {len(fields)} rows for {n} responses")
        names = list(dict.fromkeys(k for row in fields if row for k in row))
        cols = {k: [row.get(k) if row else None for row in fields] for k in names}
    else:
        raise ValueError(f"fields: expected a mapping of columns or a list of rows, got {type(fields).__name__}")
    clash = [k for k in cols if k in RESERVED_FIELDS]
    if clash:
        raise ValueError(f"field {clash[0]!r} is reserved (reward functions receive {', '.join(RESERVED_FIELDS)})")
    return cols


class _Signature:
    """How a reward function is called, from its signature: ``(prompts, responses, ...)`` by
    position, or TRL's ``(completions, ...)`` / ``(prompts, completions, ...)`` by name (a
    parameter named ``completions``); the other parameters are record fields, by name."""

    def __init__(self, fn: Callable, label: str):
        self.takes_all, self.named, self.required, self.by_name, self.prompts = False, (), (), False, False
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):  # some C callables have none: assume (prompts, responses)
            return
        P = inspect.Parameter
        params = list(sig.parameters.values())
        positional = [p for p in params if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
        self.by_name = _trl_form(params, positional)
        if self.by_name:
            rest = [p for p in params if p.kind not in (P.VAR_POSITIONAL, P.VAR_KEYWORD)
                    and p.name not in ("prompts", "completions")]
        else:
            if len(positional) < 2 and not any(p.kind == P.VAR_POSITIONAL for p in params):
                raise RewardSpecError(f"reward function {label} must take (prompts, responses, ...) or TRL's "
                                      f"(completions, ...); its signature is {sig}")
            _check_order(positional[:2], label)
            rest = positional[2:] + [p for p in params if p.kind == P.KEYWORD_ONLY]
        stuck = [p.name for p in rest if p.kind == P.POSITIONAL_ONLY and p.default is P.empty]
        if stuck:
            raise RewardSpecError(f"reward function {label}: parameter {stuck[0]!r} is positional-only; fields "
                                  "are passed by name")
        self.takes_all = any(p.kind == P.VAR_KEYWORD for p in params)
        self.prompts = self.takes_all or "prompts" in sig.parameters
        self.named = tuple(p.name for p in rest if p.kind != P.POSITIONAL_ONLY)
        self.required = tuple(p.name for p in rest if p.kind != P.POSITIONAL_ONLY and p.default is P.empty)

    def call(self, fn: Callable, label: str, prompts: list[str], responses: list[str], messages,
             cols: dict[str, list]):
        """fn called with the prompts, the responses and the fields it takes."""
        if not self.by_name:
            return fn(prompts, responses, **self.kwargs(label, prompts, messages, cols))
        cols = {k: v for k, v in cols.items() if k != "completions"}  # a field of that name: the responses win
        out = self.kwargs(label, prompts, messages, cols)
        return fn(completions=responses, **({"prompts": prompts} if self.prompts else {}), **out)

    def kwargs(self, label: str, prompts: list[str], messages, cols: dict[str, list]) -> dict:
        """The fields the function takes, by name (a required one the records lack is an error)."""
        out = {}
        for k in self.named:
            if k == "messages":
                out[k] = list(messages) if messages is not None else [[{"role": "user", "content": p}]
                                                                      for p in prompts]
            elif k in cols:
                out[k] = cols[k]
            elif k in self.required:
                have = ", ".join(sorted(cols)) or "none"
                raise RewardFunctionError(f"reward function {label} needs the field {k!r}, which the prompt "
                                          f"records do not have (their fields: {have})")
        if self.takes_all:
            out.update({k: v for k, v in cols.items() if k not in out})
        return out


def _trl_form(params: list, positional: list) -> bool:
    """TRL's form, called by name: ``completions`` first, after ``prompts``, or keyword-only (a
    ``completions`` elsewhere, ``f(queries, completions)``, is rlhfkit's positional form)."""
    P = inspect.Parameter
    first = [p.name for p in positional[:2]]
    named = first[:1] == ["completions"] or first == ["prompts", "completions"] or any(
        p.name == "completions" and p.kind == P.KEYWORD_ONLY for p in params)
    return named and not any(p.kind == P.POSITIONAL_ONLY for p in positional[:2])


def _check_order(first_two: list, label: str) -> None:
    """(prompts, responses) are passed by position: a function whose first two parameters are
    named the other way round would silently get each in the other's place."""
    wrong = {0: ("responses", "response", "completion"), 1: ("prompts", "prompt")}
    for i, p in enumerate(first_two):
        if p.name in wrong[i]:
            raise RewardSpecError(f"reward function {label}: parameter {i + 1} is named {p.name!r}, but it is "
                                  f"given the {('prompts', 'responses')[i]} (a function takes (prompts, responses, "
                                  "...) by position, or TRL's completions by name)")


# --------------------------------------------------------------------------- RewardFn

class RewardFn:
    """A validated reward source: ``fn(prompts, responses, messages=None, fields=None)``.

    name: short label (metric names, errors). spec: where it came from (a config string, a
    function's qualified name), shown in errors next to the name when they differ.
    ``score`` returns one float or None per response; calling the RewardFn returns floats and
    treats None as an error (alone, a function must score every response; in a `RewardSet`
    another function may score it).
    """

    def __init__(self, fn: Callable, name: str, spec: str | None = None):
        self.fn = fn
        self.name = name
        self.spec = spec or name
        self.signature = _Signature(fn, self.label)
        if inspect.iscoroutinefunction(fn):
            self.fn = _awaited(fn)

    @property
    def label(self) -> str:
        return self.name if self.spec == self.name else f"{self.name} ({self.spec})"

    def __repr__(self) -> str:
        return f"RewardFn({self.label})"

    def score(self, prompts: Sequence[str], responses: Sequence[str], messages: Sequence[Messages] | None = None,
              fields=None) -> list[float | None]:
        """One float or None per response; fields as in `field_columns`."""
        if isinstance(prompts, str) or isinstance(responses, str):  # a string would be read letter by letter
            raise ValueError("prompts and responses are lists (one prompt per response), got a string: wrap it, "
                             "e.g. [prompt], [response]")
        prompts, responses = list(prompts), list(responses)
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if messages is not None and len(messages) != len(responses):
            raise ValueError(f"{len(messages)} prompt conversations but {len(responses)} responses")
        cols = field_columns(fields, len(responses))
        try:
            out = self.signature.call(self.fn, self.label, prompts, responses, messages, cols)
        except RewardFunctionError:
            raise
        except Exception as e:
            raise RewardFunctionError(f"reward function {self.label} raised {type(e).__name__}: {e}") from e
        return validate_scores(out, len(responses), self.label)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 messages: Sequence[Messages] | None = None, fields=None) -> list[float]:
        scores = self.score(prompts, responses, messages=messages, fields=fields)
        missing = [i for i, s in enumerate(scores) if s is None]
        if missing:
            raise RewardFunctionError(f"reward function {self.label} returned None (cannot score) for response "
                                      f"{missing[0]} ({len(missing)} of {len(scores)}) and no other reward "
                                      "function scores it")
        return scores


def _awaited(fn: Callable) -> Callable:
    """An ``async def`` reward function (e.g. one that calls a remote judge) as a plain one: each
    call runs the coroutine to completion, in a thread of its own when an event loop is already
    running (a notebook)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(fn(*args, **kwargs))
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, fn(*args, **kwargs)).result()

    return run


def validate_scores(out, n: int, label: str) -> list[float | None]:
    """One finite float or None per response, or a RewardFunctionError naming the function."""
    if isinstance(out, torch.Tensor):
        out = out.detach().flatten().tolist()
    elif hasattr(out, "tolist") and not isinstance(out, (str, bytes)):  # numpy arrays
        out = out.tolist()
    if isinstance(out, (str, bytes, dict)) or not isinstance(out, Sequence):
        raise RewardFunctionError(
            f"reward function {label} must return a list of {n} numbers, got {type(out).__name__}")
    if len(out) != n:
        raise RewardFunctionError(f"reward function {label} returned {len(out)} scores for {n} responses")
    scores: list[float | None] = []
    for i, v in enumerate(out):
        if v is None:
            scores.append(None)
            continue
        if isinstance(v, bool) or type(v).__name__ == "bool_":  # True is an int to Python, not a reward
            raise RewardFunctionError(f"reward function {label} returned a bool at index {i} ({v}): return "
                                      "a number, e.g. float(...)")
        if not isinstance(v, numbers.Real):
            raise RewardFunctionError(
                f"reward function {label} returned a non-number at index {i}: {type(v).__name__} {v!r}")
        f = float(v)
        if not math.isfinite(f):
            raise RewardFunctionError(f"reward function {label} returned {f} at index {i} (must be finite; "
                                      "return None for a response it cannot score)")
        scores.append(f)
    return scores


def default_name(spec: str | Callable) -> str:
    """Label of a reward source: the function's name (``module:length`` -> ``length``), ``task:NAME``,
    ``rm:<run name>`` (the directory above ``model/``)."""
    if callable(spec):
        fn = getattr(spec, "func", spec)  # functools.partial
        return getattr(fn, "__name__", type(fn).__name__)
    if spec.startswith("rm:"):
        p = Path(spec[3:].rstrip("/"))
        return f"rm:{p.parent.name if p.name == 'model' and p.parent.name else p.name}"
    if spec.startswith("task:"):
        return spec
    return spec.rpartition(":")[2] or spec


def _qualname(fn: Callable) -> str:
    fn = getattr(fn, "func", fn)
    mod, qual = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{mod}.{qual}" if mod else qual
