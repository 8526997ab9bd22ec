"""The package's shape: layers import only downwards, and no module imports itself back.

Layers, bottom to top (docs/architecture.md): algos; argparsing, config, envvars, io, rng; data, models; judges, tasks,
parallel, rollout; training; eval; trainers; registry, pipeline, report, cli. A module may import
from its own layer or below. rlhfkit modules are imported at module level, except by the command
line and the pipeline (lazy sub-commands, the report's optional plotting dependency) and by the
config's checks that read data (the chat-template check, SFTConfig's and RewardConfig's inputs; config
sits below data).
"""

from __future__ import annotations

import ast
from pathlib import Path

import rlhfkit

ROOT = Path(rlhfkit.__file__).parent

LAYER = {
    "algos": 0, "argparsing": 1, "config": 1, "envvars": 1, "hub": 1, "io": 1, "rng": 1, "data": 2, "models": 2,
    "judges": 3, "tasks": 3, "parallel": 3, "rollout": 3, "training": 4, "eval": 5, "trainers": 6, "registry": 7,
    "pipeline": 7, "pipeline_summary": 7,
    "report": 7, "runinfo": 7, "cli": 8,
}

# the only modules that may import rlhfkit modules inside functions (see the docstring)
LAZY_IMPORTERS = {"rlhfkit.cli", "rlhfkit.pipeline", "rlhfkit.config.sections", "rlhfkit.config.reward"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """rlhfkit module -> the rlhfkit modules it imports at module level."""
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        name = _module_name(path)
        deps = set()
        for node in ast.parse(path.read_text()).body:  # module level only
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rlhfkit"):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("rlhfkit")}
        graph[name] = deps
    return graph


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_every_package_has_a_layer():
    missing = {_top(m) for m in _imports()} - set(LAYER) - {"rlhfkit", "__main__"}
    assert not missing, f"give these a layer in LAYER: {sorted(missing)}"


def test_imports_only_go_down():
    wrong = [(m, d) for m, deps in _imports().items() for d in deps
             if _top(m) in LAYER and _top(d) in LAYER and LAYER[_top(d)] > LAYER[_top(m)]]
    assert not wrong, f"imports that go up a layer: {wrong}"


def test_no_import_cycles():
    graph = _imports()

    def owner(dep: str) -> str:  # "from rlhfkit.x import y" where y is a module counts as rlhfkit.x
        return dep if dep in graph else dep.rsplit(".", 1)[0]

    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m: str, stack: list[str]) -> bool:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            d = owner(d)
            if d == m or d not in graph:
                continue
            if state.get(d) == 1:
                cycle.extend(stack[stack.index(d):] + [d] if d in stack else [m, d])
                return True
            if state.get(d) is None and visit(d, stack + [d]):
                return True
        state[m] = 2
        return False

    for m in sorted(graph):
        if state.get(m) is None and visit(m, [m]):
            break
    assert not cycle, f"import cycle: {' -> '.join(cycle)}"


# transformers' public names rlhfkit may use anywhere: the top-level package's classes and functions
# (except its caches), `transformers.logging` and the version string.
PUBLIC_TRANSFORMERS_ATTRS = {"__version__", "logging"}
PRIVATE_INTERNALS_MODULE = "rlhfkit.rollout.kv_cache"


def _transformers_uses(tree: ast.AST) -> list[str]:
    """Every use of transformers beyond its public top level, anywhere in a module (function-level too)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "transformers":
            if node.module != "transformers":
                found.append(f"from {node.module} import ...")
            found += [f"from transformers import {a.name}" for a in node.names if a.name.endswith(("Cache", "Layer"))]
        elif isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.startswith("transformers.")]
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "transformers"
              and node.attr not in PUBLIC_TRANSFORMERS_ATTRS):
            found.append(f"transformers.{node.attr}")
    return found


def test_transformers_internals_are_used_in_one_guarded_module():
    """Only rollout/kv_cache.py reaches into transformers' internals (its cache classes and
    submodules), and it checks the installed version before relying on them."""
    uses = {}
    for path in ROOT.rglob("*.py"):
        found = _transformers_uses(ast.parse(path.read_text()))
        if found:
            uses[_module_name(path)] = found
    assert set(uses) == {PRIVATE_INTERNALS_MODULE}, uses
    assert "from transformers.cache_utils import ..." in uses[PRIVATE_INTERNALS_MODULE]
    source = (ROOT / "rollout" / "kv_cache.py").read_text()
    assert "def check_transformers" in source and "TESTED" in source


def test_rlhfkit_modules_are_imported_at_module_level():
    """An import inside a function hides a cycle from `test_no_import_cycles`; only the command
    line, the pipeline and the config's data checks import lazily."""
    lazy = []
    for path in ROOT.rglob("*.py"):
        name = _module_name(path)
        if name in LAZY_IMPORTERS:
            continue
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lazy += [f"{name}:{node.lineno} {node.module}" for node in ast.walk(fn)
                         if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rlhfkit")]
    assert not lazy, lazy
