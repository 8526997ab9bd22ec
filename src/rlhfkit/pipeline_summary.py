"""What ``rlhfkit pipeline`` prints and writes to ``pipeline_summary.json`` when it ends: the time
of each stage run (or that it was done before, or continued), the headline figures of every eval
stage, the report's warnings and where the report is."""

from __future__ import annotations

import json
from pathlib import Path


def _m(v):
    return v.get("mean") if isinstance(v, dict) else v


def headline(out: Path, stages) -> dict:
    """The figures a user looks at first, from every eval stage (prefixed by the stage's name when
    there are several, e.g. the shipped prompts and a differently worded set)."""
    evals = [spec.name for spec, _ in stages if spec.kind == "eval"]
    h: dict = {}
    for stage in evals:
        path = out / stage / "eval_results.json"
        if path.is_file():
            h.update(_eval_headline(json.loads(path.read_text()), f"{stage}: " if len(evals) > 1 else ""))
    return h


def _eval_headline(ev: dict, prefix: str) -> dict:
    base = ev.get("baseline", {})
    h: dict = {f"{prefix}eval prompts": ev.get("prompts"), f"{prefix}samples per prompt": ev.get("samples_per_prompt")}
    for name, pol in (ev.get("policies") or {}).items():
        name = f"{prefix}{name}"
        w = (pol.get("win_rate") or {}).get("gold")
        if w:
            h[f"{name}: gold win rate vs baseline [95% CI]"] = (
                f"{w['win_rate']:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}]")
        for key, label in (("gold_mean", "gold score"), ("proxy_mean", "proxy (RM) reward")):
            if key in pol and key in base:
                h[f"{name}: {label} before -> after"] = f"{_m(base[key]):.3f} -> {_m(pol[key]):.3f}"
        if "kl" in pol:
            h[f"{name}: KL to baseline (nats)"] = round(_m(pol["kl"]), 3) + 0.0  # + 0.0: no "-0.0"
        if "length_tokens" in pol:
            h[f"{name}: length (tokens) before -> after"] = (f"{base.get('length_tokens', 0):.1f} -> "
                                                              f"{pol['length_tokens']:.1f}")
    return h


def format_summary(summary: dict) -> str:
    lines = ["", "=" * 72, f"rlhfkit pipeline finished: {summary['output_dir']}"]
    for name in summary.get("skipped") or []:
        lines.append(f"  stage {name:<12} done before, skipped")
    for name, sec in summary["stage_seconds"].items():
        part = " (continued from a checkpoint: this run's part)" if name in (summary.get("continued") or []) else ""
        lines.append(f"  stage {name:<12} {sec / 60:6.1f} min{part}")
    if len(summary["stage_seconds"]) > 1:
        lines.append(f"  {'all stages run':<18} {sum(summary['stage_seconds'].values()) / 60:6.1f} min")
    for k, v in (summary.get("headline") or {}).items():
        lines.append(f"  {k}: {v}")
    for message in summary.get("warnings") or []:  # e.g. a stage whose held-out metric fell
        lines.append(f"  WARNING: {message}")
    lines.append(f"  report: {summary.get('report')}")
    lines.append("=" * 72)
    return "\n".join(lines)
