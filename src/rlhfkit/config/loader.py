"""Loading a typed config: YAML, then a dict, then dotted command-line overrides, checked and validated.

Loading checks unknown keys (with a "did you mean" hint), types and cross-field constraints and reports
them as ``file: key.path: problem`` before any model is loaded.

    cfg = load_config(SFTConfig, "configs/sft.yaml", ["optim.lr=1e-5", "train.batch_size=16"])
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from rlhfkit.config.errors import ConfigError


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
        return build(tp, value, path, source)
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


def build(cls, data: dict, prefix: str, source: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
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


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
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
            raise type(e)(f"{source}: {e}") from None  # keeps MissingDependency an ImportError


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
        raw = merge(raw, data)
    if overrides:
        raw = merge(raw, parse_overrides(overrides))
        source = f"{source} (with overrides)" if path else "command-line overrides"
    cfg = build(cls, raw, "", source)
    validate(cfg, "", source)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
