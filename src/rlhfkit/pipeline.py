"""``rlhfkit pipeline``: the stages of a workflow in order, in one run directory.

    rlhfkit pipeline --config configs/demo.yaml [stages.1.config.optim.lr=1e-5 ...]

A pipeline config names an output directory, a base model and a list of stages. Each stage is
one sub-command (sft, rm, ppo, grpo, dpo, online-dpo, eval, ...) with that command's own config
as a mapping; ``${base}`` stands for the base model and ``${NAME}`` for the model a stage called
NAME produced (``<output_dir>/<NAME>/model``). Every stage config is validated before the first
stage starts, a stage that already finished (``<stage>/DONE``, or its command's results file) is
not redone (and refused if its config or inputs changed since), and an interrupted stage resumes
from its latest complete checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from rlhfkit.config import ConfigError, build, dump_config, load_config, merge, parse_overrides, to_dict
from rlhfkit.config.extras import require
from rlhfkit.config.loader import read_yaml
from rlhfkit.models import check_model_path
from rlhfkit.parallel import make_strategy
from rlhfkit.pipeline_summary import format_summary, headline
from rlhfkit.registry import COMMANDS
from rlhfkit.runinfo import write_run_info
from rlhfkit.training.fingerprint import (
    RESUMABLE_KEYS,
    default_sources,
    differences,
    fingerprint,
    flat_config,
    flatten,
    well_formed,
)
from rlhfkit.training.rundir import check_apart
from rlhfkit.training.runlock import hold, release


@dataclass
class StageSpec:
    name: str = ""
    kind: str = ""  # a sub-command of rlhfkit.registry.COMMANDS
    config: dict = field(default_factory=dict)  # that command's config, with ${...} placeholders


@dataclass
class PipelineConfig:
    output_dir: str = "runs/pipeline"
    base_model: str = "smollm2-135m-instruct"
    seed: int = 0
    stages: list = field(default_factory=list)  # list of StageSpec mappings
    progress: bool = True


# Models a training stage loads by name, checked before the first stage starts.
MODEL_NAME_KEYS = ("model.name", "dpo.reference", "critic_model")
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z0-9_\-]+)\}")


def _substitute(obj: Any, values: dict[str, str], where: str) -> Any:
    if isinstance(obj, str):
        def rep(m):
            key = m.group(1)
            if key not in values:
                raise ConfigError(f"{where}: unknown placeholder ${{{key}}}; known: "
                                  f"{sorted(k for k, v in values.items() if v is not None)}")
            if values[key] is None:
                raise ConfigError(f"{where}: ${{{key}}}: stage {key!r} is an evaluation, which makes no model")
            return values[key]
        return _PLACEHOLDER.sub(rep, obj)
    if isinstance(obj, dict):
        return {k: _substitute(v, values, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, list):
        return [_substitute(v, values, f"{where}[{i}]") for i, v in enumerate(obj)]
    return obj


def plan(path: str | None, overrides: list[str] | None = None) -> tuple[PipelineConfig, list[tuple[StageSpec, Any]]]:
    """Load the pipeline and build + validate every stage's typed config (no model is loaded)."""
    source = str(path) if path else "pipeline"
    raw = read_yaml(path) if path else {}
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of keys (output_dir, base_model, stages, ...), got "
                          f"{type(raw).__name__}")
    if overrides:
        over = parse_overrides(overrides)
        stages_over = over.pop("stages", None)
        raw = merge(raw or {}, over)
        if stages_over is not None:  # stages.<i>.config.key=value
            if not isinstance(stages_over, dict):
                raise ConfigError("stages: set a stage's keys (stages.<i or name>.config.KEY=VALUE), not the list")
            listed = raw.get("stages") or []
            if not isinstance(listed, list):
                raise ConfigError(f"{source}: stages: expected a list of stages, got {type(listed).__name__}")
            raw["stages"] = _override_stages(list(listed), stages_over)
    cfg = build(PipelineConfig, raw or {}, "", source)
    if not cfg.output_dir.strip():
        raise ConfigError(f"{source}: output_dir: empty; name the directory the stages write into")
    out = Path(cfg.output_dir)
    values = {"base": cfg.base_model, "output_dir": str(out)}
    if not cfg.stages:
        raise ConfigError(f"{source}: stages: empty; a pipeline runs at least one stage (see configs/demo.yaml)")
    stages = []
    for i, s in enumerate(cfg.stages):
        spec = build(StageSpec, s, f"stages[{i}]", source)
        if spec.kind not in COMMANDS:
            raise ConfigError(f"{source}: stages[{i}].kind: unknown stage kind {spec.kind!r}; "
                              f"known: {sorted(COMMANDS)}")
        if not spec.name:
            spec.name = spec.kind
        _check_stage(spec, i, source, values)
        data = _substitute(spec.config, values, f"{source}: stages[{i}].config")
        data = merge({"train": {"output_dir": str(out / spec.name), "seed": cfg.seed}}, data)
        try:
            stage_cfg = load_config(COMMANDS[spec.kind].config_class(), data=data)
        except ConfigError as e:
            raise ConfigError(f"{source}: stages[{i}] ({spec.name}): {e}") from None
        earlier = [out / st.name for st, _ in stages]
        _check_inputs(stage_cfg, f"{source}: stages[{i}] ({spec.name})", earlier)
        try:
            check_apart(out / spec.name, default_sources(stage_cfg), key="output_dir")
        except ConfigError as e:
            raise ConfigError(f"{source}: stages[{i}] ({spec.name}): {e}") from None
        stages.append((spec, stage_cfg))
        values[spec.name] = str(out / spec.name / "model") if spec.kind != "eval" else None  # an evaluation makes none
    return cfg, stages


