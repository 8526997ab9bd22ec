"""The benchmark scripts keep up with the library: every `rlhfkit` name they import or patch exists,
and each script's --help runs.

The scripts are not run by the test suite (they take minutes), so nothing else notices when a
module they use moves. This walks their syntax trees: every ``import rlhfkit...`` and
``from rlhfkit... import name`` (module level or inside functions), every ``"rlhfkit.mod:name"``
string, and every attribute read or patched on a name bound to an rlhfkit module
(``batches.epoch_order = ...``) must resolve.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import io
import os
import runpy
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(BENCH.glob("*.py"))
SIBLINGS = {p.stem for p in SCRIPTS}  # benchmarks/common.py etc., imported by the others


def _references(tree: ast.AST) -> tuple[list[tuple[int, str, str | None]], list[tuple[int, str, str]]]:
    """(imports, attribute uses): imports as (line, module, name or None); attribute uses as
    (line, module, attribute) for names bound to an imported module."""
    imports: list[tuple[int, str, str | None]] = []
    module_names: dict[str, str] = {}  # local name -> module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "rlhfkit" or a.name in SIBLINGS:
                    imports.append((node.lineno, a.name, None))
                    if a.asname:
                        module_names[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == "rlhfkit" or node.module in SIBLINGS:
                for a in node.names:
                    imports.append((node.lineno, node.module, a.name))
                    full = f"{node.module}.{a.name}"
                    if _is_module(full):
                        module_names[a.asname or a.name] = full
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            s = node.value
            if s.startswith("rlhfkit.") and ":" in s and " " not in s:  # "rlhfkit.trainers.sft:train_sft"
                mod, _, name = s.partition(":")
                imports.append((node.lineno, mod, name))
    uses = [(node.lineno, module_names[node.value.id], node.attr) for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in module_names]
    return imports, uses


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@pytest.fixture
def bench_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_rlhfkit_references_resolve(script, bench_path):
    tree = ast.parse(script.read_text(), filename=str(script))
    imports, uses = _references(tree)
    problems = []
    for line, mod, name in imports:
        try:
            m = importlib.import_module(mod)
        except ImportError as e:
            problems.append(f"{script.name}:{line}: import {mod}: {e}")
            continue
        if name is not None and name != "*" and not hasattr(m, name) and not _is_module(f"{mod}.{name}"):
            problems.append(f"{script.name}:{line}: {mod} has no {name}")
    for line, mod, attr in uses:
        if not hasattr(importlib.import_module(mod), attr):
            problems.append(f"{script.name}:{line}: {mod} has no attribute {attr}")
    assert not problems, "\n".join(problems)


def test_the_walk_catches_a_moved_name(tmp_path):
    """The check itself: a script importing or patching names that do not exist is reported."""
    src = ("from rlhfkit.training import batches\n"
           "def f():\n"
           "    from rlhfkit.trainers.common import build_optimizer\n"
           "    batches.no_such_function = None\n"
           "SPEC = 'rlhfkit.trainers.sft:no_such_trainer'\n")
    imports, uses = _references(ast.parse(src))
    assert (3, "rlhfkit.trainers.common", "build_optimizer") in imports
    assert (5, "rlhfkit.trainers.sft", "no_such_trainer") in imports
    assert (4, "rlhfkit.training.batches", "no_such_function") in uses
    assert not _is_module("rlhfkit.trainers.common")
    assert not hasattr(importlib.import_module("rlhfkit.trainers.sft"), "no_such_trainer")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help_exits_zero(script, bench_path, monkeypatch):
    """``python benchmarks/X.py --help`` prints usage and exits 0 (run in this process: no torch
    start-up per script). Helper modules without a command line are skipped."""
    text = script.read_text()
    if "argparse" not in text or "__main__" not in text:
        pytest.skip("no command line")
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    env = dict(os.environ)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exc:
            runpy.run_path(str(script), run_name="__main__")
    finally:
        os.environ.clear()
        os.environ.update(env)
    assert exc.value.code in (0, None), out.getvalue()
    assert "usage:" in out.getvalue()


def test_rlhflow_compare_tiny_runs_every_arm(tmp_path):
    """``benchmarks/rlhflow_compare.py --tiny``: the whole comparison (SFT, RM, PM, offline DPO,
    online DPO ranked by the RM and by the PM, PPO, one evaluation) as one pipeline on a tiny
    random model, then the tables and the plot, with every number finite."""
    import json
    import math
    import subprocess

    out = tmp_path / "rlhflow"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(BENCH / "rlhflow_compare.py"), "--tiny", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "rlhflow_results.json").read_text())
    finite = lambda *xs: all(isinstance(x, (int, float)) and math.isfinite(x) for x in xs)
    arms = {r["arm"]: r for r in res["arms"]}
    assert set(arms) == {"SFT (start)", "offline", "online-rm", "online-pm", "ppo"}
    for name in ("offline", "online-rm", "online-pm", "ppo"):
        r = arms[name]
        assert finite(r["win"], r["lo"], r["hi"], r["kl"], r["gold"], r["proxy"], r["length"], *r["per_seed"]), r
        assert r["lo"] <= r["win"] <= r["hi"]
    online = [r for r in res["mechanism"] if r["arm"] in ("online-rm", "online-pm")]
    expected = [(arm, k) for arm in ("online-rm", "online-pm") for k in (1, 2, 3)]
    assert [(r["arm"], r["iteration"]) for r in online] == expected
    for r in online:
        assert finite(r["gold_pair_accuracy"], r["gold_pair_margin"], r["pairs"], r["dropped_ties"], r["eval/kl"]), r
    assert {r["a"] for r in res["head_to_head"]} == {"online-rm", "online-pm", "ppo"}
    assert finite(res["judges"]["rm"], res["judges"]["pm"])
    table = (out / "rlhflow_table.md").read_text()
    assert all(f"| {a} |" in table for a in ("offline", "online-rm", "online-pm", "ppo"))
    assert (out / "rlhflow_frontier.png").stat().st_size > 0
