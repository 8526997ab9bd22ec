"""Toy rows and configs shared by the SFT and reward-model trainer tests (tiny random models)."""

from __future__ import annotations

import json
import random

from rlhfkit.config import load_config

COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown"]
# held-out rows name colours no training row names: a learning test measures what carries over
HELD_OUT_COLORS = ["grey", "gold", "silver"]


def _colors(held_out: bool) -> list[str]:
    return HELD_OUT_COLORS if held_out else COLORS


def sft_rows(n, seed, held_out=False):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        c = rng.choice(_colors(held_out))
        rows.append({"prompt": f"Repeat the colour: {c}", "response": f"The colour is {c}."})
    return rows


def trainer_cfg(cls, tmp_path, model_dir, train, eval_, **over):
    data = {"model": {"name": str(model_dir)},
            "data": {"train": str(train), "eval": str(eval_), "max_length": 96},
            "train": {"output_dir": str(tmp_path / "run"), "batch_size": 8, "micro_batch_size": 8,
                      "progress": False, "seed": 0},
            "optim": {"lr": 3e-3, "warmup_ratio": 0.0, "schedule": "constant"}}
    for k, v in over.items():  # section__key=value, or a top-level key=value
        sec, _, key = k.partition("__")
        if key:
            data.setdefault(sec, {})[key] = v
        else:
            data[sec] = v
    return load_config(cls, data=data)


def read_metrics(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def pref_rows(n, seed, held_out=False):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        c = rng.choice(_colors(held_out))
        rows.append({"prompt": f"Describe something {c}.", "chosen": f"It is a wonderful {c} thing, I love it.",
                     "rejected": f"It is a terrible {c} thing, I hate it.",
                     "category": "even" if i % 2 == 0 else "odd"})
    return rows
