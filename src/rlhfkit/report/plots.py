"""The report's figures (matplotlib, inline PNG): training curves, time split, win rates, length vs score.

Every figure is one metric per axes (a policy loss is never drawn on a value loss's scale), and
noisy per-step series are drawn raw and faint with a smoothed line over them.
"""

from __future__ import annotations

import base64
import html
import io
import math
import struct
import warnings

from rlhfkit.config.extras import require

matplotlib = require("matplotlib", "report", "the report (rlhfkit report, the pipeline's report.html)")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from rlhfkit.eval.stats import pearson  # noqa: E402
from rlhfkit.report.checks import REDUNDANT, higher_is_better  # noqa: E402
from rlhfkit.report.data import Stage, config_value, scorer_kind, series  # noqa: E402

DPI = 150  # rendered at 1.5x the displayed size: crisp on high-density screens
DISPLAY_DPI = 100
PANEL_SIZE = (4.2, 2.6)  # inches at DISPLAY_DPI: three panels side by side in a 1300 px page
COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]

# One panel per entry: (title, metric keys drawn together on one scale, y-axis label).
PANELS: list[tuple[str, list[str], str]] = [
    ("Reward", ["reward/score_mean", "objective/scores", "reward/mean", "score_mean"], "reward"),
    ("Gold score", ["reward/gold_mean", "gold/mean"], "gold score"),
    ("KL to reference", ["objective/kl"], "nats per response"),
    ("Response length", ["response/length_mean", "length/mean"], "tokens"),
    ("Responses ending with EOS", ["response/eos_frac"], "share of responses"),
    ("Policy entropy", ["policy/entropy"], "nats per token"),
    ("Policy loss", ["loss/policy"], "loss"),
    ("Value loss", ["loss/value"], "loss"),
    ("KL loss", ["loss/kl"], "loss"),
    ("Pretraining (ptx) loss", ["loss/ptx"], "loss"),
    ("Training loss", ["train/loss"], "loss"),
    ("DPO implicit rewards", ["train/rewards/chosen", "train/rewards/rejected", "rewards/chosen", "rewards/rejected"],
     "implicit reward"),
    ("DPO reward margin", ["train/rewards/margin", "rewards/margin"], "chosen - rejected"),
    ("Training accuracy", ["train/rewards/accuracy", "train/accuracy"], "share of pairs"),
    ("Held-out loss", ["eval/loss"], "loss"),
    ("Held-out accuracy", ["eval/accuracy", "eval/rewards/accuracy", "eval/accuracy_implicit"], "share of pairs"),
    ("Held-out proxy reward", ["eval/proxy_mean"], "reward"),
    ("Held-out KL to reference", ["eval/kl"], "nats per response"),
    ("Held-out response length", ["eval/length_mean"], "tokens"),
]
MAX_BARS = 120  # a time split of more iterations draws the mean of consecutive ones per bar


def plain(text: str) -> str:
    """A run's text as matplotlib shows it literally: ``$`` does not start mathtext, and a label
    starting with ``_`` is not hidden from the legend."""
    text = str(text).replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def to_img(fig, alt: str) -> str:
    """An <img> holding the figure as a base64 PNG, sized so it keeps its aspect ratio."""
    buf = io.BytesIO()
    with warnings.catch_warnings():  # a character the font lacks is drawn as a box, not reported per glyph
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from")
        fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    w, h = struct.unpack(">II", buf.getvalue()[16:24])  # the PNG header's IHDR chunk: width, height
    data = base64.b64encode(buf.getvalue()).decode()
    scale = DISPLAY_DPI / DPI
    return (f'<img class="plot" alt="{html.escape(alt)}" width="{round(w * scale)}" height="{round(h * scale)}" '
            f'src="data:image/png;base64,{data}">')


def smooth(ys: list[float], span: int) -> list[float]:
    """Exponential moving average with the start-up bias removed (as TensorBoard's smoothing):
    s_t = sum_k w^(t-k) y_k / sum_k w^(t-k), w = 1 - 2/(span+1)."""
    w = 1.0 - 2.0 / (span + 1)
    out, num, den = [], 0.0, 0.0
    for y in ys:
        num, den = w * num + y, w * den + 1.0
        out.append(num / den)
    return out


