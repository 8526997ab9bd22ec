"""Pipeline (stages in order, done stages skipped, configs validated up front) and report.html."""

from __future__ import annotations

import copy
import json
import random
import re

import pytest
import yaml
from browser import chromium_path, render
from conftest import write_jsonl

from rlhfkit.config import ConfigError
from rlhfkit.pipeline import run_pipeline


def _data(tmp_path):
    rng = random.Random(0)
    words = ["red", "blue", "green", "pink", "gold", "grey"]
    sft = [{"prompt": f"Name {w}", "response": f"It is {w}."} for w in words * 6]
    pref = []
    for i in range(36):
        w = rng.choice(words)
        pref.append({"prompt": f"Say {w}", "chosen": f"I like {w} a lot.", "rejected": f"I hate {w}."})
    return write_jsonl(tmp_path / "sft.jsonl", sft), write_jsonl(tmp_path / "pref.jsonl", pref)


def _pipeline(tmp_path, model_dir, sft, pref):
    common = {"train": {"max_steps": 3, "batch_size": 4, "micro_batch_size": 4, "progress": False},
              "optim": {"lr": 1e-3, "warmup_ratio": 0.0}}
    cfg = {"output_dir": str(tmp_path / "run"), "base_model": str(model_dir), "progress": False,
           "stages": [
               {"name": "sft", "kind": "sft", "config": {"model": {"name": "${base}"}, "data": {"train": str(sft), "max_length": 64}, **copy.deepcopy(common)}},
               {"name": "rm", "kind": "rm", "config": {"model": {"name": "${sft}"}, "data": {"train": str(pref), "max_length": 64}, **copy.deepcopy(common)}},
           ]}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_pipeline_runs_stages_in_order_and_skips_done(tmp_path, tiny_model_dir, capsys):
    sft, pref = _data(tmp_path)
    path = _pipeline(tmp_path, tiny_model_dir, sft, pref)
    run_pipeline(str(path))
    run = tmp_path / "run"
    assert (run / "sft" / "DONE").is_file() and (run / "rm" / "DONE").is_file()
    rm_cfg = yaml.safe_load((run / "rm" / "rm_config.yaml").read_text())
    assert rm_cfg["model"]["name"] == str(run / "sft" / "model")  # ${sft} resolved to the SFT output
    mtime = (run / "rm" / "model" / "model.safetensors").stat().st_mtime
    capsys.readouterr()
    run_pipeline(str(path))
    assert "already done" in capsys.readouterr().out
    assert (run / "rm" / "model" / "model.safetensors").stat().st_mtime == mtime
    # a finished stage whose config or data changed is not skipped as if it had run with them
    with pytest.raises(ConfigError, match=r"stage 'rm' finished with another config or inputs \(optim\.lr 0\.001 -> "
                                          r"0\.002\): to redo it, delete .*rm and the directories of the stages after"):
        run_pipeline(str(path), ["stages.1.config.optim.lr=0.002"])
    write_jsonl(sft, [{"prompt": "Name red", "response": "Red."}] * 40)
    with pytest.raises(ConfigError, match=r"stage 'sft' finished with another config or inputs \(data\.train content"):
        run_pipeline(str(path))
    assert (run / "rm" / "model" / "model.safetensors").stat().st_mtime == mtime


def _stops(cfg, strategy):
    raise RuntimeError("killed")


def _refuses(cfg, strategy):
    raise FileNotFoundError("model.name: model directory not found: /x/model")


