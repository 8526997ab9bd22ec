"""Pairwise preference model (docs/concepts.md: Preference model and LLM-as-judge): the LM learns to answer "A" or "B".

    rlhfkit pm --config configs/pm.yaml data.train=task:sentiment

1. Preference pairs become SFT conversations: the user turn is
   "[CONTEXT] x [RESPONSE A] a1 [RESPONSE B] a2" (order randomised per pair, so that position
   carries no signal), the assistant answer is the letter of the chosen response.
2. `train_sft` trains on them unchanged (loss on the answer tokens only).
3. Held-out accuracy of P(a1 > a2) averaged over both orders (`judges.preference`), next to the
   single-order accuracy and the position bias, and the same numbers for the untrained model
   used as an LLM-as-judge, the baseline a trained preference model should beat.
The model lands in ``output_dir/model``; use it as ``pm:OUTPUT_DIR`` in online DPO and eval.
On N processes step 2 is distributed like any `rlhfkit sft` run (DDP, or FSDP2 with
``train.fsdp``); rank 0 writes the data of step 1 and runs the held-out evaluation of step 3.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from rlhfkit.config import (
    DataSection,
    ModelSection,
    OptimSection,
    SFTConfig,
    TrainSection,
    validate,
)
from rlhfkit.config.sections import SUPERVISED_EVAL_METRICS
from rlhfkit.data import DataError, SFTExample, load_preference, tokenize_sft
from rlhfkit.data.render import render_ids
from rlhfkit.data.sources import Input, data_inputs, train_and_eval
from rlhfkit.eval.preference_sets import judge_accuracy
from rlhfkit.io import write_json_atomic, write_jsonl_atomic
from rlhfkit.judges.preference import build_pairwise_judge, pm_record, pm_training_records
from rlhfkit.models import load_tokenizer
from rlhfkit.models.start import check_policy_start
from rlhfkit.parallel import Strategy, make_strategy
from rlhfkit.trainers.sft import train_sft
from rlhfkit.training import check_enough, open_run
from rlhfkit.training.runlock import release


@dataclass
class PMConfig:
    """`rlhfkit pm`: a pairwise preference model (the LM answers "A" or "B")."""

    model: ModelSection = field(default_factory=ModelSection)
    """The model to fine-tune as the judge (usually the SFT model)."""
    data: DataSection = field(default_factory=DataSection)
    """Preference pairs, as for `rlhfkit rm`."""
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-5))
    """Optimizer and schedule."""
    train: TrainSection = field(default_factory=TrainSection)
    """Run length, batch sizes, evaluation, checkpoints of the SFT on the A/B conversations."""
    eval_batch_size: int = 8
    """Judge prompts per forward at evaluation."""
    eval_untrained: bool = True
    """Also report the untrained model as LLM-as-judge on the same held-out pairs."""

    def eval_metrics(self) -> tuple[str, ...]:
        """What its held-out evaluation logs during training (the SFT on the A/B conversations)."""
        return SUPERVISED_EVAL_METRICS

    def inputs(self) -> list[Input]:
        """What it reads that may exist before it runs, as `SFTConfig.inputs`: the preference pairs."""
        return data_inputs(self.data, "preference", load_preference)


def _pm_pairs(cfg: PMConfig) -> tuple[list, list]:
    """The training and held-out preference pairs (validated)."""
    return train_and_eval(cfg.data, "preference", load_preference, cfg.train.seed)


def _check_lengths(cfg: PMConfig, pairs: list) -> None:
    """Each pair as the A/B question the model trains on, against data.max_length, before anything
    is written: an error names the pair's own file and line (not the generated pm_data file)."""
    if cfg.data.truncation != "error":
        return  # cut by `PairFitter`
    tokenizer = load_tokenizer(cfg.model.name, chat_template=cfg.data.chat_template)
    for ex, rec in zip(pairs, pm_training_records(pairs)):
        tokenize_sft(tokenizer, SFTExample(rec["messages"], origin=ex.origin, field="chosen"), cfg.data.max_length)


