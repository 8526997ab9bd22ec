"""LoRA through peft, for every trainer, and what goes with it.

- `apply_lora`: adapters on a policy ("CAUSAL_LM") or on a reward / value model ("SEQ_CLS", whose
  scalar head is trained in full alongside the adapters via ``modules_to_save``).
- `adapters_disabled`: the base model of a peft model, the frozen reference, without a second
  copy of the weights in memory.
- `share_frozen_base`: a second model (PPO's critic started from the policy) made to use the
  very same frozen base tensors as the first; only its adapters and head are its own.
- adapter directories: `adapter_config`, `adapter_base`, `load_adapter_onto`. Loading an adapter
  directory merged into its base is `models.loading.load_merged`; `models.start` has
  `load_for_training` and `merge_adapter` (``rlhfkit merge``).
- `enable_gradient_checkpointing`: the one switch all trainers use (it must keep working when
  every base weight is frozen, as under LoRA).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import torch

ADAPTER_CONFIG = "adapter_config.json"


# Module names of LM heads and input embeddings (Llama, GPT-2, GPT-NeoX, BLOOM, ...).
EMBEDDING_NAMES = {"lm_head", "embed_tokens", "wte", "embed_in", "embed_out", "word_embeddings", "output"}


def tied_embedding_targets(targets, tied: bool, names: list[str] | None = None) -> list[str]:
    """The LoRA targets that name the LM head or input embedding, when the two are one tied matrix
    ("all-linear" leaves the LM head out; a regex string, as peft reads it, is matched against the
    model's module ``names``)."""
    if not tied or targets == "all-linear":
        return []
    if isinstance(targets, str):
        return sorted(n for n in names or [] if re.fullmatch(targets, n) and n.split(".")[-1] in EMBEDDING_NAMES)
    return sorted({str(t) for t in targets if str(t).split(".")[-1] in EMBEDDING_NAMES})


def apply_lora(model, section, task_type: str):
    """Wrap ``model`` in a peft LoRA model when ``section.enabled``; return it unchanged otherwise.

    task_type: "CAUSAL_LM" for policies, "SEQ_CLS" for reward / value models (the scalar head is
    trained in full alongside the adapters via ``modules_to_save``).
    """
    if not section.enabled:
        return model
    from peft import LoraConfig, get_peft_model

    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = out_emb is not None and out_emb.weight is model.get_input_embeddings().weight  # a scorer has no LM head
    if tied_embedding_targets(section.target_modules, tied, [n for n, _ in model.named_modules()]):
        raise ValueError("model.lora.target_modules: this model's LM head and input embedding are one tied "
                         "matrix, and an adapter on it cannot be merged without changing both")

    cfg = LoraConfig(
        r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout,
        target_modules=section.target_modules, task_type=task_type,
        modules_to_save=["score"] if task_type == "SEQ_CLS" else None,
    )
    with _peft_on_transformers5():
        return get_peft_model(model, cfg)


@contextlib.contextmanager
def _peft_on_transformers5():
    """peft 0.21 reads ``model.is_gradient_checkpointing``, which transformers 5 deprecated in favour
    of ``is_activation_checkpointing`` and warns about on every wrap; the value is the same."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
        yield


def is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


@contextlib.contextmanager
def adapters_disabled(model):
    """Run the base model of a peft model (the frozen reference) without a second copy in memory."""
    if is_peft(model):
        with model.disable_adapter():
            yield model
    else:
        yield model


# the float rates modules read for functional dropout (OPT's self.dropout, Llama's attention_dropout, ...)
DROPOUT_RATES = ("dropout", "attention_dropout", "attn_dropout", "hidden_dropout", "activation_dropout",
                 "resid_pdrop", "attn_pdrop", "embd_pdrop", "dropout_rate")


def disable_dropout(model) -> None:
    """Every dropout of ``model`` off, in train mode too (TRL's ``disable_dropout``): each
    ``nn.Dropout`` (LoRA's included) gets p = 0 and each float rate a module reads for functional
    dropout becomes 0. The config is left as it is, so a saved model keeps its rates."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for k in DROPOUT_RATES:
            if isinstance(getattr(m, k, None), float):
                setattr(m, k, 0.0)


def has_dropout(model) -> bool:
    """Whether a forward of ``model`` in train mode drops anything (`disable_dropout` undoes it)."""
    return any((isinstance(m, torch.nn.Dropout) and m.p > 0)
               or any(isinstance(getattr(m, k, None), float) and getattr(m, k) > 0 for k in DROPOUT_RATES)
               for m in model.modules())


def enable_gradient_checkpointing(model) -> None:
    """Recompute activations in the backward pass instead of storing them (memory for compute).

    Non-reentrant checkpointing, and inputs that require grad: with the reentrant variant a
    checkpointed block whose inputs need no gradient (the frozen embeddings of a LoRA model)
    silently returns no gradient for the adapters inside it. Call before `apply_lora`.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # pragma: no cover - older transformers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()
    # config.use_cache stays as it is: every training forward passes use_cache=False itself, and
    # a saved model should not come back with its KV cache switched off for generation.


# --------------------------------------------------------------------------- one copy of the base

def _base_key(name: str) -> str:
    """Parameter name without the peft wrapping: ``base_model.model.`` and ``.base_layer``."""
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def share_frozen_base(model, source) -> int:
    """Point ``model``'s backbone parameters at ``source``'s frozen base tensors; returns how many.

    source: a peft model (e.g. the LoRA actor), its base weights frozen; model: a plain
    transformers model with the same backbone (e.g. the *ForSequenceClassification critic
    loaded from the same weights). Only a backbone whose every parameter has the same name,
    shape, dtype and values is shared, so a model initialised from other weights is left alone
    (returns 0). Call before `apply_lora` on ``model``; its adapters and head stay its own.
    """
    import torch

    if any(p.is_meta for p in (*model.parameters(), *source.parameters())):  # FSDP ranks > 0: nothing loaded
        return 0
    source_prefix = source.get_base_model().base_model_prefix + "."
    model_prefix = model.base_model_prefix + "."
    frozen = {}
    for name, p in source.named_parameters():
        key = _base_key(name)
        if "lora_" in name or p.requires_grad or not key.startswith(source_prefix):
            continue
        frozen[key[len(source_prefix):]] = p
    targets = []
    for mod_name, module in model.named_modules():
        for p_name, p in list(module._parameters.items()):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if p is None or not full.startswith(model_prefix):
                continue
            src = frozen.get(full[len(model_prefix):])
            if src is None or src.shape != p.shape or src.dtype != p.dtype:
                return 0
            targets.append((module, p_name, p, src))
    with torch.no_grad():  # compared one tensor at a time on the source's device
        if not targets or not all(torch.equal(p.to(src.device), src) for _, _, p, src in targets):
            return 0
    for module, p_name, _, src in targets:
        module._parameters[p_name] = src  # the same Parameter object: one tensor, frozen
    return len(targets)


# --------------------------------------------------------------------------- adapter directories

def adapter_config(path: str | os.PathLike) -> dict | None:
    """The adapter_config.json of a peft adapter directory, or None for anything else."""
    f = Path(path) / ADAPTER_CONFIG
    if not f.is_file():
        return None
    try:
        cfg = json.loads(f.read_text())
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{f}: not readable as JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{f}: expected a JSON object (a peft adapter config), got {type(cfg).__name__}")
    return cfg


def adapter_base(path: str | os.PathLike, base: str | None = None) -> str:
    """The base model an adapter was trained on (``base`` overrides what the adapter records)."""
    cfg = adapter_config(path) or {}
    name = base or cfg.get("base_model_name_or_path")
    if not name:
        raise FileNotFoundError(f"{path}: the adapter does not record its base model; pass --base")
    return name


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def tokenizer_source(path: str | os.PathLike) -> str:
    """Where a model's tokenizer is read from: the directory itself, or for a LoRA adapter saved
    without one, its base."""
    p = Path(path).expanduser()
    if adapter_config(p) is not None and not any((p / f).is_file() for f in TOKENIZER_FILES):
        return adapter_base(p)
    return str(path)


def root_model(path: str | os.PathLike, limit: int = 16) -> str:
    """The full model under ``path``: itself, or the base under its chain of adapters (an adapter's
    base may itself be an adapter)."""
    name = str(path)
    for _ in range(limit):
        if adapter_config(name) is None:
            return name
        name = adapter_base(name)
    raise ValueError(f"{path}: more than {limit} adapters chained, each the base of the one before (a cycle?)")


def _peft_config_without_task(path: str | os.PathLike):
    """The adapter's LoraConfig with task_type cleared, so `PeftModel.from_pretrained` builds a
    plain PeftModel around whatever head the base has (it still restores ``modules_to_save``)."""
    from peft import PeftConfig

    cfg = PeftConfig.from_pretrained(str(path))
    cfg.task_type = None
    return cfg


def load_adapter_onto(model, path: str | os.PathLike, trainable: bool = False):
    """``model`` (the adapter's base, already loaded) with the adapter of ``path`` attached."""
    from peft import PeftModel

    with _peft_on_transformers5():
        if trainable:  # keep the task class (PeftModelForCausalLM...): training code relies on it
            return PeftModel.from_pretrained(model, str(path), is_trainable=True)
        return PeftModel.from_pretrained(model, str(path), config=_peft_config_without_task(path))


def is_seq_cls_adapter(path: str | os.PathLike) -> bool:
    cfg = adapter_config(path) or {}
    return cfg.get("task_type") == "SEQ_CLS" or "score" in (cfg.get("modules_to_save") or [])
