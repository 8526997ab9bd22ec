"""Warnings a report puts at its top: things in a run's numbers that a user should not miss.

- truncation: a large share of sampled responses hit ``max_new_tokens`` without an EOS token, so
  the reward model and the judges scored cut-off text (PPO/GRPO ``response/eos_frac``, and the
  ``eos_frac`` of each model in ``eval_results.json``);
- held-out metric worse: a stage's ``eval/<name>`` got worse from its first to its last
  evaluation, judged by the per-metric direction table `DIRECTIONS`;
- KL spike: ``objective/kl`` jumped well above every one of the preceding few iterations (by a
  robust z-score, half their maximum and a nat: `kl_spikes`);
- unfinished: a stage (a folder with a command's config) with no results file
  (``<kind>_results.json``): it stopped (a crash, a kill, too many non-finite updates) or is
  still running, so it has no final model or results;
- unreadable: an ``eval*.json`` that could not be read (half written, not an evaluation), a stage's
  results file that is not a JSON object, a ``metrics.jsonl`` with no readable record: what it
  holds is not shown;
- skipped updates: updates dropped for a non-finite loss or gradient (``train/skipped_steps``);
- not started: a stage of the pipeline (``pipeline.yaml``) with no folder: the pipeline stopped
  before it;
- worse than the baseline: an evaluated policy whose win rate's whole 95% interval, by some judge,
  lies below one half.

Each warning is a JSON-able dict: ``kind``, ``run``, ``stage``, ``message`` and the figures the
message quotes.
"""

from __future__ import annotations

import json
import statistics
from fnmatch import fnmatch
from pathlib import Path

from rlhfkit.report.data import Stage, config_value, pipeline_kinds, read_json, series

# the order warnings are listed in
KINDS = ("unfinished", "not_started", "unreadable", "skipped_steps", "worse_than_baseline", "truncation", "kl_spike",
         "held_out_worse")
TRUNCATION_SHARE = 0.2  # a larger share of responses cut at the token cap gets a warning

# Which way is better for a held-out metric (the name after "eval/"); the first matching pattern
# wins. None: not a quality measure (sizes, lengths, KL, the DPO rewards of each side alone).
DIRECTIONS: list[tuple[str, bool | None]] = [
    ("*tokens*", None), ("*pairs*", None), ("*samples*", None), ("*count*", None), ("*prompts*", None),
    ("*length*", None), ("*kl*", None), ("*entropy*", None), ("*time*", None), ("*_std", None),
    ("rewards/chosen", None), ("rewards/rejected", None),
    ("*loss*", False), ("*ppl*", False), ("*perplexity*", False), ("*empty_frac*", False), ("*error*", False),
    ("*accuracy*", True), ("*margin*", True), ("*win_rate*", True), ("*reward*", True), ("*score*", True),
    ("*gold*", True), ("*eos_frac*", True), ("*distinct*", True),
]


# A held-out metric that is a monotone function of another one says nothing new: left out when both are logged.
REDUNDANT = {"eval/ppl": "eval/loss"}
# What a held-out metric is averaged over, when the stage logs it: quoted with the change.
# A move smaller than this share of the values (and than the floor) is not called a fall: DPO's
# loss at ln 2 moving in its fourth decimal, a margin of 0 becoming -4e-5.
NOISE, NOISE_FLOOR = 1e-3, 1e-4
SET_SIZES = {"eval/pairs": "pairs", "eval/prompts": "prompts", "eval/samples": "samples", "eval/tokens": "tokens"}


def higher_is_better(metric: str) -> bool | None:
    """Direction of ``eval/<name>`` (or ``<name>``): True, False, or None when it is not a quality
    measure or unknown (then no warning is raised about it)."""
    name = metric.removeprefix("eval/")
    return next((d for pattern, d in DIRECTIONS if fnmatch(name, pattern)), None)


def held_out_trends(rows: list[dict]) -> list[dict]:
    """First and last value of every ``eval/*`` series with at least two evaluations.

    A breakdown (``eval/accuracy/<category>`` next to ``eval/accuracy``) is left out: its few
    examples per category make start-to-end moves mostly noise, and the total covers them.
    """
    keys = sorted({k for r in rows for k in r if k.startswith("eval/")})
    size = next(((unit, series(rows, k)[1][-1]) for k, unit in SET_SIZES.items() if series(rows, k)[1]), None)
    out = []
    for k in keys:
        if any(k.startswith(parent + "/") for parent in keys if parent != k) or REDUNDANT.get(k) in keys:
            continue
        xs, ys = series(rows, k)
        if len(ys) < 2:
            continue
        better = higher_is_better(k)
        change = ys[-1] - ys[0]
        noise = max(NOISE * max(abs(ys[0]), abs(ys[-1])), NOISE_FLOOR)  # float rounding, not a fall
        worse = better is not None and abs(change) > noise and (change < 0 if better else change > 0)
        out.append({"metric": k, "first_step": xs[0], "last_step": xs[-1], "first": ys[0], "last": ys[-1],
                    "higher_is_better": better, "worse": worse,
                    "set_size": f"{size[1]:.0f} {size[0]}" if size else None})
    return out


