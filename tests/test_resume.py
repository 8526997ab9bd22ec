"""Fault tolerance: SIGKILL mid-run then --resume gives the uninterrupted result (SFT, DPO), or
continues from the last checkpoint with its step count and KL controller (PPO) and, in a pipeline,
at the stage where it stopped; an interrupted checkpoint write leaves the previous checkpoint
loadable; a run whose updates keep going non-finite stops with its last good checkpoint intact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl


def _sft_data(tmp_path):
    rows = [{"prompt": f"Count to {i}", "response": " ".join(str(j) for j in range(1, i % 7 + 2))} for i in range(48)]
    return write_jsonl(tmp_path / "sft.jsonl", rows)


def _cli(kind, out, model_dir, data, extra=()):
    return [sys.executable, "-m", "rlhfkit.cli", kind, f"model.name={model_dir}", f"data.train={data}",
            "data.eval_fraction=0.1", "data.max_length=64", f"train.output_dir={out}", "train.batch_size=4",
            "train.micro_batch_size=2", "train.max_steps=14", "train.save_every=2", "train.progress=false",
            "optim.lr=1e-3", *extra]


def _run(cmd):
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _kill_after_first_checkpoint(cmd, out: Path, min_step: int = 4) -> int:
    """Start the run, SIGKILL it once a checkpoint at or past ``min_step`` exists; return that step."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckdir = out / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        steps = [int(p.name.split("-")[1]) for p in ckdir.glob("step-*")] if ckdir.is_dir() else []
        if steps and max(steps) >= min_step:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "model").exists()
    return max(int(p.name.split("-")[1]) for p in ckdir.glob("step-*"))


def _final_params(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "model" / "model.safetensors"))


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


KEPT = "killed_run_record"  # a mark on the killed run's records, see _mark_records_up_to


def _mark_records_up_to(out: Path, step: int) -> None:
    """Mark the killed run's metrics records of steps <= ``step`` (its checkpoint's). A run resumed from
    that checkpoint keeps them as they are and logs only the steps after it; a run that started over
    would rewrite them all, without the mark."""
    rows = _metric_rows(out)  # a line torn by the kill is left out (the resumed run drops it too)
    assert any(r["step"] == step for r in rows)
    (out / "metrics.jsonl").write_text("".join(json.dumps({**r, KEPT: True} if r["step"] <= step else r) + "\n"
                                               for r in rows))


def _assert_logged_only_after(out: Path, step: int) -> None:
    """The resumed run wrote the records of the steps after ``step`` only (it started at ``step``)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get(KEPT)] == [r["step"] for r in rows if r["step"] <= step]
    assert [r["step"] for r in rows if not r.get(KEPT)] == [r["step"] for r in rows if r["step"] > step]
    assert any(r.get(KEPT) for r in rows) and any(not r.get(KEPT) for r in rows)


def test_sft_sigkill_resume_matches_uninterrupted(tmp_path, tiny_model_dir):
    data = _sft_data(tmp_path)
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    _run(_cli("sft", ref, tiny_model_dir, data))
    step = _kill_after_first_checkpoint(_cli("sft", killed, tiny_model_dir, data), killed)
    assert 4 <= step < 14
    _mark_records_up_to(killed, step)
    _run(_cli("sft", killed, tiny_model_dir, data, ["--resume"]))
    _assert_logged_only_after(killed, step)  # continued from the checkpoint, not rerun from step 0
    a, b = _final_params(ref), _final_params(killed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    la, lb = _losses(ref), _losses(killed)
    assert sorted(la) == sorted(lb) == list(range(1, 15))  # no step lost or logged twice
    for s in la:
        assert abs(la[s] - lb[s]) < 1e-5, (s, la[s], lb[s])


def test_interrupted_checkpoint_write_keeps_previous(tmp_path, tiny_model_dir, tokenizer, monkeypatch):
    from rlhfkit.models import load_causal_lm
    from rlhfkit.parallel import SingleProcess
    from rlhfkit.training.checkpoint import (
        Checkpointer,
        load_checkpoint,
        save_checkpoint,
    )

    strategy = SingleProcess()
    model = load_causal_lm(tiny_model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ck = Checkpointer(tmp_path, keep=2)
    save_checkpoint(ck, strategy, 2, {"model": model}, {"optimizer": opt}, {"kind": "sft"})
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(ck, strategy, 4, {"model": model}, {"optimizer": opt}, {"kind": "sft"})
    monkeypatch.undo()
    assert ck.latest().name == "step-00000002"
    assert not list((tmp_path / "checkpoints").glob(".*tmp*"))
    fresh = load_causal_lm(tiny_model_dir)
    state = load_checkpoint(ck.latest(), strategy, {"model": fresh}, {"optimizer": opt})
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, saved[k])
    assert state["step"] == 2


# --------------------------------------------------------------------------- DPO, PPO and pipeline

def _metric_rows(out: Path) -> list[dict]:
    """metrics.jsonl's records (a line still being written is skipped)."""
    path = out / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def _by_step(out: Path) -> dict[int, dict]:
    rows = _metric_rows(out)
    by = {r["step"]: {k: v for k, v in r.items() if k not in ("time", KEPT)} for r in rows}
    assert len(by) == len(rows), [r["step"] for r in rows]  # no step logged twice
    return by


