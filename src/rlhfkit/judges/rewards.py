"""Reward functions for policy-gradient training, from a config string or a Python callable.

    build_reward_fn("rm:runs/rm/model")             # a trained reward model directory
    build_reward_fn("task:arithmetic")               # a built-in task's gold judge
    build_reward_fn("my_rewards:length_bonus")       # a plain Python function in an importable module
    build_reward_fn("rewards.py:reward")             # ... or in a file
    build_reward_fn(length_bonus)                    # ... or the function itself

Every source becomes a `RewardFn`, called as ``fn(prompts, responses, messages=None, fields=None)``
with the prompts as plain user text. The wrapped function gets ``(prompts, responses)`` and, as
keyword arguments, the fields of the prompt records that its signature asks for: a parameter
named like a field gets that field, ``**kwargs`` gets every field, a parameter named ``messages``
gets the prompt conversations (reward models need them: they score the chat rendering). Each
field is a list aligned with the responses (None where a record lacks it). So all of these work:

    def length(prompts, responses): ...
    def exact(prompts, responses, reference): ...            # the records' `reference` field
    def anything(prompts, responses, **fields): ...          # every field, TRL style

A function returns one number per response, or None for a response it cannot score. The
validator turns anything else (a wrong count, a string, a bool, nan, inf, an exception inside)
into a `RewardFunctionError` naming the function. Several functions with weights: `RewardSet`
(`judges.reward_set`). Clipping and the fixed score for responses without EOS are the trainer's
business (they need the EOS flags).
"""

from __future__ import annotations

import copy
import difflib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from rlhfkit.data.messages import last_user_text as prompt_text  # the plain user text of a prompt
from rlhfkit.judges.reward_fn import (
    RESERVED_FIELDS,
    SPEC_FORMS,
    RewardFn,
    RewardFunctionError,
    RewardSpecError,
    _qualname,
    chat_ids,
    default_name,
    field_columns,
    validate_scores,
)
from rlhfkit.judges.reward_model import RewardModelScorer, find_rm_dir, reward_model_fn
from rlhfkit.tasks import get_task

# --------------------------------------------------------------------------- sources

def build_reward_fn(spec: str | Callable | RewardFn, *, name: str | None = None, tokenizer=None,
                    device: str | torch.device = "cpu", batch_size: int = 16) -> RewardFn:
    """Turn a config string or a Python callable into a validated RewardFn.

    spec:
      ``rm:PATH``            a reward model trained by ``rlhfkit rm`` (its run dir or its ``model`` dir),
                             scored in micro-batches of ``batch_size`` without gradients on ``device``;
      ``task:NAME``          the gold judge of built-in task NAME;
      ``module:function``    a function ``reward(prompts, responses, **fields)`` in an importable
                             module, or ``path/to/file.py:function`` in a file;
      a callable             such a function itself (a RewardFn passes through, renamed if `name`).
    name: the label in metrics and errors (default: `default_name`).
    tokenizer: used by ``rm:`` when the RM directory has no tokenizer of its own.
    """
    if isinstance(spec, RewardFn):
        if name is None:
            return spec
        spec = copy.copy(spec)  # keeps e.g. the reward model's `.model`
        spec.name = name
        return spec
    if callable(spec):
        if isinstance(spec, torch.nn.Module):
            raise RewardSpecError(f"reward {type(spec).__name__}: a model object is not a reward function; "
                                  "save it and use rm:DIR, or wrap it in a function of (prompts, responses)")
        return RewardFn(spec, name or default_name(spec), _qualname(spec))
    spec = _nonempty(spec)
    if spec.startswith("rm:"):
        fn = reward_model_fn(spec[3:], tokenizer=tokenizer, device=device, batch_size=batch_size)
    elif spec.startswith("task:"):
        fn = task_reward_fn(spec[5:])
    else:
        fn = python_reward_fn(spec)
    if name is not None:
        fn.name = name
    return fn


def check_reward_spec(spec: str | Callable | RewardFn) -> None:
    """Refuse, as `build_reward_fn` would, a bad spec without loading a model: an ``rm:`` path
    that holds no reward model, an unknown ``task:``, a malformed string, and a Python function
    that does not import or does not take (prompts, responses) (its module is imported here, once:
    building it later reuses the module). Commands call it before they write anything or load a
    model."""
    if isinstance(spec, RewardFn) or callable(spec):
        return
    spec = _nonempty(spec)
    if spec.startswith("rm:"):
        find_rm_dir(spec[3:])
    elif spec.startswith("task:"):
        _task(spec[5:])
    else:
        python_reward_fn(spec)


