"""docs/methods/ stays true to the code: every key in a page's "keys that matter" table exists on
its command's config class with the default the page states, every shipped-config value it quotes
is the one in configs/, and every metric name it gives is one the trainers write."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from rlhfkit.registry import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "methods"
PAGES = {"sft.md": ("sft", "sft"), "rm.md": ("rm", "rm"), "pm.md": ("pm", "pm"), "ppo.md": ("ppo", "ppo"),
         "grpo_rloo.md": ("grpo", "grpo"), "dpo.md": ("dpo", "dpo"), "online_dpo.md": ("online-dpo", "online_dpo"),
         "eval.md": ("eval", None)}
# Metrics whose name is composed from a runtime prefix (`judges.reward_set.reward_metrics`).
COMPOSED = {"reward/<name>/mean", "reward/<name>/std", "reward/<name>/scored_frac"}


def _text(page: str) -> str:
    return re.sub(r"```.*?```", "", (DOCS / page).read_text(), flags=re.S)


def _rows(page: str):
    """(keys, documented defaults, documented shipped values or None) of the keys table."""
    section = _text(page).split("## The keys that matter")[1].split("\n## ")[0]
    for row in section.splitlines():
        if not row.startswith("| `"):
            continue
        cells = [c.strip() for c in row.strip("|").split("|")]
        keys = re.findall(r"`([^`]+)`", cells[0])
        sep = " / " if " / " in cells[0] else ", "
        split = (lambda c: [x.strip() for x in c.split(sep)]) if len(keys) > 1 else (lambda c: [c])
        shipped = split(cells[2]) if len(cells) == 4 else None
        yield keys, split(cells[1]), shipped


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part) if not isinstance(obj, dict) else obj[part]
    return obj


def _same(doc: str, value) -> bool:
    doc = re.sub(r"\s*\(.*\)$", "", doc).strip("`").strip()
    if doc == "" or doc == "(required)":  # a required key: its empty default is refused at load time
        return value in ("", [], None)
    text = {None: "null", True: "true", False: "false", "": '""'}.get(value, value) \
        if not isinstance(value, (list, float, int)) or isinstance(value, bool) else value
    if isinstance(value, list):  # as YAML's flow style writes it: [a, b]
        text = f"[{', '.join(map(str, value))}]"
    if str(text) == doc:
        return True
    try:
        return float(doc) == float(value)
    except (TypeError, ValueError):
        return False


@pytest.mark.parametrize("page", sorted(PAGES))
def test_keys_and_defaults_match_the_config(page):
    command, shipped_name = PAGES[page]
    cfg = COMMANDS[command].config_class()()
    shipped = yaml.safe_load((ROOT / "configs" / f"{shipped_name}.yaml").read_text()) if shipped_name else None
    rows = list(_rows(page))
    assert rows, f"{page}: no keys table"
    for keys, defaults, shipped_values in rows:
        for i, key in enumerate(keys):
            value = _get(cfg, key)  # AttributeError names a key the config does not have
            doc = defaults[min(i, len(defaults) - 1)]
            assert _same(doc, value), f"{page}: {key} documented default {doc!r}, the code's is {value!r}"
            if shipped is None or shipped_values is None:
                continue
            doc = shipped_values[min(i, len(shipped_values) - 1)]
            try:
                in_yaml = _get(shipped, key)
            except (KeyError, TypeError):
                assert doc in ("-", "same"), f"{page}: {key} is not set in configs/{shipped_name}.yaml"
                continue
            expected = defaults[min(i, len(defaults) - 1)] if doc == "same" else doc
            assert doc != "-" and _same(expected, in_yaml), \
                f"{page}: {key} in configs/{shipped_name}.yaml is {in_yaml!r}, the page says {doc!r}"


def _source_strings() -> tuple[set[str], list[re.Pattern]]:
    """String constants of the code that writes metrics, and the f-strings as patterns."""
    literals, patterns = set(), []
    for path in (ROOT / "src" / "rlhfkit").rglob("*.py"):
        if "report" in path.parts:  # reads metrics, does not write them
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                literals.add(node.value)
            elif isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
                parts = [re.escape(v.value) if isinstance(v, ast.Constant) else "(.+)" for v in node.values]
                patterns.append(re.compile("".join(parts)))
    return literals, patterns


def _documented_metrics() -> set[tuple[str, str]]:
    out = set()
    for page in PAGES:
        for span in re.findall(r"`([^`]+)`", _text(page)):
            if ("=" in span or ":" in span or re.search(r"\.(md|yaml|jsonl?|py)\b", span)
                    or re.search(r"output_dir|runs/|^rlhfkit ", span)):  # commands and paths
                continue
            out |= {(page, m) for m in re.findall(r"[a-z_0-9<>]+(?:/[a-z_0-9<>]+)+", span)}
    return out


def _written(metric: str, literals: set[str], patterns: list[re.Pattern]) -> bool:
    if metric in literals or metric in COMPOSED:
        return True
    concrete = re.sub(r"<[^>]+>", "x", metric)
    for p in patterns:
        m = p.fullmatch(concrete)
        if m is None:
            continue
        # each runtime part must be a placeholder of the page or a string the code writes
        if all("x" == g or g in literals for g in m.groups()):
            return True
    return False


def test_every_documented_metric_is_written_by_the_code():
    literals, patterns = _source_strings()
    documented = _documented_metrics()
    assert len(documented) > 50
    missing = sorted(f"{page}: {m}" for page, m in documented if not _written(m, literals, patterns))
    assert not missing, "metrics named in docs/methods that no trainer writes:\n" + "\n".join(missing)


def test_the_metric_check_catches_a_wrong_name():
    literals, patterns = _source_strings()
    assert _written("policy/clipfrac", literals, patterns)
    assert _written("train/rewards/margin", literals, patterns)  # f"train/{k}" over the DPO metric keys
    assert not _written("policy/clip_frac", literals, patterns)
    assert not _written("train/rewards/margins", literals, patterns)
