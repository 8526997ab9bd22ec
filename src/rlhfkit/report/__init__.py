"""``report.html``: one self-contained page per run directory (or several, compared).

    rlhfkit report RUN_DIR [RUN_DIR ...] [--out report.html]

Reads what the stages wrote (``*/metrics.jsonl``, ``*_config.yaml``, ``eval*.json``,
``pm_results.json``, ``samples-*.jsonl``, ``run_info.json``) and shows, top to bottom: warnings
(stages that did not finish or never started, unreadable results, a policy that loses to its
baseline, truncated responses, held-out metrics that got worse, KL spikes; a damaged file), the
evaluation table with 95% intervals and sample sizes, the alignment tax (the baseline before, each
policy after), judges' accuracy on a labelled preference set overall and by category, win rates
and length against score, the training curves (one metric per panel, raw and smoothed; a
breakdown by category in one panel) with the split of each policy-gradient iteration's time,
every other logged metric in a table (first, last, lowest, highest), held-out metrics first to
last and a preference model's held-out accuracy and position bias, responses side by side, and
the run information (resolved configs, models, library versions, hardware, time per stage).
Figures are inline PNGs: no network, no scripts, the file opens anywhere.

The warnings are also written as a JSON list next to the page (``report_warnings.json`` for
``report.html``), for scripts and CI.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from rlhfkit.report import eval_tables, plots, sections
from rlhfkit.report.checks import KINDS, eval_warnings, not_started, stage_warnings
from rlhfkit.report.data import Stage, find_evals, load_stages, metric_keys, read_json, run_warnings

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

__all__ = ["build_report", "collect"]


def collect(runs: list[Path]) -> dict:
    """Everything the page shows, keyed by run name: stages, evaluations, warnings, environments."""
    names = [r.resolve().name or str(r) for r in runs]
    if len(set(names)) < len(names):  # two runs with the same folder name: use the paths
        names = [str(r) for r in runs]
    staged = {n: load_stages(r) for n, r in zip(names, runs)}
    evals, warnings = {}, []
    for (n, stages), run in zip(staged.items(), runs):
        warnings += run_warnings(n, run) + not_started(n, run, stages)
        for st in stages:
            warnings += stage_warnings(n, st)
            warnings += [{"run": n, "stage": st.name, "kind": "unreadable", "path": str(path),
                          "message": f"{st.name}: {path} could not be read ({why}); its settings are not shown."}
                         for path, why in st.unreadable]
        found, unreadable = find_evals(stages)
        for st, path, ev in found:
            evals[f"{n}/{st.name}" if st.name != n else n] = ev
            warnings += eval_warnings(n, st, ev)
        warnings += [{"run": n, "stage": st.name, "kind": "unreadable", "path": str(path),
                      "message": f"{st.name}: {path} could not be read ({why}); its evaluation is not shown."}
                     for st, path, why in unreadable]
    warnings.sort(key=lambda w: KINDS.index(w["kind"]))  # stable: stage order within a kind
    envs = {n: read_json(r / "run_info.json").get("environment") or {} for n, r in zip(names, runs)}
    envs = {n: env if isinstance(env, dict) else {} for n, env in envs.items()}  # a file edited into another shape
    return {"stages": staged, "evals": evals, "warnings": warnings, "environments": envs}


def _headline(evals: dict[str, dict]) -> str:
    lines = []
    for title, ev in evals.items():
        base = ev["policies"].get("baseline", {})
        for name, m in list(ev["policies"].items())[1:]:
            for j in ["gold"] if "gold" in ev["judges"] else ev["judges"][:1]:
                w = (m.get("win_rate") or {}).get(j)
                if not isinstance(w, dict):
                    continue
                gain = ""
                if isinstance(base.get(f"{j}_mean"), dict) and isinstance(m.get(f"{j}_mean"), dict):
                    gain = (f"; mean {j} score {sections.num(base[f'{j}_mean']['mean'])} &rarr; "
                            f"{sections.num(m[f'{j}_mean']['mean'])}")
                kl = f"; KL {sections.num(m['kl']['mean'])} nats" if isinstance(m.get("kl"), dict) else ""
                lines.append(f"<div class='headline'><b>{html.escape(title)}: {html.escape(name)}</b> "
                             f"{html.escape(sections.judge_label(j, ev))} win rate vs baseline "
                             f"{sections.with_ci(w)}{gain}{kl}</div>")
    return "".join(lines)


def _evaluation(evals: dict[str, dict]) -> str:
    many = len(evals) > 1
    bars, scatter = [], []
    for title, ev in evals.items():
        for name, m in list(ev["policies"].items())[1:]:
            for j in ev["judges"]:
                w = (m.get("win_rate") or {}).get(j)
                if isinstance(w, dict) and None not in (w.get("win_rate"), w.get("ci_low"), w.get("ci_high")):
                    label = f"{title}: {name}" if many else name
                    bars.append((f"{label}\n({sections.judge_label(j, ev)})", w["win_rate"], w["ci_low"], w["ci_high"]))
        scatter += [(f"{title}: {k}" if many else k, pts) for k, pts in ev["length_reward"].items() if pts]
    figs = [f for f in (plots.winrate_plot(bars), plots.scatter_plot(scatter)) if f]
    return ("<section id='evaluation'><h2>Evaluation</h2>" + eval_tables.eval_table(evals)
            + "<div class='grid'>" + "".join(figs) + "</div></section>")


def _training(staged: dict[str, list[Stage]]) -> str:
    names = list(dict.fromkeys(st.name for stages in staged.values() for st in stages))
    parts = []
    for name in names:
        runs = {r: st for r, stages in staged.items() for st in stages if st.name == name}
        figs = plots.stage_panels(name, runs) + [f for r, st in runs.items()
                                                 if (f := plots.time_split(r if len(staged) > 1 else "", st))]
        rest = "".join(sections.other_metrics_table(r if len(staged) > 1 else "", st,
                                                    plots.drawn_keys(set(metric_keys(st.rows))))
                       for r, st in runs.items())
        if figs or rest:
            kind = next((st.kind for st in runs.values() if st.kind), "")
            parts.append(f"<h3>{html.escape(name)}{f' ({html.escape(kind)})' if kind and kind != name else ''}</h3>"
                         f"<div class='grid'>{''.join(figs)}</div>{rest}")
    pairs = [(r, st) for r, stages in staged.items() for st in stages]
    held = sections.held_out_table(pairs) + sections.judge_table(pairs)
    if not parts and not held:
        return ""
    return "<section id='training'><h2>Training curves</h2>" + "".join(parts) + held + "</section>"


def render_page(runs: list[Path], data: dict) -> str:
    staged, evals = data["stages"], data["evals"]
    body = [f"<h1>rlhfkit report</h1><p class='sub'>{html.escape(', '.join(str(r) for r in runs))}</p>",
            sections.warnings_block(data["warnings"], sum(len(s) for s in staged.values()), len(staged) > 1),
            _headline(evals)]
    if evals:
        body.append(_evaluation(evals))
    body.append(_training(staged))
    samples = sections.samples_table(evals) + "".join(
        sections.training_samples_table(n if len(staged) > 1 else "", st) for n, stages in staged.items() for st in stages)
    if samples:
        body.append(f"<section id='responses'><h2>Responses</h2>{samples}</section>")
    info = "".join(sections.stages_table(n, st) + sections.environment_table(n, data["environments"][n])
                   for n, st in staged.items())
    body.append(f"<section id='run-info'><h2>Run information</h2>{info}</section>")
    ids = [(i, t) for i, t in (("evaluation", "Evaluation"), ("training", "Training curves"), ("responses", "Responses"),
                               ("run-info", "Run information")) if f"id='{i}'" in "".join(body)]
    body.insert(1, "<nav>" + " &middot; ".join(f"<a href='#{i}'>{t}</a>" for i, t in ids) + "</nav>")
    # No script runs in the page, whatever text a run's files hold: the policy allows inline styles
    # and data: images (the figures) and nothing else.
    return ("<!doctype html><html><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\"><title>rlhfkit report</title>"
            f"<style>{sections.CSS}</style></head><body>{''.join(body)}</body></html>")


def _write(target: Path, text: str) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text)
    tmp.replace(target)


def build_report(runs: list[str | Path], out: str | Path | None = None) -> Path:
    """Write ``report.html`` for one run (into it) or a comparison of several (``out`` required),
    and its warnings as ``<name>_warnings.json`` beside it. Returns the page's path."""
    runs = [Path(r) for r in runs]
    for r in runs:
        if not r.is_dir():
            raise FileNotFoundError(f"run directory not found: {r}")
    if out is not None and Path(out).is_dir():
        raise ValueError(f"--out: {out} is a directory; name the page to write, e.g. {Path(out) / 'report.html'}")
    data = collect(runs)
    for r, stages in zip(runs, data["stages"].values()):
        if not stages:
            raise FileNotFoundError(f"no run found in {r}: no folder with a command's config (*_config.yaml), "
                                    "metrics.jsonl or eval_results.json")
    target = Path(out) if out else runs[0] / "report.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    _write(target, render_page(runs, data))
    _write(target.with_name(f"{target.stem}_warnings.json"), json.dumps(data["warnings"], indent=2) + "\n")
    return target
