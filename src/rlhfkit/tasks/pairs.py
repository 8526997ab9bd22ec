"""More annotator-labelled preference pairs for a task, on its training or its held-out prompts.

    rlhfkit make-data --task sentiment --pairs-only eval  --n-pref-prompts 320  --out DIR --seed 1
    rlhfkit make-data --task sentiment --pairs-only train --n-sft-prompts 128 --n-pref-prompts 1152 \
        --prompt-seed 0 --seed 2 --out DIR

writes DIR/preference.jsonl (rows as in `build_task_data`) and DIR/meta.json. The prompts are
those of the full build for ``prompt_seed``: "train" takes the preference slice of the training
prompts (after the first ``skip`` = n_sft_prompts, the SFT prompts), "eval" the first
``n_prompts`` held-out prompts. ``seed`` drives sampling and the annotator alone, so a new seed on
the same prompts gives new samples and new labels: more pairs for the same prompt set, or a fixed
held-out preference set on prompts no training file uses.

``prompts`` (``--prompts FILE``) takes the prompts from a file instead of the task's own: one
JSON object per line with a string ``prompt`` (the task's chat template and judge apply; every
other field goes to the judge, e.g. ``answer`` for arithmetic, and ``category`` to the pairs), e.g.
a held-out set worded unlike the task's prompts:

    rlhfkit make-data --task sentiment --pairs-only eval --prompts task:sentiment/prompts_ood.jsonl \
        --n-pref-prompts 320 --pairs-per-prompt 2 --seed 1 --out DIR

``pair_from`` > 2 samples that many responses per pair and pairs the first highest-gold with the
first lowest-gold one, dropping prompts whose samples all score the same. On a 0/1 verifiable task
(arithmetic) this gives correct-versus-wrong pairs; with the default 2 the pair is two plain samples.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from rlhfkit.data.errors import DataError, type_name
from rlhfkit.data.records import load_records
from rlhfkit.data.sources import resolve_source
from rlhfkit.io import write_json_atomic
from rlhfkit.models import load_causal_lm, load_tokenizer
from rlhfkit.tasks import get_task
from rlhfkit.tasks.annotator import agreement
from rlhfkit.tasks.base import Task
from rlhfkit.tasks.build import _label_pairs, _Sampler, _stats, _write_jsonl


def build_preference_pairs(
    task: str | Task,
    model_name: str,
    out_dir,
    *,
    split: str = "train",
    n_prompts: int = 512,
    skip: int = 0,
    pairs_per_prompt: int = 1,
    pair_from: int = 2,
    prompt_seed: int = 0,
    prompts: str | None = None,
    seed: int = 0,
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
    """Sample ``pairs_per_prompt`` pairs for each of ``n_prompts`` prompts, label them with the
    task's simulated annotator, write OUT/preference.jsonl and OUT/meta.json; return meta."""
    task = get_task(task)
    records = select_prompts(task, split, n_prompts, skip, pairs_per_prompt, pair_from, prompt_seed, prompts)
    beta = task.default_beta if annotator_beta is None else annotator_beta
    settings = {"split": split, "prompts": prompts, "n_prompts": n_prompts, "skip": skip,
                "pairs_per_prompt": pairs_per_prompt, "pair_from": pair_from, "prompt_seed": prompt_seed,
                "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "annotator_beta": beta,
                "flip_prob": flip_prob, "batch_size": batch_size, "torch_threads": torch.get_num_threads()}
    if model is None or tokenizer is None:
        tokenizer = tokenizer or load_tokenizer(model_name)
        model = model or load_causal_lm(model_name)
    torch.manual_seed(seed)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    sampler = _Sampler(model, tokenizer, task, generator=generator, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, batch_size=batch_size, progress=progress)
    t0 = time.perf_counter()
    samples = sampler(records, pairs_per_prompt * pair_from, f"{split} preference pairs")
    # one (prompt, two samples) entry per pair, prompt-major: all pairs of a prompt are adjacent
    recs, two = [], []
    for rec, group in zip(records, samples):
        for k in range(pairs_per_prompt):
            chosen = _pick_two(group[k * pair_from:(k + 1) * pair_from])
            if chosen is not None:
                recs.append(rec)
                two.append(chosen)
    rows = _label_pairs(recs, two, task, beta=beta, flip_prob=flip_prob, seed=seed)
    elapsed = time.perf_counter() - t0

    meta = {"task": task.name, "model": str(model_name), "seed": seed, "settings": settings,
            **_summary(rows, samples, n_prompts * pairs_per_prompt, sampler.tokens),
            "generation_seconds": round(elapsed, 1)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "preference.jsonl", rows)
    write_json_atomic(out / "meta.json", meta)
    return meta