def test_an_error_a_stage_raises_names_the_stage(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """What a stage refuses as it starts (an input only it checks) is one line naming the stage."""
    from rlhfkit import registry
    from rlhfkit.cli import main

    sft, pref = _data(tmp_path)
    path = _pipeline(tmp_path, tiny_model_dir, sft, pref)
    monkeypatch.setitem(registry.COMMANDS, "rm", registry.Command(registry.COMMANDS["rm"].config,
                                                                   "test_pipeline_report:_refuses", ""))
    assert main(["pipeline", "-c", str(path)]) == 2
    assert capsys.readouterr().err == ("rlhfkit pipeline: error: stage rm (rm): model.name: model directory not "
                                       "found: /x/model\n")


def test_a_rerun_that_stops_leaves_no_report_of_the_earlier_run(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """The report and summary describe what a run finished: a rerun that redoes a stage and stops
    in it leaves neither (an earlier run's would show results that are gone); `rlhfkit report`
    makes one of what is there."""
    import shutil

    from rlhfkit import registry

    sft, pref = _data(tmp_path)
    path = _pipeline(tmp_path, tiny_model_dir, sft, pref)
    run_pipeline(str(path))
    run = tmp_path / "run"
    assert {"report.html", "report_warnings.json", "pipeline_summary.json"} <= {p.name for p in run.iterdir()}
    shutil.rmtree(run / "rm")

    monkeypatch.setitem(registry.COMMANDS, "rm", registry.Command(registry.COMMANDS["rm"].config,
                                                                   "test_pipeline_report:_stops", ""))
    with pytest.raises(RuntimeError, match="killed"):
        run_pipeline(str(path))
    assert not {"report.html", "report_warnings.json", "pipeline_summary.json"} & {p.name for p in run.iterdir()}


def test_a_stage_killed_after_its_results_before_its_done_mark_is_finished(tmp_path, tiny_model_dir, capsys):
    """A kill between the command's last write (its results file) and the pipeline's DONE: the
    rerun counts the stage as finished (it refused, finding a model and no checkpoint to continue)."""
    sft, pref = _data(tmp_path)
    path = _pipeline(tmp_path, tiny_model_dir, sft, pref)
    run_pipeline(str(path))
    run = tmp_path / "run"
    (run / "rm" / "DONE").unlink()
    mtime = (run / "rm" / "model" / "model.safetensors").stat().st_mtime
    capsys.readouterr()
    run_pipeline(str(path))
    assert "stage 2/2 rm: already done, skipped" in capsys.readouterr().out
    assert (run / "rm" / "DONE").is_file() and (run / "rm" / "model" / "model.safetensors").stat().st_mtime == mtime


@pytest.mark.parametrize("mutate,match", [
    (lambda c: c["stages"][1].update(kind="nope"), r"stages\[1\]\.kind: unknown stage kind 'nope'"),
    (lambda c: c["stages"][1]["config"]["optim"].update(lrr=1), r"stages\[1\] \(rm\).*optim\.lrr: unknown key"),
    (lambda c: c["stages"][1]["config"]["model"].update(name="${nostage}"), r"unknown placeholder \$\{nostage\}"),
    (lambda c: c["stages"][0]["config"]["train"].update(batch_size=6), r"stages\[0\] \(sft\).*not divisible"),
    (lambda c: c["stages"][1].update(name="sft"), r"stages\[1\]\.name: 'sft' is an earlier stage's name"),
    (lambda c: [s.pop("name") for s in c["stages"]] and c["stages"][1].update(kind="sft"),
     r"stages\[1\]\.name: 'sft' is an earlier stage's name \(a stage of the same kind is named after its kind"),
    (lambda c: c["stages"][1].update(name="../escaped"), r"stages\[1\]\.name: '\.\./escaped': use letters"),
    (lambda c: c["stages"][1].update(name="base"), r"'base' is a placeholder's name"),
    (lambda c: c["stages"][0]["config"]["train"].update(output_dir="elsewhere"),
     r"stages\[0\]\.config\.train\.output_dir: set by the pipeline"),
    # the inputs of a later stage, read before the first one trains
    (lambda c: c["stages"][1]["config"]["train"].update(select_best="eval/loss"),  # an SFT metric, not an RM's
     r"stages\[1\] \(rm\): .*train\.select_best: 'eval/loss' is not among the held-out metrics of this run: "
     r"eval/accuracy, eval/margin, eval/pairs, eval/accuracy/<category>"),
    (lambda c: c["stages"][1]["config"]["data"].update(train="task:sentimnet"),
     r"stages\[1\] \(rm\): data\.train: task:sentimnet: no built-in task 'sentimnet'"),
    (lambda c: c["stages"].append({"name": "grpo", "kind": "grpo", "config": {
        "model": {"name": "${sft}"}, "reward": {"spec": ["task:sentiment", "rm:${rm}", "task:sentimnet"]}}}),
     r"stages\[2\] \(grpo\): reward\.spec: reward spec 'task:sentimnet': unknown task"),
    (lambda c: c["stages"].append({"name": "grpo", "kind": "grpo", "config": {
        "model": {"name": "${sft}"}, "prompts": {"train": "/nonexistent/prompts.jsonl"}}}),
     r"stages\[2\] \(grpo\): prompts\.train: .*/nonexistent/prompts\.jsonl"),
    # a path that merely starts like the pipeline's output_dir is not an earlier stage's output
    (lambda c: c["stages"].append({"name": "grpo", "kind": "grpo", "config": {
        "model": {"name": "${sft}"}, "reward": {"spec": ["rm:${output_dir}2/rm/model"]}}}),
     r"stages\[2\] \(grpo\): reward\.spec: .*run2/rm/model"),
    # a model a stage loads by name, checked before anything is written
    (lambda c: c["stages"][0]["config"]["model"].update(name="/nonexistent/model"),
     r"stages\[0\] \(sft\): model\.name: model directory not found: /nonexistent/model"),
    # an evaluation makes no model
    (lambda c: c["stages"].insert(1, {"name": "check", "kind": "eval", "config": {"policies": ["${sft}"],
                                                                                  "baseline": "${base}"}})
     or c["stages"][2]["config"]["model"].update(name="${check}"),
     r"stages\[2\]\.config\.model\.name: \$\{check\}: stage 'check' is an evaluation, which makes no model$"),
])
def test_pipeline_config_errors_before_any_stage(tmp_path, tiny_model_dir, mutate, match):
    sft, pref = _data(tmp_path)
    path = _pipeline(tmp_path, tiny_model_dir, sft, pref)
    cfg = yaml.safe_load(path.read_text())
    cfg["stages"][0]["config"]["train"] = dict(cfg["stages"][0]["config"]["train"])
    mutate(cfg)
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=match):
        run_pipeline(str(path))
    assert not (tmp_path / "run").exists()  # nothing written, nothing ran


@pytest.mark.parametrize("override,match", [
    ("stages.7.config.optim.lr=1e-5", r"stages\.7: no such stage; the pipeline has 2 \(0-1: sft, rm\)"),
    ("stages.odpo.config.optim.lr=1e-5", r"stages\.odpo: no such stage"),
])
def test_pipeline_overrides_name_an_existing_stage(tmp_path, tiny_model_dir, capsys, override, match):
    from rlhfkit.cli import main
    from rlhfkit.pipeline import plan

    sft, pref = _data(tmp_path)
    path = _pipeline(tmp_path, tiny_model_dir, sft, pref)
    with pytest.raises(ConfigError, match=match):
        plan(str(path), [override])
    assert main(["pipeline", "-c", str(path), override]) == 2 and "Traceback" not in capsys.readouterr().err
    _, stages = plan(str(path), ["stages.rm.config.optim.lr=0.005"])  # by name as well as by index
    assert stages[1][1].optim.lr == 0.005


@pytest.mark.parametrize("override, text, match", [
    ("stages=5", None, r"^stages: set a stage's keys \(stages\.<i or name>\.config\.KEY=VALUE\), not the list$"),
    ("stages.rm=5", None, r"^stages\.rm: set a stage's keys \(stages\.rm\.config\.KEY=VALUE\), not the stage itself$"),
    ("output_dir=", None, r"output_dir: empty; name the directory the stages write into$"),
    (None, "stages: [null]\n", r"stages\[0\]: expected a mapping of keys, got NoneType None$"),
    (None, "stages: [sft]\n", r"stages\[0\]: expected a mapping of keys, got str 'sft'$"),
    ("stages.0.config.optim.lr=1", "stages: 5\n", r"stages: expected a list of stages, got int$"),
    ("seed=1", None, r"expected a mapping of keys \(output_dir, base_model, stages, \.\.\.\), got list$"),
])
def test_pipeline_shapes_that_are_not_stages_are_one_line(tmp_path, tiny_model_dir, monkeypatch, override, text,
                                                          match):
    """A value where a stage or the stage list should be, and an empty output_dir (which would
    write every stage into the working directory), are refused naming the key; nothing is written."""
    sft, pref = _data(tmp_path)
    path = _pipeline(tmp_path, tiny_model_dir, sft, pref)
    if text is not None:
        path.write_text(f"output_dir: {tmp_path / 'run'}\n{text}")
    elif override == "seed=1":  # a file of a list, not a mapping
        path.write_text("- 1\n- 2\n")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with pytest.raises(ConfigError, match=match):
        run_pipeline(str(path), [override] if override else [])
    assert not (tmp_path / "run").exists() and not any(cwd.iterdir())


def test_a_stage_whose_directory_is_its_own_input_is_refused_before_anything_is_written(tmp_path, tiny_model_dir):
    """A stage named like the base model's directory, in the directory above it (output_dir
    base/.., stage "model"), would train into its own input model: refused at planning."""
    import shutil

    sft, pref = _data(tmp_path)
    base = tmp_path / "base" / "model"
    shutil.copytree(tiny_model_dir, base)
    before = sorted(p.name for p in base.iterdir())
    path = _pipeline(tmp_path, base, sft, pref)
    with pytest.raises(ConfigError, match=rf"stages\[0\] \(model\): output_dir: {base} is model\.name "
                                          r"\(.*\): the run would write into what it reads"):
        run_pipeline(str(path), [f"output_dir={base.parent}", "stages.0.name=model",
                                 "stages.1.config.model.name=${model}"])
    assert sorted(p.name for p in base.iterdir()) == before


def test_a_pipeline_rerun_with_stages_left_out_or_added_and_a_stage_name_of_another_kind(tmp_path, tiny_model_dir,
                                                                                         capsys):
    """Run again in its output_dir, a pipeline may leave finished stages out or add stages (each
    stage directory is checked by its own record); a stage name that ran there as another kind is
    refused before anything is written; an unreadable pipeline.yaml is one line."""
    sft, pref = _data(tmp_path)
    path = _pipeline(tmp_path, tiny_model_dir, sft, pref)
    run_pipeline(str(path))
    saved = (tmp_path / "run" / "pipeline.yaml").read_text()
    swapped = ["stages.0.name=rm", "stages.1.name=sft", "stages.1.config.model.name=${rm}"]
    with pytest.raises(ConfigError, match=r"^stage 'rm': .*run/rm holds a stage of kind rm \(pipeline\.yaml\), not "
                                          r"sft: name the stage otherwise, or choose another output_dir$"):
        run_pipeline(str(path), swapped)
    assert (tmp_path / "run" / "pipeline.yaml").read_text() == saved
    cfg = yaml.safe_load(path.read_text())
    cfg["stages"].append({**copy.deepcopy(cfg["stages"][1]), "name": "rm2"})
    del cfg["stages"][1]
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    run_pipeline(str(path))  # rm left out, rm2 added: sft is done, rm2 runs
    out = capsys.readouterr().out
    assert "stage 1/2 sft: already done" in out and (tmp_path / "run" / "rm2" / "DONE").is_file()
    (tmp_path / "run" / "pipeline.yaml").write_text("- not a pipeline\n")
    with pytest.raises(ConfigError, match=r"pipeline\.yaml: not a pipeline config: cannot tell which stages ran"):
        run_pipeline(str(path))
    from rlhfkit.training.runlock import _HELD

    assert str((tmp_path / "run").resolve()) not in _HELD  # a refused pipeline lets the directory go


def test_a_pipeline_directory_in_use_by_another_process_is_refused(tmp_path, tiny_model_dir):
    """Two pipelines in one output_dir at once would interleave their stages: while another
    process holds it, a second is refused in one line naming its pid, before writing anything;
    a finished pipeline lets the directory go."""
    from conftest import held_by_another_process

    from rlhfkit.training.runlock import _HELD

    sft, pref = _data(tmp_path)
    path = _pipeline(tmp_path, tiny_model_dir, sft, pref)
    out = tmp_path / "run"
    out.mkdir()
    with held_by_another_process(out) as holder:
        with pytest.raises(ConfigError, match=rf"^output_dir: {out} is in use by another rlhfkit process "
                                              rf"\(pid {holder.pid}\)"):
            run_pipeline(str(path))
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    run_pipeline(str(path))
    assert (out / "rm" / "DONE").is_file() and str(out.resolve()) not in _HELD


@pytest.mark.parametrize("record", ["", "[]", '{"config": [1]}'])
def test_a_finished_stage_whose_record_is_damaged_is_one_line_naming_it(tmp_path, tiny_model_dir, record):
    sft, pref = _data(tmp_path)
    path = _pipeline(tmp_path, tiny_model_dir, sft, pref)
    run_pipeline(str(path))
    damaged = tmp_path / "run" / "sft" / "sft_run.json"
    damaged.write_text(record)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(damaged))}: (unreadable run record|not a run record).*"
                                          rf"delete {re.escape(str(damaged.parent))} to redo the stage$"):
        run_pipeline(str(path))


