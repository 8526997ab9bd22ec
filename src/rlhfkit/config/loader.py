"""Loading a typed config: YAML, then a dict, then dotted command-line overrides, checked and validated.

Loading checks unknown keys (with a "did you mean" hint), types and cross-field constraints and reports
them as ``file: key.path: problem`` before any model is loaded.

    cfg = load_config(SFTConfig, "configs/sft.yaml", ["optim.lr=1e-5", "train.batch_size=16"])
"""

from __future__ import annotations

import collections.abc
import contextvars
import dataclasses
import functools
import logging
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from rlhfkit.config.errors import ConfigError
from rlhfkit.config.foreign import key_hint
from rlhfkit.config.numbers import check_numbers

log = logging.getLogger("rlhfkit")


def _type_name(tp: Any) -> str:
    return "a function" if tp is collections.abc.Callable else getattr(tp, "__name__", str(tp))


def _describe(tp: Any) -> str:
    """How a type reads in an error message: true/false, 'auto', float..."""
    if tp is bool:
        return "true/false"
    if tp in (str, int, float):
        return {str: "string", int: "integer", float: "number"}[tp]
    if get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    return _type_name(tp)


def _hint(value: Any) -> str:
    """What to give instead of an object a config cannot hold, where there is a usual answer."""
    if type(value).__module__.split(".")[0] == "datasets" and hasattr(value, "to_json"):
        return " (a data source is a file: save the dataset with .to_json('data.jsonl') and give that path)"
    return ""


def _coerce_union(value: Any, tp: Any, path: str, source: str) -> Any:
    """`_coerce` against the first member of a Union that takes the value."""
    for arg in get_args(tp):
        if arg is type(None):
            if value is None:
                return None
            continue
        if get_origin(arg) in (list, dict) and isinstance(value, get_origin(arg)):
            return _coerce(value, arg, path, source)  # the container fits: its element's error is the one
        try:
            return _coerce(value, arg, path, source)
        except ConfigError:
            pass
    raise ConfigError(f"{source}: {path}: expected {' or '.join(_describe(a) for a in get_args(tp))}, "
                      f"got {type(value).__name__} {value!r}{_hint(value)}")


