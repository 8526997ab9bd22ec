"""Keep freed memory in the process on CPU, so that big per-step buffers are not page-faulted anew.

glibc's malloc serves every block above 32 MB (its largest mmap threshold) with a fresh ``mmap``
and returns it with ``munmap`` on free. A training step on CPU allocates several such blocks and
frees them again: above all the dense gradient of a tied embedding (vocabulary x hidden: 113 MB
for the default model), which ``embedding_dense_backward`` creates with ``torch.zeros`` on every
backward, and the sum that accumulates it with the LM head's gradient. Each is a fresh mapping
whose every 4 KB page faults on first touch. Measured on the project's 2-core machine with the
PPO benchmark's settings (benchmarks/profile_ppo.py, 2026-11-30): about 500,000 page faults
(2 GB of fresh pages) per iteration, 160 ms to zero each embedding gradient, and an update phase
of 7.7-8.6 s.

`keep_freed_memory` tells glibc to take large blocks from the heap as well (``M_MMAP_MAX = 0``)
and to keep freed heap memory instead of trimming it back to the system (``M_TRIM_THRESHOLD``),
so later steps reuse the pages earlier ones touched. In the same run: a few hundred page faults per
iteration after the first, and an update phase of 5.3-5.6 s. The peak memory is the same (6.6 GB);
the process holds on to it until it exits instead of returning it between steps, which suits a
training process. It does what
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` in the environment would, from inside Python
(those variables are read only at start-up). Set ``RLHFKIT_MALLOC=default`` to leave malloc alone.
A no-op on other C libraries (macOS, musl) and where ``mallopt`` is missing.
"""

from __future__ import annotations

import ctypes
import logging
import platform

from rlhfkit import envvars

log = logging.getLogger("rlhfkit")

M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the settings once per process; returns whether they are in effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if envvars.setting("RLHFKIT_MALLOC") == "default":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success, 0 on error
    _applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, _INT_MAX))
    if not _applied:
        log.warning("mallopt refused the allocator settings; large CPU buffers will be re-faulted every step")
    return _applied