def test_pipeline_print_config_prints_each_stage_and_writes_nothing(tmp_path, tiny_model_dir, capsys):
    """`rlhfkit pipeline -c P --print-config [overrides]`: one YAML document per stage, its
    resolved config with the pipeline's substitutions and overrides applied, as the stage's own
    `--print-config` prints it; nothing is written; a bad override is still one line."""
    from rlhfkit.cli import main

    sft, pref = _data(tmp_path)
    path = _pipeline(tmp_path, tiny_model_dir, sft, pref)
    assert main(["pipeline", "-c", str(path), "--print-config", "stages.rm.config.optim.lr=0.005"]) == 0
    out = capsys.readouterr().out
    docs = list(yaml.safe_load_all(out))
    assert re.findall(r"^# stage (\d): (\w+) \(rlhfkit (\w+)\)", out, flags=re.M) == [
        ("0", "sft", "sft"), ("1", "rm", "rm")]
    assert [d["train"]["output_dir"] for d in docs] == [str(tmp_path / "run" / "sft"), str(tmp_path / "run" / "rm")]
    assert docs[1]["model"]["name"] == str(tmp_path / "run" / "sft" / "model")  # ${sft}
    assert docs[0]["optim"]["lr"] == 1e-3 and docs[1]["optim"]["lr"] == 0.005
    assert not (tmp_path / "run").exists()
    assert main(["pipeline", "-c", str(path), "--print-config", "stages.9.config.optim.lr=1"]) == 2
    assert "no such stage" in capsys.readouterr().err


