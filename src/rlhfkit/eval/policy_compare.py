"""``rlhfkit eval``: policies against a baseline policy on held-out prompts (docs/concepts.md: Evaluation).

    rlhfkit eval policies='[runs/dpo/model, online=runs/odpo/model]' baseline=smollm2-135m-instruct \
        proxy=rm:runs/rm judges='[pm:runs/pm]' rollout.n=4

For the baseline and each policy, n responses per held-out prompt are sampled with the shared
rollout engine (same seed for every model), then:
- win rate against the baseline's responses to the same prompts, by the gold judge, the proxy
  reward and every extra judge (pairwise judges score both orders); sample i of the policy meets
  sample i of the baseline; the 95% interval treats the *prompt* as the unit (per-prompt mean
  of the n votes), so several samples per prompt do not fake precision;
- mean gold and proxy reward, mean response length (tokens and characters);
- KL(pi || baseline): k1 summed over response tokens, averaged over the policy's own samples,
  both models' log-probs at the sampling temperature T: an unbiased estimate of KL(pi_T || baseline_T);
- Pearson correlation of response length (characters) with gold and proxy reward, pooled and
  within prompt (needs n >= 2);
- with ``preference_set``: accuracy of the proxy and of every judge on that set, by category.
Writes ``eval_results.json`` and one ``samples-NAME.jsonl`` per model; prints a table.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from rlhfkit.config import ConfigError, dump_config, under_key, validate
from rlhfkit.data import length_batches, load_preference
from rlhfkit.data.sources import resolve_source
from rlhfkit.eval.alignment_tax import AlignmentTax, tax_deltas
from rlhfkit.eval.config import EvalConfig, policy_label
from rlhfkit.eval.preference_sets import judge_accuracy, reward_accuracy
from rlhfkit.eval.stats import (
    mean_ci,
    pearson,
    prob_indicators,
    win_indicators,
    win_rate,
    within_group_pearson,
)
from rlhfkit.io import write_json_atomic
from rlhfkit.judges.preference import build_pairwise_judge, is_pairwise_spec
from rlhfkit.judges.rewards import build_reward_fn
from rlhfkit.models import load_causal_lm, load_tokenizer
from rlhfkit.models.forward import causal_logprobs
from rlhfkit.models.loading import check_context_length
from rlhfkit.models.lora import tokenizer_source
from rlhfkit.rng import set_seed
from rlhfkit.rollout import decode_responses, load_prompt_items, rollout
from rlhfkit.training.fingerprint import default_sources, fingerprint
from rlhfkit.training.rundir import check_apart, other_runs
from rlhfkit.training.runlock import hold, release

log = logging.getLogger("rlhfkit")

def build_judges(cfg: EvalConfig, tokenizer, device) -> dict:
    """name -> ("point", RewardFn) or ("pair", judge); gold and proxy first."""
    out = {}
    for key, spec in cfg.judge_specs():
        name = spec if key == "judges" else key
        if is_pairwise_spec(spec):
            out[name] = ("pair", build_pairwise_judge(spec, device=device, batch_size=cfg.batch_size,
                                                      seed=cfg.train.seed))
        else:
            out[name] = ("point", build_reward_fn(spec, tokenizer=tokenizer, device=device, batch_size=cfg.batch_size))
    return out


@torch.no_grad()
def kl_to_baseline(baseline, exp, batch_size: int) -> list[float]:
    """Per-sample k1 KL estimate sum_t log pi(a_t) - log base(a_t) on the policy's own samples, both at
    the sampling temperature (`Experience.temperature`): an estimate of KL(pi_T || base_T).
    Rows of similar length are batched together and each batch is cut to the columns its rows
    use (positions come from the mask, so dropping all-padding columns changes nothing)."""
    P = exp.prompt_ids.shape[1]
    ids, mask = exp.input_ids(), exp.attention_mask()
    out = [0.0] * len(exp)
    for rows in length_batches(mask.sum(-1).tolist(), batch_size):
        idx = torch.tensor(rows, device=ids.device)
        m = mask[idx]
        used = m.any(0).nonzero().squeeze(1)
        lo, hi = int(used[0]), int(used[-1]) + 1
        r = max(hi - P, 0)  # response columns any row of the batch uses
        if r == 0:
            continue
        base = causal_logprobs(baseline, ids[idx, lo:hi], m[:, lo:hi], keep_last=r, shared_prefix=exp.shared_prefix,
                               temperature=exp.temperature)
        diff = torch.where(exp.response_mask[idx, :r].bool(), exp.logprobs[idx, :r] - base, 0.0)
        for i, v in zip(rows, diff.sum(-1).tolist()):
            out[i] = v
    return out


def sample_and_score(model, items, cfg: EvalConfig, tokenizer, judges: dict) -> dict:
    """n responses per prompt from ``model`` and their pointwise scores."""
    set_seed(cfg.train.seed)  # common random numbers across models
    exp = rollout(model, items, cfg.rollout, tokenizer)
    responses = decode_responses(exp, tokenizer)
    rows = [items[i] for i in exp.prompt_index.tolist()]
    fields = [r.fields for r in rows]
    scores = {name: fn([r.text for r in rows], responses, messages=[r.messages for r in rows], fields=fields)
              for name, (kind, fn) in judges.items() if kind == "point"}
    return {"exp": exp, "rows": rows, "responses": responses, "scores": scores,
            "tokens": exp.response_lengths().tolist(), "chars": [len(r) for r in responses]}


def per_prompt(values: list[float], n: int) -> list[float]:
    """Mean of each prompt's n values (the unit of the confidence interval)."""
    return [sum(values[g:g + n]) / n for g in range(0, len(values), n)]


