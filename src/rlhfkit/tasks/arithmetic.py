"""Task "arithmetic": verifiable problems with an exact-match checker (the RLVR / GRPO setting).

Problems are "What is a + b? Answer with just the number." with two-digit a and b (8,100
problems, 20% held out by hash), in two categories: with and without a carry from the units.
Harder forms start at the floor for a 135M model (a + b - c: 0/60 correct greedy; one-digit
times two-digit: 9/60), so nothing can be learned from them by sampling; a + b starts low
enough to leave room and high enough that GRPO groups of 8 often contain a correct answer.
The gold judge is 1.0 if the last number in the response equals the record's `reference`, else 0.0.

Measured starting accuracy of the default model (smollm2-135m-instruct with its chat template,
greedy, max_new_tokens=48, the first 60 held-out problems): 23.3% (14/60; carry 4%, no carry
36%), measured with

    PYTHONPATH=src python benchmarks/task_baseline.py --task arithmetic --n 60 --temperature 0
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

from rlhfkit.tasks.base import Task

PROMPT = "What is {expr}? Answer with just the number."

# A number: optional minus (not when glued to a word or digit, as in "3-5" or "x-1"), digits with
# optional thousands separators, optional decimals.
_NUMBER = re.compile(r"(?<![\w.])[-\u2212]?\d+(?:,\d{3})*(?:\.\d+)?|\d+(?:,\d{3})*(?:\.\d+)?")


def last_number(text: str) -> float | None:
    """The value of the last number written in `text` ("1,234" -> 1234, "= -42." -> -42), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    s = found[-1].replace(",", "").replace("\u2212", "-")
    try:
        return float(s)
    except ValueError:
        return None


def check_answer(response: str, reference: int | float | str) -> float:
    """1.0 if the last number in the response equals the reference number, else 0.0."""
    try:
        ref = float(str(reference).replace(",", ""))
    except ValueError:
        raise ValueError(f"reference {reference!r} is not a number") from None
    value = last_number(response)
    return float(value is not None and value == ref)


class ArithmeticTask(Task):
    name = "arithmetic"
    default_beta = 10.0  # gold is 0/1: a correct answer is preferred with probability s(10) ~ 1
    verifiable = True

    def _all_prompts(self) -> list[dict]:
        out = []
        for a, b in itertools.product(range(10, 100), repeat=2):
            out.append({"prompt": PROMPT.format(expr=f"{a} + {b}"), "reference": str(a + b),
                        "category": "carry" if a % 10 + b % 10 >= 10 else "no-carry"})
        return out

    def gold_scores(self, prompts: Sequence[str], responses: Sequence[str],
                    reference: Sequence[str | None] | None = None, **fields) -> list[float | None]:
        """1.0 / 0.0 against each prompt record's `reference` (None where a record has none: that
        response is not scored). The prompt text is not read, so any prompts with references work."""
        if reference is None:
            raise ValueError("the arithmetic judge needs the prompt records' 'reference' field (the exact answer); "
                             "`rlhfkit make-data --task arithmetic` writes it")
        return [None if ref is None else check_answer(r, ref) for r, ref in zip(responses, reference)]
