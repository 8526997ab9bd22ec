"""Typed configuration: dataclasses, loaded from YAML plus dotted command-line overrides.

Every field is declared once, with its default and a docstring-style comment; loading checks
unknown keys, types and cross-field constraints and reports them as ``file: key.path: problem``
before any model is loaded.

    cfg = load_config(SFTConfig, "configs/sft.yaml", ["optim.lr=1e-5", "train.batch_size=16"])
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A configuration problem, located as ``source: key.path: message``."""


# --------------------------------------------------------------------------- shared sections

@dataclass
class LoraSection:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: Union[str, list] = "all-linear"  # peft's shorthand for every linear layer but the head


@dataclass
class ModelSection:
    name: str = "smollm2-135m-instruct"  # built-in default, a local dir, a .gguf file or a hub id
    dtype: str = "auto"  # auto = fp32 on CPU (no fast bf16 here), bf16 on GPUs that support it
    gradient_checkpointing: bool = False
    lora: LoraSection = field(default_factory=LoraSection)

    def validate(self, where: str) -> None:
        if self.dtype not in ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"):
            raise ConfigError(f"{where}.dtype: unknown dtype {self.dtype!r}")


@dataclass
class OptimSection:
    lr: float = 2e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.03  # fraction of optimizer steps spent warming up linearly
    max_grad_norm: float = 1.0  # 0 disables clipping
    head_lr: float = 0.0  # learning rate of a scalar head (reward model, critic); 0 = same as lr

    def validate(self, where: str) -> None:
        if self.lr <= 0:
            raise ConfigError(f"{where}.lr: must be > 0, got {self.lr}")
        if self.head_lr < 0:
            raise ConfigError(f"{where}.head_lr: must be >= 0 (0 = same as lr), got {self.head_lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"{where}.warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")


@dataclass
class TrainSection:
    output_dir: str = "runs/default"
    seed: int = 0
    epochs: float = 1.0  # may be fractional; max_steps (> 0) wins when set
    max_steps: int = 0
    batch_size: int = 8  # global batch: examples per optimizer step (all ranks, all micro-batches)
    micro_batch_size: int = 8  # examples per forward/backward; accumulation = batch_size / (micro * world)
    eval_every: int = 0  # optimizer steps between held-out evaluations; 0 = at the end only
    save_every: int = 0  # optimizer steps between resumable checkpoints; 0 = only the final model
    keep_checkpoints: int = 2
    log_every: int = 1
    max_bad_steps: int = 3  # consecutive non-finite losses/gradients tolerated before stopping
    resume: bool = False  # continue from the latest complete checkpoint in output_dir
    progress: bool = True
    fsdp: bool = False  # on N processes: shard the trained model with torch FSDP2 instead of DDP replicas
    zero_stage: int = 0  # on N processes: DeepSpeed ZeRO stage 1 (optimizer state) or 2 (+ gradients); 0 = off

    def validate(self, where: str) -> None:
        if self.batch_size < 1 or self.micro_batch_size < 1:
            raise ConfigError(f"{where}.batch_size/micro_batch_size: must be >= 1")
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(
                f"{where}.batch_size: {self.batch_size} is not divisible by micro_batch_size {self.micro_batch_size}")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError(f"{where}.epochs: set epochs > 0 or max_steps > 0")
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"{where}.zero_stage: 0 (off), 1 or 2, got {self.zero_stage} (stage 3 is not supported: "
                              "use train.fsdp=true to shard the weights)")
        if self.zero_stage and self.fsdp:
            raise ConfigError(f"{where}: choose one of fsdp and zero_stage")


@dataclass
class DataSection:
    train: str = ""  # path (.jsonl/.json/.parquet/.csv), "hf:org/name[:split]", or "task:NAME" for built-in data
    eval: str = ""  # held-out set; empty = split eval_fraction off the training data
    eval_fraction: float = 0.05
    max_length: int = 512  # tokens of prompt + response
    truncation: Literal["error", "left", "right"] = "error"
    limit: int = 0  # use only the first N training examples (0 = all)

    def validate(self, where: str) -> None:
        if not self.train:
            raise ConfigError(f"{where}.train: a training data source is required")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"{where}.eval_fraction: must be in [0, 1)")
        if self.max_length < 8:
            raise ConfigError(f"{where}.max_length: must be >= 8")


# --------------------------------------------------------------------------- trainer configs

@dataclass
class SFTConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    packing: bool = False  # pack several short examples per row, attention restricted to each


@dataclass
class RewardConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-5))
    train: TrainSection = field(default_factory=TrainSection)
    use_margin: bool = False  # subtract the example's "margin" field inside the BT sigmoid
    center_rewards_coef: float = 0.0  # optional penalty (r_c + r_r)^2 keeping scores near zero
    # "probe": before fine-tuning, fit the fresh head alone as a linear Bradley-Terry model on the
    # frozen backbone's features of the training pairs (L2 by cross-validation), then fine-tune
    # everything from there (linear probing, then fine-tuning). "random": the usual fresh head.
    head_init: Literal["random", "probe"] = "random"


# --------------------------------------------------------------------------- loading

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert ints to floats where a float is wanted."""
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{source}: {path}: must be one of {list(get_args(tp))}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg, path, source)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{source}: {path}: expected {' or '.join(_type_name(a) for a in get_args(tp))}, "
                          f"got {type(value).__name__} {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {path}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, path, source)
    if tp in (list, dict) or origin in (list, dict):
        want = origin or tp
        if not isinstance(value, want):
            raise ConfigError(f"{source}: {path}: expected {want.__name__}, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {path}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {path}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {path}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {path}: expected a string, got {type(value).__name__} {value!r}")
        return value
    return value


def _build(cls, data: dict, prefix: str, source: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        import difflib

        hint = difflib.get_close_matches(unknown[0], names, n=1)
        extra = f" (did you mean {where}{hint[0]}?)" if hint else ""
        raise ConfigError(f"{source}: {where}{unknown[0]}: unknown key{extra}; known keys: {sorted(names)}")
    kwargs = {}
    for k, v in data.items():
        kwargs[k] = _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k, source)
    return cls(**kwargs)


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        nxt = cur.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
        cur = nxt
    cur[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    out: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(out, key.strip(), value)
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def validate(cfg: Any, prefix: str = "", source: str = "config") -> None:
    """Run every section's ``validate`` (recursively) and the top-level one."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            validate(v, f"{prefix}.{f.name}" if prefix else f.name, source)
    if hasattr(cfg, "validate"):
        try:
            cfg.validate(prefix or "config")
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None, data: dict | None = None):
    """Build a validated ``cls`` from a YAML file, a dict and dotted overrides (applied in that order)."""
    source = str(path) if path else "config"
    raw: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
        raw = loaded
    if data:
        raw = _merge(raw, data)
    if overrides:
        raw = _merge(raw, parse_overrides(overrides))
        source = f"{source} (with overrides)" if path else "command-line overrides"
    cfg = _build(cls, raw, "", source)
    validate(cfg, "", source)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
