"""train.report_to: metrics reach accelerate trackers (a registered fake one here, no network);
a tracker that is not installed is one config error line before anything loads."""

from __future__ import annotations

import json

import pytest
from conftest import uninstall, write_jsonl

from rlhfkit import cli
from rlhfkit.config import ConfigError, SFTConfig, load_config
from rlhfkit.config.extras import MissingDependency
from rlhfkit.training.logger import RunLogger

RECORDED: dict[str, list] = {}


@pytest.fixture()
def fake_tracker(monkeypatch):
    """A GeneralTracker registered with accelerate as "fake_tracker", recording what it gets
    (registered as accelerate's register_tracker_class does, which older accelerate lacks)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker

    class FakeTracker(GeneralTracker):
        name = "fake_tracker"
        requires_logging_directory = False

        def __init__(self, run_name):
            super().__init__()
            RECORDED.update(run_name=[run_name], config=[], log=[], finished=[])

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            RECORDED["config"].append(values)

        def log(self, values, step=None, **kwargs):
            RECORDED["log"].append((step, values))

        def finish(self):
            RECORDED["finished"].append(True)

    monkeypatch.setitem(LOGGER_TYPE_TO_CLASS, "fake_tracker", FakeTracker)
    yield RECORDED
    RECORDED.clear()


def test_run_logger_sends_finite_scalars_config_and_finish(tmp_path, fake_tracker):
    logger = RunLogger(tmp_path / "demo" / "sft", 3, progress=False, desc="sft", report_to=["fake_tracker"],
                       config={"train": {"seed": 0, "report_to": ["fake_tracker"]}, "optim": {"lr": 1e-5}})
    logger.log(1, {"train/loss": 0.5, "train/nan": float("nan"), "note": "text"})
    logger.close()
    assert fake_tracker["run_name"] == ["demo/sft"]
    assert fake_tracker["config"] == [{"train.seed": 0, "train.report_to": "['fake_tracker']", "optim.lr": 1e-5}]
    assert fake_tracker["log"] == [(1, {"train/loss": 0.5})]
    assert fake_tracker["finished"] == [True]
    rows = [json.loads(line) for line in (tmp_path / "demo" / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["train/loss"] == 0.5 and rows[0]["note"] == "text"  # the jsonl keeps everything
    assert not (tmp_path / "demo" / "sft" / "tb").exists()  # TensorBoard only when asked for


def test_a_run_with_no_steps_shows_no_progress_bar(tmp_path, capsys):
    assert RunLogger(tmp_path / "rm", 0, progress=True, desc="rm", report_to=[]).bar is None
    with_steps = RunLogger(tmp_path / "sft", 2, progress=True, desc="sft", report_to=[])
    assert with_steps.bar is not None
    with_steps.bar.close()
    assert "0it" not in capsys.readouterr().err


@pytest.mark.parametrize("progress", [False, True])
def test_progress_false_silences_every_bar(tmp_path, tiny_model_dir, capsys, progress):
    """train.progress=false: no bar at all, transformers' loading and saving bars included (which
    are restored after the run); true: they show."""
    from transformers.utils import logging as hf_logging

    from rlhfkit.cli import main

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Say {w}", "response": f"{w}."} for w in "abcd"])
    assert main(["sft", f"model.name={tiny_model_dir}", f"data.train={data}", "data.eval_fraction=0",
                 "train.max_steps=1", "train.batch_size=2", "train.micro_batch_size=2", "train.report_to=[]",
                 f"train.output_dir={tmp_path / 'run'}", f"train.progress={str(progress).lower()}"]) == 0
    err = capsys.readouterr().err
    assert ("Loading weights" in err and "\r" in err) is progress, err
    assert hf_logging.is_progress_bar_enabled()


def test_sft_metrics_reach_the_tracker(tmp_path, tiny_model_dir, fake_tracker):
    from rlhfkit.trainers.sft import train_sft

    rows = [{"prompt": f"Say {w}", "response": f"{w}."} for w in ["red", "blue", "green", "pink"] * 4]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = load_config(SFTConfig, data={
        "model": {"name": str(tiny_model_dir)}, "data": {"train": str(data), "eval": str(data), "max_length": 64},
        "train": {"output_dir": str(tmp_path / "run"), "batch_size": 4, "micro_batch_size": 4, "max_steps": 3,
                  "progress": False, "report_to": ["fake_tracker", "tensorboard"]}})
    train_sft(cfg)
    steps = [step for step, values in fake_tracker["log"] if "train/loss" in values]
    assert steps == [1, 2, 3]
    assert any("eval/loss" in values for _, values in fake_tracker["log"])
    assert fake_tracker["config"][0]["data.max_length"] == 64
    jsonl = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in jsonl if "train/loss" in r] == steps
    assert (tmp_path / "run" / "tb").is_dir()


@pytest.mark.parametrize("name,extra", [("wandb", "wandb"), ("mlflow", "mlflow"), ("tensorboard", "tensorboard")])
def test_a_missing_tracker_is_one_config_error(monkeypatch, name, extra):
    uninstall(monkeypatch, name)  # as if not installed
    with pytest.raises(MissingDependency, match=rf"train.report_to: {name} is not installed: "
                                                rf"pip install 'rlhfkit\[{extra}\]'"):
        load_config(SFTConfig, data={"data": {"train": "x.jsonl"}, "train": {"report_to": [name]}})


def test_unknown_tracker_is_a_config_error():
    with pytest.raises(ConfigError, match="train.report_to: unknown tracker 'tensorbaord'"):
        load_config(SFTConfig, data={"data": {"train": "x.jsonl"}, "train": {"report_to": ["tensorbaord"]}})


def test_cli_exits_2_with_one_line_before_loading(tmp_path, monkeypatch, capsys):
    uninstall(monkeypatch, "wandb")
    monkeypatch.chdir(tmp_path)
    rc = cli.main(["sft", "data.train=missing.jsonl", "model.name=no/such/model",
                   "train.output_dir=out", "train.report_to=[wandb]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "pip install 'rlhfkit[wandb]'" in err[0], err
    assert not (tmp_path / "out").exists()


def test_auto_is_tensorboard_when_installed_and_nothing_otherwise(monkeypatch):
    """The default report_to [auto]: a lean install (no tensorboard) runs with metrics.jsonl alone,
    while a tracker named explicitly must be installed."""
    from rlhfkit.config.extras import resolve_trackers

    assert SFTConfig().train.report_to == ["auto"]
    assert resolve_trackers(["auto"]) == ["tensorboard"]
    assert resolve_trackers(["auto", "wandb"]) == ["tensorboard", "wandb"]
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "tensorboard" else object())
    assert resolve_trackers(["auto"]) == []
    load_config(SFTConfig, data={"data": {"train": "x.jsonl"}})  # default config loads without tensorboard
    with pytest.raises(MissingDependency, match="tensorboard is not installed"):
        load_config(SFTConfig, data={"data": {"train": "x.jsonl"}, "train": {"report_to": ["tensorboard"]}})


def test_wandb_continues_its_run_on_resume_and_starts_anew_at_step_0(tmp_path, monkeypatch):
    """One W&B run per rlhfkit run: a resumed run passes the recorded id (resume='allow'); a start
    at step 0 gets a new id; local files go to $WANDB_DIR when set; --overwrite deletes them."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker

    from rlhfkit.training import trackers
    from rlhfkit.training.rundir import clear_run

    inits = []

    class FakeWandB(GeneralTracker):
        name = "wandb"
        requires_logging_directory = False

        def __init__(self, project, **kwargs):
            super().__init__()
            inits.append(kwargs)

        tracker = property(lambda self: self)
        store_init_configuration = log = finish = lambda self, *a, **k: None

    monkeypatch.setitem(LOGGER_TYPE_TO_CLASS, "wandb", FakeWandB)
    monkeypatch.setattr(trackers, "resolve_trackers", lambda names: list(names))
    monkeypatch.delenv("WANDB_DIR", raising=False)
    out = tmp_path / "run"
    for step in (0, 4, 8):
        trackers.start_trackers(["wandb"], out, "demo/sft", initial_step=step)
    trackers.start_trackers(["wandb"], out, "demo/sft", initial_step=0)  # started over
    ids = [k["id"] for k in inits]
    assert ids[0] == ids[1] == ids[2] != ids[3] and all(k["resume"] == "allow" for k in inits)
    assert inits[0]["dir"] == str(out)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    trackers.start_trackers(["wandb"], out, "demo/sft", initial_step=8)
    assert "dir" not in inits[-1] and inits[-1]["id"] == ids[3]
    (out / "wandb").mkdir()
    assert sorted(clear_run(out)) == ["wandb", "wandb_run_id"]
