"""A scalar model whose head is a small MLP applied at every token (`algos.token_head`).

The head replaces the ``score`` linear of a ``*ForSequenceClassification`` model; the model's
own forward applies it at every position as it does the linear, so pooling, packing, critics
and data-parallel wrappers see per-token values exactly as before. The head's width is recorded
in ``config.json`` (``reward_head_hidden``): `restore_token_head` rebuilds the head of a loaded
directory and reads its weights from the directory's safetensors files.

With ``embeddings`` (``reward_head_embeddings``) the head's first layer also reads each token's own
input embedding, RMS-normalised, next to the last layer's features: W1 [h_t; e_t / rms(e_t)] + b1.
A forward hook on the model's input embeddings keeps their output for the head of the same forward
(`EmbeddingJoin`), so the model's forward, packing and wrappers are unchanged.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from rlhfkit.models.heads import head_owner, unwrap_model
from rlhfkit.models.weights import saved_tensors

HEAD_KEY = "reward_head_hidden"  # config.json: the token head's hidden width; absent or 0 means a linear head
EMBED_KEY = "reward_head_embeddings"  # config.json: true when the token head also reads the input embeddings
_KEPT = "_rlhfkit_embedded"  # where the hook keeps the input embeddings' output until the head takes it


def _keep_output(module, _args, output) -> None:
    """Forward hook on the input embeddings: keep their output for the token head of this forward.
    A module-level function, so a deep copy of the model keeps its hook acting on the copy."""
    module.__dict__[_KEPT] = output


class EmbeddingJoin(torch.nn.Module):
    """(..., H) last-layer features -> (..., H + E): the features, then the same tokens' input
    embeddings divided by their root mean square (the final norm's scale, which the head's first
    layer absorbs, left out)."""

    def __init__(self, embedding: torch.nn.Module, eps: float):
        super().__init__()
        object.__setattr__(self, "embedding", embedding)  # a reference, not a submodule: its weights are the model's
        self.eps = eps
        if not any(hook is _keep_output for hook in embedding._forward_hooks.values()):
            embedding.register_forward_hook(_keep_output)

    def __deepcopy__(self, memo: dict) -> EmbeddingJoin:
        """A copy of the whole model reads the copy's embeddings (copied before the head, which
        follows the backbone); a copy of the head alone, as peft's ``modules_to_save`` makes for a
        LoRA critic's trained head, reads the same model's embeddings, not a detached copy of them."""
        memo.setdefault(id(self.embedding), self.embedding)
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__dict__, memo))
        return new

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        e = self.embedding.__dict__.pop(_KEPT, None)
        if e is None or e.shape[:-1] != h.shape[:-1]:
            raise RuntimeError("a token head reading the input embeddings runs only inside the model's own "
                               "forward, on the positions the embeddings were computed for")
        e = e.float()
        e = e * torch.rsqrt(e.pow(2).mean(-1, keepdim=True) + self.eps)
        return torch.cat([h, e.to(h.dtype)], -1)


class TokenHead(torch.nn.Module):
    """(..., H) -> (..., 1): out(gelu(dense(x))), x = h, or with ``embedding`` [h; e / rms(e)]."""

    def __init__(self, hidden_size: int, width: int, dtype: torch.dtype | None = None, device=None,
                 embedding: torch.nn.Module | None = None, eps: float = 1e-6):
        super().__init__()
        self.join = None if embedding is None else EmbeddingJoin(embedding, eps)
        extra = 0 if embedding is None else embedding.weight.shape[-1]
        self.dense = torch.nn.Linear(hidden_size + extra, width, dtype=dtype, device=device)
        self.act = torch.nn.GELU()
        self.out = torch.nn.Linear(width, 1, bias=False, dtype=dtype, device=device)

    @property
    def reader(self) -> torch.nn.Module:
        """The module whose input is what the head reads at each token (`models.heads.token_values`'s features)."""
        return self.dense

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.dense(h if self.join is None else self.join(h))))


def token_head_width(config) -> int:
    """The token head's width a (text) config records; 0 for a linear head."""
    return int(getattr(config, HEAD_KEY, 0) or 0)


def token_head_embeddings(config) -> bool:
    """Whether a config's token head reads the input embeddings too."""
    return bool(getattr(config, EMBED_KEY, False))


def set_token_head(model, width: int, embeddings: bool = False) -> TokenHead:
    """Replace the model's head by a fresh `TokenHead` of `width` (the old head's dtype and device),
    reading the input embeddings too with `embeddings`, and record both in the config, so that
    ``save_pretrained`` writes a directory `restore_token_head` loads back."""
    if width < 1:
        raise ValueError(f"a token head needs a width >= 1, got {width}")
    owner, name = head_owner(model)
    weight = next(getattr(owner, name).parameters())
    config = unwrap_model(model).config
    text = config.get_text_config()
    head = TokenHead(text.hidden_size, width, dtype=weight.dtype, device=weight.device,
                     embedding=owner.get_input_embeddings() if embeddings else None,
                     eps=getattr(text, "rms_norm_eps", None) or 1e-6)
    setattr(owner, name, head)
    setattr(config, HEAD_KEY, width)
    if embeddings:
        setattr(config, EMBED_KEY, True)
    elif hasattr(config, EMBED_KEY):
        delattr(config, EMBED_KEY)
    return head


def restore_token_head(model, path: str | Path | None) -> None:
    """For a config that records a token head: rebuild it, and with `path` (a saved directory)
    load its weights from there. A config without one leaves the model as it is."""
    width = token_head_width(unwrap_model(model).config)
    if not width:
        return
    owner, name = head_owner(model)
    head = set_token_head(model, width, token_head_embeddings(unwrap_model(model).config))
    if path is None:
        return
    prefix = f"{name}."
    state = {k[len(prefix):]: v for k, v in saved_tensors(path, prefix).items()}
    missing = {k for k, _ in head.named_parameters()} - set(state)
    if missing:
        raise ValueError(f"{path}: config.json records a token head ({HEAD_KEY}={width}) but the weights "
                         f"have no {', '.join(prefix + m for m in sorted(missing))}")
    head.load_state_dict({k: v.to(next(head.parameters()).dtype) for k, v in state.items()}, strict=True)


def stored_token_head(name) -> tuple[int, bool]:
    """(width, reads the embeddings) of the token head a saved model directory records; (0, False)
    for anything that records none: a linear RM, a causal LM, a hub id, the default model."""
    try:
        config = json.loads((Path(str(name)).expanduser() / "config.json").read_text())
        value = config.get(HEAD_KEY)
    except (OSError, ValueError, AttributeError):
        return 0, False
    if not (isinstance(value, int) and value > 0):
        return 0, False
    return value, config.get(EMBED_KEY) is True
