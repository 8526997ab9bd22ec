"""RLHFlow's comparison with one human-labelled preference set D (docs/results_dpo.md).

    python benchmarks/rlhflow_compare.py                       # the full comparison (hours on 2 CPU cores)
    python benchmarks/rlhflow_compare.py --sft runs/results/sft/model --seeds 0,1,2
    python benchmarks/rlhflow_compare.py --tables-only         # the tables and the plot from finished runs
    python benchmarks/rlhflow_compare.py --arms ... --re-eval  # an arm added: train it, evaluate all again
    python benchmarks/rlhflow_compare.py --tiny --out /tmp/rf  # a tiny random model: checks the script

D is the first 320 shipped sentiment pairs with 15% held out (272 training pairs, the split of the
"272 annotator labels" result). A Bradley-Terry RM (a mean-pooled probe, then 4 fine-tuning steps,
the best on the held-out pairs kept) and a pairwise
preference model (configs/pm.yaml's recipe) are trained on D once, from the SFT model. Then, per
seed, four arms start from the SFT model (also the reference and the evaluation baseline):
  offline    DPO on D, 1 epoch (configs/dpo.yaml);
  online-rm  online iterative DPO, 3 iterations x P fresh prompts, best vs worst of 4 samples of
             the current policy ranked by the RM, ties dropped, reference pi_0 (configs/online_dpo.yaml);
  online-pm  the same ranked by the preference model (round robin);
  ppo        PPO with the RM as reward on the same 3P prompts, batch 16 (configs/demo.yaml's ppo).
The seed draws the arms' 3P training prompts from prompts_train.jsonl and seeds their sampling and
data order, and the evaluation's. One `rlhfkit eval` per seed compares the four with the SFT model
on the held-out prompts with the gold judge.

Everything runs as ONE generated pipeline (OUT/pipeline.yaml, `rlhfkit pipeline`): a re-run skips
finished stages and resumes an interrupted one. Writes OUT/rlhflow_table.md (arms, per-iteration
mechanism, head to head) and OUT/rlhflow_frontier.png, OUT/rlhflow_results.json; prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dpo_frontier import plot  # noqa: E402

from rlhfkit.config.loader import merge  # noqa: E402
from rlhfkit.data.sources import resolve_source, split_eval  # noqa: E402
from rlhfkit.eval.stats import mean_ci, win_indicators  # noqa: E402

ARMS = ("offline", "online-rm", "online-pm", "ppo")
ONLINE = ("online-rm", "online-pm")
GROUPS = [("offline", "tab:blue", "offline DPO on D"), ("online-rm", "tab:orange", "online DPO, RM ranks"),
          ("online-pm", "tab:green", "online DPO, PM ranks"), ("ppo", "tab:red", "PPO with the RM")]
# --tiny: every stage capped to a step or two on a tiny random model (the numbers mean nothing)
TINY = {"sft": {"train": {"max_steps": 2, "batch_size": 4, "micro_batch_size": 4, "eval_every": 0}},
        "rm": {"train": {"max_steps": 2, "batch_size": 4, "micro_batch_size": 4, "eval_every": 1}},
        "pm": {"train": {"max_steps": 2, "batch_size": 4, "micro_batch_size": 4}, "eval_untrained": False},
        "dpo": {"train": {"max_steps": 2, "batch_size": 4, "micro_batch_size": 4}},
        "online-dpo": {"rollout": {"max_new_tokens": 8}, "train": {"max_steps": 1, "batch_size": 4,
                                                                   "micro_batch_size": 4}},
        "ppo": {"rollout": {"max_new_tokens": 8}, "mini_batch_size": 4},
        "eval": {"rollout": {"max_new_tokens": 8}}}


# --------------------------------------------------------------------------- inputs

def write_if_changed(path: Path, lines: list[str]) -> str:
    """Write ``lines``, leaving an identical file alone (an interrupted stage resumes on the same data)."""
    text = "".join(line.rstrip("\n") + "\n" for line in lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return str(path.resolve())


def write_inputs(out: Path, pairs: int, seeds: list[int], prompts: int) -> dict:
    """D's training and held-out pairs (split_eval with seed 0, as `rm`/`dpo` split by default), and
    each seed's training prompts (a random draw of ``prompts`` from prompts_train.jsonl)."""
    lines = Path(resolve_source("task:sentiment", "preference")).read_text().splitlines()[:pairs]
    train, held = split_eval(lines, 0.15, seed=0)
    files = {"train": write_if_changed(out / "data" / "d_train.jsonl", train),
             "heldout": write_if_changed(out / "data" / "d_heldout.jsonl", held)}
    pool = Path(resolve_source("task:sentiment", "prompts")).read_text().splitlines()
    for s in seeds:
        files[s] = write_if_changed(out / "data" / f"prompts-s{s}.jsonl", random.Random(s).sample(pool, prompts))
    return files


