"""Reward functions for policy-gradient training, built from one string in the config.

    build_reward_fn("rm:runs/demo/rm/model")        # a trained reward model directory
    build_reward_fn("task:sentiment")                # a built-in task's gold judge
    build_reward_fn("my_rewards:length_bonus")       # a plain Python function in an importable module
    build_reward_fn("rewards.py:reward")             # ... or in a file

Every source becomes a `RewardFn`: called as ``fn(prompts, responses)`` with the prompts as plain
user text, returning one float per response. A plain function never has to be an ``nn.Module``.
A reward model must see exactly the text it was trained on, the chat-template rendering of the
prompt messages plus the assistant response, so RewardFn also accepts ``messages=`` (the prompt
conversations) and passes them to scorers that want them; plain functions never see them.

Every call goes through a validator: a wrong number of scores, a non-number, a nan/inf, or an
exception raised inside becomes a `RewardFunctionError` that names the function. Clipping and the
fixed score for responses without EOS are the trainer's business (they need the EOS flags).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

Messages = list[dict]


class RewardFunctionError(RuntimeError):
    """A reward function failed or returned something that is not one finite number per response."""


def prompt_text(messages: Messages | str) -> str:
    """The plain user text of a prompt: the last user message (or the string itself)."""
    if isinstance(messages, str):
        return messages
    users = [m["content"] for m in messages if m.get("role") == "user"]
    return users[-1] if users else (messages[-1]["content"] if messages else "")


class RewardFn:
    """A validated reward source: ``fn(prompts, responses, messages=None) -> list[float]``.

    name: shown in every error. wants_messages: the wrapped callable takes the prompt conversations
    as a third argument (reward models); otherwise it gets ``(prompts, responses)`` only.
    """

    def __init__(self, fn: Callable, name: str, wants_messages: bool = False):
        self.fn = fn
        self.name = name
        self.wants_messages = wants_messages

    def __repr__(self) -> str:
        return f"RewardFn({self.name})"

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 messages: Sequence[Messages] | None = None) -> list[float]:
        prompts, responses = list(prompts), list(responses)
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        try:
            if self.wants_messages:
                msgs = list(messages) if messages is not None else [[{"role": "user", "content": p}] for p in prompts]
                out = self.fn(prompts, responses, msgs)
            else:
                out = self.fn(prompts, responses)
        except RewardFunctionError:
            raise
        except Exception as e:
            raise RewardFunctionError(
                f"reward function {self.name} raised {type(e).__name__}: {e}") from e
        return _validate(out, len(responses), self.name)


def _validate(out, n: int, name: str) -> list[float]:
    """One finite float per response, or a RewardFunctionError naming the function."""
    if isinstance(out, torch.Tensor):
        out = out.detach().flatten().tolist()
    elif hasattr(out, "tolist") and not isinstance(out, (str, bytes)):  # numpy arrays
        out = out.tolist()
    if isinstance(out, (str, bytes, dict)) or not isinstance(out, Sequence):
        raise RewardFunctionError(
            f"reward function {name} must return a list of {n} numbers, got {type(out).__name__}")
    if len(out) != n:
        raise RewardFunctionError(
            f"reward function {name} returned {len(out)} scores for {n} responses")
    scores = []
    for i, v in enumerate(out):
        if not isinstance(v, numbers.Real):
            raise RewardFunctionError(
                f"reward function {name} returned a non-number at index {i}: {type(v).__name__} {v!r}")
        f = float(v)
        if not math.isfinite(f):
            raise RewardFunctionError(f"reward function {name} returned {f} at index {i} (must be finite)")
        scores.append(f)
    return scores


def chat_ids(tokenizer, messages: Messages, add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a conversation rendered with the chat template (`data.render_ids`)."""
    from rlhfkit.data import render_ids

    return render_ids(tokenizer, messages, add_generation_prompt=add_generation_prompt)


# --------------------------------------------------------------------------- sources

