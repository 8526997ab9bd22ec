"""Build a task's training data from a model's own samples, reproducibly from a seed.

    rlhfkit make-data --task sentiment --out data/sentiment --seed 0

writes to OUT:
  sft.jsonl             {"prompt", "response"}: best-of-n demonstrations by the gold judge
                        (rejection sampling), one per SFT prompt;
  preference.jsonl      {"prompt", "chosen", "rejected", "category", "gold_chosen", "gold_rejected"}:
                        two samples per prompt labelled by the simulated annotator (docs/concepts.md: Simulated human feedback);
                        identical or empty pairs are dropped;
  prompts_train.jsonl   all training prompts of the task (for PPO / GRPO / online DPO);
  prompts_eval.jsonl    the held-out prompts (never used for SFT or preference data);
  meta.json             settings, seed, counts, gold-score statistics and the annotator's
                        ceiling accuracy on the preference pairs.

With --prompts-only, only the two prompt files (and meta.json) are written. With --pairs-only
train|eval, only preference pairs (more of them, or a held-out set): see `rlhfkit.tasks.pairs`.

SFT and preference prompts are disjoint slices of the training prompts, so the reward model is
not fitted on the prompts whose demonstrations the SFT model memorised.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from pathlib import Path

import torch

from rlhfkit.data import end_of_turn_ids, render_prompt_ids
from rlhfkit.judges.rewards import RewardFn
from rlhfkit.io import write_json_atomic
from rlhfkit.models import load_causal_lm, load_tokenizer
from rlhfkit.rollout import generate
from rlhfkit.tasks import get_task
from rlhfkit.tasks.annotator import SimulatedAnnotator, agreement
from rlhfkit.tasks.base import Task

log = logging.getLogger(__name__)


def build_task_data(
    task: str | Task,
    model_name: str,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    n_sft_prompts: int = 256,
    n_pref_prompts: int = 512,
    samples_per_prompt: int = 4,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_p: float = 1.0,
    annotator_beta: float | None = None,
    flip_prob: float = 0.0,
    batch_size: int = 64,
    model=None,
    tokenizer=None,
    progress: bool = True,
) -> dict:
    """Sample, judge and label; write the files listed in the module docstring; return meta.

    model_name: loaded with `load_causal_lm` / `load_tokenizer` unless `model` and `tokenizer`
        are given (then it is only recorded in meta.json).
    samples_per_prompt: n of best-of-n for the SFT demonstrations (preference prompts get 2).
    annotator_beta: None uses the task's default. batch_size: rows per generation call.
    """
    task = get_task(task)
    beta = task.default_beta if annotator_beta is None else annotator_beta
    settings = {"n_sft_prompts": n_sft_prompts, "n_pref_prompts": n_pref_prompts,
                "samples_per_prompt": samples_per_prompt, "max_new_tokens": max_new_tokens,
                "temperature": temperature, "top_p": top_p, "annotator_beta": beta, "flip_prob": flip_prob,
                "batch_size": batch_size,
                "torch_threads": torch.get_num_threads()}  # float sums, hence samples, depend on it
    if model is None or tokenizer is None:
        tokenizer = tokenizer or load_tokenizer(model_name)
        model = model or load_causal_lm(model_name)
    torch.manual_seed(seed)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    train = task.train_prompts(seed=seed)
    if n_sft_prompts + n_pref_prompts > len(train):
        raise ValueError(f"{n_sft_prompts} SFT + {n_pref_prompts} preference prompts > the "
                         f"{len(train)} training prompts of task {task.name}")
    sampler = _Sampler(model, tokenizer, task, generator=generator, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, batch_size=batch_size, progress=progress)
    t0 = time.perf_counter()
    sft_rows, pref_rows, samples = _sample_and_label(sampler, task, train[:n_sft_prompts],
                                                     train[n_sft_prompts:n_sft_prompts + n_pref_prompts],
                                                     samples_per_prompt, beta=beta, flip_prob=flip_prob, seed=seed)
    elapsed = time.perf_counter() - t0

    # 3. Files.
    out = Path(out_dir)
    prompt_counts = write_prompt_files(task, out, seed=seed)
    _write_jsonl(out / "sft.jsonl", [{"prompt": r["prompt"], "response": r["response"]} for r in sft_rows])
    _write_jsonl(out / "preference.jsonl", pref_rows)
    meta = {"task": task.name, "model": str(model_name), "seed": seed, "settings": settings,
            **_summary(sft_rows, pref_rows, n_pref_prompts, samples, prompt_counts, sampler.tokens, elapsed)}
    write_json_atomic(out / "meta.json", meta)  # strict JSON: an empty set's NaN statistics are null
    return meta


def _sample_and_label(sampler, task: Task, sft_prompts: list, pref_prompts: list, samples_per_prompt: int, *,
                      beta: float, flip_prob: float, seed: int) -> tuple[list[dict], list[dict], list]:
    """(SFT rows, preference rows, every sample): 1. SFT demonstrations, the best of n samples by
    the gold judge (rejection sampling); 2. preference pairs, two samples per prompt labelled by
    the simulated annotator."""
    sft_samples = sampler(sft_prompts, samples_per_prompt, "sft best-of-n")
    pref_samples = sampler(pref_prompts, 2, "preference pairs")
    pref_rows = _label_pairs(pref_prompts, pref_samples, task, beta=beta, flip_prob=flip_prob, seed=seed)
    return _best_of_n(sft_prompts, sft_samples), pref_rows, sft_samples + pref_samples


def _summary(sft_rows, pref_rows, n_pref_prompts, samples, prompt_counts, tokens, elapsed) -> dict:
    """Counts, gold-score statistics, annotator ceiling and speed for meta.json."""
    flat = [s for group in samples for s in group]
    return {
        "counts": {"sft": len(sft_rows), "preference": len(pref_rows),
                   "preference_dropped": n_pref_prompts - len(pref_rows),
                   **prompt_counts, "samples": len(flat), "generated_tokens": tokens},
        "gold": {"all_samples": _stats([s.gold for s in flat]),
                 "sft_demonstrations": _stats([r["gold"] for r in sft_rows]),
                 "chosen": _stats([r["gold_chosen"] for r in pref_rows]),
                 "rejected": _stats([r["gold_rejected"] for r in pref_rows])},
        "eos_fraction": round(sum(s.eos for s in flat) / max(1, len(flat)), 4),
        # How often the gold judge agrees with the labels: the noise ceiling of a learned RM.
        "annotator_ceiling_accuracy": agreement([r["gold_chosen"] for r in pref_rows],
                                                [r["gold_rejected"] for r in pref_rows]),
        "generation_seconds": round(elapsed, 1),
        "generation_tokens_per_s": round(tokens / max(elapsed, 1e-9), 1),
    }


def write_prompt_files(task: str | Task, out_dir: str | os.PathLike, seed: int = 0) -> dict:
    """Write prompts_train.jsonl and prompts_eval.jsonl (no model needed); return their counts.

    Rows are in the task's shuffled order for `seed`, so that the first N lines of a file are a
    fair sample (a sorted file would start with one template, or with "10 + 10").
    """
    task = get_task(task)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, held = task.train_prompts(seed=seed), task.eval_prompts(seed=seed)
    _write_jsonl(out / "prompts_train.jsonl", train)
    _write_jsonl(out / "prompts_eval.jsonl", held)
    return {"prompts_train": len(train), "prompts_eval": len(held)}


class _Sample:
    __slots__ = ("text", "gold", "eos")

    def __init__(self, text: str, gold: float, eos: bool):
        self.text, self.gold, self.eos = text, gold, eos


class _Sampler:
    """n samples per prompt record, decoded and scored by the gold judge, in batches of rows."""

    def __init__(self, model, tokenizer, task: Task, *, generator, max_new_tokens, temperature, top_p,
                 batch_size, progress):

        self.model, self.tok, self.task = model, tokenizer, task
        self.judge = gold_judge(task)
        self.render = lambda p: render_prompt_ids(tokenizer, task.messages(p))
        self.eos = sorted(end_of_turn_ids(tokenizer))
        self.kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, generator=generator)
        self.batch_size, self.progress = batch_size, progress
        self.tokens = 0

    def __call__(self, records: list[dict], n: int, desc: str) -> list[list[_Sample]]:
        from tqdm.auto import tqdm


        per_call = max(1, self.batch_size // n)  # prompts per generate call
        out: list[list[_Sample]] = []
        with tqdm(total=len(records) * n, desc=desc, unit="sample", disable=not self.progress) as bar:
            for i in range(0, len(records), per_call):
                chunk = records[i:i + per_call]
                exp = generate(self.model, [self.render(r["prompt"]) for r in chunk], n=n,
                               eos_token_id=self.eos, pad_token_id=self.tok.pad_token_id,
                               return_logprobs=False, **self.kw)
                lengths = exp.response_lengths().tolist()
                self.tokens += sum(lengths)
                texts = [self.tok.decode(row[:k], skip_special_tokens=True).strip()
                         for row, k in zip(exp.response_ids.tolist(), lengths)]
                rows = [chunk[j] for j in exp.prompt_index.tolist()]
                gold = self.judge([r["prompt"] for r in rows], texts, fields=[record_fields(r) for r in rows])
                eos = exp.eos.tolist()
                for j in range(len(chunk)):
                    out.append([_Sample(texts[k], gold[k], eos[k]) for k in range(j * n, (j + 1) * n)])
                bar.update(len(texts))
        return out


def _best_of_n(records: list[dict], samples: list[list[_Sample]]) -> list[dict]:
    """One demonstration per prompt: the highest gold score among non-empty samples, preferring
    samples that ended with EOS (a truncated demonstration teaches the model to stop mid-sentence,
    since SFT appends the end-of-turn token). Prompts whose samples are all empty are skipped."""
    rows = []
    for rec, group in zip(records, samples):
        cands = [s for s in group if s.text]
        if not cands:
            continue
        best = max(cands, key=lambda s: (s.eos, s.gold))  # first of equals: deterministic
        rows.append({"prompt": rec["prompt"], "response": best.text, "gold": best.gold})
    return rows


def _label_pairs(records: list[dict], samples: list[list[_Sample]], task: Task, *, beta: float, flip_prob: float,
                 seed: int) -> list[dict]:
    """Preference records from two samples per prompt (identical or empty pairs dropped), labelled
    by the task's simulated annotator whose gold judge sees each record's fields."""
    keep = [(rec, g[0], g[1]) for rec, g in zip(records, samples)
            if g[0].text and g[1].text and g[0].text != g[1].text]
    if not keep:
        return []
    prompts = [rec["prompt"] for rec, _, _ in keep]
    judge, fields = gold_judge(task), [record_fields(rec) for rec, _, _ in keep]
    annotator = SimulatedAnnotator(lambda p, r: judge(p, r, fields=fields), beta=beta, flip_prob=flip_prob, seed=seed)
    labels, g1, g2 = annotator.annotate(prompts, [a.text for _, a, _ in keep], [b.text for _, _, b in keep])
    rows = []
    for (rec, a, b), y, s1, s2 in zip(keep, labels, g1, g2):
        (c, sc), (r, sr) = ((a, s1), (b, s2)) if y else ((b, s2), (a, s1))
        rows.append({"prompt": rec["prompt"], "chosen": c.text, "rejected": r.text,
                     "category": rec.get("category", "default"),
                     "gold_chosen": sc, "gold_rejected": sr})
    return rows


def record_fields(record: dict) -> dict:
    """The fields of a task prompt record that a reward function receives: all but the prompt."""
    return {k: v for k, v in record.items() if k != "prompt"}


def gold_judge(task: Task) -> RewardFn:
    """The task's gold judge as a validated reward function that takes the records' fields."""
    return RewardFn(task.gold_scores, f"task:{task.name}")


def _stats(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "mean": round(statistics.fmean(xs), 4),
            "std": round(statistics.pstdev(xs), 4) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs),
            "quartiles": [round(q, 4) for q in statistics.quantiles(xs, n=4)] if len(xs) > 1 else [xs[0]] * 3}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