def _fake_eval(stage_dir, eos_frac=0.9):
    """An eval stage's files in the format `rlhfkit eval` writes."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    ci = lambda m: {"mean": m, "ci_low": m - 0.05, "ci_high": m + 0.05, "n": 3}
    ev = {"prompts": 3, "samples_per_prompt": 1,
          "baseline": {"model": "base", "gold_mean": ci(0.1), "length_tokens": 30.0, "length_chars": 120.0,
                       "eos_frac": 0.9, "samples": 3, "corr_length_gold": 0.2},
          "policies": {"trained": {"model": "x", "gold_mean": ci(0.4), "kl": ci(3.1), "length_tokens": 35.0,
                                   "length_chars": 150.0, "eos_frac": eos_frac, "samples": 3, "corr_length_gold": 0.1,
                                   "win_rate": {"gold": {"win_rate": 0.7, "ci_low": 0.63, "ci_high": 0.76, "n": 3,
                                                         "wins": 2, "ties": 0, "losses": 1}}}}}
    (stage_dir / "eval_results.json").write_text(json.dumps(ev))
    (stage_dir / "eval_config.yaml").write_text(yaml.safe_dump({"rollout": {"max_new_tokens": 48}}))
    prompts = ["Describe <b>a</b> day", "Write a note", "Review a film"]
    for name, text in (("baseline", "It was a day."), ("trained", "A lovely day!")):
        write_jsonl(stage_dir / f"samples-{name}.jsonl",
                    [{"prompt": p, "response": text + " " * rng.randint(0, 9), "gold": rng.random()} for p in prompts])


def _stage(run, name, kind, rows, config=None, finished=True):
    d = run / name
    d.mkdir(parents=True)
    write_jsonl(d / "metrics.jsonl", rows)
    (d / f"{kind}_config.yaml").write_text(yaml.safe_dump(config or {"model": {"name": "m"}}))
    if finished:
        (d / f"{kind}_results.json").write_text("{}")


def _synthetic_run(run, healthy: bool):
    """A run directory with sft, rm, dpo, ppo and eval stages (no model needed). ``healthy=False``
    puts in each problem the report must flag: truncation in training and in evaluation, each
    kind of held-out metric getting worse, one KL spike, and a DPO stage that stopped (no results
    file) after skipping updates."""
    rng = random.Random(0)
    sign = 1 if healthy else -1
    _stage(run, "sft", "sft", [{"step": s, "eval/loss": 3.0 - sign * 0.01 * s, "eval/tokens": 600,
                                **({"train/loss": 3 + rng.random()} if s else {})} for s in range(0, 11, 5)])
    # the per-category breakdown falls in both runs: only the total is judged
    _stage(run, "rm", "rm", [{"step": s, "eval/accuracy": 0.6 + sign * 0.01 * s, "eval/pairs": 48,
                              "eval/accuracy/news": 0.9 - 0.05 * s} for s in (0, 4)])
    _stage(run, "dpo", "dpo", [{"step": s, "eval/rewards/accuracy": 0.6 + sign * 0.02 * s,
                                "eval/rewards/rejected": -0.1 * s, "train/loss": 0.69 - 0.01 * s,
                                "train/skipped_steps": 0 if healthy else s // 3} for s in range(1, 6)],
           finished=healthy)
    kl = [0.1 * s for s in range(1, 13)]
    if not healthy:
        kl[8] = 3.0  # step 9: ~3x the level of the iterations before it
    ppo = [{"step": s, "reward/score_mean": 0.1 * s + rng.gauss(0, 0.3), "objective/kl": kl[s - 1],
            "response/eos_frac": 0.95 if healthy else 0.2, "response/length_mean": 40 + rng.random(),
            "loss/policy": 0.01 * rng.gauss(0, 1), "loss/value": 2.0 + rng.random(),
            "time/rollout": 6 + rng.random(), "time/score": 1.0, "time/update": 3.0, "time/other": 0.5,
            "time/gen_tokens_per_s": 100.0} for s in range(1, 13)]
    for s in (1, 6, 12):  # held-out evaluations on some iterations
        ppo[s - 1]["eval/gold_mean"] = 0.5 + sign * 0.02 * s
    _stage(run, "ppo", "ppo", ppo, {"model": {"name": "sft-model"}, "rollout": {"max_new_tokens": 48}})
    write_jsonl(run / "ppo" / "samples.jsonl", [{"step": s, "prompt": f"Prompt {s}", "response": f"Response {s}",
                                                 "score": 1.0, "eos": healthy} for s in (11, 12)])
    _fake_eval(run / "eval", eos_frac=0.9 if healthy else 0.3)


def _check_page(result):
    """What users saw broken: every figure keeps its aspect ratio, the eval table shows no raw keys."""
    assert result["errors"] == []
    for img in result["images"]:
        assert img["visible"] and img["w"] > 100 and img["h"] > 100, img["alt"]
        assert img["shown_w"] / img["shown_h"] == pytest.approx(img["w"] / img["h"], rel=0.02), img["alt"]
    table = result["sections"]["table.eval"]
    for raw in ("win_rate", "ci_low", "_mean", "eos_frac", "length_tokens", "corr_length", "[0."):
        assert raw not in table, raw
    assert "95% CI" in table and "n = 3 prompts" in table


def test_report_renders_in_chromium(tmp_path, tiny_model_dir):
    if chromium_path() is None:
        pytest.fail("Chromium is not installed: `make test` installs Debian's chromium package")
    sft, pref = _data(tmp_path)
    run_pipeline(str(_pipeline(tmp_path, tiny_model_dir, sft, pref)))
    run = tmp_path / "run"
    info = json.loads((run / "run_info.json").read_text())  # written by the pipeline
    assert [s["name"] for s in info["stages"]] == ["sft", "rm"] and all(s["seconds"] > 0 for s in info["stages"])
    _fake_eval(run / "eval")
    from rlhfkit.report import build_report

    page = build_report([run])
    assert page == run / "report.html"
    assert not [w for w in json.loads((run / "report_warnings.json").read_text())  # finished stages: no false alarm
                if w["kind"] in ("unfinished", "skipped_steps")]
    result = render(page, tmp_path / "shot.png", sections=("table.eval", "#run-info", "#warnings"))
    _check_page(result)
    alts = {i["alt"] for i in result["images"]}
    assert {"win rates", "length vs reward", "sft Training loss", "rm Held-out accuracy"} <= alts
    assert "A lovely day!" in result["text"] and "<b>a</b>" in result["text"]  # escaped, shown as text
    assert "0.700 (95% CI 0.630–0.760, n = 3 prompts)" in result["sections"]["table.eval"]
    run_info = result["sections"]["#run-info"]
    for expected in ("software and hardware", "transformers", info["environment"]["packages"]["torch"],
                     "sft_config.yaml", "rm_config.yaml", "wall time"):
        assert expected in run_info, expected
    assert (tmp_path / "shot.png").stat().st_size > 10_000
    # comparing two runs in one page, written into a directory that did not exist
    both = build_report([run, run], tmp_path / "reports" / "new" / "compare.html")
    assert render(both)["errors"] == []


@pytest.mark.parametrize("healthy", [True, False])
def test_report_warnings(tmp_path, healthy):
    if chromium_path() is None:
        pytest.fail("Chromium is not installed: `make test` installs Debian's chromium package")
    from rlhfkit.report import build_report
    from rlhfkit.report.checks import summary_messages

    run = tmp_path / "run"
    _synthetic_run(run, healthy)
    page = build_report([run])
    warnings = json.loads((run / "report_warnings.json").read_text())
    result = render(page, sections=("table.eval", "#warnings", "#responses"))
    _check_page(result)
    alts = {i["alt"] for i in result["images"]}
    assert {"ppo Policy loss", "ppo Value loss", "ppo time split", "ppo Held-out gold_mean (higher is better)"} <= alts
    shown = result["sections"]["#warnings"]
    samples = result["sections"]["#responses"]
    assert "Response 12" in samples and "Response 11" not in samples  # the last logged step's samples
    assert ("cut at the 48-token cap" in samples) is not healthy
    if healthy:
        assert warnings == [] and "No warnings" in shown
        return
    found = {(w["kind"], w["stage"], w.get("metric") or w.get("model")) for w in warnings}
    assert found == {("unfinished", "dpo", None), ("skipped_steps", "dpo", None),
                     ("truncation", "ppo", None), ("truncation", "eval", "trained"),
                     ("held_out_worse", "sft", "eval/loss"), ("held_out_worse", "rm", "eval/accuracy"),
                     ("held_out_worse", "dpo", "eval/rewards/accuracy"), ("held_out_worse", "ppo", "eval/gold_mean"),
                     ("kl_spike", "ppo", None)}
    assert [s["step"] for w in warnings if w["kind"] == "kl_spike" for s in w["spikes"]] == [9]
    assert f"{len(warnings)} warning(s)" in shown
    assert "80% of responses (mean over 12 iterations, last 80%) hit the 48-token cap" in shown
    assert all(w["message"] in shown for w in warnings)
    # the pipeline's terminal summary: the truncation warnings of one cap on one line, in the place of the first
    lines = summary_messages(warnings)
    assert len(lines) == len(warnings) - 1
    merged = [line for line in lines if "cut-off text was scored" in line]
    assert merged == ["responses hit the 48-token cap (max_new_tokens) without an EOS token, so cut-off text was "
                      "scored: ppo training 80% (last 80%), eval trained 70%. Raise max_new_tokens or reward finishing."]
    first = next(i for i, w in enumerate(warnings) if w["kind"] == "truncation")
    assert lines[first] == merged[0] and lines[:first] == [w["message"] for w in warnings[:first]]


@pytest.mark.parametrize("pipeline", [True, False])
def test_the_sft_phase_of_a_dpo_stage_is_a_stage_whose_fall_is_flagged(tmp_path, pipeline):
    """DPO with sft_first trains SFT in <stage>/sft first and anchors to it: a ruined SFT phase leaves
    DPO's own held-out loss at ln 2, so the phase is checked as a stage of its own."""
    from rlhfkit.report.checks import stage_warnings
    from rlhfkit.report.data import load_stages

    run = tmp_path / "run"
    rows = [{"step": s, "eval/rewards/accuracy": 0.5 + 0.01 * s, "eval/pairs": 40} for s in (0, 2, 4)]
    _stage(run, "dpo", "dpo", rows)
    _stage(run / "dpo", "sft", "sft", [{"step": s, "eval/loss": 10.8 + 100 * s, "eval/tokens": 600} for s in (0, 2, 4)])
    stages = load_stages(run if pipeline else run / "dpo")
    assert [(st.name, st.kind) for st in stages] == [("dpo", "dpo"), ("dpo/sft", "sft")]
    warned = [(w["stage"], w["kind"], w.get("metric")) for st in stages for w in stage_warnings("run", st)]
    assert warned == [("dpo/sft", "held_out_worse", "eval/loss")]


