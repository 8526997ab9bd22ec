"""Optional packages (the pip extras) are imported where they are used; a missing one is one line
naming the extra to install. Each is simulated missing with `conftest.uninstall` (sys.modules[name] = None)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
from conftest import uninstall

import rlhfkit
from rlhfkit import cli
from rlhfkit.config.extras import MissingDependency

OPTIONAL = {"vaderSentiment", "gguf", "matplotlib", "tensorboard", "wandb", "mlflow", "deepspeed"}


def _required(node) -> str | None:
    """The package of a module-level ``x = require("pkg...", ...)``."""
    call = getattr(node, "value", None)
    if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "require" and call.args:
        return call.args[0].value.split(".")[0]
    return None


def test_no_module_level_import_of_an_optional_package():
    """Imported inside the functions that use them, or after a module-level require()."""
    root = Path(rlhfkit.__file__).parent
    found = []
    for path in root.rglob("*.py"):
        checked = set()
        for node in ast.parse(path.read_text()).body:
            checked.add(_required(node))
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [(path.name, n) for n in names if n.split(".")[0] in OPTIONAL - checked]
    assert not found, found


def test_sentiment_gold_judge_without_vader(monkeypatch):
    from rlhfkit.tasks.sentiment import SentimentTask

    uninstall(monkeypatch, "vaderSentiment")
    with pytest.raises(MissingDependency, match=r"sentiment task.*pip install 'rlhfkit\[tasks\]'$"):
        SentimentTask().gold_scores(["p"], ["a lovely day"])


def test_gguf_model_without_gguf(monkeypatch, tmp_path):
    from rlhfkit.models import loading

    uninstall(monkeypatch, "gguf")
    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(MissingDependency, match=r"m.gguf needs the package gguf.*'rlhfkit\[default-model\]'"):
        loading.resolve_model_path(str(tmp_path / "m.gguf"))


def test_report_without_matplotlib(monkeypatch, tmp_path, capsys):
    for name in [m for m in sys.modules if m == "rlhfkit.report" or m.startswith("rlhfkit.report.")]:
        monkeypatch.delitem(sys.modules, name)
    uninstall(monkeypatch, "matplotlib")
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'rlhfkit[report]'" in err[0], err


def test_pipeline_without_matplotlib_stops_before_any_stage(monkeypatch, tmp_path):
    from rlhfkit import pipeline

    uninstall(monkeypatch, "matplotlib")
    monkeypatch.setattr(pipeline, "plan", lambda path, overrides: (None, []))
    with pytest.raises(MissingDependency, match=r"report.html.*'rlhfkit\[report\]'"):
        pipeline.run_pipeline(None)


def test_zero_without_deepspeed(monkeypatch):
    from rlhfkit.parallel.zero import require_deepspeed

    uninstall(monkeypatch, "deepspeed")
    with pytest.raises(MissingDependency,
                       match=r"train.zero_stage needs the package deepspeed.*'rlhfkit\[deepspeed\]'"):
        require_deepspeed()
