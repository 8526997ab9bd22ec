"""HTML pieces of the report: warnings, the evaluation table, held-out trends, samples, run information.

Numbers are shown with their unit, sample size and 95% interval, e.g.
``0.588 (95% CI 0.511-0.664, n = 160 prompts)``; every text from a run is HTML-escaped.
"""

from __future__ import annotations

import html
import math

from rlhfkit.report.checks import TRUNCATION_SHARE, held_out_trends
from rlhfkit.report.data import Stage, config_value, read_json, training_samples

esc = html.escape
JUDGE_LABELS = {"gold": "gold judge"}
PACKAGE_ORDER = ["python", "rlhfkit", "torch", "transformers", "peft", "accelerate", "datasets", "deepspeed"]


def num(v: float) -> str:
    if not isinstance(v, (int, float)):
        return esc(str(v))
    a = abs(v)
    return f"{v:.0f}" if a >= 1000 else f"{v:.1f}" if a >= 100 else f"{v:.2f}" if a >= 10 else f"{v:.3f}"


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


# --------------------------------------------------------------------------- evaluation

def _eval_rows(ev: dict) -> list[tuple[str, str, dict[str, str]]]:
    """(row label, unit/explanation, model -> cell) for one eval_results.json."""
    pols, per = ev["policies"], int(ev["raw"].get("samples_per_prompt") or 1)
    rows = []
    for j in ev["judges"]:
        rows.append((f"Win rate vs baseline, {judge_label(j, ev)}",
                     "share of sample pairs won (ties count half; interval over prompts)",
                     {n: _win_cell(m["win_rate"][j]) for n, m in pols.items() if isinstance((m.get("win_rate") or {}).get(j), dict)}))
    scored = [k[:-5] for k in dict.fromkeys(k for m in pols.values() for k in m) if k.endswith("_mean")]
    for j in scored:
        rows.append((f"Mean score, {judge_label(j, ev)}", "per response, averaged per prompt",
                     {n: with_ci(m[f"{j}_mean"]) for n, m in pols.items() if isinstance(m.get(f"{j}_mean"), dict)}))
    rows.append(("KL to baseline", "nats per response",
                 {n: with_ci(m["kl"]) for n, m in pols.items() if isinstance(m.get("kl"), dict)}))
    rows.append(("Response length", "mean over samples",
                 {n: f"{m['length_tokens']:.1f} tokens, {m.get('length_chars', float('nan')):.0f} characters"
                  for n, m in pols.items() if isinstance(m.get("length_tokens"), (int, float))}))
    rows.append(("Cut at max_new_tokens", "responses without an EOS token",
                 {n: _trunc_cell(m) for n, m in pols.items() if isinstance(m.get("eos_frac"), (int, float))}))
    within = any(f"corr_length_{j}_within_prompt" in m for m in pols.values() for j in scored)
    for j in scored:
        rows.append((f"Length vs {judge_label(j, ev)} score",
                     "Pearson r over samples" + (" (in brackets: within prompt)" if within else ""),
                     {n: _corr_cell(m, j) for n, m in pols.items() if isinstance(m.get(f"corr_length_{j}"), (int, float))}))
    rows.append(("Samples", "prompts x samples per prompt",
                 {n: f"{m['samples']} ({m['samples'] // per} x {per})" for n, m in pols.items()
                  if isinstance(m.get("samples"), int)}))
    return [r for r in rows if r[2]] + _other_rows(pols, scored)


def _other_rows(pols: dict, scored: list[str]) -> list[tuple[str, str, dict[str, str]]]:
    """Any other number an evaluation wrote, under a readable name (nothing is silently dropped)."""
    known = {"model", "win_rate", "kl", "length_tokens", "length_chars", "eos_frac", "samples", "alignment_tax"}
    known |= {f"{j}{suffix}" for j in scored for suffix in ("_mean", "")}
    known |= {f"corr_length_{j}{suffix}" for j in scored for suffix in ("", "_within_prompt")}
    rows = []
    for key in dict.fromkeys(k for m in pols.values() for k in m if k not in known):
        cells = {n: with_ci(m[key]) if isinstance(m.get(key), dict) else num(m[key]) for n, m in pols.items()
                 if isinstance(m.get(key), (int, float, dict)) and not isinstance(m.get(key), bool)}
        cells = {n: c for n, c in cells.items() if c}
        if cells:
            rows.append((key.replace("_", " ").capitalize(), "", cells))
    return rows


