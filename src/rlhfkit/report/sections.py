"""HTML pieces of the report: warnings, the evaluation table, held-out trends, samples, run information.

Numbers are shown with their unit, sample size and 95% interval, e.g.
``0.588 (95% CI 0.511-0.664, n = 160 prompts)``; every text from a run is HTML-escaped.
"""

from __future__ import annotations

import html
import math

from rlhfkit.eval.stats import wilson
from rlhfkit.report.checks import held_out_trends
from rlhfkit.report.data import Stage, config_value, metric_keys, read_json, series, training_samples

esc = html.escape
JUDGE_LABELS = {"gold": "gold judge"}
PACKAGE_ORDER = ["python", "rlhfkit", "torch", "transformers", "peft", "accelerate", "datasets", "deepspeed"]
LONG_TEXT = 1500  # characters of a response shown before the rest is folded away


def num(v: float | None) -> str:
    """A number to three or four significant places; a dash for a missing or non-finite one, and
    never "-0.000"."""
    if v is None or isinstance(v, bool) or (isinstance(v, float) and not math.isfinite(v)):
        return "&mdash;"
    if not isinstance(v, (int, float)):
        return esc(str(v))
    a = abs(v)
    out = f"{v:.0f}" if a >= 1000 else f"{v:.1f}" if a >= 100 else f"{v:.2f}" if a >= 10 else f"{v:.3f}"
    return out.removeprefix("-") if float(out) == 0 else out


def folded(text: str) -> str:
    """A run's text in a <pre>; past `LONG_TEXT` characters the rest behind a click."""
    if len(text) <= LONG_TEXT:
        return f"<pre>{esc(text)}</pre>"
    return (f"<pre>{esc(text[:LONG_TEXT])}</pre><details><summary>the other {len(text) - LONG_TEXT} characters"
            f"</summary><pre>{esc(text[LONG_TEXT:])}</pre></details>")


def with_ci(d: dict, unit: str = "prompts") -> str:
    """``{"mean"|"win_rate", "ci_low", "ci_high", "n"}`` -> '0.588 (95% CI 0.511-0.664, n = 160 prompts)'."""
    m = d.get("win_rate", d.get("mean"))
    if not isinstance(m, (int, float)):
        return ""
    parts = []
    if isinstance(d.get("ci_low"), (int, float)) and isinstance(d.get("ci_high"), (int, float)):
        parts.append(f"95% CI {num(d['ci_low'])}&ndash;{num(d['ci_high'])}")
    if isinstance(d.get("n"), int):
        parts.append(f"n = {d['n']} {unit}")
    return f"<b>{num(m)}</b>" + (f" <span class='ci'>({', '.join(parts)})</span>" if parts else "")


def judge_label(name: str, ev: dict | None = None) -> str:
    """How the report names a judge; the proxy by what its spec is (`data.scorer_kind`)."""
    if name == "proxy":
        kind = (ev or {}).get("kinds", {}).get(name)
        return f"proxy ({kind})" if kind else "proxy"
    return JUDGE_LABELS.get(name, f"{name} judge")


WARNING_TITLES = {"unfinished": "stage did not finish", "not_started": "stage not started",
                  "unreadable": "unreadable results", "skipped_steps": "skipped updates",
                  "worse_than_baseline": "worse than the baseline", "truncation": "truncated responses",
                  "kl_spike": "KL spike", "held_out_worse": "held-out metric worse"}


def warnings_block(warnings: list[dict], checked: int, show_run: bool = False) -> str:
    if not warnings:
        return (f"<div class='ok' id='warnings'>No warnings: completion, skipped updates, wins against the "
                f"baseline, truncation, held-out metrics and KL checked in {checked} stage(s).</div>")
    items = []
    for w in warnings:
        where = f" ({esc(w['run'])})" if show_run else ""
        items.append(f"<li><b>{WARNING_TITLES[w['kind']]}</b>{where}: {esc(w['message'])}</li>")
    return f"<div class='warn' id='warnings'><b>{len(warnings)} warning(s)</b><ul>{''.join(items)}</ul></div>"


# --------------------------------------------------------------------------- training

def held_out_table(stages: list[tuple[str, Stage]]) -> str:
    rows = []
    for run, st in stages:
        for t in held_out_trends(st.rows):
            if t["higher_is_better"] is None and t["first"] == t["last"]:
                continue  # a set size (pairs, tokens) that did not change: nothing to read
            better = {True: "higher", False: "lower", None: "(not judged)"}[t["higher_is_better"]]
            cls = " class='bad'" if t["worse"] else ""
            rows.append(f"<tr{cls}><td>{esc(run)}</td><td>{esc(st.name)}</td><td>{esc(t['metric'])}</td><td>{better}</td>"
                        f"<td>{t['first']:.4g} (step {t['first_step']})</td><td>{t['last']:.4g} (step {t['last_step']})</td>"
                        f"<td>{'worse' if t['worse'] else 'ok' if t['higher_is_better'] is not None else ''}</td></tr>")
    if not rows:
        return ""
    return ("<h3>Held-out metrics, first to last evaluation</h3><table><tr><th>run</th><th>stage</th><th>metric</th>"
            "<th>better</th><th>first</th><th>last</th><th></th></tr>" + "".join(rows) + "</table>")


