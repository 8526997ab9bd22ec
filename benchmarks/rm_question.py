"""A reward model that reads each reply through a question (docs/results_rm.md: A question around the reply).

    python benchmarks/rm_question.py features --data FILE [FILE ...] --out runs/rmq/NAME.pt [--model DIR]
    python benchmarks/rm_question.py probes --train A.pt --eval B.pt

`features` renders every reply of the preference files inside one user turn that asks about its
tone (QUESTION below), runs the causal LM once over it, and caches, for layers 8, 16, 24 and the
final one (an intermediate layer through the final norm; the layers the model has), the hidden state at the answer position
("last") and the mean over all the turn's tokens ("mean"), plus the zero-shot score: the logit of
"Positive" minus that of "Negative" as the first answer token ("zero_shot/last", one feature).
`probes` fits the linear Bradley-Terry probe of `rm_study.py` (L2 by 4-fold CV, one-SE rule) on
the training pairs and prints held-out accuracy and gold agreement with prompt-bootstrap intervals.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from rlhfkit.algos.probe import fit_bt_probe
from rlhfkit.data import render_ids
from rlhfkit.models import load_causal_lm, load_tokenizer, position_ids_from_mask
from rlhfkit.rollout import left_pad

from rm_data import fmt, pair_metrics, read_rows

QUESTION = "Here is a text:\n\n{reply}\n\nIs the tone of this text positive or negative? Answer with one word."
LAYERS = (8, 16, 24)
ANSWERS = ("Positive", "Negative")


def turn_ids(tok, reply: str) -> list[int]:
    return render_ids(tok, [{"role": "user", "content": QUESTION.format(reply=reply)}], add_generation_prompt=True)


def answer_ids(tok) -> list[int]:
    """The first token of each answer as the assistant turn renders it."""
    prefix = turn_ids(tok, "x")
    return [render_ids(tok, [{"role": "user", "content": QUESTION.format(reply="x")},
                             {"role": "assistant", "content": a}])[len(prefix)] for a in ANSWERS]


@torch.no_grad()
def extract(model_dir: str, paths: list[str], out: str, batch: int = 16) -> dict:
    """{"feats": {KEY: (N, 2, H)}, gold scores, prompts} for the N pairs of `paths`, chosen first."""
    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir).eval()
    pos, neg = answer_ids(tok)
    rows = [r for p in paths for r in read_rows(p)]
    replies = list(dict.fromkeys(s for r in rows for s in (r["chosen"], r["rejected"])))
    layers = ("final", *[layer for layer in LAYERS if layer < model.config.num_hidden_layers])
    keys = [f"{layer}/{p}" for layer in layers for p in ("last", "mean")]
    per_reply = {k: [] for k in [*keys, "zero_shot/last"]}
    t0 = time.perf_counter()
    for s in range(0, len(replies), batch):
        ids, mask = left_pad([turn_ids(tok, r) for r in replies[s:s + batch]], tok.pad_token_id, "cpu")
        o = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                  output_hidden_states=True, use_cache=False, logits_to_keep=1)
        per_reply["zero_shot/last"].append((o.logits[:, -1, pos] - o.logits[:, -1, neg])[:, None].float())
        m = mask[..., None].float()
        for layer in layers:
            h = o.hidden_states[-1] if layer == "final" else model.model.norm(o.hidden_states[layer])
            per_reply[f"{layer}/last"].append(h[:, -1].float())
            per_reply[f"{layer}/mean"].append(((h * m).sum(1) / m.sum(1)).float())
        if (s // batch) % 40 == 0:
            print(f"  {s + ids.shape[0]}/{len(replies)} replies, {time.perf_counter() - t0:.0f} s", flush=True)
    index = {r: i for i, r in enumerate(replies)}
    pick = torch.tensor([[index[r["chosen"]], index[r["rejected"]]] for r in rows])  # (N, 2)
    result = {"feats": {k: torch.cat(v)[pick] for k, v in per_reply.items()},
              "gold_c": torch.tensor([r["gold_chosen"] for r in rows]),
              "gold_r": torch.tensor([r["gold_rejected"] for r in rows]),
              "prompts": [r["prompt"] for r in rows], "model": model_dir, "seconds": time.perf_counter() - t0}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(result, out)
    return result


def probes(train: dict, evals: dict) -> list[dict]:
    """Per cached key: the probe fitted on the training pairs, scored on the held-out ones."""
    out = []
    for key, f in train["feats"].items():
        w, info = fit_bt_probe(f[:, 0] - f[:, 1], l2_grid=(1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0))
        e = evals["feats"][key]
        m = pair_metrics((e[:, 0] - e[:, 1]).double() @ w.double(), evals["gold_c"], evals["gold_r"], evals["prompts"])
        print(f"| {key} | {fmt(m)} | l2 {info['l2']} cv {info['cv_accuracy']:.3f} |", flush=True)
        out.append({"key": key, **m, "l2": info["l2"], "cv": info["cv_accuracy"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("features")
    f.add_argument("--model", default="smollm2-135m-instruct")
    f.add_argument("--data", required=True, nargs="+")
    f.add_argument("--out", required=True)
    f.add_argument("--threads", type=int, default=0)
    p = sub.add_parser("probes")
    p.add_argument("--train", required=True)
    p.add_argument("--eval", required=True)
    args = ap.parse_args()
    if args.cmd == "features":
        if args.threads:
            torch.set_num_threads(args.threads)
        r = extract(args.model, args.data, args.out)
        print(f"{len(r['prompts'])} pairs in {r['seconds']:.0f} s -> {args.out}")
    else:
        probes(torch.load(args.train), torch.load(args.eval))


if __name__ == "__main__":
    main()