def _kill_past_checkpoint(cmd, out: Path, min_step: int) -> int:
    """Start the run; SIGKILL it once it has a checkpoint at or past ``min_step`` *and* has logged a
    later step, which the resumed run must then drop and redo. Returns the step of the latest
    complete checkpoint (the one --resume continues from)."""
    from rlhfkit.training.checkpoint import Checkpointer

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = Checkpointer(out)
    deadline = time.time() + 600  # a loaded machine can be very slow
    while time.time() < deadline and proc.poll() is None:
        last = ckpt.latest(verify=False)  # sizes only: polled every 20 ms
        step = int(last.name.split("-")[1]) if last else -1
        if step >= min_step and any(r["step"] > step for r in _metric_rows(out)):
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "model").exists()
    return int(ckpt.latest().name.split("-")[1])


def _dpo_data(tmp_path):
    words = ["apple", "river", "stone", "cloud", "music", "garden", "window", "forest"]
    rows = [{"prompt": f"Do you like the {words[i % 8]} number {i}?", "chosen": " ".join(["yes"] * (1 + i % 3)),
             "rejected": " ".join(["no"] * (1 + i % 2))} for i in range(48)]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def test_dpo_sigkill_resume_matches_uninterrupted(tmp_path, tiny_model_dir):
    data = _dpo_data(tmp_path)
    extra = ["dpo.precompute_ref_logps=true", "dpo.beta=0.5"]  # the shipped config's reference mode
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    _run(_cli("dpo", ref, tiny_model_dir, data, [*extra, "train.save_every=0"]))  # saving must not matter
    step = _kill_past_checkpoint(_cli("dpo", killed, tiny_model_dir, data, extra), killed, min_step=4)
    assert 4 <= step < 14
    _mark_records_up_to(killed, step)
    _run(_cli("dpo", killed, tiny_model_dir, data, [*extra, "--resume"]))
    _assert_logged_only_after(killed, step)  # continued from the checkpoint, not rerun from step 0
    a, b = _final_params(ref), _final_params(killed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    ma, mb = _by_step(ref), _by_step(killed)
    assert sorted(ma) == sorted(mb) == list(range(0, 15))  # step 0 = the evaluation before training
    for s in ma:
        assert ma[s].keys() == mb[s].keys(), s
        for key, v in ma[s].items():
            assert mb[s][key] == pytest.approx(v, rel=1e-5, abs=1e-6), (s, key)


PPO_ARGS = ["critic_init=policy", "rollout.n=2", "rollout.max_new_tokens=4", "mini_batch_size=16", "ppo_epochs=1",
            "kl.coef=0.1", "kl.target=0.5", "kl.horizon=64", "optim.lr=1e-2", "critic_optim.lr=1e-2",
            "train.batch_size=8", "train.micro_batch_size=16", "train.max_steps=10", "train.save_every=3",
            "train.progress=false"]


def _next_kl_coef(row: dict, target: float = 0.5, rows_per_step: int = 16, horizon: float = 64) -> float:
    """The adaptive controller's update from one logged iteration (algos.AdaptiveKLController)."""
    err = min(max(row["objective/kl_penalty"] / target - 1.0, -0.2), 0.2)
    return row["objective/kl_coef"] * (1.0 + err * rows_per_step / horizon)


def test_ppo_sigkill_resume_keeps_step_count_and_kl_controller(tmp_path, tokenizer):
    from pg_utils import tiny_policy_dir, write_prompts, write_reward

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "rlhfkit.cli", "ppo", f"model.name={tiny_policy_dir(tokenizer, tmp_path / 'policy')}",
           f"prompts.train={write_prompts(tmp_path / 'prompts.jsonl')}",
           f"reward.spec={write_reward(tmp_path / 'reward_fn.py')}", f"train.output_dir={out}", *PPO_ARGS]
    step = _kill_past_checkpoint(cmd, out, min_step=3)
    assert 3 <= step < 10
    saved = json.loads((out / "checkpoints" / f"step-{step:08d}" / "trainer_state.json").read_text())
    assert saved["step"] == step
    coef = saved["kl_controller"]["value"]
    assert coef != pytest.approx(0.1)  # the adaptive controller has moved away from kl.coef
    before = {r["step"]: r for r in _metric_rows(out)}
    resumed_at = time.time()
    _run([*cmd, "--resume"])

    rows = _metric_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 11))  # numbering continues; nothing lost or doubled
    for r in rows:
        if r["step"] <= step:
            assert r == before[r["step"]]  # up to the checkpoint: the killed run's records, kept
        else:
            assert r["time"] >= resumed_at  # after it: redone by the resumed run
    by = {r["step"]: r for r in rows}
    assert by[step + 1]["objective/kl_coef"] == pytest.approx(coef, rel=1e-12)  # the saved beta, not kl.coef
    for s in range(1, 10):  # one controller trajectory across the kill
        assert by[s + 1]["objective/kl_coef"] == pytest.approx(_next_kl_coef(by[s]), rel=1e-9), s
    results = json.loads((out / "ppo_results.json").read_text())
    assert results["steps"] == 10
    assert results["kl_coef_final"] == pytest.approx(_next_kl_coef(by[10]), rel=1e-9)
    assert (out / "model" / "config.json").is_file() and (out / "critic" / "config.json").is_file()
    samples = [json.loads(line)["step"] for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted(set(samples)) == list(range(1, 11))
    assert len({samples.count(s) for s in range(1, 11)}) == 1  # the redone steps' samples are not doubled


def test_pipeline_sigkill_resumes_at_the_stage_and_step_where_it_stopped(tmp_path, tiny_model_dir):
    import yaml

    train = {"batch_size": 4, "micro_batch_size": 2}
    stages = [
        {"name": "sft", "kind": "sft", "config": {
            "model": {"name": "${base}"}, "data": {"train": str(_sft_data(tmp_path)), "max_length": 64},
            "train": {**train, "max_steps": 2}, "optim": {"lr": 1e-3}}},
        {"name": "dpo", "kind": "dpo", "config": {
            "model": {"name": "${sft}"}, "data": {"train": str(_dpo_data(tmp_path)), "max_length": 64},
            "train": {**train, "max_steps": 12, "save_every": 2}, "optim": {"lr": 1e-3},
            "dpo": {"precompute_ref_logps": True}}},
    ]
    run = tmp_path / "run"
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(run), "base_model": str(tiny_model_dir), "progress": False,
                                    "stages": stages}))
    cmd = [sys.executable, "-m", "rlhfkit.cli", "pipeline", "--config", str(path)]
    step = _kill_past_checkpoint(cmd, run / "dpo", min_step=2)  # killed in the second stage
    assert 2 <= step < 12
    assert (run / "sft" / "DONE").is_file() and not (run / "dpo" / "DONE").exists()
    sft_files = {p: p.stat().st_mtime_ns for p in (run / "sft").rglob("*") if p.is_file()}
    before = {r["step"]: r for r in _metric_rows(run / "dpo")}
    resumed_at = time.time()
    rerun = subprocess.run(cmd, check=True, capture_output=True, text=True)

    assert "stage 1/2 sft: already done, skipped" in rerun.stdout
    assert {p: p.stat().st_mtime_ns for p in (run / "sft").rglob("*") if p.is_file()} == sft_files  # not redone
    rows = _metric_rows(run / "dpo")
    assert [r["step"] for r in rows] == list(range(0, 13))
    for r in rows:
        if r["step"] <= step:
            assert r == before[r["step"]]
        else:
            assert r["time"] >= resumed_at
    assert (run / "dpo" / "DONE").is_file() and (run / "dpo" / "model" / "config.json").is_file()


