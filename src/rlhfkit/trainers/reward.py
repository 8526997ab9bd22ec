"""Bradley-Terry reward model: backbone + scalar head read at the last real token, or averaged
over the response tokens (`pooling`; docs/concepts.md, "Reward model").

    rlhfkit rm --config rm.yaml data.train=prefs.jsonl
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import distribute_tensor

from rlhfkit.algos import bradley_terry_loss, fit_bt_probe, fit_token_head_bt, pairwise_accuracy
from rlhfkit.algos.probe import PROBE_FOLDS
from rlhfkit.config import ConfigError, RewardConfig, under_key, validate
from rlhfkit.data import (
    PreferenceCollator,
    batch_to_device,
    load_preference,
    tokenize_dataset,
)
from rlhfkit.data.sources import source_list, train_and_eval
from rlhfkit.eval.preference_sets import by_category
from rlhfkit.models import (
    check_model_path,
    freeze_lower_layers,
    keep_lower_layers,
    load_tokenizer,
    pooled_features,
    resolve_model_path,
    set_reward_pooling,
)
from rlhfkit.models.loading import check_context_length
from rlhfkit.models.lora import root_model
from rlhfkit.models.packing import pack_pairs, packed_token_values, packs
from rlhfkit.models.heads import (
    PACKABLE_POOLINGS,
    backbone_and_head,
    pool_mask,
    pool_values,
    reward_pooling,
    stored_reward_pooling,
    token_values,
)
from rlhfkit.models.start import load_for_training
from rlhfkit.models.token_head import set_token_head, stored_token_head, token_head_embeddings, token_head_width
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


def prepare_preference_data(cfg, tokenizer):
    """Load, validate and tokenise preference pairs (train, eval) before any model loads."""
    train_ex, eval_ex = train_and_eval(cfg.data, "preference", load_preference, cfg.train.seed)
    train, tstats = tokenize_dataset(tokenizer, train_ex, "preference", cfg.data.max_length, cfg.data.truncation)
    evals, estats = tokenize_dataset(tokenizer, eval_ex, "preference", cfg.data.max_length, cfg.data.truncation)
    if not train:
        raise ValueError(f"{', '.join(source_list(cfg.data.train))}: no training pairs")
    return train, evals, {"train": tstats, "eval": estats}


def pair_scores(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of chosen (first half of the rows) and rejected (second half): (B,), (B,), pooled
    as the model's config says (`models.reward_pooling`; loss_mask marks the response tokens).
    When the batch carries "prompt_lengths" (``PreferenceCollator(share_prompt=True)``) each pair
    is one packed sequence, prompt + chosen + rejected, each response seeing the prompt and itself."""
    pooling = reward_pooling(model)
    values, mask, response = _pair_token_values(model, batch, pooling)
    scores = pool_values(values, mask, pooling, response)  # (2B,)
    n = scores.shape[0] // 2
    return scores[:n], scores[n:]


def _pair_token_values(model, batch: dict, pooling: str, with_features: bool = False):
    """The per-token head values of a preference batch's 2B rows, (2B, T), with the attention and
    response masks to pool them by (and with ``with_features`` the (2B, T, H) features): packed
    (T = the longest response, both masks its real tokens) when the batch and the pooling allow it,
    else the padded rows themselves."""
    if "prompt_lengths" in batch and pooling in PACKABLE_POOLINGS and packs(model):
        out = packed_token_values(model, pack_pairs(batch), with_features=with_features, last_only=pooling == "last")
        return (out[0], out[1], out[1], *out[2:])
    out = token_values(model, batch["input_ids"], batch["attention_mask"], with_features=with_features)
    values, rest = (out[0], out[1:]) if with_features else (out, ())
    return (values, batch["attention_mask"], batch.get("loss_mask"), *rest)


@torch.no_grad()
def evaluate_rm(model, examples: list[dict], collator, micro_batch_size: int, strategy: Strategy) -> dict:
    """Held-out pairwise accuracy and mean margin, overall and per category; each rank scores its
    shard and the per-pair results are gathered."""
    if not examples:
        return {}
    was_training = model.training
    model.eval()
    correct, margins, cats = [], [], []
    for chunk, real in eval_chunks(examples, micro_batch_size, strategy):
        batch = collator(chunk)
        with strategy.autocast():
            rc, rr = pair_scores(model, batch_to_device(batch, strategy.device))
        if not real:
            continue
        correct += pairwise_accuracy(rc, rr, reduction="none").tolist()  # ties count 1/2
        margins += (rc - rr).tolist()
        cats += batch.get("category", [None] * len(chunk))
    model.train(was_training)
    correct, margins, cats = (strategy.gather_objects(x) for x in (correct, margins, cats))
    out = {"eval/accuracy": sum(correct) / len(correct), "eval/margin": sum(margins) / len(margins),
           "eval/pairs": len(correct)}
    for c, oks in by_category(cats, correct).items():
        out[f"eval/accuracy/{c}"] = sum(oks) / len(oks)
    return out


