"""Optional dependencies: each is imported where it is used, and a missing one is one line naming
the pip extra that installs it.

    vader = require("vaderSentiment.vaderSentiment", "tasks", "the sentiment task's gold judge")

`MissingDependency` is both a `ConfigError` (the CLI prints it as one line and exits 2) and an
`ImportError` (Python callers may catch it as such).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from rlhfkit.config.errors import ConfigError

# train.report_to name -> (module that must be importable, pip extra of rlhfkit or None for a plain package)
TRACKERS: dict[str, tuple[str, str | None]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", None),
    "comet_ml": ("comet_ml", None),
    "aim": ("aim", None),
    "clearml": ("clearml", None),
    "dvclive": ("dvclive", None),
    "swanlab": ("swanlab", None),
}


class MissingDependency(ConfigError, ImportError):
    """An optional package that a requested feature needs is not installed."""


def install_hint(package: str, extra: str | None) -> str:
    return f"pip install 'rlhfkit[{extra}]'" if extra else f"pip install {package}"


def require(module: str, extra: str | None, what: str) -> ModuleType:
    """Import ``module`` or raise `MissingDependency`: "<what> needs <package>: pip install 'rlhfkit[<extra>]'"."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise MissingDependency(f"{what} needs the package {package}, which is not installed: "
                                f"{install_hint(package, extra)}") from None


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def resolve_trackers(names) -> list[str]:
    """``train.report_to`` with "auto" (the default) replaced by tensorboard when it is installed
    and by nothing otherwise: a lean install runs with metrics.jsonl alone."""
    out = []
    for name in names:
        if name == "auto":
            out += ["tensorboard"] if installed(TRACKERS["tensorboard"][0]) else []
        else:
            out.append(name)
    return out


def tracker_names(value) -> list:
    """``train.report_to`` as a list, read as TRL reads its ``report_to``: one name alone, ``none``
    (or null) for no tracker, ``all`` for every known tracker that is installed."""
    names = [] if value is None else [value] if isinstance(value, str) else list(value)
    said = [n.strip().lower() if isinstance(n, str) else n for n in names]
    if "all" in said:
        return [name for name, (module, _) in TRACKERS.items() if installed(module)]
    return [n.strip() if isinstance(n, str) else n for n, s in zip(names, said) if s not in ("none", "")]


def check_trackers(names: list, where: str) -> None:
    """``train.report_to``: every name "auto", a known tracker or one registered with accelerate's
    ``register_tracker_class``, and installed when named explicitly."""
    for name in names:
        if name == "auto":
            continue
        if not isinstance(name, str):
            raise ConfigError(f"{where}: tracker names are strings, got {name!r}")
        if name in TRACKERS:
            module, extra = TRACKERS[name]
            if not installed(module):
                raise MissingDependency(f"{where}: {name} is not installed: {install_hint(module, extra)} "
                                        f"(or remove it from report_to; metrics.jsonl is always written)")
        elif name not in _registered_trackers():
            raise ConfigError(f"{where}: unknown tracker {name!r}; known: {sorted(TRACKERS)}")


def _registered_trackers() -> set[str]:
    """Names of trackers registered with accelerate (custom GeneralTracker classes)."""
    if not installed("accelerate"):
        return set()
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    return set(LOGGER_TYPE_TO_CLASS)