def _check_inputs(stage_cfg, where: str, earlier: list[Path]) -> None:
    """Every input a stage's config declares (its ``inputs()``: data files, reward, gold and scorer
    specs) that exists before the pipeline runs (not an output of an ``earlier`` stage) is read and
    checked before the first stage starts, as the stage itself checks it: a typo in the last stage
    does not wait for the first one to train. Each stage checks the rest (tokenisation, models)
    when it starts."""
    for key, value, check in [*stage_cfg.inputs(), *_model_inputs(stage_cfg)]:
        if not isinstance(value, str) or not value or _reads_any(value, earlier):  # unset, or an earlier output
            continue
        try:
            check()
        except (ValueError, FileNotFoundError, ImportError) as e:
            raise ConfigError(f"{where}: {key}: {e}") from None


def _model_inputs(stage_cfg) -> list:
    """``(key, name, check)`` for each model a training stage loads by name (an evaluation names
    its models in its own ``inputs()``): `models.check_model_path`, which loads nothing."""
    flat = flatten(to_dict(stage_cfg))
    return [(key, flat[key], partial(check_model_path, flat[key])) for key in MODEL_NAME_KEYS
            if isinstance(flat.get(key), str) and flat[key]]


def _reads_any(value: str, dirs: list[Path]) -> bool:
    """Whether a data source or spec (``PATH``, ``rm:PATH``, ``rm:PATH,scale=2``...) names a path
    inside one of ``dirs``, compared as resolved paths: ``runs/p2/x`` is not inside ``runs/p``."""
    roots = [d.resolve() for d in dirs]
    for token in re.split(r"[:,=\s]+", value):
        path = Path(token).resolve() if token else None
        if path and any(root == path or root in path.parents for root in roots):
            return True
    return False


def _override_stages(stages: list, over: dict) -> list:
    """``stages.<i>.key=value`` (or ``stages.<name>.key=value``) merged into the stage it names."""
    for key, v in over.items():
        names = [str(s.get("name") or s.get("kind")) if isinstance(s, dict) else "" for s in stages]
        i = int(key) if str(key).lstrip("-").isdigit() else names.index(str(key)) if str(key) in names else None
        if i is None or not 0 <= i < len(stages):
            raise ConfigError(f"stages.{key}: no such stage; the pipeline has {len(stages)} (0-{len(stages) - 1}: "
                              f"{', '.join(names)})")
        if not isinstance(v, dict):
            raise ConfigError(f"stages.{key}: set a stage's keys (stages.{key}.config.KEY=VALUE), not the stage itself")
        if not isinstance(stages[i], dict):
            raise ConfigError(f"stages.{key}: the stage it names is not a mapping of keys")
        stages[i] = merge(stages[i], v)
    return stages


