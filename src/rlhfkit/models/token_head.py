"""A scalar model whose head is a small MLP applied at every token (`algos.token_head`).

The head replaces the ``score`` linear of a ``*ForSequenceClassification`` model; the model's
own forward applies it at every position as it does the linear, so pooling, packing, critics
and data-parallel wrappers see per-token values exactly as before. The head's width is recorded
in ``config.json`` (``reward_head_hidden``): `restore_token_head` rebuilds the head of a loaded
directory and reads its weights from the directory's safetensors files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rlhfkit.models.heads import head_owner, unwrap_model

HEAD_KEY = "reward_head_hidden"  # config.json: the token head's hidden width; absent or 0 means a linear head


class TokenHead(torch.nn.Module):
    """(..., H) -> (..., 1): out(gelu(dense(h)))."""

    def __init__(self, hidden_size: int, width: int, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.dense = torch.nn.Linear(hidden_size, width, dtype=dtype, device=device)
        self.act = torch.nn.GELU()
        self.out = torch.nn.Linear(width, 1, bias=False, dtype=dtype, device=device)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.dense(h)))


def token_head_width(config) -> int:
    """The token head's width a (text) config records; 0 for a linear head."""
    return int(getattr(config, HEAD_KEY, 0) or 0)


def set_token_head(model, width: int) -> TokenHead:
    """Replace the model's linear head by a fresh `TokenHead` of `width` (its dtype and device) and
    record the width in the config, so that ``save_pretrained`` writes a directory
    `restore_token_head` loads back."""
    if width < 1:
        raise ValueError(f"a token head needs a width >= 1, got {width}")
    owner, name = head_owner(model)
    old = getattr(owner, name)
    weight = next(old.parameters())  # (1, H) of a linear head, (width, H) of a token head's first layer
    head = TokenHead(weight.shape[-1], width, dtype=weight.dtype, device=weight.device)
    setattr(owner, name, head)
    setattr(unwrap_model(model).config, HEAD_KEY, width)
    return head


def restore_token_head(model, path: str | Path | None) -> None:
    """For a config that records a token head: rebuild it, and with `path` (a saved directory)
    load its weights from there. A config without one leaves the model as it is."""
    width = token_head_width(unwrap_model(model).config)
    if not width:
        return
    owner, name = head_owner(model)
    head = set_token_head(model, width)
    if path is None:
        return
    prefix = f"{name}."
    state = {k[len(prefix):]: v for k, v in _saved_tensors(Path(path), prefix).items()}
    missing = {k for k, _ in head.named_parameters()} - set(state)
    if missing:
        raise ValueError(f"{path}: config.json records a token head ({HEAD_KEY}={width}) but the weights "
                         f"have no {', '.join(prefix + m for m in sorted(missing))}")
    head.load_state_dict({k: v.to(next(head.parameters()).dtype) for k, v in state.items()}, strict=True)


def _saved_tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose names start with `prefix` in a directory's safetensors file(s)."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    out = {}
    for f in files:
        with safe_open(str(path / f), framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys() if k.startswith(prefix)})
    return out


def stored_token_head_width(name) -> int:
    """The token head's width a saved model directory records (0 for anything that records none:
    a linear RM, a causal LM, a hub id, the default model)."""
    try:
        value = json.loads((Path(str(name)).expanduser() / "config.json").read_text()).get(HEAD_KEY)
    except (OSError, ValueError, AttributeError):
        return 0
    return value if isinstance(value, int) and value > 0 else 0
