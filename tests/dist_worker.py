"""Run several ``rlhfkit`` CLI invocations inside one multi-process job (tests/test_distributed.py).

    torchrun --standalone --nproc_per_node 2 tests/dist_worker.py jobs.json

jobs.json is a list of {"argv": [...], "capture": DIR or null}. Each job is exactly what
``torchrun -m rlhfkit.cli ARGV...`` runs; starting the interpreters and importing torch and
transformers once for all jobs, instead of once per job, is what keeps the test within its time
budget. With "capture", every rank saves what its rollout returned at each iteration (the raw
experience and the prompts it was given) to DIR/rollout-<step>-rank<r>.pt, so that the test can
replay the same experience through a 1-process run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def _capturing(module, out: Path):
    """Wrap ``module.rollout``/``module.prompt_batch`` so each rank saves its (items, experience)."""
    real_rollout, real_batch = module.rollout, module.prompt_batch
    seen = {"items": None, "step": None}

    def prompt_batch(run, step):
        seen["items"], seen["step"] = real_batch(run, step), step
        return seen["items"]

    def rollout(actor, items, settings, tokenizer, **kw):
        exp = real_rollout(actor, items, settings, tokenizer, **kw)
        rank = int(os.environ.get("RANK", 0))
        torch.save({"items": items, "exp": exp}, out / f"rollout-{seen['step']}-rank{rank}.pt")
        return exp

    module.rollout, module.prompt_batch = rollout, prompt_batch
    return lambda: setattr(module, "rollout", real_rollout) or setattr(module, "prompt_batch", real_batch)


def main(jobs_file: str) -> int:
    from rlhfkit.cli import main as cli

    for job in json.loads(Path(jobs_file).read_text()):
        argv = job["argv"]
        restore = None
        if job.get("capture"):
            import importlib

            out = Path(job["capture"])
            out.mkdir(parents=True, exist_ok=True)
            kind = {"grpo": "grpo", "rloo": "grpo", "ppo": "ppo"}[argv[0]]
            restore = _capturing(importlib.import_module(f"rlhfkit.trainers.{kind}"), out)
        try:
            code = cli(argv)
        finally:
            if restore is not None:
                restore()
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
