"""Raw records from files and datasets, each remembering where it came from.

Supported sources (`load_records`):
- ``*.jsonl`` / ``*.ndjson``: one JSON object per line (blank lines skipped, numbering kept);
- ``*.json``: a list of objects, or ``{"data": [...]}``;
- ``*.parquet``: one record per row (nested message lists come back as lists of dicts);
- ``*.csv`` / ``*.tsv``: one record per row, header = field names; an empty cell means "absent"; a
  cell holding a list of messages as JSON or as Python's repr (pandas' ``to_csv``) is read as that list;
- a ``datasets.Dataset`` or ``datasets.DatasetDict`` object;
- ``"hf:org/name[@config][:split]"``: ``datasets.load_dataset`` (needs the hub or a local cache);
- a list of dicts (in-memory, e.g. pairs built by online DPO).
"""

from __future__ import annotations

import ast
import csv
import json
import re
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from rlhfkit.data.errors import DataError, Origin, type_name
from rlhfkit.hub import hub_unreachable, offline


@dataclass
class Record:
    """One raw record and its origin, for error messages."""

    data: dict[str, Any]
    source: str
    line: int  # 1-based line (JSONL/CSV) or record index + 1 (other sources)

    @property
    def origin(self) -> Origin:
        return Origin(self.source, self.line)


def load_records(source, *, split: str | None = None, limit: int | None = None) -> list[Record]:
    """Read every record of `source` (see the module docstring for what a source can be).

    split: which split of a DatasetDict / hub dataset (default: "train", or the only split).
           Files have no splits; passing one is an error rather than silently ignored.
    limit: keep only the first `limit` records.
    Raises DataError for unreadable content (bad JSON names the line), an empty source, or a
    record that is not an object; FileNotFoundError for a missing file.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    records = list(_take(_iter_records(source, split), limit))
    if not records:
        name = _source_name(source)
        raise DataError("no records (empty file or dataset)" if limit != 0 else "limit=0 selects no records",
                        source=name)
    return records


def _take(it: Iterator[Record], limit: int | None) -> Iterator[Record]:
    if limit is None:
        yield from it
        return
    for i, rec in enumerate(it):
        if i >= limit:
            return
        yield rec


def _source_name(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, list):
        return "<memory>"
    name = getattr(getattr(source, "info", None), "dataset_name", None)
    return name or f"<{type(source).__name__}>"


def _iter_records(source, split: str | None) -> Iterator[Record]:
    if isinstance(source, list):
        return _from_rows(source, "<memory>")
    if _is_hf_dataset(source):
        return _from_hf_object(source, split)
    if isinstance(source, str) and source.startswith("hf:"):
        return _from_hub(source[3:], split)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"unsupported data source of type {type(source).__name__}: give a file path, "
                        "'hf:org/name[:split]', a datasets.Dataset or DatasetDict, or a list of dicts "
                        "(a DataFrame: df.to_dict('records'); an IterableDataset: list(ds.take(n)))")
    path = Path(source)
    name = str(source)
    if split is not None:
        raise ValueError(f"{name}: split={split!r} only applies to datasets, not to files")
    if path.is_dir():
        raise ValueError(f"{name}: a directory, not a data file (a directory of dataset files loads as hf:{name})")
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {name}")
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json,
               ".parquet": _read_parquet, ".csv": _read_csv, ".tsv": _read_csv}
    if suffix not in readers:
        raise DataError(f"unsupported file type {suffix!r}; expected one of {', '.join(sorted(readers))}", source=name)
    return readers[suffix](path, name)


MAX_DEPTH = 64  # lists and objects nested deeper than this in one record are refused


def _check_object(obj, name: str, line: int) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object (one record), got {type_name(obj)}", source=name, line=line)
    _check_depth(obj, name, line)
    return obj


def _check_depth(obj, name: str, line: int) -> None:
    """Refuse a record nested deeper than `MAX_DEPTH` (no field of any format is), before code that
    walks it recursively meets Python's recursion limit. Iterative, so any depth is checked."""
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise DataError(f"lists and objects nested more than {MAX_DEPTH} levels deep", source=name, line=line)
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))


