"""Linear Bradley-Terry probe: the reward head fitted alone on frozen features.

Linear probing before fine-tuning ("LP-FT", Kumar et al. 2022) starts the fine-tuning from a head
that already ranks pairs, instead of a random one whose large early gradients distort the
pretrained features. For a linear head r(x) = w . h(x) the Bradley-Terry loss of a pair depends only
on the feature difference d = h(chosen) - h(rejected):

    loss(w) = mean_i softplus(-w . d_i) + l2 * |w|^2

which is convex: L-BFGS solves it in well under a second for thousands of pairs. The L2 strength
is picked by k-fold cross-validated pairwise accuracy (the strongest within one standard error of
the best).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fit_linear_bt(d: torch.Tensor, l2: float, max_iter: int = 200, label_smoothing: float = 0.0) -> torch.Tensor:
    """Minimise mean[(1 - eps) softplus(-d @ w) + eps softplus(d @ w)] + l2 * |w|^2 over w.

    d: (N, H) chosen-minus-rejected features. eps = label_smoothing: the labels are taken to be
    right with probability 1 - eps (the conservative/robust BT loss for noisy labels; eps = 0 is
    plain Bradley-Terry). Returns w: (H,), float64.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    d = d.double()
    eps = label_smoothing
    w = torch.zeros(d.shape[1], dtype=torch.float64, device=d.device, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        s = d @ w  # (N,)
        loss = ((1 - eps) * F.softplus(-s) + eps * F.softplus(s)).mean() + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def pairwise_accuracy(d: torch.Tensor, w: torch.Tensor) -> float:
    """Share of pairs with w . d > 0 (ties count half). d: (N, H), w: (H,)."""
    s = d.double() @ w.double()
    return float(((s > 0).double() + 0.5 * (s == 0).double()).mean())


PROBE_FOLDS = 4  # cross-validation folds of `fit_bt_probe`: it needs at least 2 pairs per fold


def fit_bt_probe(d: torch.Tensor, l2_grid: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0), folds: int = PROBE_FOLDS,
                 seed: int = 0, label_smoothing: float = 0.0, rule: str = "one_se") -> tuple[torch.Tensor, dict]:
    """Fit a linear BT head on feature differences, L2 chosen by ``folds``-fold cross-validation.

    d: (N, H). The features are divided by their root-mean-square first (so the grid means the
    same whatever the backbone's activation scale) and the returned w: (H,) undoes it, so that
    ``d @ w`` are the logits of the fitted model on the original features. Also returns
    {"l2", "cv_accuracy" (of the chosen l2), "cv_best_accuracy", "train_accuracy"}.
    """
    if rule not in ("one_se", "best"):
        raise ValueError(f"rule must be 'one_se' or 'best', got {rule!r}")
    n = d.shape[0]
    if n < 2 * folds:
        raise ValueError(f"a probe needs at least {2 * folds} pairs, got {n}")
    scale = d.double().pow(2).mean().sqrt().clamp_min(1e-12)
    x = d.double() / scale
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts = order.chunk(folds)
    cv = {}
    for l2 in l2_grid:
        hits = 0.0
        for k in range(folds):
            held = parts[k]
            fit = torch.cat([parts[j] for j in range(folds) if j != k])
            hits += pairwise_accuracy(x[held], fit_linear_bt(x[fit], l2, label_smoothing=label_smoothing)) * len(held)
        cv[l2] = hits / n
    # The one-standard-error rule: the strongest L2 whose CV accuracy is within one binomial SE
    # of the best. With few pairs per feature (hundreds of pairs, hundreds of dimensions) the CV
    # maximum is mostly noise, and a weak L2 fits the training pairs perfectly, which leaves the
    # fine-tuning that follows with no loss to learn from.
    best = max(cv.values())
    se = (best * (1 - best) / n) ** 0.5 if rule == "one_se" else 0.0
    l2 = max(v for v, acc in cv.items() if acc >= best - se)
    w = fit_linear_bt(x, l2, label_smoothing=label_smoothing)
    return w / scale, {"l2": l2, "cv_accuracy": cv[l2], "cv_best_accuracy": best,
                       "train_accuracy": pairwise_accuracy(x, w)}
