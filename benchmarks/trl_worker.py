"""One (framework, method) pair of the rlhfkit-vs-TRL benchmark, stepped by bench_trl.py.

    python benchmarks/trl_worker.py --framework rlhfkit|trl --method sft|rm|dpo|ppo|grpo \
        --spec SPEC.json --ctl-in FD --ctl-out FD

Not meant to be run by hand: bench_trl.py starts one worker per framework for a method, waits
until both have built their trainer, then lets them take optimizer steps (iterations, for PPO and
GRPO) in turns, so that load from other jobs on the machine falls on both alike. A worker
reports over its control pipe:

    {"event": "ready", "setup_s": s, ...}   trainer built (models loaded, data prepared, DPO's reference
                                            log-probs precomputed when asked), about to take its first step
    {"event": "done", "step": k, "sec": s, "phases": {...}, "tokens": {...}, "rss_mb": m}
    {"event": "result", "curve": [...], "rss_mb": m}

and waits for a "go" line before each step. Both frameworks run their own trainers unmodified:
rlhfkit's `train_*` functions and TRL's Trainer subclasses. The only things changed are the
order of the training data (sequential in both, so both see the same batches and the learning
curves compare step for step) and the hooks that time steps:
- rlhfkit: `RunLogger.__init__` (the trainers build it right before their step loop) and
  `RunLogger.advance` (called once at the end of every step, after the step's log line);
- TRL: a TrainerCallback (on_train_begin, on_step_end, on_log).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

START = time.perf_counter()  # process start, near enough: the set-up time is measured from here
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rlhfkit.registry import COMMANDS  # noqa: E402  (names only: imports no trainer)
from trl_jobs import peak_rss_mb, rlhfkit_config, run_trl  # noqa: E402  (the TRL side; imports TRL lazily)


class Lockstep:
    """The worker's side of the turn-taking protocol, plus the per-step measurements."""

    def __init__(self, fd_in: int, fd_out: int, total: int, every: int = 1):
        self.r = os.fdopen(fd_in, "r")
        self.w = os.fdopen(fd_out, "w")
        self.total = total  # steps (iterations) to time, warm-up included
        self.every = every  # optimizer steps per reported step (TRL GRPO: minibatches per iteration)
        self.done = 0
        self.started = False
        self.t0 = 0.0
        self.phases: dict[str, float] = {}
        self.tokens: dict[str, int] = {}
        self.metrics: dict[str, float] = {}
        self.curve: list[dict] = []
        self.info: dict = {}  # sent with "ready" (the TRL version)

    def send(self, **msg) -> None:
        self.w.write(json.dumps(msg) + "\n")
        self.w.flush()

    def _go(self) -> None:
        line = self.r.readline()
        if line.strip() != "go":  # the parent stopped us (or died)
            os._exit(0)
        self.phases, self.tokens, self.metrics = {}, {}, {}
        self.t0 = time.perf_counter()

    def ready(self) -> None:
        if self.started:
            return
        self.started = True
        self.send(event="ready", rss_mb=peak_rss_mb(), setup_s=time.perf_counter() - START, **self.info)
        self._go()

    def add_phase(self, name: str, sec: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + sec

    def add_tokens(self, **counts: int) -> None:
        for k, v in counts.items():
            self.tokens[k] = self.tokens.get(k, 0) + int(v)

    def step_done(self) -> bool:
        """Report the step just finished; wait for the next go. True after the last step."""
        sec = time.perf_counter() - self.t0
        self.done += 1
        self.send(event="done", step=self.done, sec=sec, phases=self.phases, tokens=self.tokens,
                  metrics=self.metrics, rss_mb=peak_rss_mb())
        if self.done >= self.total:
            return True
        self._go()
        return False


# ============================================================================ rlhfkit

CURVE_KEYS = {"sft": "train/loss", "rm": "train/loss", "dpo": "train/loss",
              "ppo": "reward/score_mean", "grpo": "reward/score_mean"}


def run_rlhfkit(method: str, spec: dict, sync: Lockstep) -> None:
    import torch

    from rlhfkit.training import batches
    from rlhfkit.training.logger import RunLogger

    # Same batches as TRL's sequential sampler: examples (prompts) in file order.
    batches.epoch_order = lambda n, seed, epoch: list(range(n))

    orig_init, orig_log, orig_advance = RunLogger.__init__, RunLogger.log, RunLogger.advance

    def init(self, *a, **k):
        orig_init(self, *a, **k)
        sync.ready()

    def log(self, step, metrics, *a, **k):
        flat = {}
        for key, v in metrics.items():
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = v.item()
            if isinstance(v, (int, float)):
                flat[key] = float(v)
        sync.metrics.update(flat)
        return orig_log(self, step, metrics, *a, **k)

    def advance(self, *a, **k):
        out = orig_advance(self, *a, **k)
        m = sync.metrics
        for name in ("rollout", "score", "update"):
            if f"time/{name}" in m:
                sync.add_phase("gen" if name == "rollout" else name, m[f"time/{name}"])
        if "update/tokens" in m:  # what the update's forwards ran (prompt sharing: a prompt per packed group)
            sync.add_tokens(update=int(m["update/tokens"]))
        if m.get("score/fused"):  # PPO's / GRPO's first update forwards ran in the score phase (fuse_scoring)
            sync.add_tokens(fused=1)
        sync.curve.append({"step": sync.done + 1, **{k2: m[k2] for k2 in (CURVE_KEYS[method], "objective/kl")
                                                       if k2 in m}})
        if sync.step_done():
            # Everything is measured: report and leave without the final model save.
            sync.send(event="result", curve=sync.curve, rss_mb=peak_rss_mb())
            sync.w.close()
            os._exit(0)
        return out

    # the loop (training.fit) builds its RunLogger right before the first step and advances it after each
    RunLogger.__init__, RunLogger.log, RunLogger.advance = init, log, advance

    if method in ("ppo", "grpo"):
        import importlib

        mod = importlib.import_module(f"rlhfkit.trainers.{method}")
        orig_rollout = mod.rollout

        def rollout(*a, **k):
            exp = orig_rollout(*a, **k)
            sync.add_tokens(rows=len(exp), prompt=int(exp.prompt_mask.sum()), response=int(exp.response_mask.sum()))
            return exp

        mod.rollout = rollout

    from rlhfkit.parallel import make_strategy

    cfg = rlhfkit_config(method, spec)
    COMMANDS[method].runner()(cfg, make_strategy(cfg.train, cfg.model))  # as `rlhfkit METHOD` runs it
    raise RuntimeError("rlhfkit trainer returned before the last timed step")


# ============================================================================ main

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--framework", choices=["rlhfkit", "trl"], required=True)
    ap.add_argument("--method", choices=["sft", "rm", "dpo", "ppo", "grpo"], required=True)
    ap.add_argument("--spec", required=True)
    ap.add_argument("--ctl-in", type=int, required=True)
    ap.add_argument("--ctl-out", type=int, required=True)
    a = ap.parse_args()
    spec = json.loads(Path(a.spec).read_text())
    sync = Lockstep(a.ctl_in, a.ctl_out, spec["steps"])
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    try:
        (run_rlhfkit if a.framework == "rlhfkit" else run_trl)(a.method, spec, sync)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, then re-raised for the log
        try:
            sync.send(event="error", error=f"{type(e).__name__}: {e}")
        except Exception:
            pass
        raise


if __name__ == "__main__":
    sys.exit(main())
