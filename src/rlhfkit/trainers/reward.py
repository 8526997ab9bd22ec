"""Bradley-Terry reward model: backbone + scalar head read at the last real token (SPEC section 2).

    rlhfkit rm --config rm.yaml data.train=prefs.jsonl
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from rlhfkit.algos import bradley_terry_loss, fit_bt_probe
from rlhfkit.config import RewardConfig
from rlhfkit.data import PreferenceCollator, load_preference, tokenize_dataset
from rlhfkit.models import load_tokenizer, sequence_scores
from rlhfkit.models.heads import backbone_and_head, last_token_index, token_values
from rlhfkit.models.lora import load_for_training
from rlhfkit.trainers.checkpoint import Checkpointer, load_weights_into
from rlhfkit.trainers.common import (
    RunLogger, Runtime, StepGuard, batch_indices, build_optimizer, build_scheduler, eval_chunks, micro_batches,
    optimizer_step, prepare_run_dir, total_steps_for, write_json_atomic,
)
from rlhfkit.trainers.sources import resolve_source, split_eval


def prepare_preference_data(cfg, tokenizer):
    """Load, validate and tokenise preference pairs (train, eval) before any model loads."""
    train_ex = load_preference(resolve_source(cfg.data.train, "preference"))
    if cfg.data.limit:
        train_ex = train_ex[:cfg.data.limit]
    if cfg.data.eval:
        eval_ex = load_preference(resolve_source(cfg.data.eval, "preference"))
    else:
        train_ex, eval_ex = split_eval(train_ex, cfg.data.eval_fraction, cfg.train.seed)
    train, tstats = tokenize_dataset(tokenizer, train_ex, "preference", cfg.data.max_length, cfg.data.truncation)
    evals, estats = tokenize_dataset(tokenizer, eval_ex, "preference", cfg.data.max_length, cfg.data.truncation)
    return train, evals, {"train": tstats, "eval": estats}


def pair_scores(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of chosen (first half of the rows) and rejected (second half): (B,), (B,)."""
    scores = sequence_scores(model, batch["input_ids"], batch["attention_mask"])  # (2B,)
    n = scores.shape[0] // 2
    return scores[:n], scores[n:]


@torch.no_grad()
def evaluate_rm(model, examples: list[dict], collator, micro_batch_size: int, device, rt=None) -> dict:
    """Held-out pairwise accuracy and mean margin, overall and per category; with a Runtime
    ``rt`` each rank scores its shard and the per-pair results are gathered."""
    if not examples:
        return {}
    was_training = model.training
    model.eval()
    correct, margins, cats = [], [], []
    for chunk, real in eval_chunks(examples, micro_batch_size, rt):
        batch = collator(chunk)
        tensors = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        rc, rr = pair_scores(model, tensors)
        if not real:
            continue
        # ties count as half right, so a constant model scores 50%, not 0%
        correct += ((rc > rr).float() + 0.5 * (rc == rr).float()).tolist()
        margins += (rc - rr).tolist()
        cats += [c or "all" for c in batch.get("category", [None] * len(chunk))]
    model.train(was_training)
    if rt is not None:
        correct, margins, cats = (rt.gather_objects(x) for x in (correct, margins, cats))
    out = {"eval/accuracy": sum(correct) / len(correct), "eval/margin": sum(margins) / len(margins),
           "eval/pairs": len(correct)}
    by_cat = defaultdict(list)
    for c, ok in zip(cats, correct):
        by_cat[c].append(ok)
    if len(by_cat) > 1:
        for c, oks in sorted(by_cat.items()):
            out[f"eval/accuracy/{c}"] = sum(oks) / len(oks)
    return out


@torch.no_grad()
def pair_feature_differences(model, examples: list[dict], collator, micro_batch_size: int, device,
                             rt=None) -> torch.Tensor:
    """(N, H) last-token features of chosen minus rejected: the input of the scalar head at the
    position the reward is read, for every pair, in data order (all ranks' shards gathered)."""
    was_training = model.training
    model.eval()
    diffs = []
    try:
        for chunk, real in eval_chunks(examples, micro_batch_size, rt):
            batch = collator(chunk)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            _, h = token_values(model, ids, mask, with_features=True)  # (2B, T, H)
            f = h[torch.arange(h.shape[0], device=h.device), last_token_index(mask)].float().cpu()
            if real:
                n = f.shape[0] // 2
                diffs.extend(f[:n] - f[n:])
    finally:
        model.train(was_training)
    if rt is not None:  # in data order, so that the probe's cross-validation folds are one process's
        diffs = rt.unshard(diffs)
    return torch.stack(diffs)


@torch.no_grad()
def install_probe_head(model, w: torch.Tensor) -> None:
    """Set the scalar head to the probe's weights w: (H,) (bias, if any, to 0: BT ignores it).
    Under peft only the trainable copy of the head changes. Under FSDP each rank writes its shard."""
    from rlhfkit.trainers.fsdp import is_sharded
    from rlhfkit.trainers.zero import weights_changed

    if is_sharded(model):
        # after a forward the root's weights may still be gathered (the module then holds plain
        # copies that FSDP discards); reshard so that the write lands in the shards
        model.reshard()
    _, head = backbone_and_head(model)
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    trainable = [m for m in linears if m.weight.requires_grad] or linears
    for lin in trainable:
        if lin.weight.shape != (1, w.numel()):
            raise ValueError(f"head_init=probe needs a (1, {w.numel()}) scalar head, got {tuple(lin.weight.shape)}")
        src = w.to(lin.weight.dtype)[None]
        if hasattr(lin.weight, "device_mesh"):  # an FSDP2 shard: every rank fitted the same w, each keeps its part
            from torch.distributed.tensor import distribute_tensor

            src = distribute_tensor(src, lin.weight.device_mesh, lin.weight.placements)
        lin.weight.copy_(src)
        if lin.bias is not None:
            lin.bias.zero_()
        weights_changed(lin.parameters())  # DeepSpeed ZeRO: into its fp32 master copy too


