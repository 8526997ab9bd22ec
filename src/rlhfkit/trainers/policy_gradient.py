"""What PPO, GRPO and RLOO share (SPEC sections 4 and 5): config sections, prompt loading, the
actor and its reference, rollout, scoring, the clipped-surrogate update and run bookkeeping.

The trainers compose these pieces in numbered steps (1 rollout, 2 score, 3 rewards,
4 advantages, 5 update); only steps 3 and 4 differ between them (GAE with a critic vs group
baselines), plus the value loss that PPO adds to the update.

Two rules keep the first PPO ratio exactly 1:
- the behaviour log-probs (logp_old) are recomputed after the rollout with the *same* forward
  (`models.forward.causal_logprobs`) that the update uses, on the same padded tensors: the KV-cache
  decoding path is mathematically equal but not bit-identical. The rollout's own log-probs are
  kept only for a diagnostic (`rollout/logprob_diff_max`);
- the experience keeps one padded width (P prompt + R response columns) from scoring to update,
  so every row is computed on identical inputs in both passes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from rlhfkit.algos import kl_estimate, masked_sum
from rlhfkit.config import ConfigError, TrainSection
from rlhfkit.judges.rewards import RewardFn, build_reward_fn, prompt_text
from rlhfkit.models import load_causal_lm, load_tokenizer
from rlhfkit.models.loading import to_device
from rlhfkit.models.lora import adapters_disabled, apply_lora, enable_gradient_checkpointing
from rlhfkit.rollout import Experience, generate
from rlhfkit.trainers.checkpoint import Checkpointer, load_weights_into
from rlhfkit.trainers.common import (
    RunLogger, Runtime, StepGuard, batch_indices, prepare_run_dir, write_json_atomic,
)
from rlhfkit.trainers.pg_update import UpdateSettings, response_values
from rlhfkit.trainers.sources import resolve_source

log = logging.getLogger("rlhfkit")


# --------------------------------------------------------------------------- config sections

@dataclass
class PromptsSection:
    train: str = "task:sentiment"
    """Prompt source: a .jsonl/.json/.parquet/.csv file, hf:org/name[:split], or task:NAME (its prompts_train.jsonl)."""
    max_prompt_length: int = 256
    """Prompts longer than this many tokens (after the chat template) are dropped and counted."""
    limit: int = 0
    """Use only the first N prompts (0 = all)."""

    def validate(self, where: str) -> None:
        if not self.train:
            raise ConfigError(f"{where}.train: a prompt source is required")
        if self.max_prompt_length < 1:
            raise ConfigError(f"{where}.max_prompt_length: must be >= 1")


@dataclass
class PolicyTrainSection(TrainSection):
    """TrainSection with the policy-gradient meaning of the batch sizes: batch_size is the number of
    *prompts* per iteration (each sampled rollout.n times), micro_batch_size the number of *rows*
    (responses) per forward/backward, so the two need not divide each other."""

    batch_size: int = 16
    micro_batch_size: int = 8
    max_steps: int = 20

    def validate(self, where: str) -> None:
        if self.batch_size < 1 or self.micro_batch_size < 1:
            raise ConfigError(f"{where}.batch_size/micro_batch_size: must be >= 1")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError(f"{where}.epochs: set epochs > 0 or max_steps > 0")
        if self.zero_stage:
            raise ConfigError(f"{where}.zero_stage: DeepSpeed ZeRO is built for sft/rm/dpo/pm/online-dpo; the "
                              "policy-gradient trainers use train.fsdp=true (or data parallelism)")


@dataclass
class RolloutSection:
    n: int = 1
    """Responses sampled per prompt (GRPO/RLOO's group size G)."""
    max_new_tokens: int = 48
    """Response budget in tokens; responses that reach it without EOS count as truncated."""
    temperature: float = 1.0
    """Sampling temperature; 0 = greedy (evaluation only). Log-probs for the ratio and the KL always
    use the untempered model."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1 = off."""
    top_k: int = 0
    """Top-k filter; 0 = off."""
    micro_batch_size: int = 0
    """Rows per generation forward; 0 = all rows of a step at once."""

    def validate(self, where: str) -> None:
        if self.n < 1 or self.max_new_tokens < 1:
            raise ConfigError(f"{where}: n and max_new_tokens must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"{where}: need temperature >= 0 (0 = greedy) and 0 < top_p <= 1")


@dataclass
class RewardSection:
    spec: str = ""
    """Reward source: rm:DIR (trained reward model), task:NAME (gold judge), module:function or file.py:function."""
    clip: float = 0.0
    """Clip the sequence score to [-clip, clip]; 0 = no clipping."""
    missing_eos_score: Optional[float] = None
    """Score given *instead of* the reward to responses that never emitted EOS (SPEC 4.2); null = off."""
    batch_size: int = 16
    """Reward-model scoring micro-batch (rows per forward)."""

    def validate(self, where: str) -> None:
        if not self.spec:
            raise ConfigError(f"{where}.spec: a reward source is required (rm:DIR, task:NAME, module:function)")
        if self.clip < 0:
            raise ConfigError(f"{where}.clip: must be >= 0")


@dataclass
class PTXSection:
    data: str = ""
    """SFT/pretraining data for the PTX loss (same formats as `rlhfkit sft`); empty = no PTX term."""
    coef: float = 0.0
    """gamma_ptx: weight of the actor's token NLL on that data in the total loss."""
    batch_size: int = 8
    """SFT examples per optimizer step."""
    max_length: int = 512
    """Tokens per SFT example (longer ones are an error, as in `rlhfkit sft`)."""

    def validate(self, where: str) -> None:
        if self.coef < 0 or (self.coef > 0 and not self.data):
            raise ConfigError(f"{where}: coef must be >= 0 and needs ptx.data when > 0")


# --------------------------------------------------------------------------- prompts

@dataclass
class PromptItem:
    ids: list[int]  # chat-templated prompt tokens, ending with the assistant header
    messages: list[dict]
    text: str  # plain user text, what reward functions receive
    reference: str | None = None


def load_prompt_items(section: PromptsSection, tokenizer) -> tuple[list[PromptItem], int]:
    """Load and render the prompts; returns (items, number dropped for length)."""
    from rlhfkit.data import load_prompts, render_prompt_ids

    examples = load_prompts(resolve_source(section.train, "prompts"))
    if section.limit:
        examples = examples[:section.limit]
    items, dropped = [], 0
    for ex in examples:
        ids = render_prompt_ids(tokenizer, ex.prompt)
        if len(ids) > section.max_prompt_length:
            dropped += 1
            continue
        items.append(PromptItem(ids, ex.prompt, prompt_text(ex.prompt), ex.reference))
    if not items:
        raise ValueError(f"{section.train}: no prompts left (dropped {dropped} longer than "
                         f"{section.max_prompt_length} tokens)")
    return items, dropped


# --------------------------------------------------------------------------- models

def load_actor(model_cfg, rt: Runtime):
    """(actor, reference). With LoRA the reference is None: `score_logprobs` then runs the actor
    with its adapters disabled, so the base weights exist once in memory (SPEC 4). The reference
    is the starting policy, so a LoRA adapter as model.name (a LoRA SFT run) is merged into its
    base first and fresh adapters go on top; `rlhfkit merge` follows that chain back."""
    actor = load_causal_lm(model_cfg.name, model_cfg.dtype)
    if model_cfg.gradient_checkpointing:
        enable_gradient_checkpointing(actor)
    actor = to_device(apply_lora(actor, model_cfg.lora, "CAUSAL_LM"), rt.device)
    ref = None
    if not model_cfg.lora.enabled:
        ref = to_device(load_causal_lm(model_cfg.name, model_cfg.dtype), rt.device)
        ref.eval().requires_grad_(False)
    actor.train()
    return actor, ref


# --------------------------------------------------------------------------- timing

class Stopwatch:
    """Wall time of consecutive phases of an iteration, as time/<phase> metrics."""

    def __init__(self):
        self.t = time.perf_counter()
        self.times: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.times[f"time/{phase}"] = now - self.t
        self.t = now


# --------------------------------------------------------------------------- 1. rollout

def rollout(actor, items: list[PromptItem], settings: RolloutSection, tokenizer, seed: int | None = None) -> Experience:
    """Sample settings.n responses per prompt (rows i*n..i*n+n-1 belong to items[i]).
    ``seed`` gives the sampling its own generator (see `sampling_seed`); None = torch's global RNG."""
    from rlhfkit.trainers.fsdp import full_weights

    eos = tokenizer.eos_token_id
    with full_weights(actor):  # FSDP: gathered once, so each rank decodes on its own (stops at its own EOS)
        return generate(actor, [it.ids for it in items], max_new_tokens=settings.max_new_tokens,
                        eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, temperature=settings.temperature,
                        top_p=settings.top_p, top_k=settings.top_k, n=settings.n,
                        micro_batch_size=settings.micro_batch_size or None, seed=seed)


def sampling_seed(run: PolicyRun, step: int) -> int | None:
    """The rollout's random stream for iteration ``step`` on this rank; None (torch's global RNG,
    checkpointed with the run) on a single process.

    Ranks must not share a stream: with the training seed on every rank (which identical model
    initialisation needs), rank 1 would draw the very same uniforms as rank 0 for its different
    prompts, and the samples of the shards would be correlated. Each rank's stream is a function
    of (seed, step, rank) only, so it needs no RNG state in a checkpoint: a run resumed on the same
    number of processes draws what the uninterrupted one drew.
    """
    if run.rt.world_size == 1:
        return None
    return rank_stream_seed(run.cfg.train.seed, step, run.rt.rank)


def rank_stream_seed(seed: int, step: int, rank: int) -> int:
    """A rank's own sampling seed for iteration ``step``: a function of (seed, step, rank) only."""
    digest = hashlib.sha256(f"rollout:{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # a non-negative int64


def decode_responses(exp: Experience, tokenizer) -> list[str]:
    lengths = exp.response_lengths().tolist()
    return [tokenizer.decode(row[:n], skip_special_tokens=True).strip()
            for row, n in zip(exp.response_ids.tolist(), lengths)]


# --------------------------------------------------------------------------- 2. score

def _batched(fn, exp: Experience, micro: int) -> Any:
    """Apply fn(micro-batch Experience) over row micro-batches and concatenate the outputs."""
    outs = [fn(exp.select(slice(i, i + micro))) for i in range(0, len(exp), micro)]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts, dim=0) for parts in zip(*outs))
    return torch.cat(outs, dim=0)


@torch.no_grad()
def score_logprobs(actor, ref, exp: Experience, micro: int, share_prompt: bool = False,
                   policy: dict | None = None) -> dict:
    """Step 2 for the policy side: logp_old + entropy (actor, eval mode) and logp_ref, (B, R) each.
    With ``share_prompt`` each micro-batch's rows of one prompt are packed (as the update does),
    so logp_old comes from the same computation as the first minibatch's logp. ``policy``:
    logp_old and entropy already computed (PPO's fused first forward); only the reference runs."""
    from rlhfkit.trainers.pg_update import policy_logprobs

    def over(model, with_entropy=False):
        return _batched(lambda mb: policy_logprobs(model, mb, share_prompt, with_entropy), exp, micro)

    was_training = actor.training
    actor.eval()
    try:
        logp, ent = over(actor, with_entropy=True) if policy is None else (policy["logp"], policy["entropy"])
        if ref is None:  # LoRA: the reference is the same weights with the adapters switched off
            with adapters_disabled(actor):
                ref_logp = over(actor)
        else:
            ref_logp = over(ref)
    finally:
        actor.train(was_training)
    return {"logp": logp, "entropy": ent, "ref_logp": ref_logp}


@torch.no_grad()
def score_values(critic, exp: Experience, micro: int) -> torch.Tensor:
    R = exp.response_ids.shape[1]
    was_training = critic.training
    critic.eval()
    try:
        return _batched(lambda mb: response_values(critic, mb.input_ids(), mb.attention_mask(), R), exp, micro)
    finally:
        critic.train(was_training)


def score_sequences(exp: Experience, items: list[PromptItem], responses: list[str], reward_fn: RewardFn,
                    section: RewardSection) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw, shaped) sequence scores (B,): shaped = clipped to [-clip, clip], then the fixed
    missing-EOS score for responses that never emitted EOS."""
    rows = [items[i] for i in exp.prompt_index.tolist()]
    raw = torch.tensor(reward_fn([r.text for r in rows], responses, messages=[r.messages for r in rows]),
                       dtype=torch.float32, device=exp.response_ids.device)
    shaped = raw.clamp(-section.clip, section.clip) if section.clip > 0 else raw.clone()
    if section.missing_eos_score is not None:
        shaped = torch.where(exp.eos, shaped, torch.full_like(shaped, section.missing_eos_score))
    return raw, shaped


def score_experience(exp: Experience, items, reward_fn, section: RewardSection, actor, ref, tokenizer,
                     micro: int, rt: Runtime | None = None, share_prompt: bool = False,
                     policy: dict | None = None) -> tuple[Experience, dict, list[str]]:
    """Step 2 shared by all trainers: fills logprobs (logp_old), ref_logprobs and scores.
    Each rank scores its own rows; the metrics are over the global batch when ``rt`` is given.
    ``policy`` ({"logp", "entropy"}, detached): logp_old computed by the caller. Returns (exp,
    metrics, decoded responses)."""
    mask = exp.response_mask.bool()
    rollout_logp = exp.logprobs
    lp = score_logprobs(actor, ref, exp, micro, share_prompt, policy=policy)
    exp.logprobs, exp.ref_logprobs = lp["logp"], lp["ref_logp"]
    responses = decode_responses(exp, tokenizer)
    raw, exp.scores = score_sequences(exp, items, responses, reward_fn, section)
    everyone = rt.gather if rt is not None else (lambda x: x)
    total = rt.sum if rt is not None else (lambda x: x)
    raw_all = everyone(raw)
    ent = total(torch.stack([masked_sum(lp["entropy"], mask), mask.sum().float()]))  # (sum, count)
    metrics = {
        "reward/score_mean": raw_all.mean(),
        "reward/score_std": raw_all.std() if len(raw_all) > 1 else raw.new_zeros(()),
        "reward/shaped_mean": everyone(exp.scores).mean(),
        "policy/entropy": ent[0] / ent[1].clamp(min=1),
        **response_metrics(exp, responses, rt),
    }
    if rollout_logp is not None:  # KV-cache decoding vs the training forward: should be ~1e-5 or less
        diff = torch.where(mask, (rollout_logp - exp.logprobs).abs(), 0.0).max()
        metrics["rollout/logprob_diff_max"] = rt.max(diff) if rt is not None else diff
    return exp, metrics, responses


def response_metrics(exp: Experience, responses: list[str], rt: Runtime | None = None) -> dict:
    """Length, EOS rate and two degeneration alarms: empty answers and repeated bigrams
    (means over every rank's responses when ``rt`` is given)."""
    distinct = []
    for row, n in zip(exp.response_ids.tolist(), exp.response_lengths().tolist()):
        bigrams = list(zip(row[:n - 1], row[1:n]))
        distinct.append(len(set(bigrams)) / len(bigrams) if bigrams else 1.0)
    per_row = torch.stack([exp.response_lengths().float().cpu(), exp.eos.float().cpu(),
                           torch.tensor([float(not r) for r in responses]), torch.tensor(distinct)], dim=1)  # (B, 4)
    if rt is not None:
        per_row = rt.gather(per_row)
    means = per_row.mean(0) if len(per_row) else per_row.new_zeros(4)
    return {"response/length_mean": means[0], "response/eos_frac": means[1],
            "response/empty_frac": float(means[2]), "response/distinct2": float(means[3])}


def sequence_kl(exp: Experience, kind: str) -> torch.Tensor:
    """(B,) KL(pi_old || pi_ref) estimate per response: the per-token estimator summed over tokens."""
    kl = kl_estimate(exp.logprobs, exp.ref_logprobs, kind)
    return torch.where(exp.response_mask.bool(), kl, 0.0).sum(-1)


# --------------------------------------------------------------------------- run bookkeeping

@dataclass
class PolicyRun:
    """Everything a policy-gradient loop holds besides its algorithm-specific models."""

    cfg: Any
    kind: str
    rt: Runtime
    out: Path
    tokenizer: Any
    prompts: list[PromptItem]
    reward_fn: RewardFn
    actor: Any
    ref: Any
    settings: UpdateSettings
    rows_per_step: int
    total_steps: int


def setup_run(cfg, kind: str, *, epochs: int, mini_batch_size: int, **update_kw) -> PolicyRun:
    """Data, reward function, actor + reference, update settings. Validates batch arithmetic."""
    rt = Runtime(cfg.train.seed, fsdp=cfg.train.fsdp)
    # Each rank takes whole prompts (a group never straddles ranks) and an equal share of every
    # minibatch, so all ranks make the same number of optimizer steps (each one an all-reduce).
    rt.check_divisible(cfg.train.batch_size, "train.batch_size (prompts per step)")
    rt.check_divisible(mini_batch_size, "mini_batch_size")
    out = prepare_run_dir(cfg, kind, rt.is_main)
    tokenizer = load_tokenizer(cfg.model.name)
    prompts, dropped = load_prompt_items(cfg.prompts, tokenizer)
    if dropped:
        log.warning("[%s] dropped %d prompts longer than %d tokens", kind, dropped, cfg.prompts.max_prompt_length)
    rows = cfg.train.batch_size * cfg.rollout.n
    with rt.loading_shards():  # FSDP: rank 0 reads the weights, the others get their shards from it
        reward_fn = build_reward_fn(cfg.reward.spec, tokenizer=tokenizer, device=rt.device,
                                    batch_size=cfg.reward.batch_size)
        actor, ref = load_actor(cfg.model, rt)
    rt.broadcast_params(actor)  # not DDP-wrapped (see pg_update.policy_update): start from rank 0's copy
    if rt.fsdp:
        if getattr(cfg, "ptx", None) is not None and cfg.ptx.coef > 0:
            rt.check_divisible(cfg.ptx.batch_size, "ptx.batch_size")  # sharded forwards run in lockstep
        # frozen models sharded like the actor: their scoring forwards gather block by block, the
        # same number on every rank (equal rows per rank; the RM's micro-batches of reward.batch_size)
        rt.shard_frozen(ref, "reference")
        rt.shard_frozen(getattr(reward_fn, "model", None), "reward_model")
    total = cfg.train.max_steps if cfg.train.max_steps > 0 else max(
        1, int(cfg.train.epochs * len(prompts) // cfg.train.batch_size))
    settings = UpdateSettings(epochs=epochs, mini_batch_size=mini_batch_size // rt.world_size,
                              micro_batch_size=cfg.train.micro_batch_size, max_grad_norm=cfg.optim.max_grad_norm,
                              **update_kw)
    return PolicyRun(cfg, kind, rt, out, tokenizer, prompts, reward_fn, actor, ref, settings, rows, total)


def shard_trained(run: PolicyRun, model, opt: dict):
    """``train.fsdp``: shard a trained model (actor, critic) and point its optimizer (built on the
    unsharded model, `pg_update.build_opt`) at the shards. Unsharded runs keep the model as it is:
    the policy-gradient loop averages gradients itself (`Runtime.average_gradients`)."""
    if not run.rt.fsdp:
        return model
    model, opt["optimizer"] = run.rt.prepare(model, opt["optimizer"])
    return model


def optimizer_steps_per_iteration(run: PolicyRun) -> int:
    local_rows = run.rows_per_step // run.rt.world_size
    return run.settings.epochs * -(-local_rows // run.settings.mini_batch_size)


def prompt_batch(run: PolicyRun, step: int) -> list[PromptItem]:
    """This rank's prompts for iteration `step` (deterministic in (seed, step): resumable)."""
    idx = batch_indices(len(run.prompts), run.cfg.train.batch_size, step, run.cfg.train.seed)
    return run.rt.shard([run.prompts[i] for i in idx])


def log_samples(run: PolicyRun, logger: RunLogger, step: int, exp: Experience, items, responses: list[str],
                k: int = 3) -> None:
    """A few (prompt, response, score) triples to samples.jsonl and TensorBoard text."""
    if not run.rt.is_main:
        return
    rows = []
    for i in range(min(k, len(exp))):
        item = items[int(exp.prompt_index[i])]
        rows.append({"step": step, "prompt": item.text, "response": responses[i],
                     "score": float(exp.scores[i]), "eos": bool(exp.eos[i])})
    with open(run.out / "samples.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    md = "\n\n".join(f"**prompt:** {r['prompt']}\n\n**response:** {r['response']}\n\n**score:** {r['score']:.3f}"
                     for r in rows)
    logger.text(step, "samples", md)


def _drop_samples_after(path: Path, step: int) -> None:
    """On resume, samples.jsonl keeps the steps up to the checkpoint (none when starting at step 0),
    as RunLogger does for metrics.jsonl: the steps after it are sampled and logged again."""
    if path.is_file():
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and step > 0 and json.loads(ln)["step"] <= step]
        path.write_text("".join(k + "\n" for k in keep))


def train_loop(run: PolicyRun, iterate, models: dict, optimizers: dict, *, state_fn=dict, load_state=None,
               show: tuple[str, ...] = ()) -> dict:
    """The outer loop every policy-gradient trainer shares: resume, iterate, log, checkpoint.

    iterate(step, guard, logger) -> metrics runs one iteration. models/optimizers are what a
    checkpoint holds (with the RNG state); state_fn() adds trainer state (e.g. the KL controller),
    which load_state(state) restores on resume.
    """
    cfg = run.cfg
    ckpt = Checkpointer(run.out, cfg.train.keep_checkpoints, enabled=run.rt.is_main)
    last = ckpt.latest() if cfg.train.resume else None
    state: dict = {}
    if last is not None:
        for name, model in models.items():
            load_weights_into(run.rt.unwrap(model), last / name)
        state = Checkpointer.load_state(last, optimizers, models=list(models.values()))
        if load_state is not None:
            load_state(state)
    start = state.get("step", 0)
    if run.rt.is_main:
        _drop_samples_after(run.out / "samples.jsonl", start)
    logger = RunLogger(run.out, run.total_steps, enabled=run.rt.is_main, progress=cfg.train.progress,
                       desc=run.kind, initial_step=start)
    guard = StepGuard(cfg.train.max_bad_steps).load_state_dict(state.get("guard"))
    metrics: dict = {}
    for step in range(start, run.total_steps):
        metrics = iterate(step, guard, logger)
        metrics["train/skipped_steps"] = guard.skipped_total
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == run.total_steps:
            logger.log(step + 1, metrics, show=show)
        logger.advance()
        if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0 and step + 1 < run.total_steps:
            ckpt.save(step + 1, {k: run.rt.unwrap(m) for k, m in models.items()}, optimizers,
                      {"kind": run.kind, "guard": guard.state_dict(), **state_fn()})
        run.rt.wait()
    logger.close()
    return metrics


def save_final(run: PolicyRun, models: dict[str, Any], results: dict) -> None:
    """Final models as plain transformers/peft dirs (output_dir/model, ...) and the results json.
    Call it on every rank: sharded models are gathered (a collective), rank 0 writes."""
    for name, model in models.items():
        run.rt.check_replicas(model, name)
    for name, model in models.items():
        run.rt.save_model(model, run.tokenizer, run.out / name)
    if run.rt.is_main:
        results = {**results, "distributed": run.rt.layout}
        clean = {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in results.items()}
        write_json_atomic(run.out / f"{run.kind}_results.json", clean)
    run.rt.wait()
