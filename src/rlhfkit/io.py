"""Files and directories that are whole or absent: written under a temporary name, then renamed."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

log = logging.getLogger("rlhfkit")


def to_builtin(v: Any) -> Any:
    """Tensors and NumPy scalars as Python numbers (for JSON)."""
    if isinstance(v, torch.Tensor):
        return v.detach().float().item()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float as None: JSON has no NaN or Infinity (jq, JSON.parse)."""
    obj = to_builtin(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """``obj`` as strict JSON (`strict_json`), written whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(strict_json(obj), indent=2, default=to_builtin, allow_nan=False))
    os.replace(tmp, path)


def write_jsonl_atomic(path: str | Path, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON Lines file; blank lines are skipped."""
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def fsync_path(path: str | Path) -> None:
    """fsync a file or a directory (a directory's entries: a rename is durable once it is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_temp_dir(final: Path) -> Path:
    """A new hidden sibling ``.NAME.tmp-PID-RANDOM`` of ``final`` with the normal umask permissions
    (``tempfile.mkdtemp`` makes it 0700, and a rename into place would keep that)."""
    import secrets

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    return tmp


def umask_modes(root: Path) -> None:
    """Give every file under ``root`` the mode a plain ``open()`` gives (0666 less the umask):
    safetensors writes its files 0600, which the other users of a shared model directory cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink() and (p.stat().st_mode & 0o777) != 0o666 & ~mask:
            os.chmod(p, 0o666 & ~mask)


def fsync_tree(path: Path) -> None:
    """fsync a directory's entries and the directory itself, as far as the file system allows."""
    for p in [*path.iterdir(), path] if path.is_dir() else [path]:
        try:
            fsync_path(p)
        except OSError:
            pass


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the finished directory ``tmp`` (a `make_temp_dir` sibling) where ``final`` is. An existing
    directory is moved aside first and deleted only after the rename; a link or file there is
    unlinked: a kill leaves the old ``final`` (or it under ``.NAME.old-PID``) or the new one, never a
    half-written one."""
    umask_modes(tmp)
    fsync_tree(tmp)
    old = None
    if final.is_symlink() or final.is_file():
        final.unlink()
    elif final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_tree(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def copy_tree_atomic(src: Path, dst: Path, link: bool = False) -> None:
    """``dst`` becomes a copy of the directory ``src`` (`replace_dir`). ``link``: its files are hard
    links to ``src``'s where the file system allows (no second copy on disk; a copy elsewhere), so
    ``dst`` stays whole when ``src`` is deleted and can be moved anywhere."""
    def link_or_copy(a: str, b: str) -> str:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
        return b

    tmp = make_temp_dir(dst)
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True, copy_function=link_or_copy if link else shutil.copy2)
        replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def as_os_error(e: Exception, path: Path) -> Exception:
    """An OS error as an OSError naming ``path``: safetensors reports a full disk as
    ``SafetensorError(... (os error 28))``, torch's writer as a RuntimeError raised while it
    handles the OSError; an OSError without a file name gets ``path``. Anything else is
    returned unchanged (the same object)."""
    cause: BaseException | None = e
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno is not None:
            return e if cause is e and e.filename else OSError(cause.errno, cause.strerror, str(path))
        m = re.search(r"\(os error (\d+)\)", str(cause))
        if m:
            code = int(m.group(1))
            return OSError(code, os.strerror(code), str(path))
        cause = cause.__cause__ or cause.__context__
    return e


def read_jsonl_lenient(path: Path) -> list[dict]:
    """The JSON objects of a jsonl log, skipping lines that do not parse (a record torn by a
    crash or a full disk), with one warning saying how many."""
    rows, bad = [], 0
    if not path.is_file():
        return rows
    with open(path, "rb") as f:
        for raw in f:
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                bad += raw.strip() != b""
                continue
            if isinstance(obj, dict):
                rows.append(obj)
            else:
                bad += 1
    if bad:
        log.warning("%s: skipped %d damaged line(s) (a record cut short by a crash or a full disk)", path, bad)
    return rows


def rewrite_jsonl(path: Path, keep: Callable[[dict], bool]) -> None:
    """Rewrite a jsonl log with the records ``keep`` accepts, torn lines dropped (atomically)."""
    if not path.exists():
        return
    rows = [r for r in read_jsonl_lenient(path) if keep(r)]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