@torch.no_grad()
def pair_feature_differences(model, examples: list[dict], collator, micro_batch_size: int,
                             strategy: Strategy) -> torch.Tensor:
    """(N, H) pooled features of chosen minus rejected: what the scalar head reads, pooled the way
    the reward is (`models.reward_pooling`), for every pair, in data order (all ranks' shards gathered)."""
    def differences(batch):
        f = _pooled_pair_features(model, batch, strategy).cpu()
        n = f.shape[0] // 2
        return list(f[:n] - f[n:])

    # in data order, so that the probe's cross-validation folds are one process's
    return torch.stack(_per_pair(model, examples, collator, micro_batch_size, strategy, differences))


def _per_pair(model, examples: list[dict], collator, micro_batch_size: int, strategy: Strategy, per_batch) -> list:
    """per_batch(a preference batch on the device) -> one item per pair of the batch; the items of
    every pair in data order (all ranks' shards gathered), computed with the model in eval mode."""
    was_training = model.training
    model.eval()
    mine = []
    try:
        for chunk, real in eval_chunks(examples, micro_batch_size, strategy):
            items = per_batch(batch_to_device(collator(chunk), strategy.device))
            if real:
                mine.extend(items)
    finally:
        model.train(was_training)
    return strategy.unshard(mine)


def _pooled_pair_features(model, batch: dict, strategy: Strategy) -> torch.Tensor:
    """(2B, H) features of a preference batch, pooled as the reward is (packed as in `pair_scores`)."""
    pooling = reward_pooling(model)
    with strategy.autocast():
        _, mask, response, h = _pair_token_values(model, batch, pooling, with_features=True)
    return pooled_features(h.float(), mask, pooling, response)


@torch.no_grad()
def pair_token_features(model, examples: list[dict], collator, micro_batch_size: int,
                        strategy: Strategy) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token the reward pools over (`pool_mask`), of every pair's chosen then rejected reply,
    in data order: ((T, H) features in bfloat16, (2N,) tokens per reply). The input of a token
    head's fit (`algos.token_head`); all ranks' shards gathered."""
    pooling = reward_pooling(model)

    def replies(batch):
        with strategy.autocast():
            _, mask, response, h = _pair_token_values(model, batch, pooling, with_features=True)
        keep = pool_mask(mask, response, pooling) > 0  # (2B, T)
        rows = [h[r][keep[r]].to(torch.bfloat16).cpu() for r in range(h.shape[0])]
        n = len(rows) // 2
        return [(rows[i], rows[n + i]) for i in range(n)]

    pairs = _per_pair(model, examples, collator, micro_batch_size, strategy, replies)
    tokens = [t for pair in pairs for t in pair]
    return torch.cat(tokens), torch.tensor([len(t) for t in tokens], device=tokens[0].device)


def _fit_head(model, train: list[dict], collator, cfg: RewardConfig, strategy: Strategy, run) -> None:
    """head_init: probe. A linear head: one forward over the training pairs, a convex fit. A token
    head: its per-token features cached by one forward, then the head's fit on them."""
    if cfg.head_hidden:
        reads = " on the last layer and the input embeddings" if cfg.head_embeddings else ""
        heads = f"{cfg.head_ensemble} token heads" if cfg.head_ensemble > 1 else "the token head"
        run.logger.write(f"[rm] fitting {heads} (width {cfg.head_hidden}{reads}) on {len(train)} training pairs")
        tokens, counts = pair_token_features(model, train, collator, cfg.train.micro_batch_size, strategy)
        weights, probe = fit_token_head_bt(tokens, counts, cfg.head_hidden, seed=cfg.train.seed,
                                           label_smoothing=cfg.label_smoothing, members=cfg.head_ensemble)
        install_token_head(model, weights, strategy)
        run.logger.write(f"[rm] token head: train accuracy {probe['train_accuracy']:.3f} "
                         f"({int(counts.sum())} tokens)")
    else:
        run.logger.write(f"[rm] fitting the head as a linear probe on {len(train)} training pairs")
        d = pair_feature_differences(model, train, collator, cfg.train.micro_batch_size, strategy)
        w, probe = fit_bt_probe(d, seed=cfg.train.seed, label_smoothing=cfg.label_smoothing)
        install_probe_head(model, w, strategy)
        run.logger.write(f"[rm] probe: l2 {probe['l2']:g}, cross-validated accuracy {probe['cv_accuracy']:.3f}, "
                         f"train accuracy {probe['train_accuracy']:.3f}")
    run.logger.log(0, {f"probe/{k}": v for k, v in probe.items()})