# --------------------------------------------------------------------------- the pipeline

def shared_stages(sft: str | None, d: dict, arms) -> list[dict]:
    """SFT (unless given; configs/demo.yaml's), the RM (the probe, then 4 steps, the best kept) and
    (for online-pm) the PM on D (configs/pm.yaml's)."""
    stages = [] if sft else [{"name": "sft", "kind": "sft", "config": {
        "model": {"name": "${base}"}, "data": {"train": "task:sentiment", "eval_fraction": 0.1, "max_length": 160},
        "optim": {"lr": 2.0e-5, "schedule": "cosine", "warmup_ratio": 0.03},
        "train": {"epochs": 1, "batch_size": 8, "micro_batch_size": 8, "eval_every": 7}}}]
    data = {"train": d["train"], "eval": d["heldout"]}
    stages.append({"name": "rm", "kind": "rm", "config": {
        "model": {"name": "${sft}"}, "data": {**data, "max_length": 160}, "head_init": "probe", "pooling": "mean",
        "optim": {"lr": 1.0e-5, "head_lr": 1.0e-4, "schedule": "cosine", "warmup_ratio": 0.0},
        "train": {"max_steps": 4, "batch_size": 16, "micro_batch_size": 8, "eval_every": 2,
                  "select_best": "eval/accuracy"}}})
    if "online-pm" not in arms:
        return stages
    stages.append({"name": "pm", "kind": "pm", "config": {
        "model": {"name": "${sft}"}, "data": {**data, "max_length": 384},
        "optim": {"lr": 1.0e-5, "schedule": "cosine", "warmup_ratio": 0.03},
        "train": {"epochs": 1, "batch_size": 8, "micro_batch_size": 4}, "eval_untrained": True}})
    return stages


def seed_stages(s: int, d: dict, prompts: str, args) -> list[dict]:
    """The arms of seed ``s`` (``args.arms``) and their evaluation."""
    P, rollout = args.prompts_per_iteration, {"max_new_tokens": 48, "temperature": 1.0, "micro_batch_size": 0}
    stages = [{"name": f"offline-s{s}", "kind": "dpo", "config": {
        "model": {"name": "${sft}"}, "data": {"train": d["train"], "eval": d["heldout"], "max_length": 256},
        "optim": {"lr": 2.0e-5, "schedule": "cosine", "warmup_ratio": 0.1},
        "train": {"epochs": 1, "batch_size": 8, "micro_batch_size": 4, "save_every": 0, "seed": s},
        "dpo": {"beta": 0.1, "loss_type": "sigmoid", "precompute_ref_logps": True, "share_prompt": True}}}]
    for arm, scorer in (("online-rm", "rm:${rm}"), ("online-pm", "pm:${pm}")):
        if arm not in args.arms:
            continue
        stages.append({"name": f"{arm}-s{s}", "kind": "online-dpo", "config": {
            "model": {"name": "${sft}"}, "scorer": scorer, "gold": "task:sentiment",
            "prompts": {"train": prompts, "max_prompt_length": 128, "eval": "task:sentiment",
                        "eval_limit": args.iter_eval_prompts},
            "rollout": {"n": 4, **rollout}, "iterations": 3, "prompts_per_iteration": P, "reference": "initial",
            "tie_tolerance": 0.0, "optim": {"lr": 2.0e-5, "schedule": "cosine", "warmup_ratio": 0.1},
            "train": {"epochs": 2, "batch_size": 8, "micro_batch_size": 4, "eval_every": 1, "seed": s},
            "dpo": {"beta": 0.1, "precompute_ref_logps": True}}})
    stages.append({"name": f"ppo-s{s}", "kind": "ppo", "config": {
        "model": {"name": "${sft}", "lora": {"enabled": True, "r": 16, "alpha": 32}},
        "prompts": {"train": prompts}, "rollout": {"n": 1, **rollout}, "reward": {"spec": "rm:${rm}", "clip": 5.0},
        "kl": {"coef": 0.05, "kind": "k1"}, "optim": {"lr": 2.0e-4, "schedule": "constant", "warmup_ratio": 0.0},
        "critic_optim": {"lr": 1.0e-4, "schedule": "constant", "warmup_ratio": 0.0},
        "train": {"max_steps": 3 * P // args.ppo_batch, "batch_size": args.ppo_batch,
                  "micro_batch_size": args.ppo_batch,  # one micro-batch: PPO's fused scoring
                  "save_every": 5, "seed": s},
        "critic_init": "reward", "ppo_epochs": 2, "mini_batch_size": args.ppo_batch}})
    stages = [st for st in stages if st["name"].rsplit("-s", 1)[0] in args.arms]
    stages.append({"name": f"eval-s{s}", "kind": "eval", "config": {
        "policies": [f"{arm}=${{{arm}-s{s}}}" for arm in args.arms], "baseline": "${sft}",
        "prompts": {"train": "task:sentiment/prompts_eval.jsonl", "limit": args.eval_prompts},
        "rollout": {"n": 1, **rollout}, "gold": "task:sentiment", "proxy": "rm:${rm}", "train": {"seed": s}}})
    return stages


