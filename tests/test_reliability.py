"""Trustworthy runs: no code runs from a checkpoint, a checkpoint counts only when its manifest
verifies, a run directory is continued only by the same run, caches are keyed by what they were
computed from, and every user error is one line with exit status 2 before anything is written."""

from __future__ import annotations

import json
import math
import shutil
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_jsonl


def _sft_data(path: Path, n: int = 16, shift: int = 0) -> Path:
    rows = [{"prompt": f"Count to {i + shift}", "response": " ".join(str(j) for j in range(1, i % 5 + 2))}
            for i in range(n)]
    return write_jsonl(path, rows)


def _sft_args(model_dir, data, out, *extra):
    return ["sft", f"model.name={model_dir}", f"data.train={data}", "data.eval_fraction=0", "data.max_length=64",
            f"train.output_dir={out}", "train.batch_size=4", "train.micro_batch_size=4", "train.max_steps=4",
            "train.save_every=2", "train.progress=false", "optim.lr=1e-3", *extra]


def _cli(capsys, argv) -> tuple[int, str]:
    """Run the CLI in-process; returns (exit status, the line it printed as an error)."""
    from rlhfkit.cli import main

    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("rlhfkit ")]
    assert len(lines) <= 1, err
    return code, lines[0] if lines else ""


# --------------------------------------------------------------------------- checkpoints: no code, manifests

