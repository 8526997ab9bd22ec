"""The numeric keys of every config class, checked by name (`check_numbers`): no non-finite
number anywhere, and the ranges below, so that a trainer's own section gets them without
repeating them."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from rlhfkit.config.errors import ConfigError

# Numeric fields, checked in every config class by name (`check_numbers`), so that a trainer's
# own section gets them without repeating them: no field may be negative but these, ...
SIGNED_FIELDS = {"missing_eos_score", "unscorable", "rsft_min_score"}  # scores, on the reward's scale
# ... these counts must be >= 1 (0 would divide by zero, loop forever or train on nothing) ...
COUNT_FIELDS = {"r", "alpha", "batch_size", "micro_batch_size", "mini_batch_size", "eval_batch_size",
                "scorer_batch_size", "max_length", "max_prompt_length", "max_new_tokens", "n", "ppo_epochs",
                "iterations", "prompts_per_iteration", "log_every", "max_bad_steps"}
ZERO_MEANS_ALL = {("RolloutSection", "micro_batch_size")}  # documented: 0 = all rows at once
# ... these must be > 0 ...
POSITIVE_FIELDS = {"lr", "adam_eps", "beta", "clip_eps", "clip_eps_high", "horizon"}
# ... and these are fractions in [0, 1] (the discount and GAE's lambda).
UNIT_FIELDS = {"gamma", "lam"}


def check_numbers(section: Any, where: str) -> None:
    """Reject non-finite numbers anywhere, negative ones (but SIGNED_FIELDS), zero counts and
    zero rates in one config section (not its sub-sections)."""
    for f in dataclasses.fields(section):
        v = getattr(section, f.name)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        key = f"{where}.{f.name}" if where else f.name
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{key}: must be a finite number, got {v}")
        if v < 1 and f.name in COUNT_FIELDS and (type(section).__name__, f.name) not in ZERO_MEANS_ALL:
            raise ConfigError(f"{key}: must be >= 1, got {v}")
        if v < 0 and f.name not in SIGNED_FIELDS:
            raise ConfigError(f"{key}: must be >= 0, got {v}")
        if v == 0 and f.name in POSITIVE_FIELDS:
            raise ConfigError(f"{key}: must be > 0, got {v}")
        if v > 1 and f.name in UNIT_FIELDS:
            raise ConfigError(f"{key}: must be between 0 and 1, got {v}")