def _draw(ax, xs, ys, color, label, smoothed: bool) -> None:
    marker, label = "o" if len(xs) <= 40 else None, plain(label)
    if smoothed and len(ys) >= 5:
        ax.plot(xs, ys, color=color, alpha=0.3, lw=1, marker=marker, ms=2.5)
        span = max(3, len(ys) // 8)
        ax.plot(xs, smooth(ys, span), color=color, lw=2, label=f"{label} (faint: raw; line: EMA, span {span})")
    else:
        ax.plot(xs, ys, color=color, lw=1.5, marker=marker, ms=3.5, label=label)


def _step_axis(ax, steps: list) -> None:
    """Whole-number ticks; a single step gets a unit of room on each side instead of a 0.1 range."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if steps and min(steps) == max(steps):
        ax.set_xlim(steps[0] - 1, steps[0] + 1)


def metric_panel(title: str, ylabel: str, lines: list[tuple[str, list, list]], smoothed: bool, alt: str) -> str:
    fig, ax = plt.subplots(figsize=PANEL_SIZE)
    for i, (label, xs, ys) in enumerate(lines):
        _draw(ax, xs, ys, COLORS[i % len(COLORS)], label, smoothed)
    ax.set_title(plain(title), fontsize=10)
    _step_axis(ax, [x for _, xs, _ in lines for x in xs])
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.ticklabel_format(axis="y", useOffset=False)  # 10.824, not 0.004 and "+1.082e1" in the corner
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="best")
    return to_img(fig, alt)


def _held_out_panels(keys: set[str]) -> list[tuple[str, list[str], str]]:
    """A panel for every other held-out metric that has a direction (policy-gradient eval/*), and
    one for each breakdown (``eval/accuracy/<category>`` next to ``eval/accuracy``), its parts together."""
    known = {k for _, ks, _ in PANELS for k in ks}
    out = []
    for k in sorted(keys - known):
        better = higher_is_better(k) if k.startswith("eval/") else None
        if better is not None and not any(k.startswith(p + "/") for p in keys) and REDUNDANT.get(k) not in keys:
            name = k.removeprefix("eval/")
            out.append((f"Held-out {name} ({'higher' if better else 'lower'} is better)", [k], name))
    for parent in sorted(k for k in keys if k.startswith("eval/")):
        parts = sorted(k for k in keys if k.startswith(parent + "/"))
        if parts:
            out.append((f"Held-out {parent.removeprefix('eval/')} by category", parts, parent.removeprefix("eval/")))
    return out


def drawn_keys(keys: set[str]) -> set[str]:
    """The metrics of ``keys`` that `stage_panels` and `time_split` draw."""
    drawn = {k for _, ks, _ in PANELS + _held_out_panels(keys) for k in ks}
    return (drawn & keys) | {k for k in keys if k.startswith("time/") and "per_s" not in k}


def stage_panels(stage: str, runs: dict[str, Stage]) -> list[str]:
    """Every panel that the stage logged in any run (runs overlaid, one colour each)."""
    keys = {k for st in runs.values() for r in st.rows for k in r}
    out = []
    for title, metric_keys, ylabel in PANELS + _held_out_panels(keys):
        lines = []
        for run_name, st in runs.items():
            for k in metric_keys:
                xs, ys = series(st.rows, k)
                if ys:
                    lines.append((k if len(runs) == 1 else f"{run_name}: {k}", xs, ys))
        if lines:
            if title == "Reward":  # named by what scored it: a reward model, a reward function, ...
                kinds = {scorer_kind(config_value(st.config, "reward.spec") or config_value(st.config, "scorer"))
                         for st in runs.values()}
                title += f" ({kinds.pop()})" if len(kinds) == 1 and None not in kinds else ""
            held_out = all(k.startswith("eval/") for k in metric_keys)
            out.append(metric_panel(f"{stage}: {title}", ylabel, lines, not held_out, f"{stage} {title}"))
    return out


def time_split(run_name: str, st: Stage) -> str | None:
    """Stacked bars: where each iteration's wall time went (time/<phase> seconds). ``run_name``
    prefixes the title when several runs are compared ("" for one)."""
    phases = [k for k in dict.fromkeys(k for r in st.rows for k in r)
              if k.startswith("time/") and "per_s" not in k]
    data = {k: dict(zip(*series(st.rows, k))) for k in phases}
    steps = sorted({s for d in data.values() for s in d})
    if not steps:
        return None
    fig, ax = plt.subplots(figsize=(PANEL_SIZE[0] * 1.4, PANEL_SIZE[1]))
    per_bar = math.ceil(len(steps) / MAX_BARS)  # one bar per iteration, or per run of `per_bar` of them
    bins = [steps[i:i + per_bar] for i in range(0, len(steps), per_bar)]
    xs = [b[0] + (b[-1] - b[0]) / 2 for b in bins]
    width = 0.8 * (steps[-1] - steps[0] + 1) / len(bins) if per_bar > 1 else 0.8
    bottom = [0.0] * len(bins)
    total = sum(sum(d.values()) for d in data.values())
    for i, k in enumerate(phases):
        vals = [sum(data[k].get(s, 0.0) for s in b) / len(b) for b in bins]
        phase_total = sum(data[k].values())
        share = phase_total / total if total else 0.0
        ax.bar(xs, vals, bottom=bottom, color=COLORS[i % len(COLORS)], width=width,
               label=f"{k.removeprefix('time/')} ({share:.0%}, {phase_total / len(steps):.1f} s/iter)")
        bottom = [b + v for b, v in zip(bottom, vals)]
    where = f"{run_name}/{st.name}" if run_name and run_name != st.name else st.name
    ax.set_title(plain(f"{where}: where each iteration's time went"), fontsize=10)
    _step_axis(ax, steps)
    ax.set_xlabel("iteration" if per_bar == 1 else f"iteration (each bar: the mean of {per_bar})", fontsize=8)
    ax.set_ylabel("seconds", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return to_img(fig, f"{where} time split")


def winrate_plot(bars: list[tuple[str, float, float, float]]) -> str | None:
    """Horizontal bars: win rate over the baseline with its 95% interval; (label, rate, low, high)."""
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(PANEL_SIZE[0] * 1.2, 0.9 + 0.55 * len(bars)))
    ys = list(range(len(bars)))[::-1]
    for y, (label, wr, lo, hi) in zip(ys, bars):
        ax.barh(y, wr, color="#4c78a8", height=0.6)
        ax.errorbar(wr, y, xerr=[[wr - lo], [hi - wr]], color="black", capsize=4, lw=1.2)
    # the figures beside each name, where no bar or interval can cover them
    ax.set_yticks(ys, [plain(f"{b[0]}\n{b[1]:.3f} [{b[2]:.3f}, {b[3]:.3f}]") for b in bars], fontsize=8)
    ax.axvline(0.5, color="grey", ls="--", lw=1)
    ax.set_xlim(0, 1)
    ax.set_xlabel("win rate vs baseline (bar: 95% CI; dashed: no difference)", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    return to_img(fig, "win rates")


def scatter_label(name: str, xs: list[float], ys: list[float]) -> str:
    """A model's legend entry: Pearson r (left out where it is undefined: fewer than two points, or
    no spread) and the number of points."""
    r = pearson(xs, ys)
    return f"{name}: {f'r = {r:.2f}, ' if math.isfinite(r) else ''}n = {len(xs)}"


def scatter_plot(series_: list[tuple[str, list[tuple[float, float]]]]) -> str | None:
    """Response length against score, one colour per model, Pearson r in the legend."""
    if not series_:
        return None
    fig, ax = plt.subplots(figsize=(PANEL_SIZE[0] * 1.2, PANEL_SIZE[1] * 1.2))
    for i, (name, pts) in enumerate(series_):
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.scatter(xs, ys, s=7, alpha=0.5, color=COLORS[i % len(COLORS)], label=plain(scatter_label(name, xs, ys)))
    ax.set_xlabel("response length (characters)", fontsize=8)
    ax.set_ylabel("score", fontsize=8)
    ax.set_title("Length vs score (each point one response)", fontsize=10)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return to_img(fig, "length vs reward")
