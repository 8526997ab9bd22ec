"""One process per run directory: two runs writing one directory would mix their checkpoints,
metrics and models, and a later resume could not tell whose step it continues.

`hold(path)` takes the kernel's exclusive lock (``flock``) on ``path/.lock`` until `release(path)`
(a finished run) or the end of the process; a second process that opens the same run directory
meanwhile is refused in one line naming the holder's pid. The kernel drops the lock when the
holder exits, however it ends (a crash or kill leaves no stale lock to clean up). The same process may open the directory again (a Python
session running a second stage there, `rlhfkit pm`'s SFT inside its own run). Where the platform
has no ``flock`` (Windows) nothing is locked.
"""

from __future__ import annotations

import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK = ".lock"
_HELD: dict[str, int] = {}  # resolved run directory -> the open lock file this process holds


def hold(path: Path, error: type[Exception] = RuntimeError, key: str = "train.output_dir") -> None:
    """Hold the run directory ``path`` (which exists) until `release` or the end of the process;
    raise ``error`` (naming the config ``key`` that chose the directory) if another process holds it."""
    held = str(Path(path).resolve())
    if fcntl is None or held in _HELD:
        return
    fd = os.open(Path(path) / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise error(f"{key}: {path} is in use by another rlhfkit process (pid {holder}): wait for "
                    "it to end, or choose another directory") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[held] = fd


def release(path: Path) -> None:
    """Let other processes open the run directory ``path`` again (its run has finished)."""
    fd = _HELD.pop(str(Path(path).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor of the open file drops its flock
