"""Model loading (local dir, hub id, GGUF, the built-in default), scalar heads and saving."""

from rlhfkit.models.heads import (
    PACKABLE_POOLINGS,
    POOLINGS,
    backbone_and_head,
    freeze_lower_layers,
    keep_lower_layers,
    last_token_index,
    pooled_features,
    position_ids_from_mask,
    reward_pooling,
    sequence_scores,
    set_reward_pooling,
    token_values,
    unwrap_model,
)
from rlhfkit.models.loading import (
    cache_root,
    check_lora_targets,
    ensure_default_model,
    load_causal_lm,
    load_scalar_model,
    load_tokenizer,
    resolve_model_path,
    tiny_causal_lm,
)
from rlhfkit.models.names import DEFAULT_MODEL, check_model_path, check_policy_path
from rlhfkit.models.saving import save_pretrained_atomic

__all__ = [
    "DEFAULT_MODEL", "cache_root", "check_lora_targets", "check_model_path", "check_policy_path",
    "ensure_default_model", "load_causal_lm",
    "load_scalar_model", "load_tokenizer", "resolve_model_path", "save_pretrained_atomic", "tiny_causal_lm",
    "last_token_index", "position_ids_from_mask", "token_values", "sequence_scores", "backbone_and_head",
    "unwrap_model", "POOLINGS", "PACKABLE_POOLINGS", "freeze_lower_layers", "keep_lower_layers", "pooled_features", "reward_pooling", "set_reward_pooling",
]
