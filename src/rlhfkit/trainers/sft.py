"""Supervised fine-tuning: token cross-entropy on assistant tokens only (SPEC section 1).

    rlhfkit sft --config sft.yaml data.train=data.jsonl optim.lr=2e-5
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from rlhfkit.algos import masked_sum
from rlhfkit.config import SFTConfig
from rlhfkit.data import PackedSFTCollator, SFTCollator, load_sft, pack_sft, tokenize_dataset
from rlhfkit.models import load_tokenizer
from rlhfkit.models.forward import causal_logprobs
from rlhfkit.models.lora import load_for_training
from rlhfkit.trainers.checkpoint import Checkpointer, load_weights_into
from rlhfkit.trainers.common import (
    RunLogger, Runtime, StepGuard, batch_indices, build_optimizer, build_scheduler, eval_chunks, micro_batches,
    optimizer_step, prepare_run_dir, total_steps_for, write_json_atomic,
)
from rlhfkit.trainers.sources import resolve_source, split_eval


def prepare_sft_data(cfg: SFTConfig, tokenizer):
    """Load, validate and tokenise train/eval sets; every data error surfaces here, before training."""
    train_ex = load_sft(resolve_source(cfg.data.train, "sft"))
    if cfg.data.limit:
        train_ex = train_ex[:cfg.data.limit]
    if cfg.data.eval:
        eval_ex = load_sft(resolve_source(cfg.data.eval, "sft"))
    else:
        train_ex, eval_ex = split_eval(train_ex, cfg.data.eval_fraction, cfg.train.seed)
    train, tstats = tokenize_dataset(tokenizer, train_ex, "sft", cfg.data.max_length, cfg.data.truncation)
    evals, estats = tokenize_dataset(tokenizer, eval_ex, "sft", cfg.data.max_length, cfg.data.truncation)
    return train, evals, {"train": tstats, "eval": estats}


def sft_batch_loss(model, batch: dict, normalizer: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed NLL of the labelled tokens divided by ``normalizer`` (tokens of the whole global batch).

    Dividing by the global count, not the micro-batch's, makes batch 8 x accumulation 1 equal
    batch 1 x accumulation 8 exactly. Returns (loss, summed nll, token count).
    """
    logp = causal_logprobs(model, batch["input_ids"], batch["attention_mask"],
                           position_ids=batch.get("position_ids"))  # (B, T-1)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    nll_sum = -masked_sum(logp, mask)
    return nll_sum / normalizer, nll_sum.detach(), mask.sum()


@torch.no_grad()
def evaluate_sft(model, examples: list[dict], collator, micro_batch_size: int, device, rt=None) -> dict:
    """Token-mean held-out loss (and perplexity) over ``examples``; with a Runtime ``rt`` each
    rank scores its shard and the sums are added over ranks."""
    if not examples:
        return {}
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64)  # summed nll, token count
    for chunk, real in eval_chunks(examples, micro_batch_size, rt):
        batch = {k: v.to(device) for k, v in collator(chunk).items() if isinstance(v, torch.Tensor)}
        _, s, c = sft_batch_loss(model, batch, 1.0)
        if real:
            sums += torch.tensor([float(s), float(c)], dtype=torch.float64)
    model.train(was_training)
    nll, count = (rt.sum(sums) if rt is not None else sums).tolist()
    count = int(count)
    loss = nll / max(count, 1)
    return {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 50.0)), "eval/tokens": count}


