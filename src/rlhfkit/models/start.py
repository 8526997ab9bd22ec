"""The model a run starts from, and adapter directories made whole.

- `load_for_training`: start from a plain model, or continue training a saved LoRA adapter.
- `merge_adapter`: ``rlhfkit merge``: an adapter directory (peft format, as the trainers save it)
  folded into its base and written as a full model directory.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from rlhfkit.config.errors import under_key
from rlhfkit.models.loading import (
    check_context_length,
    check_lora_targets,
    load_causal_lm,
    load_merged,
    load_scalar_model,
    load_tokenizer,
    save_pretrained_atomic,
    trained_dtype,
)
from rlhfkit.models.names import check_model_path, check_policy_path
from rlhfkit.models.lora import (
    ADAPTER_CONFIG,
    adapter_base,
    adapter_config,
    apply_lora,
    enable_gradient_checkpointing,
    load_adapter_onto,
)

log = logging.getLogger("rlhfkit")


def check_policy_start(model_cfg, tokens: int, key: str, what: str = "") -> None:
    """The policy a trainer starts from, checked from its config.json before anything is written
    or loads: a policy (not a reward model or critic), the modules its LoRA targets, and sequences
    of ``tokens`` within its positions (``key`` the key an error names, ``what`` how the tokens add
    up). Each error names its key."""
    with under_key("model.name"):
        check_policy_path(model_cfg.name)
    with under_key("model.lora.target_modules"):
        check_lora_targets(model_cfg.name, model_cfg.lora)
    with under_key(key):
        check_context_length(model_cfg.name, tokens, what)


def load_for_training(model_cfg, task_type: str = "CAUSAL_LM", pad_token_id: int | None = None):
    """The model a trainer starts from, LoRA-wrapped when ``model_cfg.lora.enabled``.

    With LoRA, an adapter directory of the same task as ``model_cfg.name`` *continues* that
    adapter on its base (the base stays frozen and is what `adapters_disabled` gives back);
    otherwise fresh adapters go on the named model, an adapter directory being merged into a full
    model first (e.g. a reward model started from a LoRA SFT policy).
    Returns (model, base model name if an adapter was continued else None).
    """
    dtype = trained_dtype(model_cfg.dtype, model_cfg.lora.enabled)  # fp32 master weights

    def load(name):
        if task_type == "SEQ_CLS":
            return load_scalar_model(name, dtype, pad_token_id=pad_token_id)
        return load_causal_lm(name, dtype)

    cont = adapter_config(model_cfg.name)
    continued = model_cfg.lora.enabled and cont is not None and cont.get("task_type") == task_type
    model = load(adapter_base(model_cfg.name) if continued else model_cfg.name)
    if model_cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if continued:
        _warn_unused_lora_settings(model_cfg, cont)
        wrapped = load_adapter_onto(model, model_cfg.name, trainable=True)
        for c in wrapped.peft_config.values():  # the base as loaded: an absolute path or a hub id, never
            c.base_model_name_or_path = model.name_or_path  # a path relative to some working directory
        return wrapped, adapter_base(model_cfg.name)
    return apply_lora(model, model_cfg.lora, task_type), None


def _warn_unused_lora_settings(model_cfg, saved: dict) -> None:
    """A continued adapter keeps its own rank, alpha, dropout and target modules: say which of the
    config's model.lora settings that leaves unused."""
    lora = model_cfg.lora
    pairs = [("r", lora.r, saved.get("r")), ("alpha", lora.alpha, saved.get("lora_alpha")),
             ("dropout", lora.dropout, saved.get("lora_dropout")),
             # "all-linear" is saved expanded into the names it found: not comparable as written
             ("target_modules", lora.target_modules, None if lora.target_modules == "all-linear"
              else saved.get("target_modules"))]
    def same(mine, theirs) -> bool:
        return sorted(mine) == sorted(theirs) if isinstance(mine, list) and isinstance(theirs, list) else mine == theirs

    differ = [f"{k} {mine} (the adapter's: {theirs})" for k, mine, theirs in pairs
              if theirs is not None and not same(mine, theirs)]
    if differ:
        log.warning("continuing the LoRA adapter %s with its own settings; model.lora %s not applied",
                    model_cfg.name, "; ".join(differ))


def merge_adapter(path: str | os.PathLike, out_dir: str | os.PathLike, *, base: str | None = None,
                  dtype=None, overwrite: bool = False) -> Path:
    """``rlhfkit merge``: write adapter + base as a full model directory (with the tokenizer).

    The result loads with ``AutoModelForCausalLM.from_pretrained(out_dir)``, or with
    ``AutoModelForSequenceClassification`` for a reward / value model adapter. Written atomically.
    An ``out_dir`` that exists and is not empty is refused unless ``overwrite`` (it is replaced
    whole); one that is, holds or lies inside the adapter or its base is always refused.
    """
    path = Path(path)
    if adapter_config(path) is None:
        raise FileNotFoundError(f"{path}: not a LoRA adapter directory (no {ADAPTER_CONFIG})")
    check_model_path(path)  # its weights read as tensors alone, its base is there
    out = Path(out_dir)
    if not str(out_dir).strip():
        raise ValueError("--out: empty; name the directory the merged model is written to")
    for what, src in (("the adapter being merged", path), ("its base model", Path(adapter_base(path, base)))):
        if src.exists() and (out.resolve() == src.resolve() or out.resolve() in src.resolve().parents
                             or src.resolve() in out.resolve().parents):
            raise ValueError(f"--out {out}: it is, holds or is inside {what} ({src}), which the merge reads; "
                             "choose another directory")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file, not a directory; choose a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out}: exists and is not empty; choose a new directory, or add --overwrite to "
                         "replace it whole")
    tok_src = path if (path / "tokenizer_config.json").is_file() else adapter_base(path, base)
    tokenizer = load_tokenizer(tok_src)
    merged = load_merged(path, base=base, dtype=dtype, pad_token_id=tokenizer.pad_token_id)
    if merged.config.pad_token_id is None:
        merged.config.pad_token_id = tokenizer.pad_token_id
    return save_pretrained_atomic(merged, tokenizer, out_dir)
