"""What a built-in task is: prompts (train / held-out), a gold judge, and a simulated annotator.

A task gives everything needed to run RLHF without humans (docs/concepts.md: Simulated human feedback): prompts to sample from, a
gold reward r*(x, a) that nobody trains on, and a Bradley-Terry annotator built on r* whose
noisy labels stand in for human preferences. A run trained on the annotator's labels and
evaluated with r* measures true alignment, and the gap between the learned reward and r*
measures over-optimisation.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

from rlhfkit.tasks.annotator import SimulatedAnnotator


class Task:
    """Base class of the built-in tasks.

    Subclasses set `name`, `default_beta` and implement `_all_prompts` and `gold_scores`.
    A prompt record is ``{"prompt": str, "category": str}`` plus ``"reference": str`` where the
    task has an exact answer. `category` groups prompts (template family / problem type) so that
    reward-model accuracy can be reported per category. The record's fields other than the prompt
    travel with it into the prompts files and reach the gold judge as keyword arguments.
    """

    name: str = ""
    system_prompt: str | None = None  # None: the chat template's own default
    default_beta: float = 5.0  # annotator rationality on this task's gold scale
    verifiable: bool = False  # the gold judge checks an exact answer (1.0 right, 0.0 wrong): a capability probe
    eval_fraction: float = 0.2

    # ---- prompts -----------------------------------------------------------------------------
    def _all_prompts(self) -> list[dict]:
        """Every prompt of the task, in a fixed order, without duplicates."""
        raise NotImplementedError

    def _split(self) -> tuple[list[dict], list[dict]]:
        """(train, eval): a fixed split by a hash of the prompt text.

        Hashing (not a seeded shuffle) makes the split independent of the seed, the Python version
        and the prompt order, so held-out prompts stay held out whoever builds the data.
        """
        if not hasattr(self, "_cached_split"):
            prompts = self._all_prompts()
            ranked = sorted(prompts, key=lambda r: _stable_hash(f"{self.name}:{r['prompt']}"))
            n_eval = int(round(len(ranked) * self.eval_fraction))
            eval_set = {r["prompt"] for r in ranked[:n_eval]}
            self._cached_split = ([r for r in prompts if r["prompt"] not in eval_set],
                                  [r for r in prompts if r["prompt"] in eval_set])
        return self._cached_split

    def train_prompts(self, n: int | None = None, seed: int = 0) -> list[dict]:
        """Training prompts shuffled by `seed` (first `n` of them; all when n is None)."""
        return _take(self._split()[0], n, seed, f"{self.name} train")

    def eval_prompts(self, n: int | None = None, seed: int = 0) -> list[dict]:
        """Held-out prompts, never among the training prompts, shuffled by `seed`."""
        return _take(self._split()[1], n, seed, f"{self.name} eval")

    def messages(self, prompt: str) -> list[dict]:
        """The chat conversation for a prompt (system turn only if the task sets one)."""
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*msgs, {"role": "user", "content": prompt}]

    # ---- judging -----------------------------------------------------------------------------
    def gold_scores(self, prompts: Sequence[str], responses: Sequence[str], **fields) -> list[float | None]:
        """The gold judge r*(x, a): one float per (prompt, response); prompts are plain user text.

        fields: the prompt records' other fields, each a list aligned with the responses (e.g.
        ``reference=[...]``), as a reward function receives them (`judges.rewards.RewardFn`). A
        judge names the fields it reads; None marks a response it cannot score.
        """
        raise NotImplementedError

    def annotator(self, beta: float | None = None, flip_prob: float = 0.0, seed: int = 0) -> SimulatedAnnotator:
        """A simulated human labeller on this task's gold judge (Bradley-Terry on r*; see
        `tasks.annotator`). It calls ``gold_scores(prompts, responses)`` without fields: a judge
        that reads fields (arithmetic) needs them bound, as `tasks.build` does."""
        return SimulatedAnnotator(self.gold_scores, beta=self.default_beta if beta is None else beta,
                                  flip_prob=flip_prob, seed=seed)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big")


def _take(prompts: list[dict], n: int | None, seed: int, what: str) -> list[dict]:
    if n is not None and n > len(prompts):
        raise ValueError(f"asked for {n} {what} prompts but the task has {len(prompts)}")
    out = [dict(r) for r in prompts]
    random.Random(seed).shuffle(out)
    return out if n is None else out[:n]