def _json_error(e: Exception) -> str:
    """The reason of a JSON text json cannot read: its own message, nesting too deep for the parser
    (RecursionError) or a number too long to convert (ValueError)."""
    if isinstance(e, json.JSONDecodeError):
        return f"invalid JSON: {e.msg} (column {e.colno})"
    if isinstance(e, RecursionError):
        return "invalid JSON: nested too deeply to read"
    return f"invalid JSON: {e}"


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list) -> dict:
    """``object_pairs_hook``: a key given twice in one object is refused (json keeps the last silently)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _read_jsonl(path: Path, name: str) -> Iterator[Record]:
    # Read bytes so that an encoding error is reported on its own line, like a JSON error.
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"not valid UTF-8 ({e.reason} at byte {e.start})", source=name, line=lineno) from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text, object_pairs_hook=_unique_keys)
            except _DuplicateKey as e:
                raise DataError(f"key {e.args[0]!r} appears twice in one object (which one is meant?)",
                                source=name, line=lineno) from None
            except (ValueError, RecursionError) as e:
                raise DataError(_json_error(e), source=name, line=lineno) from None
            yield Record(_check_object(obj, name, lineno), name, lineno)


def _read_json(path: Path, name: str) -> Iterator[Record]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            obj = json.load(f, object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise DataError(f"key {e.args[0]!r} appears twice in one object (which one is meant?)", source=name) from None
    except json.JSONDecodeError as e:
        # Here the position is a real line of the file, not a record number.
        raise DataError(f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}", source=name) from None
    except UnicodeDecodeError as e:
        raise DataError(f"not valid UTF-8 ({e.reason} at byte {e.start})", source=name) from None
    except (ValueError, RecursionError) as e:
        raise DataError(_json_error(e), source=name) from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DataError(f"expected a list of records or {{\"data\": [...]}}, got {type_name(obj)}", source=name)
    return _from_rows(obj, name)


def _from_rows(rows: Iterable, name: str) -> Iterator[Record]:
    for i, row in enumerate(rows):
        yield Record(_check_object(row, name, i + 1), name, i + 1)


def _read_parquet(path: Path, name: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"cannot read Parquet: {e}", source=name) from None
    i = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            i += 1
            yield Record(_check_object(row, name, i), name, i)


def _read_csv(path: Path, name: str) -> Iterator[Record]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"invalid CSV: {e}", source=name, line=1) from None
        except UnicodeDecodeError as e:
            raise DataError(f"not valid UTF-8 ({e.reason})", source=name, line=1) from None
        header = [h.strip() for h in header]
        prev_end = reader.line_num
        while True:
            start = prev_end + 1  # a quoted cell may span lines: report the row's first line
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise DataError(f"invalid CSV: {e}", source=name, line=start) from None
            except UnicodeDecodeError as e:  # decoded a block at a time: the row is where it was met
                raise DataError(f"not valid UTF-8 ({e.reason}) at or after this line", source=name,
                                line=start) from None
            prev_end = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise DataError(f"expected {len(header)} columns (as in the header), got {len(row)}",
                                source=name, line=start)
            # CSV has no null: an empty cell means the field is absent.
            yield Record(_check_object({k: _cell(v, name, start, k) for k, v in zip(header, row)}, name, start),
                         name, start)


_MESSAGES_TEXT = re.compile(r"""\s*\[\s*\{\s*['"](role|content)['"]\s*:""")


def _cell(text: str, name: str, line: int, key: str):
    """A CSV cell: text, None when empty, or a list of messages when the cell holds one written out
    as JSON or as Python's repr (what pandas' ``to_csv`` writes for a column of message lists).
    Read as data (``json``, ``ast.literal_eval``), never run."""
    if text == "":
        return None
    if not _MESSAGES_TEXT.match(text):
        return text
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise DataError("the cell looks like a list of messages but is neither JSON nor a Python literal (numpy "
                        "arrays print without commas); save the data as JSONL or parquet",
                        source=name, line=line, field=key) from None


def _is_hf_dataset(obj) -> bool:
    try:
        import datasets
    except ImportError:
        return False
    return isinstance(obj, (datasets.Dataset, datasets.DatasetDict))


def _from_hf_object(ds, split: str | None) -> Iterator[Record]:
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds.keys())
        if split is None:
            if "train" in ds:
                split = "train"
            elif len(splits) == 1:
                split = splits[0]
            else:
                raise ValueError(f"dataset has splits {splits}; choose one with split=...")
        if split not in ds:
            raise ValueError(f"split {split!r} not found; available: {splits}")
        ds = ds[split]
        name = f"{ds.info.dataset_name or '<DatasetDict>'}[{split}]"
    else:
        if split is not None and ds.split is not None and str(ds.split) != split:
            raise ValueError(f"this Dataset is split {ds.split!r}, not {split!r}")
        name = ds.info.dataset_name or "<Dataset>"
    return _from_rows(iter(ds), name)


def _from_hub(spec: str, split: str | None) -> Iterator[Record]:
    """``org/name[@config][:split]`` -> datasets.load_dataset (not testable offline)."""
    import datasets

    ref, _, spec_split = spec.partition(":")
    repo, _, config = ref.partition("@")
    if spec_split and split and spec_split != split:
        raise ValueError(f"hf:{spec}: split given twice ({spec_split!r} and split={split!r})")
    split = spec_split or split or "train"
    source = f"hf:{ref}:{split}"
    if not Path(repo).expanduser().is_dir():
        why = "" if offline("HF_DATASETS_OFFLINE") else hub_unreachable()  # offline: the datasets cache is read
        if why:
            raise DataError(f"not a local directory, and {why} (a dataset in the datasets cache loads with "
                            "HF_HUB_OFFLINE=1)", source=source)
    quiet = [datasets.logging, *_hub_logging()]
    levels = [m.get_verbosity() for m in quiet]
    for m in quiet:
        m.set_verbosity_error()  # not the hub's retry warnings: the one line below says what failed
    try:
        ds = datasets.load_dataset(repo, config or None, split=split)
    except Exception as e:  # the datasets library's own errors: one line naming the dataset
        first = (str(e).strip().splitlines() or [""])[0]
        raise DataError(f"cannot load: {type(e).__name__}: {first}", source=source) from None
    finally:
        for m, level in zip(quiet, levels):
            m.set_verbosity(level)
    return _from_rows(iter(ds), source)


def _hub_logging() -> list:
    try:
        from huggingface_hub.utils import logging as hub_logging
    except ImportError:  # pragma: no cover
        return []
    return [hub_logging]