def pipeline(args, out: Path) -> dict:
    d = write_inputs(out, args.pairs, args.seeds, 3 * args.prompts_per_iteration)
    sft = str(Path(args.sft).resolve()) if args.sft else None
    stages = shared_stages(sft, d, args.arms)
    for s in args.seeds:
        stages += seed_stages(s, d, d[s], args)
    for st in stages:
        if args.tiny:
            st["config"] = merge(st["config"], TINY[st["kind"]])
        if sft:
            st["config"] = json.loads(json.dumps(st["config"]).replace("${sft}", sft))
    return {"output_dir": str(out.resolve()), "base_model": args.base, "seed": 0, "progress": False,
            "stages": stages}


def set_evals_aside(out: Path, seeds: list[int]) -> list[Path]:
    """``--re-eval``: rename each finished or started ``eval-sN`` to ``eval-sN.before-<UTC time>`` so
    the pipeline evaluates again (e.g. with an arm added) and reuses every trained arm; nothing is deleted."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    moved = []
    for s in seeds:
        ev = out / f"eval-s{s}"
        if ev.exists():
            moved.append(ev.rename(ev.with_name(f"{ev.name}.before-{stamp}")))
            print(f"[rlhflow] {ev} set aside as {moved[-1].name}", flush=True)
    return moved


def run_pipeline(cfg: dict, out: Path, threads: int) -> None:
    import yaml

    path = out / "rlhflow_pipeline.yaml"
    if path.is_file():  # a finished stage is skipped whatever its config: refuse to mix settings
        before = {st["name"]: st["config"] for st in yaml.safe_load(path.read_text())["stages"]}
        changed = [st["name"] for st in cfg["stages"]  # a stage not started yet may change
                   if (out / st["name"]).exists() and before.get(st["name"], st["config"]) != st["config"]]
        if changed:
            hint = " (--re-eval runs the evaluations again)" if all(c.startswith("eval-") for c in changed) else ""
            sys.exit(f"{out} holds stages {', '.join(changed)} run with other settings: choose another --out{hint}")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    exe = shutil.which("rlhfkit", path=str(Path(sys.executable).parent)) or shutil.which("rlhfkit")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    subprocess.run([exe, "pipeline", "--config", str(path)], check=True, env=env)


# --------------------------------------------------------------------------- results

def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pooled_votes(out: Path, seeds: list[int], a: str, b: str) -> dict:
    """Gold votes of ``a``'s sample over ``b``'s on each held-out prompt in each seed's evaluation,
    pooled with the prompt as the unit (each prompt's mean vote over the seeds): win rate [95% CI]."""
    per_seed = []
    for s in seeds:
        ev = out / f"eval-s{s}"
        ra, rb = _jsonl(ev / f"samples-{a}.jsonl"), _jsonl(ev / f"samples-{b}.jsonl")
        if [r["prompt"] for r in ra] != [r["prompt"] for r in rb]:
            raise ValueError(f"{ev}: {a} and {b} are not on the same prompts")
        per_seed.append(win_indicators([r["gold"] for r in ra], [r["gold"] for r in rb]))
    units = [sum(v) / len(v) for v in zip(*per_seed)]
    ci = mean_ci(units)
    return {"win": ci["mean"], "lo": max(0.0, ci["ci_low"]), "hi": min(1.0, ci["ci_high"]), "prompts": ci["n"],
            "per_seed": [sum(v) / len(v) for v in per_seed]}


def arm_rows(out: Path, seeds: list[int], arms) -> list[dict]:
    """One row per arm: pooled gold win rate over SFT, and the seeds' mean gold, KL, length, proxy."""
    evs = [json.loads((out / f"eval-s{s}" / "eval_results.json").read_text()) for s in seeds]
    mean = lambda xs: sum(xs) / len(xs)
    m = lambda v: v["mean"] if isinstance(v, dict) else v
    rows = [{"arm": "SFT (start)", "gold": mean([m(e["baseline"]["gold_mean"]) for e in evs]),
             "proxy": mean([m(e["baseline"]["proxy_mean"]) for e in evs]),
             "length": mean([e["baseline"]["length_tokens"] for e in evs])}]
    for arm in arms:
        pol = [e["policies"][arm] for e in evs]
        rows.append({"arm": arm, **pooled_votes(out, seeds, arm, "baseline"),
                     "gold": mean([m(p["gold_mean"]) for p in pol]), "proxy": mean([m(p["proxy_mean"]) for p in pol]),
                     "kl": mean([m(p["kl"]) for p in pol]), "kl_per_seed": [m(p["kl"]) for p in pol],
                     "length": mean([p["length_tokens"] for p in pol])})
    return rows


def mechanism_rows(out: Path, seeds: list[int], arms) -> list[dict]:
    """Per online arm and iteration, means over seeds: the scorer's agreement with gold on the
    iteration's on-policy pairs, their gold margin, pairs kept and dropped, the DPO loss, and the
    held-out KL to SFT and gold after the iteration. First row: D's own labels, for comparison."""
    d = _jsonl(out / "data" / "d_train.jsonl")
    rows = [{"arm": "D (annotator labels)", "iteration": "-", "pairs": len(d),
             "gold_pair_accuracy": mean_ci(win_indicators([r["gold_chosen"] for r in d],
                                                          [r["gold_rejected"] for r in d]))["mean"],
             "gold_pair_margin": sum(r["gold_chosen"] - r["gold_rejected"] for r in d) / len(d)}]
    keys = ("gold_pair_accuracy", "gold_ranking_accuracy", "gold_pair_margin", "pairs", "dropped_ties",
            "dropped_identical", "train/loss", "eval/kl", "eval/gold_mean")
    for arm in [a for a in ONLINE if a in arms]:
        runs = [out / f"{arm}-s{s}" for s in seeds]
        its = [json.loads((r / "online_dpo_results.json").read_text())["iterations"] for r in runs]
        evals = [{rec["step"]: rec for rec in _jsonl(r / "metrics.jsonl") if "eval/kl" in rec} for r in runs]
        for k in range(len(its[0])):
            vals = [{**it[k], **ev.get(k + 1, {})} for it, ev in zip(its, evals)]
            rows.append({"arm": arm, "iteration": k + 1,
                         **{key: sum(v.get(key, float("nan")) for v in vals) / len(vals) for key in keys}})
    return rows


def judge_accuracy(out: Path) -> dict:
    rm = json.loads((out / "rm" / "rm_results.json").read_text())
    # the RM kept is the best of its evaluations on these held-out pairs (select_best): its value there
    best = rm.get("best") or {}
    acc = {"rm": best["value"] if best.get("metric") == "eval/accuracy" else rm.get("eval/accuracy"),
           "pm": float("nan"), "heldout_pairs": rm.get("eval/pairs")}
    if not (out / "pm" / "pm_results.json").is_file():  # no online-pm arm
        return acc
    pm = json.loads((out / "pm" / "pm_results.json").read_text())
    acc.update(pm=pm["pm"]["accuracy"], heldout_pairs=pm["pm"]["pairs"])
    if "llm_judge" in pm:
        acc["untrained_judge"] = pm["llm_judge"]["accuracy"]
    return acc


def stage_minutes(out: Path, seeds: list[int], arms) -> dict:
    """Wall minutes per arm summed over seeds (from the pipeline's DONE files), and the shared stages."""
    def minutes(name):
        done = out / name / "DONE"
        return json.loads(done.read_text())["seconds"] / 60 if done.is_file() else float("nan")
    t = {arm: sum(minutes(f"{arm}-s{s}") for s in seeds) for arm in (*arms, "eval")}
    t.update({name: minutes(name) for name in ("sft", "rm", "pm")})
    return t


# --------------------------------------------------------------------------- tables

def _f(v, fmt=".3f"):
    return "-" if v is None or v != v else format(v, fmt)


def markdown(res: dict) -> str:
    acc, a = res["judges"], res["args"]
    lines = [f"D: {res['d_pairs']} training pairs, {acc['heldout_pairs']} held out. Held-out accuracy: "
             f"RM {_f(acc['rm'])} (the best of its evaluations on them), PM {_f(acc['pm'])}"
             + (f", untrained judge {_f(acc['untrained_judge'])}" if "untrained_judge" in acc else "")
             + f". Online and PPO: 3 x {a['prompts_per_iteration']} prompts per seed. Seeds {a['seeds']}; "
             f"{res['arms'][1].get('prompts', '?')} held-out prompts per seed.", "",
             "| arm | gold win rate vs SFT [95% CI], seeds pooled | per seed | mean gold | proxy (RM) | "
             "KL to SFT (per seed) | length (tokens) |", "|---|---|---|---|---|---|---|"]
    for r in res["arms"]:
        if "win" not in r:
            lines.append(f"| {r['arm']} | - | - | {_f(r['gold'])} | {_f(r['proxy'])} | - | {_f(r['length'], '.1f')} |")
            continue
        seeds = ", ".join(_f(w) for w in r["per_seed"])
        kls = ", ".join(_f(k, ".2f") for k in r["kl_per_seed"])
        lines.append(f"| {r['arm']} | {_f(r['win'])} [{_f(r['lo'])}, {_f(r['hi'])}] | {seeds} | {_f(r['gold'])} | "
                     f"{_f(r['proxy'])} | {_f(r['kl'], '.2f')} ({kls}) | {_f(r['length'], '.1f')} |")
    lines += ["", "| A over B (gold, same prompts and seeds) | win rate [95% CI] | per seed |", "|---|---|---|"]
    for r in res["head_to_head"]:
        lines.append(f"| {r['a']} over {r['b']} | {_f(r['win'])} [{_f(r['lo'])}, {_f(r['hi'])}] | "
                     + ", ".join(_f(w) for w in r["per_seed"]) + " |")
    lines += ["", "| scorer's pairs | iteration | scorer = gold on the pairs | scorer = gold on all sample pairs | "
              "gold margin chosen - rejected | pairs kept | ties dropped | identical dropped | DPO loss | "
              "held-out KL to SFT | held-out gold |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["mechanism"]:
        lines.append(f"| {r['arm']} | {r['iteration']} | {_f(r.get('gold_pair_accuracy'))} | "
                     f"{_f(r.get('gold_ranking_accuracy'))} | {_f(r.get('gold_pair_margin'))} | "
                     f"{_f(r.get('pairs'), '.1f')} | {_f(r.get('dropped_ties'), '.1f')} | "
                     f"{_f(r.get('dropped_identical'), '.1f')} | {_f(r.get('train/loss'))} | "
                     f"{_f(r.get('eval/kl'), '.2f')} | {_f(r.get('eval/gold_mean'))} |")
    t = res["minutes"]
    lines += ["", "Wall time (min, all seeds): " + ", ".join(f"{k} {_f(v, '.1f')}" for k, v in t.items())]
    return "\n".join(lines)


def frontier(res: dict, seeds: list[int], path: Path) -> None:
    points = []
    for r in res["arms"][1:]:
        points += [{"name": r["arm"], "kl": kl, "win": w, "lo": w, "hi": w, "minor": True}
                   for kl, w in zip(r["kl_per_seed"], r["per_seed"])]
        points.append({"name": r["arm"], "kl": r["kl"], "win": r["win"], "lo": r["lo"], "hi": r["hi"]})
    drawn = {p["name"] for p in points}
    plot(points, path, groups=[g for g in GROUPS if g[0] in drawn], title=f"One preference set D, {len(seeds)} seeds "
                                            f"(small: each seed; large: pooled, 95% CI)")


def report(out: Path, args) -> dict:
    seeds = args.seeds
    arms = args.arms
    res = {"args": {"seeds": seeds, "arms": list(arms), "prompts_per_iteration": args.prompts_per_iteration,
                    "eval_prompts": args.eval_prompts, "tiny": args.tiny},
           "d_pairs": len(_jsonl(out / "data" / "d_train.jsonl")), "judges": judge_accuracy(out),
           "arms": arm_rows(out, seeds, arms), "mechanism": mechanism_rows(out, seeds, arms),
           "minutes": stage_minutes(out, seeds, arms),
           "head_to_head": [{"a": a, "b": "offline", **pooled_votes(out, seeds, a, "offline")}
                            for a in arms if a != "offline" and "offline" in arms]}
    table = markdown(res)
    (out / "rlhflow_table.md").write_text(table + "\n")
    (out / "rlhflow_results.json").write_text(json.dumps(res, indent=2) + "\n")
    frontier(res, seeds, out / "rlhflow_frontier.png")
    print(table)
    print(f"\nwrote {out / 'rlhflow_table.md'}, {out / 'rlhflow_results.json'}, {out / 'rlhflow_frontier.png'}")
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/rlhflow", help="run directory of the pipeline and the outputs")
    ap.add_argument("--sft", default="", help="a trained SFT model to start from (default: train it as the demo)")
    ap.add_argument("--base", default="smollm2-135m-instruct", help="the model SFT starts from")
    ap.add_argument("--seeds", default="", help="comma-separated (default 0,1,2; --tiny: 0)")
    ap.add_argument("--prompts-per-iteration", type=int, default=0, help="P (default 32; --tiny: 4)")
    ap.add_argument("--eval-prompts", type=int, default=0, help="held-out prompts per evaluation (default 320)")
    ap.add_argument("--iter-eval-prompts", type=int, default=0,
                    help="held-out prompts for the KL and gold after each online iteration (default 64)")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the run, unless set")
    ap.add_argument("--re-eval", action="store_true",
                    help="evaluate again: set the eval-sN directories aside (renamed, not deleted), reuse the trained arms")
    ap.add_argument("--tables-only", action="store_true", help="do not run: tables and plot from OUT")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model, 1-2 steps per stage: checks the script")
    args = ap.parse_args(argv)
    full, tiny = (32, 320, 64, 16, 320), (4, 8, 4, 4, 40)
    defaults = tiny if args.tiny else full
    args.prompts_per_iteration = args.prompts_per_iteration or defaults[0]
    args.eval_prompts = args.eval_prompts or defaults[1]
    args.iter_eval_prompts = args.iter_eval_prompts or defaults[2]
    args.ppo_batch, args.pairs = defaults[3], defaults[4]
    unknown = set(args.arms.split(",")) - set(ARMS)
    if unknown or not args.arms:
        ap.error(f"--arms: {', '.join(sorted(unknown)) or 'empty'}; choose from {', '.join(ARMS)}")
    args.arms = [a for a in ARMS if a in args.arms.split(",")]  # in the table's order
    args.seeds = [int(s) for s in (args.seeds or ("0" if args.tiny else "0,1,2")).split(",")]
    if (3 * args.prompts_per_iteration) % args.ppo_batch:
        ap.error(f"3 x --prompts-per-iteration must be a multiple of PPO's batch of {args.ppo_batch} prompts")
    if args.tiny:
        from common import tiny_model_dir

        args.base = tiny_model_dir()
    out = Path(args.out)
    if args.re_eval and args.tables_only:
        ap.error("--re-eval runs the evaluations; --tables-only runs nothing")
    if args.re_eval:
        set_evals_aside(out, args.seeds)
    if not args.tables_only:
        run_pipeline(pipeline(args, out), out, args.threads)
    report(out, args)


if __name__ == "__main__":
    main()