def _eval_results(win: float, n: int) -> dict:
    mean = lambda v: {"mean": v, "ci_low": v - 0.1, "ci_high": v + 0.1, "n": n}  # noqa: E731
    return {"prompts": n, "samples_per_prompt": 1,
            "baseline": {"gold_mean": mean(0.4), "length_tokens": 40.0},
            "policies": {"ppo": {"gold_mean": mean(0.6), "length_tokens": 44.0, "kl": mean(2.0),
                                 "win_rate": {"gold": {"win_rate": win, "ci_low": win - 0.05, "ci_high": win + 0.05}}}}}


def test_summary_quotes_every_eval_stage_and_the_report_warnings(tmp_path):
    from types import SimpleNamespace

    from rlhfkit.pipeline_summary import format_summary, headline

    for stage, win, n in (("eval", 0.71, 320), ("eval_ood", 0.66, 300)):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "eval_results.json").write_text(json.dumps(_eval_results(win, n)))
    stages = [(SimpleNamespace(name=s, kind=k), None) for s, k in (("ppo", "ppo"), ("eval", "eval"), ("eval_ood", "eval"))]
    h = headline(tmp_path, stages)
    assert h["eval: ppo: gold win rate vs baseline [95% CI]"] == "0.710 [0.660, 0.760]"
    assert h["eval_ood: ppo: gold win rate vs baseline [95% CI]"] == "0.660 [0.610, 0.710]"
    assert h["eval_ood: eval prompts"] == 300
    text = format_summary({"output_dir": str(tmp_path), "stage_seconds": {"ppo": 60.0}, "headline": h,
                           "warnings": ["rm: held-out eval/accuracy fell from 0.62 to 0.54"], "report": "r.html"})
    assert "WARNING: rm: held-out eval/accuracy fell" in text
    assert "eval_ood: ppo: gold win rate vs baseline [95% CI]: 0.660" in text
    # one eval stage: no prefix, as before
    one = headline(tmp_path, stages[:2])
    assert one["ppo: gold win rate vs baseline [95% CI]"] == "0.710 [0.660, 0.760]"
    # a KL estimate just below zero is 0.0, not -0.0
    results = _eval_results(0.5, 10)
    results["policies"]["ppo"]["kl"]["mean"] = -4e-5
    (tmp_path / "eval" / "eval_results.json").write_text(json.dumps(results))
    assert str(headline(tmp_path, stages[:2])["ppo: KL to baseline (nats)"]) == "0.0"
    # a stage done before is said as such; a continued one's time is this run's part
    text = format_summary({"output_dir": "o", "stage_seconds": {"rm": 30.0, "ppo": 90.0}, "skipped": ["sft"],
                           "continued": ["ppo"], "headline": {}, "report": "r.html"})
    assert re.search(r"stage sft +done before, skipped\n +stage rm +0\.5 min\n +stage ppo +1\.5 min \(continued "
                     r"from a checkpoint: this run's part\)\n +all stages run +2\.0 min", text), text


