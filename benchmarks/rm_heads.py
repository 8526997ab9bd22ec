"""Reward-model heads beyond the linear probe, on features cached by ``rm_study.py features``.

    python benchmarks/rm_heads.py --train runs/rmx/f_train1.pt runs/rmx/f_train2.pt \
        --eval runs/rmx/f_eval.pt --json runs/rmx/heads.json

Rows, each scored on the held-out pairs with rm_study's intervals (bootstrap over prompts):
- the linear probe on each layer's mean-pooled response (L2 by CV, the one-SE rule), the baseline;
- one linear probe on several layers' mean-pooled features side by side (each feature
  standardised on the training pairs first);
- a one-hidden-layer MLP head, r(x) = w2 . gelu(W1 x + b1), trained with the Bradley-Terry loss on
  r(chosen) - r(rejected); its width, weight decay, epochs and dropout picked by 4-fold CV on the
  training pairs (the held-out pairs are not looked at), then refitted on all of them, and the
  mean of five such fits from different seeds (each fit's margins over their own spread).
See docs/results_rm.md.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
from rm_data import fmt, load_pairs, pair_metrics

from rlhfkit.algos.probe import fit_bt_probe

MEAN_LAYERS = ("8", "16", "24", "final")
CONCATS = (("8", "16"), MEAN_LAYERS)
L2_GRID = (1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0, 30.0)
MLP_GRID = {"hidden": (32, 128), "wd": (0.1, 1.0), "epochs": (3, 10), "dropout": (0.0, 0.3)}


def standardise(train: torch.Tensor, held: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each feature to zero mean and unit spread over the training responses. train, held: (N, 2, D)."""
    flat = train.reshape(-1, train.shape[-1])
    mu, sd = flat.mean(0), flat.std(0).clamp_min(1e-6)
    return (train - mu) / sd, (held - mu) / sd


def fit_mlp(x: torch.Tensor, hidden: int, wd: float, epochs: int, dropout: float = 0.0, seed: int = 0,
            lr: float = 1e-3, batch: int = 64) -> torch.nn.Module:
    """A one-hidden-layer scalar head fitted with the BT loss on x: (N, 2, D), chosen first."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Dropout(dropout), torch.nn.Linear(x.shape[-1], hidden), torch.nn.GELU(),
                              torch.nn.Linear(hidden, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=wd)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), batch):
            b = x[perm[s:s + batch]]
            loss = torch.nn.functional.softplus(-(mlp_margins(net, b, train=True))).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def mlp_margins(net: torch.nn.Module, x: torch.Tensor, train: bool = False) -> torch.Tensor:
    """r(chosen) - r(rejected) for x: (N, 2, D) -> (N,)."""
    with torch.set_grad_enabled(train):
        return (net(x[:, 0]) - net(x[:, 1])).squeeze(-1)


def cv_accuracy(x: torch.Tensor, cfg: dict, folds: int = 4) -> float:
    """Fraction of training pairs an MLP fitted on the other folds ranks chosen-first."""
    parts = torch.randperm(len(x), generator=torch.Generator().manual_seed(0)).chunk(folds)
    hits = 0.0
    for k in range(folds):
        fit = torch.cat([parts[j] for j in range(folds) if j != k])
        hits += float((mlp_margins(fit_mlp(x[fit], **cfg), x[parts[k]]) > 0).sum())
    return hits / len(x)


def head_table(train: dict, held: dict, mlp_key: str = "8/mean", grid: dict = MLP_GRID, seeds: int = 5,
               concats=CONCATS) -> list[dict]:
    """Every row of the module docstring, scored on `held`."""
    rows = []

    def add(name: str, margins: torch.Tensor, **extra):
        rows.append({"name": name, **pair_metrics(margins.double(), held["gold_c"], held["gold_r"], held["prompts"]),
                     **extra})
        print(f"{name:44s} {fmt(rows[-1])}  {extra}", flush=True)

    for layer in [m for m in MEAN_LAYERS if f"{m}/mean" in train["feats"]]:
        t, h = train["feats"][f"{layer}/mean"], held["feats"][f"{layer}/mean"]
        w, info = fit_bt_probe(t[:, 0] - t[:, 1], l2_grid=L2_GRID)
        add(f"linear, layer {layer}", (h[:, 0] - h[:, 1]).double() @ w, l2=info["l2"], cv=info["cv_accuracy"])
    for layers in concats:
        t, h = standardise(torch.cat([train["feats"][f"{m}/mean"] for m in layers], -1),
                           torch.cat([held["feats"][f"{m}/mean"] for m in layers], -1))
        w, info = fit_bt_probe(t[:, 0] - t[:, 1], l2_grid=L2_GRID)
        add(f"linear, layers {' + '.join(layers)}", (h[:, 0] - h[:, 1]).double() @ w, l2=info["l2"],
            cv=info["cv_accuracy"])
    t, h = standardise(train["feats"][mlp_key], held["feats"][mlp_key])
    cfgs = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    cvs = [cv_accuracy(t, cfg) for cfg in cfgs]
    best = cfgs[max(range(len(cfgs)), key=cvs.__getitem__)]
    fits = [mlp_margins(fit_mlp(t, **best, seed=s), h) for s in range(seeds)]
    add(f"MLP, {mlp_key}", fits[0], cv=max(cvs), config=best)
    add(f"MLP, {mlp_key}, {seeds} seeds averaged", torch.stack([m / m.std().clamp_min(1e-12) for m in fits]).mean(0),
        cv=max(cvs), config=best)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", nargs="+", required=True, help="cached training features, concatenated in order")
    p.add_argument("--eval", required=True, help="cached held-out features")
    p.add_argument("--key", default="8/mean", help="the MLP head's features (LAYER/POOLING)")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    rows = head_table(load_pairs(args.train), load_pairs([args.eval]), args.key)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
