"""The configuration error type (kept apart so that any module may raise it without importing the loader)."""

import contextlib


class ConfigError(ValueError):
    """A configuration problem, located as ``source: key.path: message``."""


@contextlib.contextmanager
def under_key(key: str):
    """Name what failed a check made inside the block (the config key, or the spec): a ValueError
    or a missing file is raised again, of its own type, as ``key: message``."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"{key}: {e}") from None
