"""``report.html``: one self-contained page per run directory (or several, compared).

    rlhfkit report RUN_DIR [RUN_DIR ...] [--out report.html]

Reads what the stages wrote (``*/metrics.jsonl``, ``eval*.json``, ``samples*.jsonl``) and draws
the curves people look at (reward, gold score, KL, length, losses over steps; win rates; the
length-reward scatter) as inline PNGs, plus a side-by-side table of responses from the starting
and trained policies. No network, no scripts: the file opens anywhere.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from rlhfkit.eval.stats import pearson

# Metric keys worth a plot, in the order they are shown; whichever a stage logged are drawn.
PLOT_GROUPS: list[tuple[str, list[str]]] = [
    ("Reward", ["reward/score_mean", "reward/gold_mean", "objective/scores", "reward/mean", "iter/score_mean"]),
    ("Gold score", ["reward/gold_mean", "eval/gold_mean", "gold/mean"]),
    ("KL to reference", ["objective/kl", "kl", "eval/kl"]),
    ("Response length", ["response/length_mean", "length/mean"]),
    ("Losses", ["train/loss", "loss/policy", "loss/value", "loss/total", "loss/ptx"]),
    ("Held-out", ["eval/loss", "eval/accuracy", "eval/rewards/accuracy", "eval/accuracy_implicit"]),
    ("DPO implicit rewards", ["rewards/chosen", "rewards/rejected", "rewards/margin", "train/rewards/margin"]),
]


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by a kill: skip it, the rest is fine
    return rows


def _fig_to_img(fig, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _stages(run: Path) -> list[Path]:
    """Stage directories of a pipeline run (or the run itself if it is a single stage)."""
    if (run / "metrics.jsonl").is_file():
        return [run]
    order = []
    pipe = run / "pipeline.yaml"
    if pipe.is_file():
        import yaml

        for s in (yaml.safe_load(pipe.read_text()) or {}).get("stages", []):
            name = s.get("name") or s.get("kind")
            if name and (run / name).is_dir():
                order.append(run / name)
    for p in sorted(run.iterdir()) if run.is_dir() else []:
        if p.is_dir() and p not in order and ((p / "metrics.jsonl").is_file() or list(p.glob("eval*.json"))):
            order.append(p)
    return order


def _numeric_series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r.get("step", len(xs)))
            ys.append(v)
    return xs, ys


def stage_plots(runs: dict[str, list[Path]]) -> list[str]:
    """One figure per metric group that any stage of any run logged; runs overlaid for comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    stage_names = sorted({s.name for stages in runs.values() for s in stages})
    for stage in stage_names:
        per_run = {r: _read_jsonl(next((s for s in st if s.name == stage), Path("/nonexistent")) / "metrics.jsonl")
                   for r, st in runs.items()}
        for title, keys in PLOT_GROUPS:
            present = [k for k in keys if any(_numeric_series(rows, k)[1] for rows in per_run.values())]
            if not present:
                continue
            fig, ax = plt.subplots(figsize=(5.2, 3.0))
            for run_name, rows in per_run.items():
                for k in present:
                    xs, ys = _numeric_series(rows, k)
                    if ys:
                        label = k if len(runs) == 1 else f"{run_name}: {k}"
                        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=label)
            ax.set_title(f"{stage}: {title}")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            out.append(_fig_to_img(fig, f"{stage} {title}"))
    return out


def _find_evals(stages: list[Path]) -> list[tuple[Path, dict]]:
    found = []
    for s in stages:
        for p in sorted(s.glob("eval*.json")):
            try:
                found.append((p, normalise_eval(p, json.loads(p.read_text()))))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                pass
    return found


def _mean(v: Any) -> Any:
    return v.get("mean") if isinstance(v, dict) else v


