"""Fault tolerance: SIGKILL mid-run then --resume gives the uninterrupted result; an interrupted
checkpoint write leaves the previous checkpoint loadable."""

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


def test_sft_sigkill_resume_matches_uninterrupted(tmp_path, tiny_model_dir):
    data = _sft_data(tmp_path)
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    _run(_cli("sft", ref, tiny_model_dir, data))
    step = _kill_after_first_checkpoint(_cli("sft", killed, tiny_model_dir, data), killed)
    assert 4 <= step < 14
    _run(_cli("sft", killed, tiny_model_dir, data, ["--resume"]))
    a, b = _final_params(ref), _final_params(killed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    la, lb = _losses(ref), _losses(killed)
    assert sorted(la) == sorted(lb) == list(range(1, 15))  # no step lost or logged twice
    for s in la:
        assert abs(la[s] - lb[s]) < 1e-5, (s, la[s], lb[s])


def test_interrupted_checkpoint_write_keeps_previous(tmp_path, tiny_model_dir, tokenizer, monkeypatch):
    from rlhfkit.models import load_causal_lm
    from rlhfkit.trainers.common import Checkpointer, load_weights_into

    model = load_causal_lm(tiny_model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ck = Checkpointer(tmp_path, keep=2)
    ck.save(2, {"model": model}, {"optimizer": opt}, {"kind": "sft"})
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        ck.save(4, {"model": model}, {"optimizer": opt}, {"kind": "sft"})
    monkeypatch.undo()
    assert ck.latest().name == "step-00000002"
    assert not list((tmp_path / "checkpoints").glob(".*tmp*"))
    fresh = load_causal_lm(tiny_model_dir)
    load_weights_into(fresh, ck.latest() / "model")
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, saved[k])
    state = Checkpointer.load_state(ck.latest(), {"optimizer": opt})
    assert state["step"] == 2
