"""Pairwise preference model (SPEC section 3): the LM learns to answer "A" or "B".

    rlhfkit pm --config configs/pm.yaml data.train=task:sentiment

1. Preference pairs become SFT conversations: the user turn is
   "[CONTEXT] x [RESPONSE A] a1 [RESPONSE B] a2" (order randomised per pair, so that position
   carries no signal), the assistant answer is the letter of the chosen response.
2. `train_sft` trains on them unchanged (loss on the answer tokens only).
3. Held-out accuracy of P(a1 > a2) averaged over both orders (`judges.preference`), next to the
   single-order accuracy and the position bias, and the same numbers for the untrained model
   used as an LLM-as-judge, the baseline SPEC 3 says it should beat.
The model lands in ``output_dir/model``; use it as ``pm:OUTPUT_DIR`` in online DPO and eval.
On N processes step 2 is distributed like any `rlhfkit sft` run (DDP, or FSDP2 with
``train.fsdp``); rank 0 writes the data of step 1 and runs the held-out evaluation of step 3.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from rlhfkit.config import DataSection, ModelSection, OptimSection, SFTConfig, TrainSection
from rlhfkit.trainers.common import Runtime, prepare_run_dir, write_json_atomic
from rlhfkit.trainers.sources import resolve_source, split_eval


@dataclass
class PMConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)  # preference pairs, as for `rlhfkit rm`
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-5))
    train: TrainSection = field(default_factory=TrainSection)
    eval_batch_size: int = 8  # judge prompts per forward at evaluation
    eval_untrained: bool = True  # also report the untrained model as LLM-as-judge on the same pairs


def _pm_data(cfg: PMConfig, out: Path, write: bool = True) -> tuple[Path, Path, list]:
    """Write (when ``write``) the A/B conversations for train and eval; returns (train path, eval
    path, eval pairs)."""
    from rlhfkit.data import load_preference
    from rlhfkit.judges.preference import pm_training_records

    train = load_preference(resolve_source(cfg.data.train, "preference"))
    if cfg.data.limit:
        train = train[:cfg.data.limit]
    if cfg.data.eval:
        evals = load_preference(resolve_source(cfg.data.eval, "preference"))
    else:
        train, evals = split_eval(train, cfg.data.eval_fraction, cfg.train.seed)
    paths = []
    for name, exs, seed in (("train", train, cfg.train.seed), ("eval", evals, cfg.train.seed + 1)):
        p = out / "pm_data" / f"{name}.jsonl"
        if write:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("".join(json.dumps(r) + "\n" for r in pm_training_records(exs, seed)))
        paths.append(p)
    return paths[0], paths[1], evals


def train_pm(cfg: PMConfig) -> dict:
    """Train the preference model; returns the held-out results (also in ``pm_results.json``)."""
    from rlhfkit.trainers.sft import train_sft

    rt = Runtime(cfg.train.seed)
    out = prepare_run_dir(cfg, "pm", rt.is_main)
    # 1. A/B conversations with randomised order (the same on every rank; rank 0 writes them).
    train_path, eval_path, eval_pairs = _pm_data(cfg, out, write=rt.is_main)
    rt.wait()
    data = dataclasses.replace(cfg.data, train=str(train_path), eval=str(eval_path) if eval_pairs else "",
                               limit=0)
    # 2. Next-token training on the answer letter: plain SFT.
    train_sft(SFTConfig(model=cfg.model, data=data, optim=cfg.optim, train=cfg.train))
    results = {"pairs": {"eval": len(eval_pairs)}}
    if not rt.is_main:
        rt.wait()
        return results
    # 3. Held-out accuracy, both orders.
    if eval_pairs:
        results["pm"] = _judge_eval(f"pm:{out}", eval_pairs, cfg)
        if cfg.eval_untrained:
            results["llm_judge"] = _judge_eval(f"judge:{cfg.model.name}", eval_pairs, cfg)
    write_json_atomic(out / "pm_results.json", results)
    for name in ("pm", "llm_judge"):
        if name in results:
            r = results[name]
            print(f"[pm] {name}: held-out accuracy {r['accuracy']:.3f} (both orders), "
                  f"{r['accuracy_single_order']:.3f} (one order), position bias {r['position_bias']:+.3f}")
    rt.wait()
    return results


def _judge_eval(spec: str, pairs: list, cfg: PMConfig) -> dict:
    from rlhfkit.eval.preference_sets import judge_accuracy
    from rlhfkit.judges.preference import build_pairwise_judge
    from rlhfkit.models import load_tokenizer

    judge = build_pairwise_judge(spec, tokenizer=load_tokenizer(cfg.model.name), batch_size=cfg.eval_batch_size)
    return judge_accuracy(judge, pairs)
