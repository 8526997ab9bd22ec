"""How cost grows with sequence length and batch: step time and peak memory of SFT, DPO and GRPO.

    python benchmarks/bench_scaling.py [--methods sft,dpo,grpo] [--lengths 128,256,512,1024]
                                       [--batches 4,8,16] [--steps 1] [--max-batch-tokens 4096] [--out DIR]
    python benchmarks/bench_scaling.py --tiny     # a tiny random model, lengths 16,32, batch 2: checks the script

Each (method, length L, batch b) point runs in its own process (forked from a server that has
imported torch and rlhfkit once), so its peak RSS (`ru_maxrss`) is that configuration's own: the
model, its optimizer and one step's activations. A point is one warm-up step and `--steps` timed
steps on the default model (fp32, CPU), on random token ids of exactly the given length (no
padding), with freed memory kept in the process as the trainers keep it (`parallel.malloc`). The
whole batch is one forward (one micro-batch), so memory grows with the batch.

- sft: b rows of L tokens, the first third unlabelled (`bench_train.bench_sft`: `sft_batch_loss`
  and the trainers' fused AdamW). Tokens per step: b x L.
- dpo: b pairs; chosen and rejected are each L tokens long (prompt L/3, response 2L/3), the
  reference model run in the step (no precomputed log-probs) and each pair packed as one sequence,
  prompt once: the DPO trainer's defaults (`bench_train.bench_dpo`: `dpo_batch_loss`). Tokens per
  step: 2 x b x L (both sequences of every pair).
- grpo: one GRPO iteration (`trainers.grpo.grpo_iteration`: rollout, scoring, update) on b rows
  = b/G prompts x G samples (G = `--group`, 4), prompts of min(64, L/2) random tokens and exactly
  L - prompt new tokens each (EOS stopping disabled: the rollout is given no EOS id), so every row
  is L tokens. The trainer's defaults otherwise: k3 KL loss to the reference, each prompt's group
  packed as one sequence, one minibatch of b rows in one micro-batch; the reward is a cheap
  function of the response text. Reported apart: generation, scoring and update seconds.
  Tokens per step: b x L.

Printed, and written to DIR/scaling.md, DIR/scaling.json and DIR/scaling.png: per method, rows
length and columns batch, s/step, peak RSS, ms per token (step time / tokens per step) and the
cost per token relative to the shortest length at the same batch (the flatness check: bold above
1.30); GFLOP/s per point (matrix products only, `common.train_flops_per_token`) against this
machine's fp32 matmul peak measured in the same run (the better of before and after the grid).

The default grid does not run the points with b x L above 4096 (512 x 16, 1024 x 8 and 1024 x 16 of
every method; their table cells say "not run"): estimated at ~100-130 GFLOP/s achieved, the 36
points take about 95 minutes, the 27 others about 35; and a whole batch of 16 x 1024 tokens in one
forward needs more memory than a 23 GB machine has (~1.5 MB per trained token). `--max-batch-tokens 0`
runs every point; a point that fails or is killed (out of memory) is reported as such.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from bench_train import bench_dpo, bench_sft  # noqa: E402
from common import fmt_table, matmul_peak_gflops, tiny_model_dir, train_flops_per_token  # noqa: E402

from rlhfkit.models import DEFAULT_MODEL  # noqa: E402
from rlhfkit.parallel.malloc import keep_freed_memory  # noqa: E402

METHODS = ("sft", "dpo", "grpo")
FLAT = 1.30  # cost per token relative to the shortest length: above this, the table flags it


def length_reward(prompts, responses, **fields):
    """GRPO's reward here: cheap and varied (the groups' advantages are not all zero)."""
    return [float(len(r) % 7) for r in responses]


# --------------------------------------------------------------------------- one point (own process)

def grpo_prompt_len(length: int) -> int:
    return min(64, length // 2)


def _grpo_run(model: str, length: int, batch: int, steps: int, group: int, out: str):
    """The GRPO trainer's run state (`setup_run`, `prepare_trained`) on b/G synthetic prompts."""
    from rlhfkit.config import ModelSection, PolicyTrainSection, PromptsSection, RewardSection, RolloutSection
    from rlhfkit.parallel import make_strategy
    from rlhfkit.rollout import PromptItem, sampling
    from rlhfkit.trainers.grpo import GRPOConfig
    from rlhfkit.trainers.pg_setup import prepare_trained, setup_run
    from rlhfkit.training.logger import RunLogger

    if batch % group:
        raise ValueError(f"grpo: batch {batch} is not a multiple of the group size {group}")
    prompt = grpo_prompt_len(length)
    cfg = GRPOConfig(
        model=ModelSection(name=model), prompts=PromptsSection(train="task:arithmetic", limit=8),
        rollout=RolloutSection(n=group, max_new_tokens=length - prompt, temperature=1.0),
        reward=RewardSection(spec=f"{HERE}:length_reward"), mini_batch_size=batch,
        train=PolicyTrainSection(batch_size=batch // group, micro_batch_size=batch, max_steps=steps + 1,
                                 output_dir=out, progress=False, report_to=[]))
    cfg.validate("grpo")
    pr = setup_run(cfg, "grpo", make_strategy(cfg.train, cfg.model))
    actor = prepare_trained(pr, pr.actor, cfg.optim)
    pr.actor = actor.model
    pr.run.logger = RunLogger(pr.run.out, pr.total, enabled=False)  # `fit` would make one; no files here
    sampling.stop_ids = lambda model, tokenizer: []  # no stop id: every row makes exactly max_new_tokens tokens
    vocab = actor.model.config.vocab_size
    pr.prompts = [PromptItem(ids=torch.randint(10, vocab, (prompt,)).tolist(), messages=[], text="")
                  for _ in range(batch // group)]
    return pr, actor


def bench_grpo(model: str, length: int, batch: int, steps: int, group: int) -> dict:
    from rlhfkit.trainers.grpo import grpo_iteration

    with tempfile.TemporaryDirectory(prefix="bench-scaling-grpo-") as out:
        pr, actor = _grpo_run(model, length, batch, steps, group, out)
        runs = []
        for step in range(steps + 1):  # step 0: warm-up
            t = time.perf_counter()
            m = grpo_iteration(pr, step, actor, None)
            wall = time.perf_counter() - t
            new = length - grpo_prompt_len(length)
            if float(m["response/length_mean"]) != new:
                raise RuntimeError(f"grpo: responses of {float(m['response/length_mean'])} tokens, expected {new}")
            if step:
                runs.append({"wall": wall, "gen": m["time/rollout"], "score": m["time/score"],
                             "update": m["time/update"], "computed": float(m["update/tokens"])})
    mean = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
    f = train_flops_per_token(actor.model.config, length)  # forward + backward, per token
    prompts = batch // group * grpo_prompt_len(length)
    # score: 2 forwards (policy, reference), update: forward + backward; generation: one forward per token
    flops = mean["computed"] * f * 5 / 3 + (prompts + batch * (length - grpo_prompt_len(length))) * f / 3
    return {"s/step": mean["wall"], "GFLOP/s": flops / mean["wall"] / 1e9, "gen s": mean["gen"],
            "score s": mean["score"], "update s": mean["update"],
            "update GFLOP/s": mean["computed"] * f / mean["update"] / 1e9}


def run_point(conn, method: str, length: int, batch: int, args) -> None:
    """The child process: one point, its result (with this process's peak RSS) sent back."""
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        keep_freed_memory()  # as the strategies do on CPU
        torch.manual_seed(0)
        if method == "sft":
            r, tokens = bench_sft(args.model, batch, length, args.steps), batch * length
        elif method == "dpo":
            r = bench_dpo(args.model, batch, length, args.steps, precompute=False, share=True)
            tokens = 2 * batch * length
        else:
            r, tokens = bench_grpo(args.model, length, batch, args.steps, args.group), batch * length
        r = {k: v for k, v in r.items() if k not in ("phase", "batch x seq", "tokens/s")}
        r.update({"tokens": tokens, "ms/token": 1000 * r["s/step"] / tokens,
                  "peak GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20})  # KiB on Linux
    except Exception as e:  # noqa: BLE001 - reported in the table, the grid goes on
        r = {"error": f"{type(e).__name__}: {e}"}
    conn.send(r)
    conn.close()


# --------------------------------------------------------------------------- the grid

def measure(ctx, method: str, length: int, batch: int, args) -> dict:
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=run_point, args=(send, method, length, batch, args))
    t = time.perf_counter()
    p.start()
    send.close()
    try:
        r = recv.recv()
    except EOFError:
        r = {}
    p.join()
    if not r:
        killed = " (killed: out of memory?)" if p.exitcode == -9 else ""
        r = {"error": f"process ended with code {p.exitcode}{killed}"}
    r.update({"method": method, "length": length, "batch": batch, "wall s": time.perf_counter() - t})
    return r


def relative_costs(results: list[dict]) -> None:
    """Each point's ms/token over that of the shortest measured length, same method and batch."""
    for r in results:
        base = [q for q in results if q["method"] == r["method"] and q["batch"] == r["batch"] and "ms/token" in q]
        if "ms/token" in r and base:
            r["rel"] = r["ms/token"] / min(base, key=lambda q: q["length"])["ms/token"]


def _cell(r: dict | None, length: int, batch: int, limit: int) -> str:
    if r is None:
        return f"not run (b x L > {limit})" if limit and batch * length > limit else "not run"
    if "error" in r:
        return "failed: " + " ".join(r["error"].replace("|", "/").split())[:120]
    rel = f"x{r['rel']:.2f}" if "rel" in r else ""
    rel = f"**{rel}**" if r.get("rel", 0) > FLAT else rel
    return f"{r['s/step']:.3g} s, {r['peak GB']:.2f} GB, {r['ms/token']:.3g} ms/tok, {rel}"


def markdown(results: list[dict], args, peak: float) -> str:
    at = {(r["method"], r["length"], r["batch"]): r for r in results}
    out = [f"model `{args.model}`, fp32, {torch.get_num_threads()} threads, fp32 matmul peak {peak:.1f} GFLOP/s, "
           f"1 warm-up + {args.steps} timed step(s) per point, each point its own process.", ""]
    for m in args.methods:
        out += [f"### {m.upper()}", "", "s/step, peak RSS, ms per token, cost per token relative to the shortest "
                f"measured length at the same batch (bold: above {FLAT:.2f})", "",
                "| length | " + " | ".join(f"batch {b}" for b in args.batches) + " |",
                "|---|" + "---|" * len(args.batches)]
        limit = args.max_batch_tokens
        out += [f"| {L} | " + " | ".join(_cell(at.get((m, L, b)), L, b, limit) for b in args.batches) + " |"
                for L in args.lengths]
        out.append("")
        if m == "grpo":
            out += ["GRPO's split, seconds: generation / scoring / update", "",
                    "| length | " + " | ".join(f"batch {b}" for b in args.batches) + " |",
                    "|---|" + "---|" * len(args.batches)]
            out += [f"| {L} | " + " | ".join(_split(at.get(("grpo", L, b))) for b in args.batches) + " |"
                    for L in args.lengths]
            out.append("")
    return "\n".join(out)


def _split(r: dict | None) -> str:
    if r is None or "gen s" not in r:
        return "not run" if r is None else "failed"
    return f"{r['gen s']:.3g} / {r['score s']:.3g} / {r['update s']:.3g}"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "rel" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for m in METHODS:
        for b in sorted({r["batch"] for r in ok if r["method"] == m}):
            pts = sorted((r for r in ok if r["method"] == m and r["batch"] == b), key=lambda r: r["length"])
            ax1.plot([r["length"] for r in pts], [r["rel"] for r in pts], marker="o", label=f"{m} b={b}")
        pts = sorted((r for r in ok if r["method"] == m), key=lambda r: r["tokens"])
        if pts:
            ax2.plot([r["tokens"] for r in pts], [r["peak GB"] for r in pts], marker="o", linestyle="", label=m)
    ax1.axhline(FLAT, color="grey", linestyle="--", linewidth=1)
    lengths = sorted({r["length"] for r in ok})
    ax1.set_xscale("log", base=2)
    ax1.set_xticks(lengths, [str(n) for n in lengths])
    ax1.set(xlabel="sequence length (tokens)", ylabel="cost per token / at the shortest length",
            title="cost per token")
    ax2.set(xscale="log", xlabel="tokens per step", ylabel="peak RSS (GB)", title="peak memory")
    tokens = sorted({r["tokens"] for r in ok})
    ax2.set_xticks(tokens, [str(n) for n in tokens])
    ax2.xaxis.set_minor_formatter(plt.NullFormatter())
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    ap.add_argument("--methods", default="sft,dpo,grpo", type=lambda s: s.split(","))
    ap.add_argument("--lengths", default="128,256,512,1024", type=ints)
    ap.add_argument("--batches", default="4,8,16", type=ints)
    ap.add_argument("--steps", type=int, default=1, help="timed steps per point, after one warm-up step")
    ap.add_argument("--max-batch-tokens", type=int, default=4096,
                    help="points with batch x length above this are not run (0: run every point)")
    ap.add_argument("--group", type=int, default=4, help="GRPO samples per prompt (must divide each batch)")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(HERE.parent.parent / "runs" / "bench_scaling"))
    ap.add_argument("--tiny", action="store_true", help="a tiny random model, lengths 16,32, batch 2, group 2")
    ap.add_argument("--keep", action="store_true",
                    help="keep the other methods' points from OUT/scaling.json (re-measure only --methods)")
    args = ap.parse_args()
    if bad := set(args.methods) - set(METHODS):
        ap.error(f"--methods: unknown {sorted(bad)}; choose from {','.join(METHODS)}")
    if args.tiny:
        args.model, args.lengths, args.batches, args.group, args.steps = tiny_model_dir(), [16, 32], [2], 2, 1
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", "rlhfkit.trainers.grpo"])  # imported once, not per point
    peak_n = 256 if args.tiny else 2048
    peak = matmul_peak_gflops(peak_n)
    print(f"model {args.model} | {torch.get_num_threads()} threads | fp32 matmul peak ({peak_n}^3): {peak:.1f} GFLOP/s",
          flush=True)
    results = []
    for m in args.methods:
        for L in args.lengths:
            for b in args.batches:
                if args.max_batch_tokens and b * L > args.max_batch_tokens:
                    continue
                r = measure(ctx, m, L, b, args)
                results.append(r)
                print(f"{m} L={L} b={b}: " + (r["error"] if "error" in r else
                      f"{r['s/step']:.3g} s/step, {r['peak GB']:.2f} GB, {r['GFLOP/s']:.3g} GFLOP/s") +
                      f" ({r['wall s']:.0f} s)", flush=True)
    peak = max(peak, matmul_peak_gflops(peak_n))
    for r in results:
        if "GFLOP/s" in r:
            r["% of peak"] = 100 * r["GFLOP/s"] / peak
    out = Path(args.out)
    if args.keep and (out / "scaling.json").is_file():  # kept points keep their own run's % of peak
        kept = json.loads((out / "scaling.json").read_text())["points"]
        results = [r for r in kept if r["method"] not in args.methods] + results
    relative_costs(results)
    cols = ["method", "length", "batch", "tokens", "s/step", "ms/token", "rel", "peak GB", "GFLOP/s", "% of peak",
            "gen s", "score s", "update s", "update GFLOP/s", "wall s"]
    print(f"\nfp32 matmul peak (better of before and after): {peak:.1f} GFLOP/s")
    print(fmt_table([r for r in results if "error" not in r] or [{}], cols))
    text = markdown(results, args, peak)
    print("\n" + text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.md").write_text(text + "\n")
    (out / "scaling.json").write_text(json.dumps({"matmul_peak_gflops": peak, "args": vars(args), "points": results},
                                                 indent=1, default=str))
    plot(results, out / "scaling.png")
    print(f"\nwritten: {out / 'scaling.md'}, {out / 'scaling.json'}, {out / 'scaling.png'}")


if __name__ == "__main__":
    main()