def _check_stage(spec: StageSpec, i: int, source: str, values: dict) -> None:
    """A stage name is a directory name and a placeholder: unique, plain; its output_dir is the pipeline's."""
    where = f"{source}: stages[{i}]"
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", spec.name):
        raise ConfigError(f"{where}.name: {spec.name!r}: use letters, digits, '_' and '-' (it names the stage's "
                          "directory and its ${...} placeholder)")
    if spec.name in values:
        taken = "a placeholder's name" if spec.name in ("base", "output_dir") else "an earlier stage's name"
        raise ConfigError(f"{where}.name: {spec.name!r} is {taken} (a stage of the same kind is named after its "
                          "kind unless named); give each stage its own name")
    if isinstance(spec.config.get("train"), dict) and "output_dir" in spec.config["train"]:
        raise ConfigError(f"{where}.config.train.output_dir: set by the pipeline (<output_dir>/{spec.name}, which "
                          "${" + spec.name + "} names); leave it out")


def _check_unchanged(name: str, stage_dir: Path, stage_cfg) -> None:
    """Refuse to skip a finished stage whose config or inputs have changed since it ran: its outputs
    (and what later stages made from them) would be reported under a config they did not run
    with. A stage is compared by its fingerprint (``*_run.json``: config and inputs' content; an
    evaluation's is ``eval_run.json``), or, for an evaluation written without one, by its config."""
    runs = sorted(stage_dir.glob("*_run.json"))
    if runs:
        saved = _read_record(runs[0])
        diffs = differences(saved, fingerprint(stage_cfg, str(saved.get("kind", "")), default_sources(stage_cfg)),
                            flat_config(type(stage_cfg)()))
    else:
        configs = sorted(stage_dir.glob("*_config.yaml"))
        saved = read_yaml(configs[0]) if configs else None
        if configs and not isinstance(saved, dict):
            raise ConfigError(f"{configs[0]}: not a config (a mapping of keys): cannot tell whether finished stage "
                              f"{name!r} ran with this config; delete {stage_dir} to redo it")
        now = {"config": _results_config(to_dict(stage_cfg))}
        diffs = differences({"config": _results_config(saved)}, now,
                            _results_config(to_dict(type(stage_cfg)()))) if saved else []
    if diffs:
        raise ConfigError(f"stage {name!r} finished with another config or inputs ({'; '.join(diffs)}): to redo it, "
                          f"delete {stage_dir} and the directories of the stages after it, or choose another "
                          "output_dir")


