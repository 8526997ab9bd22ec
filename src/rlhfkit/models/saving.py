"""How models are written: plain transformers (or peft) directories, whole or absent.

Policies load with ``AutoModelForCausalLM.from_pretrained(dir)``, reward and value models with
``AutoModelForSequenceClassification.from_pretrained(dir)``, adapters with peft; every directory
holds the tokenizer and chat template, and a generation config that stops where rollouts stop.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from rlhfkit.data.render import end_of_turn_ids
from rlhfkit.io import as_os_error, make_temp_dir, replace_dir


def stop_like_rollouts(model, tokenizer) -> None:
    """Make ``model.generation_config`` stop where rlhfkit's rollouts stop (the eos and the
    end-of-turn tokens of the vocabulary, `data.render.end_of_turn_ids`) and pad with the
    tokenizer's pad token: transformers' ``generate`` (and servers that read the file) then end a
    reply at the token the model was trained to emit, also after ``data.chat_template`` gave a
    base model a template whose end-of-turn token is not its eos."""
    gen = getattr(model, "generation_config", None)
    if gen is None or not hasattr(tokenizer, "get_vocab"):
        return
    current = gen.eos_token_id if isinstance(gen.eos_token_id, (list, tuple)) else [gen.eos_token_id]
    current = {i for i in current if i is not None}
    stops = sorted(current | set(end_of_turn_ids(tokenizer)))
    if stops and set(stops) != current:
        gen.eos_token_id = stops if len(stops) > 1 else stops[0]
    if gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id


def save_pretrained_atomic(model, tokenizer, out_dir: str | os.PathLike, extra_files: dict[str, str] | None = None) -> Path:
    """Write a transformers/peft directory so that it is either whole or absent (with a tokenizer,
    the generation config stops as rollouts do: `stop_like_rollouts`).

    Everything goes into a temporary sibling directory, which then takes the place of ``out_dir``
    (`io.replace_dir`: an existing directory is moved aside and removed only after the rename).
    """
    out = Path(out_dir)
    if tokenizer is not None:
        stop_like_rollouts(model, tokenizer)
    tmp = make_temp_dir(out)  # the umask's mode, not mkdtemp's 0700
    try:
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            gen = getattr(model, "generation_config", None)
            if hasattr(model, "peft_config") and gen is not None:  # peft writes the adapter alone: the stops too
                gen.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            for fname, text in (extra_files or {}).items():
                (tmp / fname).write_text(text)
        except Exception as e:  # a full disk: an OSError naming the directory (safetensors says it otherwise)
            converted = as_os_error(e, out)
            if converted is e:
                raise
            raise converted from e
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