def other_metrics_table(run: str, st: Stage, drawn: set[str]) -> str:
    """Every logged metric of a stage that no panel draws, folded: first, last, lowest and highest
    value with their steps (``run`` prefixes the title when several runs are compared, else "")."""
    rows = []
    for k in metric_keys(st.rows):
        if k in drawn:
            continue
        xs, ys = series(st.rows, k)
        if not ys:
            continue
        lo, hi = min(range(len(ys)), key=ys.__getitem__), max(range(len(ys)), key=ys.__getitem__)
        cells = "".join(f"<td>{num(ys[i])} <span class='unit'>(step {esc(str(xs[i]))})</span></td>"
                        for i in (0, -1, lo, hi))
        rows.append(f"<tr><td>{esc(k)}</td><td>{len(ys)}</td>{cells}</tr>")
    if not rows:
        return ""
    title = f"{run}/{st.name}" if run and run != st.name else st.name
    return (f"<details><summary>{esc(title)}: {len(rows)} other logged metric(s), not drawn</summary>"
            "<table><tr><th>metric</th><th>points</th><th>first</th><th>last</th><th>lowest</th><th>highest</th></tr>"
            + "".join(rows) + "</table></details>")


def judge_table(stages: list[tuple[str, Stage]]) -> str:
    """A preference model's held-out accuracy (both orders, one order) and position bias, next to
    the untrained model's as LLM-as-judge (``pm_results.json``; docs/methods/pm.md)."""
    rows = []
    for run, st in stages:
        res = read_json(st.path / "pm_results.json")
        held = (res.get("pairs") or {}).get("eval") if isinstance(res.get("pairs"), dict) else None
        for key, label in (("pm", "trained preference model"), ("llm_judge", "untrained model (LLM-as-judge)")):
            r = res.get(key)
            if not isinstance(r, dict) or not isinstance(r.get("accuracy"), (int, float)):
                continue
            n = r["pairs"] if isinstance(r.get("pairs"), int) else held  # the pairs judged: some may not fit
            cells = [accuracy_ci(r["accuracy"], n)] + [num(r[k]) if isinstance(r.get(k), (int, float)) else ""
                                                        for k in ("accuracy_single_order", "position_bias")]
            rows.append(f"<tr><td>{esc(run)}</td><td>{esc(st.name)}</td><td>{label}</td>"
                        + "".join(f"<td>{c}</td>" for c in cells) + f"<td>{esc(str(n)) if n is not None else ''}</td></tr>")
    if not rows:
        return ""
    return ("<h3>Preference model, held-out pairs</h3><table><tr><th>run</th><th>stage</th><th>judge</th>"
            "<th>accuracy, both orders [95% CI]</th><th>one order</th><th>position bias</th><th>pairs</th></tr>"
            + "".join(rows) + "</table>")


def accuracy_ci(acc: float | None, n) -> str:
    """The accuracy in bold, with Wilson's 95% interval over n pairs when n is known (12 of 12
    right is [0.758, 1], not [1, 1])."""
    if not isinstance(acc, (int, float)) or not math.isfinite(acc):
        return num(None)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return f"<b>{acc:.3f}</b>"
    ci = wilson(min(max(acc, 0.0), 1.0), n)
    return f"<b>{acc:.3f}</b> [{max(ci['ci_low'], 0.0):.3f}, {min(ci['ci_high'], 1.0):.3f}]"


def samples_table(evals: dict[str, dict], limit: int = 12) -> str:
    """Side by side: the same prompts answered by the baseline and each trained policy."""
    parts = []
    for title, ev in evals.items():
        samples = ev["samples"][:limit]
        if not samples:
            continue
        names = list(samples[0]["responses"])
        head = "".join(f"<th>{esc(n)}</th>" for n in names)
        rows = []
        for s in samples:
            cells = []
            for n in names:
                text, score = s["responses"][n]
                badge = f'<div class="score">score {num(score)}</div>' if score is not None else ""
                cells.append(f"<td>{folded(text)}{badge}</td>")
            rows.append(f"<tr><td>{folded(str(s['prompt']))}</td>{''.join(cells)}</tr>")
        shown = f"first {len(samples)} of {len(ev['samples'])} prompts"
        parts.append(f"<h3>{esc(title)}: baseline vs trained, same prompts <span class='unit'>({shown})</span></h3>"
                     f"<table class='samples'>"
                     f"<tr><th>prompt</th>{head}</tr>{''.join(rows)}</table>")
    return "".join(parts)


