"""Files that are whole or absent: JSON and JSON Lines written to a temporary name, then renamed."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch


def to_builtin(v: Any) -> Any:
    """Tensors and NumPy scalars as Python numbers (for JSON)."""
    if isinstance(v, torch.Tensor):
        return v.detach().float().item()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


def write_json_atomic(path: str | Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=to_builtin))
    os.replace(tmp, path)


def write_jsonl_atomic(path: str | Path, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON Lines file; blank lines are skipped."""
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]
