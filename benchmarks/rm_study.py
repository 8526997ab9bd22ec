"""Reward-model levers, measured on a fixed held-out preference set (docs/results_rm.md).

    python benchmarks/rm_study.py features --model runs/sft/model --data FILE --out runs/rmstudy/NAME.pt
    python benchmarks/rm_study.py probes --train runs/rmstudy/train.pt --eval runs/rmstudy/eval.pt [--set recipe]
    python benchmarks/rm_study.py score --rm runs/rm/model --data FILE
    python benchmarks/rm_study.py compare --rm BASELINE_RM OTHER_RM... --data FILE
    python benchmarks/rm_study.py gold-labels --data FILE... --out FILE

`features` runs the frozen backbone once over every pair and caches chosen-minus-rejected
features for several layers and poolings (last token, mean over the response, mean over all
tokens), so that every probe variant after it costs seconds. `probes` prints the probe table;
`--set recipe` picks each pooling's intermediate layer by cross-validation on the training pairs.
Any preference file with `gold_chosen` / `gold_rejected` works (sentiment, arithmetic pairs from
`rlhfkit make-data --task arithmetic --pairs-only ... --pair-from 4`).
`score` scores a trained reward model through `rm:DIR`, the path PPO and eval use, so the pooling
stored in its config.json is the one measured; `compare` scores several RMs on the same pairs and
gives each one's difference from the first with a paired interval. `gold-labels` writes the same pairs labelled by
the gold ordering (noise-free), to train on in place of the annotator's labels. Every accuracy comes with a 95% interval from a
bootstrap over prompts (pairs of one prompt are resampled together).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rlhfkit.algos.probe import fit_bt_probe, fit_linear_bt, pairwise_accuracy
from rlhfkit.data import PreferenceCollator, load_preference, tokenize_dataset
from rlhfkit.models import (
    POOLINGS, backbone_and_head, load_scalar_model, load_tokenizer, pooled_features, position_ids_from_mask,
)

from rm_data import fmt, load_feats, pair_metrics, paired_difference, read_rows, write_gold_labels

LAYERS = (8, 16, 24)  # intermediate layers cached next to the final (normed) one


# --------------------------------------------------------------------------- cached features

@torch.no_grad()
def extract_features(model_dir: str, data: str, out: str, limit: int = 0, micro_batch: int = 8,
                     max_length: int = 160) -> dict:
    """Pooled features of every pair's chosen and rejected rows: {"LAYER/POOLING": (N, 2, H)} for
    the final layer (normed: what the head reads) and LAYERS, plus response lengths (N, 2), gold
    scores and prompts."""
    tok = load_tokenizer(model_dir)
    rows = read_rows(data, limit)
    examples = load_preference(data)[:len(rows)]
    feats, _ = tokenize_dataset(tok, examples, "preference", max_length, "error")
    model = load_scalar_model(model_dir, pad_token_id=tok.pad_token_id).eval()
    backbone, _ = backbone_and_head(model)
    collate = PreferenceCollator(tok.pad_token_id)
    # longest first, in micro-batches of similar length (less padding); results go back in data order
    order = sorted(range(len(feats)), key=lambda i: -len(feats[i]["prompt_ids"]) - max(
        len(feats[i]["chosen_ids"]), len(feats[i]["rejected_ids"])))
    keys = [f"{layer}/{p}" for layer in ("final", *LAYERS) for p in POOLINGS]
    H = backbone.config.hidden_size
    out_feats = {k: torch.zeros(len(feats), 2, H) for k in keys}
    lengths = torch.tensor([[len(f["chosen_ids"]), len(f["rejected_ids"])] for f in feats])  # (N, 2)
    t0 = time.perf_counter()
    for s in range(0, len(order), micro_batch):
        idx = order[s:s + micro_batch]
        batch = collate([feats[i] for i in idx])
        ids, mask, resp = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        o = backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                     output_hidden_states=True, use_cache=False)
        for layer in ("final", *LAYERS):
            # an intermediate layer through the final norm: what a head on the first `layer` layers reads
            h = o.last_hidden_state if layer == "final" else backbone.norm(o.hidden_states[layer])  # (2B, T, H)
            for p in POOLINGS:
                f = pooled_features(h.float(), mask, p, resp)  # (2B, H): chosen rows, then rejected
                out_feats[f"{layer}/{p}"][idx] = torch.stack([f[:len(idx)], f[len(idx):]], 1)
        if (s // micro_batch) % 20 == 0:
            print(f"  {s + len(idx)}/{len(order)} pairs, {time.perf_counter() - t0:.0f} s", flush=True)
    result = {"feats": out_feats, "lengths": lengths, "gold_c": torch.tensor([r["gold_chosen"] for r in rows]),
              "gold_r": torch.tensor([r["gold_rejected"] for r in rows]), "prompts": [r["prompt"] for r in rows],
              "category": [r.get("category") for r in rows], "model": model_dir, "data": data,
              "seconds": time.perf_counter() - t0}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(result, out)
    return result


# --------------------------------------------------------------------------- probes

def probe_margins(train: dict, evals: dict, key: str, n: int = 0, l2: float | None = None,
                  rule: str = "one_se", label_smoothing: float = 0.0, standardize: bool = False,
                  bags: int = 0, seed: int = 0, labels: str = "annotator") -> tuple[torch.Tensor, dict]:
    """Fit a linear BT probe on the first n training pairs' features `key`; (N_eval,) margins.

    l2 None: chosen by 4-fold CV (`rule` "one_se": strongest within one SE of the best, "best").
    standardize: divide each feature by its training std first. bags > 0: average that many probes
    fitted on bootstrap resamples of the training pairs (an ensemble of heads).
    labels "gold": train on the gold ordering instead of the annotator's labels (each pair turned
    so that the higher gold score is chosen, gold ties dropped): how far noise-free labels on the
    same pairs and features would take the probe.
    """
    d = train["feats"][key][:n] if n else train["feats"][key]
    if labels == "gold":
        gold = (train["gold_c"] - train["gold_r"])[:len(d)]
        d = d[gold != 0] * gold[gold != 0].sign()[:, None].to(d.dtype)
    elif labels != "annotator":
        raise ValueError(f"labels must be 'annotator' or 'gold', got {labels!r}")
    e = evals["feats"][key]
    if standardize:
        # pairs are antisymmetric (swapping chosen and rejected negates d), so the std is about 0
        sd = d.double().pow(2).mean(0).sqrt().clamp_min(1e-8)
        d, e = d / sd, e / sd
    info = {}
    if l2 is None:
        grid = (1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0)
        w, info = fit_bt_probe(d, l2_grid=grid, seed=seed, label_smoothing=label_smoothing, rule=rule)
        l2 = info["l2"]
    else:
        scale = d.double().pow(2).mean().sqrt()
        w = fit_linear_bt(d / scale, l2, label_smoothing=label_smoothing) / scale
        info = {"l2": l2, "train_accuracy": pairwise_accuracy(d, w)}
    if bags:
        scale = d.double().pow(2).mean().sqrt()
        g = torch.Generator().manual_seed(seed)
        ws = [fit_linear_bt(d[torch.randint(len(d), (len(d),), generator=g)] / scale, l2,
                            label_smoothing=label_smoothing) / scale for _ in range(bags)]
        w = torch.stack(ws).mean(0)
    return e.double() @ w, info


def probe_table(train: dict, evals: dict, rows: list[tuple[str, dict]]) -> list[dict]:
    """One line per probe variant: name, its settings, eval metrics, CV info and fit seconds."""
    out = []
    for name, kw in rows:
        t0 = time.perf_counter()
        margins, info = probe_margins(train, evals, **kw)
        m = pair_metrics(margins, evals["gold_c"], evals["gold_r"], evals["prompts"])
        m.update(name=name, settings=kw, l2=info.get("l2"), cv=info.get("cv_accuracy"),
                 train_acc=info.get("train_accuracy"), seconds=time.perf_counter() - t0)
        print(f"| {name} | {fmt(m)} | l2 {m['l2']} cv {m['cv'] if m['cv'] is None else round(m['cv'], 3)} "
              f"train {m['train_acc']:.3f} |", flush=True)
        out.append(m)
    return out


def recipe_table(train: dict, evals: dict, poolings: tuple[str, ...] = ("last", "mean", "sum")) -> list[dict]:
    """The recipe against the plain head, with no look at the held-out pairs when choosing: for
    each pooling, the final layer's probe and the probe on the intermediate layer whose
    cross-validated accuracy on the training pairs is highest (L2 by the one-SE rule throughout).
    Rows: name, pooling, layer, chosen_from ({layer: CV accuracy}), metrics, l2, cv, train_acc; a
    last row scores the shorter response (in tokens) as better, the length shortcut's accuracy."""
    layers = sorted({int(k.split("/")[0]) for k in train["feats"] if k.split("/")[0] != "final"})
    out = []
    for pool in poolings:
        fits = {}
        for layer in ("final", *layers):
            margins, info = probe_margins(train, evals, key=f"{layer}/{pool}")
            fits[layer] = (margins, info)
        pick = max(layers, key=lambda layer: fits[layer][1]["cv_accuracy"]) if layers else None
        for layer, name in (("final", f"final/{pool}"), (pick, f"{pick}/{pool} (layer by CV)")):
            if layer is None:
                continue
            margins, info = fits[layer]
            m = pair_metrics(margins, evals["gold_c"], evals["gold_r"], evals["prompts"])
            cv_by_layer = {str(k): round(fits[k][1]["cv_accuracy"], 4) for k in layers}
            m.update(name=name, pooling=pool, layer=layer, l2=info["l2"], cv=info["cv_accuracy"],
                     train_acc=info["train_accuracy"], chosen_from=None if layer == "final" else cv_by_layer)
            print(f"| {name} | {fmt(m)} | l2 {m['l2']} cv {m['cv']:.3f} train {m['train_acc']:.3f} |"
                  + (f" CV by layer {m['chosen_from']}" if m["chosen_from"] else ""), flush=True)
            out.append(m)
    # a reference with no model: prefer the shorter response (ties half)
    lengths = evals["lengths"]
    m = pair_metrics(lengths[:, 1] - lengths[:, 0], evals["gold_c"], evals["gold_r"], evals["prompts"])
    m.update(name="shorter response (no model)", pooling=None, layer=None, l2=None, cv=None, train_acc=None,
             chosen_from=None)
    print(f"| {m['name']} | {fmt(m)} |", flush=True)
    out.append(m)
    return out


