"""Data parallelism on CPU: 2 processes (torchrun, gloo) against 1 process with the same global batch.

One `torchrun --nproc_per_node 2` job runs every 2-process case (tests/dist_worker.py: the CLI,
several invocations per job, so torch is imported once); the 1-process references run in this
process through the same CLI entry point.

- SFT, RM and DPO: the same global batches, split over the ranks and accumulated, give the same
  per-step losses and the same final weights (differences: summation order only).
- A checkpoint written by 2 processes resumes on 1, and one written by 1 resumes on 2.
- GRPO and PPO: each rank samples its own prompts from its own stream (`sampling_seed`), so a
  2-process rollout cannot equal a 1-process one. What must hold is that everything after the
  sampling is the 1-process computation: the 1-process run is fed the very experience the two
  ranks sampled (their prompts and rollouts, concatenated), and then its metrics (global
  reductions: whitening, KL controller, losses, clip fraction) and final weights must match.
  That the two replicas stay identical is checked by the trainers themselves
  (`DataParallel.check_replicas` before the final save).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl

from rlhfkit.cli import main as cli

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

HERE = Path(__file__).resolve().parent
try:
    import deepspeed  # noqa: F401

    HAVE_DEEPSPEED = True
except ImportError:  # an optional extra: `pip install -e '.[deepspeed]'` (make test installs it)
    HAVE_DEEPSPEED = False
needs_deepspeed = pytest.mark.skipif(not HAVE_DEEPSPEED, reason="DeepSpeed is not installed")
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)  # per-step losses: summation order only
# Final weights: Adam divides each gradient by its running RMS, so an element whose gradient is
# ~0 moves by up to lr whatever the rounding of that tiny gradient; lr 1e-4 keeps that below 1e-5.
PARAM_ATOL = 1e-5

LORA = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8"]
COMMON = ["train.progress=false", "optim.lr=1e-4", "optim.schedule=constant", "optim.warmup_ratio=0",
          "train.batch_size=8", "train.micro_batch_size=2", "data.max_length=64"]


def _sft_args(model, data, out, *extra):
    return ["sft", f"model.name={model}", f"data.train={data}", "data.eval_fraction=0.1",
            f"train.output_dir={out}", "train.max_steps=4", "train.save_every=2", *COMMON, *extra]


def _pref_args(kind, model, data, out):
    return [kind, f"model.name={model}", f"data.train={data}", "data.eval_fraction=0.1",
            f"train.output_dir={out}", "train.max_steps=2", *COMMON]


def _pg_args(kind, work: Path, out: Path, reward: str | None = None):
    """reward: a reward spec instead of the e-share function (the FSDP GRPO run uses the 2-process RM)."""
    reward = reward or f"{work / 'reward_fn.py'}:e_share"
    args = [kind, f"model.name={work / 'policy'}", f"prompts.train={work / 'prompts.jsonl'}",
            f"reward.spec={reward}", "reward.batch_size=4", "rollout.n=4", "rollout.max_new_tokens=6",
            "mini_batch_size=16", "ppo_epochs=2", "train.batch_size=4", "train.micro_batch_size=4",
            "train.max_steps=2", "train.progress=false", "optim.lr=1e-4", f"train.output_dir={out}"]
    if kind == "grpo":
        return args + ["kl_coef=0.04"]
    # PPO: critic from the policy; an adaptive KL controller, so beta must move the same way on all ranks
    return args + ["critic_init=policy", "kl.target=0.01", "kl.horizon=100", "critic_optim.lr=1e-4"]


def _online_args(work: Path, out: Path):
    return ["online-dpo", f"model.name={work / 'policy'}", f"prompts.train={work / 'prompts.jsonl'}",
            f"scorer={work / 'reward_fn.py'}:e_share", "rollout.n=3", "rollout.max_new_tokens=6", "iterations=2",
            "prompts_per_iteration=4", "train.batch_size=2", "train.micro_batch_size=1", "train.epochs=1",
            "train.progress=false", "optim.lr=1e-4", "dpo.precompute_ref_logps=true", f"train.output_dir={out}",
            # held out: each rank scores its share with the pointwise scorer, the best iteration is kept
            f"prompts.eval={work / 'prompts.jsonl'}", "prompts.eval_limit=4", "train.eval_every=1",
            "train.select_best=eval/proxy_mean"]


def _rm(work: Path) -> str:
    # the reward model trained by the 2-process RM job (which runs earlier in the same torchrun job)
    return f"rm:{work / 'rm-2' / 'model'}"


def _ptx(work: Path) -> list[str]:
    # 8 SFT examples per rank per step: two micro-batches, so the actor's gradients accumulate
    # over its last policy micro-batch and two PTX ones before they are reduced
    return [f"ptx.data={work / 'sft.jsonl'}", "ptx.coef=0.5", "ptx.batch_size=16", "ptx.max_length=64"]


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """The 1-process runs here use one thread, like each of the two processes (and a shared CPU)."""


# the FSDP RM runs' head: a token head reading the last layer and the input embeddings
RM_FSDP = ["head_init=probe", "head_hidden=8", "head_embeddings=true", "pooling=mean"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, tokenizer):
    """Every 2-process run, in one torchrun job; plus the 1-process SFT run the 2-process job resumes."""
    from pg_utils import tiny_policy_dir, write_prompts, write_reward

    work = tmp_path_factory.mktemp("dist")
    sft = write_jsonl(work / "sft.jsonl", [
        {"prompt": f"Count to {i}", "response": " ".join(str(j) for j in range(1, i % 7 + 2))} for i in range(48)])
    pref = write_jsonl(work / "pref.jsonl", [
        {"prompt": f"Name a colour like {c}", "chosen": c + " yes" * (i % 3), "rejected": "no idea" + " hmm" * (i % 4)}
        for i, c in enumerate(COLOURS * 6)])
    one_pair = write_jsonl(work / "pref-1.jsonl", [{"prompt": "Name a colour", "chosen": "red", "rejected": "no"}])
    for n in (1, 3):  # held-out prompts for the policy-gradient evaluation: fewer than, or uneven over, 2 ranks
        write_jsonl(work / f"eval-{n}.jsonl", [{"prompt": f"Tell me about the sea {i}"} for i in range(n)])
    tiny_policy_dir(tokenizer, work / "policy")
    write_prompts(work / "prompts.jsonl")
    write_reward(work / "reward_fn.py")

    # A 1-process SFT run whose step-2 checkpoint the 2-process job resumes.
    assert cli(_sft_args(tiny_model_dir, sft, work / "sft-1")) == 0
    for name in ("sft-1to2", "sft-1to2-fsdp", "sft-1to2-zero2"):
        _interrupted_copy(work / "sft-1", work / name, 2)
    # A 1-process LoRA DPO run, the reference of the LoRA runs; ZeRO 2 resumes its step-1 checkpoint.
    assert cli(_pref_args("dpo", tiny_model_dir, pref, work / "dpo-lora-1") + [*LORA, "train.save_every=1"]) == 0
    _interrupted_copy(work / "dpo-lora-1", work / "dpo-lora-1to2-zero2", 1)

    jobs = [
        {"argv": _sft_args(tiny_model_dir, sft, work / "sft-2")},
        {"argv": _sft_args(tiny_model_dir, sft, work / "sft-1to2", "--resume")},
        {"argv": _pref_args("dpo", tiny_model_dir, pref, work / "dpo-2")},
        {"argv": _pref_args("rm", tiny_model_dir, pref, work / "rm-2")},
        # fewer held-out pairs than processes: one rank scores none and still joins the sums
        {"argv": _pref_args("dpo", tiny_model_dir, pref, work / "dpo-2-one-eval") + [f"data.eval={one_pair}",
                                                                                  "data.eval_fraction=0"]},
        # FSDP2: the same runs with the models sharded over the two ranks
        {"argv": _sft_args(tiny_model_dir, sft, work / "sft-fsdp", "train.fsdp=true")},
        {"argv": _sft_args(tiny_model_dir, sft, work / "sft-1to2-fsdp", "train.fsdp=true", "--resume")},
        {"argv": _pref_args("dpo", tiny_model_dir, pref, work / "dpo-fsdp") + ["train.fsdp=true"]},
        {"argv": _pref_args("rm", tiny_model_dir, pref, work / "rm-fsdp") + ["train.fsdp=true", *RM_FSDP]},
        {"argv": _pg_args("grpo", work, work / "grpo-2"), "capture": str(work / "grpo-2-rollouts")},
        {"argv": _pg_args("ppo", work, work / "ppo-2"), "capture": str(work / "ppo-2-rollouts")},
        *({"argv": _pg_args("grpo", work, work / f"grpo-2-eval-{n}") + [
            f"prompts.eval={work / f'eval-{n}.jsonl'}", "train.eval_every=1", "train.max_steps=1"]} for n in (1, 3)),
        # FSDP2 for the policy-gradient trainers: actor (and critic) sharded, gathered for the rollout
        {"argv": _pg_args("grpo", work, work / "grpo-fsdp", reward=_rm(work)) + ["train.fsdp=true"],
         "capture": str(work / "grpo-fsdp-rollouts")},
        {"argv": _pg_args("ppo", work, work / "ppo-fsdp") + ["train.fsdp=true", "train.save_every=1"],
         "capture": str(work / "ppo-fsdp-rollouts")},
        # LoRA under FSDP: the frozen base and the adapters sharded; saves gather the adapters only
        {"argv": _pref_args("dpo", tiny_model_dir, pref, work / "dpo-lora-fsdp") + [*LORA, "train.fsdp=true",
                                                                                 "train.save_every=1"]},
        {"argv": _pg_args("ppo", work, work / "ppo-lora-fsdp") + [*LORA, *_ptx(work), "train.fsdp=true",
                                                                  "train.save_every=1"],
         "capture": str(work / "ppo-lora-fsdp-rollouts")},
        {"argv": _online_args(work, work / "online-2")},
        # DeepSpeed ZeRO 1 and 2: optimizer state (and gradients) partitioned over the two ranks
        *([{"argv": _sft_args(tiny_model_dir, sft, work / "sft-zero2", "train.zero_stage=2")},
           {"argv": _sft_args(tiny_model_dir, sft, work / "sft-zero1", "train.zero_stage=1")},
           {"argv": _sft_args(tiny_model_dir, sft, work / "sft-1to2-zero2", "train.zero_stage=2", "--resume")},
           {"argv": _pref_args("dpo", tiny_model_dir, pref, work / "dpo-zero2") + ["train.zero_stage=2"]},
           {"argv": _pref_args("rm", tiny_model_dir, pref, work / "rm-zero2") + ["train.zero_stage=2", "head_init=probe"]},
           # LoRA under ZeRO 2: only the adapters are in the (partitioned) optimizer
           {"argv": _pref_args("dpo", tiny_model_dir, pref, work / "dpo-lora-zero2") + [*LORA, "train.zero_stage=2"]},
           {"argv": _pref_args("dpo", tiny_model_dir, pref, work / "dpo-lora-1to2-zero2") + [
               *LORA, "train.zero_stage=2", "train.save_every=1", "--resume"]},
           # the policy-gradient trainers: actor (and critic) each a ZeRO 2 engine
           {"argv": _pg_args("grpo", work, work / "grpo-zero2") + ["train.zero_stage=2"],
            "capture": str(work / "grpo-zero2-rollouts")},
           {"argv": _pg_args("ppo", work, work / "ppo-zero2") + ["train.zero_stage=2"],
            "capture": str(work / "ppo-zero2-rollouts")},
           ] if HAVE_DEEPSPEED else []),
        {"argv": ["pm", f"model.name={tiny_model_dir}", f"data.train={pref}", "data.eval_fraction=0.25",
                  "train.max_steps=2", "eval_untrained=false", f"train.output_dir={work / 'pm-2'}", *COMMON,
                  "data.max_length=160"]},
    ]
    (work / "jobs.json").write_text(json.dumps([{**j, "argv": [str(a) for a in j["argv"]]} for j in jobs]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "dist_worker.py"), str(work / "jobs.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return work


def _losses(run: Path, key: str = "train/loss") -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    return {r["step"]: r[key] for r in rows if key in r}


def _weights(run: Path, model: str = "model") -> dict[str, torch.Tensor]:
    """A saved model's tensors: the full model, or a LoRA run's adapter (peft's file)."""
    from safetensors.torch import load_file

    adapter = run / model / "adapter_model.safetensors"
    return load_file(str(adapter if adapter.is_file() else run / model / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path, atol: float = PARAM_ATOL, model: str = "model") -> None:
    wa, wb = _weights(a, model), _weights(b, model)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def _interrupted_copy(source: Path, dest: Path, step: int) -> Path:
    """``dest``: run ``source`` as if stopped right after its step-``step`` checkpoint (no final
    models, no later checkpoints), for a --resume to continue from that step."""
    shutil.copytree(source, dest)
    for name in ("model", "critic"):
        shutil.rmtree(dest / name, ignore_errors=True)
    for ckpt in (dest / "checkpoints").glob("step-*"):
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    return dest


def _assert_resumed(source: Path, resumed: Path, step: int) -> None:
    """``resumed`` continued ``source``'s checkpoint at ``step`` rather than starting over: the
    records up to that step are the source's own (wall-clock times included), later ones new."""
    def rows(run):
        return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}

    before, after = rows(source), rows(resumed)
    assert [after[k] for k in after if k <= step] == [before[k] for k in before if k <= step]
    later = [k for k in after if k > step]
    assert later and all(after[k]["time"] != before.get(k, {}).get("time") for k in later)


def _assert_same_metrics(a: Path, b: Path, keys: list[str], **tol) -> None:
    tol = tol or LOSS_TOL
    for key in keys:
        la, lb = _losses(a, key), _losses(b, key)
        assert la and la.keys() == lb.keys(), (key, la, lb)
        torch.testing.assert_close(torch.tensor(list(la.values()), dtype=torch.float64),
                                   torch.tensor(list(lb.values()), dtype=torch.float64),
                                   **tol, msg=lambda m, key=key: f"{key}: {m}")


def test_sft_two_processes_equal_one(runs):
    _assert_same_metrics(runs / "sft-1", runs / "sft-2", ["train/loss", "train/grad_norm", "eval/loss"])
    assert _losses(runs / "sft-2", "train/tokens") == _losses(runs / "sft-1", "train/tokens")  # global counts
    _assert_same_weights(runs / "sft-1", runs / "sft-2")
    # written once, by rank 0: step 2 and the last step (4), which an evaluation just preceded
    assert sorted(p.name for p in (runs / "sft-2" / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]


def _finish_on_one_process(runs: Path, tiny_model_dir, two: str, resumed: str, expect: str) -> None:
    """Copy 2-process SFT run ``two`` without its final model, resume it here from its step-2
    checkpoint, and compare the losses and weights with run ``expect``."""
    _interrupted_copy(runs / two, runs / resumed, 2)
    assert cli(_sft_args(tiny_model_dir, runs / "sft.jsonl", runs / resumed, "--resume")) == 0
    _assert_resumed(runs / two, runs / resumed, 2)
    _assert_same_metrics(runs / expect, runs / resumed, ["train/loss"])
    _assert_same_weights(runs / expect, runs / resumed)


def test_checkpoints_resume_across_world_sizes(runs, tiny_model_dir):
    # 1 -> 2 processes: the 1-process checkpoint at step 2, finished by 2 processes
    _assert_resumed(runs / "sft-1", runs / "sft-1to2", 2)
    _assert_same_metrics(runs / "sft-1", runs / "sft-1to2", ["train/loss"])
    _assert_same_weights(runs / "sft-1", runs / "sft-1to2")
    # 2 -> 1 process: the 2-process checkpoint at step 2, finished here
    _finish_on_one_process(runs, tiny_model_dir, "sft-2", "sft-2to1", expect="sft-2")
    rng = torch.load(runs / "sft-2" / "checkpoints" / "step-00000002" / "rng.pt", weights_only=True)
    assert rng["world_size"] == 2 and len(rng["ranks"]) == 2  # each rank's stream is kept


@pytest.mark.parametrize("kind", ["dpo", "rm"])
def test_preference_trainers_two_processes_equal_one(runs, tiny_model_dir, kind):
    one = runs / f"{kind}-1"
    assert cli(_pref_args(kind, tiny_model_dir, runs / "pref.jsonl", one)) == 0
    keys = ["train/loss", "train/grad_norm"] + (["eval/loss", "train/rewards/margin"] if kind == "dpo"
                                                else ["train/accuracy", "eval/margin"])
    _assert_same_metrics(one, runs / f"{kind}-2", keys)
    _assert_same_weights(one, runs / f"{kind}-2")


def test_a_held_out_set_smaller_than_the_processes_is_scored_as_on_one(runs, tiny_model_dir):
    """One held-out pair on two processes: the rank with no pair adds zeros to the sums (it once
    waited forever for a reduction of another length), and the metrics are the 1-process ones."""
    one = runs / "dpo-1-one-eval"
    extra = [f"data.eval={runs / 'pref-1.jsonl'}", "data.eval_fraction=0"]
    assert cli(_pref_args("dpo", tiny_model_dir, runs / "pref.jsonl", one) + extra) == 0
    _assert_same_metrics(one, runs / "dpo-2-one-eval", ["eval/loss", "eval/rewards/margin", "eval/pairs"])


@pytest.mark.parametrize("n", [1, 3])
def test_policy_gradient_held_out_evaluation_scores_every_prompt_on_two_processes(runs, n):
    """Data parallelism runs no collective forward: each rank scores its share, however uneven,
    and a rank with none joins the gather with no rows; no held-out prompt is left out."""
    rows = [json.loads(line) for line in (runs / f"grpo-2-eval-{n}" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/prompts" in r]
    assert [r["step"] for r in evals] == [0, 1] and all(r["eval/prompts"] == n for r in evals), evals
    assert all(0.0 <= r["eval/eos_frac"] <= 1.0 and r["eval/length_mean"] > 0 for r in evals)


def _assert_sharded(run: Path, results: str) -> None:
    layout = json.loads((run / results).read_text())["distributed"]
    assert layout["strategy"] == "fsdp" and layout["world_size"] == 2
    # rank 0 alone read the trained model's weights; rank 1 built it on the meta device and got its shards
    assert layout["weights_read_by_ranks"] == [0], layout
    # every block and the root are split in two (up to one row of rounding per parameter)
    assert layout["param_elements_on_rank"] < 0.51 * layout["param_elements"], layout


def test_fsdp_two_processes_equal_one(runs):
    """SFT with the model sharded over 2 processes (FSDP2, gloo): the 1-process run's losses and
    weights; its checkpoint holds full tensors in the unsharded format, written once."""
    _assert_sharded(runs / "sft-fsdp", "sft_results.json")
    _assert_same_metrics(runs / "sft-1", runs / "sft-fsdp", ["train/loss", "train/grad_norm", "eval/loss"])
    _assert_same_weights(runs / "sft-1", runs / "sft-fsdp")
    ckpt = runs / "sft-fsdp" / "checkpoints" / "step-00000002"
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["step-00000002", "step-00000004"]
    plain = _weights(runs / "sft-1")
    saved = _weights(ckpt)  # the step-2 weights, whole
    assert saved.keys() == plain.keys() and all(saved[k].shape == plain[k].shape for k in plain)
    config = json.loads((runs / "sft-fsdp" / "model" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(runs / "sft-fsdp" / "model")  # loads as is


def test_fsdp_checkpoints_resume_across_world_sizes_and_layouts(runs, tiny_model_dir):
    # 1 process, unsharded -> 2 processes, sharded: the optimizer state is re-keyed and sharded
    _assert_sharded(runs / "sft-1to2-fsdp", "sft_results.json")
    _assert_resumed(runs / "sft-1", runs / "sft-1to2-fsdp", 2)
    _assert_same_metrics(runs / "sft-1", runs / "sft-1to2-fsdp", ["train/loss"])
    _assert_same_weights(runs / "sft-1", runs / "sft-1to2-fsdp")
    # 2 processes, sharded -> 1 process, unsharded: the full, name-keyed state loads into a plain model
    saved = torch.load(runs / "sft-fsdp" / "checkpoints" / "step-00000002" / "optim.pt",
                       weights_only=True)["optimizer"]
    assert all(isinstance(k, str) for k in saved["state"])  # keyed by parameter name
    _finish_on_one_process(runs, tiny_model_dir, "sft-fsdp", "sft-fsdp-to1", expect="sft-1")


@pytest.mark.parametrize("kind", ["dpo", "rm"])
def test_fsdp_preference_trainers_equal_one_process(runs, tiny_model_dir, kind):
    # the RM fits a token head first: per-token features from the sharded forward, head set per shard,
    # the saved model gathered into a plain one with the same head
    extra = RM_FSDP if kind == "rm" else []
    one = runs / f"{kind}-1-fsdp-ref"
    assert cli(_pref_args(kind, tiny_model_dir, runs / "pref.jsonl", one) + extra) == 0
    _assert_sharded(runs / f"{kind}-fsdp", f"{kind}_results.json")
    if kind == "dpo":  # its frozen reference (a copy of the starting policy) is sharded too
        assert json.loads((runs / "dpo-fsdp" / "dpo_results.json").read_text())["distributed"]["sharded_frozen"] == [
            "reference"]
    keys = ["train/loss", "train/grad_norm"] + (["eval/loss", "train/rewards/margin"] if kind == "dpo"
                                                else ["train/accuracy", "eval/margin"])
    _assert_same_metrics(one, runs / f"{kind}-fsdp", keys)
    _assert_same_weights(one, runs / f"{kind}-fsdp")


def _replay(monkeypatch, module, captured: Path) -> None:
    """Make `module`'s 1-process loop use the prompts and rollouts the two ranks had: rank 0's rows,
    then rank 1's (groups stay contiguous), with prompt indices renumbered into the joint list."""
    from rlhfkit.rollout import Experience

    def load(step):
        parts = [torch.load(captured / f"rollout-{step}-rank{r}.pt", weights_only=False) for r in (0, 1)]
        items = parts[0]["items"] + parts[1]["items"]
        exps = [parts[0]["exp"], parts[1]["exp"]]
        exps[1].prompt_index = exps[1].prompt_index + len(parts[0]["items"])
        return items, Experience.cat(exps)

    state = {}

    def prompt_batch(run, step):
        state["items"], state["exp"] = load(step)
        return state["items"]

    monkeypatch.setattr(module, "prompt_batch", prompt_batch)
    monkeypatch.setattr(module, "rollout", lambda *args, **kw: state["exp"])


@pytest.mark.parametrize("layout", ["ddp", "fsdp", pytest.param("zero2", marks=needs_deepspeed)])
@pytest.mark.parametrize("kind", ["grpo", "ppo"])
def test_policy_gradient_update_equals_one_process_on_the_same_experience(runs, monkeypatch, kind, layout):
    """Data-parallel (replicas, gradients all-reduced), FSDP (actor, reference and critic sharded;
    the actor gathered for the rollout) or ZeRO 2 (actor and critic each a DeepSpeed engine,
    optimizer state and gradients partitioned): the 2-process run is the 1-process computation."""
    import importlib

    two = runs / (f"{kind}-2" if layout == "ddp" else f"{kind}-{layout}")
    _replay(monkeypatch, importlib.import_module(f"rlhfkit.trainers.{kind}"), runs / f"{two.name}-rollouts")
    one = runs / f"{kind}-1-{layout}"
    rm = (kind, layout) == ("grpo", "fsdp")  # scored by a reward model, sharded like the actor
    assert cli(_pg_args(kind, runs, one, reward=_rm(runs) if rm else None)) == 0
    _assert_same_pg_run(kind, one, two)
    strategy = json.loads((two / f"{kind}_results.json").read_text())["distributed"]["strategy"]
    assert strategy == {"ddp": "ddp", "fsdp": "fsdp", "zero2": "zero2"}[layout]
    if layout == "zero2":  # the partitioned optimizer holds a share of the trainable elements on each rank
        layout_info = json.loads((two / f"{kind}_results.json").read_text())["distributed"]
        assert layout_info["optimizer_elements_on_rank"] < layout_info["optimizer_elements"]
    if layout == "fsdp":
        _assert_sharded(two, f"{kind}_results.json")
        frozen = json.loads((two / f"{kind}_results.json").read_text())["distributed"]["sharded_frozen"]
        assert frozen == (["reference", "reward_model"] if rm else ["reference"])
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(two / "model")  # the gathered actor loads as is


def test_sharded_ppo_checkpoint_resumes_on_one_process(runs, monkeypatch):
    """The FSDP PPO run's step-1 checkpoint (actor, critic, both optimizers gathered and keyed by
    name, KL controller) finished by 1 process on the same experience: the 2-process results."""
    from rlhfkit.trainers import ppo

    two = runs / "ppo-fsdp"
    ckpt = two / "checkpoints" / "step-00000001"
    assert {p.name for p in ckpt.iterdir()} >= {"actor", "critic", "optim.pt", "trainer_state.json"}
    optim = torch.load(ckpt / "optim.pt", weights_only=True)
    assert all(isinstance(k, str) for k in optim["actor"]["state"])  # by parameter name: any world size
    resumed = runs / "ppo-fsdp-to1"
    _interrupted_copy(two, resumed, 1)
    _replay(monkeypatch, ppo, runs / "ppo-fsdp-rollouts")
    assert cli(_pg_args("ppo", runs, resumed) + ["--resume"]) == 0
    _assert_resumed(two, resumed, 1)
    assert sorted(_losses(resumed, "loss/policy")) == [1, 2]
    _assert_same_pg_run("ppo", resumed, two)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft 0.21 on transformers 5
def test_fsdp_lora_dpo_equals_one_process_and_resumes_on_one(runs, tiny_model_dir):
    """LoRA DPO with the model sharded (frozen base and adapters alike; the reference is the base
    with the adapters disabled): the 1-process run's losses and adapter. The saved model and every
    checkpoint are peft adapter directories holding the adapter's tensors alone, gathered whole;
    the step-1 checkpoint finished on 1 process gives the 2-process result."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    two, one = runs / "dpo-lora-fsdp", runs / "dpo-lora-1"
    _assert_sharded(two, "dpo_results.json")
    keys = ["train/loss", "train/grad_norm", "eval/loss", "train/rewards/margin"]
    _assert_same_metrics(one, two, keys)
    _assert_same_weights(one, two)
    adapter = _weights(two)
    assert adapter and all("lora_" in k for k in adapter)  # no base tensor was gathered into the save
    assert abs(_losses(two)[2] - _losses(two)[1]) > 1e-4  # the adapters moved between the two steps
    ckpt = two / "checkpoints" / "step-00000001"
    assert (ckpt / "model" / "adapter_config.json").is_file()
    assert all(isinstance(k, str) for k in torch.load(ckpt / "optim.pt", weights_only=True)["optimizer"]["state"])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded = PeftModel.from_pretrained(base, two / "model")  # peft loads it as is
    live = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert len(live) == len(adapter)

    resumed = runs / "dpo-lora-fsdp-to1"
    _interrupted_copy(two, resumed, 1)
    assert cli(_pref_args("dpo", tiny_model_dir, runs / "pref.jsonl", resumed) + LORA + ["--resume"]) == 0
    _assert_resumed(two, resumed, 1)
    _assert_same_metrics(two, resumed, keys)
    _assert_same_weights(two, resumed)


def test_fsdp_lora_ppo_equals_one_process_on_the_same_experience(runs, monkeypatch):
    """LoRA PPO with a PTX term, sharded: actor and critic adapters (the critic's scalar head
    trained in full), the reference being the actor's base with adapters disabled. On the ranks'
    experience, 1 process gets the same metrics, actor adapter and critic adapter + head; the
    step-1 checkpoint resumes on 1 process to the same result."""
    from rlhfkit.trainers import ppo

    two = runs / "ppo-lora-fsdp"
    _replay(monkeypatch, ppo, runs / "ppo-lora-fsdp-rollouts")
    one = runs / "ppo-lora-1"
    assert cli(_pg_args("ppo", runs, one) + LORA + _ptx(runs)) == 0
    _assert_sharded(two, "ppo_results.json")
    _assert_same_pg_run("ppo", one, two)
    _assert_same_metrics(one, two, ["loss/ptx"])
    critic = _weights(two, "critic")
    assert any("score" in k for k in critic) and all("lora_" in k or "score" in k for k in critic)
    assert max(float(v.abs().max()) for k, v in _weights(two).items() if "lora_B" in k) > 1e-5  # B starts at 0

    resumed = runs / "ppo-lora-fsdp-to1"
    _interrupted_copy(two, resumed, 1)
    assert cli(_pg_args("ppo", runs, resumed) + LORA + _ptx(runs) + ["--resume"]) == 0
    _assert_resumed(two, resumed, 1)
    assert sorted(_losses(resumed, "loss/policy")) == [1, 2]
    _assert_same_pg_run("ppo", resumed, two)


def _assert_same_pg_run(kind: str, one: Path, two: Path) -> None:
    keys = ["reward/score_mean", "reward/score_std", "policy/entropy", "response/length_mean", "objective/kl",
            "loss/policy", "policy/clipfrac", "policy/approx_kl", "policy/ratio_first"]
    norms = ["policy/grad_norm"]
    if kind == "grpo":
        keys += ["loss/kl", "advantage/abs_mean", "reward/group_std_mean"]
    else:
        keys += ["loss/value", "value/explained_variance", "value/mean", "objective/kl_coef"]
        norms += ["value/grad_norm"]
    _assert_same_metrics(one, two, keys)
    # DeepSpeed sums the partitions' squared gradient norms in its own order: rounding of ~3e-5
    # relative on a norm, while the updates themselves (compared below) agree to WEIGHT_TOL
    _assert_same_metrics(one, two, norms, rtol=1e-4, atol=1e-6)
    _assert_same_weights(one, two)
    if kind == "ppo":
        _assert_same_weights(one, two, model="critic")


def test_online_dpo_on_two_processes(runs, tokenizer):
    """Each rank samples its strided share of the slice from its own stream; rank 0 puts the
    responses back in prompt order, scores and writes; every iteration's DPO runs on both ranks."""
    import random

    from rlhfkit.config import load_config
    from rlhfkit.models import load_causal_lm
    from rlhfkit.rng import set_seed
    from rlhfkit.rollout import (
        decode_responses,
        load_prompt_items,
        rank_stream_seed,
        rollout,
    )
    from rlhfkit.trainers.online_dpo import OnlineDPOConfig

    run = runs / "online-2"
    results = json.loads((run / "online_dpo_results.json").read_text())
    assert results["world_size"] == 2 and results["labels_used"] == 2 * 4 * 3  # one score per response
    for k in (1, 2):
        dpo = json.loads((run / f"iter-{k}" / "dpo_results.json").read_text())
        assert dpo["distributed"]["world_size"] == 2
    # iteration 1 samples pi_0: redo rank 0's and rank 1's rollouts here and find them in place
    cfg = load_config(OnlineDPOConfig, overrides=_online_args(runs, run)[1:])
    items, _ = load_prompt_items(cfg.prompts.train, tokenizer, max_prompt_length=cfg.prompts.max_prompt_length)
    random.Random(cfg.train.seed).shuffle(items)
    chunk = items[:4]
    samples = [json.loads(line) for line in (run / "iter-1" / "samples.jsonl").read_text().splitlines()]
    assert [r["group"] for r in samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert [r["prompt"] for r in samples[::3]] == [it.messages for it in chunk]
    policy = load_causal_lm(str(runs / "policy"))
    for rank in (0, 1):
        set_seed(cfg.train.seed * 1000 + 1)
        exp = rollout(policy, chunk[rank::2], cfg.rollout, tokenizer, seed=rank_stream_seed(cfg.train.seed, 1, rank))
        mine = decode_responses(exp, tokenizer)
        for j, g in enumerate(range(rank, 4, 2)):
            assert [r["response"] for r in samples[3 * g:3 * g + 3]] == mine[3 * j:3 * j + 3], (rank, g)
    for r in samples:  # scored by rank 0 with the user's function, row by row
        assert r["score"] == pytest.approx(r["response"].count("e") / max(len(r["response"]), 1))
    # the held-out evaluation at the start and after each iteration, with the pointwise scorer's mean
    evals = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "eval/proxy_mean" in r}
    assert sorted(evals) == [0, 1, 2] and all(r["eval/prompts"] == 4 for r in evals.values())
    best = max(evals, key=lambda k: evals[k]["eval/proxy_mean"])
    assert results["best"]["metric"] == "eval/proxy_mean" and results["best"]["step"] == best


def test_preference_model_on_two_processes(runs, tiny_model_dir):
    """`rlhfkit pm` is SFT on A/B conversations: on 2 processes the same per-step losses and weights
    as on 1, and rank 0 alone evaluates both orders of the held-out pairs."""
    one = runs / "pm-1"
    args = ["pm", f"model.name={tiny_model_dir}", f"data.train={runs / 'pref.jsonl'}", "data.eval_fraction=0.25",
            "train.max_steps=2", "eval_untrained=false", f"train.output_dir={one}", *COMMON, "data.max_length=160"]
    assert cli(args) == 0
    two = runs / "pm-2"
    assert json.loads((two / "sft_results.json").read_text())["distributed"]["world_size"] == 2
    _assert_same_metrics(one, two, ["train/loss", "train/grad_norm", "eval/loss"])
    _assert_same_weights(one, two)
    r1, r2 = (json.loads((d / "pm_results.json").read_text()) for d in (one, two))
    assert r2["pairs"]["eval"] == r1["pairs"]["eval"] == 12
    assert r2["pm"]["accuracy"] == pytest.approx(r1["pm"]["accuracy"], abs=1e-9)


@needs_deepspeed
@pytest.mark.parametrize("stage", [1, 2])
def test_zero_two_processes_equal_one(runs, stage):
    run = runs / f"sft-zero{stage}"
    layout = json.loads((run / "sft_results.json").read_text())["distributed"]
    assert layout["strategy"] == f"zero{stage}" and layout["world_size"] == 2
    # the AdamW state is partitioned: each rank steps about half of the elements
    assert layout["optimizer_elements_on_rank"] < 0.51 * layout["optimizer_elements"], layout
    _assert_same_metrics(runs / "sft-1", run, ["train/loss", "eval/loss"])
    _assert_zero_grad_norms(runs / "sft-1", run)
    _assert_same_weights(runs / "sft-1", run)
    optim = torch.load(run / "checkpoints" / "step-00000002" / "optim.pt", weights_only=True)["optimizer"]
    assert all(isinstance(k, str) for k in optim["state"])  # gathered, keyed by name: any layout resumes it


@needs_deepspeed
def test_zero_checkpoints_resume_across_world_sizes_and_layouts(runs, tiny_model_dir):
    # 1 process (plain AdamW) -> 2 processes under ZeRO 2
    _assert_resumed(runs / "sft-1", runs / "sft-1to2-zero2", 2)
    _assert_same_metrics(runs / "sft-1", runs / "sft-1to2-zero2", ["train/loss"])
    _assert_same_weights(runs / "sft-1", runs / "sft-1to2-zero2")
    # ZeRO 2 on 2 processes -> 1 process
    _finish_on_one_process(runs, tiny_model_dir, "sft-zero2", "sft-zero2-to1", expect="sft-1")


@needs_deepspeed
@pytest.mark.parametrize("kind", ["dpo", "rm"])
def test_zero_preference_trainers_equal_one_process(runs, tiny_model_dir, kind):
    one = runs / f"{kind}-1-zero-ref"
    extra = ["head_init=probe"] if kind == "rm" else []
    assert cli(_pref_args(kind, tiny_model_dir, runs / "pref.jsonl", one) + extra) == 0
    keys = ["train/loss"] + (["eval/loss", "train/rewards/margin"] if kind == "dpo" else ["train/accuracy", "eval/margin"])
    _assert_same_metrics(one, runs / f"{kind}-zero2", keys)
    _assert_zero_grad_norms(one, runs / f"{kind}-zero2")
    _assert_same_weights(one, runs / f"{kind}-zero2")


def _assert_zero_grad_norms(one: Path, zero: Path) -> None:
    """DeepSpeed reports the norm it computes from the partitioned fp32 gradients (and clips
    with). It runs 1e-5 to 2e-5 relative above torch's `clip_grad_norm_` on the same gradients,
    every step (FSDP's: 6e-6 below). The weights agree to 4e-8, so the clipping is the same to
    that precision; the norms are compared at 5e-5."""
    la, lb = _losses(one, "train/grad_norm"), _losses(zero, "train/grad_norm")
    assert la and la.keys() == lb.keys()
    torch.testing.assert_close(torch.tensor(list(lb.values())), torch.tensor(list(la.values())), rtol=5e-5, atol=0)


@needs_deepspeed
def test_zero_lora_dpo_equals_one_process_and_resumes_from_one(runs):
    """LoRA DPO under ZeRO 2 (the adapters' AdamW state and gradients partitioned, the frozen base
    whole on each rank): the 1-process losses and adapter; the 1-process step-1 checkpoint (an
    adapter directory) finished under ZeRO 2 gives them too."""
    keys = ["train/loss", "train/grad_norm", "eval/loss", "train/rewards/margin"]
    for run in ("dpo-lora-zero2", "dpo-lora-1to2-zero2"):
        layout = json.loads((runs / run / "dpo_results.json").read_text())["distributed"]
        assert layout["strategy"] == "zero2" and layout["optimizer_elements_on_rank"] < 0.51 * layout["optimizer_elements"]
        assert layout["optimizer_elements"] < 0.2 * layout["param_elements"]  # the adapters only
        if run.endswith("1to2-zero2"):
            _assert_resumed(runs / "dpo-lora-1", runs / run, 1)
        _assert_same_metrics(runs / "dpo-lora-1", runs / run, keys[:1] + keys[2:])
        _assert_zero_grad_norms(runs / "dpo-lora-1", runs / run)
        _assert_same_weights(runs / "dpo-lora-1", runs / run)
        assert (runs / run / "model" / "adapter_config.json").is_file()