def kl_spikes(steps: list[float], kl: list[float], window: int = 5, min_history: int = 3,
              z: float = 4.0, rise: float = 0.5, min_jump: float = 1.0) -> list[dict]:
    """Iterations whose KL is well above every one of the ``window`` before it.

    "Well above": the jump over that window's maximum exceeds z robust standard deviations of
    the window (1.4826 * median absolute deviation), ``rise`` times the maximum's magnitude, and
    ``min_jump`` nats. Measured from the recent maximum rather than the level, a climb that is
    noisy (PPO's KL, rising from 0 to several nats over a run, moves up and down by a nat between
    iterations) is not a spike, nor are noise around a flat level or moves of a fraction of a nat
    in a sequence KL; a jump to 1.5x everything recent, by a nat or more, is.
    """
    out = []
    for i in range(min_history, len(kl)):
        hist = kl[max(0, i - window):i]
        level, top = statistics.median(hist), max(hist)
        spread = 1.4826 * statistics.median(abs(v - level) for v in hist)
        jump = kl[i] - top
        if jump > max(z * spread, rise * abs(top), min_jump):
            out.append({"step": steps[i], "kl": kl[i], "recent_max": top})
    return out


def summary_messages(warnings: list[dict]) -> list[str]:
    """The warnings' messages for a terminal summary: each on its own line, except that the
    truncation warnings of one token cap (a training stage's, each evaluated model's) share one."""
    lines: list = []
    caps: dict = {}  # cap -> its merged line's place in `lines` and its parts
    for w in warnings:
        if w["kind"] != "truncation":
            lines.append(w["message"])
            continue
        cap = w.get("max_new_tokens")
        if cap not in caps:
            caps[cap] = (len(lines), [])
            lines.append(None)
        last = f" (last {w['last_share']:.0%})" if "last_share" in w else ""
        caps[cap][1].append(f"{w['stage']} {w.get('model') or 'training'} {w['share']:.0%}{last}")
    for cap, (at, parts) in caps.items():
        lines[at] = (f"responses hit {_cap_text(cap)} without an EOS token, so cut-off text was scored: "
                     f"{', '.join(parts)}. Raise max_new_tokens or reward finishing.")
    return lines


def _cap_text(cap) -> str:
    return f"the {cap}-token cap (max_new_tokens)" if cap else "max_new_tokens"


def _truncation(where: str, share: float, detail: str, cap) -> str:
    return (f"{where}: {share:.0%} of responses ({detail}) hit {_cap_text(cap)} without an EOS token, so "
            f"cut-off text was scored. Raise max_new_tokens or reward finishing.")


def _selected_best(st: Stage) -> dict | None:
    """The checkpoint ``train.select_best`` kept as the stage's final model (from its results file)."""
    best = read_json(st.path / f"{st.kind}_results.json").get("best")
    return best if isinstance(best, dict) and {"step", "metric", "value"} <= best.keys() else None


def _is_object(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text()), dict)
    except (OSError, ValueError, RecursionError):
        return False


def _ending(st: Stage, base: dict) -> list[dict]:
    """A stage that has no results file, and updates skipped for non-finite values."""
    out = []
    # the results file a command writes last, named after its kind (online-dpo -> online_dpo_results.json; a pm
    # run's own SFT step writes sft_results.json first, which does not count)
    results = f"{st.kind.replace('-', '_')}_results.json"
    if st.kind and not (st.path / results).is_file():
        last = max((r.get("step", 0) for r in st.rows if isinstance(r.get("step"), int)), default=None)
        after = f"it stopped after step {last}" if last is not None else "it stopped"
        out.append({**base, "kind": "unfinished", "last_step": last,
                    "message": f"{st.name}: no results file ({results}), so the stage did not finish: {after} (see its "
                               "log) or is still running, and has no final model or results."})
    elif st.kind and st.kind != "eval" and not _is_object(st.path / results):  # an evaluation's: `find_evals`
        out.append({**base, "kind": "unreadable", "path": str(st.path / results),
                    "message": f"{st.name}: {results} does not read as a results file (a JSON object): damaged or "
                               "edited by hand, so the stage's final metrics are not shown."})
    metrics = st.path / "metrics.jsonl"
    if not st.rows and metrics.is_file() and metrics.stat().st_size:
        out.append({**base, "kind": "unreadable", "path": str(metrics),
                    "message": f"{st.name}: metrics.jsonl holds no readable record, so no curve of the stage is "
                               "shown."})
    _, skipped = series(st.rows, "train/skipped_steps")
    if skipped and skipped[-1] > 0:
        out.append({**base, "kind": "skipped_steps", "skipped": int(skipped[-1]),
                    "message": f"{st.name}: {int(skipped[-1])} update(s) skipped for a non-finite loss or "
                               "gradient (train/skipped_steps); lower the learning rate or check the data."})
    return out


