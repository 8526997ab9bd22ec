"""The report's pure parts: warnings (KL spikes, held-out direction), smoothing, run information,
and the frontier figure's label placement."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from rlhfkit.report.checks import held_out_trends, higher_is_better, kl_spikes
from rlhfkit.report.plots import scatter_label, smooth
from rlhfkit.runinfo import environment, package_versions, write_run_info

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from dpo_frontier import PUBLISHED, label_offsets  # noqa: E402


def test_smooth_is_a_debiased_ema():
    # span 3 -> w = 0.5: s1 = 1, s2 = (0.5 * 1 + 3) / (0.5 + 1), s3 = (0.25 * 1 + 0.5 * 3 + 2) / 1.75
    assert smooth([1.0, 3.0, 2.0], 3) == pytest.approx([1.0, 3.5 / 1.5, 3.75 / 1.75])
    assert smooth([4.0] * 6, 5) == pytest.approx([4.0] * 6)  # no start-up bias towards 0


def test_the_length_scatter_legend_leaves_out_an_undefined_correlation():
    assert scatter_label("ppo", [1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) == "ppo: r = 1.00, n = 3"
    assert scatter_label("ppo", [5.0], [0.3]) == "ppo: n = 1"  # one point: no r, not "r = nan"
    assert scatter_label("sft", [1.0, 2.0], [0.5, 0.5]) == "sft: n = 2"  # no spread in the scores


@pytest.mark.parametrize("name,kl", [
    ("steady climb", [0.1 * i for i in range(20)]),
    ("exponential climb", [0.05 * 1.3 ** i for i in range(20)]),
    ("noise around a level", [1.0 + random.Random(0).gauss(0, 0.05) for _ in range(40)]),
    ("tiny moves near zero", [0.0, 0.01, -0.01, 0.0, 0.02, 0.15, 0.0, 0.01]),
    # `make demo`'s PPO stage (sequence KL, nats): a noisy climb from 0, not a spike
    ("noisy climb", [0.0, 0.1564, 0.02556, 0.8852, 1.235, 1.219, 1.616, 2.349, 2.383, 3.444, 2.567, 4.851, 3.469,
                     5.011, 5.324, 6.763, 6.776, 7.608]),
])
def test_no_kl_spike(name, kl):
    assert kl_spikes(list(range(1, len(kl) + 1)), kl) == []


def test_kl_spike_found_at_its_step():
    kl = [0.1 * i for i in range(1, 13)]
    kl[8] = 3.0  # a jump to ~4x the preceding level
    spikes = kl_spikes(list(range(1, 13)), kl)
    assert [s["step"] for s in spikes] == [9]
    assert spikes[0]["recent_max"] == pytest.approx(0.8)  # the largest of steps 4-8


@pytest.mark.parametrize("metric,better", [
    ("eval/loss", False), ("eval/ppl", False), ("eval/accuracy", True), ("eval/rewards/accuracy", True),
    ("eval/rewards/margin", True), ("eval/margin", True), ("eval/gold_mean", True), ("eval/score_mean", True),
    ("eval/win_rate", True), ("eval/eos_frac", True), ("eval/empty_frac", False),
    ("eval/rewards/chosen", None), ("eval/rewards/rejected", None), ("eval/pairs", None), ("eval/tokens", None),
    ("eval/kl", None), ("eval/length_mean", None), ("eval/something_new", None),
])
def test_held_out_direction_table(metric, better):
    assert higher_is_better(metric) is better


def test_kl_spike_needs_three_earlier_values_and_a_jump_of_half_their_maximum_and_a_nat():
    # from the 4th value on (min_history 3): a flat history has zero spread, so the jump alone decides
    assert [s["step"] for s in kl_spikes([1, 2, 3, 4], [1.0, 1.0, 1.0, 5.0])] == [4]
    # 10 -> 14 nats: above z * spread (0) and a nat, but under half the recent maximum (5): no spike
    assert kl_spikes([1, 2, 3, 4], [10.0, 10.0, 10.0, 14.0]) == []
    # 0.1 -> 0.9 nats: 9x, but under a nat
    assert kl_spikes([1, 2, 3, 4], [0.1, 0.1, 0.1, 0.9]) == []
    # measured from the largest recent value, not their median: 1 -> 3 after a 2.5 is no spike
    assert kl_spikes([1, 2, 3, 4, 5], [1.0, 1.0, 2.5, 1.0, 3.0]) == []
    assert [s["step"] for s in kl_spikes([1, 2, 3, 4, 5], [1.0, 1.0, 1.5, 1.0, 3.0])] == [5]


def test_held_out_trends_quote_the_last_set_size_and_leave_out_ppl_next_to_loss():
    rows = [{"step": 0, "eval/loss": 1.0, "eval/ppl": math.exp(1.0), "eval/pairs": 40},
            {"step": 4, "eval/loss": 1.5, "eval/ppl": math.exp(1.5), "eval/pairs": 48}]
    trends = {t["metric"]: t for t in held_out_trends(rows)}
    assert set(trends) == {"eval/loss", "eval/pairs"}  # ppl is a function of loss
    assert trends["eval/loss"]["set_size"] == "48 pairs" and trends["eval/loss"]["worse"]
    assert not trends["eval/pairs"]["worse"]  # a size, not a quality measure
    once = [{"step": 0, "eval/accuracy": 0.7, "eval/samples": 16}, {"step": 4, "eval/accuracy": 0.6}]
    (t,) = held_out_trends(once)
    assert t["set_size"] == "16 samples" and t["worse"]
    # only the ppl logged: it is the held-out metric, and lower is better
    (t,) = held_out_trends([{"step": 0, "eval/ppl": 3.0}, {"step": 1, "eval/ppl": 4.0}])
    assert t["metric"] == "eval/ppl" and t["worse"] and t["set_size"] is None


def test_held_out_trends():
    rows = [{"step": 0, "eval/loss": 2.0, "eval/accuracy": 0.7, "eval/accuracy/news": 0.9, "eval/once": 1.0},
            {"step": 5, "train/loss": 1.0},
            {"step": 10, "eval/loss": 2.5, "eval/accuracy": 0.8, "eval/accuracy/news": 0.1}]
    trends = {t["metric"]: t for t in held_out_trends(rows)}
    assert set(trends) == {"eval/loss", "eval/accuracy"}  # breakdown and single evaluation left out
    assert trends["eval/loss"]["worse"] and not trends["eval/accuracy"]["worse"]
    assert (trends["eval/loss"]["first_step"], trends["eval/loss"]["last_step"]) == (0, 10)
    # moves within float noise are not falls; a move past it is
    for first, last, metric, worse in [(0.6931, 0.6932, "eval/loss", False), (0.6931, 0.7, "eval/loss", True),
                                       (0.0, -4e-5, "eval/rewards/margin", False),
                                       (0.0, -0.01, "eval/rewards/margin", True)]:
        rows = [{"step": 0, metric: first}, {"step": 4, metric: last}]
        assert held_out_trends(rows)[0]["worse"] is worse, (metric, first, last)


def test_environment_is_cheap_and_complete():
    # in a fresh interpreter: capturing the environment must not import torch or transformers
    code = ("import json, sys; from rlhfkit.runinfo import environment; e = environment(); "
            "print(json.dumps({'env': e, 'heavy': [m for m in ('torch', 'transformers') if m in sys.modules]}))")
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert out["heavy"] == []
    env = out["env"]
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    assert env["packages"]["torch"] and env["packages"]["transformers"]
    assert env["hardware"]["cores"] >= 1 and env["hardware"]["ram_gb"] > 0.1 and env["hardware"]["cpu"]
    assert package_versions(["rlhfkit-no-such-package"]) == {"rlhfkit-no-such-package": None}


def test_environment_reports_cuda_from_loaded_torch():
    import torch  # loaded by the caller: its CUDA build and thread count are recorded

    env = environment()
    assert env["torch"] == {"cuda": torch.version.cuda, "threads": torch.get_num_threads()}
    json.dumps(env)


def test_write_run_info(tmp_path):
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "DONE").write_text(json.dumps({"seconds": 12.5}))
    path = write_run_info(tmp_path, [("sft", "sft"), ("ppo", "ppo")])
    info = json.loads(path.read_text())
    assert info["stages"] == [{"name": "sft", "kind": "sft", "seconds": 12.5},
                              {"name": "ppo", "kind": "ppo", "seconds": None}]  # not finished: no time
    assert info["environment"]["packages"]["rlhfkit"]


def _boxes(xy, offsets, w, h):
    return [(x + dx, y + dy - h / 2, x + dx + w, y + dy + h / 2) for (x, y), (dx, dy) in zip(xy, offsets)]


def test_frontier_labels_do_not_overlap():
    # the published points in display units of a 600 x 400 px axes: four of them within 0.4 nats
    kl_max, lo, hi = 24.0, 0.48, 0.88
    xy = [(k / kl_max * 600, (w - lo) / (hi - lo) * 400) for _, k, w, _, _ in PUBLISHED]
    w, h = 90.0, 11.0
    naive = _boxes(xy, [(8.0, 0.0)] * len(xy), w, h)
    overlaps = lambda bs: [(i, j) for i in range(len(bs)) for j in range(i + 1, len(bs))
                           if bs[i][0] < bs[j][2] and bs[j][0] < bs[i][2] and bs[i][1] < bs[j][3] and bs[j][1] < bs[i][3]]
    assert overlaps(naive)  # the figure's problem: labels right of their points collide
    placed = _boxes(xy, label_offsets(xy, w, h), w, h)
    assert overlaps(placed) == []
    for (x, _), (x0, *_rest) in zip(xy, placed):  # every label still starts right of its point
        assert x0 > x and math.isfinite(x0)


def test_a_held_out_drop_says_which_model_select_best_kept(tmp_path):
    """A stage whose held-out metric fell but whose final model is the best checkpoint
    (train.select_best) says so in the warning; without a `best` record the warning is plain."""
    import json

    from rlhfkit.report.checks import stage_warnings
    from rlhfkit.report.data import Stage

    rows = [{"step": 0, "eval/accuracy": 0.6, "eval/pairs": 48}, {"step": 4, "eval/accuracy": 0.5, "eval/pairs": 48}]
    st = Stage(name="rm", kind="rm", path=tmp_path, rows=rows)
    (plain,) = [w for w in stage_warnings("demo", st) if w["kind"] == "held_out_worse"]
    assert plain["kept_step"] is None and "select_best" not in plain["message"]
    (tmp_path / "rm_results.json").write_text(json.dumps({"best": {"metric": "eval/accuracy", "step": 0, "value": 0.6}}))
    (kept,) = [w for w in stage_warnings("demo", st) if w["kind"] == "held_out_worse"]
    assert kept["kept_step"] == 0
    assert kept["message"].endswith("The final model is step 0's, the best eval/accuracy (0.6; train.select_best).")


def _eval_dir(path: Path, results: str | None) -> Path:
    """An evaluation folder as `rlhfkit eval` leaves it: its config first, samples, then (when it
    finished) its results."""
    path.mkdir(parents=True)
    (path / "eval_config.yaml").write_text("policies: [p]\nbaseline: b\ngold: task:sentiment\n")
    (path / "samples-baseline.jsonl").write_text(json.dumps({"prompt": "x", "response": "y", "gold": 0.1}) + "\n")
    if results is not None:
        (path / "eval_results.json").write_text(results)
    return path


def test_a_stage_that_stopped_before_its_results_is_unfinished_with_or_without_metrics(tmp_path):
    """A crashed evaluation (config and samples, no results) and a pm run killed after its own
    SFT step wrote sft_results.json are both flagged; a finished evaluation is not."""
    from rlhfkit.report import collect

    crashed = _eval_dir(tmp_path / "crashed", None)
    pm = tmp_path / "pm"
    pm.mkdir()
    (pm / "pm_config.yaml").write_text("model: {name: m}\n")
    (pm / "sft_config.yaml").write_text("model: {name: m}\n")
    (pm / "sft_results.json").write_text("{}")
    (pm / "metrics.jsonl").write_text(json.dumps({"step": 3, "train/loss": 0.5}) + "\n")
    pipe = tmp_path / "pipe"
    (pipe / "sft").mkdir(parents=True)
    (pipe / "sft" / "sft_config.yaml").write_text("model: {name: m}\n")
    (pipe / "sft" / "sft_results.json").write_text("{}")
    _eval_dir(pipe / "eval", None)
    (pipe / "pipeline.yaml").write_text("stages:\n- {kind: sft, name: sft}\n- {kind: eval, name: eval}\n")
    for run, stage, results, after in [(crashed, "crashed", "eval_results.json", "it stopped (see"),
                                       (pm, "pm", "pm_results.json", "it stopped after step 3"),
                                       (pipe, "eval", "eval_results.json", "it stopped (see")]:
        (w,) = [w for w in collect([run])["warnings"] if w["kind"] == "unfinished"]
        assert w["stage"] == stage and f"no results file ({results})" in w["message"] and after in w["message"]
    done = _eval_dir(tmp_path / "done", json.dumps({"baseline": {}, "policies": {}}))
    assert not [w for w in collect([done])["warnings"] if w["kind"] == "unfinished"]


def test_a_pipeline_stage_that_never_started_is_named(tmp_path):
    """A pipeline that stopped after its first stage: the stages after it have no folder, and the
    report says so instead of "no warnings"."""
    from rlhfkit.report import build_report, collect

    pipe = tmp_path / "pipe"
    (pipe / "sft").mkdir(parents=True)
    (pipe / "sft" / "sft_config.yaml").write_text("model: {name: m}\n")
    (pipe / "sft" / "sft_results.json").write_text("{}")
    (pipe / "pipeline.yaml").write_text("stages:\n- {kind: sft, name: sft}\n- {kind: rm}\n"
                                        "- {kind: eval, name: final}\n")
    warnings = collect([pipe])["warnings"]
    assert [(w["kind"], w["stage"]) for w in warnings] == [("not_started", "rm"), ("not_started", "final")]
    assert warnings[1]["message"] == (f"final: the pipeline's eval stage has not run (no folder {pipe / 'final'}): "
                                      "the pipeline stopped before it, so its results are missing.")
    page = build_report([pipe]).read_text()
    assert "2 warning(s)" in page and "<b>stage not started</b>: rm: the pipeline&#x27;s rm stage has not run" in page


def test_a_policy_that_loses_to_its_baseline_beyond_its_interval_is_a_warning(tmp_path):
    from rlhfkit.report import build_report, collect

    def result(low, high, rate):
        return {"win_rate": rate, "ci_low": low, "ci_high": high, "n": 160}

    results = {"baseline": {"win_rate": {}}, "policies": {
        "ppo": {"win_rate": {"gold": result(0.02, 0.18, 0.10), "proxy": result(0.45, 0.61, 0.53)}},
        "dpo": {"win_rate": {"gold": result(0.41, 0.499, 0.45)}},
        "even": {"win_rate": {"gold": result(0.40, 0.50, 0.45)}}}}  # touches one half: not beyond its interval
    run = _eval_dir(tmp_path / "ev", json.dumps(results))
    found = [w for w in collect([run])["warnings"] if w["kind"] == "worse_than_baseline"]
    assert [(w["model"], w["judge"]) for w in found] == [("ppo", "gold"), ("dpo", "gold")]
    assert found[0]["message"] == ("ev, ppo: loses to the baseline by gold: win rate 0.100 [95% CI 0.020, 0.180] "
                                   "over 160 prompts, the whole interval below 0.5.")
    assert "<b>worse than the baseline</b>: ev, ppo: loses" in build_report([run]).read_text()


def test_a_report_of_a_folder_with_no_run_is_refused_and_writes_nothing(tmp_path, capsys):
    from rlhfkit.cli import main

    (tmp_path / "empty").mkdir()
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    for d in ("empty", "model"):
        assert main(["report", str(tmp_path / d)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"no run found in {tmp_path / d}" in err
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == []
    assert sorted(p.name for p in model.iterdir()) == ["config.json"]


def test_comparing_with_an_unreadable_evaluation_names_it(tmp_path):
    from rlhfkit.report import build_report

    good = _eval_dir(tmp_path / "good", json.dumps({"baseline": {}, "policies": {}}))
    half = _eval_dir(tmp_path / "half", '{"baseline": {"eos_fr')
    build_report([good, half], tmp_path / "cmp.html")
    warnings = json.loads((tmp_path / "cmp_warnings.json").read_text())
    (w,) = [w for w in warnings if w["kind"] == "unreadable"]
    assert w["run"] == "half" and w["path"] == str(half / "eval_results.json") and "JSONDecodeError" in w["message"]
    assert "could not be read" in (tmp_path / "cmp.html").read_text()


def test_the_report_shows_a_preference_models_held_out_accuracy(tmp_path):
    from rlhfkit.report import build_report

    pm = tmp_path / "pm"
    pm.mkdir()
    (pm / "pm_config.yaml").write_text("model: {name: m}\n")
    (pm / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 0.7}) + "\n")
    (pm / "pm_results.json").write_text(json.dumps({
        "pairs": {"eval": 100},
        "pm": {"accuracy": 0.7, "pairs": 100, "accuracy_single_order": 0.65, "position_bias": 0.04},
        "llm_judge": {"accuracy": 0.5, "pairs": 100, "accuracy_single_order": 0.5, "position_bias": -0.2}}))
    page = build_report([pm]).read_text()
    table = page[page.index("<h3>Preference model, held-out pairs"):]
    table = table[:table.index("</table>")]
    assert "<b>0.700</b> [0.604, 0.781]" in table and "<td>0.650</td><td>0.040</td><td>100</td>" in table
    assert "untrained model (LLM-as-judge)</td><td><b>0.500</b> [0.404, 0.596]" in table and "-0.200" in table
