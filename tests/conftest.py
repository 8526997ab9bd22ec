"""Shared fixtures: the real default tokenizer and tiny random models built from a config."""

from __future__ import annotations

import contextlib
import os
import sys
import textwrap

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (`make test` runs `-n auto`) each worker takes its share of the cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


def _hf_log_handler_on_the_session_stderr() -> None:
    """transformers' log handler keeps the sys.stderr of the moment it is made. Made here, before
    any test runs; made inside a test that captures stderr (capsys), it would write every later
    warning to that test's closed stream ("Logging error")."""
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers")


_hf_log_handler_on_the_session_stderr()


@pytest.fixture(scope="session")
def tokenizer():
    from rlhfkit.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture()
def tiny_model(tokenizer):
    from rlhfkit.models import tiny_causal_lm

    return tiny_causal_lm(tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer, tmp_path_factory):
    """A tiny random Llama saved as a transformers directory (with the real tokenizer)."""
    from rlhfkit.models import save_pretrained_atomic, tiny_causal_lm

    path = tmp_path_factory.mktemp("tiny") / "model"
    save_pretrained_atomic(tiny_causal_lm(tokenizer, seed=0), tokenizer, path)
    return path


def uninstall(monkeypatch, package: str) -> None:
    """Make ``package`` look not installed for the rest of a test: the package and every submodule
    already imported (by earlier tests in this process) are set to None in sys.modules, so any
    import of them raises ImportError."""
    for name in [m for m in sys.modules if m.startswith(package + ".")] + [package]:
        monkeypatch.setitem(sys.modules, name, None)


@contextlib.contextmanager
def held_by_another_process(path):
    """A process that holds the run directory ``path`` (`training.runlock.hold`) for the block;
    yields it (its pid names it in the refusal)."""
    import subprocess

    holder = subprocess.Popen([sys.executable, "-c", "import sys\nfrom pathlib import Path\n"
                               "from rlhfkit.training.runlock import hold\n"
                               f"hold(Path({str(path)!r}))\nprint('held', flush=True)\nsys.stdin.readline()\n"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.communicate("\n")


def write_jsonl(path, rows):
    import json

    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tiny runs: each of a multi-process test's processes uses one
    (on a shared CPU), and runs one after another only add contention with a second."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def reward_module(tmp_path, monkeypatch):
    """An importable module `my_rewards` with good and bad reward functions."""
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        import math
        def length(prompts, responses):
            return [float(len(r)) for r in responses]
        def too_few(prompts, responses):
            return [1.0] * (len(responses) - 1)
        def boom(prompts, responses):
            raise KeyError("missing label")
        def has_nan(prompts, responses):
            return [math.nan for _ in responses]
        def strings(prompts, responses):
            return ["good" for _ in responses]
        def as_tensor(prompts, responses):
            import torch
            return torch.ones(len(responses))
        def too_many(prompts, responses):
            return [1.0] * (len(responses) + 1)
        def has_inf(prompts, responses):
            return [1.0, math.inf][:len(responses)]
        def minus_inf(prompts, responses):
            return [-math.inf for _ in responses]
        def scalar(prompts, responses):
            return 1.0
        def nothing(prompts, responses):
            pass
        def flags(prompts, responses):
            return [len(r) > 1 for r in responses]
        def bool_tensor(prompts, responses):
            import torch
            return torch.tensor([True] * len(responses))
        def some_none(prompts, responses):
            return [None, 1.0][:len(responses)]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("my_rewards", None)