def _tax_table_text(page) -> str | None:
    """The text of the report's alignment-tax table (None when the page has none)."""
    import html as html_mod

    found = re.search(r"<h4>Alignment tax.*?</table>", page.read_text(), flags=re.S)
    if not found:
        return None
    return html_mod.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", found.group(0))))


def test_report_shows_the_alignment_tax_only_when_measured(tmp_path):
    from rlhfkit.report import build_report

    run = tmp_path / "run"
    _fake_eval(run / "eval")
    page = build_report([run])
    assert _tax_table_text(page) is None and "lignment tax" not in page.read_text()

    path = run / "eval" / "eval_results.json"
    ev = json.loads(path.read_text())  # as `rlhfkit eval` writes it with alignment_tax.* set
    ev["alignment_tax"] = {"sft_data": "heldout_sft.jsonl", "sft_examples": 64, "capability": "task:arithmetic",
                           "capability_prompts": 48}
    ev["baseline"]["alignment_tax"] = {"sft_nll": 2.31, "capability_exact_match": 0.25}
    ev["policies"]["trained"]["alignment_tax"] = {"sft_nll": 2.46, "capability_exact_match": 0.3125,
                                                  "sft_nll_delta": 0.15, "capability_exact_match_delta": 0.0625}
    path.write_text(json.dumps(ev))
    text = _tax_table_text(build_report([run]))
    assert text is not None
    assert "measure baseline (before) trained (after)" in text
    assert ("Held-out SFT-data NLL nats per response token of SFT examples no policy was trained on; lower = the "
            "model still writes that data's responses (heldout_sft.jsonl, n = 64 examples); a rise from the "
            "baseline is the tax 2.310 2.460 +0.150 vs baseline (worse)") in text
    assert ("Capability probe, exact match share of the probe task's held-out prompts answered exactly (greedy "
            "decoding) (task:arithmetic, n = 48 prompts); a fall from the baseline is the tax 0.250 0.312 "
            "+0.062 vs baseline (better)") in text
    # nothing of it leaks into the main table as raw keys
    main = re.search(r"<table class='eval'>.*?</table>", page.read_text(), flags=re.S).group(0)
    assert "alignment" not in main.lower() and "sft_nll" not in main


