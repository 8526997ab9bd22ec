"""The last decoder layer run only at the positions whose output is read.

The keys and values of every layer are needed at every position, but the last layer's queries,
its output projection and its MLP only matter where a head reads the result: the response tokens
of a log-prob or value forward, the last token of each sequence for a reward model that reads the
last token. `final_layer_on` swaps the last layer's forward for one that computes keys and values
for the whole row and everything else for the ``read`` positions only, and writes those into its
input (the other positions pass through unchanged, so they hold the previous layer's output and
must not be read). For a reward model that reads the last tokens of 8 sequences in a row of 500
tokens this skips nearly all of one layer: about 1/30 of the products of a 30-layer model.

Used by the one-row forwards (`models.segments.attending`), which know which keys each query may
see; only for decoder layers laid out as Llama's (pre-norm attention and MLP with residuals, no
query/key norms), checked by `supported`; any other layer runs in full.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from rlhfkit import envvars
from rlhfkit.models.heads import unwrap_model

# Decoder layers whose forward is Llama's: residual + attention(input_layernorm(x)), then
# residual + mlp(post_attention_layernorm(x)), rotary embeddings on queries and keys.
LAYOUTS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")
# None: RLHFKIT_FINAL_LAYER decides, read at first use (the command line checks it before anything
# runs); False (or RLHFKIT_FINAL_LAYER=0) runs the last layer in full: benchmarks and tests compare.
ENABLED: bool | None = None


def enabled() -> bool:
    return envvars.setting("RLHFKIT_FINAL_LAYER") == "1" if ENABLED is None else ENABLED


def last_layer(model):
    """The last decoder layer the model's forward runs, or None where it has no ``layers`` list."""
    m = unwrap_model(model)
    m = m.get_base_model() if hasattr(m, "get_base_model") else m
    for module in m.modules():
        layers = getattr(module, "layers", None)
        config = getattr(module, "config", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) and config is not None:
            n = getattr(config, "num_hidden_layers", len(layers))
            return layers[min(n, len(layers)) - 1]
    return None


def supported(layer) -> bool:
    attn = getattr(layer, "self_attn", None)
    return (type(layer).__name__ in LAYOUTS and attn is not None
            and all(hasattr(attn, k) for k in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling"))
            and not hasattr(attn, "q_norm") and not getattr(attn, "sliding_window", None)
            and not (layer.training and getattr(attn, "attention_dropout", 0.0)))


@contextlib.contextmanager
def final_layer_on(model, read: torch.Tensor | None, key_rows: Callable[[torch.Tensor], torch.Tensor]):
    """Inside the block, the model's last decoder layer computes its output only at the (N,)
    positions ``read`` of a one-row forward, each query seeing the keys ``key_rows(read)`` ((N, T)
    bool) allows. No-op where ``read`` is None, the feature is off or the layer is not `supported`."""
    layer = last_layer(model) if enabled() and read is not None else None
    if layer is None or not supported(layer):
        yield
        return
    rotate = sys.modules[type(layer.self_attn).__module__].apply_rotary_pos_emb
    # each position once (several responses' first tokens are predicted from one prompt token):
    # a position copied twice into the output would have its gradient counted twice
    read = torch.unique(read, sorted=True)
    key_mask = key_rows(read)

    def forward(hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
        return restricted_layer(layer, rotate, hidden_states, position_embeddings, read, key_mask)

    layer.forward = forward
    try:
        yield
    finally:
        del layer.forward


def restricted_layer(layer, rotate, hidden: torch.Tensor, position_embeddings, read: torch.Tensor,
                     key_mask: torch.Tensor) -> torch.Tensor:
    """A Llama decoder layer's forward on the (1, T, H) row with outputs at ``read`` only; the
    other positions of the returned row are the input's."""
    if not read.numel():  # nothing is read: the layer's output does not matter
        return hidden
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    picked = x.index_select(1, read)
    q = attn.q_proj(picked).view(1, read.numel(), -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, x.shape[1], -1, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(1, x.shape[1], -1, attn.head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    q, _ = rotate(q, q, cos.index_select(1, read), sin.index_select(1, read))
    k, _ = rotate(k, k, cos, sin)
    mask = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~key_mask, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling,
                                         enable_gqa=q.shape[1] != k.shape[1])
    h = hidden.index_select(1, read) + attn.o_proj(out.transpose(1, 2).reshape(1, read.numel(), -1))
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return hidden.index_copy(1, read, h)