def summarize(s: dict, n: int) -> dict:
    """Means, lengths and length-reward correlations of one model's samples."""
    out = {"length_tokens": sum(s["tokens"]) / len(s["tokens"]), "length_chars": sum(s["chars"]) / len(s["chars"]),
           "eos_frac": s["exp"].eos.float().mean().item(), "samples": len(s["responses"])}
    for name, sc in s["scores"].items():
        out[f"{name}_mean"] = mean_ci(per_prompt(sc, n))
        out[f"corr_length_{name}"] = pearson(s["chars"], sc)
        if n > 1:
            out[f"corr_length_{name}_within_prompt"] = within_group_pearson(s["chars"], sc, n)
    return out


def win_rates(pol: dict, base: dict, judges: dict, n: int) -> dict:
    """Win rate of the policy's sample i over the baseline's sample i, per judge. Two identical
    responses are a tie whatever the judge says (a reward model's scores of the same text can
    differ in the last bits with the other rows of its batch)."""
    same = [a == b for a, b in zip(pol["responses"], base["responses"])]
    out = {}
    for name, (kind, judge) in judges.items():
        if kind == "point":
            votes = win_indicators(pol["scores"][name], base["scores"][name])
        else:
            _restart(judge)
            ctx = [judge.context(r.messages) for r in pol["rows"]]
            votes = prob_indicators(judge.compare(ctx, pol["responses"], base["responses"],
                                                  fields=[r.fields for r in pol["rows"]]))
        out[name] = win_rate([0.5 if tie else v for tie, v in zip(same, votes)], per_prompt=n)
    return out


def preference_set_accuracy(examples: list, judges: dict) -> dict:
    """Accuracy of every judge (gold, proxy and the others) on the labelled preference set."""
    out = {}
    for name, (kind, judge) in judges.items():
        _restart(judge)
        out[name] = reward_accuracy(judge, examples) if kind == "point" else judge_accuracy(judge, examples)
    return out


def _restart(judge) -> None:
    """A judge that draws labels (the simulated annotator) starts its stream again, so that a
    policy's labels do not depend on which policies were compared before it."""
    restart = getattr(judge, "restart", None)
    if callable(restart):
        restart()


# --------------------------------------------------------------------------- the command