def test_resume_without_a_checkpoint_starts_over_with_one_record_per_step(tmp_path, tiny_model_dir):
    """Killed before its first checkpoint, a run has nothing to resume: --resume says so, and
    resume=auto (what pipelines use) starts at step 0, the records the killed run wrote dropped,
    not followed by a second copy of the same steps."""
    from rlhfkit.config import SFTConfig, load_config
    from rlhfkit.trainers.sft import train_sft
    from rlhfkit.training.rundir import RunDirError

    out = tmp_path / "run"
    overrides = [f"model.name={tiny_model_dir}", f"data.train={_sft_data(tmp_path)}", "data.eval_fraction=0.1",
                 "data.max_length=64", f"train.output_dir={out}", "train.batch_size=4", "train.micro_batch_size=4",
                 "train.progress=false", "train.max_steps=5"]
    train_sft(load_config(SFTConfig, overrides=overrides))
    rows = _metric_rows(out)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= 3))
    import shutil

    shutil.rmtree(out / "model")
    (out / "sft_results.json").unlink()  # now as a run killed at step 4, before any checkpoint, leaves it
    with pytest.raises(RunDirError, match="nothing to resume"):
        train_sft(load_config(SFTConfig, overrides=[*overrides, "train.resume=true"]))
    train_sft(load_config(SFTConfig, overrides=[*overrides, "train.resume=auto"]))
    assert [r["step"] for r in _metric_rows(out)] == [0, 1, 2, 3, 4, 5]


