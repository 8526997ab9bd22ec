"""Shared fixtures: the real default tokenizer and tiny random models built from a config."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


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