def train_sft(cfg: SFTConfig) -> dict:
    """Run SFT; returns the final metrics. The trained policy lands in ``output_dir/model``."""
    rt = Runtime(cfg.train.seed, fsdp=cfg.train.fsdp, zero_stage=cfg.train.zero_stage)
    rt.check_divisible(cfg.train.batch_size, "train.batch_size")  # equal shares of every global batch
    out = prepare_run_dir(cfg, "sft", rt.is_main)

    # 1. Data: validated and tokenised before the model loads.
    tokenizer = load_tokenizer(cfg.model.name)
    train, evals, trunc = prepare_sft_data(cfg, tokenizer)
    if not train:
        raise ValueError(f"{cfg.data.train}: no training examples")
    collator = eval_collator = SFTCollator(tokenizer.pad_token_id)
    if cfg.packing:  # several short examples per row, attention blocked between them
        train = pack_sft(train, cfg.data.max_length)
        collator = PackedSFTCollator(tokenizer.pad_token_id)

    # 2. Model (LoRA-wrapped when enabled; a LoRA adapter as model.name is continued), optimizer, schedule.
    with rt.loading_shards():  # FSDP: rank 0 reads the weights, the others get their shards from it
        model, _ = load_for_training(cfg.model, "CAUSAL_LM")
    model.train()
    total = total_steps_for(len(train), cfg.train)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total)
    model, optimizer = rt.prepare(model, optimizer, cfg.train.micro_batch_size, cfg.optim.max_grad_norm)

    ckpt = Checkpointer(out, cfg.train.keep_checkpoints, enabled=rt.is_main)
    start, state = 0, {}
    if cfg.train.resume and (last := ckpt.latest()) is not None:
        load_weights_into(rt.unwrap(model), last / "model")
        state = Checkpointer.load_state(last, {"optimizer": optimizer, "scheduler": scheduler}, models=[model])
        start = state["step"]
    logger = RunLogger(out, total, enabled=rt.is_main, progress=cfg.train.progress, desc="sft", initial_step=start)
    if rt.is_main:
        for split, st in trunc.items():
            if st.truncated or st.dropped:
                logger.write(f"[sft] {split} truncation (max_length {cfg.data.max_length}): {st.summary()}")
    guard = StepGuard(cfg.train.max_bad_steps).load_state_dict(state.get("guard"))
    if start == 0 and evals:
        logger.log(0, evaluate_sft(model, evals, eval_collator, cfg.train.micro_batch_size, rt.device, rt))

    # 3. Optimisation: each step is one global batch, accumulated over micro-batches.
    metrics: dict = {}
    for step in range(start, total):
        idx = batch_indices(len(train), cfg.train.batch_size, step, cfg.train.seed)
        global_batch = [train[i] for i in idx]
        n_tokens = sum(sum(1 for l in ex["labels"][1:] if l != -100) for ex in global_batch)
        normalizer = max(n_tokens, 1) / rt.world_size  # DDP averages gradients over ranks
        mine = micro_batches(rt.shard(global_batch), cfg.train.micro_batch_size)
        nll_sum = torch.zeros((), device=rt.device)
        for j, chunk in enumerate(mine):
            batch = {k: v.to(rt.device) for k, v in collator(chunk).items() if isinstance(v, torch.Tensor)}
            with rt.no_sync(model, skip=j < len(mine) - 1):
                loss, s, _ = sft_batch_loss(model, batch, normalizer)
                rt.backward(loss)
            nll_sum += s
        train_loss = rt.sum(nll_sum) / max(n_tokens, 1)
        stepped, gnorm = optimizer_step(model, optimizer, scheduler, cfg.optim.max_grad_norm, train_loss, guard)

        # 4. Log, evaluate, checkpoint.
        metrics = {"train/loss": train_loss, "train/grad_norm": gnorm, "train/lr": scheduler.get_last_lr()[0],
                   "train/tokens": n_tokens, "train/skipped_steps": guard.skipped_total}
        if (cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0) or step + 1 == total:
            metrics.update(evaluate_sft(model, evals, eval_collator, cfg.train.micro_batch_size, rt.device, rt))
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == total:
            logger.log(step + 1, metrics, show=("train/loss", "eval/loss"))
        logger.advance()
        if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0 and step + 1 < total:
            ckpt.save(step + 1, {"model": rt.unwrap(model)}, {"optimizer": optimizer, "scheduler": scheduler},
                      {"kind": "sft", "guard": guard.state_dict()})
        rt.wait()

    # 5. The trained policy: a directory transformers (or peft) loads as is.
    rt.check_replicas(model)
    rt.save_model(model, tokenizer, Path(out) / "model")  # every rank: a sharded model is gathered first
    if rt.is_main:
        final = {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}
        final["distributed"] = rt.layout
        final["truncation"] = {k: v.by_source for k, v in trunc.items()}
        write_json_atomic(Path(out) / "sft_results.json", final)
    logger.close()
    rt.wait()
    return metrics
