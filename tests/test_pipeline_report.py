"""Pipeline (stages in order, done stages skipped, configs validated up front) and report.html."""

from __future__ import annotations

import copy
import json
import random

import pytest
import yaml

from browser import chromium_path, render
from conftest import write_jsonl
from rlhfkit.config import ConfigError
from rlhfkit.pipeline import plan, run_pipeline


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


@pytest.mark.parametrize("mutate,match", [
    (lambda c: c["stages"][1].update(kind="nope"), r"stages\[1\]\.kind: unknown stage kind 'nope'"),
    (lambda c: c["stages"][1]["config"]["optim"].update(lrr=1), r"stages\[1\] \(rm\).*optim\.lrr: unknown key"),
    (lambda c: c["stages"][1]["config"]["model"].update(name="${nostage}"), r"unknown placeholder \$\{nostage\}"),
    (lambda c: c["stages"][0]["config"]["train"].update(batch_size=6), r"stages\[0\] \(sft\).*not divisible"),
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
    assert not (tmp_path / "run" / "sft").exists()  # nothing ran


def _fake_eval(stage_dir):
    """An eval stage's files in the format `rlhfkit eval` writes."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    ci = lambda m: {"mean": m, "ci_low": m - 0.05, "ci_high": m + 0.05}
    ev = {"prompts": 3, "samples_per_prompt": 1,
          "baseline": {"model": "base", "gold_mean": ci(0.1), "length_tokens": 30.0},
          "policies": {"trained": {"model": "x", "gold_mean": ci(0.4), "kl": ci(3.1), "length_tokens": 35.0,
                                   "win_rate": {"gold": {"win_rate": 0.7, "ci_low": 0.63, "ci_high": 0.76}}}}}
    (stage_dir / "eval_results.json").write_text(json.dumps(ev))
    prompts = ["Describe <b>a</b> day", "Write a note", "Review a film"]
    for name, text in (("baseline", "It was a day."), ("trained", "A lovely day!")):
        write_jsonl(stage_dir / f"samples-{name}.jsonl",
                    [{"prompt": p, "response": text + " " * rng.randint(0, 9), "gold": rng.random()} for p in prompts])


def test_report_renders_in_chromium(tmp_path, tiny_model_dir):
    if chromium_path() is None:
        pytest.fail("Chromium is not installed: `make test` installs Debian's chromium package")
    sft, pref = _data(tmp_path)
    run_pipeline(str(_pipeline(tmp_path, tiny_model_dir, sft, pref)))
    run = tmp_path / "run"
    _fake_eval(run / "eval")
    from rlhfkit.report import build_report

    page = build_report([run])
    assert page == run / "report.html"
    result = render(page, tmp_path / "shot.png")
    assert result["errors"] == []
    imgs = result["images"]
    assert len(imgs) >= 4 and all(i["w"] > 100 and i["h"] > 100 and i["visible"] for i in imgs)
    alts = {i["alt"] for i in imgs}
    assert {"win rates", "length vs reward", "sft Losses", "rm Held-out"} <= alts
    assert "A lovely day!" in result["text"] and "<b>a</b>" in result["text"]  # escaped, shown as text
    assert (tmp_path / "shot.png").stat().st_size > 10_000
    # comparing two runs in one page
    both = build_report([run, run], tmp_path / "compare.html")
    assert render(both)["errors"] == []
