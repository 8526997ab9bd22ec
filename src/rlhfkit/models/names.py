"""What a model name refers to, checked without loading anything.

`check_model_path` refuses a name no load could succeed with (a missing .gguf file or directory,
a directory without a model); `check_policy_path` also refuses a reward model or critic where a
policy is wanted; `resolve_hub_id` finds a hub id in the local cache, or says in one line why it
cannot be fetched. Commands call the checks on every model a run will load, before they write
anything; `models.loading.resolve_model_path` calls them before it converts or loads.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from rlhfkit.hub import hub_unreachable
from rlhfkit.models.lora import is_seq_cls_adapter

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_ALIASES = {DEFAULT_MODEL, "default", "smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct@gguf"}


def check_model_path(name: str | os.PathLike) -> None:
    """What `resolve_model_path` can refuse without converting, downloading or loading anything: a
    missing .gguf file, a local directory without a model in it, a path that does not exist (a hub
    id is checked only when it is resolved). Commands call it on every model a run will load later,
    before they write anything."""
    s = str(name)
    if not s.strip():
        raise ValueError("empty; name a model (a directory, a .gguf file, a hub id, or smollm2-135m-instruct)")
    if s in DEFAULT_ALIASES:
        return
    if s.endswith(".gguf"):
        if not Path(s).is_file():
            raise FileNotFoundError(f"GGUF file not found: {s}")
        return
    p = Path(s).expanduser()
    if p.exists():
        if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{p} exists but holds no config.json: not a transformers model directory")
        check_no_custom_code(p)
        if (p / "adapter_config.json").is_file():
            _check_adapter_files(p)
            _check_adapter_base(p)
        elif (p / "config.json").is_file():
            check_model_files(p)
    elif s.startswith((".", "/", "~")) or s.count("/") > 1:
        raise FileNotFoundError(f"model directory not found: {s}")


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_model_files(path: Path) -> None:
    """Refuse a model directory no load could succeed with, reading only small files: a config.json
    that is not a JSON object naming a `model_type`, no weight file (`WEIGHT_FILES`), a safetensors
    file (or shard) whose header does not read (cut short, or not safetensors at all), a pickled
    ``.bin`` (or shard) that is more than tensors; an index naming a shard that is not there."""
    cfg = path / "config.json"
    try:
        config = json.loads(cfg.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise ValueError(f"{cfg}: not readable as JSON ({e.__class__.__name__}: {e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ValueError(f"{cfg}: no model_type: not the config of a transformers model")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise FileNotFoundError(f"{path} has no weights: it holds a config.json but none of "
                                f"{', '.join(WEIGHT_FILES)}")
    single = path / "model.safetensors"
    for shard in [single] if single.is_file() else _shards(path / "model.safetensors.index.json"):
        _check_safetensors(shard)
    if not single.is_file() and not (path / "model.safetensors.index.json").is_file():
        bins = [path / "pytorch_model.bin"] if (path / "pytorch_model.bin").is_file() else \
            _shards(path / "pytorch_model.bin.index.json")
        for pickled in bins:
            _check_pickled_weights(pickled)


def _check_adapter_files(path: Path) -> None:
    """A LoRA adapter directory's weights, as `check_model_files` checks a model's: the
    safetensors header reads, or a legacy ``adapter_model.bin`` loads as weights alone."""
    if (path / "adapter_model.safetensors").is_file():
        _check_safetensors(path / "adapter_model.safetensors")
    elif (path / "adapter_model.bin").is_file():
        _check_pickled_weights(path / "adapter_model.bin")


def _check_adapter_base(path: Path) -> None:
    """An adapter whose recorded base is a local path that is not there (a relative one is read
    from the working directory, as peft reads it) is refused before anything loads."""
    try:
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, RecursionError, AttributeError):
        return  # the loader says what is wrong with the file
    if isinstance(base, str) and base.startswith((".", "/", "~")) and not Path(base).expanduser().exists():
        where = f" (relative to the working directory {os.getcwd()})" if not base.startswith(("/", "~")) else ""
        raise FileNotFoundError(f"{path}: its base model {base}{where} is not there (adapter_config.json "
                                "base_model_name_or_path): put the base there, or set that path to where it is")


def _shards(index: Path) -> list[Path]:
    """The weight files a sharded checkpoint's index names (each must be there)."""
    if not index.is_file():
        return []
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index}: not a weight index (a JSON object with a weight_map; "
                         f"{e.__class__.__name__})") from None
    shards = [index.parent / str(n) for n in names]
    for shard in shards:
        if index.parent.resolve() not in shard.resolve().parents or not shard.is_file():
            raise FileNotFoundError(f"{index}: names {shard.name}, which is not a file in {index.parent}")
    return shards


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def _check_pickled_weights(pickled: Path) -> None:
    """A pickled weight file (``.bin``) loads as tensors alone: a pickle that would build anything
    else is refused, never run (``torch.load(weights_only=True)``)."""
    import zipfile

    import torch

    try:
        with warnings.catch_warnings():  # torch's note on an unusual pickle protocol: the error says it
            warnings.simplefilter("ignore")
            torch.load(pickled, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(pickled))
    except Exception as e:  # UnpicklingError, RuntimeError for a file that is not a torch archive
        raise ValueError(f"{pickled}: not loadable as weights alone ({e.__class__.__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None


def check_no_custom_code(path: Path) -> None:
    """Refuse a model directory whose architecture exists only as Python code shipped with it
    (config.json ``auto_map`` and a ``model_type`` transformers does not know): rlhfkit never runs
    code from a model directory (every load passes ``trust_remote_code=False``)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return
    if not isinstance(config, dict) or not config.get("auto_map"):
        return
    from transformers import CONFIG_MAPPING

    if config.get("model_type") not in CONFIG_MAPPING:
        raise ValueError(f"{path}: its architecture (model_type {config.get('model_type')!r}) is Python code shipped "
                         "with the model (config.json auto_map), and rlhfkit never runs code from a model directory; "
                         "use a model whose architecture transformers has")


def check_policy_path(name: str | os.PathLike) -> None:
    """`check_model_path`, and refuse a local directory that holds a reward model or critic (saved
    as ``*ForSequenceClassification``, or a peft adapter of one) where a policy is wanted: loaded
    as a causal LM it would have a random LM head (or, tied, the embedding's) and train or sample
    without an error."""
    check_model_path(name)
    p = Path(str(name)).expanduser()
    if not p.is_dir():
        return
    if is_seq_cls_adapter(p):
        raise ValueError(f"{p} is not a policy: it is the LoRA adapter of a reward model or critic (task_type "
                         "SEQ_CLS); give a policy's directory (e.g. the model/ of an sft, dpo or ppo run)")
    try:
        config = json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return
    archs = [str(a) for a in (config.get("architectures") or [])] if isinstance(config, dict) else []
    if archs and all(a.endswith(SCALAR_HEADS) for a in archs):
        raise ValueError(f"{p} is not a policy: its config.json says {', '.join(archs)} (a reward model or critic), "
                         "so as a causal LM its LM head would be random; give a policy's directory (e.g. the "
                         "model/ of an sft, dpo or ppo run)")


# Heads that make a directory a scorer, not a policy (`check_policy_path`).
SCALAR_HEADS = ("ForSequenceClassification", "ForTokenClassification")


def resolve_hub_id(repo_id: str) -> str:
    """A hub id's cached snapshot directory, or the id itself when the hub is reachable; a
    FileNotFoundError (one line, what to do) when it is neither: transformers would otherwise
    retry the network for most of a minute before failing with a long traceback."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not in the cache (or not a valid id): only the network can help
        pass
    hint = ("give a local model directory or .gguf file, or the built-in default 'smollm2-135m-instruct'; "
            "or download it where there is network (huggingface-cli download) and copy the cache")
    why = hub_unreachable()
    if why:
        raise FileNotFoundError(f"model {repo_id!r}: not a local path, not in the Hugging Face cache, and {why}: "
                                f"{hint}")
    return repo_id
