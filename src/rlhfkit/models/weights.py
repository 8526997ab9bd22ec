"""Weights written by ``save_pretrained`` (a full model or a peft adapter), read back into a live model."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def saved_weights(directory: str | Path) -> tuple[dict[str, torch.Tensor], bool]:
    """(tensors, is_adapter): a peft adapter's tensors (its saved names), or a full model's from
    every ``*.safetensors`` file of the directory."""
    directory = Path(directory)
    adapter = directory / ADAPTER_WEIGHTS
    if adapter.is_file():
        return load_file(str(adapter)), True
    state = saved_tensors(directory)
    if not state:
        raise FileNotFoundError(f"{directory}: no safetensors weights")
    return state, False


def saved_tensors(directory: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """A full model directory's tensors whose names start with `prefix`, from every ``*.safetensors``
    file of it; only those tensors are read."""
    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            state.update({k: st.get_tensor(k) for k in st.keys() if k.startswith(prefix)})
    return state


def load_weights_into(model: torch.nn.Module, directory: str | Path) -> None:
    """Copy a saved directory's weights into an unsharded ``model`` (a peft model for an adapter).
    Tied weights saved once (the LM head) are allowed to be missing."""
    state, is_adapter = saved_weights(directory)
    if is_adapter:
        set_peft_model_state_dict(model, state)
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "lm_head" not in k]  # tied embeddings are saved once
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {directory} does not match the model: "
                           f"missing={missing[:5]} unexpected={unexpected[:5]}")
