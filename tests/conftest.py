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
