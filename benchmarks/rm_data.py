"""The preference pairs and metrics the reward-model studies share (rm_study.py, rm_heads.py).

`pair_metrics` gives accuracy on the annotator's labels and agreement with the gold ordering, each
with a 95% interval from a bootstrap over prompts; `paired_difference` the difference of two RMs
on the same pairs, with the interval of one bootstrap over both; `load_pairs` / `load_feats` read the feature
caches `rm_study.py features` writes; `write_gold_labels` turns a preference file to the gold order.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# --------------------------------------------------------------------------- data and metrics

def read_rows(path: str, limit: int = 0) -> list[dict]:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    return rows[:limit] if limit else rows


def _hits(margins: torch.Tensor, gold_c: torch.Tensor, gold_r: torch.Tensor):
    """(label hits, gold hits, untied): per pair 1 right, 0 wrong, 1/2 for a margin of 0, on the
    annotator's labels (chosen first) and on the gold ordering; untied marks pairs whose gold
    scores differ (the gold columns leave the others out)."""
    label_hit = (margins > 0).double() + 0.5 * (margins == 0).double()  # (N,)
    gdiff = gold_c.double() - gold_r.double()
    gold_hit = ((margins.double() * gdiff) > 0).double() + 0.5 * (margins == 0).double()
    return label_hit, gold_hit, gdiff != 0


def _boot_weights(prompts: list[str], n_boot: int, seed: int) -> torch.Tensor:
    """(n_boot, N) how many times each pair is drawn when the prompts are resampled: the pairs of
    one prompt go together."""
    ids = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
    cluster = torch.tensor([ids[p] for p in prompts])
    g = torch.Generator().manual_seed(seed)
    draws = torch.randint(len(ids), (n_boot, len(ids)), generator=g)  # (n_boot, C) cluster draws
    return torch.zeros(n_boot, len(ids), dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(n_boot, len(ids), dtype=torch.float64))[:, cluster]


def _mean_ci(weight: torch.Tensor, value: torch.Tensor, keep: torch.Tensor) -> tuple[float, float, float]:
    """The mean of `value` over the kept pairs, and its 95% interval over the bootstrap draws."""
    w = weight * keep.double()
    boot = (w * value).sum(1) / w.sum(1).clamp_min(1)
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return float(value[keep].mean()), lo, hi


def pair_metrics(margins: torch.Tensor, gold_c: torch.Tensor, gold_r: torch.Tensor, prompts: list[str],
                 n_boot: int = 2000, seed: int = 0) -> dict:
    """Accuracy on the annotator's labels (chosen first; ties half) and agreement with the gold
    ordering (pairs whose gold scores tie are left out), each with a 95% prompt-bootstrap interval.

    margins: (N,) r(chosen) - r(rejected); gold_c, gold_r: (N,) gold scores.
    """
    label_hit, gold_hit, untied = _hits(margins, gold_c, gold_r)
    weight = _boot_weights(prompts, n_boot, seed)
    acc, lo, hi = _mean_ci(weight, label_hit, torch.ones_like(untied))
    gacc, glo, ghi = _mean_ci(weight, gold_hit, untied)
    return {"acc": acc, "acc_ci": [lo, hi], "gold_acc": gacc, "gold_ci": [glo, ghi], "pairs": len(prompts),
            "gold_pairs": int(untied.sum())}


def paired_difference(base: torch.Tensor, other: torch.Tensor, gold_c: torch.Tensor, gold_r: torch.Tensor,
                      prompts: list[str], n_boot: int = 2000, seed: int = 0) -> dict:
    """How much more often `other` ranks the same pairs right than `base` does (margins of two
    RMs on one held-out set), on the annotator's labels and on the gold ordering, each with a 95%
    interval from one prompt bootstrap applied to both RMs at once. Two RMs scored on the same
    pairs share most of their sampling noise, so the interval of the difference is much narrower
    than either accuracy's: it is what says whether one RM ranks better than the other."""
    base_label, base_gold, untied = _hits(base, gold_c, gold_r)
    other_label, other_gold, _ = _hits(other, gold_c, gold_r)
    weight = _boot_weights(prompts, n_boot, seed)
    d, lo, hi = _mean_ci(weight, other_label - base_label, torch.ones_like(untied))
    gd, glo, ghi = _mean_ci(weight, other_gold - base_gold, untied)
    return {"diff": d, "diff_ci": [lo, hi], "gold_diff": gd, "gold_diff_ci": [glo, ghi],
            "both_right": int(((base_label == 1) & (other_label == 1)).sum()),
            "only_base": int(((base_label == 1) & (other_label == 0)).sum()),
            "only_other": int(((base_label == 0) & (other_label == 1)).sum())}


def fmt(m: dict) -> str:
    return (f"{m['acc']:.3f} [{m['acc_ci'][0]:.3f}, {m['acc_ci'][1]:.3f}] | "
            f"{m['gold_acc']:.3f} [{m['gold_ci'][0]:.3f}, {m['gold_ci'][1]:.3f}]")


# --------------------------------------------------------------------------- cached features and gold labels

def load_pairs(paths: list[str]) -> dict:
    """Cached feature files concatenated in order: per-response features {KEY: (N, 2, H)}, chosen
    first, response lengths (N, 2), gold scores and prompts."""
    parts = [torch.load(p) for p in paths]
    return {"feats": {k: torch.cat([p["feats"][k] for p in parts]) for k in parts[0]["feats"]},
            "lengths": torch.cat([p["lengths"] for p in parts]).float(),
            "gold_c": torch.cat([p["gold_c"] for p in parts]), "gold_r": torch.cat([p["gold_r"] for p in parts]),
            "prompts": [x for p in parts for x in p["prompts"]]}


def load_feats(paths: list[str]) -> dict:
    """`load_pairs` with derived keys "LAYER/sum" (the response mean times its length) and
    "LAYER/sqrt" (times the square root of its length); features are chosen-minus-rejected
    differences, (N, H)."""
    pairs = load_pairs(paths)
    seq, lengths = pairs["feats"], pairs["lengths"][..., None]  # (N, 2, H), (N, 2, 1)
    for layer in {k.split("/")[0] for k in list(seq)}:
        seq[f"{layer}/sum"] = seq[f"{layer}/mean"] * lengths
        seq[f"{layer}/sqrt"] = seq[f"{layer}/mean"] * lengths.sqrt()
    return {**pairs, "feats": {k: v[:, 0] - v[:, 1] for k, v in seq.items()}}


def write_gold_labels(paths: list[str], out: str) -> dict:
    """The pairs of `paths` relabelled by the gold ordering (the higher gold score chosen), gold
    ties dropped, written to `out`: a noise-free preference file to train an RM on, against the
    annotator's labels of the same pairs. Returns {pairs, turned, ties}."""
    rows = [r for p in paths for r in read_rows(p)]
    kept, turned = [], 0
    for r in rows:
        if r["gold_chosen"] == r["gold_rejected"]:
            continue
        if r["gold_chosen"] < r["gold_rejected"]:
            r = {**r, "chosen": r["rejected"], "rejected": r["chosen"],
                 "gold_chosen": r["gold_rejected"], "gold_rejected": r["gold_chosen"]}
            turned += 1
        kept.append(r)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("".join(json.dumps(r) + "\n" for r in kept))
    return {"pairs": len(kept), "turned": turned, "ties": len(rows) - len(kept)}
