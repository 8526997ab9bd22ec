"""What report.html shows of a run's numbers: intervals, breakdowns, every logged metric, and text
from the run that matplotlib or the page must show literally."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import write_jsonl

from rlhfkit.report import build_report, collect, plots
from rlhfkit.report.sections import num


def _stage(run, name, kind, rows, config=None):
    d = run / name
    d.mkdir(parents=True)
    write_jsonl(d / "metrics.jsonl", rows)
    (d / f"{kind}_config.yaml").write_text(yaml.safe_dump(config or {"model": {"name": "m"}}))
    (d / f"{kind}_results.json").write_text("{}")
    return d


def _eval(run, policy: dict, raw: dict | None = None):
    d = run / "eval"
    d.mkdir(parents=True, exist_ok=True)
    ci = lambda m: {"mean": m, "ci_low": m - 0.05, "ci_high": m + 0.05, "n": 3}
    ev = {"prompts": 3, "samples_per_prompt": 1, **(raw or {}),
          "baseline": {"model": "base", "gold_mean": ci(0.1), "length_tokens": 30.0, "length_chars": 120.0, "samples": 3},
          "policies": {"trained": {"model": "x", "gold_mean": ci(0.4), "length_tokens": 35.0, "samples": 3,
                                   "win_rate": {"gold": {"win_rate": 0.7, "ci_low": 0.6, "ci_high": 0.95, "n": 3}},
                                   **policy}}}
    (d / "eval_results.json").write_text(json.dumps(ev))
    (d / "eval_config.yaml").write_text("policies: [x]\n")
    return d


def _section(page: str, start: str, end: str = "</table>") -> str:
    part = page[page.index(start):]
    return part[:part.index(end)]


def _figure(monkeypatch):
    """The matplotlib figure the next plot function draws, instead of its <img>."""
    shown = []
    monkeypatch.setattr(plots, "to_img", lambda fig, alt: shown.append(fig) or "<img>")
    return shown


@pytest.mark.parametrize("value, shown", [(-0.0, "0.000"), (-0.0002, "0.000"), (-0.0006, "-0.001"), (None, "&mdash;"),
                                          (float("nan"), "&mdash;"), (3, "3.000"), (-1234.4, "-1234")])
def test_a_number_is_never_minus_zero_or_none(value, shown):
    assert num(value) == shown


def test_the_preference_set_shows_each_judges_accuracy_with_its_interval_and_by_category(tmp_path):
    """`rlhfkit eval`'s preference_set: accuracy with Wilson's interval, the margin, and the
    accuracy of each category for each judge (RewardBench's table)."""
    ps = {"gold": {"accuracy": 0.8, "pairs": 100, "by_category": {"news": {"accuracy": 1.0, "pairs": 12},
                                                                   "story": {"accuracy": 0.75, "pairs": 88}}},
          "proxy": {"accuracy": 0.6, "pairs": 100, "margin": 0.25, "by_category": {"story": {"accuracy": 0.5, "pairs": 88}}}}
    run = tmp_path / "run"
    _eval(run, {}, {"preference_set": ps})
    page = build_report([run]).read_text()
    overall = _section(page, "<h4>Accuracy on the labelled preference set")
    assert "gold judge</td><td><b>0.800</b> [0.711, 0.867]</td><td>100</td><td></td>" in overall
    assert "<td><b>0.600</b> [0.502, 0.691]</td><td>100</td><td>0.250</td>" in overall
    cats = _section(page, "<th>category</th>")
    assert "<td>news</td><td><b>1.000</b> [0.758, 1.000] (n = 12)</td><td>&mdash;</td>" in cats
    assert "<td>story</td><td><b>0.750</b> [0.650, 0.829] (n = 88)</td><td><b>0.500</b> [0.398, 0.602] (n = 88)</td>" in cats


def test_a_preference_model_right_on_every_pair_has_an_interval_of_some_width(tmp_path):
    pm = _stage(tmp_path, "pm", "pm", [{"step": 1, "train/loss": 0.7}])
    (pm / "pm_results.json").write_text(json.dumps({"pairs": {"eval": 12}, "pm": {
        "accuracy": 1.0, "accuracy_single_order": 1.0, "position_bias": -0.0}}))
    table = _section(build_report([pm]).read_text(), "<h3>Preference model, held-out pairs")
    assert "<b>1.000</b> [0.758, 1.000]" in table and "-0.000" not in table and "<td>0.000</td>" in table


def test_an_evaluation_with_null_figures_shows_dashes_not_none_or_a_traceback(tmp_path):
    run = tmp_path / "run"
    _eval(run, {"length_chars": None, "kl": {"mean": -0.0002, "ci_low": -0.001, "ci_high": 0.0006, "n": 3},
                "gold_mean": {"mean": None, "ci_low": None, "ci_high": None, "n": 3}})
    page = build_report([run]).read_text()
    assert "35.0 tokens</td>" in page and "nan" not in page.lower().replace("nans", "")
    assert "None" not in page and "-0.000" not in page and "KL 0.000 nats" in page


def test_a_change_below_the_shown_precision_is_not_called_worse(tmp_path):
    run = tmp_path / "run"
    _eval(run, {"alignment_tax": {"sft_nll": 2.50003, "sft_nll_delta": 3.2e-5,
                                  "capability_exact_match": 0.5, "capability_exact_match_delta": -0.25}})
    tax = _section(build_report([run]).read_text(), "<h4>Alignment tax")
    assert "&plusmn;0.000 vs baseline</div>" in tax and "-0.250 vs baseline (worse)" in tax
    assert tax.count("(worse)") == 1


def test_report_of_the_current_directory_names_the_stage_by_its_folder(tmp_path, monkeypatch):
    ppo = _stage(tmp_path, "ppo", "ppo", [{"step": s, "reward/score_mean": 0.1 * s} for s in (1, 2)])
    monkeypatch.chdir(ppo)
    data = collect([ppo.relative_to(ppo)])
    assert list(data["stages"]) == ["ppo"] and [st.name for st in data["stages"]["ppo"]] == ["ppo"]
    page = build_report(["."]).read_text()
    assert "<h3>ppo (ppo)" not in page and "<h3>ppo</h3>" in page and "<td>ppo</td><td>ppo</td>" in page


def test_every_logged_metric_is_drawn_or_listed(tmp_path):
    """The held-out proxy reward, KL and length are drawn, a breakdown by category in one panel,
    and what no panel draws is in a table with its first, last, lowest and highest value."""
    rows = [{"step": s, "eval/proxy_mean": 1.0 + s, "eval/kl": 0.1 * s, "eval/length_mean": 30.0,
             "eval/accuracy": 0.6, "eval/accuracy/news": 0.5 + 0.1 * s, "eval/accuracy/story": 0.7,
             "policy/clipfrac": [0.2, 0.05, 0.1][s], "train/lr": 1e-5} for s in range(3)]
    st = _stage(tmp_path, "ppo", "ppo", rows)
    page = build_report([st]).read_text()
    for alt in ("ppo Held-out proxy reward", "ppo Held-out KL to reference", "ppo Held-out response length",
                "ppo Held-out accuracy by category"):
        assert f'alt="{alt}"' in page, alt
    rest = _section(page, "ppo: 2 other logged metric(s), not drawn")
    assert ("<td>policy/clipfrac</td><td>3</td><td>0.200 <span class='unit'>(step 0)</span></td>"
            "<td>0.100 <span class='unit'>(step 2)</span></td><td>0.050 <span class='unit'>(step 1)</span></td>"
            "<td>0.200 <span class='unit'>(step 0)</span></td>") in rest
    assert "train/lr" in rest and "eval/kl" not in rest and "eval/accuracy/news" not in rest


def test_a_metric_panel_shows_the_values_on_its_ticks_without_an_offset(monkeypatch):
    shown = _figure(monkeypatch)
    plots.metric_panel("Held-out loss", "loss", [("eval/loss", [0, 1, 2], [10.8245, 10.8255, 10.8261])], False, "x")
    (ax,) = shown[0].axes
    shown[0].canvas.draw()
    assert ax.yaxis.get_major_formatter().get_offset() == ""
    assert all(float(t.get_text().replace("\u2212", "-")) > 10 for t in ax.get_yticklabels() if t.get_text())


def test_a_long_time_split_draws_at_most_max_bars_and_keeps_the_shares(monkeypatch):
    from rlhfkit.report.data import Stage

    rows = [{"step": s, "time/rollout": 1.0, "time/update": 0.5 + (s % 2)} for s in range(1, 5001)]
    shown = _figure(monkeypatch)
    plots.time_split("", Stage(name="ppo", kind="ppo", path=None, rows=rows))
    (ax,) = shown[0].axes
    assert len(ax.patches) == 2 * plots.MAX_BARS  # 5000 iterations in bars of 42, two phases
    assert "mean of 42" in ax.get_xlabel()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["rollout (50%, 1.0 s/iter)", "update (50%, 1.0 s/iter)"]
    assert max(p.get_height() for p in ax.patches) == pytest.approx(1.0, abs=0.02)  # means, not sums


@pytest.mark.parametrize("name", ["_old", "a$b$c", "x$\\frac{1}{0$"])
def test_run_names_are_drawn_as_written(tmp_path, monkeypatch, name):
    """A name with "$" is not mathtext (an unbalanced one stopped the report), and one starting
    with "_" still has its legend entry."""
    shown = _figure(monkeypatch)
    runs = []
    for d in (tmp_path / name, tmp_path / "b"):
        runs.append(_stage(d, "ppo", "ppo", [{"step": s, "reward/score_mean": 0.1 * s} for s in (1, 2)]).parent)
    build_report(runs, tmp_path / "cmp.html")
    fig = shown[0]
    fig.canvas.draw()
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend[0].strip().replace("\\$", "$").startswith(f"{name}: reward/score_mean") and len(legend) == 2


def test_win_rates_are_written_beside_the_names(monkeypatch):
    shown = _figure(monkeypatch)
    plots.winrate_plot([("ppo\n(gold judge)", 0.9, 0.82, 0.97)])
    ticks = [t.get_text() for t in shown[0].axes[0].get_yticklabels()]
    assert ticks == ["ppo\n(gold judge)\n0.900 [0.820, 0.970]"] and not shown[0].axes[0].texts


@pytest.mark.parametrize("file, text, lost", [
    ("pipeline.yaml", "stages: [unclosed\n", "the stage order"),
    ("run_info.json", '{"stages": [', "stage times"),
    ("ppo/ppo_config.yaml", "model: {name: [\n", "its settings are not shown"),
])
def test_a_damaged_side_file_is_a_warning_and_the_rest_is_shown(tmp_path, file, text, lost):
    run = tmp_path / "run"
    _stage(run, "ppo", "ppo", [{"step": s, "reward/score_mean": 0.1 * s} for s in (1, 2)])
    (run / file).write_text(text)
    page = build_report([run]).read_text()
    (w,) = [w for w in json.loads((run / "report_warnings.json").read_text()) if w["kind"] == "unreadable"]
    assert w["path"] == str(run / file) and lost in w["message"] and "could not be read (" in w["message"]
    assert 'alt="ppo Reward"' in page


def test_stage_times_unknown_total_is_a_dash_and_long_responses_fold(tmp_path):
    run = tmp_path / "run"
    for name in ("a", "b"):
        _stage(run, name, "sft", [{"step": 1, "train/loss": 1.0}])
    write_jsonl(run / "a" / "samples.jsonl", [{"step": 1, "prompt": "p", "response": "word " * 1000, "score": 1.0}])
    page = build_report([run]).read_text()
    assert "<th colspan='3'>all stages</th><th colspan='2'>&mdash;</th>" in page
    assert "<details><summary>the other 3500 characters</summary>" in page
    assert "<meta name='viewport' content='width=device-width, initial-scale=1'>" in page
