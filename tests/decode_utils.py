"""Shared by the decoding tests: a tiny model whose every token depends on its context."""

from __future__ import annotations

import torch


def context_dependent(model):
    """`model` with its matrices redrawn larger (std 0.2, the embedding 0.5), in eval mode. The
    default initialisation (std 0.02) gives near-uniform logits and outputs that ignore the
    context, so a padding or cache bug would go unnoticed."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "embed" in name else 0.2))
    return model.eval()
