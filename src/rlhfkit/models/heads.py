"""Scalar heads on an LM backbone: per-token values (critic) and per-sequence scores (reward)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from rlhfkit.models.lora import adapter_base, adapter_config


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 mask -> (B, T) position ids counting only real tokens.

    With left padding the first real token must get position 0, exactly as it would without
    padding; otherwise rotary embeddings shift and log-probs differ between padded and unpadded
    copies of the same text (a classic cause of PPO ratios != 1 at the first step).
    """
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask -> (B,) index of the last real token (works for left and right padding)."""
    T = attention_mask.shape[-1]
    flipped = attention_mask.flip(-1).long()
    return (T - 1 - flipped.argmax(-1)).clamp(min=0)


def backbone_and_head(model):
    """Return (backbone, head) of a *ForSequenceClassification model, looking through peft wrappers."""
    owner, name = head_owner(model)
    return getattr(owner, owner.base_model_prefix), getattr(owner, name)


def head_owner(model) -> tuple[torch.nn.Module, str]:
    """(the *ForSequenceClassification module that holds the scalar head, the head's attribute
    name: "score" or "classifier"), looking through data-parallel and peft wrappers."""
    # peft forwards attribute lookups to the wrapped model, so hasattr(PeftModel, "score") is true and
    # base_model_prefix would resolve to the whole *ForSequenceClassification: unwrap it first.
    model = unwrap_model(model)
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    for _ in range(4):
        if hasattr(m, "score") or hasattr(m, "classifier"):
            break
        m = getattr(m, "base_model", None) or getattr(m, "model", None)
        if m is None:
            raise TypeError(f"{type(model).__name__} has no scalar head")
    return m, "score" if getattr(m, "score", None) is not None else "classifier"


def unwrap_model(model):
    """The model inside a DDP / DeepSpeed (``.module``) or FSDP1 wrapper; FSDP2 does not wrap."""
    children = model.__dict__.get("_modules", {})  # not getattr: peft forwards unknown attributes
    for name in ("module", "_fsdp_wrapped_module"):
        if children.get(name) is not None:
            return unwrap_model(children[name])
    return model


def token_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, with_features: bool = False,
                 position_ids: torch.Tensor | None = None, past_key_values=None):
    """(B, T) scalar head output at every position (the critic's V(t); an RM pools them, `sequence_scores`).
    With ``with_features`` also what the head reads at each token, (B, T, H): the last layer's
    features (with a token head reading the input embeddings, those joined to them: `head_reader`).
    position_ids: None to count the real tokens of the (B, T) 0/1 attention_mask; given, the mask
    may be a packed batch's (B, 1, T, T) additive one (`models.packing.packed_token_values`).
    past_key_values: a cache of tokens every row continues (`models.forward.prefix_cache`); the
    values are then those of the (B, T) tokens given.

    The model's own forward runs, and a hook on the head keeps its per-position output (the
    *ForSequenceClassification forward applies the head to every position, then pools one).
    Going through ``model(...)`` rather than calling the backbone and head directly is what lets
    data-parallel wrappers work: DDP all-reduces gradients only for a forward it saw, and
    FSDP/ZeRO-3 gather their shards in forward hooks of the root module.
    """
    _, head = backbone_and_head(model)
    if not has_pad_token(model):
        # The pooling inside forward refuses batches without a pad id; we ignore its pooling
        # anyway, so the (unwrapped) backbone and head are called directly.
        return _token_values_direct(model, input_ids, attention_mask, with_features, position_ids, past_key_values)
    position_ids = position_ids_from_mask(attention_mask) if position_ids is None else position_ids
    with _watching(head) as seen:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
              past_key_values=past_key_values, use_cache=past_key_values is not None)
    values = seen["values"].squeeze(-1).float()  # (B, T)
    return (values, seen["features"]) if with_features else values


def head_reader(head) -> torch.nn.Module:
    """The module whose input is what a scalar head reads at each token: a linear head itself, a
    token head's first layer (`models.token_head.TokenHead.reader`)."""
    return getattr(head, "reader", None) or head


