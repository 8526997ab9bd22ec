"""Online iterative DPO and rejection-sampling fine-tuning (SPEC section 7).

    rlhfkit online-dpo --config configs/online_dpo.yaml scorer=task:sentiment iterations=3

Offline DPO over-optimises: a fixed dataset cannot cover what the improving policy writes. Here
each iteration k = 1..T, on a fresh slice of prompts:
  1. rollout: n responses per prompt from the current policy pi_{k-1} (shared rollout engine);
  2. score: a pointwise reward (rm:DIR, task:NAME gold judge, module:function) or a pairwise judge
     (pm:DIR preference model, judge:MODEL LLM-as-judge, annotator:TASK simulated human; n
     responses are compared round-robin, score = mean P(win));
  3. rank: score - length_penalty * |a| (characters); best = chosen, worst = rejected; pairs whose
     two responses are identical or tie are dropped and counted;
  4. train: `train_dpo` on the iteration's pairs from pi_{k-1}, with pi_0 kept as reference
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
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from rlhfkit.config import ConfigError, DataSection, ModelSection, OptimSection, TrainSection
from rlhfkit.trainers.common import RunLogger, Runtime, prepare_run_dir, set_seed, write_json_atomic
from rlhfkit.trainers.dpo import DPOConfig, DPOSection, train_dpo
from rlhfkit.trainers.policy_gradient import (
    PromptsSection, RolloutSection, decode_responses, load_prompt_items, rank_stream_seed, response_metrics, rollout,
)


@dataclass
class OnlineDPOConfig:
    model: ModelSection = field(default_factory=ModelSection)  # pi_0: starting policy and reference
    prompts: PromptsSection = field(default_factory=PromptsSection)
    rollout: RolloutSection = field(default_factory=lambda: RolloutSection(n=4, temperature=1.0, micro_batch_size=64))
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-6, warmup_ratio=0.1))
    train: TrainSection = field(default_factory=lambda: TrainSection(epochs=2.0))  # each iteration's update
    dpo: DPOSection = field(default_factory=DPOSection)  # dpo.reference is set by `reference` below
    reference: Literal["initial", "previous"] = "initial"  # DPO anchor of iteration k: pi_0 or pi_{k-1}
    mode: Literal["dpo", "rsft"] = "dpo"  # rsft = SFT on best-of-n (set optim.lr ~1e-5 for it)
    iterations: int = 3  # T
    prompts_per_iteration: int = 64  # size of each fresh prompt slice
    scorer: str = "task:sentiment"  # rm:DIR | task:NAME | module:function | pm:DIR | judge:MODEL | annotator:TASK
    scorer_batch_size: int = 16  # rows per reward-model / judge forward
    length_penalty: float = 0.0  # lambda: rank by score - lambda * len(response in characters)
    tie_tolerance: float = 0.0  # best - worst <= this counts as a tie (pair dropped)
    max_length: int = 512  # tokens of prompt + response in the iteration's training data

    def validate(self, where: str) -> None:
        if self.iterations < 1 or self.prompts_per_iteration < 1:
            raise ConfigError(f"{where}: iterations and prompts_per_iteration must be >= 1")
        if self.rollout.n < 2:
            raise ConfigError(f"{where}.rollout.n: need >= 2 samples per prompt to form a pair, got {self.rollout.n}")
        if self.reference not in ("initial", "previous"):
            raise ConfigError(f"{where}.reference: 'initial' (pi_0) or 'previous' (pi_(k-1)), got {self.reference!r}")
        if self.dpo.reference:
            raise ConfigError(f"{where}.dpo.reference: set by the loop; choose `reference: initial|previous` instead")
        if self.length_penalty < 0 or self.tie_tolerance < 0:
            raise ConfigError(f"{where}: length_penalty and tie_tolerance must be >= 0")


# --------------------------------------------------------------------------- pure steps

def build_pairs(scores, responses, n: int, tie_tolerance: float = 0.0) -> tuple[list[tuple[int, int, int]], dict]:
    """Best-vs-worst pair of each group of n consecutive rows (SPEC 7).

    scores, responses: length G*n, rows [g*n, (g+1)*n) belong to prompt g. Returns
    ([(g, best_row, worst_row), ...], counts). A group is dropped when its best and worst
    responses are the same text (``identical``), when best - worst <= tie_tolerance (``ties``),
    or when either is empty (``empty``: nothing to learn from, and not a valid preference record).
    """
    if len(scores) != len(responses) or len(scores) % n:
        raise ValueError(f"{len(scores)} scores / {len(responses)} responses do not form groups of {n}")
    pairs, counts = [], {"identical": 0, "ties": 0, "empty": 0}
    for g in range(len(scores) // n):
        rows = range(g * n, (g + 1) * n)
        best = max(rows, key=lambda i: scores[i])  # first of equals: deterministic
        worst = min((i for i in rows if i != best), key=lambda i: scores[i])  # never the same row
        a, b = responses[best].strip(), responses[worst].strip()
        if a == b:
            counts["identical"] += 1
        elif scores[best] - scores[worst] <= tie_tolerance:
            counts["ties"] += 1
        elif not a or not b:
            counts["empty"] += 1
        else:
            pairs.append((g, best, worst))
    return pairs, counts


def best_of_n(scores, responses, n: int) -> list[tuple[int, int]]:
    """(g, best_row) for every group whose best response is not empty (RSFT's data)."""
    out = []
    for g in range(len(scores) // n):
        best = max(range(g * n, (g + 1) * n), key=lambda i: scores[i])
        if responses[best].strip():
            out.append((g, best))
    return out


def length_penalised(scores, responses, lam: float) -> list[float]:
    """score - lam * |a|, |a| in characters (SPEC 7)."""
    return [s - lam * len(r) for s, r in zip(scores, responses)]


def round_robin(compare, contexts: list[str], responses: list[str], n: int) -> list[float]:
    """Pairwise judge -> per-response score: mean over the other n-1 responses of its prompt of
    P(this > other). Makes n(n-1)/2 comparisons per prompt in one batched call."""
    idx = [(g * n + i, g * n + j) for g in range(len(responses) // n) for i in range(n) for j in range(i + 1, n)]
    probs = compare([contexts[i] for i, _ in idx], [responses[i] for i, _ in idx], [responses[j] for _, j in idx])
    wins = [0.0] * len(responses)
    for (i, j), p in zip(idx, probs):
        wins[i] += p
        wins[j] += 1.0 - p
    return [w / (n - 1) for w in wins]


# --------------------------------------------------------------------------- scoring

class Scorer:
    """One interface over pointwise rewards and pairwise judges: ``score(items, responses, n)``."""

    def __init__(self, spec: str, tokenizer, device, batch_size: int, seed: int = 0):
        from rlhfkit.judges.preference import build_pairwise_judge, is_pairwise_spec

        self.spec = spec
        self.pairwise = is_pairwise_spec(spec)
        if self.pairwise:
            self.judge = build_pairwise_judge(spec, tokenizer=tokenizer, device=device, batch_size=batch_size,
                                              seed=seed)
        else:
            from rlhfkit.judges.rewards import build_reward_fn

            self.reward_fn = build_reward_fn(spec, tokenizer=tokenizer, device=device, batch_size=batch_size)

    def score(self, rows: list, responses: list[str], n: int) -> tuple[list[float], dict]:
        """rows: the PromptItem of each response. Returns (scores, {"labels", "judge_calls"})."""
        if self.pairwise:
            before = self.judge.calls
            scores = round_robin(self.judge.compare, [self.judge.context(r.messages) for r in rows], responses, n)
            labels = len(responses) // n * n * (n - 1) // 2
            return scores, {"labels": labels, "judge_calls": self.judge.calls - before}
        scores = self.reward_fn([r.text for r in rows], responses, messages=[r.messages for r in rows])
        return scores, {"labels": len(responses), "judge_calls": len(responses)}


# --------------------------------------------------------------------------- the loop

def train_online_dpo(cfg: OnlineDPOConfig) -> dict:
    """Run T iterations; returns the summary written to ``online_dpo_results.json``."""
    from rlhfkit.models import load_tokenizer

    rt = Runtime(cfg.train.seed)  # the ranks share out sampling; each iteration's DPO makes its own (train.fsdp)
    rt.check_divisible(cfg.prompts_per_iteration, "prompts_per_iteration")  # equal sampling shares
    out = prepare_run_dir(cfg, "online_dpo", rt.is_main)
    tokenizer = load_tokenizer(cfg.model.name)
    items, dropped = load_prompt_items(cfg.prompts, tokenizer)
    random.Random(cfg.train.seed).shuffle(items)  # each slice a random sample (files are often sorted)
    need = cfg.iterations * cfg.prompts_per_iteration
    if len(items) < need:
        raise ValueError(f"{cfg.prompts.train}: {len(items)} prompts, but {cfg.iterations} iterations x "
                         f"{cfg.prompts_per_iteration} fresh prompts need {need}")
    scorer = Scorer(cfg.scorer, tokenizer, rt.device, cfg.scorer_batch_size, cfg.train.seed) if rt.is_main else None
    if rt.is_main:
        (out / "metrics.jsonl").unlink(missing_ok=True)  # rebuilt from the iterations' summaries on resume
    logger = RunLogger(out, cfg.iterations, enabled=rt.is_main, progress=False, desc="online-dpo")

    current, history, labels = cfg.model.name, [], 0
    for k in range(1, cfg.iterations + 1):
        it_dir = out / f"iter-{k}"
        done = it_dir / "iteration.json"
        if done.is_file():  # finished before a restart
            summary = json.loads(done.read_text())
        else:
            chunk = items[(k - 1) * cfg.prompts_per_iteration:k * cfg.prompts_per_iteration]
            summary = run_iteration(cfg, k, current, chunk, scorer, tokenizer, it_dir, rt)
            if rt.is_main:
                write_json_atomic(done, summary)
            rt.wait()
        labels += summary["labels"]
        summary["labels_cumulative"] = labels
        history.append(summary)
        logger.log(k, {key: v for key, v in summary.items() if isinstance(v, (int, float))})
        logger.write(f"[online-{cfg.mode}] iteration {k}/{cfg.iterations}: {summary['pairs']} pairs "
                     f"({summary['dropped_ties']} ties, {summary['dropped_identical']} identical dropped), "
                     f"score {summary['score_mean']:.3f}, length {summary['length_chars_mean']:.0f} chars, "
                     f"labels {labels}")
        current = str(it_dir / "model")
    logger.close()
    results = {"mode": cfg.mode, "scorer": cfg.scorer, "labels_used": labels, "prompts_dropped_too_long": dropped,
               "final_model": current, "iterations": history, "world_size": rt.world_size}
    if rt.is_main:
        _link_final(out, Path(current))
        write_json_atomic(out / "online_dpo_results.json", results)
    rt.wait()
    return results


def run_iteration(cfg: OnlineDPOConfig, k: int, current: str, items: list, scorer: Scorer | None, tokenizer,
                  it_dir: Path, rt: Runtime) -> dict:
    """Steps 1-4 of one iteration; returns its summary. On N processes every rank samples its
    share, rank 0 (the only one with a ``scorer``) scores and writes, all ranks train."""
    pairs_path = it_dir / ("pairs.jsonl" if cfg.mode == "dpo" else "best.jsonl")
    # Decided before anyone writes (rank 0 writes only after the collective gather in `sample`).
    if not pairs_path.is_file():  # not yet sampled (else: resume the training of step 4)
        # 1. Rollout from the current policy.
        responses, stats = sample(cfg, k, current, items, tokenizer, rt)
        if rt.is_main:
            _score_and_write(cfg, items, responses, stats, scorer, it_dir, pairs_path)
        rt.wait()
    stats = json.loads((it_dir / "sampling.json").read_text())
    if stats["pairs"] == 0:
        raise ValueError(f"iteration {k}: every pair was dropped (ties/identical); raise rollout.temperature or n")

    # 4. Train from pi_{k-1}, anchored to pi_0 (or pi_{k-1}: cfg.reference).
    result = train_step(cfg, current, pairs_path, it_dir)
    return {"iteration": k, **stats, **{f"train/{key}": v for key, v in result.items() if isinstance(v, (int, float))}}


def _score_and_write(cfg: OnlineDPOConfig, items: list, responses: list[str], stats: dict, scorer: Scorer,
                     it_dir: Path, pairs_path: Path) -> None:
    """Steps 2-3 and the iteration's files: samples, pairs (or RSFT's best responses), sampling.json."""
    n = cfg.rollout.n
    it_dir.mkdir(parents=True, exist_ok=True)
    rows = [items[i // n] for i in range(len(responses))]
    # 2. Score. 3. Rank.
    scores, labels = scorer.score(rows, responses, n)
    ranked = length_penalised(scores, responses, cfg.length_penalty)
    _write_jsonl(it_dir / "samples.jsonl", [
        {"prompt": r.messages, "response": a, "score": s, "ranked_score": rs, "group": i // n}
        for i, (r, a, s, rs) in enumerate(zip(rows, responses, scores, ranked))])
    pairs, counts = build_pairs(ranked, responses, n, cfg.tie_tolerance)
    if cfg.mode == "dpo":
        records = [{"prompt": items[g].messages, "chosen": responses[b], "rejected": responses[w],
                    "score_chosen": scores[b], "score_rejected": scores[w]} for g, b, w in pairs]
    else:
        records = [{"messages": [*items[g].messages, {"role": "assistant", "content": responses[b]}],
                    "score": scores[b]} for g, b in best_of_n(ranked, responses, n)]
    stats.update(**labels, pairs=len(records), dropped_ties=counts["ties"],
                 dropped_identical=counts["identical"], dropped_empty=counts["empty"],
                 score_mean=sum(scores) / len(scores))
    write_json_atomic(it_dir / "sampling.json", stats)
    _write_jsonl(pairs_path, records)


def sample(cfg: OnlineDPOConfig, k: int, current: str, items: list, tokenizer,
           rt: Runtime) -> tuple[list[str], dict]:
    """n responses per prompt from ``current``, every rank sampling its share of ``items`` from its
    own stream; returns (all decoded responses in the order of ``items``, response statistics)."""
    from rlhfkit.models import load_causal_lm

    set_seed(cfg.train.seed * 1000 + k)  # a different, reproducible sample stream per iteration
    policy = load_causal_lm(current, cfg.model.dtype).to(rt.device)
    mine = rt.shard(items)
    seed = None if rt.world_size == 1 else rank_stream_seed(cfg.train.seed, k, rt.rank)
    exp = rollout(policy, mine, cfg.rollout, tokenizer, seed=seed)
    del policy
    n = cfg.rollout.n
    local = decode_responses(exp, tokenizer)
    groups = rt.unshard([local[i * n:(i + 1) * n] for i in range(len(mine))])  # back in the order of items
    responses = [r for g in groups for r in g]
    stats = {k_: float(v) for k_, v in response_metrics(exp, local, rt).items()}
    stats["length_chars_mean"] = sum(len(r) for r in responses) / len(responses)
    return responses, stats


def train_step(cfg: OnlineDPOConfig, current: str, data_path: Path, it_dir: Path) -> dict:
    """DPO (or SFT for rsft) on one iteration's data, in ``it_dir``; resumes its own checkpoints."""
    data = DataSection(train=str(data_path), eval_fraction=0.0, max_length=cfg.max_length, truncation="right")
    model = dataclasses.replace(cfg.model, name=current)
    train = dataclasses.replace(cfg.train, output_dir=str(it_dir), resume=True)
    if cfg.mode == "dpo":
        anchor = cfg.model.name if cfg.reference == "initial" else current  # pi_0 or pi_{k-1}
        dpo = dataclasses.replace(cfg.dpo, reference=anchor)
        metrics = train_dpo(DPOConfig(model=model, data=data, optim=cfg.optim, train=train, dpo=dpo))
    else:
        from rlhfkit.config import SFTConfig
        from rlhfkit.trainers.sft import train_sft

        metrics = train_sft(SFTConfig(model=model, data=data, optim=cfg.optim, train=train))
    return {k.removeprefix("train/"): float(v) for k, v in metrics.items() if isinstance(v, (int, float, torch.Tensor))}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def _link_final(out: Path, model_dir: Path) -> None:
    """``out/model`` -> the last iteration's model (a relative symlink: the run dir stays movable)."""
    link = out / "model"
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.exists():
        return
    os.symlink(os.path.relpath(model_dir, out), link)
