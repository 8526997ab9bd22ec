"""``rlhfkit pipeline``: the stages of a workflow in order, in one run directory.

    rlhfkit pipeline --config configs/demo.yaml [stages.1.config.optim.lr=1e-5 ...]

A pipeline config names an output directory, a base model and a list of stages. Each stage is
one sub-command (sft, rm, ppo, grpo, dpo, online-dpo, eval, ...) with that command's own config
as a mapping; ``${base}`` stands for the base model and ``${NAME}`` for the model a stage called
NAME produced (``<output_dir>/<NAME>/model``). Every stage config is validated before the first
stage starts, a stage that already finished (``<stage>/DONE``) is not redone, and an interrupted
stage resumes from its latest complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlhfkit.config import ConfigError, _build, load_config, parse_overrides, _merge


@dataclass
class StageSpec:
    name: str = ""
    kind: str = ""  # a sub-command registered in rlhfkit.cli.TRAINERS
    config: dict = field(default_factory=dict)  # that command's config, with ${...} placeholders


@dataclass
class PipelineConfig:
    output_dir: str = "runs/pipeline"
    base_model: str = "smollm2-135m-instruct"
    seed: int = 0
    stages: list = field(default_factory=list)  # list of StageSpec mappings
    progress: bool = True


_PLACEHOLDER = re.compile(r"\$\{([A-Za-z0-9_\-]+)\}")


def _substitute(obj: Any, values: dict[str, str], where: str) -> Any:
    if isinstance(obj, str):
        def rep(m):
            key = m.group(1)
            if key not in values:
                raise ConfigError(f"{where}: unknown placeholder ${{{key}}}; known: {sorted(values)}")
            return values[key]
        return _PLACEHOLDER.sub(rep, obj)
    if isinstance(obj, dict):
        return {k: _substitute(v, values, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, list):
        return [_substitute(v, values, f"{where}[{i}]") for i, v in enumerate(obj)]
    return obj


def plan(path: str | None, overrides: list[str] | None = None) -> tuple[PipelineConfig, list[tuple[StageSpec, Any]]]:
    """Load the pipeline and build + validate every stage's typed config (no model is loaded)."""
    from rlhfkit.cli import TRAINERS, _resolve

    source = str(path) if path else "pipeline"
    raw = yaml.safe_load(Path(path).read_text()) if path else {}
    if overrides:
        over = parse_overrides(overrides)
        stages_over = over.pop("stages", None)
        raw = _merge(raw or {}, over)
        if stages_over:  # stages.<i>.config.key=value
            for i, v in stages_over.items():
                raw["stages"][int(i)] = _merge(raw["stages"][int(i)], v)
    cfg = _build(PipelineConfig, raw or {}, "", source)
    out = Path(cfg.output_dir)
    values = {"base": cfg.base_model, "output_dir": str(out)}
    stages = []
    for i, s in enumerate(cfg.stages):
        spec = _build(StageSpec, s, f"stages[{i}]", source)
        if spec.kind not in TRAINERS:
            raise ConfigError(f"{source}: stages[{i}].kind: unknown stage kind {spec.kind!r}; known: {sorted(TRAINERS)}")
        if not spec.name:
            spec.name = spec.kind
        data = _substitute(spec.config, values, f"{source}: stages[{i}].config")
        data = _merge({"train": {"output_dir": str(out / spec.name), "seed": cfg.seed}}, data)
        try:
            stage_cfg = load_config(_resolve(TRAINERS[spec.kind][0]), data=data)
        except ConfigError as e:
            raise ConfigError(f"{source}: stages[{i}] ({spec.name}): {e}") from None
        stages.append((spec, stage_cfg))
        values[spec.name] = str(out / spec.name / "model")
    return cfg, stages


def run_pipeline(path: str | None, overrides: list[str] | None = None) -> dict:
    from rlhfkit.cli import TRAINERS, _resolve

    cfg, stages = plan(path, overrides)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    timings: dict[str, float] = {}
    for i, (spec, stage_cfg) in enumerate(stages):
        done = out / spec.name / "DONE"
        if done.exists():
            print(f"[pipeline] stage {i + 1}/{len(stages)} {spec.name}: already done, skipped", flush=True)
            continue
        print(f"[pipeline] stage {i + 1}/{len(stages)} {spec.name} ({spec.kind})", flush=True)
        if hasattr(stage_cfg, "train"):
            stage_cfg.train.resume = True  # continue an interrupted stage from its latest checkpoint
            stage_cfg.train.progress = cfg.progress
        t = time.time()
        result = _resolve(TRAINERS[spec.kind][1])(stage_cfg)
        timings[spec.name] = time.time() - t
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps({"seconds": timings[spec.name]}))
    summary = {"output_dir": str(out), "stage_seconds": timings}
    (out / "pipeline_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