def run_eval(cfg: EvalConfig, strategy=None) -> dict:
    """Evaluate every policy against the baseline (on one process); returns what
    ``eval_results.json`` holds."""
    validate(cfg)  # a config changed in Python after load_config is checked as a loaded one is
    device = strategy.device if strategy is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    n = cfg.rollout.n

    # 1. Every input read or checked before anything is written or a model loads: what a pipeline
    # checks before its first stage (`EvalConfig.inputs`), then what needs the tokenizer.
    for key, value, check in cfg.inputs():
        if value:
            with under_key(key):
                check()
    tokenizer = load_tokenizer(cfg.baseline)
    _check_tokenizers(cfg, tokenizer)
    p = cfg.prompts
    items, dropped = load_prompt_items(p.train, tokenizer, max_prompt_length=p.max_prompt_length, limit=p.limit,
                                       kind="prompts_eval")
    pairs = load_preference(resolve_source(cfg.preference_set, "preference")) if cfg.preference_set else []
    tax = AlignmentTax(cfg.alignment_tax, tokenizer, cfg.batch_size, device)
    for key, name in [("baseline", cfg.baseline), *(("policies", policy_label(spec)[1]) for spec in cfg.policies)]:
        with under_key(key):
            check_context_length(name, p.max_prompt_length + cfg.rollout.max_new_tokens,
                                 "prompts.max_prompt_length + rollout.max_new_tokens")
            if cfg.alignment_tax.sft_data:
                check_context_length(name, cfg.alignment_tax.max_length, "alignment_tax.max_length")

    # 2. Judges and the baseline's samples.
    out = Path(cfg.train.output_dir)
    _check_output_dir(out, cfg)
    out.mkdir(parents=True, exist_ok=True)
    hold(out, ConfigError)  # one process per output directory (`training.runlock`)
    _clear_previous(out)
    dump_config(cfg, out / "eval_config.yaml")
    # what it evaluated, by content: a pipeline redoes or refuses a finished evaluation whose inputs changed
    write_json_atomic(out / "eval_run.json", fingerprint(cfg, "eval", default_sources(cfg)))
    judges = build_judges(cfg, tokenizer, device)
    baseline = load_causal_lm(cfg.baseline).to(device).eval()
    base = sample_and_score(baseline, items, cfg, tokenizer, judges)
    _write_samples(out / "samples-baseline.jsonl", base)
    results = {"baseline": {"model": cfg.baseline, **summarize(base, n)}, "prompts": len(items),
               "prompts_dropped_too_long": dropped, "samples_per_prompt": n, "policies": {}}
    if tax.enabled:
        results["alignment_tax"] = tax.described()
        results["baseline"]["alignment_tax"] = tax.measure(baseline)

    # 3. Each policy: samples, scores, KL to the baseline, win rates.
    for spec in cfg.policies:
        label, path = policy_label(spec)
        results["policies"][label] = _evaluate_policy(cfg, path, out / f"samples-{label}.jsonl", items, tokenizer,
                                                      judges, baseline, base, results["baseline"], tax, device)

    # 4. Reward-model / judge accuracy on a labelled set.
    if pairs:
        results["preference_set"] = preference_set_accuracy(pairs, judges)
    write_json_atomic(out / "eval_results.json", results)
    release(out)
    print(format_table(results))
    return results


def _check_tokenizers(cfg: EvalConfig, tokenizer) -> None:
    """Every model is prompted, decoded and scored with the baseline's tokenizer and chat template: a
    policy whose vocabulary differs is refused (its KL would compare other tokens), one whose chat
    template differs is warned about (it is prompted in a format it was not trained on)."""
    for spec in cfg.policies:
        path = policy_label(spec)[1]
        try:
            theirs = load_tokenizer(tokenizer_source(path))  # an adapter saved without one: its base's
        except (OSError, ValueError):  # not readable here (a hub id not cached): the model's loading says so
            continue
        if theirs.get_vocab() != tokenizer.get_vocab():
            raise ConfigError(f"policies: {path}'s tokenizer has another vocabulary than the baseline's "
                              f"({cfg.baseline}), with which every model is prompted and scored: compare models "
                              "that share a tokenizer")
        if getattr(theirs, "chat_template", None) != getattr(tokenizer, "chat_template", None):
            log.warning("policies: %s's chat template differs from the baseline's (%s): every model is prompted "
                        "with the baseline's", path, cfg.baseline)


def _check_output_dir(out: Path, cfg: EvalConfig) -> None:
    """An evaluation writes into a directory of its own: not a training run's (its report would
    show the evaluation under the run's config), not one of the models or files it reads."""
    others = other_runs(out, "eval") if out.is_dir() else []
    if others:
        raise ConfigError(f"train.output_dir: {out} holds a run of `rlhfkit {others[0].replace('_', '-')}` "
                          f"({others[0]}_run.json): write the evaluation into a directory of its own")
    check_apart(out, cfg.fingerprint_sources(), written=())  # it writes samples and results, no model