def stage_warnings(run: str, st: Stage) -> list[dict]:
    """A stage that did not finish or skipped updates, truncation during policy-gradient training,
    held-out metrics that got worse, KL spikes."""
    base = {"run": run, "stage": st.name}
    out = _ending(st, base)
    _, eos = series(st.rows, "response/eos_frac")
    if eos:
        share = 1.0 - sum(eos) / len(eos)
        if share >= TRUNCATION_SHARE:
            cap = config_value(st.config, "rollout.max_new_tokens")
            out.append({**base, "kind": "truncation", "share": share, "max_new_tokens": cap,
                        "iterations": len(eos), "last_share": 1.0 - eos[-1],
                        "message": _truncation(f"{st.name} training", share, f"mean over {len(eos)} "
                                               f"iterations, last {1.0 - eos[-1]:.0%}", cap)})
    best = _selected_best(st)
    for t in held_out_trends(st.rows):
        if t["worse"]:
            verb = "fell" if t["higher_is_better"] else "rose"
            on = f" on {t['set_size']}" if t["set_size"] else ""
            better = "higher" if t["higher_is_better"] else "lower"
            kept = (f" The final model is step {best['step']}'s, the best {best['metric']} ({best['value']:.4g}; "
                    f"train.select_best)." if best else "")
            out.append({**base, "kind": "held_out_worse", **t, "kept_step": best.get("step") if best else None,
                        "message": f"{st.name}: held-out {t['metric']} {verb} from {t['first']:.4g} (step "
                                   f"{t['first_step']}) to {t['last']:.4g} (step {t['last_step']}){on}; "
                                   f"{better} is better.{kept}"})
    steps, kl = series(st.rows, "objective/kl")
    spikes = kl_spikes(steps, kl)
    if spikes:
        where = ", ".join(f"step {s['step']}: {s['kl']:.3g} after at most {s['recent_max']:.3g}" for s in spikes)
        out.append({**base, "kind": "kl_spike", "spikes": spikes,
                    "message": f"{st.name}: KL to the reference jumped well above the iterations before it "
                               f"({where} nats)."})
    return out


def not_started(run: str, path: Path, stages: list[Stage]) -> list[dict]:
    """The stages of a pipeline (``pipeline.yaml``) that have no folder: it stopped before them."""
    seen = {st.name for st in stages}
    return [{"run": run, "stage": name, "kind": "not_started",
             "message": f"{name}: the pipeline's {kind} stage has not run (no folder {path / name}): the pipeline "
                        "stopped before it, so its results are missing."}
            for name, kind in pipeline_kinds(path).items() if name not in seen]


def eval_warnings(run: str, st: Stage, ev: dict) -> list[dict]:
    """A policy that loses to the baseline beyond its interval, by any judge; truncation among the
    evaluation samples of each model (baseline included)."""
    out = []
    for name, m in ev["policies"].items():
        for judge, w in (m.get("win_rate") or {}).items() if name != "baseline" else ():
            rate, low, high = (w.get(k) if isinstance(w, dict) else None for k in ("win_rate", "ci_low", "ci_high"))
            if all(isinstance(v, (int, float)) for v in (rate, low, high)) and high < 0.5:
                out.append({"run": run, "stage": st.name, "kind": "worse_than_baseline", "model": name, "judge": judge,
                            **{k: w.get(k) for k in ("win_rate", "ci_low", "ci_high", "n")},
                            "message": f"{st.name}, {name}: loses to the baseline by {judge}: win rate "
                                       f"{rate:.3f} [95% CI {low:.3f}, {high:.3f}] over "
                                       f"{w.get('n')} prompts, the whole interval below 0.5."})
    cap = config_value(st.config, "rollout.max_new_tokens")
    for name, m in ev["policies"].items():
        eos, n = m.get("eos_frac"), m.get("samples")
        if isinstance(eos, (int, float)) and 1.0 - eos >= TRUNCATION_SHARE:
            share = 1.0 - eos
            detail = f"{round(share * n)} of {n} samples" if isinstance(n, int) else "evaluation samples"
            out.append({"run": run, "stage": st.name, "kind": "truncation", "model": name, "share": share,
                        "samples": n, "max_new_tokens": cap,
                        "message": _truncation(f"{st.name}, {name}", share, detail, cap)})
    return out
