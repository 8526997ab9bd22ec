"""Online iterative DPO and rejection-sampling fine-tuning (docs/concepts.md: Online iterative DPO).

    rlhfkit online-dpo --config configs/online_dpo.yaml scorer=task:sentiment iterations=3

Offline DPO over-optimises: a fixed dataset cannot cover what the improving policy writes. Here
each iteration k = 1..T, on a fresh slice of prompts:
  1. rollout: n responses per prompt from the current policy pi_{k-1} (shared rollout engine);
  2. score: a pointwise reward (rm:DIR, task:NAME gold judge, module:function) or a pairwise judge
     (pm:DIR preference model, judge:MODEL LLM-as-judge, annotator:TASK simulated human; n
     responses are compared round-robin, score = mean P(win));
  3. rank: score - length_penalty * |a| (characters); best = chosen, worst = rejected; pairs whose
     two responses are identical or tie are dropped and counted;
  4. train: `train_dpo` on the iteration's pairs (the tokens sampled, `trainers.online_samples`)
     from pi_{k-1}, with pi_0 kept as reference
     (``reference: previous`` anchors iteration k to pi_{k-1} instead, as self-rewarding LMs do:
     each iteration's KL budget then starts afresh; mode: rsft instead runs `train_sft` on the
     best response of each prompt).
Everything of iteration k lives in ``run_dir/iter-K/`` (samples, pairs, DPO metrics,
checkpoints, model); a finished iteration is not redone on resume. ``run_dir/model`` links to
the last iteration's model.

On N processes (``torchrun``/``accelerate launch``) each rank samples its share of the slice from
its own random stream, rank 0 scores everything (one annotator/judge stream, whatever N) and
writes the iteration's files, and step 4 is `train_dpo` on all ranks (DDP, or FSDP2 with
``train.fsdp``).

Labels: one per pointwise score, one per pairwise comparison (both orders of a preference
model = one label, two judge calls). That is the currency of the offline label budget, where
one annotated pair = one label.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from rlhfkit.config import (
    ConfigError,
    DataSection,
    ModelSection,
    OptimSection,
    PromptsSection,
    RolloutSection,
    SFTConfig,
    TrainSection,
    under_key,
    validate,
)
from rlhfkit.data.sources import Input
from rlhfkit.io import copy_tree_atomic, write_json_atomic
from rlhfkit.judges.rewards import build_reward_fn, check_reward_spec
from rlhfkit.judges.preference import fields_judge, is_pairwise_spec
from rlhfkit.judges.reward_set import check_on_prompts
from rlhfkit.judges.sample_scorer import Scorer, check_scorer_spec
from rlhfkit.models import load_causal_lm, load_tokenizer, save_pretrained_atomic
from rlhfkit.models.loading import check_context_length
from rlhfkit.models.start import check_policy_start
from rlhfkit.parallel import Strategy, make_strategy
from rlhfkit.rollout import load_prompt_items
from rlhfkit.rollout.prompts import prompt_inputs
from rlhfkit.trainers.dpo import DPOConfig, DPOSection, train_dpo
from rlhfkit.trainers.online_samples import sample, score_and_write
from rlhfkit.trainers.pg_eval import heldout_metrics
from rlhfkit.trainers.pg_setup import HELD_OUT_POLICY_METRICS
from rlhfkit.trainers.sft import train_sft
from rlhfkit.training import fit, open_run
from rlhfkit.training.runlock import release


@dataclass
class OnlineDPOConfig:
    """`rlhfkit online-dpo`: T iterations of sample -> score -> best/worst pairs -> DPO (or RSFT)."""

    model: ModelSection = field(default_factory=ModelSection)
    """pi_0: the starting policy and the reference."""
    prompts: PromptsSection = field(default_factory=PromptsSection)
    """Prompts: each iteration takes a fresh slice; prompts.eval are held-out prompts for evaluation."""
    rollout: RolloutSection = field(default_factory=lambda: RolloutSection(n=4, temperature=1.0, micro_batch_size=64))
    """Sampling: rollout.n responses per prompt are ranked."""
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-6, warmup_ratio=0.1))
    """Each iteration's optimizer and schedule."""
    train: TrainSection = field(default_factory=lambda: TrainSection(epochs=2.0))
    """Each iteration's DPO run (epochs, batch sizes, checkpoints). eval_every, select_best and
    early_stopping_patience count iterations and apply to the held-out evaluation on prompts.eval."""
    dpo: DPOSection = field(default_factory=DPOSection)
    """The DPO objective (dpo.reference is set by `reference`)."""
    reference: Literal["initial", "previous"] = "initial"
    """DPO anchor of iteration k: pi_0 (initial) or pi_(k-1) (previous)."""
    mode: Literal["dpo", "rsft"] = "dpo"
    """dpo, or rsft: SFT on the selected best responses (rejection-sampling fine-tuning; lr ~1e-5)."""
    rsft_min_score: Optional[float] = None
    """rsft: keep a prompt's best response only if its ranked score (after length_penalty and
    missing_eos_penalty) is >= this; null = any."""
    rsft_top_fraction: float = 1.0
    """rsft: keep only this fraction of the prompts, those whose best responses score highest."""
    iterations: int = 3
    """T: the number of iterations."""
    prompts_per_iteration: int = 64
    """Size of each iteration's fresh prompt slice."""
    scorer: str = "task:sentiment"
    """Who ranks the samples: rm:DIR, task:NAME, module:function (pointwise) or pm:DIR, judge:MODEL,
    annotator:TASK (pairwise, compared round-robin)."""
    scorer_batch_size: int = 16
    """Rows per reward-model / judge forward."""
    gold: str = ""
    """A gold judge (task:NAME or module:function): scores every iteration's samples, to measure how
    well the scorer's ranking and pairs agree with it (gold_pair_accuracy, gold_pair_margin,
    gold_ranking_accuracy, gold_mean), and the held-out evaluations (eval/gold_mean)."""
    length_penalty: float = 0.0
    """lambda: rank by score - lambda * len(response in characters)."""
    missing_eos_penalty: Optional[float] = None
    """Subtracted from the ranked score of every sample that did not end with an end-of-turn token
    (cut at rollout.max_new_tokens) before pairs are built (TRL's missing_eos_penalty), so that a
    reply that ended is chosen over a cut one (which is trained as sampled, without an end-of-turn
    token). It acts on the scorer's scale: the annotator's scores with rollout.n = 2 are 1 and 0, so
    below 1 it changes no pair, at 1 a pair whose preferred reply was cut against one that ended
    becomes a tie (dropped), and above 1 it is turned. null: no penalty; iteration.json counts cut
    samples and cut chosen ones."""
    tie_tolerance: float = 0.0
    """best - worst <= this counts as a tie (the pair is dropped)."""
    max_length: int = 512
    """Tokens of prompt + response in each iteration's training data."""

    def eval_metrics(self) -> tuple[str, ...]:
        """What its held-out evaluation logs; eval/proxy_mean with a pointwise scorer, eval/gold_mean with gold."""
        own = HELD_OUT_POLICY_METRICS if not is_pairwise_spec(self.scorer) else HELD_OUT_POLICY_METRICS[1:]
        return (*own, *(("eval/gold_mean",) if self.gold else ()))

    def inputs(self) -> list[Input]:
        """What it reads that may exist before it runs, as `PolicyGradientConfig.inputs`: the prompt
        sources, the gold judge and the scorer."""
        return [*prompt_inputs(self.prompts), ("gold", self.gold, partial(_check_gold, self)),
                ("scorer", self.scorer, partial(_check_scorer, self))]

    def validate(self, where: str) -> None:
        if self.iterations < 1 or self.prompts_per_iteration < 1:
            raise ConfigError(f"{where}: iterations and prompts_per_iteration must be >= 1")
        if self.rollout.n < 2:
            raise ConfigError(f"{where}.rollout.n: need >= 2 samples per prompt to form a pair, got {self.rollout.n}")
        if self.rollout.temperature <= 0:
            raise ConfigError(f"{where}.rollout.temperature: training samples need temperature > 0 (greedy samples of "
                              "one prompt are all the same, so no pair could be formed)")
        if self.reference not in ("initial", "previous"):
            raise ConfigError(f"{where}.reference: 'initial' (pi_0) or 'previous' (pi_(k-1)), got {self.reference!r}")
        if self.dpo.reference:
            raise ConfigError(f"{where}.dpo.reference: set by the loop; choose `reference: initial|previous` instead")
        if self.dpo.temperature != 1.0:
            raise ConfigError(f"{where}.dpo.temperature: set by the loop to rollout.temperature, the samples' own")
        if not 0 < self.rsft_top_fraction <= 1:
            raise ConfigError(f"{where}.rsft_top_fraction: must be in (0, 1], got {self.rsft_top_fraction}")
        for key in ("length_penalty", "tie_tolerance"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{where}.{key}: must be >= 0, got {getattr(self, key)}")
        if self.train.drop_last and self.prompts_per_iteration < self.train.batch_size:  # one pair per prompt at most
            raise ConfigError(f"{where}.prompts_per_iteration: {self.prompts_per_iteration}, fewer than "
                              f"train.batch_size {self.train.batch_size}: an iteration trains on one pair (or best "
                              "response) per prompt at most; raise prompts_per_iteration, lower train.batch_size, "
                              "or set train.drop_last=false")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        other, keys = (("rsft", ("rsft_min_score", "rsft_top_fraction")) if self.mode == "dpo"
                       else ("dpo", ("tie_tolerance",)))
        for key in keys:  # set, but only the other mode reads it
            if getattr(self, key) != defaults[key]:
                raise ConfigError(f"{where}.{key}: applies to mode: {other} only, and this run's mode is {self.mode}")
        if self.missing_eos_penalty is not None and not self.missing_eos_penalty >= 0:
            raise ConfigError(f"{where}.missing_eos_penalty: must be >= 0 (or null), got {self.missing_eos_penalty}")


# --------------------------------------------------------------------------- the loop

def _nothing_kept_fix(stats: dict) -> str:
    """What to change when an iteration kept nothing, from what dropped its examples."""
    if "dropped_ties" in stats:
        return "raise rollout.temperature or rollout.n"
    fixes = {"dropped_below_min_score": "lower rsft_min_score (it is compared after length_penalty and "
                                        "missing_eos_penalty)",
             "dropped_top_fraction": "raise rsft_top_fraction",
             "dropped_empty": "raise rollout.max_new_tokens or look at the samples (every best response was empty)"}
    return "; ".join(fix for key, fix in fixes.items() if stats.get(key))


def _kept(summary: dict) -> str:
    """An iteration's training examples and what was dropped, for its log line."""
    if "dropped_ties" in summary:
        return (f"{summary['pairs']} pairs ({summary['dropped_ties']} ties, {summary['dropped_identical']} "
                f"identical dropped)")
    return (f"{summary['pairs']} best responses ({summary['dropped_below_min_score']} below rsft_min_score, "
            f"{summary['dropped_top_fraction']} outside rsft_top_fraction, {summary['dropped_empty']} empty dropped)")


def train_online_dpo(cfg: OnlineDPOConfig, strategy: Strategy | None = None) -> dict:
    """Run T iterations; returns the summary written to ``online_dpo_results.json``.

    The iterations are the steps of `training.fit`: a checkpoint after each (the current model and
    the label count; the models themselves live in ``iter-K/model``), held-out evaluations every
    ``train.eval_every`` iterations, and with ``train.select_best`` the best iteration's model is the
    final one (``output_dir/model``)."""
    validate(cfg)  # a config changed in Python after load_config is checked as a loaded one is
    strategy = strategy or make_strategy(cfg.train, cfg.model)
    tokenizer, (items, dropped, eval_items) = _checked_inputs(cfg, strategy)
    run = open_run(cfg, "online_dpo", strategy)
    # the outer loop: one step per iteration, a checkpoint after each
    run.train = dataclasses.replace(cfg.train, max_steps=cfg.iterations, save_every=1, keep_checkpoints=1,
                                    log_every=1, progress=False)
    # rank 0 scores the samples; a pointwise scorer also scores each rank's held-out share (eval/proxy_mean)
    scored_here = strategy.is_main or (bool(eval_items) and not is_pairwise_spec(cfg.scorer))
    scorer = Scorer(cfg.scorer, tokenizer, strategy.device, cfg.scorer_batch_size, cfg.train.seed, cfg.gold) \
        if scored_here else None
    state = {"current": cfg.model.name, "labels": 0, "history": []}

    def iteration(step: int) -> dict:
        k = step + 1
        it_dir = run.out / f"iter-{k}"
        done = it_dir / "iteration.json"
        if done.is_file():  # finished before a restart
            summary = json.loads(done.read_text())
        else:
            chunk = items[(k - 1) * cfg.prompts_per_iteration:k * cfg.prompts_per_iteration]
            if scorer is not None:
                scorer.restart(k)
            summary = run_iteration(cfg, k, state["current"], chunk, scorer, tokenizer, it_dir, strategy)
            if strategy.is_main:
                write_json_atomic(done, summary)
            strategy.wait()
        state["labels"] += summary["labels"]
        run.guard.add_skipped(summary.get("train/skipped_steps", 0))  # the outer train/skipped_steps
        summary["labels_cumulative"] = state["labels"]
        state["history"].append(summary)
        state["current"] = str(it_dir / "model")
        run.logger.write(f"[online-{cfg.mode}] iteration {k}/{cfg.iterations}: {_kept(summary)}, "
                         f"score {summary['score_mean']:.3f}, length {summary['length_chars_mean']:.0f} chars, "
                         f"labels {state['labels']}")
        return {key: v for key, v in summary.items() if isinstance(v, (int, float))}

    def evaluate() -> dict:
        return evaluate_iteration(cfg, state["current"], eval_items, scorer, tokenizer, strategy)

    result = fit(run, iteration, cfg.iterations, models={}, optimizers={},
                 evaluate=evaluate if eval_items else None,
                 state_fn=lambda: {"online": dict(state)}, load_state=lambda st: state.update(st["online"]))
    final = state["current"]
    if result.best and result.best["step"] != result.steps:
        best = result.best["step"]
        final = cfg.model.name if best == 0 else str(run.out / f"iter-{best}" / "model")
    results = {"mode": cfg.mode, "scorer": cfg.scorer, "labels_used": state["labels"],
               "prompts_dropped_too_long": dropped, "final_model": final, "iterations": state["history"],
               "world_size": strategy.world_size, "best": result.best}
    if strategy.is_main:
        _write_final(cfg, run, tokenizer, results)
    strategy.wait()
    return results


def _checked_inputs(cfg: OnlineDPOConfig, strategy: Strategy) -> tuple[Any, tuple]:
    """Everything checked before a run directory is written or a model loads: the tokenizer and the
    tokenised prompts (`_prompts`: training items, how many were too long, held-out items)."""
    strategy.check_divisible(cfg.prompts_per_iteration, "prompts_per_iteration")  # equal sampling shares
    check_policy_start(cfg.model, cfg.prompts.max_prompt_length + cfg.rollout.max_new_tokens,
                       "rollout.max_new_tokens", "prompts.max_prompt_length + rollout.max_new_tokens")
    with under_key("max_length"):  # each iteration's DPO or SFT run
        check_context_length(cfg.model.name, cfg.max_length)
    tokenizer = load_tokenizer(cfg.model.name)
    prompts = _prompts(cfg, tokenizer)
    with under_key("scorer"):
        _check_scorer(cfg)
    with under_key("gold"):
        if cfg.gold:
            _check_gold(cfg)
    return tokenizer, prompts


def _write_final(cfg: OnlineDPOConfig, run, tokenizer, results: dict) -> None:
    """Rank 0: ``output_dir/model`` (the final iteration's model, or the start when no iteration
    beat it) and ``online_dpo_results.json``; then the run directory is released."""
    final = results["final_model"]
    if final != cfg.model.name:
        copy_tree_atomic(Path(final), run.out / "model", link=True)  # a directory of its own, no second copy
    else:  # no iteration beat the start (select_best): the final model is the starting policy itself
        # fp32, as trained models are; an adapter start merged in
        save_pretrained_atomic(load_causal_lm(cfg.model.name, "float32"), tokenizer, run.out / "model")
        results["final_model"] = str(run.out / "model")
    write_json_atomic(run.out / "online_dpo_results.json", results)
    release(run.out)


def _check_scorer(cfg: OnlineDPOConfig) -> None:
    """The scorer's spec, and a pointwise one (the simulated annotator's as its task's) against the
    training and held-out prompts' records it will score (`judges.reward_set.check_on_prompts`;
    held out: ``eval/proxy_mean``), without loading a model: at the run's start and, through
    `inputs`, before a pipeline's first stage."""
    p = cfg.prompts
    check_scorer_spec(cfg.scorer)
    pointwise = fields_judge(cfg.scorer)
    if pointwise:
        check_on_prompts(pointwise, "prompts.train", p.train, "prompts", p.limit, alone=True)
        check_on_prompts(pointwise, "prompts.eval", p.eval, "prompts_eval", p.eval_limit, alone=True)


def _check_gold(cfg: OnlineDPOConfig) -> None:
    """The gold judge's spec, against the training and the held-out prompts' records, as `_check_scorer`."""
    p = cfg.prompts
    check_reward_spec(cfg.gold)
    check_on_prompts(cfg.gold, "prompts.train", p.train, "prompts", p.limit, alone=True)
    check_on_prompts(cfg.gold, "prompts.eval", p.eval, "prompts_eval", p.eval_limit, alone=True)


def _prompts(cfg: OnlineDPOConfig, tokenizer) -> tuple[list, int, list]:
    """(training prompts in a seeded random order, number dropped for length, held-out prompts)."""
    p = cfg.prompts
    items, dropped = load_prompt_items(p.train, tokenizer, max_prompt_length=p.max_prompt_length, limit=p.limit)
    random.Random(cfg.train.seed).shuffle(items)  # each slice a random sample (files are often sorted)
    need = cfg.iterations * cfg.prompts_per_iteration
    if len(items) < need:
        raise ValueError(f"{p.train}: {len(items)} prompts, but {cfg.iterations} iterations x "
                         f"{cfg.prompts_per_iteration} fresh prompts need {need}")
    eval_items = load_prompt_items(p.eval, tokenizer, max_prompt_length=p.max_prompt_length, limit=p.eval_limit,
                                   kind="prompts_eval")[0] if p.eval else []
    return items, dropped, eval_items


@torch.no_grad()
def evaluate_iteration(cfg: OnlineDPOConfig, current: str, eval_items: list, scorer, tokenizer,
                       strategy: Strategy) -> dict:
    """Held-out metrics of the current policy (`trainers.pg_eval.heldout_metrics`): the scorer's mean
    score when it is pointwise (eval/proxy_mean), the gold judge's (eval/gold_mean), the KL to pi_0."""
    policy = load_causal_lm(current, cfg.model.dtype).to(strategy.device)
    ref = load_causal_lm(cfg.model.name, cfg.model.dtype).to(strategy.device)
    proxy = scorer.reward_fn if scorer is not None and not scorer.pairwise else None
    # the scorer's gold judge where a scorer lives, else one of this rank's own
    gold = scorer.gold if scorer is not None else build_reward_fn(cfg.gold) if cfg.gold else None
    return heldout_metrics(policy, ref, eval_items, cfg.rollout, tokenizer, strategy, proxy=proxy, gold=gold,
                           seed=cfg.train.seed, micro_batch_size=cfg.train.micro_batch_size)


def run_iteration(cfg: OnlineDPOConfig, k: int, current: str, items: list, scorer: Scorer | None, tokenizer,
                  it_dir: Path, strategy: Strategy) -> dict:
    """Steps 1-4 of one iteration; returns its summary. On N processes every rank samples its
    share, rank 0 scores and writes, all ranks train."""
    pairs_path = it_dir / ("pairs.jsonl" if cfg.mode == "dpo" else "best.jsonl")
    # Decided before anyone writes (rank 0 writes only after the collective gather in `sample`).
    if not pairs_path.is_file():  # not yet sampled (else: resume the training of step 4)
        # 1. Rollout from the current policy.
        samples, stats = sample(cfg, k, current, items, tokenizer, strategy)
        if strategy.is_main:
            score_and_write(cfg, items, samples, stats, scorer, it_dir, pairs_path)
        strategy.wait()
    stats = json.loads((it_dir / "sampling.json").read_text())
    if stats["pairs"] == 0:
        raise ValueError(f"iteration {k}: nothing to train on: {_kept(stats)}; {_nothing_kept_fix(stats)}")
    if cfg.train.drop_last and stats["pairs"] < cfg.train.batch_size:  # every batch that short (`check_enough`)
        raise ValueError(f"iteration {k}: {_kept(stats)}, fewer than train.batch_size {cfg.train.batch_size}: "
                         f"{_nothing_kept_fix(stats) or 'raise prompts_per_iteration'}; or lower train.batch_size or "
                         "set train.drop_last=false (a new run: train.output_dir elsewhere, or --overwrite)")

    # 4. Train from pi_{k-1}, anchored to pi_0 (or pi_{k-1}: cfg.reference).
    result = train_step(cfg, current, pairs_path, it_dir, strategy)
    return {"iteration": k, **stats, **{f"train/{key}": v for key, v in result.items() if isinstance(v, (int, float))}}


def train_step(cfg: OnlineDPOConfig, current: str, data_path: Path, it_dir: Path, strategy: Strategy) -> dict:
    """DPO (or SFT for rsft) on one iteration's data, in ``it_dir``; resumes its own checkpoints."""
    data = DataSection(train=str(data_path), eval_fraction=0.0, max_length=cfg.max_length, truncation="right")
    model = dataclasses.replace(cfg.model, name=current)
    train = dataclasses.replace(cfg.train, output_dir=str(it_dir), resume="auto", eval_every=0, select_best="",
                                early_stopping_patience=0)
    if cfg.mode == "dpo":
        anchor = cfg.model.name if cfg.reference == "initial" else current  # pi_0 or pi_{k-1}
        dpo = dataclasses.replace(cfg.dpo, reference=anchor, temperature=cfg.rollout.temperature)  # log-probs of pi_T
        metrics = train_dpo(DPOConfig(model=model, data=data, optim=cfg.optim, train=train, dpo=dpo), strategy)
    else:
        metrics = train_sft(SFTConfig(model=model, data=data, optim=cfg.optim, train=train), strategy)
    return {k.removeprefix("train/"): float(v) for k, v in metrics.items() if isinstance(v, (int, float, torch.Tensor))}