def _edit_eval(key, value):
    def edit(run):
        path = run / "eval" / "eval_results.json"
        ev = json.loads(path.read_text())
        target = ev["policies"]["trained"] if key != "win" else ev["policies"]["trained"]["win_rate"]["gold"]
        target.update(value)
        path.write_text(json.dumps(ev))  # json writes NaN as a bare NaN, which json.loads reads back
    return edit


@pytest.mark.parametrize("edit, unreadable", [
    (_edit_eval("win", {"win_rate": "high"}), "policies.trained.win_rate.gold: not a win rate with its interval"),
    (_edit_eval("win", {"ci_low": "x"}), "policies.trained.win_rate.gold"),
    (_edit_eval("policy", {"eos_frac": float("nan")}), "results.policies.trained.eos_frac: nan (rlhfkit writes null)"),
    (lambda run: (run / "eval" / "samples-trained.jsonl").write_text(
        '{"prompt": 5, "response": null, "gold": "x"}\n[1]\n{"response": "a", "gold": NaN}\n'), None),
    (lambda run: (run / "run_info.json").write_text('{"stages": [5], "environment": [1]}'), None),
    (lambda run: (run / "pipeline.yaml").write_text("stages:\n  - {name: [1], kind: 3}\n  - 7\n"), None),
])
def test_a_report_of_hand_edited_files_names_what_it_skips_and_never_fails(tmp_path, edit, unreadable):
    """An eval_results.json edited into another shape (a string win rate, a NaN) is named as
    unreadable and left out; odd samples, run_info.json and pipeline.yaml are read around. Each
    was a traceback."""
    from rlhfkit.report import build_report

    run = tmp_path / "run"
    _fake_eval(run / "eval")
    edit(run)
    page = build_report([run])
    warnings = json.loads((run / "report_warnings.json").read_text())
    found = [w["message"] for w in warnings if w["kind"] == "unreadable"]
    if unreadable:
        assert len(found) == 1 and unreadable in found[0], found
    else:
        assert found == [] and "Win rate vs baseline" in page.read_text()


@pytest.mark.parametrize("results, metrics, unreadable", [
    ("{bad", None, "sft: sft_results.json does not read as a results file (a JSON object)"),
    ("[1, 2]", None, "sft: sft_results.json does not read as a results file"),
    ("{}", b"\x00\xff\xfe binary\n\x01", "sft: metrics.jsonl holds no readable record"),
])
def test_a_stage_whose_results_or_metrics_do_not_read_is_named_as_unreadable(tmp_path, results, metrics, unreadable):
    """A results file that is not a JSON object, or a metrics.jsonl with no record that reads:
    the page warns instead of saying that all is well."""
    from rlhfkit.report import build_report

    run = tmp_path / "run"
    _stage(run, "sft", "sft", [{"step": 1, "train/loss": 1.0}])
    (run / "sft" / "sft_results.json").write_text(results)
    if metrics is not None:
        (run / "sft" / "metrics.jsonl").write_bytes(metrics)
    build_report([run])
    found = [w["message"] for w in json.loads((run / "report_warnings.json").read_text()) if w["kind"] == "unreadable"]
    assert len(found) == 1 and found[0].startswith(unreadable), found