@contextlib.contextmanager
def _watching(head):
    """Inside the block, {"values": the head's last output, "features": its reader's last input}."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [head.register_forward_hook(lambda _m, _args, out: seen.__setitem__("values", out)),
             head_reader(head).register_forward_hook(lambda _m, args, _out: seen.__setitem__("features", args[0]))]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


def has_pad_token(model) -> bool:
    """Whether the model's config names a pad token (its *ForSequenceClassification forward refuses
    batches otherwise)."""
    return getattr(unwrap_model(model).config.get_text_config(), "pad_token_id", None) is not None


def _token_values_direct(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, with_features: bool = False,
                         position_ids: torch.Tensor | None = None, past_key_values=None):
    backbone, head = backbone_and_head(model)
    position_ids = position_ids_from_mask(attention_mask) if position_ids is None else position_ids
    with _watching(head) as seen:
        h = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     past_key_values=past_key_values, use_cache=past_key_values is not None).last_hidden_state
        head(h)
    values = seen["values"].squeeze(-1).float()  # (B, T)
    return (values, seen["features"]) if with_features else values


# How a reward model turns its per-token head outputs into one score. "last": the value at the
# last real token (the usual Bradley-Terry RM, Ouyang et al. 2022). "mean": the mean over the
# response tokens; "mean_all": over all real tokens. A linear head commutes with the mean, so a
# mean-pooled score is the head applied to mean-pooled features: a bag-of-tokens reading of the
# whole response instead of one position's summary of it.
POOLINGS = ("last", "mean", "mean_all")
# Poolings that read the response tokens only, so that responses to one prompt can be scored as one
# packed sequence (the prompt once, `models.packing.pack_groups`); "mean_all" also averages the prompt.
PACKABLE_POOLINGS = ("last", "mean")
# The key in a reward model's config.json that records its pooling (absent means "last"), so
# that every scorer of a saved RM pools the way it was trained.
POOLING_KEY = "reward_pooling"


def reward_pooling(model) -> str:
    """The pooling stored in ``model.config`` (through wrappers), "last" when none is stored."""
    pooling = getattr(unwrap_model(model).config, POOLING_KEY, None) or "last"
    if pooling not in POOLINGS:
        raise ValueError(f"{POOLING_KEY}={pooling!r} in the model config; expected one of {POOLINGS}")
    return pooling


def stored_reward_pooling(name) -> str:
    """The pooling a saved model directory records (its base's, for a LoRA adapter directory);
    "last" for anything that records none (a hub id, a causal LM, the default model)."""
    p = Path(str(name)).expanduser()
    if adapter_config(p):
        return stored_reward_pooling(adapter_base(p))
    try:
        value = json.loads((p / "config.json").read_text()).get(POOLING_KEY)
    except (OSError, ValueError, AttributeError):
        return "last"
    return value if value in POOLINGS else "last"


def set_reward_pooling(model, pooling: str) -> None:
    """Record ``pooling`` in ``model.config`` (saved to config.json with the model)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    setattr(unwrap_model(model).config, POOLING_KEY, pooling)


def pool_mask(attention_mask: torch.Tensor, response_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """(B, T) float weights that average the positions a pooling reads (each row sums to 1).

    "last": one-hot at the last real token; "mean": uniform over response_mask & attention_mask
    (response_mask is required); "mean_all": uniform over the real tokens.
    """
    if pooling == "last":
        w = torch.zeros(attention_mask.shape, dtype=torch.float32, device=attention_mask.device)
        return w.scatter_(1, last_token_index(attention_mask)[:, None], 1.0)
    if pooling == "mean":
        if response_mask is None:
            raise ValueError("pooling 'mean' averages over response tokens: pass response_mask")
        keep = (response_mask.bool() & attention_mask.bool()).float()
    elif pooling == "mean_all":
        keep = attention_mask.float()
    else:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    count = keep.sum(-1, keepdim=True)
    if bool((count == 0).any()):
        raise ValueError(f"pooling {pooling!r}: a row has no token to average over")
    return keep / count


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling: str | None = None,
                    response_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) reward of prompt+response rows: the head's per-token values pooled by ``pooling``
    (None: the model's stored pooling, `reward_pooling`; "last" for models that store none).

    input_ids, attention_mask, response_mask: (B, T), any padding side. response_mask marks the
    response tokens and is needed by "mean" only.
    """
    pooling = pooling or reward_pooling(model)
    return pool_values(token_values(model, input_ids, attention_mask), attention_mask, pooling, response_mask)


def pool_values(values: torch.Tensor, attention_mask: torch.Tensor, pooling: str,
                response_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) per-token head values -> (B,) scores, pooled as `sequence_scores` says."""
    if pooling == "last":  # a gather, not a weighted sum: exactly the value at that position
        return values.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)
    return (values * pool_mask(attention_mask, response_mask, pooling)).sum(-1)


def pooled_features(features: torch.Tensor, attention_mask: torch.Tensor, pooling: str,
                    response_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, H) per-token features -> (B, H) pooled the way `sequence_scores` pools values, so that
    head(pooled_features(h)) == sequence_scores for a linear head (the input of a linear probe)."""
    w = pool_mask(attention_mask, response_mask, pooling).to(features.dtype)  # (B, T)
    return torch.einsum("bt,bth->bh", w, features)


def decoder_layers(backbone, key: str) -> tuple[torch.nn.Module, str]:
    """(module, attribute) of the backbone's list of decoder layers: ``layers`` (Llama, Qwen2,
    Mistral, Gemma, Phi, GPT-NeoX), ``h`` (GPT-2, BLOOM, Falcon) or ``decoder.layers`` (OPT); a
    ValueError naming the config ``key`` that needs it when there is none."""
    for owner, attr in ((backbone, "layers"), (backbone, "h"), (getattr(backbone, "decoder", None), "layers")):
        if owner is not None and isinstance(getattr(owner, attr, None), torch.nn.ModuleList):
            return owner, attr
    raise ValueError(f"{key}: {type(backbone).__name__} has no list of decoder layers (layers, h or decoder.layers); "
                     f"set {key}: 0 for this model")


def freeze_lower_layers(model, n_trainable: int) -> list[str]:
    """Train only the top ``n_trainable`` decoder layers of a scalar model (with the final norm
    and the head): the embeddings and every lower layer stop requiring gradients. Backward then
    stops at the lowest trainable layer, so a step costs one forward plus the top layers' backward.
    Returns the names of the parameters left trainable. n_trainable <= 0 leaves the model as is.
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if n_trainable <= 0:
        return names
    backbone, _ = backbone_and_head(model)
    owner, attr = decoder_layers(backbone, "train_top_layers")
    layers = getattr(owner, attr)
    if n_trainable > len(layers):
        raise ValueError(f"cannot train the top {n_trainable} layers of a {len(layers)}-layer model")
    frozen = {id(p) for layer in layers[:len(layers) - n_trainable] for p in layer.parameters()}
    # what runs before the first layer: token and position embeddings (GPT-2's wpe, OPT's
    # embed_positions), OPT's input projection
    inputs = [m for name, m in backbone.named_modules()
              if isinstance(m, torch.nn.Embedding) or name.split(".")[-1] == "project_in"]
    frozen |= {id(p) for m in [backbone.get_input_embeddings(), *inputs] for p in m.parameters()}
    for p in model.parameters():
        if id(p) in frozen:
            p.requires_grad_(False)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def keep_lower_layers(model, n_layers: int) -> int | None:
    """Cut a scalar model's backbone to its first ``n_layers`` decoder layers: the final norm and
    the head then read layer ``n_layers``'s hidden state, and the config records the new depth, so
    ``save_pretrained`` writes an ordinary ``n_layers``-layer model. Returns the depth before.
    n_layers <= 0 leaves the model as is (any architecture) and returns None."""
    if n_layers <= 0:
        return None
    backbone, _ = backbone_and_head(model)
    owner, attr = decoder_layers(backbone, "backbone_layers")
    layers = getattr(owner, attr)
    depth = len(layers)
    if n_layers > depth:
        raise ValueError(f"backbone_layers: {n_layers}, but the model has {depth} decoder layers")
    setattr(owner, attr, torch.nn.ModuleList(list(layers)[:n_layers]))
    for config in {id(c): c for c in (backbone.config, unwrap_model(model).config)}.values():
        config.num_hidden_layers = n_layers
        if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds (transformers 5)
            config.layer_types = config.layer_types[:n_layers]
    return depth