def _coerce(value: Any, tp: Any, path: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert ints to floats where a float is wanted."""
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{source}: {path}: must be one of {list(get_args(tp))}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        return _coerce_union(value, tp, path, source)
    if tp is collections.abc.Callable or origin is collections.abc.Callable:
        if not callable(value) or isinstance(value, type):
            raise ConfigError(f"{source}: {path}: expected a function, got {type(value).__name__} {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {path}: expected a mapping, got {type(value).__name__}")
        return build(tp, value, path, source)
    if tp in (list, dict) or origin in (list, dict):
        want = origin or tp
        if not isinstance(value, want):
            raise ConfigError(f"{source}: {path}: expected {want.__name__}, got {type(value).__name__} {value!r}")
        if origin is list and get_args(tp):
            return [_coerce(v, get_args(tp)[0], f"{path}[{i}]", source) for i, v in enumerate(value)]
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {path}: expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):  # nan/inf are never a meaningful setting (an lr of inf even trains)
            raise ConfigError(f"{source}: {path}: must be a finite number, got {value}")
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
        if isinstance(value, os.PathLike):  # a pathlib.Path from Python
            return os.fspath(value)
        if not isinstance(value, str):
            quote = (f" (YAML reads it so: write it quoted, e.g. {path}='\"{value}\"')"
                     if isinstance(value, (bool, int, float)) else "")
            raise ConfigError(f"{source}: {path}: expected a string, got {type(value).__name__} {value!r}{quote}")
        return value
    return value


_ROOT: contextvars.ContextVar = contextvars.ContextVar("rlhfkit_config_root", default=None)


def build(cls, data: dict, prefix: str, source: str):
    if not isinstance(data, dict):
        where = f"{prefix}: " if prefix else ""
        raise ConfigError(f"{source}: {where}expected a mapping of keys, got {type(data).__name__} {data!r}"[:300])
    _refuse_unknown(cls, set(data), prefix, source)
    return cls(**{k: _key_value(cls, k, v, prefix, source) for k, v in data.items()})


@functools.cache
def _fields(cls) -> dict[str, tuple[Any, dataclasses.Field]]:
    """Each key of section ``cls``: its resolved annotation and its field."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls)}


def _refuse_unknown(cls, keys: set[str], prefix: str, source: str) -> None:
    """Every key of ``keys`` that is none of section ``cls``'s, in the one line, each with its hint."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(keys - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        said = "; ".join(f"{where}{k}: unknown key{key_hint(k, cls, names, prefix, _ROOT.get())}"
                         for k in unknown)
        raise ConfigError(f"{source}: {said}; known keys: {sorted(names)}")


def _key_value(cls, key: str, value: Any, prefix: str, source: str) -> Any:
    """``value`` for key ``key`` of section ``cls``, checked against its annotation (`_coerce`). A
    section given in part keeps this config's own defaults for the rest (GRPO's optim schedule,
    eval's rollout.n), not those of the section's class."""
    tp, f = _fields(cls)[key]
    if isinstance(value, dict) and dataclasses.is_dataclass(tp) and f.default_factory is not dataclasses.MISSING:
        value = merge(dataclasses.asdict(f.default_factory()), value)
    return _coerce(value, tp, f"{prefix}.{key}" if prefix else key, source)


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
    """``["a.b=1", ...]`` -> nested dict; each value read as YAML (a string when it is not YAML,
    except that a value opening a list or a mapping must be one)."""
    if isinstance(overrides, str):
        raise ConfigError(f"overrides: expected a list of key.path=value strings, got the string {overrides!r}")
    out: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            if raw.lstrip().startswith(("[", "{")):
                kind = "list" if raw.lstrip()[0] == "[" else "mapping"
                raise ConfigError(f"override {key.strip()}: invalid YAML {kind} ({yaml_error_line(e)}): "
                                  f"{raw}") from None
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
    """Run every section's ``validate`` (recursively) and the top-level one, then the generic
    numeric checks (`check_numbers`). Any section with an ``output_dir`` must name a directory.
    Each key's type and allowed values are checked again first (`_recheck`): a config changed in
    Python after `load_config` is checked as a loaded one is."""
    _recheck(cfg, prefix, source)
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            validate(v, f"{prefix}.{f.name}" if prefix else f.name, source)
    try:
        out = getattr(cfg, "output_dir", None)
        if isinstance(out, str):
            where = f"{prefix}.output_dir" if prefix else "output_dir"
            if not out.strip():
                raise ConfigError(f"{where}: must name a directory (empty would write into the current one)")
            if Path(out).exists() and not Path(out).is_dir():
                raise ConfigError(f"{where}: {out} exists and is not a directory")
        if hasattr(cfg, "validate"):  # the section's own, more specific messages first
            cfg.validate(prefix or "config")
        _warn_unused(cfg, prefix, source)
        if not prefix:
            _check_held_out(cfg)
        check_numbers(cfg, prefix)
    except ConfigError as e:
        text = str(e)
        if not prefix and text.startswith("config."):  # a top-level check names keys from the top: no "config."
            text = text[len("config."):]
        raise type(e)(f"{source}: {text}") from None  # keeps MissingDependency an ImportError


def _recheck(cfg: Any, prefix: str, source: str) -> None:
    """Every key of the section against its annotation, as `build` checks a loaded one (a Path
    becomes its string, a mapping set where a section goes becomes the section); an attribute
    that is no key of the section is refused, as an unknown key is."""
    _refuse_unknown(type(cfg), set(vars(cfg)), prefix, source)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            continue  # a section: checked key by key when `validate` reaches it
        setattr(cfg, f.name, _key_value(type(cfg), f.name, value, prefix, source))


_WARNED: set[tuple[int, str]] = set()  # (section object, message): a config validated again warns once


def _warn_unused(cfg: Any, prefix: str, source: str) -> None:
    """A section whose keys act only when it is switched on (``unused_keys``: model.lora.r without
    model.lora.enabled, ptx.data with ptx.coef 0) names the keys set while it is off, once."""
    found = cfg.unused_keys() if hasattr(cfg, "unused_keys") else ([], "")
    for unused, switch in found if isinstance(found, list) else [found]:  # one (keys, switch) or several
        if not unused:
            continue
        dotted = f"{prefix}." if prefix else ""
        switches = [switch] if isinstance(switch, str) else list(switch)  # the section is on when any is
        message = (f"{', '.join(dotted + k for k in unused)} set but not used: "
                   + " and ".join(f"{dotted}{k} is {_shown(getattr(cfg, k))}" for k in switches))
        if (id(cfg), message) not in _WARNED:
            _WARNED.add((id(cfg), message))
            log.warning("%s: %s", source, message)


def _shown(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value) if value != "" else "empty"


def _check_held_out(cfg: Any) -> None:
    """``train.select_best`` and ``train.eval_every`` read a held-out evaluation: refuse them where
    there is none to read (they would be ignored: no evaluation, the last model kept)."""
    train = getattr(cfg, "train", None)
    asked = [f"train.{k}: {v}" for k, v in (("select_best", getattr(train, "select_best", "")),
                                             ("eval_every", getattr(train, "eval_every", 0))) if v]
    data, prompts = getattr(cfg, "data", None), getattr(cfg, "prompts", None)
    if not asked:
        return
    if hasattr(data, "eval_fraction"):
        if not data.eval and data.eval_fraction <= 0:
            raise ConfigError(f"{asked[0]} needs held-out data: set data.eval, or data.eval_fraction above 0")
    elif hasattr(prompts, "eval") and not prompts.eval:
        raise ConfigError(f"{asked[0]} needs held-out prompts: set prompts.eval")
    chosen, known = getattr(train, "select_best", ""), cfg.eval_metrics() if hasattr(cfg, "eval_metrics") else ()
    if chosen and known and not any(chosen == k or (k.endswith("/") and chosen.startswith(k)) for k in known):
        raise ConfigError(f"train.select_best: {chosen!r} is not among the held-out metrics of this run: "
                          f"{', '.join(k + '<category>' if k.endswith('/') else k for k in known)}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:  # the mapping's own keys (a "<<" merge may be overridden)
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = key_node.value
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice in one mapping (the first would be ignored)",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file; a syntax error is one ConfigError line with the file, line and column."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        loader = _UniqueKeyLoader(p.read_text())  # a SafeLoader: no tag runs code
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: {yaml_error_line(e)}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None


def yaml_error_line(e: Exception) -> str:
    """PyYAML's multi-line message as one line: ``invalid YAML at line L, column C: problem``."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None)
    text = f"{context}, {problem}" if context else problem
    return f"invalid YAML{where}: {' '.join(str(text).split())}"


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None, data: dict | None = None,
                check: bool = True):
    """Build a validated ``cls`` from a YAML file, a dict and dotted overrides (applied in that order).
    ``check=False`` skips the checks across keys and of required values (`validate`); key names
    and types are checked always."""
    source = str(path) if path else "config"
    raw: dict = {}
    if path:
        p = Path(path)
        loaded = read_yaml(p) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
        raw = loaded
    if data:
        raw = merge(raw, data)
    if overrides:
        raw = merge(raw, parse_overrides(overrides))
        source = f"{source} (with overrides)" if path else "command-line overrides"
    token = _ROOT.set(cls)  # the whole config, for `foreign_hint` in the sections' build
    try:
        cfg = build(cls, raw, "", source)
    finally:
        _ROOT.reset(token)
    if check:
        validate(cfg, "", source)
    return cfg


def to_dict(cfg: Any) -> dict:
    """The config as plain data: what is written (``*_config.yaml``), fingerprinted and sent to
    trackers. A Python callable set in Python (a reward function) appears as ``module:qualname``."""
    return _plain(dataclasses.asdict(cfg))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if callable(value):
        fn = getattr(value, "func", value)  # functools.partial
        return f"{getattr(fn, '__module__', None) or '?'}:{getattr(fn, '__qualname__', type(fn).__name__)}"
    return value


def dump_config(cfg: Any, path: str | Path) -> None:
    """Write ``cfg`` as YAML, whole or not at all (a temporary file renamed over ``path``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