def build_reward_fn(spec: str, *, tokenizer=None, device: str | torch.device = "cpu",
                    batch_size: int = 16) -> RewardFn:
    """Turn a config string into a validated RewardFn.

    spec:
      ``rm:PATH``            a reward model trained by ``rlhfkit rm`` (its run dir or its ``model`` dir),
                             scored in micro-batches of ``batch_size`` without gradients on ``device``;
      ``task:NAME``          the gold judge of built-in task NAME;
      ``module:function``    a function ``reward(prompts, responses) -> list[float]`` in an importable
                             module, or ``path/to/file.py:function`` in a file.
    tokenizer: used by ``rm:`` when the RM directory has no tokenizer of its own.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("reward spec is empty: use rm:DIR, task:NAME, module:function or file.py:function")
    spec = spec.strip()
    if spec.startswith("rm:"):
        return reward_model_fn(spec[3:], tokenizer=tokenizer, device=device, batch_size=batch_size)
    if spec.startswith("task:"):
        return task_reward_fn(spec[5:])
    return python_reward_fn(spec)


def task_reward_fn(name: str) -> RewardFn:
    """The gold judge of a built-in task: ``get_task(name).gold_scores(prompts, responses)``."""
    from rlhfkit.tasks import get_task

    task = get_task(name)
    return RewardFn(task.gold_scores, f"task:{name}")


def python_reward_fn(spec: str) -> RewardFn:
    """``module:function`` or ``path/to/file.py:function`` -> RewardFn."""
    target, sep, func_name = spec.rpartition(":")
    if not sep or not target or not func_name:
        raise ValueError(f"reward spec {spec!r}: expected rm:DIR, task:NAME, module:function or file.py:function")
    if target.endswith(".py") or "/" in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"reward spec {spec!r}: file {path} not found")
        mod_name = f"rlhfkit_user_reward_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ValueError(f"reward spec {spec!r}: cannot import module {target!r}: {e}") from e
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise ValueError(f"reward spec {spec!r}: {target} has no function {func_name!r}")
    return RewardFn(fn, spec)


def find_rm_dir(path: str) -> Path:
    """Accept a reward-model directory or the run directory that holds it in ``model/``; a LoRA
    reward-model adapter (``rlhfkit rm`` with model.lora.enabled) is accepted too and is loaded
    merged into its base (`models.load_scalar_model`)."""
    from rlhfkit.models.lora import adapter_config, is_seq_cls_adapter

    p = Path(path).expanduser()
    if (p / "model" / "config.json").is_file() or (p / "model" / "adapter_config.json").is_file():
        p = p / "model"
    if adapter_config(p) is not None and not (p / "config.json").is_file():
        if not is_seq_cls_adapter(p):
            raise ValueError(f"rm:{path}: {p} is not a reward model (a LoRA adapter of a policy); its scalar "
                             "head would be random. Train one with `rlhfkit rm`.")
        return p
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"rm:{path}: no reward model found (expected a directory with config.json, "
                                "as written by `rlhfkit rm` to OUTPUT_DIR/model)")
    import json

    archs = json.loads((p / "config.json").read_text()).get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ValueError(f"rm:{path}: {p} is not a reward model ({archs or 'no architectures'}); its scalar head "
                         "would be random. Train one with `rlhfkit rm`.")
    return p


def reward_model_fn(path: str, *, tokenizer=None, device="cpu", batch_size: int = 16) -> RewardFn:
    """A frozen Bradley-Terry reward model scoring chat renderings of (prompt messages + response)."""
    from rlhfkit.models import load_scalar_model, load_tokenizer

    rm_dir = find_rm_dir(path)
    if (rm_dir / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(rm_dir)
    if tokenizer is None:
        raise ValueError(f"rm:{path}: the directory has no tokenizer; pass tokenizer=")
    from rlhfkit.models.loading import to_device

    model = to_device(load_scalar_model(rm_dir, pad_token_id=tokenizer.pad_token_id), device)
    model.eval().requires_grad_(False)
    scorer = RewardModelScorer(model, tokenizer, batch_size)
    fn = RewardFn(scorer, f"rm:{path}", wants_messages=True)
    fn.model = model  # exposed so trainers can reuse its weights (e.g. to initialise the critic)
    return fn


class RewardModelScorer:
    """Scores (messages, response) with ``models.sequence_scores``, in micro-batches, without grad."""

    def __init__(self, model, tokenizer, batch_size: int = 16):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = max(1, batch_size)

    def render(self, messages: Messages, response: str) -> list[int]:
        """Token ids exactly as `rlhfkit rm` trained on them (data.tokenize_preference): the prompt
        with its generation header, then the reply up to and including its end-of-turn token
        (the template's trailing newline is not part of it: the score is read at end-of-turn)."""
        from rlhfkit.data import end_of_turn_ids, render_ids, render_prompt_ids

        prompt = render_prompt_ids(self.tokenizer, messages)
        full = render_ids(self.tokenizer, [*messages, {"role": "assistant", "content": response}])
        if full[:len(prompt)] != prompt:  # template not prefix-stable for this reply: score the whole rendering
            return full
        eot = end_of_turn_ids(self.tokenizer)
        reply = full[len(prompt):]
        ends = [j for j, t in enumerate(reply) if t in eot]
        return prompt + (reply[:ends[-1] + 1] if ends else reply)

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str], messages: list[Messages]) -> list[float]:
        from rlhfkit.models import sequence_scores
        from rlhfkit.rollout import left_pad

        device = next(self.model.parameters()).device
        rows = [self.render(m, r) for m, r in zip(messages, responses)]
        scores: list[float] = []
        for i in range(0, len(rows), self.batch_size):
            ids, mask = left_pad(rows[i:i + self.batch_size], self.tokenizer.pad_token_id, device)
            scores += sequence_scores(self.model, ids, mask).float().tolist()
        return scores