# --------------------------------------------------------------------------- non-finite updates

def test_non_finite_updates_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    from rlhfkit.config import SFTConfig, load_config
    from rlhfkit.trainers import sft
    from rlhfkit.training import TrainingDiverged
    from rlhfkit.training.checkpoint import Checkpointer

    real, calls = sft.sft_batch_loss, []
    bad = {2, 6, 7, 8}  # 0-based steps with a NaN loss: one alone (skipped), then three in a row

    def poisoned(model, batch, normalizer):  # one call per step: micro_batch_size = batch_size, no eval set
        calls.append(len(calls))
        loss, nll, n = real(model, batch, normalizer)
        return (loss * float("nan"), nll * float("nan"), n) if calls[-1] in bad else (loss, nll, n)

    monkeypatch.setattr(sft, "sft_batch_loss", poisoned)
    out = tmp_path / "run"
    overrides = [f"model.name={tiny_model_dir}", f"data.train={_sft_data(tmp_path)}", "data.eval_fraction=0",
                 "data.max_length=64", f"train.output_dir={out}", "train.batch_size=4", "train.micro_batch_size=4",
                 "train.max_steps=12", "train.save_every=2", "train.progress=false", "optim.lr=1e-3"]
    with pytest.raises(TrainingDiverged, match=r"3 consecutive updates had a non-finite loss or gradient .*"
                                               r"stopping without applying them\. Checkpoints saved before them"):
        sft.train_sft(load_config(SFTConfig, overrides=overrides))
    assert len(calls) == 9 and not (out / "model").exists()
    rows = {r["step"]: r for r in _metric_rows(out)}
    assert sorted(rows) == list(range(1, 9))  # stopped at the third bad step in a row
    assert [rows[s]["train/skipped_steps"] for s in (2, 3, 6, 7, 8)] == [0, 1, 1, 2, 3]
    for line in (out / "metrics.jsonl").read_text().splitlines():  # strict JSON: a NaN loss is written as null
        json.loads(line, parse_constant=lambda c: pytest.fail(f"metrics.jsonl holds {c}"))
    assert rows[3]["train/loss"] is None and rows[2]["train/loss"] > 0

    # The report says the stage stopped and skipped updates (it would otherwise show no warning).
    from rlhfkit.report import build_report

    build_report([out])
    kinds = {w["kind"]: w for w in json.loads((out / "report_warnings.json").read_text())}
    assert kinds["unfinished"]["last_step"] == 8 and kinds["skipped_steps"]["skipped"] == 3

    # Checkpoint 8 (after two skipped updates) holds the weights of the last good update, step 6's.
    ckpt = Checkpointer(out)
    assert [p.name for p in ckpt.all()] == ["step-00000006", "step-00000008"]
    six, eight = (_load_safetensors(p / "model") for p in ckpt.all())
    for k in six:
        assert torch.isfinite(eight[k]).all(), k
        torch.testing.assert_close(six[k], eight[k], atol=0, rtol=0)
    state = json.loads((ckpt.latest() / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["guard"] == {"consecutive": 2, "skipped_total": 3}
    monkeypatch.setattr(sft, "sft_batch_loss", real)  # the data is fixed: resume finishes the run
    sft.train_sft(load_config(SFTConfig, overrides=[*overrides, "train.resume=true"]))
    rows = {r["step"]: r for r in _metric_rows(out)}
    assert sorted(rows) == list(range(1, 13))
    # the resumed run keeps counting from the checkpoint's counters (3 skipped before it)
    assert [rows[s]["train/skipped_steps"] for s in (9, 12)] == [3, 3]
    assert all(torch.isfinite(v).all() for v in _final_params(out).values())


def _load_safetensors(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.parametrize("restart_at", [0, 3])
def test_tensorboard_drops_the_steps_a_restart_rewrites(tmp_path, restart_at):
    """A run restarted at step s (0: from scratch, no checkpoint) shows one curve in TensorBoard:
    the old events at or past s are purged, the ones before s kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rlhfkit.training.logger import RunLogger

    first = RunLogger(tmp_path, 6, progress=False)
    for step in range(1, 7):
        first.log(step, {"train/loss": 10.0 + step})
    first.close()
    time.sleep(1.1)  # event files are named by the second they were opened in
    second = RunLogger(tmp_path, 6, progress=False, initial_step=restart_at)
    for step in range(restart_at + 1, 5):
        second.log(step, {"train/loss": float(step)})
    second.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    points = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert points == {s: (10.0 + s if s <= restart_at else float(s)) for s in range(1, 5)}
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 5))


def test_a_large_data_file_edited_in_place_at_the_same_size_is_another_input(tmp_path, monkeypatch):
    """A data file is hashed whole at any size: a pair's labels swapped in place keep the file's
    size and may fall between the blocks a sampled digest reads. A large weight file is still
    sampled, and a record taken when a large data file was sampled compares as it was taken."""
    from rlhfkit.training import fingerprint as fp

    monkeypatch.setattr(fp, "_FULL_HASH_BYTES", 1 << 20)  # "large" from 1 MiB, so that the test writes little
    line = '{"prompt": "p%07d", "chosen": "good answer", "rejected": "bad answer!"}\n'
    n = (40 << 20) // len(line % 0)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(line % i for i in range(n)))
    edge, block, size = 4 << 20, 256 << 10, data.stat().st_size
    gap = edge + (size - 2 * edge - block) // 31 // 2 + block  # between the first two sampled blocks
    i = gap // len(line % 0)
    before = {"sources": {"data.train": fp.identify(str(data))}}
    sampled_before = fp.file_digest(data, sampled=True)
    text = data.read_text().replace(line % i, (line % i).replace("good answer", "XXXX").replace(
        "bad answer!", "good answer").replace("XXXX", "bad answer!"), 1)
    data.write_text(text)
    assert data.stat().st_size == size and fp.file_digest(data, sampled=True) == sampled_before  # the blind spot
    after = {"sources": {"data.train": fp.identify(str(data))}}
    assert after["sources"]["data.train"]["digest"].startswith("sha256:")
    assert fp.differences(before, after) == ["data.train content differs"]

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(bytes(12 << 20))
    assert fp.identify(str(weights))["digest"].startswith("sampled-sha256:")

    older = {"sources": {"data.train": {**after["sources"]["data.train"], "digest": fp.file_digest(data, sampled=True)}}}
    assert fp.differences(older, after) == []  # a record taken by an older version: its data unchanged
    data.write_text(text.replace("p0000000", "p000000X", 1))  # in the first block every sample reads
    assert fp.differences(older, {"sources": {"data.train": fp.identify(str(data))}}) == ["data.train content differs"]
