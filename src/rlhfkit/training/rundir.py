"""Run directories: one run per directory, continued only by the same run.

A run of kind K (sft, rm, dpo, ...) in ``train.output_dir`` leaves ``K_config.yaml`` (the config
it ran with), ``K_run.json`` (its fingerprint), checkpoints, metrics, results and models.
The fingerprint (`training.fingerprint`) is the resolved config minus the settings that may change
between a run and its continuation, and the identity of its inputs (data files by size and
SHA-256, model directories file by file).

`open_run` takes the decisions before a trainer writes anything, and refuses with one line
(`RunDirError`, exit status 2 from the CLI):

    train.resume  false  start; refused if the directory holds a run (a checkpoint, a model,
                         results) unless train.overwrite, which first deletes its outputs
                  true   continue from the latest complete checkpoint; refused if there is none,
                         or if the config or data differ (unless train.resume_mismatch_ok); a
                         finished run continued has no results file until it finishes again
                  auto   continue if there is something to continue, else start (pipelines); a run
                         that saved no checkpoint is refused, as by false

    run = open_run(cfg, "sft", is_main=strategy.is_main)   # after the config and data are validated
    run.path, run.resuming, run.checkpoint

`rlhfkit.training.open_run` calls it for every trainer. The main process then holds the directory
until the run's results are written: another process that opens it is refused (`training.runlock`).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhfkit.config import ConfigError, dump_config
from rlhfkit.training.checkpoint import CKPT_PREFIX, Checkpointer
from rlhfkit.training.checkpoint import remove_leftovers as remove_tmp
from rlhfkit.training.fingerprint import (LENGTH_KEYS, default_sources, differences, fingerprint, flat_config,
                                         local_path, well_formed)
from rlhfkit.training.runlock import hold

log = logging.getLogger("rlhfkit")

# What `train.overwrite` deletes: every output a trainer writes into its run directory, nothing else.
RUN_OUTPUTS = ("checkpoints", "model", "critic", "tb", "wandb", "wandb_run_id", "metrics.jsonl", "samples.jsonl",
               "samples-*.jsonl", "ref_logps.json", "best", "best-pending", "*_results.json", "*_config.yaml",
               "*_run.json", "sft", "iter-*", "pm_data", "DONE", "report.html", ".*.tmp-*", ".*.old-*")
# Stages that a run of this kind nests in sub-directories (progress to continue, like a checkpoint).
NESTED = {"dpo": ("sft",), "online_dpo": ("iter-*",)}
# Where a run writes models and checkpoints in its directory: an input there would be replaced under it.
WRITTEN = ("model", "critic", "best", "best-pending", "checkpoints", "sft", "iter-*")


class RunDirError(ConfigError):
    """The run directory cannot be used as asked (one line, naming the directory and the way out)."""


@dataclass
class RunDir:
    path: Path
    kind: str
    resuming: bool  # continuing the run found in `path` (from `checkpoint`, or its nested stages)
    checkpoint: Path | None = None  # the latest complete checkpoint, when there is one to continue from
    record: dict = field(default_factory=dict)  # the fingerprint (what K_run.json holds)
    removed: list[str] = field(default_factory=list)  # what train.overwrite deleted
    skipped: list[str] = field(default_factory=list)  # newer checkpoints passed over as incomplete, and why


# --------------------------------------------------------------------------- the decision

def open_run(cfg: Any, kind: str, *, is_main: bool = True, sources: dict[str, str] | None = None) -> RunDir:
    """Decide start / continue for ``cfg.train.output_dir`` (refusing as the module docstring
    says), then on the main process delete an overwritten run's outputs and temporary leftovers,
    and write ``K_config.yaml`` and ``K_run.json``. Call it once the config and data are
    validated and before anything else is written. Every rank takes the same decision.

    ``sources``: name -> data/model spec whose identity is fingerprinted (default:
    `default_sources(cfg)`). The decision is written back into ``cfg.train`` (resume: False
    when starting, "auto" when continuing; overwrite: False), so that stages nested in this run
    (DPO's sft_first, pm's SFT, online DPO's iterations) continue or start as their own
    directories say and never delete what this run has written.
    """
    run = plan_run(cfg, kind, sources=sources)
    if is_main:
        run.path.mkdir(parents=True, exist_ok=True)
        hold(run.path, RunDirError)  # one process per run directory (`training.runlock`)
        if cfg.train.overwrite:
            run.removed = clear_run(run.path)
            if run.removed:
                log.warning("train.overwrite: deleted %s from %s", ", ".join(run.removed), run.path)
        for name in remove_leftovers(run.path):
            log.info("removed %s, left by an interrupted write", name)
        if not run.resuming and (run.path / "best-pending").is_dir():  # the best so far of a run that
            shutil.rmtree(run.path / "best-pending")  # stopped before its first checkpoint: nothing to continue
            log.info("removed best-pending/ of a run stopped before its first checkpoint")
        for line in run.skipped if run.resuming else []:
            log.warning("skipping checkpoint %s", line)
        if run.resuming:  # a finished run continued (for more steps) is unfinished until it ends again
            for marker in (run.path / f"{kind}_results.json", run.path / "DONE"):
                if marker.is_file():
                    marker.unlink()
                    log.info("continuing a finished run: %s removed until the run finishes again", marker.name)
        dump_config(cfg, run.path / f"{kind}_config.yaml")
        _write_json(run.path / f"{kind}_run.json", run.record)
    cfg.train.resume = "auto" if run.resuming else False
    cfg.train.overwrite = False
    return run


def plan_run(cfg: Any, kind: str, *, sources: dict[str, str] | None = None) -> RunDir:
    """`open_run`'s decision alone: no file is written. Raises `RunDirError`."""
    train = cfg.train
    path = Path(train.output_dir)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"train.output_dir: {path} exists and is not a directory")
    _check_writable(path)
    sources = sources if sources is not None else default_sources(cfg)
    if train.overwrite:
        if train.resume is True:
            raise RunDirError("train.resume and train.overwrite: choose one (continue the run, or delete it)")
        _check_ours(path)
        _check_inputs_survive(path, sources)
    check_apart(path, sources)
    record = fingerprint(cfg, kind, sources)
    if train.overwrite:
        return RunDir(path, kind, resuming=False, record=record)

    skipped: list[str] = []  # incomplete checkpoints: named in a refusal; when resuming, the loop warns
    checkpoint = Checkpointer(path).latest(skipped=skipped) if path.is_dir() else None
    nested = _nested_progress(path, kind)
    used = _outputs(path)
    # why no checkpoint can be continued: none saved, or the newest saved one is incomplete
    none_saved = f"whose newest checkpoint is incomplete ({skipped[0]})" if skipped else \
        "that saved no checkpoint to continue from (train.save_every)"
    if train.resume is False:
        if checkpoint is not None or nested:
            raise RunDirError(f"{path} holds a previous run ({', '.join(used)}): continue it with --resume "
                              "(train.resume=true) or replace it with --overwrite (train.overwrite=true)")
        if used:
            raise RunDirError(f"{path} holds a previous run ({', '.join(used)}) {none_saved}: replace it with "
                              "--overwrite (train.overwrite=true), or choose another train.output_dir")
        return RunDir(path, kind, resuming=False, record=record)
    if checkpoint is None and not nested:
        if train.resume is True:
            if (path / "checkpoints").is_dir():
                way_out = ("replace the run with --overwrite (train.overwrite=true)" if used else "start without "
                           "--resume, or set train.resume=auto to continue only when there is something to continue")
                found = f"; {skipped[0]}" if skipped else ""
                raise RunDirError(f"nothing to resume in {path}: no complete checkpoint there{found} ({way_out})")
            if used:
                raise RunDirError(f"nothing to resume in {path}: the run there ({', '.join(used)}) saved no "
                                  "checkpoint (train.save_every), so it cannot be continued; replace it with "
                                  "--overwrite (train.overwrite=true), or choose another train.output_dir")
            raise RunDirError(f"nothing to resume in {path}: no checkpoint there (start without --resume, or set "
                              "train.resume=auto to continue only when there is something to continue)")
        if used:  # auto: nothing to continue, and starting would replace a run
            raise RunDirError(f"{path} holds a previous run ({', '.join(used)}) {none_saved}, so train.resume=auto "
                              "has nothing to continue; replace it with --overwrite (train.overwrite=true), or choose "
                              "another train.output_dir")
        return RunDir(path, kind, resuming=False, record=record)
    defaults = flat_config(type(cfg)())  # a key added to rlhfkit since the run started, left at its default: no change
    _check_same_run(path, kind, record, train.resume_mismatch_ok, defaults)
    if checkpoint is not None:
        _check_checkpoint_is_ours(path, checkpoint)
        _check_length_reaches(path, checkpoint, train)
    return RunDir(path, kind, resuming=True, checkpoint=checkpoint, record=_merged_record(path, kind, record, defaults),
                  skipped=skipped)


