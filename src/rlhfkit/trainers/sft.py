"""Supervised fine-tuning: token cross-entropy on assistant tokens only (docs/concepts.md, "SFT").

    rlhfkit sft --config sft.yaml data.train=data.jsonl optim.lr=2e-5
"""

from __future__ import annotations

import math

import torch

from rlhfkit.config import SFTConfig, validate
from rlhfkit.data import (
    PackedSFTCollator,
    SFTCollator,
    batch_to_device,
    load_sft,
    pack_sft,
    tokenize_dataset,
)
from rlhfkit.data.sources import source_list, train_and_eval
from rlhfkit.models import load_tokenizer
from rlhfkit.models.forward import common_prefix_of_rows, labelled_logprobs
from rlhfkit.models.start import check_policy_start, load_for_training
from rlhfkit.parallel import Strategy, make_strategy
from rlhfkit.training import (
    check_enough,
    eval_chunks,
    finish,
    fit_supervised,
    open_run,
    prepare_optimization,
    total_steps,
)


def prepare_sft_data(cfg: SFTConfig, tokenizer):
    """Load, validate and tokenise train/eval sets; every data error surfaces here, before training."""
    train_ex, eval_ex = train_and_eval(cfg.data, "sft", load_sft, cfg.train.seed)
    train, tstats = tokenize_dataset(tokenizer, train_ex, "sft", cfg.data.max_length, cfg.data.truncation)
    evals, estats = tokenize_dataset(tokenizer, eval_ex, "sft", cfg.data.max_length, cfg.data.truncation)
    if not train:
        raise ValueError(f"{', '.join(source_list(cfg.data.train))}: no training examples")
    return train, evals, {"train": tstats, "eval": estats}


def sft_batch_loss(model, batch: dict, normalizer: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed NLL of the labelled tokens divided by ``normalizer`` (tokens of the whole global batch).

    Dividing by the global count, not the micro-batch's, makes batch 8 x accumulation 1 equal
    batch 1 x accumulation 8 exactly. Returns (loss, summed nll, token count).
    """
    mask = batch["labels"][:, 1:] != -100
    ids, attn, packed = batch["input_ids"], batch["attention_mask"], "position_ids" in batch
    # (N,): the head runs on these only; the rows' common start (the system turn) is computed once
    logp = labelled_logprobs(model, ids, attn, mask, position_ids=batch.get("position_ids"),
                             shared_prefix=0 if packed else common_prefix_of_rows(ids, attn, mask))
    nll_sum = -logp.sum()
    return nll_sum / normalizer, nll_sum.detach(), mask.sum()


def labelled_tokens(examples: list[dict]) -> int:
    """Tokens the loss is computed on (labels past the first position that are not ignored)."""
    return sum(sum(1 for lab in ex["labels"][1:] if lab != -100) for ex in examples)


@torch.no_grad()
def evaluate_sft(model, examples: list[dict], collator, micro_batch_size: int, strategy: Strategy) -> dict:
    """Token-mean held-out loss (and perplexity) over ``examples``; each rank scores its shard and
    the sums are added over ranks."""
    if not examples:
        return {}
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64)  # summed nll, token count
    for chunk, real in eval_chunks(examples, micro_batch_size, strategy):
        with strategy.autocast():
            _, s, c = sft_batch_loss(model, batch_to_device(collator(chunk), strategy.device), 1.0)
        if real:
            sums += torch.tensor([float(s), float(c)], dtype=torch.float64)
    model.train(was_training)
    nll, count = strategy.sum(sums).tolist()
    count = int(count)
    loss = nll / max(count, 1)
    return {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 50.0)), "eval/tokens": count}


def train_sft(cfg: SFTConfig, strategy: Strategy | None = None) -> dict:
    """Run SFT; returns the final metrics (and ``best`` with train.select_best). The trained policy
    lands in ``output_dir/model``."""
    validate(cfg)  # a config changed in Python after load_config is checked as a loaded one is
    strategy = strategy or make_strategy(cfg.train, cfg.model)
    strategy.check_divisible(cfg.train.batch_size, "train.batch_size")  # equal shares of every global batch

    # 1. Data: validated and tokenised before anything is written or the model loads.
    check_policy_start(cfg.model, cfg.data.max_length, "data.max_length")
    tokenizer = load_tokenizer(cfg.model.name, chat_template=cfg.data.chat_template)
    train, evals, trunc = prepare_sft_data(cfg, tokenizer)
    examples = len(train)
    collator = eval_collator = SFTCollator(tokenizer.pad_token_id)
    if cfg.packing:  # several short examples per row, attention blocked between them
        train = pack_sft(train, cfg.data.max_length)
        collator = PackedSFTCollator(tokenizer.pad_token_id)
    check_enough(len(train), cfg.train, "data.train", "packed rows" if cfg.packing else "examples",
                 f" (of {examples} examples, data.max_length {cfg.data.max_length})" if cfg.packing else "")
    run = open_run(cfg, "sft", strategy, tokenizer)

    # 2. Model (LoRA-wrapped when enabled; a LoRA adapter as model.name is continued), optimizer, schedule.
    with strategy.loading():  # FSDP: rank 0 reads the weights, the others get their shards from it
        model, _ = load_for_training(cfg.model, "CAUSAL_LM")
    model.train()
    total = total_steps(len(train), cfg.train)
    model, optimizer, scheduler = prepare_optimization(strategy, model, cfg.optim, cfg.train, total)

    # 3. Optimisation: each step is one global batch, accumulated over micro-batches.
    def loss_fn(chunk, norm):
        loss, nll_sum, _ = sft_batch_loss(model, batch_to_device(collator(chunk), strategy.device), norm)
        return loss, {"loss": nll_sum}

    evaluate = (lambda: evaluate_sft(model, evals, eval_collator, cfg.train.micro_batch_size, strategy)) \
        if evals else None
    result = fit_supervised(run, model, optimizer, scheduler, train, loss_fn, total=total,
                            max_grad_norm=cfg.optim.max_grad_norm, evaluate=evaluate, truncation=trunc,
                            max_length=cfg.data.max_length, show=("train/loss", "eval/loss"),
                            count=labelled_tokens, count_name="tokens")

    # 4. The trained policy: a directory transformers (or peft) loads as is.
    finish(run, {"model": model}, tokenizer, result.metrics, best=result.best,
           truncation={k: v.by_source for k, v in trunc.items()})
    return {**result.metrics, **({"best": result.best} if result.best else {})}