def _nonempty(spec) -> str:
    """The spec stripped; refuses an empty one and a pairwise judge (it scores no single response)."""
    if not isinstance(spec, str):
        raise RewardSpecError(f"reward spec {spec!r}: expected a string ({SPEC_FORMS}) or a Python function, "
                              f"got {type(spec).__name__}")
    if not spec.strip():
        raise RewardSpecError(f"reward spec is empty: use {SPEC_FORMS}, or a Python function")
    spec = spec.strip()
    if spec.split(":", 1)[0] in ("pm", "judge", "annotator"):
        raise RewardSpecError(f"reward spec {spec!r}: a pairwise judge compares two responses and gives no score "
                              f"to one; a pointwise reward is wanted here ({SPEC_FORMS})")
    return spec


def _task(name: str):
    try:
        return get_task(name)
    except ValueError as e:
        raise RewardSpecError(f"reward spec 'task:{name}': {e}") from None


def task_reward_fn(name: str) -> RewardFn:
    """The gold judge of a built-in task: ``get_task(name).gold_scores(prompts, responses, **fields)``."""
    return RewardFn(_task(name).gold_scores, f"task:{name}")


def python_reward_fn(spec: str) -> RewardFn:
    """``module:function`` or ``path/to/file.py:function`` -> RewardFn named after the function. A
    module is looked for on the Python path, then in the working directory."""
    target, sep, func_name = spec.rpartition(":")
    if not sep or not target or not func_name:
        raise RewardSpecError(f"reward spec {spec!r}: expected {SPEC_FORMS}")
    module = _load_file(spec, target) if target.endswith(".py") or "/" in target else _import(spec, target)
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise RewardSpecError(f"reward spec {spec!r}: {target} has no function {func_name!r}")
    return RewardFn(fn, func_name, spec)


def _on_path() -> None:
    """Put the working directory last on the Python path: `rlhfkit` started as a console script
    does not have it (``python -c`` does), and a reward module usually sits there. Last, so that a
    file there never shadows an installed package."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def _import(spec: str, target: str):
    _on_path()
    try:
        return importlib.import_module(target)
    except ImportError as e:
        kinds = difflib.get_close_matches(target, ("rm", "task", "pm", "judge", "annotator"), n=1, cutoff=0.6)
        hint = f"; did you mean {kinds[0]}:{spec.partition(':')[2]}?" if kinds and "." not in target else ""
        raise RewardSpecError(f"reward spec {spec!r}: cannot import module {target!r}: {e}{hint}") from e
    except SyntaxError as e:
        raise RewardSpecError(f"reward spec {spec!r}: {_syntax(e)}") from e
    except Exception as e:  # the module's own top-level code failed
        raise RewardSpecError(f"reward spec {spec!r}: importing {target!r} raised {type(e).__name__}: {e}") from e
    except SystemExit as e:
        raise RewardSpecError(f"reward spec {spec!r}: importing {target!r} called sys.exit({e.code!r}): its "
                              "top-level code runs as a script; put it under `if __name__ == \"__main__\":`") from None


def _load_file(spec: str, target: str):
    """The module of a reward file, executed once per version of the file (path, modification time
    and size) in this process."""
    path = Path(target).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"reward spec {spec!r}: file {path} not found")
    stat = path.stat()
    mod_name = f"rlhfkit_user_reward_{abs(hash((str(path.resolve()), stat.st_mtime_ns, stat.st_size)))}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException as e:
        sys.modules.pop(mod_name, None)
        if isinstance(e, SyntaxError):
            raise RewardSpecError(f"reward spec {spec!r}: {_syntax(e)}") from e
        if isinstance(e, Exception):
            raise RewardSpecError(f"reward spec {spec!r}: loading {path} raised {type(e).__name__}: {e}") from e
        if isinstance(e, SystemExit):  # a script's sys.exit or argparse at top level: not a module to import
            raise RewardSpecError(f"reward spec {spec!r}: loading {path} called sys.exit({e.code!r}): its top-level "
                                  "code runs as a script; put it under `if __name__ == \"__main__\":`") from None
        raise
    return module


def _syntax(e: SyntaxError) -> str:
    return f"syntax error in {e.filename}:{e.lineno}: {e.msg}"


__all__ = ["RESERVED_FIELDS", "RewardFn", "RewardFunctionError", "RewardModelScorer", "RewardSpecError",
           "build_reward_fn", "chat_ids", "check_reward_spec", "default_name", "field_columns", "find_rm_dir",
           "prompt_text", "python_reward_fn", "reward_model_fn", "task_reward_fn", "validate_scores"]
