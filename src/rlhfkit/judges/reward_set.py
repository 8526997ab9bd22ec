"""Several reward functions with weights, combined into one score per response.

    rewards = build_reward_set([
        "task:arithmetic",                                  # weight 1, named "task:arithmetic"
        {"spec": "my_rewards:brevity", "weight": 0.1},      # named "brevity"
        {"spec": no_chinese, "weight": 0.5, "name": "lang"},  # a Python function
    ])
    out = rewards.score(prompts, responses, messages=msgs, fields=[item.fields for item in rows])
    out.per_function   # (B, F) float64, NaN where a function returned None
    out.combined       # (B,)  sum_f w_f * s_f over the functions that scored the response
    out.metrics()      # {"reward/<name>/mean", "reward/<name>/std", "reward/<name>/scored_frac"}

This is TRL's ``reward_funcs`` + ``reward_weights`` (GRPOTrainer): a function returning None for a
response is left out of that response's sum; ``combine="normalize_then_sum"`` standardises each
function within each prompt's group first (TRL 1.16 ``multi_objective_aggregation``; the math is
in `algos.rewards`). A response that *no* function scored has no reward at all. TRL logs a warning
and gives it advantage 0; here ``unscorable`` chooses: ``"error"`` (default) stops with a
`RewardFunctionError` naming the response, a number is used as its score, ``"nan"`` leaves NaN
for a trainer that masks such rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from rlhfkit.algos.rewards import COMBINE_MODES, combine_rewards, reward_stats
from rlhfkit.judges.reward_fn import (
    Messages,
    RewardFn,
    RewardFunctionError,
    RewardSpecError,
    default_name,
    field_columns,
)
from rlhfkit.judges.rewards import build_reward_fn, check_reward_spec
from rlhfkit.rollout.prompts import prompt_records

_ENTRY_KEYS = ("spec", "weight", "name")


@dataclass
class RewardScores:
    """The scores of one batch: per function (B, F) and combined (B,)."""

    names: list[str]
    weights: torch.Tensor  # (F,)
    per_function: torch.Tensor  # (B, F) float64, NaN = not scored
    combined: torch.Tensor  # (B,) float64 (NaN for unscorable rows only with unscorable="nan")
    unscorable: torch.Tensor  # (B,) bool: no function scored the row

    def metrics(self, prefix: str = "reward") -> dict[str, float]:
        """Per-function mean / std / fraction scored over this batch (see `reward_metrics`)."""
        return {k: float(v) for k, v in reward_metrics(self.per_function, self.names, prefix).items()}


def reward_metrics(per_function: torch.Tensor, names: Sequence[str], prefix: str = "reward") -> dict[str, torch.Tensor]:
    """``{prefix}/{name}/mean|std|scored_frac`` from (B, F) scores (e.g. gathered from every rank)."""
    stats = reward_stats(per_function)
    return {f"{prefix}/{name}/{k}": stats[k][f] for f, name in enumerate(names) for k in ("mean", "std", "scored_frac")}


class RewardSet:
    """Reward functions with weights and unique names: ``score`` -> `RewardScores`; calling it
    returns the combined scores as a list of floats, like a single `RewardFn`.

    combine: "sum" (weighted sum) or "normalize_then_sum". unscorable: "error", "nan" or a float.
    """

    def __init__(self, fns: Sequence[RewardFn], weights: Sequence[float] | None = None, *,
                 combine: str = "sum", unscorable: str | float = "error"):
        self.fns = list(fns)
        self.weights = _check_set([f.name for f in self.fns], weights, combine, unscorable)
        self.combine, self.unscorable = combine, unscorable

    names = property(lambda self: [f.name for f in self.fns])
    models = property(lambda self: [f.model for f in self.fns if getattr(f, "model", None) is not None])
    # The reward model (rm:) when there is exactly one, for trainers that reuse its weights (critic init).
    model = property(lambda self: self.models[0] if len(self.models) == 1 else None)

    def __repr__(self) -> str:
        parts = ", ".join(f"{f.name}*{w:g}" for f, w in zip(self.fns, self.weights.tolist()))
        return f"RewardSet({parts}, combine={self.combine})"

    def score(self, prompts: Sequence[str], responses: Sequence[str], messages: Sequence[Messages] | None = None,
              fields=None, group_size: int | None = None) -> RewardScores:
        """Score every response with every function and combine. fields: as `judges.field_columns`.
        group_size: responses per prompt (contiguous) for "normalize_then_sum"; None = one group."""
        cols = [f.score(prompts, responses, messages=messages, fields=fields) for f in self.fns]
        per = torch.tensor([[math.nan if s is None else s for s in col] for col in cols],
                           dtype=torch.float64).reshape(len(cols), len(responses)).T  # (B, F)
        combined = combine_rewards(per, self.weights, self.combine, group_size)
        missing = per.isnan().all(dim=1)
        if missing.any():
            if self.unscorable == "error":
                i = int(missing.nonzero()[0])
                raise RewardFunctionError(
                    f"no reward function could score response {i} ({int(missing.sum())} of {len(missing)}): "
                    f"{', '.join(self.names)} all returned None for it (response: {str(responses[i])[:80]!r})")
            if self.unscorable != "nan":
                combined = combined.masked_fill(missing, float(self.unscorable))
        return RewardScores(self.names, self.weights, per, combined, missing)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 messages: Sequence[Messages] | None = None, fields=None) -> list[float]:
        return self.score(prompts, responses, messages=messages, fields=fields).combined.tolist()

    def absolute(self) -> RewardSet:
        """The set whose score of a response does not depend on the other responses it is scored
        with: itself, or with "normalize_then_sum" the weighted sum of the raw scores (held-out
        means, where a batch's z-scores would average to 0 by construction)."""
        if self.combine == "sum":
            return self
        return RewardSet(self.fns, self.weights.tolist(), combine="sum", unscorable=self.unscorable)


def _check_set(names: list, weights, combine: str, unscorable) -> torch.Tensor:
    """Refuse a set with no function, a bad or repeated name, bad weights or modes; its weights."""
    if not names:
        raise RewardSpecError("no reward function given")
    for n in names:
        if not isinstance(n, str) or not n or "/" in n:
            raise RewardSpecError(f"reward name {n!r}: must be a non-empty string without '/' (it names metrics)")
        if names.count(n) > 1:
            raise RewardSpecError(f"two reward functions are named {n!r}: give one a name "
                                  "({'spec': ..., 'name': ...})")
    if combine not in COMBINE_MODES:
        raise RewardSpecError(f"reward combine {combine!r}: expected one of {', '.join(COMBINE_MODES)}")
    if not (unscorable in ("error", "nan") or _is_number(unscorable) and math.isfinite(unscorable)):
        raise RewardSpecError(f"reward unscorable {unscorable!r}: expected 'error', 'nan' or a finite number")
    return _weights(weights, len(names))


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _weights(weights, n: int) -> torch.Tensor:
    if weights is None:
        return torch.ones(n, dtype=torch.float64)
    weights = list(weights)
    if len(weights) != n:
        raise RewardSpecError(f"{len(weights)} reward weights for {n} reward functions")
    for w in weights:
        if not _is_number(w) or not math.isfinite(w):
            raise RewardSpecError(f"reward weight {w!r}: expected a finite number")
    if not any(weights):
        raise RewardSpecError(f"reward weights {weights}: all 0, so every reward would be 0")
    return torch.tensor(weights, dtype=torch.float64)


def build_reward_set(spec_or_list, *, weights: Sequence[float] | None = None, combine: str = "sum",
                     unscorable: str | float = "error", tokenizer=None, device: str | torch.device = "cpu",
                     batch_size: int = 16) -> RewardSet:
    """A `RewardSet` from one source or a list of them.

    Each source is a spec string (``rm:DIR``, ``task:NAME``, ``module:function``,
    ``file.py:function``), a Python callable ``f(prompts, responses, **fields)``, a `RewardFn`, or
    a mapping ``{"spec": <one of those>, "weight": 1.0, "name": ...}``. weights: one per source
    (then no mapping may carry its own). The other arguments: `RewardSet` and `build_reward_fn`.
    """
    entries = _entries(spec_or_list)
    weights = _entry_weights(weights, [w for _, w, _ in entries])
    fns = [build_reward_fn(source, name=name, tokenizer=tokenizer, device=device, batch_size=batch_size)
           for source, _, name in entries]
    return RewardSet(fns, weights, combine=combine, unscorable=unscorable)


def check_reward_set(spec_or_list, *, weights: Sequence[float] | None = None, combine: str = "sum",
                     unscorable: str | float = "error") -> None:
    """Refuse what `build_reward_set` would refuse, without loading a model: each source through
    `check_reward_spec`, then the set's names (as the built functions would be named), weights and
    modes."""
    entries = _entries(spec_or_list)
    for source, _, _ in entries:
        check_reward_spec(source)
    names = [name if name is not None else source.name if isinstance(source, RewardFn) else default_name(source)
             for source, _, name in entries]
    _check_set(names, _entry_weights(weights, [w for _, w, _ in entries]), combine, unscorable)


def check_record_fields(spec_or_list, items: Sequence, source: str, alone: bool = False) -> None:
    """Each reward of a set against the prompt records it will score, before a model loads: a Python
    function whose signature requires a field none of the records has, and a built-in task's judge
    that cannot score them (run once on them with empty responses: arithmetic without, or with an
    unreadable, ``reference``; with ``alone``, a judge used without a set, also one that leaves a
    record unscored). ``items``: `PromptItem`s; ``source``: what they came from, for the message.
    Reward models are not run."""
    if not items:
        return
    texts, messages, fields = [r.text for r in items], [r.messages for r in items], [r.fields for r in items]
    for source_spec, _, _ in _entries(spec_or_list):
        if isinstance(source_spec, str) and source_spec.strip().startswith("rm:"):
            continue
        fn = build_reward_fn(source_spec)  # a module is imported once: `check_reward_spec` has done it
        try:
            if isinstance(source_spec, str) and source_spec.strip().startswith("task:"):
                (fn if alone else fn.score)(texts, [""] * len(items), messages=messages, fields=fields)
            else:
                fn.signature.kwargs(fn.label, texts, messages, field_columns(fields, len(items)))
        except (RewardFunctionError, ValueError) as e:
            raise RewardSpecError(f"{source}: {e}") from None


def check_on_prompts(spec_or_list, key: str, source: str, kind: str, limit: int = 0, alone: bool = False) -> None:
    """`check_record_fields` on the records of the prompt source ``source`` (config key ``key``),
    read without a tokenizer: what a pipeline checks before its first stage. A source that cannot
    be read is skipped here; its own input (`rollout.prompts.prompt_inputs`) says why."""
    if not source:
        return
    try:
        items = prompt_records(source, kind, limit)
    except (ValueError, FileNotFoundError):
        return
    check_record_fields(spec_or_list, items, f"{key} ({source})", alone=alone)


def _entry_weights(weights: Sequence[float] | None, own: list) -> Sequence[float]:
    """``weights`` if given (then no entry may carry its own), else each entry's (1.0 if none)."""
    if weights is not None and any(w is not None for w in own):
        raise RewardSpecError("reward weights given twice: in weights= and in a {'spec', 'weight'} entry")
    return weights if weights is not None else [1.0 if w is None else w for w in own]


def _entries(spec_or_list) -> list[tuple[str | Callable | RewardFn, float | None, str | None]]:
    """(source, weight or None, name or None) of each source: one, or a non-empty list."""
    entries = list(spec_or_list) if isinstance(spec_or_list, (list, tuple)) else [spec_or_list]
    if not entries:
        raise RewardSpecError("no reward function given (an empty list)")
    return [_entry(entry, i) for i, entry in enumerate(entries)]


def _entry(entry, i: int) -> tuple[str | Callable | RewardFn, float | None, str | None]:
    """(source, weight or None, name or None) of one list entry."""
    if not isinstance(entry, Mapping):
        return entry, None, None
    unknown = [k for k in entry if k not in _ENTRY_KEYS]
    if unknown:
        raise RewardSpecError(f"reward {i}: unknown key {unknown[0]!r} (expected {', '.join(_ENTRY_KEYS)})")
    if entry.get("spec") is None:
        raise RewardSpecError(f"reward {i}: 'spec' is missing (a spec string or a function)")
    return entry["spec"], entry.get("weight"), entry.get("name")
