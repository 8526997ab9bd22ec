"""Validation errors that point at the exact record: ``data/train.jsonl:17: field 'chosen': ...``.

Every problem in a dataset is raised as a `DataError` while loading or tokenizing, i.e. before
any training step, and names the file (or dataset), the line (JSONL / CSV) or record number
(JSON, Parquet, in-memory datasets), and the field.
"""

from __future__ import annotations

from typing import NamedTuple

# Formats whose records are lines of text: their positions are reported as line numbers.
_LINE_BASED_SUFFIXES = (".jsonl", ".ndjson", ".csv", ".tsv", ".txt")


class Origin(NamedTuple):
    """Where an example came from: (source, line). Compares equal to a plain 2-tuple."""

    source: str | None
    line: int | None


def location(source: str | None, line: int | None) -> str:
    """``"data/x.jsonl:17"`` for line-based files, ``"data/x.parquet:record 17"`` otherwise."""
    if source is None and line is None:
        return ""
    src = source if source is not None else "<data>"
    if line is None:
        return src
    if src.lower().endswith(_LINE_BASED_SUFFIXES):
        return f"{src}:{line}"
    return f"{src}:record {line}"


class DataError(ValueError):
    """A problem in the training data, located to the record and field.

    Attributes: ``source`` (file path or dataset name), ``line`` (1-based line for JSONL/CSV,
    record index + 1 otherwise), ``field`` (e.g. ``'chosen'`` or ``'messages[2].role'``) and
    ``reason`` (the message without the location prefix).
    """

    def __init__(self, reason: str, source: str | None = None, line: int | None = None, field: str | None = None):
        self.reason = reason
        self.source = source
        self.line = line
        self.field = field
        parts = [p for p in (location(source, line), f"field '{field}'" if field else "") if p]
        super().__init__(": ".join([*parts, reason]))

    @classmethod
    def at(cls, origin: tuple | None, field: str | None, reason: str) -> DataError:
        source, line = origin if origin is not None else (None, None)
        return cls(reason, source=source, line=line, field=field)

    def __reduce__(self):  # keep the attributes across processes (tokenize_dataset(num_proc>1))
        return (type(self), (self.reason, self.source, self.line, self.field))


def type_name(value) -> str:
    """JSON-ish name of a value's type for messages: ``int``, ``list``, ``null``..."""
    if value is None:
        return "null"
    return type(value).__name__