def normalise_eval(path: Path, ev: dict) -> dict:
    """``eval_results.json`` (+ its ``samples-*.jsonl``) -> what the report draws.

    policies: name -> flat metrics with ``win_rate`` / ``win_rate_ci`` (gold judge when present);
    length_reward: name -> [(characters, gold or proxy score)]; samples: side-by-side rows.
    """
    policies: dict[str, dict] = {}
    rows = [("baseline", ev.get("baseline") or {})] + list((ev.get("policies") or {}).items())
    for name, m in rows:
        flat = {}
        for k, v in m.items():
            if k in ("win_rate", "model"):
                continue
            v = _mean(v)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                flat[k] = v
        for judge, w in (m.get("win_rate") or {}).items():
            if isinstance(w, dict):
                flat[f"win_rate[{judge}]"] = w.get("win_rate")
        gold = (m.get("win_rate") or {}).get("gold") or next(iter((m.get("win_rate") or {}).values()), None)
        if isinstance(gold, dict):
            flat["win_rate"] = gold.get("win_rate")
            flat["win_rate_ci"] = [gold.get("ci_low"), gold.get("ci_high")]
        policies[name] = flat
    samples_by = {name: _read_jsonl(path.parent / f"samples-{name}.jsonl") for name, _ in rows}
    length_reward = {}
    for name, recs in samples_by.items():
        key = next((k for k in ("gold", "proxy") if recs and k in recs[0]), None)
        if key:
            length_reward[f"{name} ({key})"] = [(len(r["response"]), r[key]) for r in recs
                                                if isinstance(r.get(key), (int, float))]
    side = []
    names = [n for n, recs in samples_by.items() if recs]
    if len(names) > 1:
        n_rows = min(len(samples_by[n]) for n in names)
        stride = max(1, int(ev.get("samples_per_prompt") or 1))  # one sample per prompt in the table
        for i in range(0, n_rows, stride):
            row = {"prompt": samples_by[names[0]][i].get("prompt", "")}
            for n in names:
                rec = samples_by[n][i]
                row[n] = rec.get("response", "")
                sc = rec.get("gold", rec.get("proxy"))
                if isinstance(sc, (int, float)):
                    row[f"score_{n}"] = sc
            side.append(row)
    return {"policies": policies, "length_reward": length_reward, "samples": side, "raw": ev}


def winrate_plot(evals: dict[str, dict]) -> str | None:
    """Bar chart of win rates (with CI whiskers) of every policy in every eval JSON."""
    bars = []
    for run_name, ev in evals.items():
        for pol, m in (ev.get("policies") or {}).items():
            wr = m.get("win_rate")
            if isinstance(wr, (int, float)) and m.get("win_rate_ci") and None not in m["win_rate_ci"]:
                lo, hi = (m.get("win_rate_ci") or [wr, wr])[:2]
                bars.append((f"{run_name}:{pol}" if len(evals) > 1 else pol, wr, lo, hi))
    if not bars:
        return None
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 1.0 + 0.45 * len(bars)))
    names = [b[0] for b in bars]
    vals = [b[1] for b in bars]
    err = [[b[1] - b[2] for b in bars], [b[3] - b[1] for b in bars]]
    ax.barh(names, vals, xerr=err, color="#4c78a8", capsize=3)
    ax.axvline(0.5, color="grey", ls="--", lw=1)
    ax.set_xlim(0, 1)
    ax.set_xlabel("win rate vs starting policy (95% CI)")
    return _fig_to_img(fig, "win rates")


def scatter_plot(evals: dict[str, dict]) -> str | None:
    """Length vs reward over samples, per policy, with the Pearson r in the legend."""
    import matplotlib.pyplot as plt

    series = []
    for run_name, ev in evals.items():
        for pol, pts in (ev.get("length_reward") or {}).items():
            if pts:
                series.append((pol if len(evals) == 1 else f"{run_name}:{pol}", pts))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for name, pts in series:
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        r = pearson(xs, ys)
        ax.scatter(xs, ys, s=6, alpha=0.5, label=f"{name} (r={r:.2f})")
    ax.set_xlabel("response length (characters)")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _fig_to_img(fig, "length vs reward")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) for x in v):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return html.escape(str(v))