def _check_writable(path: Path) -> None:
    """Fail early, naming the key, when the run directory cannot be created or written."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise RunDirError(f"train.output_dir: {path}: {probe} is a file, not a directory")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise RunDirError(f"train.output_dir: {path}: {probe} is not writable (permission denied or read-only)")


def check_apart(path: Path, sources: dict[str, str], key: str = "train.output_dir", written=WRITTEN) -> None:
    """Refuse a run directory that is one of the run's inputs or inside one (the run would write
    into what it reads, and the input's recorded identity would change as it runs), or that holds
    an input where the run writes (``written``: ``model/`` is replaced at the end of a run)."""
    out = path.absolute()
    for name, spec in sorted(sources.items()):
        src = local_path(spec)
        if src is None:
            continue
        for named, run_dir in ((src.absolute(), out), (src.resolve(), out.resolve())):
            if named == run_dir or (src.is_dir() and named in run_dir.parents):
                where = "" if named == run_dir else "inside "
                raise RunDirError(f"{key}: {path} is {where}{name} ({spec}): the run would write into what it "
                                  f"reads; choose another {key}")
            if run_dir in named.parents:
                first = named.relative_to(run_dir).parts[0]
                if any(fnmatch.fnmatch(first, pattern) for pattern in written):
                    raise RunDirError(f"{name} ({spec}) is in {path / first}, where this run writes: choose another "
                                      f"{key}, or copy the input out of it first")


def _outputs(path: Path) -> list[str]:
    """What in ``path`` shows that a run was there: checkpoints, models, results, nested stages."""
    if not path.is_dir():
        return []
    found = []
    ck = path / "checkpoints"
    if ck.is_dir() and any(p.name.startswith("step-") for p in ck.iterdir()):
        found.append("checkpoints/")
    for name in ("model", "critic", "best"):  # not best-pending/: a run's best so far, kept only with a
        if (path / name).exists() or (path / name).is_symlink():  # checkpoint (else it is started over)
            found.append(f"{name}/")
    found += sorted(p.name for p in path.glob("*_results.json"))
    found += sorted(f"{p.name}/" for pattern in {"sft", "iter-*"} for p in path.glob(pattern) if p.is_dir())
    return found


def _check_ours(path: Path) -> None:
    """`train.overwrite` deletes only what a run wrote: a directory whose outputs no rlhfkit run
    recorded (no ``*_run.json``: e.g. a user's own ``model/`` in the working directory) is refused."""
    if not path.is_dir() or any(path.glob("*_run.json")):
        return
    found = sorted({p.name + ("/" if p.is_dir() else "") for pattern in RUN_OUTPUTS for p in path.glob(pattern)
                    if not p.name.startswith(".")})
    if found:
        raise RunDirError(f"train.overwrite: {path} holds {', '.join(found)} but no rlhfkit run record (*_run.json): "
                          "not deleting what another program wrote; choose another train.output_dir")


def _check_inputs_survive(path: Path, sources: dict[str, str]) -> None:
    """`train.overwrite` must not delete what the run reads (e.g. model.name=runs/x/model with
    train.output_dir=runs/x): refuse before anything is deleted."""
    if not path.is_dir():
        return
    doomed = [p for pattern in RUN_OUTPUTS for p in path.glob(pattern)]
    # a symlink is unlinked, its target kept: an input reached through the link is lost, the target is not
    as_named = [p.absolute() for p in doomed]
    real = [p.resolve() for p in doomed if not p.is_symlink()]
    for key, spec in sorted(sources.items()):
        src = local_path(spec)
        if src is None:
            continue
        hit = next((d for d in as_named if src.absolute() == d or d in src.absolute().parents), None) or next(
            (d for d in real if src.resolve() == d or d in src.resolve().parents), None)
        if hit is not None:
            raise RunDirError(f"train.overwrite: {key} ({spec}) is in {hit}, which overwriting {path} would delete: "
                              "choose another train.output_dir, or copy the input out of it first")


def _nested_progress(path: Path, kind: str) -> list[str]:
    return sorted(p.name for pattern in NESTED.get(kind, ()) for p in path.glob(pattern)
                  if p.is_dir() and any(p.iterdir()))


def clear_run(path: Path) -> list[str]:
    """Delete a run's outputs (`RUN_OUTPUTS`) from ``path``; returns what was deleted."""
    removed = []
    for pattern in RUN_OUTPUTS:
        for p in sorted(path.glob(pattern)):
            if p.is_symlink() or p.is_file():
                p.unlink()
            elif p.is_dir():
                shutil.rmtree(p)
            else:
                continue
            removed.append(p.name)
    return removed


def remove_leftovers(path: Path) -> list[str]:
    """Temporary files and directories of writes that were killed (checkpoints, models, json)."""

    found = []
    for root in (path, path / "checkpoints"):
        found += remove_tmp(root)
    for p in sorted(path.glob(".*.old-*")) if path.is_dir() else []:  # a model moved aside, replaced
        shutil.rmtree(p, ignore_errors=True)
        found.append(p.name)
    return found


def _check_same_run(path: Path, kind: str, record: dict, mismatch_ok: bool, defaults: dict) -> None:
    saved_path = path / f"{kind}_run.json"
    saved = _saved_record(path, kind)
    if saved is None:
        _check_not_another_command(path, kind)
    if saved is None or not well_formed(saved):
        why = "no" if saved is None else "an unreadable"
        if mismatch_ok:
            log.warning("continuing %s although it has %s record of a %s run (%s; train.resume_mismatch_ok)",
                        path, why, kind, saved_path.name)
            return
        raise RunDirError(f"{path} has {why} record of a {kind} run ({saved_path.name}): it was not started by "
                          f"`rlhfkit {kind.replace('_', '-')}`, or by an older version; set "
                          "train.resume_mismatch_ok=true to continue it anyway, or train.overwrite=true to start over")
    diffs = differences(saved, record, defaults)
    length = [d for d in diffs if d.split(" ", 1)[0] in LENGTH_KEYS]
    diffs = [d for d in diffs if d not in length]
    if diffs and not mismatch_ok:
        more = f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise RunDirError(f"cannot resume {path}: this run differs from the one there: {'; '.join(diffs[:3])}{more}; "
                          "set train.resume_mismatch_ok=true to continue anyway, or train.overwrite=true to start over")
    if length:
        log.warning("continuing %s with another length (%s): the learning-rate schedule follows the new length",
                    path, "; ".join(length))
    if diffs:
        log.warning("continuing %s although the run differs (train.resume_mismatch_ok): %s", path, "; ".join(diffs))
    restored = [d.split(" ", 1)[0] for d in diffs if d.startswith("optim.")]
    if restored:
        log.warning("%s: not applied on resume: the optimizer and its learning-rate schedule continue as the "
                    "checkpoint saved them (start over with train.overwrite=true to use the new values)",
                    ", ".join(restored))


def _check_length_reaches(path: Path, checkpoint: Path, train: Any) -> None:
    """A run continued to fewer steps than its newest checkpoint would end at once with that
    checkpoint's weights, under a config that says otherwise: refused (the length by epochs, known
    only with the data, is checked as the loop starts)."""
    try:
        step = int(checkpoint.name.removeprefix(CKPT_PREFIX))
    except ValueError:
        return
    if 0 < getattr(train, "max_steps", 0) < step:
        raise RunDirError(f"train.max_steps: {train.max_steps} is below the step of {path}'s newest checkpoint "
                          f"({checkpoint.name}): the run would end with that step's weights; give at least {step}, or "
                          "start over with train.overwrite=true")


def _check_not_another_command(path: Path, kind: str) -> None:
    """A directory that holds another command's run is never continued by this one, whatever
    train.resume_mismatch_ok says: its checkpoint holds another trainer's state."""
    others = other_runs(path, kind)
    if others:
        name = others[0].replace("_", "-")
        raise RunDirError(f"cannot resume {path}: it holds a run of `rlhfkit {name}` ({others[0]}_run.json), not of "
                          f"`rlhfkit {kind.replace('_', '-')}`; choose another train.output_dir, or replace the run "
                          "with train.overwrite=true")


def other_runs(path: Path, kind: str) -> list[str]:
    """The kinds of the runs other than ``kind`` whose records (``K_run.json``) are in ``path``."""
    return sorted(p.name[:-len("_run.json")] for p in path.glob("*_run.json") if p.name != f"{kind}_run.json")


def _check_checkpoint_is_ours(path: Path, checkpoint: Path) -> None:
    """Refuse to continue from a checkpoint that another run wrote (its ``trainer_state.json``
    names the run: the ``run_id`` of the record of its kind in this directory) or whose step is
    not the one its directory is named after (renamed, or a link to another step): a resume would
    mix two runs, or two steps of one. A checkpoint written before checkpoints named their run
    has no ``run_id`` and is not checked for it."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError, RecursionError):
        return  # loading it names the damage (`Checkpointer.load`)
    state = state if isinstance(state, dict) else {}
    named = int(checkpoint.name.rpartition("-")[2]) if checkpoint.name.rpartition("-")[2].isdigit() else None
    if state.get("step") != named:
        raise RunDirError(f"cannot resume {path}: {checkpoint.name}'s trainer_state.json says step "
                          f"{state.get('step')}: the checkpoint was renamed or copied from another step; delete it to continue from the "
                          "one before, or start over with train.overwrite=true")
    kind, run_id = state.get("kind"), state.get("run_id")
    if not (isinstance(kind, str) and isinstance(run_id, str)):
        return
    saved = _saved_record(path, kind)
    ours = saved.get("run_id") if isinstance(saved, dict) else None
    if ours != run_id:
        raise RunDirError(f"cannot resume {path}: {checkpoint.name} was written by another run (its trainer_state.json "
                          f"names run {run_id[:12]}, this directory's {kind}_run.json "
                          f"{ours[:12] if isinstance(ours, str) else 'none'}); delete it, or start over with "
                          "train.overwrite=true")


def _saved_record(path: Path, kind: str) -> Any:
    """What ``path/KIND_run.json`` holds: None when there is none, {} when it does not read (its
    shape is the caller's to check: `fingerprint.well_formed`)."""
    try:
        return json.loads((path / f"{kind}_run.json").read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError):
        return {}


def _merged_record(path: Path, kind: str, record: dict, defaults: dict) -> dict:
    """The record to keep when continuing: the new fingerprint, with the history of continuations
    that were allowed to differ (train.resume_mismatch_ok)."""
    saved = _saved_record(path, kind)
    if not isinstance(saved, dict):
        return record
    history = list(saved.get("history", []))
    diffs = differences(saved, record, defaults) if "config" in saved else ["no earlier record"]
    if diffs:
        history.append({"time": record["created"], "differences": diffs})
    return {**record, "created": saved.get("created", record["created"]),
            "run_id": saved.get("run_id", record["run_id"]), "history": history}


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)