def train_reward_model(cfg: RewardConfig) -> dict:
    """Train a Bradley-Terry RM; saved to ``output_dir/model`` as a *ForSequenceClassification dir."""
    rt = Runtime(cfg.train.seed, fsdp=cfg.train.fsdp, zero_stage=cfg.train.zero_stage)
    rt.check_divisible(cfg.train.batch_size, "train.batch_size")  # equal shares of every global batch
    out = prepare_run_dir(cfg, "rm", rt.is_main)

    # 1. Data, validated before the model loads.
    tokenizer = load_tokenizer(cfg.model.name)
    train, evals, trunc = prepare_preference_data(cfg, tokenizer)
    if not train:
        raise ValueError(f"{cfg.data.train}: no training pairs")
    collator = PreferenceCollator(tokenizer.pad_token_id)

    # 2. Backbone + fresh scalar head (or a trained RM to continue from). With LoRA the head is
    #    trained in full next to the adapters and saved with them.
    with rt.loading_shards():  # FSDP: rank 0 reads the weights, the others get their shards from it
        model, _ = load_for_training(cfg.model, "SEQ_CLS", pad_token_id=tokenizer.pad_token_id)
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
    logger = RunLogger(out, total, enabled=rt.is_main, progress=cfg.train.progress, desc="rm", initial_step=start)
    if rt.is_main:
        for split, st in trunc.items():
            if st.truncated or st.dropped:
                logger.write(f"[rm] {split} truncation (max_length {cfg.data.max_length}): {st.summary()}")
    guard = StepGuard(cfg.train.max_bad_steps).load_state_dict(state.get("guard"))
    if start == 0 and cfg.head_init == "probe":
        # Linear probing first: one forward over the training pairs, a convex fit of the head.
        logger.write(f"[rm] fitting the head as a linear probe on {len(train)} training pairs")
        d = pair_feature_differences(model, train, collator, cfg.train.micro_batch_size, rt.device, rt)
        w, probe = fit_bt_probe(d, seed=cfg.train.seed)
        install_probe_head(rt.unwrap(model), w)
        logger.write(f"[rm] probe: l2 {probe['l2']:g}, cross-validated accuracy {probe['cv_accuracy']:.3f}, "
                     f"train accuracy {probe['train_accuracy']:.3f}")
        logger.log(0, {f"probe/{k}": v for k, v in probe.items()})
    if start == 0 and evals:
        logger.log(0, evaluate_rm(model, evals, collator, cfg.train.micro_batch_size, rt.device, rt))

    # 3. Optimisation: BT loss summed over pairs, divided by the global number of pairs.
    metrics: dict = {}
    for step in range(start, total):
        idx = batch_indices(len(train), cfg.train.batch_size, step, cfg.train.seed)
        global_batch = [train[i] for i in idx]
        normalizer = len(global_batch) / rt.world_size
        mine = micro_batches(rt.shard(global_batch), cfg.train.micro_batch_size)
        loss_sum = torch.zeros((), device=rt.device)
        acc_sum = torch.zeros((), device=rt.device)
        for j, chunk in enumerate(mine):
            batch = {k: v.to(rt.device) for k, v in collator(chunk).items() if isinstance(v, torch.Tensor)}
            with rt.no_sync(model, skip=j < len(mine) - 1):
                rc, rr = pair_scores(model, batch)
                margin = batch.get("margin") if cfg.use_margin else None
                loss, m = bradley_terry_loss(rc, rr, margin=margin, reduction="sum")
                if cfg.center_rewards_coef:
                    loss = loss + cfg.center_rewards_coef * ((rc + rr) ** 2).sum()
                rt.backward(loss / normalizer)
            loss_sum += loss.detach()
            acc_sum += (rc > rr).float().sum().detach()
        n = len(global_batch)
        train_loss = rt.sum(loss_sum) / n
        stepped, gnorm = optimizer_step(model, optimizer, scheduler, cfg.optim.max_grad_norm, train_loss, guard)

        # 4. Log, evaluate, checkpoint.
        metrics = {"train/loss": train_loss, "train/accuracy": rt.sum(acc_sum) / n, "train/grad_norm": gnorm,
                   "train/lr": scheduler.get_last_lr()[0], "train/skipped_steps": guard.skipped_total}
        if (cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0) or step + 1 == total:
            metrics.update(evaluate_rm(model, evals, collator, cfg.train.micro_batch_size, rt.device, rt))
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == total:
            logger.log(step + 1, metrics, show=("train/loss", "eval/accuracy"))
        logger.advance()
        if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0 and step + 1 < total:
            ckpt.save(step + 1, {"model": rt.unwrap(model)}, {"optimizer": optimizer, "scheduler": scheduler},
                      {"kind": "rm", "guard": guard.state_dict()})
        rt.wait()

    # 5. Save: AutoModelForSequenceClassification.from_pretrained(dir) loads it as is (with LoRA a
    #    peft adapter holding the head too; `rlhfkit merge` turns it into such a directory).
    rt.check_replicas(model)
    rt.save_model(model, tokenizer, Path(out) / "model")  # every rank: a sharded model is gathered first
    if rt.is_main:
        final = {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}
        final["distributed"] = rt.layout
        final["truncation"] = {k: v.by_source for k, v in trunc.items()}
        write_json_atomic(Path(out) / "rm_results.json", final)
    logger.close()
    rt.wait()
    return metrics