def metrics_table(evals: dict[str, dict]) -> str:
    rows = []
    keys: list[str] = []
    for run_name, ev in evals.items():
        for pol, m in (ev.get("policies") or {}).items():
            flat = {k: v for k, v in m.items() if isinstance(v, (int, float, str, list)) and not isinstance(v, bool)}
            flat = {k: v for k, v in flat.items() if not isinstance(v, list) or len(v) <= 3}
            rows.append((run_name, pol, flat))
            keys += [k for k in flat if k not in keys]
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join(
        f"<tr><td>{html.escape(r)}</td><td>{html.escape(p)}</td>" + "".join(f"<td>{_fmt(m.get(k, ''))}</td>" for k in keys) + "</tr>"
        for r, p, m in rows)
    return f"<table><tr><th>run</th><th>policy</th>{head}</tr>{body}</table>"


def samples_table(evals: dict[str, dict], limit: int = 12) -> str:
    """Side by side: the same prompts answered by the starting and the trained policy."""
    parts = []
    for run_name, ev in evals.items():
        samples = ev.get("samples") or []
        if not samples:
            continue
        cols = [k for k in samples[0] if k not in ("prompt",) and not k.startswith("score")]
        text_cols = [c for c in cols if isinstance(samples[0][c], str)]
        head = "".join(f"<th>{html.escape(c)}</th>" for c in text_cols)
        rows = []
        for s in samples[:limit]:
            cells = []
            for c in text_cols:
                score = s.get(f"score_{c}")
                badge = f'<div class="score">score {score:.3g}</div>' if isinstance(score, (int, float)) else ""
                cells.append(f"<td><pre>{html.escape(s[c])}</pre>{badge}</td>")
            rows.append(f"<tr><td><pre>{html.escape(str(s.get('prompt', '')))}</pre></td>{''.join(cells)}</tr>")
        parts.append(f"<h3>{html.escape(run_name)}</h3><table class='samples'><tr><th>prompt</th>{head}</tr>{''.join(rows)}</table>")
    return "".join(parts)


CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{margin-bottom:4px}.sub{color:#666;margin-top:0}.grid{display:flex;flex-wrap:wrap;gap:12px}
img.plot{border:1px solid #ddd;border-radius:4px;background:#fff}
table{border-collapse:collapse;margin:8px 0;font-size:13px}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}
th{background:#f3f3f3}pre{white-space:pre-wrap;margin:0;font-family:inherit;max-width:420px}.score{color:#666;font-size:11px;margin-top:4px}
.summary{background:#f6f8fa;border:1px solid #ddd;padding:8px 12px;border-radius:4px}"""


def build_report(runs: list[str | Path], out: str | Path | None = None) -> Path:
    """Write ``report.html`` for one run (into it) or a comparison of several (``out`` required)."""
    runs = [Path(r) for r in runs]
    for r in runs:
        if not r.is_dir():
            raise FileNotFoundError(f"run directory not found: {r}")
    names = [r.name or str(r) for r in runs]
    staged = {n: _stages(r) for n, r in zip(names, runs)}
    evals = {}
    for n, st in staged.items():
        for path, ev in _find_evals(st):
            evals[n if len(_find_evals(st)) == 1 else f"{n}/{path.parent.name}"] = ev
    summary = ""
    for n, r in zip(names, runs):
        sp = r / "pipeline_summary.json"
        if sp.is_file():
            s = json.loads(sp.read_text())
            items = "".join(f"<li>{html.escape(k)}: {_fmt(v)}</li>" for k, v in (s.get("headline") or {}).items())
            summary += f"<div class='summary'><b>{html.escape(n)}</b><ul>{items}</ul></div>"
    sections = [f"<h1>rlhfkit report</h1><p class='sub'>{html.escape(', '.join(str(r) for r in runs))}</p>", summary]
    wr, sc = winrate_plot(evals), scatter_plot(evals)
    if evals:
        sections.append("<h2>Evaluation</h2>" + metrics_table(evals))
        sections.append("<div class='grid'>" + "".join(x for x in (wr, sc) if x) + "</div>")
    plots = stage_plots(staged)
    if plots:
        sections.append("<h2>Training curves</h2><div class='grid'>" + "".join(plots) + "</div>")
    st = samples_table(evals)
    if st:
        sections.append("<h2>Responses: starting vs trained policy</h2>" + st)
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>rlhfkit report</title>"
            f"<style>{CSS}</style></head><body>{''.join(sections)}</body></html>")
    target = Path(out) if out else runs[0] / "report.html"
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(page)
    tmp.replace(target)
    return target
