"""The environment variables that switch rlhfkit's implementation choices, and their values.

Each is read where it acts (`setting`), and the command line checks all of them before a run
starts (`check`): a value that is not one of the listed ones is an error naming the variable,
not a silent fall-back to the default (``RLHFKIT_DECODE_GEMV=yes`` would leave the timed choice,
and the runs it was meant to make repeatable, as they were).
"""

from __future__ import annotations

import os

# variable -> its values, the default first (unset or empty means the default)
CHOICES: dict[str, tuple[str, ...]] = {
    "RLHFKIT_DECODE_GEMV": ("auto", "1", "0"),  # the few-row decode kernel: timed choice, always, never
    "RLHFKIT_DECODE_FUSED": ("1", "0"),  # the decode step's small operations as numba kernels
    "RLHFKIT_FINAL_LAYER": ("1", "0"),  # the last decoder layer only where its output is read
    "RLHFKIT_MALLOC": ("keep", "default"),  # glibc keeps freed memory in the process, or as it comes
    "RLHFKIT_DEBUG": ("0", "1"),  # the command line shows a traceback instead of one line
}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")  # RLHFKIT_LOG, the default of --log-level
# set by torchrun / accelerate launch: whole numbers
LAUNCHER_INTS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def setting(name: str) -> str:
    """The value of ``name`` (its default when unset or empty); ValueError for one not in `CHOICES`."""
    choices = CHOICES[name]
    value = os.environ.get(name, "").strip().lower() or choices[0]
    if value not in choices:
        raise ValueError(f"environment variable {name}={os.environ[name]!r}: must be one of {', '.join(choices)} "
                         f"(unset means {choices[0]})")
    return value


def check() -> None:
    """Every variable of `CHOICES` that is set has one of its values, RLHFKIT_LOG is a log level and
    the launcher's ranks and sizes are whole numbers (ValueError naming the variable)."""
    for name in CHOICES:
        setting(name)
    level = os.environ.get("RLHFKIT_LOG", "").strip()
    if level and level.upper() not in LOG_LEVELS:
        raise ValueError(f"environment variable RLHFKIT_LOG={level!r}: must be one of {', '.join(LOG_LEVELS)}")
    for name in LAUNCHER_INTS:
        value = os.environ.get(name, "").strip()
        if value and not value.isdigit():
            raise ValueError(f"environment variable {name}={value!r}: must be a whole number (torchrun sets it)")
