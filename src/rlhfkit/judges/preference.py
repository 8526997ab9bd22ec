"""Pairwise judges: the trained preference model, the LLM-as-judge, the simulated annotator (docs/concepts.md: Preference model and LLM-as-judge; Simulated human feedback).

The preference model is the LM itself, fine-tuned as a next-token predictor on

    [CONTEXT] {x} [RESPONSE A] {a1} [RESPONSE B] {a2}   ->   "A" or "B"

(rendered as one user turn with the tokenizer's chat template, plus a one-line question so that
an untrained instruct model, the LLM-as-judge, understands the same prompt). At inference

    P(a1 > a2) = p("A") / (p("A") + p("B"))   at the first assistant position,

scored in both orders and averaged, which removes the position bias that is left:

    P = 0.5 * (P_A(x, a1, a2) + 1 - P_A(x, a2, a1)).

    judge = build_pairwise_judge("pm:runs/pm")                      # trained preference model
    judge = build_pairwise_judge("judge:smollm2-135m-instruct")     # LLM-as-judge, no training
    judge = build_pairwise_judge("annotator:sentiment")             # the simulated human (docs/concepts.md)
    judge.compare(contexts, a1s, a2s) -> list[float]                 # P(a1 > a2)
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from rlhfkit.config import under_key
from rlhfkit.judges.reward_fn import RewardFn
from rlhfkit.judges.rewards import chat_ids, prompt_text
from rlhfkit.models import check_policy_path, load_causal_lm, load_tokenizer
from rlhfkit.models.heads import position_ids_from_mask
from rlhfkit.models.loading import warn_once
from rlhfkit.models.lora import TOKENIZER_FILES, adapter_config, tokenizer_source
from rlhfkit.models.names import DEFAULT_ALIASES, WEIGHT_FILES, resolve_hub_id
from rlhfkit.rollout import left_pad
from rlhfkit.tasks import get_task

log = logging.getLogger("rlhfkit")

QUESTION = "Which response is better? Answer A or B."
LABELS = ("A", "B")


def context_text(messages: list[dict] | str) -> str:
    """The prompt as one string: a single user turn as is, a longer conversation as 'role: text' lines."""
    if isinstance(messages, str):
        return messages
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def pm_prompt(context: str, first: str, second: str) -> str:
    """The pairwise format (docs/concepts.md: Preference model), with the question the LLM-as-judge needs on its own line."""
    return f"[CONTEXT] {context} [RESPONSE A] {first} [RESPONSE B] {second}\n{QUESTION}"


def pm_training_records(examples, seed: int = 0, fit=None) -> list[dict]:
    """Preference pairs -> SFT conversations whose answer is "A" or "B", order randomised per pair
    (so the model cannot learn "the chosen one comes first"). examples: `PreferenceExample`s.
    ``fit(context, first, second, label)``, when given, returns the three texts cut to a length
    budget, or None to drop the pair."""
    rng = random.Random(seed)
    out = []
    for ex in examples:
        chosen_first = rng.random() < 0.5
        first, second = (ex.chosen, ex.rejected) if chosen_first else (ex.rejected, ex.chosen)
        label = "A" if chosen_first else "B"
        texts = (context_text(ex.prompt), first, second)
        if fit is not None and (texts := fit(*texts, label)) is None:
            continue
        out.append(pm_record(*texts, label))
    return out


def pm_record(context: str, first: str, second: str, label: str) -> dict:
    """One A/B question and its answer, as an SFT conversation."""
    return {"messages": [{"role": "user", "content": pm_prompt(context, first, second)},
                         {"role": "assistant", "content": label}]}


def average_orders(p_a_forward: torch.Tensor, p_a_swapped: torch.Tensor) -> torch.Tensor:
    """P(a1 > a2) from P("A") with a1 shown first and P("A") with a2 shown first."""
    return 0.5 * (p_a_forward + (1.0 - p_a_swapped))


def label_token_ids(tokenizer) -> tuple[int, int]:
    """Token ids of "A" and "B" *as they appear as the first assistant token* in a rendered chat
    (found by rendering, not by encoding the bare letter: a BPE may merge it with what precedes)."""

    user = [{"role": "user", "content": "?"}]
    prefix = chat_ids(tokenizer, user, add_generation_prompt=True)
    ids = []
    for label in LABELS:
        full = chat_ids(tokenizer, [*user, {"role": "assistant", "content": label}])
        if full[:len(prefix)] != prefix or len(full) <= len(prefix):
            raise ValueError(f"chat template does not render the assistant turn after the generation prompt "
                             f"({tokenizer.name_or_path}); cannot read the {label!r} token")
        ids.append(full[len(prefix)])
    if ids[0] == ids[1]:
        raise ValueError("'A' and 'B' map to the same first token")
    return ids[0], ids[1]


class PairwiseJudge:
    """A causal LM read as a pairwise preference model (trained PM or untrained LLM judge)."""

    def __init__(self, model, tokenizer, batch_size: int = 8, name: str = "pm"):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = max(1, batch_size)
        self.name = name
        self.label_ids = label_token_ids(tokenizer)
        self.calls = 0  # judge forward passes (one per order per pair)
        config = getattr(model, "config", None)
        limit = getattr(getattr(config, "text_config", None) or config, "max_position_embeddings", None)
        self.positions = limit if isinstance(limit, int) else None
        self.warned_long = False

    context = staticmethod(context_text)  # how a prompt (messages) is shown to this judge

    @torch.no_grad()
    def prob_first(self, contexts: Sequence[str], firsts: Sequence[str], seconds: Sequence[str]) -> torch.Tensor:
        """P("A") normalised over {A, B}, in the given order only: (N,)."""

        device = next(self.model.parameters()).device
        rows = [chat_ids(self.tokenizer, [{"role": "user", "content": pm_prompt(c, a, b)}], add_generation_prompt=True)
                for c, a, b in zip(contexts, firsts, seconds)]
        longest = max(map(len, rows), default=0)
        if self.positions is not None and longest > self.positions and not self.warned_long:
            self.warned_long = True  # once per judge: its verdicts on such pairs read past what it was trained on
            log.warning("%s: an A/B question of %d tokens is longer than the judge's %d positions: its verdicts on "
                        "such pairs are unreliable; shorten the responses (rollout.max_new_tokens) or the prompts",
                        self.name, longest, self.positions)
        out = []
        self.model.eval()
        for i in range(0, len(rows), self.batch_size):
            ids, mask = left_pad(rows[i:i + self.batch_size], self.tokenizer.pad_token_id, device)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                                use_cache=False, logits_to_keep=1).logits[:, -1].float()  # (b, V)
            ab = logits[:, list(self.label_ids)]  # (b, 2)
            out.append(ab.softmax(-1)[:, 0])
        self.calls += len(rows)
        return torch.cat(out).cpu() if out else torch.zeros(0)

    def compare(self, contexts: Sequence[str], a1s: Sequence[str], a2s: Sequence[str], fields=None) -> list[float]:
        """P(a1 > a2), averaged over both orders (docs/concepts.md: Preference model); a model
        judge reads the text only (``fields`` is for the annotator's gold judge)."""
        fwd = self.prob_first(contexts, a1s, a2s)
        swp = self.prob_first(contexts, a2s, a1s)
        return average_orders(fwd, swp).tolist()


class AnnotatorJudge:
    """The simulated human (docs/concepts.md: Simulated human feedback): one Bernoulli(s(r*(a1) - r*(a2))) label per comparison, as 1.0 / 0.0.

    Wraps a built-in task's `SimulatedAnnotator`; there is no position bias to average out. Its
    gold judge sees each prompt record's fields (``compare(..., fields=)``: arithmetic's
    ``reference``); two identical responses are a tie (0.5), with no label drawn.
    """

    def __init__(self, task, name: str, seed: int = 0):
        self.gold = RewardFn(task.gold_scores, f"task:{task.name}")
        self.task, self.seed = task, seed
        self.annotator = task.annotator(seed=seed)
        self.name = name
        self.calls = 0

    def restart(self, stream: int = 0) -> None:
        """Draw the labels from the start of stream ``stream`` of the seed: a set of comparisons (one
        policy's against the baseline, a labelled set, online DPO's iteration k) gets the same labels
        whatever was compared before it, in this process or before a resume."""
        self.annotator = self.task.annotator(seed=self.seed if stream == 0 else self.seed * 1_000_003 + stream)

    @staticmethod
    def context(messages) -> str:
        """The gold judge reads the plain user text, as every reward function does."""

        return prompt_text(messages)

    def compare(self, contexts: Sequence[str], a1s: Sequence[str], a2s: Sequence[str],
                fields: Sequence[dict] | None = None) -> list[float]:
        out = [0.5] * len(a1s)
        todo = [i for i, (a, b) in enumerate(zip(a1s, a2s)) if a != b]
        if todo:
            ctx, rows = [contexts[i] for i in todo], fields and [fields[i] for i in todo]
            g1 = self.gold(ctx, [a1s[i] for i in todo], fields=rows)
            g2 = self.gold(ctx, [a2s[i] for i in todo], fields=rows)
            for i, y in zip(todo, self.annotator.labels(g1, g2)):
                out[i] = float(y)
        self.calls += len(todo)
        return out


def build_pairwise_judge(spec: str, *, chat_template: str = "", device="cpu", batch_size: int = 8, seed: int = 0):
    """``pm:DIR`` (trained by ``rlhfkit pm``; a run dir or its model dir), ``judge:MODEL`` (any causal
    LM used untrained) or ``annotator:TASK`` (the task's simulated annotator). A model judge reads
    the text with its own tokenizer; ``chat_template`` (``data.chat_template``) is used only when
    that tokenizer has none (a base model)."""
    kind, target = check_pairwise_spec(spec)
    if kind == "annotator":
        return AnnotatorJudge(get_task(target), spec, seed=seed)
    tok = judge_tokenizer(spec, target, chat_template)
    model = load_causal_lm(target).to(device).eval().requires_grad_(False)
    return PairwiseJudge(model, tok, batch_size=batch_size, name=spec)


def check_pairwise_spec(spec: str) -> tuple[str, str]:
    """(kind, target) of a pairwise judge spec, the target of ``pm:RUN_DIR`` being its model
    directory; refuses, without loading anything, a malformed spec, an unknown task, a ``pm:`` path
    that does not exist, a hub id that is neither cached nor reachable, and a local directory that
    is not a judge: a reward model or critic, or a directory without weights or a tokenizer."""
    kind, _, target = spec.partition(":")
    if kind not in ("pm", "judge", "annotator") or not target:
        raise ValueError(f"pairwise judge {spec!r}: expected pm:DIR, judge:MODEL or annotator:TASK")
    with under_key(f"pairwise judge {spec!r}"):
        if kind == "annotator":
            get_task(target)
            return kind, target
        path = Path(target).expanduser()
        if kind == "pm" and any((path / "model" / f).is_file() for f in ("config.json", "adapter_config.json")):
            path = path / "model"
            target = str(path)
        if kind == "pm" and not path.exists():
            raise FileNotFoundError(f"{target} does not exist (expected the run directory of `rlhfkit pm`, "
                                    "or its model/)")
        check_policy_path(target)
        if path.is_dir():
            _check_judge_dir(path)
        elif target not in DEFAULT_ALIASES and not target.endswith(".gguf"):
            resolve_hub_id(target)
        if kind == "pm" and not any((d / "pm_config.yaml").is_file() for d in list(path.resolve().parents)[:3]):
            warn_once(f"pm:{target} is not a model of an `rlhfkit pm` run (no pm_config.yaml in its run directory): "
                       "it is used as a trained preference model; an untrained model judges as judge:MODEL")
    return kind, target



_WEIGHT_FILES = (*WEIGHT_FILES, "adapter_model.safetensors", "adapter_model.bin")


def _check_judge_dir(path: Path) -> None:
    if not any((path / f).is_file() for f in _WEIGHT_FILES):
        raise FileNotFoundError(f"{path} has no weights ({', '.join(_WEIGHT_FILES[::2])})")
    if adapter_config(path) is None and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{path} has no tokenizer ({', '.join(TOKENIZER_FILES)}): a judge reads the "
                                "text with its own")