class _Exploit:
    """A pickle that creates a file when it is loaded (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(ckpt: Path, marker: Path, fix_manifest: bool) -> None:
    import hashlib

    torch.save({"optimizer": _Exploit(marker)}, ckpt / "optim.pt")  # a real torch file, with a payload
    assert not marker.exists()
    manifest = ckpt / "manifest.json"
    if fix_manifest and manifest.is_file():  # an attacker who also rewrites the manifest: the load must refuse
        m = json.loads(manifest.read_text())
        data = (ckpt / "optim.pt").read_bytes()
        m["files"]["optim.pt"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        manifest.write_text(json.dumps(m))


@pytest.mark.parametrize("fix_manifest", [True, False])
def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path, tiny_model_dir, capsys, fix_manifest):
    data, out, marker = _sft_data(tmp_path / "d.jsonl"), tmp_path / "run", tmp_path / "pwned"
    assert _cli(capsys, _sft_args(tiny_model_dir, data, out, "train.max_steps=3"))[0] == 0
    for ckpt in sorted((out / "checkpoints").iterdir()):  # steps 2 and 3 (the end)
        _plant(ckpt, marker, fix_manifest)
    code, line = _cli(capsys, ["sft", "--resume", *_sft_args(tiny_model_dir, data, out, "train.max_steps=3")[1:]])
    assert code == 2 and not marker.exists()
    if fix_manifest:
        assert "optim.pt: refused to load: it holds more than tensors" in line, line
    else:  # the manifests no longer verify: the checkpoints are skipped, and there is no other
        assert "nothing to resume" in line and "no complete checkpoint" in line, line
        assert "replace the run with --overwrite" in line and "start without --resume" not in line, line


def test_every_torch_load_in_the_package_is_weights_only():
    root = Path(__file__).resolve().parents[1] / "src"
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "weights_only=False" not in text, path
        assert "pickle.load" not in text and "yaml.load(" not in text and "yaml.unsafe_load" not in text, path
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, (path, line)


def test_checkpointer_keeps_the_newest_complete_checkpoints_and_latest_is_the_newest(tmp_path):
    from rlhfkit.training.checkpoint import MANIFEST, Checkpointer

    ck = Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3, 4):
        ck.save(step, {}, {"actor": {"lr": 0.1}}, {"format": 2}, {"note": step})
    assert [p.name for p in ck.all()] == ["step-00000003", "step-00000004"]
    assert ck.latest().name == "step-00000004"
    (ck.root / "step-00000005").mkdir()  # a write that never finished: no manifest
    assert ck.latest().name == "step-00000004" and [p.name for p in ck.all()][-1] == "step-00000004"
    (ck.root / "step-00000004" / MANIFEST).unlink()
    assert ck.latest().name == "step-00000003"
    assert Checkpointer.load(ck.latest())[2] == {"step": 3, "note": 3}


def test_a_rank_the_saved_run_did_not_have_gets_a_fresh_stream_from_step_and_rank():
    from rlhfkit.rng import plain_rng_state
    from rlhfkit.training.checkpoint import RNG_FORMAT, restore_rng

    saved = {"format": RNG_FORMAT, "world_size": 1, "ranks": [plain_rng_state()]}
    restore_rng(saved, 7, 1)  # rank 1 of a resumed run on 2 processes
    a = torch.rand(3)
    restore_rng(saved, 7, 1)
    torch.testing.assert_close(torch.rand(3), a)
    restore_rng(saved, 7, 2)
    assert not torch.equal(torch.rand(3), a)


def test_rng_states_round_trip_through_weights_only_files(tmp_path):
    from rlhfkit.parallel import SingleProcess
    from rlhfkit.training.checkpoint import gather_rng_states, restore_rng, safe_load

    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    random.random(), np.random.normal(), torch.rand(3)  # mid-stream, with numpy's cached gaussian
    torch.save(gather_rng_states(SingleProcess()), tmp_path / "rng.pt")
    expect = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    restore_rng(safe_load(tmp_path / "rng.pt"), step=1, rank=0)
    got = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    assert got[:3] == expect[:3] and torch.equal(got[3], expect[3])


def _two_checkpoints(tmp_path, tiny_model_dir) -> "Checkpointer":  # noqa: F821
    from rlhfkit.models import load_causal_lm
    from rlhfkit.parallel import SingleProcess
    from rlhfkit.training.checkpoint import Checkpointer, save_checkpoint

    model = load_causal_lm(tiny_model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ck = Checkpointer(tmp_path, keep=3)
    for step in (2, 4):
        save_checkpoint(ck, SingleProcess(), step, {"model": model}, {"optimizer": opt}, {"kind": "sft"})
    return ck


@pytest.mark.parametrize("damage, reason", [
    (lambda c: os.truncate(c / "optim.pt", 100), "optim.pt has 100 bytes"),
    (lambda c: os.truncate(c / "model" / "model.safetensors", 1000), "model/model.safetensors has 1000 bytes"),
    (lambda c: (c / "trainer_state.json").write_text(""), "trainer_state.json has 0 bytes"),
    (lambda c: (c / "manifest.json").unlink(), "no manifest"),
    (lambda c: (c / "manifest.json").write_text('{"files": {"optim.pt": {}}}'),
     "unreadable manifest (its entry for 'optim.pt' is not {size, sha256})"),
    (lambda c: (c / "manifest.json").write_text('{"files": {"optim.pt": 5}}'), "unreadable manifest (its entry"),
    (lambda c: (c / "rng.pt").write_bytes(b"x" * (c / "rng.pt").stat().st_size), "rng.pt does not match its SHA-256"),
])
def test_latest_skips_a_damaged_checkpoint_with_a_warning(tmp_path, tiny_model_dir, caplog, damage, reason):
    ck = _two_checkpoints(tmp_path, tiny_model_dir)
    assert ck.latest().name == "step-00000004"
    damage(ck.root / "step-00000004")
    with caplog.at_level("WARNING", logger="rlhfkit"):
        assert ck.latest().name == "step-00000002"
    assert f"skipping checkpoint {ck.root / 'step-00000004'}: {reason}" in caplog.text


def test_checkpoint_files_and_dirs_are_not_private_and_the_rename_is_synced(tmp_path, tiny_model_dir, monkeypatch):
    from rlhfkit.training import checkpoint

    synced = []
    real = checkpoint.fsync_path
    monkeypatch.setattr(checkpoint, "fsync_path", lambda p: (synced.append(Path(p)), real(p)))
    old = os.umask(0o022)
    try:
        ck = _two_checkpoints(tmp_path, tiny_model_dir)
    finally:
        os.umask(old)
    final = ck.root / "step-00000004"
    assert final.stat().st_mode & 0o777 == 0o755 and (final / "model").stat().st_mode & 0o777 == 0o755
    # every file too: safetensors writes its own 0600
    assert {p.name: p.stat().st_mode & 0o777 for p in final.rglob("*") if p.is_file()} == {
        p.name: 0o644 for p in final.rglob("*") if p.is_file()}
    assert synced[-1] == ck.root  # the parent, after the rename
    manifest = json.loads((final / "manifest.json").read_text())["files"]
    assert {"optim.pt", "rng.pt", "trainer_state.json", "model/model.safetensors"} <= set(manifest)


def test_saved_models_are_not_private(tmp_path, tiny_model):
    from rlhfkit.models import save_pretrained_atomic

    old = os.umask(0o022)
    try:
        out = save_pretrained_atomic(tiny_model, None, tmp_path / "model")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o644 == (out / "config.json").stat().st_mode & 0o777



@pytest.mark.parametrize("before", ["nothing", "a directory", "a link", "a file"])
@pytest.mark.parametrize("link", [False, True])
def test_a_directory_copy_replaces_whatever_was_there_whole(tmp_path, before, link, monkeypatch):
    from rlhfkit import io

    src = tmp_path / "ckpt" / "model"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(b"new weights")
    (src / "sub" / "b.json").write_text("{}")
    dst, other = tmp_path / "best" / "model", tmp_path / "other"
    other.mkdir()
    dst.parent.mkdir()
    if before == "a directory":
        dst.mkdir()
        (dst / "a.bin").write_bytes(b"old weights")
        (dst / "stale.txt").write_text("from before")
    elif before == "a link":
        dst.symlink_to(other, target_is_directory=True)
    elif before == "a file":
        dst.write_text("x")
    io.copy_tree_atomic(src, dst, link=link)
    assert sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*")) == ["a.bin", "sub", "sub/b.json"]
    assert not dst.is_symlink() and (dst / "a.bin").read_bytes() == b"new weights" and other.is_dir()
    assert ((dst / "a.bin").stat().st_ino == (src / "a.bin").stat().st_ino) == link  # hard links only when asked
    assert [p.name for p in dst.parent.iterdir()] == ["model"]  # no temporary or moved-aside directory left
    shutil.rmtree(src)
    assert (dst / "a.bin").read_bytes() == b"new weights"  # whole without its source

    # a copy that fails leaves the old directory in place and no temporary one
    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.shutil, "copytree", broken)
    with pytest.raises(OSError, match="No space"):
        io.copy_tree_atomic(other, dst, link=link)
    assert [p.name for p in dst.parent.iterdir()] == ["model"] and (dst / "a.bin").read_bytes() == b"new weights"


# --------------------------------------------------------------------------- run directories

def _cfg(tmp_path, data, *extra):
    from rlhfkit.config import SFTConfig, load_config

    return load_config(SFTConfig, overrides=[f"data.train={data}", f"train.output_dir={tmp_path / 'run'}",
                                             "model.name=some/model", *extra])


def _used_run(tmp_path, data):
    """A run directory as a finished run leaves it (record, config, a checkpoint, a model)."""
    from rlhfkit.training.checkpoint import write_manifest
    from rlhfkit.training.rundir import open_run

    run = open_run(_cfg(tmp_path, data), "sft")
    ck = run.path / "checkpoints" / "step-00000002"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text('{"step": 2}')
    write_manifest(ck)
    (run.path / "model").mkdir()
    (run.path / "sft_results.json").write_text("{}")
    (run.path / "metrics.jsonl").write_text('{"step": 1}\n')
    return run.path


def test_a_fresh_run_refuses_a_used_directory_unless_told_to_overwrite(tmp_path):
    from rlhfkit.training.rundir import RunDirError, open_run

    data = _sft_data(tmp_path / "d.jsonl")
    out = _used_run(tmp_path, data)
    with pytest.raises(RunDirError, match=r"holds a previous run \(checkpoints/, model/, sft_results.json\): "
                                          r"continue it with --resume .* or replace it with --overwrite"):
        open_run(_cfg(tmp_path, data), "sft")
    (out / "notes.txt").write_text("mine")
    cfg = _cfg(tmp_path, data, "train.overwrite=true")
    run = open_run(cfg, "sft")
    assert not run.resuming and cfg.train.overwrite is False and cfg.train.resume is False
    assert sorted(p.name for p in out.iterdir()) == [".lock", "notes.txt", "sft_config.yaml", "sft_run.json"]


def test_overwrite_deletes_nothing_that_no_run_recorded(tmp_path):
    from rlhfkit.training.rundir import RunDirError, open_run

    data = _sft_data(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)  # a user's own model where the run is pointed, no run record
    (out / "model" / "config.json").write_text("{}")
    (out / "tb").mkdir()
    with pytest.raises(RunDirError, match=r"train.overwrite: .*run holds model/, tb/ but no rlhfkit run record"):
        open_run(_cfg(tmp_path, data, "train.overwrite=true"), "sft")
    assert sorted(p.name for p in out.iterdir()) == ["model", "tb"] and (out / "model" / "config.json").is_file()


def test_overwrite_refuses_to_delete_the_runs_own_input(tmp_path):
    """model.name=RUN/model with train.output_dir=RUN and --overwrite: deleting the outputs would
    delete the model the run is about to load; refused before anything is deleted."""
    from rlhfkit.training.rundir import RunDirError, open_run

    data = _sft_data(tmp_path / "d.jsonl")
    out = _used_run(tmp_path, data)
    (out / "model" / "config.json").write_text("{}")
    with pytest.raises(RunDirError, match=r"train.overwrite: model.name \(.*run/model\) is in .*run/model, which "
                                          r"overwriting .* would delete"):
        open_run(_cfg(tmp_path, data, f"model.name={out / 'model'}", "train.overwrite=true"), "sft")
    assert (out / "model" / "config.json").is_file() and (out / "checkpoints").is_dir()
    from rlhfkit.config import load_config
    from rlhfkit.trainers.online_dpo import OnlineDPOConfig
    from rlhfkit.training.fingerprint import default_sources
    from rlhfkit.training.rundir import _check_inputs_survive

    online = load_config(OnlineDPOConfig, data={"gold": f"rm:{out}"})  # online DPO's gold judge is an input too
    assert default_sources(online)["gold"] == f"rm:{out}"
    with pytest.raises(RunDirError, match=r"train.overwrite: gold \(rm:"):
        _check_inputs_survive(out, default_sources(online))
    # a symlinked model/ is unlinked, its target kept: the target as an input is no reason to refuse
    target = tmp_path / "elsewhere"
    (out / "model").rename(target)
    (out / "model").symlink_to(target)
    _check_inputs_survive(out, {"model.name": str(target)})
    with pytest.raises(RunDirError, match=r"model.name"):  # reached through the link, it would be lost
        _check_inputs_survive(out, {"model.name": str(out / "model")})


def test_held_out_prompts_and_the_gold_judge_are_part_of_a_runs_identity(tmp_path):
    """They drive select_best and early stopping: a resume on other held-out prompts or another
    gold judge is a mismatch, as other data is."""
    from rlhfkit.config import load_config
    from rlhfkit.trainers.grpo import GRPOConfig
    from rlhfkit.training.fingerprint import default_sources, differences, fingerprint

    prompts = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "a"}])
    cfg = load_config(GRPOConfig, data={"prompts": {"eval": str(prompts)}, "reward": {"gold": "task:sentiment"}})
    before = fingerprint(cfg, "grpo", default_sources(cfg))
    write_jsonl(prompts, [{"prompt": "b"}])
    cfg.reward.gold = "task:arithmetic"
    assert differences(before, fingerprint(cfg, "grpo", default_sources(cfg))) == [
        "reward.gold task:sentiment -> task:arithmetic", "prompts.eval content differs", "reward.gold content differs"]
    older = {**before, "version": 1, "sources": {k: v for k, v in before["sources"].items()
                                                 if k not in ("prompts.eval", "reward.gold")}}
    assert differences(older, fingerprint(cfg, "grpo", default_sources(cfg))) == [
        "reward.gold task:sentiment -> task:arithmetic"]  # a run recorded before they were fingerprinted


def test_resume_needs_something_to_resume(tmp_path):
    from rlhfkit.training.rundir import RunDirError, open_run

    data = _sft_data(tmp_path / "d.jsonl")
    with pytest.raises(RunDirError, match=r"nothing to resume in .*run: no checkpoint there"):
        open_run(_cfg(tmp_path, data, "train.resume=true"), "sft")
    assert not (tmp_path / "run").exists()
    cfg = _cfg(tmp_path, data, "train.resume=auto")  # auto: nothing there, so start
    assert not open_run(cfg, "sft").resuming and cfg.train.resume is False


def test_auto_refuses_a_finished_run_that_saved_no_checkpoint(tmp_path):
    """train.resume=auto on a run that finished without checkpoints (save_every: 0): nothing to
    continue, and starting would replace the run, so it is refused as a fresh start is; the
    directory is left as it was (it used to be retrained from step 1 as if continued)."""
    import shutil

    from rlhfkit.training.rundir import RunDirError, open_run

    data = _sft_data(tmp_path / "d.jsonl")
    out = _used_run(tmp_path, data)
    shutil.rmtree(out / "checkpoints")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(RunDirError, match=r"holds a previous run \(model/, sft_results.json\) that saved no checkpoint "
                                          r"to continue from .*train.resume=auto has nothing to continue; replace it "
                                          r"with --overwrite"):
        open_run(_cfg(tmp_path, data, "train.resume=auto"), "sft")
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.parametrize("change, named", [
    (["optim.lr=1e-3"], "optim.lr 2e-05 -> 0.001"),
    (["train.seed=9"], "train.seed 0 -> 9"),
    (["data.max_length=256"], "data.max_length 512 -> 256"),
    ("data", "data.train content differs (size"),
])
def test_resume_refuses_another_config_or_data_naming_what_differs(tmp_path, caplog, change, named):
    from rlhfkit.training.rundir import RunDirError, open_run

    data = _sft_data(tmp_path / "d.jsonl")
    out = _used_run(tmp_path, data)
    if change == "data":
        _sft_data(data, n=17)
        change = []
    with pytest.raises(RunDirError, match="cannot resume") as e:
        open_run(_cfg(tmp_path, data, "train.resume=true", *change), "sft")
    assert named in str(e.value) and "train.resume_mismatch_ok=true" in str(e.value)
    with caplog.at_level("WARNING", logger="rlhfkit"):
        run = open_run(_cfg(tmp_path, data, "train.resume=true", "train.resume_mismatch_ok=true", *change), "sft")
    assert run.resuming and run.checkpoint == out / "checkpoints" / "step-00000002"
    assert named in json.loads((out / "sft_run.json").read_text())["history"][-1]["differences"][0]
    # an optimizer setting is restored from the checkpoint, not taken from the new config: said
    assert ("optim.lr: not applied on resume" in caplog.text) == named.startswith("optim.")


def test_resume_identifies_each_of_a_list_of_training_sources(tmp_path):
    from rlhfkit.training.rundir import RunDirError, open_run

    a, b = _sft_data(tmp_path / "a.jsonl"), _sft_data(tmp_path / "b.jsonl", shift=100)
    out = _used_run(tmp_path, f"[{a}, {b}]")
    record = json.loads((out / "sft_run.json").read_text())
    assert {"data.train[0]", "data.train[1]"} <= set(record["sources"])
    assert open_run(_cfg(tmp_path, f"[{a}, {b}]", "train.resume=true"), "sft").resuming
    _sft_data(b, n=17, shift=100)  # the second file changed
    with pytest.raises(RunDirError, match=r"cannot resume.*data\.train\[1\] content differs \(size"):
        open_run(_cfg(tmp_path, f"[{a}, {b}]", "train.resume=true"), "sft")
    with pytest.raises(RunDirError, match=r"data\.train\[1\] content differs.*data\.train\[2\] added"):
        open_run(_cfg(tmp_path, f"[{a}, {b}, {a}]", "train.resume=true"), "sft")


def test_a_reward_list_of_entries_and_the_online_dpo_scorer_are_identified_by_their_files(tmp_path):
    """reward.spec as {spec, weight, name} entries fingerprints each entry's spec (it once crashed
    the run's start); online DPO's scorer (rm:, pm:) is identified by its files, so a scorer
    retrained in place cannot label the rest of a resumed run."""
    from rlhfkit.config import load_config
    from rlhfkit.trainers.grpo import GRPOConfig
    from rlhfkit.trainers.online_dpo import OnlineDPOConfig
    from rlhfkit.training.fingerprint import default_sources, differences, fingerprint

    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "config.json").write_text("{}")
    (rm / "model.safetensors").write_bytes(b"weights")
    cfg = load_config(GRPOConfig, data={"reward": {"spec": [{"spec": f"rm:{rm}", "weight": 2.0, "name": "rm"},
                                                             "task:sentiment"]}})
    sources = default_sources(cfg)
    assert sources["reward.spec[0]"] == f"rm:{rm}" and sources["reward.spec[1]"] == "task:sentiment"
    assert set(fingerprint(cfg, "grpo", sources)["sources"]["reward.spec[0]"]["files"]) == {
        "config.json", "model.safetensors"}
    for spec in (f"rm:{rm}", f"pm:{rm}"):
        online = load_config(OnlineDPOConfig, data={"scorer": spec})
        before = fingerprint(online, "online_dpo", default_sources(online))
        (rm / "model.safetensors").write_bytes(b"retrained " + spec.encode())
        after = fingerprint(online, "online_dpo", default_sources(online))
        assert differences(before, after) == ["scorer content differs"]


def test_resume_allows_what_does_not_change_the_numbers(tmp_path, caplog):
    from rlhfkit.training.rundir import open_run

    data = _sft_data(tmp_path / "d.jsonl")
    _used_run(tmp_path, data)
    moved = tmp_path / "elsewhere.jsonl"
    moved.write_bytes(data.read_bytes())  # the same data under another name
    cfg = _cfg(tmp_path, moved, "train.resume=true", "train.save_every=7", "train.log_every=3",
               "train.micro_batch_size=2", "train.fsdp=true", "train.keep_checkpoints=5", "train.eval_every=3",
               "train.max_steps=50")  # a longer run: said, not refused
    with caplog.at_level("WARNING", logger="rlhfkit"):
        run = open_run(cfg, "sft")
    assert run.resuming and cfg.train.resume == "auto"  # nested stages continue or start on their own
    assert "with another length (train.max_steps 0 -> 50)" in caplog.text


def test_a_finished_run_continues_for_longer_from_its_final_checkpoint(tmp_path, tiny_model_dir, capsys):
    """save_every 4, max_steps 2: the run still ends with a checkpoint (step 2), so --resume with
    max_steps 3 runs one more step; a run that saved none (save_every 0) is refused by both
    commands with the same way out (--overwrite), not sent from one to the other."""
    data, out = _sft_data(tmp_path / "d.jsonl"), tmp_path / "run"
    args = [a for a in _sft_args(tiny_model_dir, data, out) if not a.startswith(("train.max_steps", "train.save_every"))]
    assert _cli(capsys, [*args, "train.max_steps=2", "train.save_every=4"])[0] == 0
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]
    assert _cli(capsys, [*args, "train.max_steps=3", "train.save_every=4", "--resume"])[0] == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]

    none = tmp_path / "none"
    args = [a if not a.startswith("train.output_dir") else f"train.output_dir={none}" for a in args]
    assert _cli(capsys, [*args, "train.max_steps=2", "train.save_every=0"])[0] == 0
    for extra in ([], ["--resume"]):
        code, line = _cli(capsys, [*args, "train.max_steps=3", *extra])
        assert code == 2 and "saved no checkpoint" in line and "--overwrite" in line, line
        assert "continue it with --resume" not in line and "start without --resume" not in line, line


def test_a_run_recorded_before_a_key_existed_resumes_when_the_key_keeps_its_default(tmp_path):
    """A key added to rlhfkit after a run started (here train.drop_last, as if the record predates
    it) is no mismatch at its default, the behaviour the run had; set otherwise, it is one."""
    from rlhfkit.training.rundir import RunDirError, open_run

    data = _sft_data(tmp_path / "d.jsonl")
    out = _used_run(tmp_path, data)
    record = json.loads((out / "sft_run.json").read_text())
    del record["config"]["train.drop_last"]
    (out / "sft_run.json").write_text(json.dumps(record))
    assert open_run(_cfg(tmp_path, data, "train.resume=true"), "sft").resuming
    (out / "sft_run.json").write_text(json.dumps(record))
    with pytest.raises(RunDirError, match=r"train.drop_last <unset> -> false"):
        open_run(_cfg(tmp_path, data, "train.resume=true", "train.drop_last=false"), "sft")


def test_a_run_record_without_a_config_is_named_unreadable(tmp_path):
    from rlhfkit.training.rundir import RunDirError, open_run

    data = _sft_data(tmp_path / "d.jsonl")
    out = _used_run(tmp_path, data)
    for text in ("{}", "[1, 2]", "{not json", '{"config": [], "sources": {}}', '{"config": {}, "sources": []}',
                 '{"config": {}, "sources": {"model.name": "x"}}', '{"config": {}, "version": "2"}'):
        (out / "sft_run.json").write_text(text)
        with pytest.raises(RunDirError, match=r"has an unreadable record of a sft run \(sft_run\.json\)"):
            open_run(_cfg(tmp_path, data, "train.resume=true"), "sft")


@pytest.mark.parametrize("resume, said", [
    ("true", "nothing to resume in .*run: no complete checkpoint there; step-00000002: trainer_state.json has 0 "
             "bytes, the manifest says 11 \\(replace the run with --overwrite"),
    ("false", "holds a previous run \\(checkpoints/, model/, sft_results.json\\) whose newest checkpoint is incomplete "
              "\\(step-00000002: trainer_state.json has 0 bytes, "
              "the manifest says 11\\): replace it"),
    ("auto", "whose newest checkpoint is incomplete \\(step-00000002: .*\\), so train.resume=auto has nothing"),
])
def test_a_run_whose_only_checkpoint_is_incomplete_is_refused_in_one_line_naming_why(tmp_path, caplog, resume, said):
    """The refusal names the incomplete checkpoint and what is wrong with it, and no warning
    about skipping it comes before (it used to be a warning, then an error saying no checkpoint)."""
    from rlhfkit.training.rundir import RunDirError, open_run

    data = _sft_data(tmp_path / "d.jsonl")
    out = _used_run(tmp_path, data)
    (out / "checkpoints" / "step-00000002" / "trainer_state.json").write_text("")
    with caplog.at_level("WARNING", logger="rlhfkit"), pytest.raises(RunDirError, match=said):
        open_run(_cfg(tmp_path, data, f"train.resume={resume}"), "sft")
    assert caplog.text == ""


def test_another_commands_run_is_never_continued_even_with_mismatch_ok(tmp_path, caplog):
    """`rlhfkit dpo --resume` on an SFT run's directory would load the SFT trainer's checkpoint:
    refused in one line naming both commands, with train.resume_mismatch_ok too; a run with no
    record at all is continued under mismatch_ok only with a warning that says so."""
    from rlhfkit.training.rundir import RunDirError, open_run

    data = _sft_data(tmp_path / "d.jsonl")
    out = _used_run(tmp_path, data)
    for ok in ("false", "true"):
        with pytest.raises(RunDirError, match=r"cannot resume .*run: it holds a run of `rlhfkit sft` \(sft_run\.json\), "
                                              r"not of `rlhfkit online-dpo`; choose another train.output_dir"):
            open_run(_cfg(tmp_path, data, "train.resume=true", f"train.resume_mismatch_ok={ok}"), "online_dpo")
    assert not (out / "online_dpo_run.json").exists()
    (out / "sft_run.json").unlink()
    with caplog.at_level("WARNING", logger="rlhfkit"):
        assert open_run(_cfg(tmp_path, data, "train.resume=true", "train.resume_mismatch_ok=true"), "sft").resuming
    assert "although it has no record of a sft run (sft_run.json; train.resume_mismatch_ok)" in caplog.text


def test_a_key_set_in_the_old_run_and_back_at_its_default_now_is_a_difference():
    """The default excuses only a key the old record lacks: a run trained with lr 1e-3 is not
    continued with the default lr, nor a run recorded with an older source version than it has."""
    from rlhfkit.training.fingerprint import differences

    defaults = {"optim.lr": 1e-5}
    assert differences({"config": {"optim.lr": 1e-3}}, {"config": {"optim.lr": 1e-5}}, defaults) == [
        "optim.lr 0.001 -> 1e-05"]
    assert differences({"config": {}}, {"config": {"optim.lr": 1e-5}}, defaults) == []
    gold = {"gold": {"spec": "task:sentiment"}}
    assert differences({"version": 2, "sources": {}}, {"version": 2, "sources": gold}) == ["gold added"]
    assert differences({"version": 1, "sources": {}}, {"version": 2, "sources": gold}) == []


def test_eval_every_is_a_difference_while_a_best_checkpoint_is_kept():
    """With train.select_best (or early stopping) the evaluated steps are the candidates for the
    final model: a finished stage or a resume with another eval_every would keep a model the new
    config would not. Without either it only says how often to look. A record taken before the
    key was recorded is compared as it was taken."""
    from rlhfkit.config import SFTConfig, load_config
    from rlhfkit.training.fingerprint import differences, fingerprint

    def taken(*overrides):
        return fingerprint(load_config(SFTConfig, overrides=["model.name=some/model", "data.train=d.jsonl", *overrides]), "sft", {})

    assert differences(taken("train.eval_every=10"), taken("train.eval_every=20")) == []
    best = ["train.select_best=eval/loss"]
    assert differences(taken(*best, "train.eval_every=10"), taken(*best, "train.eval_every=20")) == [
        "train.eval_every 10 -> 20"]
    stop = [*best, "train.early_stopping_patience=2"]
    assert differences(taken(*stop, "train.eval_every=10"), taken(*stop, "train.eval_every=5")) == [
        "train.eval_every 10 -> 5"]
    older = taken(*best, "train.eval_every=10")
    older["version"] = 3
    del older["config"]["train.eval_every"]
    assert differences(older, taken(*best, "train.eval_every=20")) == []


def test_a_fresh_run_refuses_a_directory_holding_only_a_critic_or_best_model(tmp_path):
    from rlhfkit.training.rundir import RunDirError, open_run

    data = _sft_data(tmp_path / "d.jsonl")
    for name in ("critic", "best"):
        shutil.rmtree(tmp_path / "run", ignore_errors=True)
        (tmp_path / "run" / name).mkdir(parents=True)
        with pytest.raises(RunDirError, match=rf"holds a previous run \({name}/\) that saved no checkpoint"):
            open_run(_cfg(tmp_path, data), "sft")


def test_a_fresh_dpo_run_over_its_started_sft_stage_is_told_to_resume(tmp_path):
    from rlhfkit.config import load_config
    from rlhfkit.trainers.dpo import DPOConfig
    from rlhfkit.training.rundir import RunDirError, plan_run

    data = _sft_data(tmp_path / "d.jsonl")
    (tmp_path / "run" / "sft").mkdir(parents=True)  # sft_first's stage, progress to continue
    (tmp_path / "run" / "sft" / "metrics.jsonl").write_text('{"step": 1}\n')
    cfg = load_config(DPOConfig, overrides=[f"data.train={data}", f"train.output_dir={tmp_path / 'run'}",
                                            "model.name=some/model"])
    with pytest.raises(RunDirError, match=r"holds a previous run \(sft/\): continue it with --resume"):
        plan_run(cfg, "dpo")


def test_a_model_moved_aside_by_an_interrupted_replace_is_removed_when_a_run_starts(tmp_path):
    from rlhfkit.training.rundir import open_run

    data = _sft_data(tmp_path / "d.jsonl")
    (tmp_path / "run" / ".model.old-123").mkdir(parents=True)
    (tmp_path / "run" / ".model.old-123" / "model.safetensors").write_bytes(b"old")
    open_run(_cfg(tmp_path, data), "sft")
    assert not (tmp_path / "run" / ".model.old-123").exists() and (tmp_path / "run" / "sft_run.json").is_file()


def test_a_leftover_temporary_directory_is_removed_when_a_run_starts(tmp_path):
    from rlhfkit.training.rundir import open_run

    data = _sft_data(tmp_path / "d.jsonl")
    for p in (tmp_path / "run" / "checkpoints" / ".step-00000004.tmp-1-ab", tmp_path / "run" / ".model.tmp-9-cd"):
        p.mkdir(parents=True)
        (p / "optim.pt").write_bytes(b"partial")
    open_run(_cfg(tmp_path, data, "train.resume=auto"), "sft")
    assert not list((tmp_path / "run").rglob("*.tmp-*"))


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path):
    from rlhfkit.training.logger import RunLogger

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    logger = RunLogger(tmp_path, 6, progress=False, initial_step=2)
    logger.log(3, {"loss": 0.25})
    logger.close()
    assert [json.loads(ln)["step"] for ln in path.read_text().splitlines()] == [1, 2, 3]


# --------------------------------------------------------------------------- nothing written before validation

def test_a_run_that_fails_validation_writes_nothing(tmp_path, tiny_model_dir, capsys):
    data = _sft_data(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    assert _cli(capsys, _sft_args(tiny_model_dir, data, out))[0] == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hi", "response": "ok"}, {"prompt": "no response"}])
    for argv in (_sft_args(tiny_model_dir, data, out, "train.log_every=0"),      # config
                 _sft_args(tiny_model_dir, bad, out, "train.resume=auto"),       # data
                 _sft_args(tiny_model_dir, bad, tmp_path / "fresh")):
        code, line = _cli(capsys, argv)
        assert code == 2 and line.startswith("rlhfkit sft: error: "), line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "fresh").exists()


# --------------------------------------------------------------------------- the schedule

@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_starts_above_zero_and_then_follows_transformers(schedule):
    from types import SimpleNamespace

    from transformers import get_scheduler

    from rlhfkit.training.optim import build_scheduler

    def lrs(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = make(opt)
        out = []
        for _ in range(20):
            out.append(opt.param_groups[0]["lr"])  # the lr the next optimizer step uses
            opt.step()
            sched.step()
        return out

    ours = lrs(lambda o: build_scheduler(o, SimpleNamespace(schedule=schedule, warmup_ratio=0.2), 20))
    hf_name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[schedule]
    theirs = lrs(lambda o: get_scheduler(hf_name, o, num_warmup_steps=4, num_training_steps=20))
    assert theirs[0] == 0.0  # transformers' first update runs at lr 0
    assert ours[:4] == [0.25, 0.5, 0.75, 1.0]  # step k of 4 warmup steps: k/4
    assert ours[4:] == pytest.approx(theirs[4:], abs=1e-12)


def test_a_second_process_cannot_open_a_run_directory_in_use(tmp_path):
    """Two processes in one run directory would mix their checkpoints: while one holds it, another
    is refused naming the holder's pid; the same process may open it again; once the holder is
    killed (no clean-up), the directory opens."""
    import signal
    import subprocess
    import sys

    from rlhfkit.training.rundir import RunDirError, open_run

    data = _sft_data(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom rlhfkit.config import SFTConfig, load_config\n"
         "from rlhfkit.training.rundir import open_run\n"
         f"open_run(load_config(SFTConfig, overrides=['data.train={data}', 'train.output_dir={out}', "
         "'model.name=some/model']), 'sft')\nprint('held', flush=True)\ntime.sleep(600)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError, match=rf"train\.output_dir: {out} is in use by another rlhfkit process "
                                              rf"\(pid {holder.pid}\)"):
            open_run(_cfg(tmp_path, data, "train.resume=auto"), "sft")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert not open_run(_cfg(tmp_path, data, "train.resume=auto"), "sft").resuming
    assert not open_run(_cfg(tmp_path, data, "train.resume=auto"), "sft").resuming  # this process holds it


def test_a_finished_run_lets_another_process_continue_it(tmp_path, tiny_model_dir, capsys):
    """`finish` releases the directory: a later process (or a second `main` in this one) resumes it."""
    import subprocess
    import sys

    data = _sft_data(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    from rlhfkit.cli import main

    assert main(_sft_args(tiny_model_dir, data, out)) == 0
    done = subprocess.run([sys.executable, "-m", "rlhfkit.cli", *_sft_args(tiny_model_dir, data, out, "train.max_steps=6",
                                                                           "--resume")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "sft_run.json").read_text())["history"][-1]["differences"] == ["train.max_steps 4 -> 6"]


def test_a_finished_run_continued_for_longer_is_unfinished_until_it_ends_again(tmp_path, tiny_model_dir, capsys):
    """Continuing a finished run (train.max_steps raised) removes its results file as it opens
    the run: killed before the new end, the directory reads as unfinished (a report warns, a
    pipeline continues the stage), not as finished with the shorter run's results. Its model/
    stays until the continuation replaces it; the continuation's end writes the results again."""
    from rlhfkit.cli import main
    from rlhfkit.training.rundir import open_run

    data = _sft_data(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    assert main(_sft_args(tiny_model_dir, data, out)) == 0
    (out / "DONE").write_text("{}")  # as a pipeline marks a finished stage
    from rlhfkit.config import SFTConfig, load_config

    longer = load_config(SFTConfig, overrides=[*_sft_args(tiny_model_dir, data, out)[1:], "train.max_steps=6",
                                               "train.resume=true"])
    assert open_run(longer, "sft").resuming
    assert not (out / "sft_results.json").exists() and not (out / "DONE").exists()
    assert (out / "model" / "config.json").is_file()
    assert main(_sft_args(tiny_model_dir, data, out, "train.max_steps=6", "--resume")) == 0
    assert (out / "sft_results.json").is_file() and (out / "checkpoints" / "step-00000006").is_dir()


def test_a_resume_hashes_the_checkpoint_it_continues_from_once(tmp_path, tiny_model_dir, monkeypatch):
    """The run directory's decision verifies the newest checkpoint (sizes and SHA-256); the loop
    loads that checkpoint without hashing it a second time."""
    from rlhfkit.cli import main
    from rlhfkit.training import checkpoint

    data = _sft_data(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    assert main(_sft_args(tiny_model_dir, data, out)) == 0
    hashed: list[str] = []
    real = checkpoint.sha256_file
    monkeypatch.setattr(checkpoint, "sha256_file", lambda p, *a, **k: hashed.append(str(p)) or real(p, *a, **k))
    assert main(_sft_args(tiny_model_dir, data, out, "train.max_steps=6", "--resume")) == 0
    resumed = [p for p in hashed if "step-00000004" in p]
    assert resumed and len(resumed) == len(set(resumed)), resumed


def test_a_resume_never_continues_from_another_runs_checkpoint_or_another_steps(tmp_path, tiny_model_dir, capsys):
    """A checkpoint names the run that wrote it (the run record's run_id) and its step: one copied
    in from another run (under a new step or in place of this run's), or a step renamed, is
    refused in one line before anything is written or loaded."""
    from rlhfkit.cli import main

    data = _sft_data(tmp_path / "d.jsonl")
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_sft_args(tiny_model_dir, data, a)) == 0
    assert main(_sft_args(tiny_model_dir, data, b, "optim.lr=5e-3")) == 0
    ours = (a / "checkpoints" / "step-00000004")
    shutil.copytree(b / "checkpoints" / "step-00000004", a / "checkpoints" / "step-00000006")
    code, line = _cli(capsys, _sft_args(tiny_model_dir, data, a, "train.max_steps=8", "--resume"))
    assert code == 2 and re.search(r"cannot resume .*/a: step-00000006's trainer_state\.json says step 4", line), line
    shutil.rmtree(a / "checkpoints" / "step-00000006")
    shutil.rmtree(ours)
    shutil.copytree(b / "checkpoints" / "step-00000004", ours)
    before = sorted(p.name for p in a.iterdir())
    code, line = _cli(capsys, _sft_args(tiny_model_dir, data, a, "train.max_steps=8", "--resume"))
    assert code == 2 and re.search(r"cannot resume .*/a: step-00000004 was written by another run \(its "
                                   r"trainer_state\.json names run [0-9a-f]{12}, this directory's sft_run\.json "
                                   r"[0-9a-f]{12}\)", line), line
    assert sorted(p.name for p in a.iterdir()) == before and (a / "sft_results.json").is_file()


def test_a_checkpoint_with_a_file_its_manifest_does_not_list_is_skipped_with_a_warning(tmp_path, tiny_model_dir,
                                                                                      caplog):
    """A loader reads every weight file of a model directory: a file added to a checkpoint after
    it was written (another step's weights) makes it incomplete, and a resume passes over it to
    the one before, saying which and why; so does a damaged one."""
    import logging

    from rlhfkit.cli import main
    from rlhfkit.training.checkpoint import verify_manifest

    data = _sft_data(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    assert main(_sft_args(tiny_model_dir, data, out)) == 0
    step4, step2 = out / "checkpoints" / "step-00000004", out / "checkpoints" / "step-00000002"
    shutil.copy(step2 / "model" / "model.safetensors", step4 / "model" / "zz-extra.safetensors")
    assert verify_manifest(step4) == "model/zz-extra.safetensors is not in the manifest (added after the checkpoint " \
                                     "was written)"
    with caplog.at_level(logging.WARNING, logger="rlhfkit"):
        assert main(_sft_args(tiny_model_dir, data, out, "train.max_steps=4", "--resume")) == 0
    assert "skipping checkpoint step-00000004: model/zz-extra.safetensors is not in the manifest" in caplog.text
    caplog.clear()
    (out / "checkpoints" / "step-00000004" / "optim.pt").write_bytes(b"0" * 100)  # rewritten by the rerun above
    with caplog.at_level(logging.WARNING, logger="rlhfkit"):
        assert main(_sft_args(tiny_model_dir, data, out, "train.max_steps=4", "--resume")) == 0
    assert "skipping checkpoint step-00000004: optim.pt has 100 bytes" in caplog.text


def test_a_run_directory_that_is_or_holds_its_own_input_is_refused_before_anything_is_written(tmp_path):
    """train.output_dir equal to the input model's directory, or inside it, would write into what
    the run reads; an input inside what the run writes (checkpoints/, model/...) would be replaced
    under it. Both are refused by the decision, which writes nothing; data next to the run's
    outputs (output_dir=.) is not."""
    from rlhfkit.training.rundir import RunDirError, plan_run

    model = tmp_path / "base"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = _sft_data(tmp_path / "d.jsonl")
    for out in (model, model / "runs" / "sft"):
        with pytest.raises(RunDirError, match=rf"^train\.output_dir: {out} is (inside )?model\.name \({model}\): the "
                                              r"run would write into what it reads; choose another train\.output_dir$"):
            plan_run(_cfg(tmp_path, data, f"model.name={model}", f"train.output_dir={out}"), "sft")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    inside = _sft_data(tmp_path / "run" / "checkpoints" / "d.jsonl")
    with pytest.raises(RunDirError, match=rf"^data\.train \({inside}\) is in {tmp_path / 'run' / 'checkpoints'}, "
                                          "where this run writes"):
        plan_run(_cfg(tmp_path, inside), "sft")
    assert sorted(p.name for p in model.iterdir()) == ["config.json"]
    assert not plan_run(_cfg(tmp_path, data, f"train.output_dir={tmp_path}"), "sft").resuming


def test_a_source_that_is_gone_is_named_as_gone(tmp_path):
    from rlhfkit.training.fingerprint import differences, identify

    model = tmp_path / "sft" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    before = {"sources": {"model.name": identify(str(model))}}
    (model / "config.json").unlink()
    model.rmdir()
    after = {"sources": {"model.name": identify(str(model))}}
    assert differences(before, after) == [f"model.name {str(model)[:37]}...: not found any more"
                                          if len(str(model)) > 40 else f"model.name {model}: not found any more"]


def _kill_after_best(out: Path) -> None:
    """What a kill after best/ got step 8 but before step 8's checkpoint and the results leaves."""
    shutil.rmtree(out / "checkpoints" / "step-00000008")
    shutil.rmtree(out / "model")
    (out / "sft_results.json").unlink()


def test_a_resume_never_takes_a_best_model_from_another_step(tmp_path, tiny_model_dir, capsys):
    """Killed after best/ got a new best (step 8) but before step 8's checkpoint: the resumed run
    (with select_best_mode changed, refused unless train.resume_mismatch_ok) has its best at step 4.
    best/ is refilled from step 4's checkpoint, so the final model is step 4's. A checkpoint's model
    loads with its tokenizer."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    data = _sft_data(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    args = _sft_args(tiny_model_dir, data, out, "train.max_steps=8", "train.save_every=4", "train.eval_every=2",
                     "data.eval_fraction=0.25", "train.select_best=eval/loss", "train.keep_checkpoints=5")
    assert _cli(capsys, args)[0] == 0
    assert json.loads((out / "best" / "step.json").read_text())["step"] == json.loads(
        (out / "sft_results.json").read_text())["best"]["step"] == 8  # the loss falls: the last step is best
    assert AutoTokenizer.from_pretrained(out / "checkpoints" / "step-00000004" / "model").chat_template
    _kill_after_best(out)
    want = load_file(out / "checkpoints" / "step-00000004" / "model" / "model.safetensors")
    code, line = _cli(capsys, [*args, "train.resume=true", "train.select_best_mode=max"])
    assert code == 2 and "train.select_best_mode auto -> max" in line and "resume_mismatch_ok" in line, line
    allowed = ["train.resume=true", "train.select_best_mode=max", "train.resume_mismatch_ok=true"]
    assert _cli(capsys, [*args, *allowed])[0] == 0
    assert json.loads((out / "sft_results.json").read_text())["best"]["step"] == 4
    assert json.loads((out / "best" / "step.json").read_text())["step"] == 4
    got = load_file(out / "model" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_best_no_checkpoint_holds_is_chosen_again_after_a_resume(tmp_path, tiny_model_dir, capsys, caplog):
    """best/ holds another step than the restored best (step 0, which no checkpoint holds; a crash
    while best/ was being replaced): the best is chosen again among the evaluations after the
    resume, and a warning says so."""
    data = _sft_data(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    args = _sft_args(tiny_model_dir, data, out, "train.max_steps=8", "train.save_every=4", "train.eval_every=2",
                     "data.eval_fraction=0.25", "train.select_best=eval/loss", "train.select_best_mode=max")
    assert _cli(capsys, args)[0] == 0
    assert json.loads((out / "sft_results.json").read_text())["best"]["step"] == 0  # the highest loss: the start
    (out / "best" / "step.json").write_text('{"step": 8}')  # best/ from another step than the checkpoint's best
    _kill_after_best(out)
    with caplog.at_level("WARNING", logger="rlhfkit"):
        assert _cli(capsys, [*args, "train.resume=true"])[0] == 0
    assert "does not hold step 0, the best eval/loss so far, and no checkpoint does" in caplog.text
    assert json.loads((out / "sft_results.json").read_text())["best"]["step"] == 6  # of steps 6 and 8
    assert json.loads((out / "best" / "step.json").read_text())["step"] == 6


def test_a_run_continued_for_longer_follows_the_new_schedule_from_its_first_step(tmp_path, tiny_model_dir, capsys):
    """Cosine over 2 steps, continued to 4: step 3 runs at the new schedule's rate (half the peak),
    not at the old schedule's last one (0, an update that changes nothing), and train/lr is the
    rate each step's update ran at."""
    from safetensors.torch import load_file

    data = _sft_data(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    args = _sft_args(tiny_model_dir, data, out, "optim.schedule=cosine", "optim.warmup_ratio=0", "train.save_every=1",
                     "train.keep_checkpoints=0")
    assert _cli(capsys, [*args, "train.max_steps=2"])[0] == 0
    assert _cli(capsys, [*args, "train.max_steps=4", "--resume"])[0] == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["train/lr"] for r in rows if "train/lr" in r]
    assert lrs == pytest.approx([1e-3, 5e-4, 5e-4, 1e-3 * 0.5 * (1 + math.cos(0.75 * math.pi))])

    def weights(step):
        return load_file(out / "checkpoints" / f"step-{step:08d}" / "model" / "model.safetensors")

    before, after = weights(2), weights(3)
    assert max(float((after[k] - before[k]).abs().max()) for k in before) > 1e-4


def test_an_adapters_base_and_a_local_hf_dataset_are_identified_by_content(tmp_path):
    """A LoRA adapter given as model.name is its weights on top of its base: a base retrained in
    place is another model, and a resume over it is refused like any changed input. A dataset
    saved locally and named hf:DIR is compared by its files, not by its name. A record written
    before these were identified so compares as it was taken."""
    from rlhfkit.training.fingerprint import differences, identify, local_path

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "llama"}')
    (base / "model.safetensors").write_bytes(b"a" * 64)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    (adapter / "adapter_model.safetensors").write_bytes(b"b" * 32)
    data = tmp_path / "ds"
    data.mkdir()
    (data / "train.arrow").write_bytes(b"rows")
    assert local_path(f"hf:{data}:train") == data and local_path("hf:org/name:train") is None
    spec = {"model.name": str(adapter), "data.train": f"hf:{data}:train"}
    before = {"version": 3, "sources": {k: identify(v) for k, v in spec.items()}}
    assert "base:model.safetensors" in before["sources"]["model.name"]["files"]
    (base / "model.safetensors").write_bytes(b"c" * 64)
    (data / "train.arrow").write_bytes(b"other rows")
    after = {"version": 3, "sources": {k: identify(v) for k, v in spec.items()}}
    assert differences(before, after) == ["data.train content differs", "model.name content differs"]
    old = {"version": 2, "sources": {"model.name": {**before["sources"]["model.name"], "files": {
        k: v for k, v in before["sources"]["model.name"]["files"].items() if not k.startswith("base:")}},
        "data.train": {"spec": f"hf:{data}:train"}}}
    assert differences(old, after) == []
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(adapter)}))
    assert "base:adapter_config.json" in identify(str(adapter))["files"]  # a loop of bases ends
