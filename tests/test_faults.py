"""Faults: a run SIGKILLed at two dozen moments (starting up, training, inside checkpoint writes,
inside the final model write) and resumed each time ends with exactly the weights and metrics of
an uninterrupted run; a full disk stops a run with one line and exit status 2, and the run then
resumes to the same weights; a read-only output directory is one line too."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl

HERE = Path(__file__).resolve().parent
STEPS, SAVE_EVERY = 40, 2


@pytest.fixture(scope="module")
def small_model_dir(tokenizer, tmp_path_factory):
    """One layer, hidden 32: a checkpoint is ~19 MB, so a kill can land anywhere in a few seconds."""
    from rlhfkit.models import save_pretrained_atomic, tiny_causal_lm

    path = tmp_path_factory.mktemp("small") / "model"
    save_pretrained_atomic(tiny_causal_lm(tokenizer, hidden_size=32, layers=1, heads=2, seed=1), tokenizer, path)
    return path


def _data(tmp_path: Path) -> Path:
    rows = [{"prompt": f"Spell {i} please", "response": " ".join(str(i)) + " done"} for i in range(24)]
    return write_jsonl(tmp_path / "sft.jsonl", rows)


def _argv(model_dir, data, out, *extra):
    return ["sft", f"model.name={model_dir}", f"data.train={data}", "data.eval_fraction=0.1", "data.max_length=48",
            f"train.output_dir={out}", "train.batch_size=4", "train.micro_batch_size=4", f"train.max_steps={STEPS}",
            f"train.save_every={SAVE_EVERY}", "train.progress=false", "optim.lr=3e-3", "optim.warmup_ratio=0.1", *extra]


class Forker:
    """Drives tests/fault_worker.py: start a run, get its pid, learn how it ended."""

    def __init__(self, log: Path):
        # one thread per run: no oversubscription on a small machine, and the same kernels every time
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, str(HERE / "fault_worker.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.log = log

    def start(self, argv, env=None) -> int:
        self.proc.stdin.write(json.dumps({"argv": argv, "env": env or {}, "log": str(self.log)}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["pid"]

    def result(self) -> int:
        return json.loads(self.proc.stdout.readline())["status"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _wait_for(pid_done, cond, timeout=120.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        if pid_done():
            return False
        time.sleep(0.005)
    return False


def _exited(pid: int) -> bool:
    """Whether ``pid`` (a grandchild: the worker reaps it) has finished: a zombie or gone."""
    try:
        return open(f"/proc/{pid}/stat").read().split(") ")[1][0] == "Z"
    except FileNotFoundError:
        return True


def _writing(out: Path, pattern: str) -> set[str]:
    return {p.name for p in out.glob(pattern)} if out.is_dir() else set()


def _sleep_unless(seconds: float, cond) -> None:
    """Sleep ``seconds``, or less if ``cond()`` becomes true first."""
    deadline = time.time() + seconds
    while time.time() < deadline and not cond():
        time.sleep(0.005)


def _checkpoints(out: Path) -> list[str]:
    ck = out / "checkpoints"
    return sorted(p.name for p in ck.glob("step-*")) if ck.is_dir() else []


def _rows(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "model" / "model.safetensors"))


def test_sigkill_at_two_dozen_moments_then_resume_gives_the_uninterrupted_weights(tmp_path, small_model_dir):
    data, ref, out = _data(tmp_path), tmp_path / "ref", tmp_path / "run"
    forker = Forker(tmp_path / "runs.log")
    env = {"RLHFKIT_TEST_CHECKPOINT_SLEEP": "0.03"}  # widens each checkpoint write to > 0.15 s
    try:
        t0 = time.time()
        forker.start(_argv(small_model_dir, data, ref), env)
        assert forker.result() == 0, (tmp_path / "runs.log").read_text()[-3000:]
        duration = time.time() - t0
        times = [r["time"] for r in _rows(ref)]
        startup, per_step = times[0] - t0, (times[-1] - times[0]) / STEPS
        rng = random.Random(0)
        # 7 kills at a random moment from the start to two steps in, 7 inside a checkpoint write, 7 at a
        # random moment just after a new checkpoint appears, then one inside the final model write.
        # A kill comes early rather than let a run get two checkpoints further: at most 14 of the 19
        # checkpoints are reached before the last kill, whatever the machine's speed.
        modes = ["random"] * 7 + ["in-checkpoint"] * 7 + ["after-checkpoint"] * 7
        rng.shuffle(modes)
        kills = {"random": 0, "in-checkpoint": 0, "after-checkpoint": 0, "in-final-model": 0}
        torn_writes = 0
        for mode in [*modes, "in-final-model"]:
            before, stale = _checkpoints(out), _writing(out / "checkpoints", ".step-*.tmp-*")
            pid = forker.start(_argv(small_model_dir, data, out, "train.resume=auto"), env)
            done = lambda: _exited(pid)  # noqa: E731
            new = lambda: _checkpoints(out) not in ([], before)  # noqa: E731
            if mode == "random":
                _sleep_unless(rng.uniform(0.0, startup + 2 * per_step), lambda: new() or done())
            elif mode == "in-checkpoint":  # a write of this run (a killed one's leftover is cleared at start)
                _wait_for(done, lambda: _writing(out / "checkpoints", ".step-*.tmp-*") - stale)
                time.sleep(rng.uniform(0.0, 0.1))
            elif mode == "after-checkpoint":
                _wait_for(done, new)
                now = _checkpoints(out)
                _sleep_unless(rng.uniform(0.0, per_step), lambda: _checkpoints(out) != now or done())
            else:
                _wait_for(done, lambda: _writing(out, ".model.tmp-*"))
            torn_writes += bool(_writing(out / "checkpoints", ".step-*.tmp-*") - stale or _writing(out, ".model.tmp-*"))
            assert not done(), f"run {mode} finished before its kill: {_checkpoints(out)}"
            os.kill(pid, signal.SIGKILL)
            status = forker.result()
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
                mode, status, (tmp_path / "runs.log").read_text()[-3000:])
            kills[mode] += 1
            print(f"kill {sum(kills.values())} ({mode}): checkpoints {_checkpoints(out)}", flush=True)
        assert not (out / "model").exists() or (out / "model" / "model.safetensors").is_file()
        forker.start(_argv(small_model_dir, data, out, "train.resume=auto"), env)
        assert forker.result() == 0, (tmp_path / "runs.log").read_text()[-3000:]
    finally:
        forker.close()
    assert sum(kills.values()) >= 20 and torn_writes >= 5, (kills, torn_writes)
    a, b = _weights(ref), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = _rows(ref), _rows(out)
    assert [r["step"] for r in rb] == list(range(0, STEPS + 1))  # nothing lost, nothing logged twice
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows]  # noqa: E731
    assert strip(ra) == strip(rb)
    print(f"\nkills survived: {kills} ({torn_writes} inside a checkpoint or model write); "
          f"uninterrupted run {duration:.1f} s (start-up {startup:.1f} s, {per_step:.3f} s/step)")


# --------------------------------------------------------------------------- full and read-only disks

def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _cli(capsys, argv) -> tuple[int, list[str]]:
    from rlhfkit.cli import main

    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, [ln for ln in err.splitlines() if ln.startswith("rlhfkit ")]


def test_a_full_disk_stops_in_one_line_and_the_run_then_resumes_to_the_same_weights(
        tmp_path, small_model_dir, capsys, monkeypatch):
    data, ref, disk = _data(tmp_path), tmp_path / "ref", tmp_path / "disk"
    argv = lambda out, *x: _argv(small_model_dir, data, out, "train.max_steps=8", *x)  # noqa: E731
    assert _cli(capsys, argv(ref))[0] == 0
    mounted = _mount_tmpfs(disk, "30m")  # room for one ~19 MB checkpoint, not for two
    try:
        if not mounted:  # no tmpfs here: the same failure, injected where the second checkpoint is written
            from rlhfkit.training import checkpoint

            real, calls = checkpoint._torch_save, []

            def full(obj, path):
                calls.append(path)
                if len(calls) == 3:  # optim.pt of the second checkpoint
                    raise OSError(28, "No space left on device")
                real(obj, path)

            monkeypatch.setattr(checkpoint, "_torch_save", full)
        out = disk / "run"
        code, lines = _cli(capsys, argv(out))
        assert code == 2 and len(lines) == 1, lines
        assert lines[0].startswith("rlhfkit sft: error: No space left on device: ") and "--resume" in lines[0]
        assert _checkpoints(out) == ["step-00000002"] and not list((out / "checkpoints").glob(".*"))
        if mounted:
            assert subprocess.run(["mount", "-o", "remount,size=300m", str(disk)]).returncode == 0
        else:
            monkeypatch.undo()
        code, lines = _cli(capsys, ["sft", "--resume", *argv(out)[1:]])
        assert code == 0, lines
        a, b = _weights(ref), _weights(out)
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert [r["step"] for r in _rows(out)] == list(range(0, 9))
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(disk)])  # lazy: a failed run may hold a file open


def test_a_read_only_output_directory_is_one_line_before_anything_runs(tmp_path, small_model_dir, capsys):
    ro = tmp_path / "ro"
    if not _mount_tmpfs(ro, "1m"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        code, lines = _cli(capsys, _argv(small_model_dir, _data(tmp_path), ro / "run"))
        assert code == 2 and len(lines) == 1 and "not writable" in lines[0] and "train.output_dir" in lines[0], lines
    finally:
        subprocess.run(["umount", "-l", str(ro)])


def test_permission_denied_is_one_line(tmp_path, small_model_dir, capsys, monkeypatch):
    """As root nothing is denied by permissions, so the OS error is raised where the run directory
    is opened, as a non-root user on a directory of someone else's would see it."""
    import rlhfkit.training.run

    def denied(cfg, kind, **kw):
        raise PermissionError(13, "Permission denied", cfg.train.output_dir)

    monkeypatch.setattr(rlhfkit.training.run, "open_rundir", denied)
    out = tmp_path / "theirs" / "run"
    code, lines = _cli(capsys, _argv(small_model_dir, _data(tmp_path), out))
    assert code == 2 and lines == [f"rlhfkit sft: error: Permission denied: {out} (choose a writable "
                                   "train.output_dir)"], lines