def judge_tokenizer(spec: str, target: str, chat_template: str = ""):
    """The tokenizer a model judge reads with: its own (a LoRA adapter saved without one: its
    base's), with ``chat_template`` only when it has none; refuses, in one line naming the spec, a
    chat template that cannot show where the answer letter goes. Loads no model."""
    source = tokenizer_source(target)
    with under_key(f"pairwise judge {spec!r}"):
        tok = load_tokenizer(source)
        if not tok.chat_template and chat_template:
            tok = load_tokenizer(source, chat_template=chat_template)
        if not tok.chat_template:
            raise ValueError(f"{source} has no chat template (a base model?): the judge asks its question as a chat "
                             "turn; give an instruct model (`rlhfkit pm` also takes data.chat_template)")
        label_token_ids(tok)
    return tok


def is_pairwise_spec(spec: str) -> bool:
    return spec.split(":", 1)[0] in ("pm", "judge", "annotator")


def fields_judge(spec: str) -> str | None:
    """The pointwise reward that reads a judge's prompt-record fields: the spec itself, the simulated
    annotator's task judge (annotator:TASK -> task:TASK), None for a model judge (pm:, judge:)."""
    kind, _, target = spec.partition(":")
    if kind == "annotator":
        return f"task:{target}"
    return None if is_pairwise_spec(spec) else spec