def test_report_names_scorers_by_kind_and_wraps_long_text(tmp_path):
    """A reward given as a Python function is not called a reward model; win counts say what they
    count; a prompt of one 600-character word (a URL, base64) wraps instead of widening the page."""
    if chromium_path() is None:
        pytest.fail("Chromium is not installed: `make test` installs Debian's chromium package")
    from rlhfkit.report import build_report

    run = tmp_path / "run"
    rows = [{"step": s, "reward/score_mean": 0.1 * s, "objective/kl": 0.1 * s} for s in (1, 2)]
    _stage(run, "grpo", "grpo", rows, {"model": {"name": "m"}, "reward": {"spec": "rew.py:score"}})
    write_jsonl(run / "grpo" / "samples.jsonl", [{"step": 2, "prompt": "x" * 600, "response": "y" * 600, "score": 1}])
    _fake_eval(run / "eval")
    (run / "eval" / "eval_config.yaml").write_text(yaml.safe_dump({"proxy": "rm:runs/rm", "gold": "task:sentiment"}))
    result = render(build_report([run]), sections=("table.eval",))
    assert result["errors"] == [] and result["h_overflow_px"] <= 0
    assert "grpo Reward (reward function)" in {i["alt"] for i in result["images"]}
    table = result["sections"]["table.eval"]
    assert "share of sample pairs won" in table and "sample pairs: 2 won, 0 tied, 1 lost" in table
    from rlhfkit.report.data import scorer_kind

    assert [scorer_kind(s) for s in ("rm:d", "pm:d", "judge:d", "annotator:x", "task:t", "f.py:g", "m:g", "",
                                     [{"spec": "rm:d"}], ["rm:d", "f.py:g"])] == [
        "reward model", "preference model", "LLM judge", "simulated annotator", "task reward", "reward function",
        "reward function", None, "reward model", "weighted rewards"]


def test_a_pipeline_stage_of_kind_online_dpo_is_finished_by_its_results_file(tmp_path):
    """A pipeline names the kind "online-dpo"; the stage writes online_dpo_results.json."""
    from rlhfkit.report.checks import stage_warnings
    from rlhfkit.report.data import load_stages

    run = tmp_path / "run"
    _stage(run, "odpo", "online_dpo", [{"step": 1, "score_mean": 0.5}])
    (run / "pipeline.yaml").write_text(yaml.safe_dump({"stages": [{"name": "odpo", "kind": "online-dpo"}]}))
    (stage,) = load_stages(run)
    assert stage.kind == "online-dpo" and stage_warnings("run", stage) == []
    (run / "odpo" / "online_dpo_results.json").unlink()
    assert [w["kind"] for w in stage_warnings("run", stage)] == ["unfinished"]


def test_the_quickstart_pipeline_example_plans_as_it_says(tmp_path):
    from pathlib import Path

    from rlhfkit.pipeline import plan

    text = (Path(__file__).parents[1] / "docs" / "quickstart.md").read_text()
    example = text.split("## A whole workflow as one pipeline")[1].split("```yaml\n")[1].split("```")[0]
    (tmp_path / "p.yaml").write_text(example)
    cfg, stages = plan(str(tmp_path / "p.yaml"), ["stages.rm.config.optim.lr=1e-5"])
    assert [(s.name, c.model.name, c.train.output_dir) for s, c in stages] == [
        ("sft", "smollm2-135m-instruct", "runs/mine/sft"), ("rm", "runs/mine/sft/model", "runs/mine/rm")]
    assert stages[1][1].optim.lr == 1e-5 and stages[0][1].train.seed == 0


def test_text_from_a_run_never_runs_as_script_in_the_report(tmp_path):
    """Strings where numbers belong (a crafted eval_results.json, pm_results.json or config) are
    shown as text; the page's policy lets no script run at all, and the figures still show."""
    if chromium_path() is None:
        pytest.fail("Chromium is not installed: `make test` installs Debian's chromium package")
    from rlhfkit.report import build_report

    run = tmp_path / "run"
    _synthetic_run(run, healthy=False)  # its ppo samples are cut at the cap: the cap is shown
    attack = "<script>document.title='pwned'</script>"
    ev = json.loads((run / "eval" / "eval_results.json").read_text())
    ev.update(prompts=attack, prompts_dropped_too_long="<img src=x onerror=\"document.title='pwned'\">",
              preference_set={"gold": {"accuracy": 0.7, "pairs": attack}})
    (run / "eval" / "eval_results.json").write_text(json.dumps(ev))
    cfg = yaml.safe_load((run / "ppo" / "ppo_config.yaml").read_text())
    cfg["rollout"]["max_new_tokens"] = attack
    (run / "ppo" / "ppo_config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "pm").mkdir()
    (run / "pm" / "pm_config.yaml").write_text("model: {name: m}\n")
    (run / "pm" / "pm_results.json").write_text(json.dumps({"pairs": {"eval": attack}, "pm": {"accuracy": 0.8}}))
    page = build_report([run])
    text = page.read_text()
    assert "<script" not in text and "<img src=x" not in text
    assert "http-equiv='Content-Security-Policy' content=\"default-src 'none'" in text
    result = render(page, sections=("#responses",))
    assert result["errors"] == [] and attack in result["text"]
    assert result["images"] and all(img["visible"] and img["w"] > 100 for img in result["images"])
