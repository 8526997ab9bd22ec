"""The evaluation's tables in the report: every model against the baseline (win rates, scores,
KL, length, truncation), the alignment tax, the models, and judges' accuracy on a labelled
preference set, overall and by category."""

from __future__ import annotations

from rlhfkit.report.checks import TRUNCATION_SHARE
from rlhfkit.report.sections import accuracy_ci, esc, judge_label, num, with_ci


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
                 {n: f"{m['length_tokens']:.1f} tokens" + (f", {m['length_chars']:.0f} characters"
                                                           if isinstance(m.get("length_chars"), (int, float)) else "")
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
                shown = f"{delta:+.3f}"
                if float(shown) == 0:  # a change below the shown precision is not called worse or better
                    shown, verdict = "&plusmn;0.000", ""
                else:
                    verdict = "" if higher is None else " (worse)" if (delta > 0) != higher else " (better)"
                change = f"<div class='ci'>{shown} vs baseline{verdict}</div>"
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
    """Each judge's accuracy on the labelled preference set with its interval, then by category."""
    ps = {j: r for j, r in (ev["raw"].get("preference_set") or {}).items() if isinstance(r, dict)} \
        if isinstance(ev["raw"].get("preference_set"), dict) else {}
    if not ps:
        return ""
    rows = "".join(f"<tr><td>{esc(judge_label(j, ev))}</td><td>{accuracy_ci(r.get('accuracy'), r.get('pairs'))}</td>"
                   f"<td>{esc(str(r.get('pairs', '?')))}</td>"
                   f"<td>{num(r.get('margin')) if 'margin' in r else ''}</td></tr>"
                   for j, r in ps.items())
    out = ("<h4>Accuracy on the labelled preference set</h4><table><tr><th>judge</th><th>accuracy [95% CI]</th>"
           f"<th>pairs</th><th>mean margin (reward of chosen - rejected)</th></tr>{rows}</table>")
    cats = {j: r["by_category"] for j, r in ps.items() if isinstance(r.get("by_category"), dict)}
    names = list(dict.fromkeys(c for by in cats.values() for c in by))
    if names:
        head = "".join(f"<th>{esc(judge_label(j, ev))}</th>" for j in cats)
        body = "".join(f"<tr><td>{esc(str(c))}</td>" + "".join(
            f"<td>{accuracy_ci(by[c].get('accuracy'), by[c].get('pairs'))} (n = {esc(str(by[c].get('pairs', '?')))})"
            "</td>" if isinstance(by.get(c), dict) else "<td>&mdash;</td>" for by in cats.values()) + "</tr>"
            for c in names)
        out += f"<table><tr><th>category</th>{head}</tr>{body}</table>"
    return out