def _evaluate_policy(cfg: EvalConfig, path: str, samples_file: Path, items, tokenizer, judges, baseline, base: dict,
                     base_results: dict, tax: AlignmentTax, device) -> dict:
    """One policy's samples (written to ``samples_file``), scores, KL to the baseline, win rates
    against the baseline's samples ``base``, and its alignment tax against the baseline's."""
    n = cfg.rollout.n
    model = load_causal_lm(path).to(device).eval()
    pol = sample_and_score(model, items, cfg, tokenizer, judges)
    taxed = tax_deltas(tax.measure(model), base_results.get("alignment_tax", {}))
    del model
    kl = kl_to_baseline(baseline, pol["exp"], cfg.batch_size)
    _write_samples(samples_file, pol)
    result = {"model": path, **summarize(pol, n), "kl": mean_ci(per_prompt(kl, n)),
              "win_rate": win_rates(pol, base, judges, n)}
    if taxed:
        result["alignment_tax"] = taxed
    return result


def _clear_previous(out: Path) -> None:
    """An earlier evaluation's results and samples in ``out`` are replaced, not mixed with this
    one's: a policy it had and this one has not would otherwise leave its samples behind."""
    if not (out / "eval_config.yaml").is_file():
        return  # no evaluation wrote here: nothing of ours to delete
    old = sorted(out.glob("samples-*.jsonl")) + [p for p in [out / "eval_results.json"] if p.is_file()]
    for p in old:
        p.unlink()
    if old:
        log.info("deleted the previous evaluation's %s from %s", ", ".join(p.name for p in old), out)


def _write_samples(path: Path, s: dict) -> None:
    with open(path, "w") as f:
        for i, (row, resp) in enumerate(zip(s["rows"], s["responses"])):
            rec = {"prompt": row.text, "response": resp, **{k: v[i] for k, v in s["scores"].items()}}
            f.write(json.dumps(rec) + "\n")


def format_table(results: dict) -> str:
    """One row per model: gold win rate [95% CI], means, KL, length, length-reward correlation;
    then one line per extra judge's win rate, and the preference-set accuracies."""
    def ci(w):
        return f"{w['win_rate']:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}]"

    def num(d, key, fmt=".3f"):
        v = d.get(key)
        v = v["mean"] if isinstance(v, dict) else v
        return "-" if v is None else format(v, fmt)

    rows = [("baseline", results["baseline"], None), *((k, v, v["win_rate"]) for k, v in results["policies"].items())]
    width = max(16, *(len(name) for name, _, _ in rows))  # the model column fits the longest label
    head = (f"{'model':<{width}} {'win (gold) [95% CI]':<26} {'gold':>7} {'proxy':>7} {'KL':>7} {'len':>6} "
            f"{'r(len,gold)':>11}")
    lines = [f"{results['prompts']} prompts x {results['samples_per_prompt']} samples", head, "-" * len(head)]
    for name, r, w in rows:
        win = ci(w["gold"]) if w and "gold" in w else "-"
        lines.append(f"{name:<{width}} {win:<26} {num(r, 'gold_mean'):>7} {num(r, 'proxy_mean'):>7} {num(r, 'kl'):>7} "
                     f"{num(r, 'length_tokens', '.1f'):>6} {num(r, 'corr_length_gold'):>11}")
    for name, r in results["policies"].items():
        for judge, w in r["win_rate"].items():
            if judge != "gold":
                lines.append(f"  {name} win rate by {judge}: {ci(w)}")
    for name, r, _ in rows:
        tax = r.get("alignment_tax") or {}
        parts = [f"{k} {tax[k]:.3f}" + (f" ({tax[k + '_delta']:+.3f})" if k + "_delta" in tax else "")
                 for k in ("sft_nll", "capability_exact_match") if k in tax]
        if parts:
            lines.append(f"  {name} alignment tax: " + ", ".join(parts))
    for judge, acc in results.get("preference_set", {}).items():
        cats = ", ".join(f"{c} {a['accuracy']:.3f}" for c, a in acc.get("by_category", {}).items())
        lines.append(f"  accuracy of {judge} on the preference set: {acc['accuracy']:.3f}"
                     + (f" ({cats})" if cats else ""))
    return "\n".join(lines)
