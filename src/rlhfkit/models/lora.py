"""LoRA through peft: adapters on every trainer, the base model with adapters disabled as reference."""

from __future__ import annotations

import contextlib


def apply_lora(model, section, task_type: str):
    """Wrap ``model`` in a peft LoRA model when ``section.enabled``; return it unchanged otherwise.

    task_type: "CAUSAL_LM" for policies, "SEQ_CLS" for reward / value models (the scalar head is
    trained in full alongside the adapters via ``modules_to_save``).
    """
    if not section.enabled:
        return model
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout,
        target_modules=section.target_modules, task_type=task_type,
        modules_to_save=["score"] if task_type == "SEQ_CLS" else None,
    )
    return get_peft_model(model, cfg)


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