def _read_record(path: Path) -> dict:
    """A stage's run record (``*_run.json``), or a one-line ConfigError naming it when it does not
    read or does not have a record's shape (`fingerprint.well_formed`)."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise ConfigError(f"{path}: unreadable run record ({e.__class__.__name__}); delete {path.parent} to redo "
                          "the stage") from None
    if not well_formed(saved):
        raise ConfigError(f"{path}: not a run record (its config, sources or version have the wrong shape); delete "
                          f"{path.parent} to redo the stage")
    return saved


def _finished(stage_dir: Path, kind: str) -> bool:
    """Whether a stage has finished: the pipeline marked it (``DONE``), or its command wrote its
    results file, which it writes last (a kill between the two leaves only the latter)."""
    return (stage_dir / "DONE").exists() or (stage_dir / f"{kind.replace('-', '_')}_results.json").is_file()


def _results_config(d: dict) -> dict:
    """A config mapping, flat, without the settings that do not change results (`RESUMABLE_KEYS`)."""
    return {k: v for k, v in flatten(d).items() if k not in RESUMABLE_KEYS}


def _check_same_pipeline(out: Path, stages) -> None:
    """A stage's directory is named after the stage: a stage that ran in ``out`` under one name
    (``pipeline.yaml``) may be skipped, left out or joined by others in a later pipeline there,
    but not reused by a stage of another kind; refused before anything is written."""
    path = out / "pipeline.yaml"
    if not path.is_file():
        return
    try:
        saved = read_yaml(path)
    except ConfigError:
        saved = None
    ran = saved.get("stages") if isinstance(saved, dict) else None
    if not isinstance(ran, list) or not all(isinstance(s, dict) for s in ran):
        raise ConfigError(f"{path}: not a pipeline config: cannot tell which stages ran in {out}; choose another "
                          "output_dir, or delete it to start over")
    kinds = {str(s.get("name") or s.get("kind")): str(s.get("kind")) for s in ran}
    for spec, _ in stages:
        if kinds.get(spec.name, spec.kind) != spec.kind:
            raise ConfigError(f"stage {spec.name!r}: {out / spec.name} holds a stage of kind {kinds[spec.name]} "
                              f"({path.name}), not {spec.kind}: name the stage otherwise, or choose another "
                              "output_dir")


def _open(out: Path, stages) -> None:
    """Hold the pipeline's directory (one pipeline process at a time: `training.runlock`), check
    what an earlier run of it left there, and only then write into it."""
    if out.is_dir():
        hold(out, ConfigError, key="output_dir")  # before reading what another pipeline may be writing
    _check_same_pipeline(out, stages)
    for spec, stage_cfg in stages:
        if _finished(out / spec.name, spec.kind):
            _check_unchanged(spec.name, out / spec.name, stage_cfg)
    out.mkdir(parents=True, exist_ok=True)
    hold(out, ConfigError, key="output_dir")


def run_pipeline(path: str | None, overrides: list[str] | None = None) -> dict:
    cfg, stages = plan(path, overrides)
    require("matplotlib", "report", "the pipeline's report.html")  # checked before any stage runs
    out = Path(cfg.output_dir)
    try:
        _open(out, stages)
        return _run_stages(cfg, out, stages)
    finally:
        release(out)  # refused or finished, the directory is free for another process (as after a crash)


def _run_stages(cfg: PipelineConfig, out: Path, stages) -> dict:
    strategies: dict = {}

    def strategy_for(stage_cfg):
        # one strategy per layout for the whole pipeline (stages normally share one)
        train, model = stage_cfg.train, getattr(stage_cfg, "model", None)
        key = (getattr(train, "fsdp", False), getattr(train, "zero_stage", 0), getattr(model, "dtype", "auto"))
        if key not in strategies:
            strategies[key] = make_strategy(train, model)
        return strategies[key]

    dump_config(cfg, out / "pipeline.yaml")
    for name in ("report.html", "report_warnings.json", "pipeline_summary.json"):  # an earlier run's, until this
        (out / name).unlink(missing_ok=True)  # one ends: a run that stops leaves none (`rlhfkit report` makes one)
    timings: dict[str, float] = {}
    skipped, continued = [], []
    write_run_info(out, [(spec.name, spec.kind) for spec, _ in stages])  # a report of a partial run has it too
    for i, (spec, stage_cfg) in enumerate(stages):
        done = out / spec.name / "DONE"
        if _finished(out / spec.name, spec.kind):
            if len(skipped) < i:  # a stage before it ran now: its inputs may have changed since `_open` checked
                _check_unchanged(spec.name, out / spec.name, stage_cfg)
            if not done.exists():  # killed after the command's last write, before the pipeline's
                done.write_text(json.dumps({"seconds": None}))
            print(f"[pipeline] stage {i + 1}/{len(stages)} {spec.name}: already done, skipped", flush=True)
            skipped.append(spec.name)
            continue
        print(f"[pipeline] stage {i + 1}/{len(stages)} {spec.name} ({spec.kind})", flush=True)
        if hasattr(stage_cfg, "train"):
            # "auto": continue an interrupted stage from its latest checkpoint, else start it
            # (true would refuse a stage that has nothing to resume: rlhfkit.training.rundir)
            stage_cfg.train.resume = "auto"
            stage_cfg.train.progress = cfg.progress
        if any((out / spec.name / "checkpoints").glob("step-*")):
            continued.append(spec.name)  # its time below is this run's part only
        t = time.time()
        try:
            COMMANDS[spec.kind].runner()(stage_cfg, strategy_for(stage_cfg))
        except Exception as e:  # the command line's error names the stage
            with contextlib.suppress(AttributeError, TypeError):
                e.pipeline_stage = f"stage {spec.name} ({spec.kind})"
            raise
        timings[spec.name] = time.time() - t
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps({"seconds": timings[spec.name]}))
    summary = {"output_dir": str(out), "stage_seconds": timings, "skipped": skipped, "continued": continued,
               "headline": headline(out, stages)}
    write_run_info(out, [(spec.name, spec.kind) for spec, _ in stages])  # versions, hardware, stage times
    from rlhfkit.report import build_report
    from rlhfkit.report.checks import summary_messages

    report = build_report([out])
    summary["report"] = str(report)
    warnings_file = report.with_name(f"{report.stem}_warnings.json")
    summary["warnings"] = summary_messages(json.loads(warnings_file.read_text())) if warnings_file.is_file() else []
    (out / "pipeline_summary.json").write_text(json.dumps(summary, indent=2))
    print(format_summary(summary), flush=True)
    return summary