def _win_cell(w: dict) -> str:
    wtl = ""
    if all(isinstance(w.get(k), int) for k in ("wins", "ties", "losses")):
        wtl = f"<div class='ci'>sample pairs: {w['wins']} won, {w['ties']} tied, {w['losses']} lost</div>"
    return with_ci(w) + wtl


def _trunc_cell(m: dict) -> str:
    share, n = 1.0 - m["eos_frac"], m.get("samples")
    count = f" ({round(share * n)} of {n} samples)" if isinstance(n, int) else ""
    cls = " class='bad'" if share >= TRUNCATION_SHARE else ""
    return f"<span{cls}>{share:.0%}{count}</span>"


def _corr_cell(m: dict, j: str) -> str:
    within = m.get(f"corr_length_{j}_within_prompt")
    extra = f" ({num(within)})" if isinstance(within, (int, float)) else ""
    return f"r = {num(m[f'corr_length_{j}'])}{extra}"


def eval_table(evals: dict[str, dict]) -> str:
    """Rows: measures; columns: every model of every eval (baseline first)."""
    parts = []
    for title, ev in evals.items():
        rows = _eval_rows(ev)
        names = list(ev["policies"])
        head = "".join(f"<th>{esc(n)}</th>" for n in names)
        body = "".join(f"<tr><th class='rowh'>{esc(label)}<div class='unit'>{esc(unit)}</div></th>"
                       + "".join(f"<td>{cells.get(n, '&mdash;')}</td>" for n in names) + "</tr>"
                       for label, unit, cells in rows)
        parts.append(f"<h3>{esc(title)}</h3><table class='eval'><tr><th>measure</th>{head}</tr>{body}</table>"
                     + alignment_tax_table(ev) + _model_list(ev) + _preference_set(ev))
    return "".join(parts)


# measure -> (row label, what it is, whether higher is better)
TAX_MEASURES = {
    "sft_nll": ("Held-out SFT-data NLL", "nats per response token of SFT examples no policy was trained on; "
                "lower = the model still writes that data's responses", False),
    "capability_exact_match": ("Capability probe, exact match", "share of the probe task's held-out prompts "
                               "answered exactly (greedy decoding)", True),
}


def alignment_tax_table(ev: dict) -> str:
    """The alignment tax of `rlhfkit eval` (``alignment_tax`` in eval_results.json): each measure for the
    baseline (before) and each policy (after, with its change from the baseline); "" when not measured."""
    taxes = {n: m["alignment_tax"] for n, m in ev["policies"].items() if isinstance(m.get("alignment_tax"), dict)}
    measures = list(dict.fromkeys(k for t in taxes.values() for k, v in t.items()
                                  if not k.endswith("_delta") and isinstance(v, (int, float))))
    if not measures:
        return ""
    what = ev["raw"].get("alignment_tax") if isinstance(ev["raw"].get("alignment_tax"), dict) else {}
    sizes = {"sft_nll": (what.get("sft_data"), what.get("sft_examples"), "examples"),
             "capability_exact_match": (what.get("capability"), what.get("capability_prompts"), "prompts")}
    names = list(ev["policies"])
    head = "".join(f"<th>{esc(n)}{' (before)' if i == 0 else ' (after)'}</th>" for i, n in enumerate(names))
    rows = []
    for key in measures:
        label, unit, higher = TAX_MEASURES.get(key, (key.replace("_", " ").capitalize(), "", None))
        source, n, things = sizes.get(key, (None, None, ""))
        details = ([esc(str(source))] if source else []) + ([f"n = {n} {things}"] if isinstance(n, int) else [])
        if details:
            unit += f" ({', '.join(details)})"
        if higher is not None:
            unit += f"; a {'fall' if higher else 'rise'} from the baseline is the tax"
        cells = []
        for name in names:
            t = taxes.get(name, {})
            if not isinstance(t.get(key), (int, float)):
                cells.append("<td>&mdash;</td>")
                continue
            delta = t.get(f"{key}_delta")
            change = ""
            if isinstance(delta, (int, float)):
                verdict = "" if higher is None or delta == 0 else " (worse)" if (delta > 0) != higher else " (better)"
                change = f"<div class='ci'>{delta:+.3f} vs baseline{verdict}</div>"
            cells.append(f"<td><b>{num(t[key])}</b>{change}</td>")
        rows.append(f"<tr><th class='rowh'>{esc(label)}<div class='unit'>{unit}</div></th>{''.join(cells)}</tr>")
    return ("<h4>Alignment tax: what training cost outside its objective</h4>"
            f"<table class='eval tax'><tr><th>measure</th>{head}</tr>{''.join(rows)}</table>")