def training_samples_table(run: str, st: Stage) -> str:
    """A policy-gradient stage's last logged samples, responses cut at the token cap marked
    (``run`` prefixes the title when several runs are compared, else "")."""
    step, recs = training_samples(st)
    if not recs:
        return ""
    cap = config_value(st.config, "rollout.max_new_tokens")
    rows = []
    for r in recs:
        cut = r.get("eos") is False
        badge = f"<div class='bad score'>cut at the {esc(str(cap))}-token cap (no EOS)</div>" if cut and cap else (
            "<div class='bad score'>cut (no EOS)</div>" if cut else "")
        score = f"<div class='score'>score {num(r['score'])}</div>" if isinstance(r.get("score"), (int, float)) else ""
        rows.append(f"<tr><td>{folded(str(r.get('prompt', '')))}</td>"
                    f"<td>{folded(str(r['response']))}{score}{badge}</td></tr>")
    title = f"{run}/{st.name}" if run and run != st.name else st.name
    return (f"<h3>{esc(title)}: training samples <span class='unit'>(step {step})</span></h3>"
            f"<table class='samples'><tr><th>prompt</th><th>response</th></tr>{''.join(rows)}</table>")


# --------------------------------------------------------------------------- run information

def _duration(s: float | None) -> str:
    if s is None:
        return "&mdash;"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def stages_table(run: str, stages: list[Stage]) -> str:
    rows = []
    for st in stages:
        note = {"log timestamps": " (first to last log line)"}.get(st.seconds_source, "")
        cfg = (f"<details><summary>{esc(st.path.name)}/{esc(st.kind or 'stage')}_config.yaml</summary>"
               f"<pre class='cfg'>{esc(st.config_text)}</pre></details>") if st.config_text else "&mdash;"
        cap = config_value(st.config, "rollout.max_new_tokens")
        extra = f"<div class='unit'>max_new_tokens {esc(str(cap))}</div>" if cap else ""
        rows.append(f"<tr><td>{esc(st.name)}</td><td>{esc(st.kind)}</td><td><code>{esc(st.model)}</code>{extra}</td>"
                    f"<td>{_duration(st.seconds)}{esc(note)}</td><td>{cfg}</td></tr>")
    known = [st.seconds for st in stages if st.seconds is not None]
    total = sum(known) if known else None
    foot = f"<tr><th colspan='3'>all stages</th><th colspan='2'>{_duration(total)}</th></tr>" if len(stages) > 1 else ""
    return (f"<h3>{esc(run)}: stages</h3><table class='stages'><tr><th>stage</th><th>kind</th><th>model</th>"
            f"<th>wall time</th><th>resolved config</th></tr>{''.join(rows)}{foot}</table>")


def environment_table(run: str, env: dict) -> str:
    if not env:
        return (f"<p class='unit'>{esc(run)}: no run_info.json (written by <code>rlhfkit pipeline</code>), so the "
                f"library versions and hardware of this run are not known.</p>")
    pk = env.get("packages") or {}
    hw = env.get("hardware") or {}
    rows = [("python", env.get("python"))] + [(k, pk.get(k) or "not installed") for k in PACKAGE_ORDER[1:]]
    rows += [(k, v) for k, v in pk.items() if k not in PACKAGE_ORDER]
    gpus = hw.get("gpus") or []
    rows += [("CPU", hw.get("cpu")), ("cores", f"{hw.get('cores_usable')} usable of {hw.get('cores')}"),
             ("RAM", f"{hw['ram_gb']:.1f} GB" if isinstance(hw.get("ram_gb"), (int, float)) else None),
             ("GPUs", "; ".join(str(g) for g in gpus) if gpus else "none"),
             ("platform", env.get("platform")), ("git commit", env.get("git_commit")),
             ("recorded", env.get("recorded_at"))]
    body = "".join(f"<tr><th class='rowh'>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in rows if v is not None)
    return f"<h3>{esc(run)}: software and hardware</h3><table class='env'>{body}</table>"


CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{margin-bottom:4px}.sub{color:#666;margin-top:0}
.grid{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
img.plot{border:1px solid #ddd;border-radius:4px;background:#fff;max-width:100%;height:auto}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left;overflow-wrap:anywhere}
th{background:#f3f3f3}th.rowh{font-weight:600;background:#fafafa}.unit,.ci{color:#666;font-size:11px;font-weight:normal}
pre{white-space:pre-wrap;overflow-wrap:anywhere;margin:0;font-family:inherit;max-width:420px}
pre.cfg{font-family:monospace;font-size:11px;max-width:none}
.score{color:#666;font-size:11px;margin-top:4px}.bad{color:#a00;font-weight:600}tr.bad td{background:#fff3f3}
.warn{background:#fff4e5;border:1px solid #e0a040;padding:8px 12px;border-radius:4px;margin:12px 0}
.warn ul{margin:6px 0 0 0;padding-left:20px}.warn li{margin:3px 0}
.ok{background:#eef7ee;border:1px solid #9c9;padding:6px 12px;border-radius:4px;margin:12px 0}
table.tax th.rowh{max-width:440px}
.headline{font-size:15px;margin:8px 0}details summary{cursor:pointer;color:#245}"""