# --------------------------------------------------------------------------- trained reward models

def rm_scores(rm: str, data: str, limit: int = 0, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) scores of each pair of `data` from a trained RM through `rm:DIR` (its
    stored pooling), the path PPO and `rlhfkit eval` use."""
    from rlhfkit.judges import build_reward_fn, prompt_text

    examples = load_preference(data)[:len(read_rows(data, limit))]
    fn = build_reward_fn(f"rm:{rm}", batch_size=batch_size)
    msgs = [ex.prompt for ex in examples]
    texts = [prompt_text(m) for m in msgs]
    return (torch.tensor(fn(texts, [ex.chosen for ex in examples], messages=msgs)),
            torch.tensor(fn(texts, [ex.rejected for ex in examples], messages=msgs)))


def gold_metrics(margins: torch.Tensor, data: str, limit: int = 0) -> dict:
    rows = read_rows(data, limit)
    gc = torch.tensor([r["gold_chosen"] for r in rows])
    gr = torch.tensor([r["gold_rejected"] for r in rows])
    return pair_metrics(margins, gc, gr, [r["prompt"] for r in rows])


def score_rm(rm: str, data: str, limit: int = 0, batch_size: int = 16) -> dict:
    """Score held-out pairs with a trained RM through `rm:DIR`, metrics."""
    rc, rr = rm_scores(rm, data, limit, batch_size)
    return gold_metrics(rc - rr, data, limit)


def score_ensemble(rms: list[str], data: str, limit: int = 0) -> dict:
    """Each RM alone, and their ensemble: the mean of their standardised scores. Each RM's scores
    are divided by their standard deviation over all scored responses (chosen and rejected; the
    labels are not used), so an RM with a wider scale does not outvote the others."""
    out, total = {}, 0.0
    for rm in rms:
        rc, rr = rm_scores(rm, data, limit)
        scale = torch.cat([rc, rr]).double().std().clamp_min(1e-12)
        out[rm] = gold_metrics(rc - rr, data, limit)
        total = total + (rc - rr).double() / scale / len(rms)
    out["ensemble"] = gold_metrics(total, data, limit)
    return out


def compare_rms(rms: list[str], data: str, limit: int = 0) -> list[dict]:
    """Each RM's metrics on the pairs of `data`, and for every RM after the first its paired
    difference from the first (`paired_difference`): the first is the baseline."""
    rows = read_rows(data, limit)
    gc = torch.tensor([r["gold_chosen"] for r in rows])
    gr = torch.tensor([r["gold_rejected"] for r in rows])
    prompts = [r["prompt"] for r in rows]
    margins = {}
    for rm in rms:
        rc, rr = rm_scores(rm, data, limit)
        margins[rm] = rc - rr
    out = []
    for rm in rms:
        row = {"rm": rm, "metrics": pair_metrics(margins[rm], gc, gr, prompts)}
        if rm != rms[0]:
            row["vs_first"] = paired_difference(margins[rms[0]], margins[rm], gc, gr, prompts)
        out.append(row)
        d = row.get("vs_first")
        diff = (f"{d['diff']:+.3f} [{d['diff_ci'][0]:+.3f}, {d['diff_ci'][1]:+.3f}] | "
                f"{d['gold_diff']:+.3f} [{d['gold_diff_ci'][0]:+.3f}, {d['gold_diff_ci'][1]:+.3f}] | "
                f"{d['only_other']} / {d['only_base']}") if d else "baseline | | "
        print(f"| {rm} | {fmt(row['metrics'])} | {diff} |", flush=True)
    return out


def finetune(name: str, config: str, overrides: list[str], eval_data: str, out_root: str = "runs/rmstudy/ft") -> dict:
    """`rlhfkit rm --config CONFIG OVERRIDES` into OUT_ROOT/NAME, then `score_rm` on eval_data;
    writes and returns {name, command, seconds (training), metrics, trainer's probe and eval lines}."""
    import subprocess
    import sys

    out = Path(out_root) / name
    cmd = [str(Path(sys.executable).parent / "rlhfkit"), "rm", "--config", config, *overrides,
           f"train.output_dir={out}", "train.progress=false"]
    t0 = time.perf_counter()
    if not (out / "model" / "config.json").is_file():
        subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - t0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    res = {"name": name, "command": " ".join(["rlhfkit", *cmd[1:]]), "train_seconds": round(seconds),
           "probe": next((x for x in lines if "probe/cv_accuracy" in x), None),
           "evals": [{k: v for k, v in x.items() if k in ("step", "eval/accuracy", "eval/margin")}
                     for x in lines if "eval/accuracy" in x],
           "last_train_loss": [x["train/loss"] for x in lines if "train/loss" in x][-1:],
           "metrics": score_rm(str(out / "model"), eval_data)}
    (out / "study.json").write_text(json.dumps(res, indent=1) + "\n")
    print(f"| {name} | {fmt(res['metrics'])} | {res['train_seconds']} s |", flush=True)
    return res


# --------------------------------------------------------------------------- CLI

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("features")
    f.add_argument("--model", required=True)
    f.add_argument("--data", required=True)
    f.add_argument("--out", required=True)
    f.add_argument("--limit", type=int, default=0)
    f.add_argument("--threads", type=int, default=0, help="torch threads (1 is faster on a busy machine)")
    p = sub.add_parser("probes")
    p.add_argument("--train", nargs="+", required=True, help="cached feature files, concatenated in order")
    p.add_argument("--eval", required=True)
    p.add_argument("--set", default="pooling", choices=sorted([*PROBE_SETS, "recipe"]),
                   help="which table of probe variants; recipe: per pooling (last, mean, sum) the final layer "
                        "and the intermediate layer with the best CV accuracy on the training pairs")
    p.add_argument("--key", default="final/mean", help="LAYER/POOLING for the regularisation, size and labels sets")
    p.add_argument("--json", default="", help="also write the rows here")
    t = sub.add_parser("finetune", help="rlhfkit rm with overrides, then score the saved RM")
    t.add_argument("--name", required=True)
    t.add_argument("--config", default="configs/rm.yaml")
    t.add_argument("--eval", required=True, help="held-out preference file scored after training")
    t.add_argument("overrides", nargs="*")
    s = sub.add_parser("score")
    s.add_argument("--rm", required=True, nargs="+", help="one RM, or several: each alone and their ensemble")
    s.add_argument("--data", required=True)
    s.add_argument("--limit", type=int, default=0)
    c = sub.add_parser("compare", help="RMs on one held-out set, each against the first (paired intervals)")
    c.add_argument("--rm", required=True, nargs="+", help="the baseline RM first, then the RMs compared with it")
    c.add_argument("--data", required=True)
    c.add_argument("--limit", type=int, default=0)
    c.add_argument("--json", default="", help="also write the rows here")
    gl = sub.add_parser("gold-labels", help="write preference files relabelled by the gold ordering")
    gl.add_argument("--data", required=True, nargs="+")
    gl.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.cmd == "gold-labels":
        print(json.dumps(write_gold_labels(args.data, args.out)))
    elif args.cmd == "features":
        if args.threads:
            torch.set_num_threads(args.threads)
        r = extract_features(args.model, args.data, args.out, args.limit)
        print(f"{len(r['prompts'])} pairs in {r['seconds']:.0f} s -> {args.out}")
    elif args.cmd == "probes":
        train, evals = load_feats(args.train), load_feats([args.eval])
        if args.set == "recipe":
            res = recipe_table(train, evals)
        else:
            res = probe_table(train, evals, PROBE_SETS[args.set](len(train["prompts"]), args.key))
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    elif args.cmd == "compare":
        res = compare_rms(args.rm, args.data, args.limit)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    elif args.cmd == "finetune":
        finetune(args.name, args.config, args.overrides, args.eval)
    else:
        m = score_rm(args.rm[0], args.data, args.limit) if len(args.rm) == 1 else \
            score_ensemble(args.rm, args.data, args.limit)
        print(json.dumps(m))


def _pooling_set(n_train: int, key: str) -> list[tuple[str, dict]]:
    """Every cached layer x pooling, L2 by the one-SE rule (the shipped probe)."""
    return [(f"{layer}/{pool}", {"key": f"{layer}/{pool}"})
            for layer in ("final", *LAYERS) for pool in (*POOLINGS, "sum")]


def _regularisation_set(n_train: int, key: str) -> list[tuple[str, dict]]:
    """The L2 rule, fixed L2 values, per-feature scaling, label smoothing and bagging on one key."""
    rows = [(f"{key} one-SE", {"key": key}), (f"{key} best CV", {"key": key, "rule": "best"})]
    rows += [(f"{key} l2={l2:g}", {"key": key, "l2": l2}) for l2 in (1e-3, 1e-2, 1e-1, 1.0, 10.0)]
    rows += [(f"{key} standardised, one-SE", {"key": key, "standardize": True}),
             (f"{key} standardised, best CV", {"key": key, "standardize": True, "rule": "best"})]
    rows += [(f"{key} label smoothing {e:g}, best CV", {"key": key, "rule": "best", "label_smoothing": e})
             for e in (0.05, 0.1, 0.2)]
    rows += [(f"{key} 10 bagged probes, best CV", {"key": key, "rule": "best", "bags": 10})]
    return rows


def _size_set(n_train: int, key: str) -> list[tuple[str, dict]]:
    """Training pairs: the first n of the (concatenated) training files."""
    sizes = [n for n in (160, 320, 480, 640, 1152, 2304, 3456, 4608) if n < n_train] + [n_train]
    return [(f"{key} n={n}, {rule}", {"key": key, "n": n, "rule": rule}) for n in sizes for rule in ("one_se", "best")]


def _labels_set(n_train: int, key: str) -> list[tuple[str, dict]]:
    """The annotator's labels against the gold ordering on the same pairs, per layer (mean pooling)
    and for layer 24's sum; then the gold-label probe on the first n pairs of `key`."""
    keys = [f"{layer}/mean" for layer in ("final", *LAYERS)] + [f"{LAYERS[-1]}/sum"]
    rows = [(f"{k}, {lab} labels", {"key": k, "labels": lab}) for k in keys for lab in ("annotator", "gold")]
    sizes = [n for n in (320, 640, 1152) if n < n_train] + [n_train]
    return rows + [(f"{key}, gold labels, n={n}", {"key": key, "labels": "gold", "n": n}) for n in sizes]


PROBE_SETS = {"pooling": _pooling_set, "regularisation": _regularisation_set, "size": _size_set,
              "labels": _labels_set}


if __name__ == "__main__":
    main()