def _copy_into(param: torch.Tensor, src: torch.Tensor) -> None:
    """param <- src, in param's dtype; into an FSDP2 shard, each rank its own part (every rank
    fitted the same src)."""
    src = src.to(param.dtype)
    if hasattr(param, "device_mesh"):
        src = distribute_tensor(src, param.device_mesh, param.placements)
    param.copy_(src)


@torch.no_grad()
def install_token_head(model, weights: dict[str, torch.Tensor], strategy: Strategy) -> None:
    """Set a token head to `fit_token_head_bt`'s weights {"w1", "b1", "w2"}."""
    with strategy.writing_weights(model):
        _, head = backbone_and_head(strategy.unwrap(model))
        for param, key in ((head.dense.weight, "w1"), (head.dense.bias, "b1"), (head.out.weight, "w2")):
            if tuple(param.shape) != tuple(weights[key].shape):
                raise ValueError(f"token head {key}: expected shape {tuple(param.shape)}, "
                                 f"got {tuple(weights[key].shape)}")
            _copy_into(param, weights[key])


@torch.no_grad()
def install_probe_head(model, w: torch.Tensor, strategy: Strategy) -> None:
    """Set the scalar head to the probe's weights w: (H,) (bias, if any, to 0: BT ignores it).
    Under peft only the trainable copy of the head changes. Under FSDP each rank writes its shard."""
    with strategy.writing_weights(model):
        _, head = backbone_and_head(strategy.unwrap(model))
        linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
        trainable = [m for m in linears if m.weight.requires_grad] or linears
        for lin in trainable:
            if lin.weight.shape != (1, w.numel()):
                raise ValueError(f"head_init=probe needs a (1, {w.numel()}) scalar head, got {tuple(lin.weight.shape)}")
            _copy_into(lin.weight, w[None])
            if lin.bias is not None:
                lin.bias.zero_()


def _check_backbone_layers(cfg: RewardConfig) -> None:
    """backbone_layers or train_top_layers deeper than the model: one line before anything is
    written or the model loads."""
    if cfg.backbone_layers or cfg.train_top_layers:
        from transformers import AutoConfig

        # an adapter (a LoRA SFT run's model/) has the depth of the model under it
        config = AutoConfig.from_pretrained(resolve_model_path(root_model(cfg.model.name)), trust_remote_code=False)
        depth = config.num_hidden_layers
        for key, layers in (("backbone_layers", cfg.backbone_layers), ("train_top_layers", cfg.train_top_layers)):
            if layers > depth:
                raise ConfigError(f"{key}: {layers}, but {cfg.model.name} has {depth} decoder layers")


def _check_start_model(cfg: RewardConfig) -> None:
    """model.name: a model directory or name, and with LoRA one whose stored pooling is cfg.pooling;
    a start model's token head only with the same width and head_embeddings."""
    check_model_path(cfg.model.name)
    width, embeddings = stored_token_head(cfg.model.name)
    if width and (width, embeddings) != (cfg.head_hidden * cfg.head_ensemble, cfg.head_embeddings):
        raise ConfigError(f"{cfg.model.name} has a token head of width {width}, head_embeddings "
                          f"{str(embeddings).lower()} (config.json's reward_head_hidden, reward_head_embeddings); "
                          "continue it with head_hidden x head_ensemble and head_embeddings the same")
    stored = stored_reward_pooling(cfg.model.name)
    if cfg.model.lora.enabled and stored != cfg.pooling:
        # rm:DIR scores an adapter with its base's stored pooling: it must be the one trained with
        raise ConfigError(f"{cfg.model.name} records reward_pooling {stored!r} "
                          f"(its config.json, 'last' when none), and a LoRA adapter on it is scored that way, not "
                          f"with pooling {cfg.pooling!r}: train without LoRA")


def _check_training_pairs(cfg: RewardConfig, train: list) -> None:
    """What use_margin, head_init: probe and the batches (none with epochs 0: the probe alone) need
    of the training pairs."""
    if cfg.use_margin and not any(f.get("margin") is not None for f in train):
        raise ConfigError(f"use_margin: no training pair in {', '.join(source_list(cfg.data.train))} has a 'margin' "
                          "field, so the margin term would be 0 for every pair")
    if cfg.head_init == "probe" and len(train) < 2 * PROBE_FOLDS:
        raise ConfigError(f"head_init: probe fits the head by {PROBE_FOLDS}-fold cross-validation, which needs at "
                          f"least {2 * PROBE_FOLDS} training pairs; {', '.join(source_list(cfg.data.train))} has "
                          f"{len(train)} (head_init: random trains the head from scratch)")
    if total_steps(len(train), cfg.train):
        check_enough(len(train), cfg.train, "data.train", "pairs")