class PairFitter:
    """``data.truncation`` left or right for A/B questions, as for the pairs of rm and dpo: the
    context keeps its end (cut from the left, to no less than max_length // 2 tokens), then the
    longer response loses its last token until the whole question fits; each response keeps at
    least one token, and the answer letter and the question are never cut. A pair that cannot fit
    so is dropped. Counts what it cut."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length
        self.examples = self.truncated = self.dropped = self.tokens_removed = 0

    def _length(self, texts: tuple, label: str) -> int:
        return len(render_ids(self.tokenizer, pm_record(*texts, label)["messages"]))

    def __call__(self, context: str, first: str, second: str, label: str):
        self.examples += 1
        length = self._length((context, first, second), label)
        over = length - self.max_length
        if over <= 0:
            return context, first, second
        tc, ta, tb = (self.tokenizer.encode(t, add_special_tokens=False) for t in (context, first, second))
        for _ in range(8):  # a cut text re-tokenises to within a token or two of its cut
            cut = min(over, max(0, len(tc) - self.max_length // 2))
            tc, over = tc[cut:], over - cut
            na, nb = len(ta), len(tb)
            while over > 0 and max(na, nb) > 1:  # one token at a time from the longer response, never to 0
                na, nb = (na - 1, nb) if na >= nb else (na, nb - 1)
                over -= 1
            ta, tb = ta[:na], tb[:nb]
            tc = tc[over:] if over > 0 else tc  # the responses are down to a token: the context goes below half
            # a cut inside a character's bytes decodes to U+FFFD: dropped, not shown to the model
            texts = (self.tokenizer.decode(tc).lstrip("\ufffd"), self.tokenizer.decode(ta).rstrip("\ufffd"),
                     self.tokenizer.decode(tb).rstrip("\ufffd"))
            if not (texts[1].strip() and texts[2].strip()):
                break  # a response cut to nothing: no question to label
            fitted = self._length(texts, label)
            if fitted <= self.max_length:
                self.truncated += 1
                self.tokens_removed += length - fitted
                return texts
            if not tc:
                break
            over = fitted - self.max_length
        self.dropped += 1
        return None

    def summary(self) -> dict:
        return {"examples": self.examples, "truncated": self.truncated, "dropped": self.dropped,
                "tokens_removed": self.tokens_removed}


def _records(cfg: PMConfig, train_pairs: list, eval_pairs: list) -> tuple[dict, dict]:
    """The A/B conversations of both splits ({"train", "eval"}), cut to data.max_length when
    data.truncation allows, and what the cut removed ({} with truncation "error")."""
    fitter = None
    if cfg.data.truncation != "error":
        fitter = PairFitter(load_tokenizer(cfg.model.name, chat_template=cfg.data.chat_template), cfg.data.max_length)
    records = {"train": pm_training_records(train_pairs, cfg.train.seed, fit=fitter),
               "eval": pm_training_records(eval_pairs, cfg.train.seed + 1, fit=fitter)}
    if train_pairs and not records["train"]:
        raise DataError(f"{cfg.data.train}: all {len(train_pairs)} training pairs were dropped by truncation to "
                        f"max_length={cfg.data.max_length}: the A/B question alone does not fit; raise data.max_length")
    return records, fitter.summary() if fitter else {}


def train_pm(cfg: PMConfig, strategy: Strategy | None = None) -> dict:
    """Train the preference model; returns the held-out results (also in ``pm_results.json``)."""
    validate(cfg)  # a config changed in Python after load_config is checked as a loaded one is
    strategy = strategy or make_strategy(cfg.train, cfg.model)
    check_policy_start(cfg.model, cfg.data.max_length, "data.max_length")  # it trains as a policy (next token)
    train_pairs, eval_pairs = _pm_pairs(cfg)
    _check_lengths(cfg, train_pairs + eval_pairs)
    # 1. A/B conversations with randomised order (the same on every rank; rank 0 writes them).
    records, cut = _records(cfg, train_pairs, eval_pairs)
    check_enough(len(records["train"]), cfg.train, "data.train", "A/B questions")
    out = open_run(cfg, "pm", strategy).out
    paths = {name: out / "pm_data" / f"{name}.jsonl" for name in ("train", "eval")}
    if strategy.is_main:
        for name, path in paths.items():
            write_jsonl_atomic(path, records[name])
        if cut:
            print(f"[pm] truncation to max_length={cfg.data.max_length}: {cut['truncated']}/{cut['examples']} "
                  f"A/B questions cut ({cut['tokens_removed']} tokens removed), {cut['dropped']} dropped")
    strategy.wait()
    # split and cut above: no fraction to hold out, nothing left over max_length
    data = dataclasses.replace(cfg.data, train=str(paths["train"]), eval=str(paths["eval"]) if records["eval"] else "",
                               eval_fraction=type(cfg.data)().eval_fraction if records["eval"] else 0.0, limit=0,
                               truncation="error")
    # 2. Next-token training on the answer letter: plain SFT.
    trained = train_sft(SFTConfig(model=cfg.model, data=data, optim=cfg.optim, train=cfg.train), strategy)
    results = {"pairs": {"eval": len(eval_pairs)}, **({"truncation": cut} if cut else {}),
               **({"best": trained["best"]} if "best" in trained else {})}  # the step train.select_best kept
    if strategy.is_main:
        # 3. Held-out accuracy, both orders.
        if eval_pairs:  # on the questions as training cut them (data.truncation), not past max_length
            results["pm"] = _judge_eval(f"pm:{out}", eval_pairs, cfg)
            if cfg.eval_untrained:
                results["llm_judge"] = _judge_eval(f"judge:{cfg.model.name}", eval_pairs, cfg)
        write_json_atomic(out / "pm_results.json", results)
        release(out)
        for name in ("pm", "llm_judge"):
            r = results.get(name)
            cut = f", {r['dropped_too_long']} pair(s) left out: too long to fit" \
                if r and "dropped_too_long" in r else ""
            if r and r["accuracy"] is None:
                print(f"[pm] {name}: no held-out accuracy: every held-out pair is too long for max_length="
                      f"{cfg.data.max_length}")
            elif r:
                print(f"[pm] {name}: held-out accuracy {r['accuracy']:.3f} (both orders), "
                      f"{r['accuracy_single_order']:.3f} (one order), position bias {r['position_bias']:+.3f}{cut}")
    strategy.wait()
    return results


def _judge_eval(spec: str, pairs: list, cfg: PMConfig) -> dict:
    judge = build_pairwise_judge(spec, chat_template=cfg.data.chat_template, batch_size=cfg.eval_batch_size)
    fit = None
    if cfg.data.truncation != "error":
        fit = PairFitter(load_tokenizer(cfg.model.name, chat_template=cfg.data.chat_template), cfg.data.max_length)
    return judge_accuracy(judge, pairs, fit=fit)