def _model_list(ev: dict) -> str:
    items = "".join(f"<li>{esc(n)}: <code>{esc(str(m.get('model', '?')))}</code></li>" for n, m in ev["policies"].items())
    raw = ev["raw"]
    dropped = raw.get("prompts_dropped_too_long")
    note = f"; {esc(str(dropped))} prompt(s) dropped as too long" if dropped else ""
    return (f"<p class='unit'>{esc(str(raw.get('prompts', '?')))} held-out prompts{note}. Models:</p>"
            f"<ul class='unit'>{items}</ul>")


def _preference_set(ev: dict) -> str:
    ps = ev["raw"].get("preference_set")
    if not isinstance(ps, dict) or not ps:
        return ""
    rows = "".join(f"<tr><td>{esc(judge_label(j, ev))}</td><td>{num(r.get('accuracy'))} "
                   f"(n = {esc(str(r.get('pairs', '?')))} pairs)</td></tr>" for j, r in ps.items() if isinstance(r, dict))
    return f"<table><tr><th>judge</th><th>accuracy on the labelled preference set</th></tr>{rows}</table>"


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


def judge_table(stages: list[tuple[str, Stage]]) -> str:
    """A preference model's held-out accuracy (both orders, one order) and position bias, next to
    the untrained model's as LLM-as-judge (``pm_results.json``; docs/methods/pm.md)."""
    rows = []
    for run, st in stages:
        res = read_json(st.path / "pm_results.json")
        n = (res.get("pairs") or {}).get("eval") if isinstance(res.get("pairs"), dict) else None
        for key, label in (("pm", "trained preference model"), ("llm_judge", "untrained model (LLM-as-judge)")):
            r = res.get(key)
            if not isinstance(r, dict) or not isinstance(r.get("accuracy"), (int, float)):
                continue
            cells = [_accuracy_ci(r["accuracy"], n)] + [num(r[k]) if isinstance(r.get(k), (int, float)) else ""
                                                        for k in ("accuracy_single_order", "position_bias")]
            rows.append(f"<tr><td>{esc(run)}</td><td>{esc(st.name)}</td><td>{label}</td>"
                        + "".join(f"<td>{c}</td>" for c in cells) + f"<td>{esc(str(n)) if n is not None else ''}</td></tr>")
    if not rows:
        return ""
    return ("<h3>Preference model, held-out pairs</h3><table><tr><th>run</th><th>stage</th><th>judge</th>"
            "<th>accuracy, both orders [95% CI]</th><th>one order</th><th>position bias</th><th>pairs</th></tr>"
            + "".join(rows) + "</table>")


def _accuracy_ci(acc: float, n) -> str:
    """The accuracy in bold, with its normal-approximation 95% interval over n pairs when n is known."""
    if not isinstance(n, int) or n < 1:
        return f"<b>{acc:.3f}</b>"
    half = 1.96 * math.sqrt(max(acc * (1 - acc), 0.0) / n)
    return f"<b>{acc:.3f}</b> [{max(acc - half, 0.0):.3f}, {min(acc + half, 1.0):.3f}]"


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
                badge = f'<div class="score">score {score:.3g}</div>' if score is not None else ""
                cells.append(f"<td><pre>{esc(text)}</pre>{badge}</td>")
            rows.append(f"<tr><td><pre>{esc(str(s['prompt']))}</pre></td>{''.join(cells)}</tr>")
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
        score = f"<div class='score'>score {r['score']:.3g}</div>" if isinstance(r.get("score"), (int, float)) else ""
        rows.append(f"<tr><td><pre>{esc(str(r.get('prompt', '')))}</pre></td>"
                    f"<td><pre>{esc(r['response'])}</pre>{score}{badge}</td></tr>")
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
    total = sum(st.seconds for st in stages if st.seconds is not None)
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
