"""Every PPO, GRPO and RLOO iteration logs where its time went (time/rollout, time/score,
time/update, time/other) and shows the split in the progress line."""

from __future__ import annotations

import pytest
from pg_utils import base_config, read_metrics

from rlhfkit.config import load_config
from rlhfkit.parallel import SingleProcess
from rlhfkit.registry import COMMANDS
from rlhfkit.trainers.pg_setup import TIME_SPLIT

OVER = {"ppo": dict(critic_init="policy", rollout={"n": 2, "max_new_tokens": 4}, mini_batch_size=16),
        "grpo": dict(rollout={"n": 2, "max_new_tokens": 4}, mini_batch_size=16),
        "rloo": dict(rollout={"n": 2, "max_new_tokens": 4}, mini_batch_size=16)}


@pytest.mark.parametrize("method", ["ppo", "grpo", "rloo"])
def test_every_iteration_logs_and_shows_its_time_split(method, tokenizer, tmp_path, capsys):
    command = COMMANDS[method]
    data = base_config(tmp_path, tokenizer, **OVER[method], train={"max_steps": 3, "progress": True})
    cfg = load_config(command.config_class(), data=data)
    command.runner()(cfg, SingleProcess())

    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert all(r[k] >= 0 for k in TIME_SPLIT), r
    # the phases are consecutive laps of one iteration: together they are nearly all of the wall
    # time between two logged iterations (the rest is the loop's logging)
    for prev, cur in zip(rows, rows[1:]):
        between = cur["time"] - prev["time"]
        phases = sum(cur[k] for k in TIME_SPLIT)
        assert phases <= between + 0.01
        assert phases >= 0.5 * between - 0.05, (phases, between)
    bar = capsys.readouterr().err  # tqdm's progress line
    for name in ("rollout=", "score=", "update=", "other="):
        assert name in bar, bar[-400:]


@pytest.mark.parametrize("method", ["ppo", "grpo"])
def test_each_phase_is_charged_to_its_own_label(method, tokenizer, tmp_path, monkeypatch):
    # A fake clock for the stopwatch: real time plus fake seconds that the patched rollout (1000 s)
    # and update (100 s) add when they finish, so each known cost must show in its own time/ entry.
    import importlib
    import time
    import types

    from rlhfkit.trainers import pg_setup

    trainer = importlib.import_module(f"rlhfkit.trainers.{method}")
    fake = [0.0]
    monkeypatch.setattr(pg_setup, "time", types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + fake[0]))

    def costing(fn, seconds):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            fake[0] += seconds
            return out
        return wrapped

    monkeypatch.setattr(trainer, "rollout", costing(trainer.rollout, 1000.0))
    monkeypatch.setattr(trainer, "policy_update", costing(trainer.policy_update, 100.0))
    command = COMMANDS[method]
    data = base_config(tmp_path, tokenizer, **OVER[method], train={"max_steps": 2})
    command.runner()(load_config(command.config_class(), data=data), SingleProcess())

    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:  # real phases take well under 100 s each on the tiny model
        assert 1000.0 <= r["time/rollout"] < 1100.0, r
        assert 100.0 <= r["time/update"] < 1000.0, r
        assert r["time/score"] < 100.0 and r["time/other"] < 100.0, r