def select_prompts(task: Task, split: str, n_prompts: int, skip: int, pairs_per_prompt: int, pair_from: int,
                   prompt_seed: int, prompts: str | None = None) -> list[dict]:
    """The prompt records the pairs are sampled on (the task's, or those of the file ``prompts``);
    ValueError naming the make-data flag (or a DataError naming the file, line and field) when the
    settings cannot be met."""
    if split not in ("train", "eval"):
        raise ValueError(f"--pairs-only: 'train' or 'eval', got {split!r}")
    if pair_from < 2:
        raise ValueError(f"--pair-from: must be >= 2, got {pair_from}")
    if pairs_per_prompt < 1:
        raise ValueError(f"--pairs-per-prompt: must be >= 1, got {pairs_per_prompt}")
    if prompts is not None:
        pool, where = file_prompts(prompts), f"prompts of {prompts}"
    else:
        pool = task.train_prompts(seed=prompt_seed) if split == "train" else task.eval_prompts(seed=prompt_seed)
        where = f"{split} prompts of task {task.name}"
    if n_prompts < 1 or skip + n_prompts > len(pool):
        raise ValueError(f"--n-pref-prompts: {n_prompts} prompts after {skip} skipped (--n-sft-prompts) do not fit "
                         f"in the {len(pool)} {where}")
    return pool[skip:skip + n_prompts]


def file_prompts(source: str) -> list[dict]:
    """The prompt records of a JSONL file (``task:`` paths too), in file order: each needs a string
    ``prompt``; its other fields are kept for the task's judge. A DataError names the line."""
    rows = []
    for rec in load_records(resolve_source(source, "prompts_eval")):
        prompt = rec.data.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError.at(rec.origin, "prompt", f"expected a non-empty string (the task's chat template wraps "
                                                     f"it), got {type_name(prompt)}")
        rows.append(dict(rec.data))
    return rows


def _summary(rows: list[dict], samples: list[list], expected: int, tokens: int) -> dict:
    """meta.json's counts, gold statistics and the annotator's ceiling accuracy on ``rows``."""
    gc, gr = [r["gold_chosen"] for r in rows], [r["gold_rejected"] for r in rows]
    return {"counts": {"preference": len(rows), "preference_dropped": expected - len(rows),
                       "samples": sum(len(g) for g in samples), "generated_tokens": tokens},
            "gold": {"chosen": _stats(gc), "rejected": _stats(gr)},
            "annotator_ceiling_accuracy": agreement(gc, gr)}


def _pick_two(group: list) -> list | None:
    """Two samples of a group: both when there are two; otherwise the first highest-gold and the
    first lowest-gold sample, or None when every sample has the same gold score."""
    if len(group) == 2:
        return group
    hi = max(group, key=lambda s: s.gold)
    lo = min(group, key=lambda s: s.gold)
    return None if hi.gold == lo.gold else [hi, lo]


def add_arguments(ap) -> None:
    """The make-data options of the --pairs-only mode."""
    ap.add_argument("--pairs-only", choices=["train", "eval"], default=None,
                    help="write only preference pairs, on the preference slice of the training prompts "
                         "(after --n-sft-prompts) or on the held-out prompts (see rlhfkit.tasks.pairs)")
    ap.add_argument("--pairs-per-prompt", type=int, default=1)
    ap.add_argument("--pair-from", type=int, default=2,
                    help="samples per pair; > 2 pairs the highest- and lowest-gold of them")
    ap.add_argument("--prompts", default=None, metavar="FILE",
                    help="with --pairs-only: sample on the prompts of this JSONL file (a string 'prompt' per line; "
                         "task: paths allowed, e.g. task:sentiment/prompts_ood.jsonl) instead of the task's own")
    ap.add_argument("--prompt-seed", type=int, default=None,
                    help="the prompt order (and slice) of this seed's full build (default: --seed)")


def check_args(args) -> None:
    """The --pairs-only settings: a ValueError naming the flag when they cannot be met."""
    select_prompts(get_task(args.task), args.pairs_only, args.n_pref_prompts, _skip(args), args.pairs_per_prompt,
                   args.pair_from, _prompt_seed(args), args.prompts)


def _skip(args) -> int:
    return args.n_sft_prompts if args.pairs_only == "train" else 0


def _prompt_seed(args) -> int:
    return args.seed if args.prompt_seed is None else args.prompt_seed


def run(args) -> int:
    """make-data --pairs-only, its settings checked (`check_args`): build, print one summary line."""
    skip, prompt_seed = _skip(args), _prompt_seed(args)
    meta = build_preference_pairs(
        args.task, args.model, args.out, split=args.pairs_only, n_prompts=args.n_pref_prompts,
        skip=skip, pairs_per_prompt=args.pairs_per_prompt, pair_from=args.pair_from, prompt_seed=prompt_seed,
        prompts=args.prompts, seed=args.seed, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, annotator_beta=args.annotator_beta, flip_prob=args.flip_prob, batch_size=args.batch_size,
        progress=not args.no_progress)
    c = meta["counts"]
    print(f"wrote {args.out}: {c['preference']} preference pairs ({c['preference_dropped']} dropped); "
          f"annotator ceiling accuracy {meta['annotator_ceiling_accuracy']:.3f}")
    warn_no_pairs(args.n_pref_prompts, c["preference"])
    return 0


def warn_no_pairs(asked: int, written: int) -> None:
    """One line on stderr when pairs were asked for and none was written."""
    if asked and not written:
        print("rlhfkit make-data: warning: no preference pair was written: the samples of every pair were the same "
              "or empty (raise --max-new-tokens or --temperature)", file=sys.stderr)