def _check_selected_category(cfg: RewardConfig, evals: list) -> None:
    """train.select_best: eval/accuracy/CATEGORY names a category of the held-out pairs (per-category
    accuracy is logged when they have two or more): refused before anything is written, not after
    the model has loaded and the first evaluation has run."""
    prefix = "eval/accuracy/"
    if not cfg.train.select_best.startswith(prefix):
        return
    cats = list(by_category([ex.get("category") for ex in evals], evals))
    if cfg.train.select_best[len(prefix):] not in cats:
        have = f"are {', '.join(cats)}" if cats else "fewer than two, so none is logged on its own"
        raise ConfigError(f"train.select_best: {cfg.train.select_best!r}: the held-out pairs' categories {have}")


def train_reward_model(cfg: RewardConfig, strategy: Strategy | None = None) -> dict:
    """Train a Bradley-Terry RM; saved to ``output_dir/model`` as a *ForSequenceClassification dir."""
    validate(cfg)  # a config changed in Python after load_config is checked as a loaded one is
    strategy = strategy or make_strategy(cfg.train, cfg.model)
    strategy.check_divisible(cfg.train.batch_size, "train.batch_size")  # equal shares of every global batch

    # 1. Data, validated before anything is written or the model loads.
    with under_key("model.name"):
        _check_start_model(cfg)
    with under_key("data.max_length"):
        check_context_length(cfg.model.name, cfg.data.max_length)
    tokenizer = load_tokenizer(cfg.model.name, chat_template=cfg.data.chat_template)
    train, evals, trunc = prepare_preference_data(cfg, tokenizer)
    _check_training_pairs(cfg, train)
    _check_selected_category(cfg, evals)
    _check_backbone_layers(cfg)
    run = open_run(cfg, "rm", strategy, tokenizer)
    collator = PreferenceCollator(tokenizer.pad_token_id, share_prompt=cfg.share_prompt)

    # 2. Backbone + fresh scalar head (or a trained RM to continue from). With LoRA the head is
    #    trained in full next to the adapters and saved with them.
    with strategy.loading():  # FSDP: rank 0 reads the weights, the others get their shards from it
        model, _ = load_for_training(cfg.model, "SEQ_CLS", pad_token_id=tokenizer.pad_token_id)
    depth = keep_lower_layers(model, cfg.backbone_layers)  # before the optimizer and the probe
    set_reward_pooling(model, cfg.pooling)  # saved in config.json: rm:DIR scorers pool the same way
    head = (cfg.head_hidden * cfg.head_ensemble, cfg.head_embeddings)
    if cfg.head_hidden and (token_head_width(model.config), token_head_embeddings(model.config)) != head:
        set_token_head(model, *head)  # a fresh token head (one the start model saved is kept)
    freeze_lower_layers(model, cfg.train_top_layers)  # before the optimizer: it takes trainable params only
    model.train()
    total = total_steps(len(train), cfg.train)
    model, optimizer, scheduler = prepare_optimization(strategy, model, cfg.optim, cfg.train, total)

    def on_start(start):
        if cfg.backbone_layers:
            run.logger.write(f"[rm] backbone cut to its first {cfg.backbone_layers} of {depth} decoder layers")
        if start == 0 and cfg.head_init == "probe":  # the head alone first, on the frozen backbone's features
            _fit_head(model, train, collator, cfg, strategy, run)

    # 3. Optimisation: BT loss summed over pairs, divided by the global number of pairs.
    def loss_fn(chunk, norm):
        batch = batch_to_device(collator(chunk), strategy.device)
        rc, rr = pair_scores(model, batch)
        loss, _ = bradley_terry_loss(rc, rr, margin=batch.get("margin") if cfg.use_margin else None,
                                     label_smoothing=cfg.label_smoothing, reduction="sum")
        if cfg.center_rewards_coef:
            loss = loss + cfg.center_rewards_coef * ((rc + rr) ** 2).sum()
        return loss / norm, {"loss": loss.detach(), "accuracy": pairwise_accuracy(rc, rr, reduction="sum")}

    evaluate = (lambda: evaluate_rm(model, evals, collator, cfg.train.micro_batch_size, strategy)) if evals else None
    result = fit_supervised(run, model, optimizer, scheduler, train, loss_fn, total=total,
                            max_grad_norm=cfg.optim.max_grad_norm, evaluate=evaluate, truncation=trunc,
                            max_length=cfg.data.max_length, show=("train/loss", "eval/accuracy"), on_start=on_start)

    # 4. Save: AutoModelForSequenceClassification.from_pretrained(dir) loads it as is (with LoRA a
    #    peft adapter holding the head too; `rlhfkit merge` turns it into such a directory).
    finish(run, {"model": model}, tokenizer, result.metrics, best=result.best,
           truncation={k: v.by_source for k, v in trunc.items()})
    return result.metrics
