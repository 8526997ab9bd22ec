"""Where a PPO iteration's time goes: phase times, page faults and the top operators.

    .venv/bin/python benchmarks/profile_ppo.py [--iterations 4] [--profile-iteration 3]
    .venv/bin/python benchmarks/profile_ppo.py --tiny      # a tiny random model: checks the script runs

Runs rlhfkit's PPO trainer unmodified with the settings of `bench_trl.py`'s PPO job (the default
model, full fine-tuning, 4 prompts x 32 new tokens, 2 epochs of one minibatch, the benchmark's
reward model; `make bench-trl` builds that model first). Every iteration prints its phase times
(rollout, score, update), the minor page faults it caused and the process's RSS; one iteration
runs under `torch.profiler` and prints the operators by self CPU time. Compare
`RLHFKIT_MALLOC=default` (glibc as it comes) with the default to see the page faults that
`parallel.malloc.keep_freed_memory` avoids (docs/benchmarks.md), and `--no-shared-prefix` with the
default to see what computing the prompts' shared prefix once saves.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--profile-iteration", type=int, default=3, help="0: none")
    ap.add_argument("--rows", type=int, default=30, help="operators to print")
    ap.add_argument("--reward-model", default=str(ROOT / "runs" / "bench_trl" / "ppo_reward_model"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "profile_ppo"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override after the benchmark's own, e.g. model.lora.enabled=true")
    ap.add_argument("--no-shared-prefix", action="store_true",
                    help="every row runs the prefix all rows share itself (models.forward.SHARE_PREFIX off)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model and reward model, 2 iterations, "
                                                        "the second profiled: checks that the script runs")
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench_trl import FULL_FT, SIZES, make_reward_model
    from common import tiny_model_dir
    from rlhfkit.config import load_config
    from rlhfkit.models import forward
    from rlhfkit.parallel import make_strategy
    from rlhfkit.registry import COMMANDS
    from rlhfkit.trainers import ppo as ppo_mod
    from rlhfkit.training import batches

    forward.SHARE_PREFIX = not args.no_shared_prefix
    model = []
    if args.tiny:
        tiny = tiny_model_dir()
        args.out = str(Path(args.out) / "tiny")
        args.reward_model = make_reward_model(Path(args.out), tiny)
        args.iterations, args.profile_iteration, args.rows = 2, 2, 5
        model = [f"model.name={tiny}"]
    if not Path(args.reward_model, "config.json").is_file():
        sys.exit(f"{args.reward_model}: no reward model; `make bench-trl ARGS=\"--methods ppo\"` writes it")
    batches.epoch_order = lambda n, seed, epoch: list(range(n))  # the benchmark's data order (prompts in file order)
    overrides = ["optim.schedule=constant", "optim.warmup_ratio=0.0", "train.save_every=0", "train.progress=false",
                 *SIZES["ppo"], *FULL_FT["ppo"], f"reward.spec=rm:{args.reward_model}", "critic_init=reward",
                 f"train.max_steps={args.iterations}", f"train.output_dir={args.out}", "train.overwrite=true",
                 *model, *args.set]
    command = COMMANDS["ppo"]
    cfg = load_config(command.config_class(), str(ROOT / "configs" / "ppo.yaml"), overrides)

    iteration = ppo_mod.ppo_iteration
    seen = {"n": 0}

    def timed(*a, **k):
        seen["n"] += 1
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        if seen["n"] == args.profile_iteration:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                out = iteration(*a, **k)
        else:
            prof, out = None, iteration(*a, **k)
        wall = time.perf_counter() - t0
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        rss = int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20 if Path("/proc/self/statm").exists() else 0
        phases = " ".join(f"{k[5:]} {float(v):.2f}" for k, v in out.items() if k in ("time/rollout", "time/score", "time/update"))
        print(f"iteration {seen['n']}{' (profiled)' if prof else ''}: {wall:.2f} s | {phases} | "
              f"{faults} minor page faults | RSS {rss:.0f} MB", flush=True)
        if prof is not None:
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows), flush=True)
        return out

    ppo_mod.ppo_iteration = timed  # train_ppo calls the module's ppo_iteration each step
    torch.manual_seed(0)
    command.runner()(cfg, make_strategy(cfg.train, cfg.model))


if __name__ == "__main__":
    main()
