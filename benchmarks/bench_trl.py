"""rlhfkit against TRL, step for step: SFT, RM, DPO, PPO and GRPO on the default model, fp32 on CPU.

    make bench-trl          # builds .venv-bench (the current TRL) and .venv-bench-ppo (TRL 1.12, for PPO)
    .venv-bench/bin/python benchmarks/bench_trl.py --ppo-python .venv-bench-ppo/bin/python
        [--methods sft,rm,dpo,dpo-precomputed,ppo,grpo] [--warmup 2] [--steps 3] [--dpo-steps 10]
        [--lora] [--set dpo.train.batch_size=8 ...] [--tiny]

TRL removed PPO after 1.12, so PPO runs against TRL 1.12 (``--ppo-python``: an interpreter with
it) and every other method against the TRL of ``--python``. ``dpo`` computes the reference
log-probs inside each step on both sides (TRL's default); ``dpo-precomputed`` computes them once
before training on both sides (rlhfkit ``dpo.precompute_ref_logps: true``, TRL
``precompute_ref_log_probs=True``): that pass is then part of the set-up time, not of a step.
``--tiny`` runs every job on a tiny random model, to check the harness end to end.

For each method two worker processes (benchmarks/trl_worker.py) build the same job, one with
rlhfkit's trainer and one with TRL's: same model directory, same data files in the same order,
same batch / micro-batch / minibatch sizes, sequence lengths, max_new_tokens, samples per prompt,
epochs, learning rate (constant), AdamW hyperparameters, gradient clipping, fp32, no gradient
checkpointing. Settings come from the shipped configs/*.yaml with the overrides printed below;
the TRL arguments are derived from the same parsed config. Then the two take their steps in
turns (step k of one, step k of the other, the order flipping every step), so that load from
other jobs on this shared machine falls on both alike. A "step" is one optimizer step for SFT, RM
and DPO and one iteration (generation + scoring + all updates on that batch) for PPO and GRPO.

Reported per method and framework: seconds per step (mean of the timed steps, after warm-up), the
set-up time (process start to the first step: imports, model loading, data preparation),
real (unpadded) tokens per second, the process's peak RSS (each worker is its own process, so
peaks do not mix), achieved GFLOP/s of matrix products (model FLOPs: 6 x params per trained token,
2 x params per forward-only token, plus attention; `common.train_flops_per_token`) against this
machine's fp32 matmul peak measured in the same run, and the speed-up of rlhfkit over TRL. The
machine's copy bandwidth is measured before and after as well: decoding is bound by it, so the
generation phase of PPO and GRPO (and their speed-ups) move with it from day to day. PPO
and GRPO also get the gen / score / update split and the update phase's own GFLOP/s. The learning
curve per step (loss, or mean reward for PPO/GRPO) of both is printed next to each other.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from common import matmul_peak_gflops, memory_bandwidth_gbs  # noqa: E402
from trl_report import data_tokens_per_step, job_method, report  # noqa: E402

METHODS = ("sft", "rm", "dpo", "ppo", "grpo")  # trainers (trl_worker.py --method)
JOBS = ("sft", "rm", "dpo", "dpo-precomputed", "ppo", "grpo")  # what --methods names
CONFIGS = {m: str(ROOT / "configs" / f"{m}.yaml") for m in METHODS}


# Benchmark sizes: the shipped configs' settings, with batches cut so that one step of the
# 135M model takes seconds, not minutes, on a 2-core CPU. Full fine-tuning everywhere (--lora
# keeps PPO/GRPO on the configs' LoRA adapters instead).
COMMON = ["optim.schedule=constant", "optim.warmup_ratio=0.0", "train.save_every=0", "train.progress=false",
          "train.seed=0", "train.log_every=1"]
SIZES = {
    "sft": ["data.eval_fraction=0.0", "train.eval_every=0", "train.batch_size=8", "train.micro_batch_size=8"],
    # TRL's reward trainer starts from a random head at one learning rate, on every layer, and
    # reads the last token: so does rlhfkit here (configs/rm.yaml's probe initialisation would add
    # a pass over all pairs to step 1, and its 8-layer cut would time a quarter of the model)
    "rm": ["data.eval_fraction=0.0", "train.eval_every=0", "train.batch_size=4", "train.micro_batch_size=4",
           "head_init=random", "optim.head_lr=0.0", "backbone_layers=0", "pooling=last"],
    "dpo": ["data.eval_fraction=0.0", "train.eval_every=0", "train.batch_size=4", "train.micro_batch_size=4",
            "data.max_length=128", "dpo.beta=0.1", "dpo.precompute_ref_logps=false"],
    "dpo-precomputed": ["data.eval_fraction=0.0", "train.eval_every=0", "train.batch_size=4",
                        "train.micro_batch_size=4", "data.max_length=128", "dpo.beta=0.1",
                        "dpo.precompute_ref_logps=true"],
    "ppo": ["train.batch_size=4", "train.micro_batch_size=4", "mini_batch_size=4", "ppo_epochs=2",
            "rollout.max_new_tokens=32", "critic_optim.schedule=constant", "critic_optim.warmup_ratio=0.0"],
    # 2 prompts x 4 samples of the sentiment task, 48 new tokens at temperature 1, k3 KL at 0.04
    "grpo": ["prompts.train=task:sentiment", "reward.spec=task:sentiment", "train.batch_size=2", "rollout.n=4",
             "train.micro_batch_size=8", "mini_batch_size=8", "rollout.max_new_tokens=48", "rollout.temperature=1.0",
             "kl_coef=0.04", "kl_kind=k3", "ppo_epochs=1"],
}
FULL_FT = {"ppo": ["model.lora.enabled=false", "optim.lr=1e-6", "critic_optim.lr=1e-5"],
           "grpo": ["model.lora.enabled=false", "optim.lr=1e-6"]}


# --------------------------------------------------------------------------- workers

class Worker:
    def __init__(self, framework: str, job: str, spec: dict, out: Path, python: str):
        self.framework, self.method = framework, job
        spec_path = out / f"{job}_{framework}.json"
        spec_path.write_text(json.dumps(spec))
        self.log_path = out / f"{job}_{framework}.log"
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = dict(os.environ, PYTHONUNBUFFERED="1", TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false")
        if spec.get("threads"):
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(spec["threads"])
        if framework == "trl" and spec.get("trl_malloc"):
            # rlhfkit's trainers keep freed memory (rlhfkit/parallel/malloc.py); give TRL's process
            # the same glibc settings through the environment, read at its start-up
            env.update(MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_="2147483647")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [python, str(HERE / "trl_worker.py"), "--framework", framework, "--method", job_method(job),
             "--spec", str(spec_path), "--ctl-in", str(to_child_r), "--ctl-out", str(from_child_w)],
            pass_fds=(to_child_r, from_child_w), stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        os.close(to_child_r)
        os.close(from_child_w)
        self.w = os.fdopen(to_child_w, "w")
        self.r = os.fdopen(from_child_r, "r")
        self.steps: list[dict] = []
        self.result: dict = {}
        self.ready: dict = {}

    def recv(self, want: str) -> dict:
        line = self.r.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"{self.framework} {self.method} worker exited (code {self.proc.returncode}); "
                               f"last lines of {self.log_path}:\n" + _tail(self.log_path))
        msg = json.loads(line)
        if msg.get("event") == "error":
            self.proc.wait()
            raise RuntimeError(f"{self.framework} {self.method}: {msg['error']}\n" + _tail(self.log_path))
        if msg.get("event") != want:
            raise RuntimeError(f"{self.framework} {self.method}: expected {want}, got {msg}")
        return msg

    def go(self) -> dict:
        self.w.write("go\n")
        self.w.flush()
        msg = self.recv("done")
        msg["loadavg"] = os.getloadavg()[0]
        self.steps.append(msg)
        return msg

    def stop(self) -> None:
        for f in (self.w, self.r):
            try:
                f.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def run_method(method: str, spec: dict, out: Path, python: str, first: str) -> dict[str, Worker]:
    """Both frameworks' workers for one job, stepped in turns (the first one flips each step). Both
    run in ``python``, the interpreter with the TRL the job is compared with."""
    workers = {fw: Worker(fw, method, {**spec, "out_dir": str(out / f"{method}_{fw}"),
                                       "overrides": spec["overrides"] + [f"train.output_dir={out / f'{method}_{fw}'}"]},
                          out, python)
               for fw in ("rlhfkit", "trl")}
    try:
        for w in workers.values():
            w.ready = w.recv("ready")
        order = [first, "trl" if first == "rlhfkit" else "rlhfkit"]
        for k in range(spec["steps"]):
            for fw in (order if k % 2 == 0 else order[::-1]):
                msg = workers[fw].go()
                print(f"  [{method}] step {k + 1}/{spec['steps']} {fw:8s} {msg['sec']:7.2f} s  "
                      f"load {msg['loadavg']:.2f}", flush=True)
        for w in workers.values():
            w.result = w.recv("result")
    finally:
        for w in workers.values():
            w.stop()
    return workers


def make_reward_model(out: Path, model_dir: str) -> str:
    """A Bradley-Terry-shaped reward model for PPO (both frameworks load the same directory): the
    default model with a fresh scalar head. Its scores are noise; only speed is measured with it."""
    d = out / "ppo_reward_model"
    if (d / "config.json").is_file():
        return str(d)
    import torch

    from rlhfkit.models import load_scalar_model, load_tokenizer, save_pretrained_atomic

    torch.manual_seed(0)
    tok = load_tokenizer(model_dir)
    save_pretrained_atomic(load_scalar_model(model_dir, pad_token_id=tok.pad_token_id), tok, d)
    return str(d)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=",".join(JOBS), help=f"comma-separated, of {', '.join(JOBS)}")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, caches)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up")
    ap.add_argument("--dpo-steps", type=int, default=0,
                    help="timed DPO steps (default --steps); more give a longer learning curve")
    ap.add_argument("--lora", action="store_true", help="PPO/GRPO with the configs' LoRA adapters (r=16, all-linear)")
    ap.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
                    help="extra rlhfkit config override for one job, e.g. dpo.train.batch_size=8")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch/OpenMP threads in every worker and for the peak (default: torch's, = cores); "
                         "1 is far faster than 2 when other jobs load the cores (OpenMP threads wait on each other)")
    ap.add_argument("--trl-malloc", action="store_true",
                    help="run TRL with the glibc malloc settings rlhfkit's trainers apply to themselves "
                         "(no mmap for large blocks, no trimming); default: TRL as users run it")
    ap.add_argument("--model", default="", help="model name or directory (default: the built-in default model)")
    ap.add_argument("--tiny", action="store_true",
                    help="a tiny random model (and reward model): checks the harness end to end, times mean nothing")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_trl"))
    ap.add_argument("--python", default=sys.executable, help="interpreter with rlhfkit and the current TRL")
    ap.add_argument("--ppo-python", default="", help="interpreter with rlhfkit and TRL 1.12 for PPO "
                                                     "(default: --python; PPO needs TRL <= 1.12)")
    return ap.parse_args()


def trl_version(python: str) -> str:
    """The TRL version importable by ``python``; exits with one line if there is none."""
    r = subprocess.run([python, "-c", "import trl; print(trl.__version__)"], capture_output=True, text=True,
                       env=dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1"))
    if r.returncode:
        sys.exit(f"{python}: TRL is not importable there; run `make bench-trl` (it builds .venv-bench and "
                 ".venv-bench-ppo)")
    return r.stdout.strip().splitlines()[-1]


def job_spec(job: str, args, model_dir: str, out: Path, extra: list[str]) -> dict:
    """What both workers of a job get: the rlhfkit config file and overrides (the TRL side derives
    its arguments from the parsed config), the model directory and the number of steps."""
    method = job_method(job)
    overrides = COMMON + [f"model.name={model_dir}"] + SIZES[job] + ([] if args.lora else FULL_FT.get(method, []))
    if method == "ppo":
        overrides += [f"reward.spec=rm:{make_reward_model(out, model_dir)}", "critic_init=reward"]
    steps = args.dpo_steps if method == "dpo" and args.dpo_steps else args.steps
    total = args.warmup + steps
    overrides = overrides + [f"train.max_steps={total}"] + extra
    spec = {"config": CONFIGS[method], "overrides": overrides, "model_dir": model_dir, "steps": total,
            "seed": 0, "threads": args.threads, "trl_malloc": args.trl_malloc}
    from rlhfkit.config import load_config
    from rlhfkit.registry import COMMANDS

    loaded = load_config(COMMANDS[method].config_class(), CONFIGS[method], overrides)
    if method in ("ppo", "grpo"):
        spec["epochs"] = loaded.ppo_epochs
        # rlhfkit scores and trains a prompt's G responses as one packed sequence (prompt once)
        spec["shared_group"] = loaded.rollout.n if getattr(loaded, "share_prompt", False) else 1
    if method == "dpo":
        spec["shared_group"] = 2 if loaded.dpo.share_prompt else 1
    if method == "rm":  # each pair one packed sequence, as in DPO (with a pooling that allows it)
        from rlhfkit.models import PACKABLE_POOLINGS

        spec["shared_group"] = 2 if loaded.share_prompt and loaded.pooling in PACKABLE_POOLINGS else 1
    if job == "dpo-precomputed":  # both sides' reference pass covers only the pairs the steps use
        spec["overrides"].append(f"data.limit={total * loaded.train.batch_size}")
    return spec


def main() -> None:
    args = parse_args()
    import torch

    from rlhfkit.models import DEFAULT_MODEL, resolve_model_path

    out = Path(args.out)
    if args.tiny:
        from common import tiny_model_dir

        args.model, out = tiny_model_dir(), out / "tiny"
    out.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model_path(args.model or DEFAULT_MODEL)
    from transformers import AutoConfig

    model_cfg = AutoConfig.from_pretrained(model_dir)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in JOBS]
    if unknown:
        sys.exit(f"--methods: unknown {unknown}; expected some of {', '.join(JOBS)}")
    extra: dict[str, list[str]] = {m: [] for m in JOBS}
    for item in args.set:
        m, _, kv = item.partition(".")
        if m not in extra or "=" not in kv:
            sys.exit(f"--set {item!r}: expected METHOD.key=value with METHOD in {JOBS}")
        extra[m].append(kv)
    pythons = {m: (args.ppo_python or args.python) if m == "ppo" else args.python for m in methods}
    versions = {py: trl_version(py) for py in set(pythons.values())}

    if args.threads:
        torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    t_start = time.time()
    peak_n = 256 if args.tiny else 2048
    peak0 = matmul_peak_gflops(peak_n)
    bw_mb = 64 if args.tiny else 256  # the copy buffer of the bandwidth measurements
    bw0 = memory_bandwidth_gbs(bw_mb)
    print(f"rlhfkit vs TRL {', '.join(sorted(set(versions.values())))} | torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads | model {model_dir} (fp32) | fp32 matmul peak ({peak_n}^3, best of 10): "
          f"{peak0:.1f} GFLOP/s | memory bandwidth (copy, read + write) {bw0:.1f} GB/s | "
          f"loadavg {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} | TRL malloc: "
          f"{'rlhfkit settings' if args.trl_malloc else 'glibc default'}", flush=True)

    results = {}
    for i, job in enumerate(methods):
        spec = job_spec(job, args, model_dir, out, extra[job])
        spec["trl_version"] = versions[pythons[job]]
        print(f"\n== {job} against TRL {spec['trl_version']}: {args.warmup} warm-up + {spec['steps'] - args.warmup} "
              f"timed steps; rlhfkit config {spec['config']} with "
              f"{' '.join(o for o in spec['overrides'] if not o.startswith('train.output_dir'))}", flush=True)
        try:
            workers = run_method(job, spec, out, pythons[job], first="rlhfkit" if i % 2 == 0 else "trl")
        except RuntimeError as e:
            print(f"  FAILED: {e}", flush=True)
            continue
        method = job_method(job)
        data = data_tokens_per_step(job, spec, spec["steps"]) if method in ("sft", "rm", "dpo") else None
        results[job] = (workers, spec, data)

    peak1 = matmul_peak_gflops(peak_n)
    peak = max(peak0, peak1)
    bw1 = memory_bandwidth_gbs(bw_mb)
    load1 = os.getloadavg()
    print(f"\nfp32 matmul peak: {peak0:.1f} GFLOP/s before, {peak1:.1f} after -> using {peak:.1f} | "
          f"memory bandwidth: {bw0:.1f} GB/s before, {bw1:.1f} after (the rollouts are bound by it) | "
          f"loadavg at start {load0[0]:.2f}, at end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} | "
          f"wall {time.time() - t_start:.0f} s")
    summary = {"trl": versions, "torch": torch.__version__, "peak_gflops": peak,
               "bandwidth_gbs": [bw0, bw1], "model": model_dir,
               "loadavg_start": load0, "loadavg_end": load1, "methods": {}}
    for job, (workers, spec, data) in results.items():
        rows = report(job, workers, spec, args.warmup, model_cfg, data, peak)
        summary["methods"][job] = {"rows": rows, "overrides": spec["overrides"], "trl": spec["trl_version"],
                                   "curves": {fw: w.result.get("curve") for fw, w in workers.items()},
                                   "steps": {fw: w.steps for fw, w in workers.items()}}
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"\nraw numbers: {out / 'results.json'}; worker logs: {out}/<method>_<framework>.log")


if __name__ == "__main__":
    main()
