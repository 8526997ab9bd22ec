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
import json
import os
import re
import runpy
import subprocess
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


def test_bench_scaling_tiny(tmp_path):
    """``bench_scaling.py --tiny`` end to end: SFT, DPO and GRPO at two lengths, each point in its own
    process, then the tables, the JSON and the plot (its timings mean nothing)."""
    cmd = [sys.executable, str(BENCH / "bench_scaling.py"), "--tiny", "--threads", "1", "--out", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    points = json.loads((tmp_path / "scaling.json").read_text())["points"]
    assert [(p["method"], p["length"]) for p in points] == [(m, n) for m in ("sft", "dpo", "grpo") for n in (16, 32)]
    assert all("error" not in p for p in points), points
    assert all(p["peak GB"] > 0.1 and p["s/step"] > 0 and p["GFLOP/s"] > 0 for p in points)
    assert all(p["rel"] == 1.0 for p in points if p["length"] == 16)
    grpo = [p for p in points if p["method"] == "grpo"]
    assert all(p["gen s"] > 0 and p["score s"] > 0 and p["update s"] > 0 for p in grpo)
    text = (tmp_path / "scaling.md").read_text()
    assert all(f"### {m}" in text for m in ("SFT", "DPO", "GRPO")) and "generation / scoring / update" in text
    assert (tmp_path / "scaling.png").stat().st_size > 1000


def test_bench_scaling_tables(bench_path):
    """The table cells: a skipped point says "not run", a failed one its error, a cost per token
    above 1.30 of the shortest length's is bold."""
    import argparse

    import bench_scaling

    def point(length, ms):
        return {"method": "sft", "length": length, "batch": 4, "tokens": 4 * length, "s/step": ms * length * 4e-3,
                "ms/token": ms, "peak GB": 1.0}

    results = [point(128, 2.0), point(256, 2.2), point(512, 2.8), {"method": "sft", "length": 128, "batch": 8,
                                                                   "error": "ValueError: boom"}]
    bench_scaling.relative_costs(results)
    args = argparse.Namespace(model="m", steps=1, methods=["sft"], lengths=[128, 256, 512, 1024], batches=[4, 8],
                              max_batch_tokens=2048)
    text = bench_scaling.markdown(results, args, peak=100.0)
    rows = {line.split("|")[1].strip(): line for line in text.splitlines()
            if line.startswith("| ") and "length" not in line}
    assert "x1.00" in rows["128"] and "failed: ValueError: boom" in rows["128"]
    assert "x1.10" in rows["256"] and "**" not in rows["256"]
    assert "**x1.40**" in rows["512"]
    assert rows["1024"].count("not run (b x L > 2048)") == 2
    assert rows["256"].endswith("| not run |")  # within the limit, but not measured


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

    # fewer arms: the finished evaluation has other settings, so the run is refused until --re-eval,
    # which sets it aside and evaluates again with the trained arms reused
    again = [sys.executable, str(BENCH / "rlhflow_compare.py"), "--tiny", "--out", str(out), "--arms", "offline,ppo"]
    proc = subprocess.run(again, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode != 0 and "eval-s0" in proc.stderr and "--re-eval" in proc.stderr, proc.stderr[-2000:]
    trained = (out / "ppo-s0" / "DONE").stat().st_mtime
    proc = subprocess.run([*again, "--re-eval"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "ppo-s0" / "DONE").stat().st_mtime == trained
    aside = list(out.glob("eval-s0.before-*"))
    assert len(aside) == 1 and (aside[0] / "eval_results.json").is_file()
    res = json.loads((out / "rlhflow_results.json").read_text())
    assert {r["arm"] for r in res["arms"]} == {"SFT (start)", "offline", "ppo"}


def _feature_file(path, n, seed, signal_key, hidden=8):
    """A cached-features file as ``rm_study.py features`` writes it, with pure noise except in
    ``signal_key``, where chosen minus rejected points along the first axis."""
    import torch

    g = torch.Generator().manual_seed(seed)
    feats = {}
    for layer in ("final", "8", "16"):
        for pool in ("last", "mean", "mean_all"):
            x = torch.randn(n, 2, hidden, generator=g)
            if f"{layer}/{pool}" == signal_key:
                x[:, 0, 0] += 1.5
            feats[f"{layer}/{pool}"] = x
    torch.save({"feats": feats, "lengths": torch.randint(3, 9, (n, 2), generator=g), "gold_c": torch.ones(n),
                "gold_r": torch.zeros(n), "prompts": [f"p{i}" for i in range(n)]}, path)


def test_rm_study_recipe_tiny(tmp_path):
    """``rm_study.py probes --set recipe`` on synthetic cached features: per pooling the final layer
    and the intermediate layer chosen by CV on the training pairs (here layer 16, where the signal is)."""
    _feature_file(tmp_path / "train.pt", 96, 0, "16/mean")
    _feature_file(tmp_path / "eval.pt", 64, 1, "16/mean")
    cmd = [sys.executable, str(BENCH / "rm_study.py"), "probes", "--train", str(tmp_path / "train.pt"),
           "--eval", str(tmp_path / "eval.pt"), "--set", "recipe", "--json", str(tmp_path / "recipe.json")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    rows = {r["name"]: r for r in json.loads((tmp_path / "recipe.json").read_text())}
    assert 0.0 <= rows.pop("shorter response (no model)")["acc"] <= 1.0
    assert len(rows) == 6 and {"final/last", "final/mean", "final/sum", "16/mean (layer by CV)"} <= set(rows)
    assert sorted(r["pooling"] for r in rows.values()) == ["last", "last", "mean", "mean", "sum", "sum"]
    assert all(r["layer"] in (8, 16) for r in rows.values() if r["name"].endswith("(layer by CV)"))
    chosen = rows["16/mean (layer by CV)"]
    assert chosen["chosen_from"]["16"] > chosen["chosen_from"]["8"] and chosen["acc"] > 0.75
    assert 0.3 < rows["final/mean"]["acc"] < 0.7 and rows["final/mean"]["chosen_from"] is None
    assert all(0.0 <= r["acc_ci"][0] <= r["acc"] <= r["acc_ci"][1] <= 1.0 for r in rows.values())


def test_rm_study_gold_labels_fit_the_gold_ordering_of_the_same_pairs(bench_path):
    """``probes`` with ``labels="gold"``: here the gold-better reply of each pair sits along the first
    feature, while the annotator chose by the second, which says nothing about gold. The probe on the
    annotator's labels ranks held-out pairs at chance by gold; on the gold ordering of the same pairs
    (ties dropped) it ranks them almost all right."""
    import torch

    import rm_data
    import rm_study

    def pairs(n, seed):
        g = torch.Generator().manual_seed(seed)
        better, worse = torch.randn(n, 6, generator=g), torch.randn(n, 6, generator=g)
        better[:, 0] += 2.0
        first = better[:, 1] > worse[:, 1]  # whether the annotator chose the gold-better reply
        gold_c, gold_r = first.double(), (~first).double()
        gold_c[:8] = gold_r[:8] = 0.5  # gold ties: no gold order, dropped from a gold-label fit
        d = torch.where(first[:, None], better - worse, worse - better)
        return {"feats": {"8/mean": d}, "gold_c": gold_c, "gold_r": gold_r, "prompts": [f"p{i}" for i in range(n)]}

    train, held = pairs(400, 0), pairs(200, 1)
    got = {}
    for labels in ("annotator", "gold"):
        margins, _ = rm_study.probe_margins(train, held, "8/mean", labels=labels)
        got[labels] = rm_data.pair_metrics(margins, held["gold_c"], held["gold_r"], held["prompts"])["gold_acc"]
    assert 0.35 < got["annotator"] < 0.65 and got["gold"] > 0.9
    with pytest.raises(ValueError, match="labels"):
        rm_study.probe_margins(train, held, "8/mean", labels="golden")


def test_rm_study_gold_labels_file_turns_pairs_to_the_gold_order(bench_path, tmp_path):
    """``rm_study.py gold-labels``: a pair whose rejected reply has the higher gold score is turned
    round, a gold tie is dropped, the rest is kept as it was."""
    import rm_data

    rows = [{"prompt": "a", "chosen": "x", "rejected": "y", "gold_chosen": 0.9, "gold_rejected": 0.1},
            {"prompt": "b", "chosen": "x", "rejected": "y", "gold_chosen": 0.2, "gold_rejected": 0.7, "category": "c"},
            {"prompt": "c", "chosen": "x", "rejected": "y", "gold_chosen": 0.5, "gold_rejected": 0.5}]
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert rm_data.write_gold_labels([str(src)], str(tmp_path / "gold.jsonl")) == {"pairs": 2, "turned": 1, "ties": 1}
    out = [json.loads(x) for x in (tmp_path / "gold.jsonl").read_text().splitlines()]
    assert out[0] == rows[0]
    assert out[1] == {"prompt": "b", "chosen": "y", "rejected": "x", "gold_chosen": 0.7, "gold_rejected": 0.2,
                      "category": "c"}


def test_rm_heads_mlp_learns_a_preference_no_linear_probe_can(bench_path):
    """``rm_heads.py``: the chosen reply's first feature is far from 0 in either direction, the
    rejected reply's near 0. A linear head sees chosen-minus-rejected differences of random sign
    (chance); the MLP head, picked by CV on the training pairs, learns |x| and ranks held-out pairs."""
    import torch

    import rm_heads

    def pairs(n, seed):
        g = torch.Generator().manual_seed(seed)
        feats = {}
        for layer in ("8", "16"):
            x = torch.randn(n, 2, 6, generator=g)
            sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
            x[:, 0, 0] = sign * (2.5 + 0.3 * torch.randn(n, generator=g))
            x[:, 1, 0] = 0.3 * torch.randn(n, generator=g)
            feats[f"{layer}/mean"] = x
        return {"feats": feats, "gold_c": torch.ones(n), "gold_r": torch.zeros(n), "prompts": [f"p{i}" for i in range(n)]}

    grid = {"hidden": (16,), "wd": (0.01, 1.0), "epochs": (60,), "dropout": (0.0,), "lr": (1e-2,)}
    rows = {r["name"]: r for r in rm_heads.head_table(pairs(256, 0), pairs(128, 1), grid=grid, seeds=2,
                                                      concats=(("8", "16"),))}
    assert set(rows) == {"linear, layer 8", "linear, layer 16", "linear, layers 8 + 16", "MLP, 8/mean",
                         "MLP, 8/mean, 2 seeds averaged"}
    assert all(0.3 < rows[k]["acc"] < 0.7 for k in rows if k.startswith("linear"))
    assert rows["MLP, 8/mean"]["acc"] > 0.9 and rows["MLP, 8/mean, 2 seeds averaged"]["acc"] > 0.9
    assert rows["MLP, 8/mean"]["cv"] > 0.9 and rows["MLP, 8/mean"]["config"] in [
        {"hidden": 16, "wd": wd, "epochs": 60, "dropout": 0.0, "lr": 1e-2} for wd in (0.01, 1.0)]


def test_bench_trl_precomputed_dpo_reads_only_the_pairs_its_steps_use(bench_path, tmp_path):
    """``dpo-precomputed``: both sides compute reference log-probs once over their training set
    before the first step, so the job limits that set to the pairs its steps use (the whole
    shipped set would take TRL half an hour), on the rlhfkit side and on TRL's alike."""
    import argparse

    import bench_trl
    import trl_jobs

    from rlhfkit.config import load_config
    from rlhfkit.registry import COMMANDS

    args = argparse.Namespace(lora=False, dpo_steps=0, steps=3, warmup=2, threads=1, trl_malloc=False)
    spec = bench_trl.job_spec("dpo-precomputed", args, "some/model", tmp_path, [])
    assert "data.limit=20" in spec["overrides"] and spec["steps"] == 5
    assert not any(o.startswith("data.limit") for o in bench_trl.job_spec("dpo", args, "m", tmp_path, [])["overrides"])
    cfg = load_config(COMMANDS["dpo"].config_class(), spec["config"], spec["overrides"])
    assert len(trl_jobs._preference_dataset(cfg)) == 20


def test_bench_trl_fused_scoring_moves_the_first_forward_out_of_the_update(bench_path):
    """With fused scoring the first update forward runs in the score phase: the update phase's
    FLOPs lose one forward (a third of forward + backward) for PPO and GRPO alike, and the step's
    total is the same either way."""
    from types import SimpleNamespace

    import trl_report

    cfg = SimpleNamespace(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=1000, head_dim=16)
    spec = {"epochs": 1, "overrides": []}
    step = {"tokens": {"prompt": 64, "response": 192, "rows": 8, "update": 256}}
    fused = {"tokens": {**step["tokens"], "fused": 1}}
    for method in ("grpo", "ppo"):
        total, update = trl_report.step_flops(method, cfg, step, None, spec)
        total_f, update_f = trl_report.step_flops(method, cfg, fused, None, spec)
        assert update_f < update and abs((update - update_f) / update - 1 / 3) < 1e-9
        assert total_f < total  # the fused forward is counted once (in score), not twice


def test_bench_trl_sft_flops_count_the_head_where_it_runs(bench_path):
    """rlhfkit's SFT runs the LM head on the labelled tokens only: its FLOPs count the head there,
    TRL's on every token; the rest of the model counts on every token for both."""
    from types import SimpleNamespace

    import trl_report
    from common import train_flops_per_token

    cfg = SimpleNamespace(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=1000, head_dim=16)
    data = {"rows": 4, "tokens": 400, "labelled": 250}
    trl, _ = trl_report.step_flops("sft", cfg, {}, data, {})
    ours, _ = trl_report.step_flops("sft", cfg, {}, data, {}, head_on_labelled=True)
    per_head = train_flops_per_token(cfg, 100, lm_head=True) - train_flops_per_token(cfg, 100, lm_head=False)
    assert trl == train_flops_per_token(cfg, 100, lm_head=True) * 400
    assert abs((trl - ours) - per_head * 150) < 1e-6 * trl


def test_bench_prefix_tiny_times_every_layout_and_mode():
    """``bench_prefix.py --tiny``: one round of the three layouts per mode on a tiny model; each
    table row has the three times and three ratios."""
    proc = subprocess.run([sys.executable, str(BENCH / "bench_prefix.py"), "--tiny", "--threads", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "shared prefix 2" in proc.stdout  # the template's system turn: 24-25 tokens
    for mode in ("forward, no grad", "forward + backward"):
        row = next(line for line in proc.stdout.splitlines() if line.startswith(f"| {mode} |"))
        cells = [c.strip() for c in row.strip("|").split("|")][1:]
        assert len(cells) == 6 and all(float(c) > 0 for c in cells[:3]) and all(c.endswith("x") for c in cells[3:])


@pytest.mark.parametrize("compare, columns", [("layout", "K rows (s) | one row (s)"),
                                              ("final-layer", "last layer in full (s) | last layer where read (s)")])
def test_bench_packing_tiny_times_both_sides_and_they_agree(compare, columns):
    """``bench_packing.py --tiny``: every batch and mode runs both ways (K rows and one row; the
    last layer in full and where read); the outputs of the two agree to float rounding."""
    proc = subprocess.run([sys.executable, str(BENCH / "bench_packing.py"), "--tiny", "--threads", "1",
                           "--compare", compare], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"| batch | mode | {columns} | speed-up |" in proc.stdout
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| rm") or line.startswith("| dpo")
            or line.startswith("| grpo")]
    assert [(r[1].strip(), r[2].strip()) for r in rows] == [
        ("rm", "forward + backward"), ("dpo", "forward + backward"), ("dpo", "forward, no grad"),
        ("grpo", "forward + backward"), ("grpo", "forward, no grad")]
    assert all(float(r[6]) < 1e-4 for r in rows)


def test_bench_trl_rm_times_the_model_trl_trains(bench_path, tmp_path):
    """TRL's reward trainer trains every layer with a last-token head: the rlhfkit side of the RM job
    must too, whatever configs/rm.yaml ships (its 8-layer cut would time a quarter of the model)."""
    import argparse

    import bench_trl

    from rlhfkit.config import load_config
    from rlhfkit.registry import COMMANDS

    args = argparse.Namespace(lora=False, dpo_steps=0, steps=3, warmup=2, threads=1, trl_malloc=False)
    spec = bench_trl.job_spec("rm", args, "some/model", tmp_path, [])
    cfg = load_config(COMMANDS["rm"].config_class(), spec["config"], spec["overrides"])
    assert (cfg.backbone_layers, cfg.pooling, cfg.head_init) == (0, "last", "random")
    assert spec["shared_group"] == 2  # the FLOP count knows each pair's prompt is computed once


def test_rm_study_ensemble_weighs_each_rm_by_its_own_scale(bench_path, tmp_path, monkeypatch):
    """``rm_study.py score --rm A B``: the ensemble margin is the mean of each RM's margin over the
    standard deviation of its scores, so an RM on a 1e6 times wider scale does not outvote the other.
    Here A ranks pairs 1-2 right and 3-4 wrong, B the reverse with a larger relative margin: alone each
    is at 0.5, raw sums would follow A (0.5), standardised the ensemble ranks all four right."""
    import torch

    import rm_study

    rows = [{"prompt": f"p{i}", "gold_chosen": 1.0, "gold_rejected": 0.0} for i in range(4)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scores = {"a": (torch.tensor([2.0, 2, 0, 0]) * 1e3, torch.tensor([0.0, 0, 1, 1]) * 1e3),
              "b": (torch.tensor([0.0, 0, 3, 3]) * 1e-3, torch.tensor([1.0, 1, 0, 0]) * 1e-3)}
    monkeypatch.setattr(rm_study, "rm_scores", lambda rm, d, limit=0, batch_size=16: scores[rm])
    out = rm_study.score_ensemble(["a", "b"], str(data))
    assert out["a"]["acc"] == 0.5 and out["b"]["acc"] == 0.5 and out["ensemble"]["acc"] == 1.0
    scores["a"] = tuple(7.0 * s for s in scores["a"])  # rescaling one RM changes nothing
    assert rm_study.score_ensemble(["a", "b"], str(data))["ensemble"]["acc"] == 1.0
    scores["a"] = (scores["a"][0] * 0 + 1, scores["a"][1] * 0)  # A's margin now +1 everywhere
    tied = rm_study.score_ensemble(["a", "b"], str(data))
    assert tied["a"]["acc"] == 1.0 and tied["ensemble"]["acc"] == 1.0


def test_bench_linear_fit_recovers_stream_and_arithmetic_rates(bench_path):
    """``bench_linear.py``'s fit: times made as bytes / 20 GB/s + FLOPs / 150 GFLOP/s give back those two
    rates with no misfit; times made as max() of the two (overlapped) do not fit a line exactly."""
    import bench_linear

    n, k, batches = 1536, 576, [1, 2, 4, 8, 16, 32]
    bytes_, flops_row = n * k * 4, 2 * n * k
    secs = [bytes_ / 20e9 + flops_row * b / 150e9 for b in batches]
    fit = bench_linear.fit_stream_then_compute(bytes_, flops_row, batches, secs)
    assert fit["stream GB/s"] == pytest.approx(20.0) and fit["arith GFLOP/s"] == pytest.approx(150.0)
    assert fit["misfit"] < 1e-9
    overlapped = [max(bytes_ / 20e9, flops_row * b / 150e9) for b in batches]
    assert bench_linear.fit_stream_then_compute(bytes_, flops_row, batches, overlapped)["misfit"] > 0.05
    shapes = bench_linear.decode_shapes(type("C", (), {"hidden_size": 576, "intermediate_size": 1536,
                                                        "vocab_size": 49152, "num_key_value_heads": 3,
                                                        "num_attention_heads": 9})())
    assert shapes == {"qkv": (960, 576), "o": (576, 576), "gate / up": (1536, 576), "down": (576, 1536),
                      "lm head": (49152, 576)}


def test_bench_linear_tiny_runs(tmp_path):
    run = subprocess.run([sys.executable, str(BENCH / "bench_linear.py"), "--tiny", "--batches", "1,4", "--repeats", "1",
                          "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "% roofline" in run.stdout and "stream GB/s" in run.stdout
    # two batches, the fit, and both batches again through the few-row kernel against oneDNN
    assert run.stdout.count("lm head") == 5 and "oneDNN / gemv" in run.stdout


def test_bench_prefix_scorer_runs_on_a_tiny_reward_model(tmp_path, tiny_model_dir, tokenizer):
    """``bench_prefix.py --scorer DIR``: both ways of scoring groups run, and the packed one is
    reported with fewer tokens than row by row."""
    from transformers import AutoModelForSequenceClassification

    from rlhfkit.models import save_pretrained_atomic, set_reward_pooling

    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1,
                                                            pad_token_id=tokenizer.pad_token_id)
    set_reward_pooling(rm, "mean")
    save_pretrained_atomic(rm, tokenizer, tmp_path / "rm")
    run = subprocess.run([sys.executable, str(BENCH / "bench_prefix.py"), "--scorer", str(tmp_path / "rm"),
                          "--rows", "2", "--group", "3", "--pairs", "1", "--threads", "1"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    head = next(line for line in run.stdout.splitlines() if "prompts x 3 replies" in line)
    row_by_row, packed = (int(x) for x in re.findall(r"(\d+) tokens scored row by row, (\d+) packed", head)[0])
    assert packed < row_by_row and run.stdout.rstrip().endswith("x |")


def test_the_trl_benchmark_venvs_install_every_runtime_dependency():
    """`make bench-trl` builds its venvs by hand (TRL's own pins decide transformers and peft there):
    each of rlhfkit's runtime dependencies must be named in that recipe, or be one the recipe's
    packages require (numpy and packaging), else the benchmark measures a different rlhfkit (without
    numba, the decoder's kernels are off)."""
    import tomllib

    root = BENCH.parent
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~ \[]", d, maxsplit=1)[0].lower() for d in deps}
    recipe = re.search(r"define bench_venv\n(.*?)\nendef", (root / "Makefile").read_text(), re.S).group(1)
    installed = set(re.findall(r"[A-Za-z][\w.-]*", recipe.lower()))
    assert names - installed <= {"numpy", "packaging"}, names - installed


def _token_pairs(n, seed, dim=6):
    """Per-token caches as ``rm_token_heads.py features`` writes them: every reply has six tokens
    near 0, and the chosen reply's third token has feature 0 far from 0, of random sign."""
    import torch

    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        c, r = 0.3 * torch.randn(6, dim, generator=g), 0.3 * torch.randn(6, dim, generator=g)
        c[2, 0] = (1 if torch.rand(1, generator=g) < 0.5 else -1) * 3.0
        pairs.append([c.half(), r.half()])
    return {"tok": {0: pairs}, "gold_c": torch.ones(n), "gold_r": torch.zeros(n), "prompts": [f"p{i}" for i in range(n)]}


def test_rm_token_heads_token_mlp_learns_what_no_pooled_linear_probe_can(bench_path):
    """``rm_token_heads.py``: one token of the chosen reply stands out in either direction. A
    linear head on the pooled features sees a difference of random sign (chance); the MLP applied
    to every token and then pooled learns |x| and ranks held-out pairs, mean- and sum-pooled, and
    its settings are the ones the held-out fifth of the training prompts picked."""
    import rm_token_heads

    grid = {"hidden": (16,), "wd": (0.01,), "epochs": (10, 80)}
    rows = {r["name"]: r for r in rm_token_heads.head_table(_token_pairs(256, 0), _token_pairs(128, 1), (0,),
                                                            seeds=2, grid=grid)}
    assert all(0.3 < rows[f"linear probe, layer 0, {p}, {r}"]["acc"] < 0.7
               for p in ("mean", "sum") for r in ("one_se", "best"))
    for pool in ("mean", "sum"):
        assert rows[f"token MLP, layer 0, {pool}, seed 0"]["acc"] > 0.9
        assert rows[f"token MLP, layer 0, {pool}, 2 seeds averaged"]["acc"] > 0.9
        assert rows[f"token MLP, layer 0, {pool}, seed 1"]["config"]["epochs"] in (10, 80)
    sizes = rm_token_heads.size_table(_token_pairs(256, 0), _token_pairs(128, 1), (0,), [16, 256],
                                      {"hidden": 16, "wd": 0.01, "epochs": 80}, "sum", seeds=2)
    assert [s["pairs"] for s in sizes] == [16, 256] and sizes[1]["acc"] > 0.9
    assert sizes[1]["ensemble"]["acc"] > 0.9 and sizes[0]["ensemble"]["pairs"] == 128
    assert 0.3 < sizes[1]["linear"]["acc"] < 0.7


def test_rm_token_heads_pools_each_reply_over_its_own_tokens(bench_path):
    """``TokenPairs``: standardised with the training matrix's statistics, the margin of a pair is
    the pooled net output of its chosen tokens minus its rejected ones, each reply its own length."""
    import torch

    import rm_token_heads

    c, r = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]])
    data = rm_token_heads.TokenPairs({"tok": {0: [[c, r]]}}, (0,), (torch.zeros(2), torch.ones(2)))
    net = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.ones_(net.weight)
    mean = data.margins(net, torch.tensor([0]), "mean")
    total = data.margins(net, torch.tensor([0]), "sum")
    assert torch.allclose(mean, torch.tensor([(3 + 7) / 2 - (11 + 15 + 19) / 3]))
    assert torch.allclose(total, torch.tensor([(10 - 45) / rm_token_heads.SUM_SCALE]))
    assert torch.allclose(data.pooled("sum")[0], torch.stack([c.sum(0), r.sum(0)]))


def test_rm_study_paired_difference_is_exact_and_narrower_than_either_interval(bench_path):
    """``rm_data.paired_difference``: the difference of two RMs' accuracies on the same pairs is the
    difference of their accuracies (ties count half), the counts of pairs only one of them ranks
    right are exact, and its interval is that of one bootstrap over both: two RMs that agree on
    most pairs get an interval around the true difference that excludes 0 and is narrower than
    either accuracy's (whose intervals overlap here); an RM against itself gets exactly [0, 0]."""
    import torch

    import rm_data

    g = torch.Generator().manual_seed(0)
    n = 400
    prompts = [f"p{i // 2}" for i in range(n)]  # two pairs per prompt
    gold_c, gold_r = torch.ones(n), torch.zeros(n)
    gold_r[:10] = 1.0  # ten gold ties, left out of the gold columns
    base = torch.where(torch.rand(n, generator=g) < 0.7, 1.0, -1.0)
    other = base.clone()
    wrong = (base < 0).nonzero().flatten()
    other[wrong[:30]] = 1.0  # other ranks 30 more pairs right ...
    right = (base > 0).nonzero().flatten()
    other[right[:6]] = 0.0  # ... and ties 6 that base ranked right (half a hit each)
    d = rm_data.paired_difference(base, other, gold_c, gold_r, prompts)
    a = rm_data.pair_metrics(base, gold_c, gold_r, prompts)
    b = rm_data.pair_metrics(other, gold_c, gold_r, prompts)
    assert d["diff"] == pytest.approx(b["acc"] - a["acc"]) == pytest.approx((30 - 3) / n)
    assert a["acc_ci"][1] > b["acc_ci"][0]  # unpaired, the two intervals overlap
    assert d["gold_diff"] == pytest.approx(b["gold_acc"] - a["gold_acc"])
    assert (d["only_other"], d["only_base"]) == (30, 0)  # a tie is neither right nor wrong
    lo, hi = d["diff_ci"]
    widths = [m["acc_ci"][1] - m["acc_ci"][0] for m in (a, b)]
    assert 0 < lo < d["diff"] < hi and hi - lo < 0.8 * min(widths)
    same = rm_data.paired_difference(base, base, gold_c, gold_r, prompts)
    assert same["diff"] == 0 and same["diff_ci"] == [0.0, 0.0] and same["gold_diff_ci"] == [0.0, 0.0]
