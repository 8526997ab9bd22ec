"""Direct preference optimisation and relatives: DPO, IPO, conservative DPO (SPEC section 6).

    rlhfkit dpo --config configs/dpo.yaml data.train=prefs.jsonl dpo.beta=0.1

One training step, per global batch of preference pairs:
  1. one concatenated forward of chosen and rejected rows (chosen first) through the policy;
  2. sequence log-probs summed over response tokens (the collator's loss_mask);
  3. the reference's log-probs of the same pairs: a frozen copy of the starting policy, the
     policy's base with its LoRA adapters disabled (no second copy of the weights), or numbers
     computed once before training (then no reference model is kept at all);
  4. `algos.dpo_loss` summed over pairs and divided by the global number of pairs, so batch 8 x
     accumulation 1 and batch 1 x accumulation 8 give the same update.
The SFT-then-DPO recipe (SPEC 1: SFT on the chosen responses first, so the policy starts close
to the data's distribution) is `sft_first.enabled: true`; the SFT model is then also the reference.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from rlhfkit.algos import dpo_loss, sequence_logps
from rlhfkit.config import ConfigError, DataSection, ModelSection, OptimSection, TrainSection
from rlhfkit.models import load_causal_lm, load_tokenizer
from rlhfkit.models.forward import causal_logprobs, pack_groups, packed_logprobs
from rlhfkit.models.lora import adapters_disabled, load_for_training, merge_adapter
from rlhfkit.trainers.checkpoint import Checkpointer, load_weights_into
from rlhfkit.trainers.common import (
    RunLogger, Runtime, StepGuard, batch_indices, build_optimizer, build_scheduler, eval_chunks, micro_batches,
    optimizer_step, prepare_run_dir, total_steps_for, write_json_atomic,
)

REF_KEYS = ("ref_chosen_logp", "ref_rejected_logp")  # precomputed values stored on each example


# --------------------------------------------------------------------------- config

@dataclass
class DPOSection:
    """The DPO objective; shared with online DPO (`trainers/online_dpo.py`)."""

    beta: float = 0.1  # KL anchor: implicit reward = beta * log(pi/pi_ref); smaller = freer policy
    loss_type: Literal["sigmoid", "cdpo", "ipo", "hinge"] = "sigmoid"  # DPO, conservative DPO, IPO, SLiC hinge
    label_smoothing: float = 0.0  # cDPO: assumed probability that a label is flipped (sigmoid/cdpo)
    average_logps: bool = False  # length-normalised sequence log-probs (TRL's IPO); SPEC 6 sums them
    precompute_ref_logps: bool = False  # reference log-probs once before training; no reference kept
    reference: str = ""  # reference model; "" = the starting policy (the SFT model with sft_first)
    # score each pair as one packed sequence (prompt once, then chosen and rejected, each seeing the
    # prompt and itself): the same log-probs up to float rounding, fewer tokens per pair
    share_prompt: bool = True

    def validate(self, where: str) -> None:
        if self.beta <= 0:
            raise ConfigError(f"{where}.beta: must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"{where}.label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "cdpo"):
            raise ConfigError(f"{where}.label_smoothing: only defined for loss_type sigmoid/cdpo")


@dataclass
class SFTFirstSection:
    """SFT on the chosen responses before DPO (SPEC 1's recipe for off-policy preference data)."""

    enabled: bool = False
    lr: float = 2e-5  # the SFT stage's own learning rate (optim.lr is DPO's)
    epochs: float = 1.0
    max_steps: int = 0  # > 0 overrides epochs


@dataclass
class DPOConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)  # preference pairs {prompt, chosen, rejected}
    # DPO wants small steps: the implicit reward grows without bound on separable data. 5e-7 is
    # the usual value for 7B models; the 135M default model needed 2e-5 to move measurably in
    # ~15 steps of 8 pairs (5e-6 left its gold win rate at 0.50; docs/results_dpo.md).
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-6, warmup_ratio=0.1))
    train: TrainSection = field(default_factory=TrainSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    sft_first: SFTFirstSection = field(default_factory=SFTFirstSection)


# --------------------------------------------------------------------------- the math on a batch

def pair_logps(model, batch: dict, average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs of the chosen and rejected responses: (B,), (B,).

    batch: PreferenceCollator output; input_ids (2B, T) with the B chosen rows first,
    loss_mask (2B, T) 1 on response tokens. Logits are only computed from the earliest response
    token of the batch on (`keep_last`): the LM head over prompt positions would be wasted.
    When the batch carries "prompt_lengths" (``PreferenceCollator(share_prompt=True)``) each pair
    is one packed sequence, prompt + chosen + rejected, each response seeing the prompt and itself.
    """
    if "prompt_lengths" in batch:
        logp, lmask = _shared_pair_token_logps(model, batch)
        seq = sequence_logps(logp, lmask, average=average)
        n = seq.shape[0] // 2
        return seq[:n], seq[n:]
    ids, attn, lmask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    T = ids.shape[1]
    has_resp = lmask.bool().any(0).nonzero()
    first = int(has_resp[0]) if len(has_resp) else T - 1
    k = min(T - first, T - 1)
    logp = causal_logprobs(model, ids, attn, keep_last=k)  # (2B, k): tokens T-k .. T-1
    seq = sequence_logps(logp, lmask[:, T - k:], average=average)  # (2B,)
    n = seq.shape[0] // 2
    return seq[:n], seq[n:]


def _shared_pair_token_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B, R) response-token log-probs and mask, each pair one packed sequence (prompt once)."""
    ids, plens = batch["input_ids"], batch["prompt_lengths"].tolist()
    n = len(plens)
    rlens = batch["loss_mask"].sum(-1).tolist()
    groups = [(ids[i, :p], [(b, ids[b, p:p + int(rlens[b])]) for b in (i, n + i)]) for i, p in enumerate(plens)]
    R = max(1, *map(int, rlens))
    logp = packed_logprobs(model, pack_groups(groups, (2 * n, R), pad_token_id=0))
    mask = (torch.arange(R, device=ids.device)[None] < torch.tensor(rlens, device=ids.device)[:, None]).long()
    return logp, mask


class Reference:
    """pi_ref's sequence log-probs: a frozen model, or the policy's base with adapters disabled."""

    def __init__(self, model, adapters_off: bool = False):
        self.model = model
        self.adapters_off = adapters_off

    @torch.no_grad()
    def logps(self, batch: dict, average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        was_training = self.model.training
        self.model.eval()  # no dropout in the reference
        try:
            if self.adapters_off:
                with adapters_disabled(self.model):
                    return pair_logps(self.model, batch, average)
            return pair_logps(self.model, batch, average)
        finally:
            self.model.train(was_training)


def _tensors(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def reference_logps(chunk: list[dict], batch: dict, reference: Reference | None, average: bool):
    """The chunk's reference log-probs: precomputed ones when the examples carry them."""
    if REF_KEYS[0] in chunk[0]:
        device = batch["input_ids"].device
        return tuple(torch.tensor([ex[k] for ex in chunk], dtype=torch.float32, device=device) for k in REF_KEYS)
    if reference is None:
        raise RuntimeError("no reference model and no precomputed reference log-probs")
    return reference.logps(batch, average)


def dpo_batch_loss(policy, reference, chunk: list[dict], collator, dcfg: DPOSection, normalizer: float,
                   device) -> tuple[torch.Tensor, dict]:
    """DPO loss of one micro-batch, summed over its pairs and divided by ``normalizer`` (the
    global number of pairs). Returns (loss to backpropagate, metric sums over the chunk's pairs)."""
    batch = _tensors(collator(chunk), device)
    pc, pr = pair_logps(policy, batch, dcfg.average_logps)
    rc, rr = reference_logps(chunk, batch, reference, dcfg.average_logps)
    loss, m = dpo_loss(pc, pr, rc, rr, beta=dcfg.beta, loss_type=dcfg.loss_type,
                       label_smoothing=dcfg.label_smoothing, reduction="sum")
    sums = {k: v * len(chunk) for k, v in m.items()}  # metrics are chunk means
    sums["loss"] = loss.detach()
    return loss / normalizer, sums


@torch.no_grad()
def precompute_reference(examples: list[dict], reference: Reference, collator, micro_batch_size: int,
                         device, average: bool = False, rt=None) -> None:
    """Store pi_ref's log-probs on each example (keys REF_KEYS), in place. With a Runtime ``rt``
    each rank scores its shard and the numbers are exchanged: every rank ends with all of them."""
    found = []  # (example index, chosen logp, rejected logp)
    # this rank's share in micro-batches; under FSDP padded with stand-ins so that every rank runs
    # the same number of (collective) forwards
    for idx, real in eval_chunks(list(range(len(examples))), micro_batch_size, rt):
        rc, rr = reference.logps(_tensors(collator([examples[i] for i in idx]), device), average)
        if real:
            found += zip(idx, rc.tolist(), rr.tolist())
    if rt is not None:
        found = rt.gather_objects(found)
    for i, c, r in found:
        examples[i][REF_KEYS[0]], examples[i][REF_KEYS[1]] = c, r


@torch.no_grad()
def evaluate_dpo(policy, reference, examples: list[dict], collator, dcfg: DPOSection, micro_batch_size: int,
                 device, rt=None) -> dict:
    """Held-out DPO loss and implicit-reward metrics (accuracy = share of pairs whose chosen
    response gets the larger implicit reward). With a Runtime ``rt`` each rank scores its shard
    and the sums are added over ranks."""
    if not examples:
        return {}
    was_training = policy.training
    policy.eval()
    totals: dict = {}
    for chunk, real in eval_chunks(examples, micro_batch_size, rt):
        _, sums = dpo_batch_loss(policy, reference, chunk, collator, dcfg, 1.0, device)
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + (float(v) if real else 0.0)
    policy.train(was_training)
    if rt is not None and rt.world_size > 1:
        summed = rt.sum(torch.tensor(list(totals.values()), dtype=torch.float64)).tolist()
        totals = dict(zip(totals, summed))
    out = {f"eval/{k}": v / len(examples) for k, v in totals.items()}
    out["eval/pairs"] = len(examples)
    return out


# --------------------------------------------------------------------------- models

def build_policy_and_reference(cfg, tokenizer=None):
    """The trainable policy and its reference, as SPEC 6 and the LoRA rule ask.

    - Full fine-tuning: a frozen deep copy of the starting policy, taken before any update.
    - LoRA: the reference is the same module with its adapters disabled (one copy of the base
      weights in memory). A LoRA adapter directory as ``model.name`` continues training that
      adapter; with ``dpo.reference`` = its base model (online DPO's pi_0) the reference is again
      the adapters-disabled module.
    - ``dpo.reference`` naming another model: loaded and frozen.
    - ``dpo.precompute_ref_logps``: the untrained policy itself serves as the reference; the
      caller computes the numbers once, before any update, and then drops the Reference.
    Returns (policy, Reference).
    """
    policy, adapter_base = load_for_training(cfg.model, "CAUSAL_LM")
    if tokenizer is not None and policy.config.pad_token_id is None:
        policy.config.pad_token_id = tokenizer.pad_token_id
    fresh_lora = cfg.model.lora.enabled and adapter_base is None
    policy.train()
    ref_name = cfg.dpo.reference
    if adapter_base is not None and ref_name and _same_model(ref_name, adapter_base):
        return policy, Reference(policy, adapters_off=True)
    if ref_name and not _same_model(ref_name, cfg.model.name):
        return policy, Reference(_frozen(load_causal_lm(ref_name, cfg.model.dtype)))
    if fresh_lora or cfg.dpo.precompute_ref_logps:
        return policy, Reference(policy, adapters_off=fresh_lora)
    return policy, Reference(_frozen(copy.deepcopy(policy)))


def _same_model(a: str, b: str) -> bool:
    from rlhfkit.models import resolve_model_path

    ra, rb = resolve_model_path(a), resolve_model_path(b)
    return ra == rb or (Path(ra).exists() and Path(rb).exists() and Path(ra).resolve() == Path(rb).resolve())


def _frozen(model):
    return model.eval().requires_grad_(False)


def _precompute_or_load(cfg, out: Path, train, evals, reference, collator, rt) -> None:
    """Fill REF_KEYS on every example, from ``out/ref_logps.json`` when resuming (the policy has
    moved by then, so the reference numbers must be the ones computed before step 1)."""
    path = out / "ref_logps.json"
    if cfg.train.resume and path.is_file():
        saved = json.loads(path.read_text())
        for name, exs in (("train", train), ("eval", evals)):
            for ex, (c, r) in zip(exs, saved[name]):
                ex[REF_KEYS[0]], ex[REF_KEYS[1]] = c, r
        return
    for exs in (train, evals):
        precompute_reference(exs, reference, collator, cfg.train.micro_batch_size, rt.device, cfg.dpo.average_logps,
                             rt)
    if rt.is_main:
        write_json_atomic(path, {name: [[ex[k] for k in REF_KEYS] for ex in exs]
                                 for name, exs in (("train", train), ("eval", evals))})


# --------------------------------------------------------------------------- the trainer

def train_dpo(cfg: DPOConfig) -> dict:
    """Run DPO (after SFT on the chosen responses when ``sft_first.enabled``); returns the final
    metrics. The trained policy lands in ``output_dir/model``."""
    from rlhfkit.data import PreferenceCollator
    from rlhfkit.trainers.reward import prepare_preference_data

    rt = Runtime(cfg.train.seed, fsdp=cfg.train.fsdp, zero_stage=cfg.train.zero_stage)
    rt.check_divisible(cfg.train.batch_size, "train.batch_size")  # equal shares of every global batch
    out = prepare_run_dir(cfg, "dpo", rt.is_main)

    # 0. SFT-then-DPO: the SFT model becomes both the starting policy and the reference.
    if cfg.sft_first.enabled:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=str(run_sft_first(cfg, out, rt))))

    # 1. Data: validated and tokenised before the model loads.
    tokenizer = load_tokenizer(cfg.model.name)
    train, evals, trunc = prepare_preference_data(cfg, tokenizer)
    if not train:
        raise ValueError(f"{cfg.data.train}: no training pairs")
    collator = PreferenceCollator(tokenizer.pad_token_id, share_prompt=cfg.dpo.share_prompt)

    # 2. Policy and reference (FSDP: rank 0 reads the weights, the others get their shards from it).
    with rt.loading_shards():
        policy, reference = build_policy_and_reference(cfg, tokenizer)

    metrics = fit_dpo(cfg, policy, reference, train, evals, collator, out, rt, desc="dpo",
                      precompute=cfg.dpo.precompute_ref_logps)

    # 5. The trained policy: a directory transformers (or peft) loads as is.
    rt.check_replicas(policy)
    rt.save_model(policy, tokenizer, out / "model")  # every rank: a sharded model is gathered first
    if rt.is_main:
        final = {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}
        final["distributed"] = rt.layout
        final["truncated"] = {k: {"truncated": v.truncated, "dropped": v.dropped} for k, v in trunc.items()}
        final["pairs"] = {"train": len(train), "eval": len(evals)}
        write_json_atomic(out / "dpo_results.json", final)
    rt.wait()
    return metrics


def fit_dpo(cfg, policy, reference, train: list[dict], evals: list[dict], collator, out: Path, rt,
            desc: str = "dpo", precompute: bool = False) -> dict:
    """The optimisation loop (steps 3-4), shared by offline and online DPO.

    cfg needs .optim, .train and .dpo sections. Checkpoints (and resume) like trainers/sft.py.
    ``precompute``: the reference log-probs are computed once, before any update (from the models
    as prepared: under FSDP, sharded), stored on the examples, and the reference is dropped.
    """
    total = total_steps_for(len(train), cfg.train)
    optimizer = build_optimizer(policy, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total)
    policy, optimizer = rt.prepare(policy, optimizer, cfg.train.micro_batch_size, cfg.optim.max_grad_norm)
    if reference is not None and reference.model is not policy:  # a separate frozen reference
        rt.shard_frozen(reference.model, "reference")  # FSDP: its forwards run in lockstep with the policy's
    if precompute:
        _precompute_or_load(cfg, out, train, evals, reference, collator, rt)
        reference = None  # the examples carry the numbers now (a separately loaded reference is freed)

    ckpt = Checkpointer(out, cfg.train.keep_checkpoints, enabled=rt.is_main)
    start, state = 0, {}
    if cfg.train.resume and (last := ckpt.latest()) is not None:
        load_weights_into(rt.unwrap(policy), last / "model")
        state = Checkpointer.load_state(last, {"optimizer": optimizer, "scheduler": scheduler}, models=[policy])
        start = state["step"]
    logger = RunLogger(out, total, enabled=rt.is_main, progress=cfg.train.progress, desc=desc, initial_step=start)
    guard = StepGuard(cfg.train.max_bad_steps).load_state_dict(state.get("guard"))
    mbs = cfg.train.micro_batch_size
    if start == 0 and evals:
        logger.log(0, evaluate_dpo(policy, reference, evals, collator, cfg.dpo, mbs, rt.device, rt))

    # 3. Optimisation: each step is one global batch of pairs, accumulated over micro-batches.
    metrics: dict = {}
    for step in range(start, total):
        global_batch = [train[i] for i in batch_indices(len(train), cfg.train.batch_size, step, cfg.train.seed)]
        normalizer = len(global_batch) / rt.world_size  # DDP averages gradients over ranks
        mine = micro_batches(rt.shard(global_batch), mbs)
        sums: dict = {}
        for j, chunk in enumerate(mine):
            with rt.no_sync(policy, skip=j < len(mine) - 1):
                loss, s = dpo_batch_loss(policy, reference, chunk, collator, cfg.dpo, normalizer, rt.device)
                rt.backward(loss)
            for k, v in s.items():
                sums[k] = sums.get(k, 0.0) + v
        means = {f"train/{k}": rt.sum(v) / len(global_batch) for k, v in sums.items()}
        stepped, gnorm = optimizer_step(policy, optimizer, scheduler, cfg.optim.max_grad_norm,
                                        means["train/loss"], guard)

        # 4. Log, evaluate, checkpoint.
        metrics = {**means, "train/grad_norm": gnorm, "train/lr": scheduler.get_last_lr()[0],
                   "train/skipped_steps": guard.skipped_total}
        if (cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0) or step + 1 == total:
            metrics.update(evaluate_dpo(policy, reference, evals, collator, cfg.dpo, mbs, rt.device, rt))
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == total:
            logger.log(step + 1, metrics, show=("train/loss", "train/rewards/accuracy", "eval/rewards/accuracy"))
        logger.advance()
        if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0 and step + 1 < total:
            ckpt.save(step + 1, {"model": rt.unwrap(policy)}, {"optimizer": optimizer, "scheduler": scheduler},
                      {"kind": desc, "guard": guard.state_dict()})
        rt.wait()
    logger.close()
    return metrics


# --------------------------------------------------------------------------- SFT first

def run_sft_first(cfg: DPOConfig, out: Path, rt=None) -> Path:
    """SFT on the chosen responses of ``cfg.data`` into ``out/sft``; returns the model directory.

    Reuses trainers/sft.py whole: the chosen side of every pair becomes a {prompt, response}
    record. A finished stage (``out/sft/model`` present) is not redone, so a resumed run skips it.
    With LoRA the adapter is merged, so DPO starts (and anchors) on a plain model. Under several
    processes (``rt``) the main one writes the files and the others wait for them.
    """
    from rlhfkit.config import SFTConfig
    from rlhfkit.trainers.sft import train_sft

    sft_dir = out / "sft"
    model_dir = sft_dir / ("merged" if cfg.model.lora.enabled else "model")
    if (model_dir / "config.json").is_file():
        return model_dir
    main = rt is None or rt.is_main
    if main:
        _chosen_as_sft(cfg.data.train, sft_dir / "train.jsonl")
        if cfg.data.eval:
            _chosen_as_sft(cfg.data.eval, sft_dir / "eval.jsonl")
    if rt is not None:
        rt.wait()
    data = dataclasses.replace(cfg.data, train=str(sft_dir / "train.jsonl"),
                               eval=str(sft_dir / "eval.jsonl") if cfg.data.eval else "")
    sft_cfg = SFTConfig(
        model=cfg.model, data=data,
        optim=dataclasses.replace(cfg.optim, lr=cfg.sft_first.lr, warmup_ratio=0.03),
        train=dataclasses.replace(cfg.train, output_dir=str(sft_dir), epochs=cfg.sft_first.epochs,
                                  max_steps=cfg.sft_first.max_steps),  # resumes its own checkpoints
    )
    train_sft(sft_cfg)
    if cfg.model.lora.enabled and main:
        merge_adapter(sft_dir / "model", model_dir)
    if rt is not None:
        rt.wait()
    return model_dir


def _chosen_as_sft(source: str, dest: Path) -> Path:
    """Write the chosen side of a preference source as SFT conversations (``data.sft_from_preference``)."""
    from rlhfkit.data import load_preference, sft_from_preference
    from rlhfkit.trainers.sources import resolve_source

    examples = sft_from_preference(load_preference(resolve_source(source, "preference")))
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("".join(json.dumps({"messages": ex.messages}) + "\n" for ex in examples))
    return dest

