"""Short bf16 runs of every trainer on a CUDA GPU: does mixed precision train, how fast, how much memory.

    python benchmarks/gpu_check.py [--steps 8] [--model NAME_OR_DIR] [--dtype bfloat16] [--out runs/gpu_check]
    make gpu-check
    python benchmarks/gpu_check.py --cpu-dry-run   # tiny random model on CPU, 1 step: checks the script runs

Runs SFT, a reward model, DPO, PPO (against that reward model) and GRPO (task:arithmetic) from the
shipped configs (configs/*.yaml) with ``model.dtype`` set (bf16 by default: fp32 master weights,
bf16 autocast) and prints one row per method: the training loss at the first and last logged step
(PPO/GRPO: the policy loss), the run's wall time and that time per step (loading included), and the
peak CUDA memory allocated.
Without CUDA it exits with status 1 and a one-line message (nothing is written).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt_table, tiny_model_dir  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LOSS_KEYS = ("train/loss", "loss/policy")  # supervised trainers; PPO/GRPO's policy loss


def _loss(row: dict) -> float | None:
    for k in LOSS_KEYS:
        if k in row:
            return row[k]
    return None


def run_one(kind: str, overrides: list[str], out: Path, steps: int) -> dict:
    from rlhfkit.config import load_config
    from rlhfkit.registry import COMMANDS

    command = COMMANDS[kind]
    cfg = load_config(command.config_class(), ROOT / "configs" / f"{kind}.yaml",
                      [f"train.output_dir={out / kind}", f"train.max_steps={steps}", *overrides])
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    t = time.perf_counter()
    command.runner()(cfg)
    if cuda:
        torch.cuda.synchronize()
    sec = time.perf_counter() - t
    rows = [json.loads(line) for line in (out / kind / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [x for x in (_loss(r) for r in rows) if x is not None]
    return {"method": kind, "loss start": losses[0] if losses else None, "loss end": losses[-1] if losses else None,
            "wall s": sec, "s/step": sec / steps, "peak GiB": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--out", default="runs/gpu_check")
    ap.add_argument("--methods", default="sft,rm,dpo,ppo,grpo")
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny random model on CPU, 1 step each")
    args = ap.parse_args()
    if args.cpu_dry_run:
        args.model, args.steps = tiny_model_dir(), 1
    elif not torch.cuda.is_available():
        print("gpu-check: no CUDA device is visible to torch (torch.cuda.is_available() is False); "
              "it needs a GPU and a CUDA build of torch. Nothing was run.")
        sys.exit(1)
    out = Path(args.out)
    common = [f"model.name={args.model}", f"model.dtype={args.dtype}", "train.save_every=0"]
    per_method = {"ppo": [f"reward.spec=rm:{out / 'rm'}"]}  # PPO scores with the RM trained just before
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run)"
    print(f"{device}  torch {torch.__version__}  model.dtype={args.dtype}  "
          f"{args.steps} steps each")
    rows = []
    for kind in args.methods.split(","):
        rows.append(run_one(kind, common + per_method.get(kind, []), out, args.steps))
        print(f"{kind}: done in {rows[-1]['wall s']:.1f} s", flush=True)
    print()
    print(fmt_table(rows, ["method", "loss start", "loss end", "wall s", "s/step", "peak GiB"]))
    print("wall s: the whole run (loading, reference log-probs, evaluation included); s/step = wall s / steps")


if __name__ == "__main__":
    main()
