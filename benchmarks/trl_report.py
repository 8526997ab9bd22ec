"""The numbers of `bench_trl.py`: real tokens per step, matrix-product FLOPs, the per-job table and
the learning curves side by side."""

from __future__ import annotations

import statistics

from common import fmt_table, sft_step_flops, train_flops_per_token

# per job: (rlhfkit metric, TRL log key, label) of the learning curve printed next to each other
CURVE = {"sft": ("train/loss", "loss", "loss"), "rm": ("train/loss", "loss", "loss"),
         "dpo": ("train/loss", "loss", "loss"), "dpo-precomputed": ("train/loss", "loss", "loss"), "ppo": ("reward/score_mean", "objective/scores", "mean RM score"),
         "grpo": ("reward/score_mean", "reward", "mean reward")}


def job_method(job: str) -> str:
    """The trainer a `bench_trl.py` job runs (``dpo-precomputed`` is DPO with other settings)."""
    return "dpo" if job == "dpo-precomputed" else job


# --------------------------------------------------------------------------- data-side token counts

def data_tokens_per_step(method: str, spec: dict, steps: int) -> list[dict]:
    """Real (unpadded) tokens per optimizer step for SFT/RM/DPO, from rlhfkit's tokenisation of the
    data in file order (both frameworks take the batches in that order)."""
    from rlhfkit.config import RewardConfig, SFTConfig, load_config
    from rlhfkit.models import load_tokenizer

    tok = load_tokenizer(spec["model_dir"])
    method = job_method(method)
    if method == "sft":
        from rlhfkit.trainers.sft import prepare_sft_data

        cfg = load_config(SFTConfig, spec["config"], spec["overrides"])
        from rlhfkit.trainers.sft import labelled_tokens

        train, _, _ = prepare_sft_data(cfg, tok)
        rows = [[len(ex["input_ids"])] for ex in train]
        labelled = [labelled_tokens([ex]) for ex in train]
    else:
        from rlhfkit.trainers.dpo import DPOConfig
        from rlhfkit.trainers.reward import prepare_preference_data

        cfg = load_config(RewardConfig if method == "rm" else DPOConfig, spec["config"], spec["overrides"])
        train, _, _ = prepare_preference_data(cfg, tok)
        rows = [[len(ex["prompt_ids"]) + len(ex["chosen_ids"]), len(ex["prompt_ids"]) + len(ex["rejected_ids"])]
                for ex in train]
        prompts = [len(ex["prompt_ids"]) for ex in train]
    b = cfg.train.batch_size
    per_epoch = max(len(rows) // b, 1)
    out = []
    for k in range(steps):
        pos = k % per_epoch
        lens = [n for ex in rows[pos * b:(pos + 1) * b] for n in ex]
        step = {"rows": len(lens), "tokens": sum(lens)}
        if method in ("dpo", "rm"):  # a pair's prompt, once: what prompt sharing saves
            step["prompt_once"] = sum(prompts[pos * b:(pos + 1) * b])
        if method == "sft":  # the tokens with a loss: rlhfkit runs the LM head on these only
            step["labelled"] = sum(labelled[pos * b:(pos + 1) * b])
        out.append(step)
    return out


# --------------------------------------------------------------------------- FLOPs

def step_flops(method: str, model_cfg, step: dict, data: dict | None, spec: dict,
               shared: int = 1, head_on_labelled: bool = False) -> tuple[float, float]:
    """(whole-step FLOPs, update-phase FLOPs) of matrix products for one step's real tokens.

    ``shared`` > 1: rows come in groups of that size sharing one prompt, computed once per group
    (rlhfkit's prompt sharing: GRPO's G samples, DPO's and the RM's chosen + rejected). ``head_on_labelled``:
    SFT's LM head runs on the labelled tokens only (rlhfkit's `labelled_logprobs`). The FLOPs then
    count the work actually done, so GFLOP/s stays a measure of hardware use, not of work avoided."""
    f_lm = lambda t: train_flops_per_token(model_cfg, t, lm_head=True)  # noqa: E731 (fwd+bwd per token)
    f_sc = lambda t: train_flops_per_token(model_cfg, t, lm_head=False)  # noqa: E731 (scalar-head models)
    if method in ("sft", "rm", "dpo"):
        n, rows = data["tokens"], data["rows"]
        T = n / rows
        if method == "sft":
            fl = sft_step_flops(model_cfg, T, n, data["labelled"] if head_on_labelled else n)
        elif method == "rm":
            fl = f_sc(T) * (n - data["prompt_once"] if shared > 1 else n)
        else:
            live = "dpo.precompute_ref_logps=true" not in spec["overrides"]
            if shared > 1:
                n -= data["prompt_once"]
            fl = f_lm(T) * n * (4 / 3 if live else 1.0)  # + a forward of the reference
        return fl, fl
    tk = step["tokens"]
    n_p, n_r, rows = tk.get("prompt", 0), tk.get("response", 0), max(tk.get("rows", 1), 1)
    n = n_p + n_r
    T = n / rows
    epochs = spec["epochs"]
    gen = f_sc(T) / 3 * n_p + f_lm(T) / 3 * n_r  # prefill (no LM head), then one token per decode step
    n = n_p / shared + n_r  # scored and trained tokens
    # the update's tokens over all epochs: as counted by rlhfkit's update when it reports them (with
    # prompt sharing each minibatch packs its own groups, so a prompt is computed once per packed
    # group it has rows in, not once per step); otherwise every epoch runs the step's tokens
    n_upd = tk.get("update", epochs * n)
    if method == "ppo":  # actor, reference, critic, reward model forwards; actor + critic trained
        score = 2 * f_lm(T) / 3 * n + 2 * f_sc(T) / 3 * n
        update = (f_lm(T) + f_sc(T)) * n_upd
        if tk.get("fused"):  # the actor and critic scoring forwards were the update's first: counted once, in score
            update -= (f_lm(T) + f_sc(T)) / 3 * n
    else:  # actor (logp_old) and reference forwards; actor trained
        score = 2 * f_lm(T) / 3 * n
        update = f_lm(T) * n_upd
        if tk.get("fused"):  # the actor's scoring forward was the update's first: counted once, in score
            update -= f_lm(T) / 3 * n
    return gen + score + update, update


# --------------------------------------------------------------------------- report

def summarise(method: str, workers: dict, spec: dict, warmup: int, model_cfg, data) -> list[dict]:
    rows = []
    for fw in ("rlhfkit", "trl"):
        w = workers[fw]
        timed = w.steps[warmup:]
        secs = [s["sec"] for s in timed]
        sec = statistics.mean(secs)
        toks, flops, upd_flops, upd_secs, phases = 0.0, 0.0, 0.0, 0.0, {"gen": 0.0, "score": 0.0, "update": 0.0}
        for i, s in enumerate(timed):
            d = data[warmup + i] if data else None
            toks += d["tokens"] if d else s["tokens"].get("prompt", 0) + s["tokens"].get("response", 0)
            fl, ufl = step_flops(job_method(method), model_cfg, s, d, spec,
                                 spec.get("shared_group", 1) if fw == "rlhfkit" else 1, head_on_labelled=fw == "rlhfkit")
            flops += fl
            upd_flops += ufl
            if method in ("ppo", "grpo"):
                g, sc = s["phases"].get("gen", 0.0), s["phases"].get("score", 0.0)
                phases["gen"] += g
                phases["score"] += sc
                phases["update"] += s["sec"] - g - sc
                upd_secs += s["sec"] - g - sc
        total = sum(secs)
        row = {"framework": fw, "s/step": sec, "sd": statistics.stdev(secs) if len(secs) > 1 else 0.0,
               "setup s": w.ready.get("setup_s", 0.0),
               "tokens/step": toks / len(timed), "tokens/s": toks / total,
               "peak RSS MB": max(w.result.get("rss_mb", 0.0), max(s["rss_mb"] for s in w.steps)),
               "GFLOP/s": flops / total / 1e9, "load": statistics.mean(s["loadavg"] for s in timed),
               "steps s": " ".join(f"{s['sec']:.1f}" for s in w.steps)}
        if method in ("ppo", "grpo"):
            n = len(timed)
            row.update({"gen s": phases["gen"] / n, "score s": phases["score"] / n,
                        "update s": phases["update"] / n, "update GFLOP/s": upd_flops / max(upd_secs, 1e-9) / 1e9,
                        "resp tok/row": sum(s["tokens"].get("response", 0) for s in timed)
                        / max(sum(s["tokens"].get("rows", 0) for s in timed), 1)})
        rows.append(row)
    trl_sec = rows[1]["s/step"]
    for r in rows:
        r["speed-up vs TRL"] = trl_sec / r["s/step"]
    return rows


def print_curve(method: str, workers: dict) -> None:
    ours, theirs, label = CURVE[method]
    a = {c["step"]: c.get(ours) for c in workers["rlhfkit"].result.get("curve", [])}
    b = {c["step"]: c.get(theirs) for c in workers["trl"].result.get("curve", [])}
    steps = sorted(set(a) | set(b))
    rows = [{"step": k, f"rlhfkit {label}": a.get(k), f"TRL {label}": b.get(k)} for k in steps]
    print(f"learning curve per step ({label}; same data in the same order, same starting weights):")
    print(fmt_table(rows, ["step", f"rlhfkit {label}", f"TRL {label}"]))


def report(job: str, workers: dict, spec: dict, warmup: int, model_cfg, data, peak: float) -> list[dict]:
    """Print one job's table, its per-step times and learning curves; returns the table's rows."""
    rows = summarise(job, workers, spec, warmup, model_cfg, data)
    for r in rows:
        r["% of peak"] = 100 * r["GFLOP/s"] / peak
        if "update GFLOP/s" in r:
            r["update % of peak"] = 100 * r["update GFLOP/s"] / peak
    cols = ["framework", "s/step", "sd", "setup s", "tokens/s", "peak RSS MB", "GFLOP/s", "% of peak",
            "speed-up vs TRL"]
    pg = job_method(job) in ("ppo", "grpo")
    if pg:
        cols += ["gen s", "score s", "update s", "update GFLOP/s", "update % of peak", "resp tok/row"]
    unit = "iteration" if pg else "optimizer step"
    print(f"\n### {job.upper()} vs TRL {spec['trl_version']} (step = one {unit}; {rows[0]['tokens/step']:.0f} real "
          f"tokens per step for rlhfkit, {rows[1]['tokens/step']:.0f} for TRL; mean 1-min loadavg while timing "
          f"{statistics.mean(r['load'] for r in rows):.2f})")
    print(fmt_table(rows, cols))
    print("all steps (s, warm-up first): " + " | ".join(f"{r['framework']}: {r['steps s']}" for r in rows))
    print_curve(job, workers)
    return rows
