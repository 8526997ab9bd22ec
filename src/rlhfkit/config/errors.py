"""The configuration error type (kept apart so that any module may raise it without importing the loader)."""


class ConfigError(ValueError):
    """A configuration problem, located as ``source: key.path: message``."""
