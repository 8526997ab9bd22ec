"""Continuing a run at its edges: a select_best run stopped before its first checkpoint, a shorter
length than the newest checkpoint, a pipeline stage made stale by a stage before it in the same
invocation, and a run stopped by SIGTERM (what schedulers send)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import write_jsonl

from rlhfkit.cli import main
from rlhfkit.config import ConfigError
from rlhfkit.pipeline import run_pipeline


def _sft(model_dir, out, *extra):
    return ["sft", f"model.name={model_dir}", "data.train=task:sentiment/sft.jsonl", "data.max_length=256",
            "train.batch_size=2", "train.micro_batch_size=2", "train.progress=false", "train.report_to=[]",
            f"train.output_dir={out}", *extra]


def test_a_select_best_run_stopped_before_its_first_checkpoint_starts_over(tmp_path, tiny_model_dir):
    """What such a run leaves (its record, metrics and best-pending/, no checkpoint) is nothing to
    continue: auto and a plain start begin again, as without select_best, instead of asking for
    --overwrite."""
    out = tmp_path / "run"
    best = ["data.eval_fraction=0.25", "train.select_best=eval/loss", "train.eval_every=1", "train.save_every=0",
            "train.max_steps=2"]
    assert main(_sft(tiny_model_dir, out, *best)) == 0

    def back_to_the_kill():
        for name in ("model", "checkpoints", "sft_results.json", "best"):
            shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink(missing_ok=True)
        (out / "best-pending" / "model").mkdir(parents=True)
        (out / "best-pending" / "step.json").write_text('{"step": 1}')

    back_to_the_kill()
    for resume in ("auto", "false"):
        assert main(_sft(tiny_model_dir, out, *best, f"train.resume={resume}")) == 0
        assert (out / "sft_results.json").is_file() and (out / "best" / "model").is_dir()
        assert not (out / "best-pending").exists()
        back_to_the_kill()


def test_continuing_to_fewer_steps_than_the_newest_checkpoint_is_refused(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "run"
    assert main(_sft(tiny_model_dir, out, "train.max_steps=4", "train.save_every=2")) == 0
    capsys.readouterr()
    assert main(_sft(tiny_model_dir, out, "train.max_steps=3", "train.resume=true")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.max_steps: 3 is below the step of" in err and "(step-00000004)" in err
    assert (out / "sft_results.json").is_file()  # the finished run is left as it was
    assert yaml.safe_load((out / "sft_config.yaml").read_text())["train"]["max_steps"] == 4


def test_a_finished_stage_made_stale_by_a_stage_that_ran_before_it_is_not_skipped(tmp_path, tiny_model_dir):
    """sft was continued for more steps and stopped before its results; the pipeline, rerun with
    that length, finishes it (a new SFT model) and comes to rm, finished on the old one: refused,
    not skipped (it was checked before sft ran, when its input was still the old model)."""
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"Name {w}", "response": f"It is {w}."}
                                               for w in ["red", "blue", "green"] * 8])
    pref = write_jsonl(tmp_path / "pref.jsonl", [{"prompt": f"Say {w}", "chosen": f"I like {w}.",
                                                  "rejected": f"I hate {w}."} for w in ["red", "blue"] * 8])
    common = {"train": {"max_steps": 2, "save_every": 1, "batch_size": 4, "micro_batch_size": 4, "progress": False},
              "optim": {"lr": 1e-3, "warmup_ratio": 0.0}}
    cfg = {"output_dir": str(tmp_path / "run"), "base_model": str(tiny_model_dir), "progress": False, "stages": [
        {"name": "sft", "kind": "sft", "config": {"model": {"name": "${base}"}, "data": {"train": str(sft)}, **common}},
        {"name": "rm", "kind": "rm", "config": {"model": {"name": "${sft}"}, "data": {"train": str(pref)}, **common}}]}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_pipeline(str(path))
    for name in ("DONE", "sft_results.json"):  # continued elsewhere, stopped before it finished
        (tmp_path / "run" / "sft" / name).unlink()
    with pytest.raises(ConfigError, match=r"stage 'rm' finished with another config or inputs \(model\.name content"):
        run_pipeline(str(path), ["stages.0.config.train.max_steps=4"])
    assert (tmp_path / "run" / "sft" / "DONE").is_file()  # the stage that ran is kept


def test_sigterm_during_a_checkpoint_write_stops_as_ctrl_c_does(tmp_path, tiny_model_dir):
    """One line, exit status 143, and no temporary checkpoint left behind."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RLHFKIT_TEST_CHECKPOINT_SLEEP": "0.5"}
    proc = subprocess.Popen([sys.executable, "-m", "rlhfkit.cli", *_sft(tiny_model_dir, out, "train.max_steps=6",
                                                                         "train.save_every=2")],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "checkpoints").glob(".step-*")) and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before a checkpoint write was seen"
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, err[-500:]
    assert err.rstrip("\n").rsplit("\n", 1)[-1] == "rlhfkit sft: terminated (SIGTERM)"
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert json.loads((out / "sft_run.json").read_text())  # the run record is whole: a resume can continue
