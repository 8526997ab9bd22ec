"""Steps 1-3 of an online DPO / RSFT iteration (`trainers.online_dpo`): the current policy's
samples, their scores and ranking, and the iteration's files (samples, pairs or best replies,
sampling.json).

The pairs and best replies carry, besides their text, the token ids the policy sampled
(`data.formats.TOKEN_FIELDS`), and the iteration trains on those: the text rendered again would
differ where decoding does not round-trip, and would close a reply cut at ``max_new_tokens``
with an end-of-turn token the policy never produced.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rlhfkit.algos.selection import best_of_n, build_pairs, length_penalised, rsft_dropped
from rlhfkit.eval.stats import gold_agreement
from rlhfkit.io import write_json_atomic, write_jsonl_atomic
from rlhfkit.models import load_causal_lm
from rlhfkit.parallel import Strategy
from rlhfkit.rng import set_seed
from rlhfkit.rollout import decode_responses, rank_stream_seed, response_metrics, rollout


@dataclass
class Samples:
    """n responses per prompt, in the order of the prompts."""

    texts: list[str]  # decoded, special tokens skipped
    eos: list[bool]  # whether each ended with an end-of-turn token (else it was cut at max_new_tokens)
    ids: list[list[int]]  # the sampled tokens, the end-of-turn token included when there is one


def sample(cfg, k: int, current: str, items: list, tokenizer, strategy: Strategy) -> tuple[Samples, dict]:
    """n responses per prompt from ``current``, every rank sampling its share of ``items`` from its
    own stream; returns (every rank's responses in the order of ``items``, response statistics)."""
    set_seed(cfg.train.seed * 1000 + k)  # a different, reproducible sample stream per iteration
    policy = load_causal_lm(current, cfg.model.dtype).to(strategy.device)
    mine = strategy.shard(items)
    seed = None if strategy.world_size == 1 else rank_stream_seed(cfg.train.seed, k, strategy.rank)
    exp = rollout(policy, mine, cfg.rollout, tokenizer, seed=seed)
    del policy
    n = cfg.rollout.n
    local = decode_responses(exp, tokenizer)
    done = exp.eos.tolist()
    ids = [row[:length] for row, length in zip(exp.response_ids.tolist(), exp.response_lengths().tolist())]
    groups = strategy.unshard([(local[i * n:(i + 1) * n], done[i * n:(i + 1) * n], ids[i * n:(i + 1) * n])
                               for i in range(len(mine))])
    out = Samples([r for g, _, _ in groups for r in g], [bool(e) for _, g, _ in groups for e in g],
                  [t for _, _, g in groups for t in g])  # back in the order of items
    stats = {k_: float(v) for k_, v in response_metrics(exp, local, strategy).items()}
    stats["length_chars_mean"] = sum(len(r) for r in out.texts) / len(out.texts)
    return out, stats


def score_and_write(cfg, items: list, samples: Samples, stats: dict, scorer, it_dir: Path, pairs_path: Path) -> None:
    """Steps 2-3 and the iteration's files: samples, pairs (or RSFT's best responses), sampling.json.
    ``items``: the `PromptItem` of each group (its ``ids`` the prompt the policy saw)."""
    n, responses, eos = cfg.rollout.n, samples.texts, samples.eos
    it_dir.mkdir(parents=True, exist_ok=True)
    rows = [items[i // n] for i in range(len(responses))]
    # 2. Score. 3. Rank (a sample cut at max_new_tokens loses missing_eos_penalty).
    scores, labels = scorer.score(rows, responses, n)
    ranked = length_penalised(scores, responses, cfg.length_penalty)
    if cfg.missing_eos_penalty is not None:
        ranked = [r if done else r - cfg.missing_eos_penalty for r, done in zip(ranked, eos)]
    gold = scorer.gold_scores(rows, responses)
    write_jsonl_atomic(it_dir / "samples.jsonl", [
        {"prompt": r.messages, "response": a, "score": s, "ranked_score": rs, "eos": done, "group": i // n,
         **({"gold": gold[i]} if gold is not None else {})}
        for i, (r, a, s, rs, done) in enumerate(zip(rows, responses, scores, ranked, eos))])
    pairs, counts = build_pairs(ranked, responses, n, cfg.tie_tolerance)
    stats["samples_cut"] = sum(not done for done in eos)
    if cfg.mode == "dpo":
        records = [{"prompt": items[g].messages, "chosen": responses[b], "rejected": responses[w],
                    "score_chosen": scores[b], "score_rejected": scores[w], "prompt_ids": items[g].ids,
                    "chosen_ids": samples.ids[b], "rejected_ids": samples.ids[w]} for g, b, w in pairs]
        stats.update(dropped_ties=counts["ties"], dropped_identical=counts["identical"], dropped_empty=counts["empty"],
                     chosen_cut=sum(not eos[b] for _, b, _ in pairs))
    else:
        best = best_of_n(ranked, responses, n, cfg.rsft_min_score, cfg.rsft_top_fraction)
        records = [{"prompt": items[g].messages, "response": responses[b], "score": scores[b],
                    "prompt_ids": items[g].ids, "response_ids": samples.ids[b]} for g, b in best]
        stats.update(rsft_dropped(ranked, responses, n, cfg.rsft_min_score, len(best)),
                     chosen_cut=sum(not eos[b] for _, b in best))
        kept = {g for g, _ in best}
        pairs = [p for p in pairs if p[0] in kept]  # gold's view of what is trained: the kept groups' best vs worst
    if gold is not None:
        stats.update(gold_agreement(ranked, gold, pairs, n))
    stats.update(**labels, pairs=len(records), score_mean=sum(scores) / len(scores))
    write_json_atomic(it_dir / "sampling.json", stats)
    write_jsonl_atomic(pairs_path, records)
