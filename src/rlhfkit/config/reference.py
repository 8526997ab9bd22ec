"""The configuration reference, generated from the config dataclasses themselves.

Each field's description is its attribute docstring (the string literal right below it in the class
body), read from the source with `ast`; a field without one inherits its parent class's. From these:
`rlhfkit CMD --help` lists every key, `--print-config --explain` writes them as YAML comments, and
docs/configuration.md is `markdown(...)` (a test keeps the file in sync).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from functools import lru_cache
from typing import Any, Literal, Union, get_args, get_origin

import yaml


@lru_cache(maxsize=None)
def _own_docs(cls) -> dict[str, str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def field_docs(cls) -> dict[str, str]:
    """Field name -> description, through the class hierarchy (the subclass's own wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_docs(klass))
    return docs


def class_doc(cls) -> str:
    doc = cls.__doc__ or ""
    if doc.startswith(f"{cls.__name__}("):  # dataclasses' generated signature, not a description
        return ""
    return " ".join(doc.split())


def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(tp))
    if origin is Union or str(origin) == "<class 'types.UnionType'>":
        return " or ".join("null" if a is type(None) else type_name(a) for a in get_args(tp))
    if origin in (list, dict):
        return origin.__name__
    return {"str": "string", "int": "integer", "float": "number", "bool": "true/false",
            "Callable": "function (Python)"}.get(
        getattr(tp, "__name__", str(tp)), getattr(tp, "__name__", str(tp)))


@dataclasses.dataclass
class Key:
    path: str  # dotted, e.g. "train.batch_size"
    type: str
    default: Any
    doc: str
    section: bool = False  # a nested section (its keys follow)


def keys(cls, prefix: str = "", instance: Any = None) -> list[Key]:
    """Every key of config class ``cls`` (depth first), with defaults from ``instance`` (or a default
    instance): the defaults a section has *inside* this config, e.g. DPO's optim.lr."""
    instance = instance if instance is not None else cls()
    hints, docs, out = typing.get_type_hints(cls), field_docs(cls), []
    for f in dataclasses.fields(cls):
        path, value = f"{prefix}{f.name}", getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            out.append(Key(path, "section", None, docs.get(f.name) or class_doc(type(value)), section=True))
            out += keys(type(value), f"{path}.", value)
        else:
            out.append(Key(path, type_name(hints[f.name]), value, docs.get(f.name, "")))
    return out


def _default(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if v == "":
        return '""'
    return str(v)


def help_text(cls) -> str:
    """The key list for ``rlhfkit CMD --help``."""
    lines = ["config keys (YAML, or key.path=value on the command line):"]
    for k in keys(cls):
        if k.section:
            lines.append(f"\n  {k.path}:  {k.doc}")
            continue
        lines.append(f"    {k.path} ({k.type}, default {_default(k.default)})")
        if k.doc:
            lines += textwrap.wrap(k.doc, width=96, initial_indent="        ", subsequent_indent="        ")
    return "\n".join(lines)


def explained_yaml(cfg) -> str:
    """The resolved config as YAML with each key's description as a comment above it."""
    docs = {k.path: k.doc for k in keys(type(cfg), instance=cfg)}
    lines: list[str] = []

    def emit(obj, prefix: str, indent: int) -> None:
        for f in dataclasses.fields(obj):
            path, value, pad = f"{prefix}{f.name}", getattr(obj, f.name), " " * indent
            for line in textwrap.wrap(docs.get(path, ""), width=96 - indent):
                lines.append(f"{pad}# {line}")
            if dataclasses.is_dataclass(value):
                lines.append(f"{pad}{f.name}:")
                emit(value, f"{path}.", indent + 2)
            else:
                dumped = yaml.safe_dump({f.name: value}, default_flow_style=True, width=10_000).strip()
                lines.append(f"{pad}{dumped[1:-1] if dumped.startswith('{') else dumped}")

    emit(cfg, "", 0)
    return "\n".join(lines) + "\n"


def markdown(commands: dict[str, tuple[type, str]]) -> str:
    """docs/configuration.md: one table per sub-command. ``commands``: name -> (config class, help)."""
    out = ["# Configuration reference", "",
           "Every key of every sub-command, its type, default and meaning. Set keys in a YAML file",
           "(`rlhfkit CMD -c FILE`) or on the command line (`key.path=value`, after the file); a key",
           "left unset keeps the default of its command shown here, also in a section set in part.",
           "`rlhfkit CMD --help` prints the same list and `rlhfkit CMD -c FILE --print-config --explain`",
           "the resolved values with these descriptions. This page is generated from the config classes",
           "(`python -m rlhfkit.config.reference > docs/configuration.md`).", ""]
    for name, (cls, help_) in commands.items():
        out += [f"## `rlhfkit {name}`", "", help_[0].upper() + help_[1:] + ".", "",
                "| key | type | default | meaning |", "|---|---|---|---|"]
        for k in keys(cls):
            if k.section:
                out.append(f"| **`{k.path}`** | section | | {k.doc} |")
            else:
                out.append(f"| `{k.path}` | {k.type} | `{_default(k.default)}` | {k.doc.replace('|', '/')} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    from rlhfkit.registry import config_classes

    print(markdown(config_classes()), end="")
