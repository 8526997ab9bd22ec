"""A reward head on every token, fitted alone on frozen per-token features (docs/concepts.md, "Reward model").

A linear head commutes with the mean: a mean-pooled linear reward model scores a reply by one
linear function of its mean feature. A token head scores each token first and averages those,

    r(reply) = mean_t f(h_t),    f(h) = w2 . gelu(W1 h + b1),

so that a token can count by what it is, as a word list does, rather than only through the
average of all of them. Before the backbone is fine-tuned (or instead of it), the head is fitted on
the frozen backbone's features with the Bradley-Terry loss on r(chosen) - r(rejected), by AdamW
over minibatches of pairs. The features are standardised per dimension for the fit, and the
returned W1, b1 absorb that, so they act on the raw features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reply_rows(offsets: torch.Tensor, counts: torch.Tensor, replies: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The token rows of `replies` in a matrix holding every reply's tokens back to back
    (reply j at rows offsets[j] ... offsets[j] + counts[j] - 1), and each row's position in
    `replies`: (rows, which), both (sum of counts[replies],)."""
    n = counts[replies]
    which = torch.repeat_interleave(torch.arange(len(replies), device=counts.device), n)
    start = torch.cumsum(n, 0) - n  # each reply's first position in the output
    return offsets[replies][which] + torch.arange(int(n.sum()), device=counts.device) - start[which], which


def token_head_scores(tokens: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                      w2: torch.Tensor) -> torch.Tensor:
    """(R,) mean over each reply's tokens of w2 . gelu(W1 h + b1). tokens: (T, H), the replies'
    tokens back to back; counts: (R,) tokens per reply; w1: (k, H), b1: (k,), w2: (1, k)."""
    values = F.linear(F.gelu(F.linear(tokens.to(w1.dtype), w1, b1)), w2).squeeze(-1)  # (T,)
    which = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    totals = torch.zeros(len(counts), dtype=values.dtype, device=values.device).index_add(0, which, values)
    return totals / counts.to(values.dtype)


def _feature_stats(tokens: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and spread (population, at least 1e-6) in float64, in chunks of rows:
    no float64 copy of every token at once."""
    n = tokens.shape[0]
    mu = sum(tokens[s:s + chunk].double().sum(0) for s in range(0, n, chunk)) / n
    var = sum((tokens[s:s + chunk].double() - mu).pow(2).sum(0) for s in range(0, n, chunk)) / n
    return mu, var.sqrt().clamp_min(1e-6)


def fit_token_head_bt(tokens: torch.Tensor, counts: torch.Tensor, hidden: int, *, weight_decay: float = 0.3,
                      epochs: int = 3, lr: float = 1e-3, batch_size: int = 32, seed: int = 0,
                      label_smoothing: float = 0.0, members: int = 1) -> tuple[dict[str, torch.Tensor], dict]:
    """Fit the token head of the module docstring on N pairs.

    tokens: (T, H), every reply's tokens back to back, pair i's chosen reply (2i) then its
    rejected one (2i + 1); counts: (2N,) tokens per reply, each >= 1. label_smoothing: the share
    of labels taken to be flipped, as in `fit_linear_bt`. members: fit that many heads from seeds
    seed, seed + 1, ... and average them, which is one head of width members x hidden (their
    first layers stacked, the second divided by members). Returns ({"w1": (members x hidden, H),
    "b1": (members x hidden,), "w2": (1, members x hidden)} in float32, acting on the raw features;
    {"train_accuracy"}).
    """
    if hidden < 1 or members < 1:
        raise ValueError(f"hidden and members must be >= 1, got {hidden} and {members}")
    if counts.numel() % 2 or counts.numel() == 0 or bool((counts < 1).any()):
        raise ValueError("counts: one count >= 1 per reply, two replies per pair")
    if int(counts.sum()) != tokens.shape[0]:
        raise ValueError(f"counts add up to {int(counts.sum())} tokens, tokens has {tokens.shape[0]} rows")
    counts = counts.long()
    offsets = torch.cumsum(counts, 0) - counts
    mu, sd = _feature_stats(tokens)
    fits = [_fit_one(tokens, counts, offsets, (mu, sd), hidden, weight_decay=weight_decay, epochs=epochs, lr=lr,
                     batch_size=batch_size, seed=seed + m, label_smoothing=label_smoothing) for m in range(members)]
    weights = {"w1": torch.cat([f["w1"] for f in fits]), "b1": torch.cat([f["b1"] for f in fits]),
               "w2": torch.cat([f["w2"] for f in fits], 1) / members}
    return weights, {"train_accuracy": _train_accuracy(tokens, counts, offsets, weights)}


def _fit_one(tokens: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor,
             stats: tuple[torch.Tensor, torch.Tensor], hidden: int, *, weight_decay: float, epochs: int, lr: float,
             batch_size: int, seed: int, label_smoothing: float) -> dict[str, torch.Tensor]:
    """One head fitted on the features standardised by stats (their float64 mean and spread),
    its weights returned acting on the raw features."""
    mu, sd = stats
    mu32, sd32 = mu.float(), sd.float()
    torch.manual_seed(seed)
    dense = torch.nn.Linear(tokens.shape[1], hidden, device=tokens.device)
    out = torch.nn.Linear(hidden, 1, bias=False, device=tokens.device)
    opt = torch.optim.AdamW([*dense.parameters(), *out.parameters()], lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    n_pairs = counts.numel() // 2
    for _ in range(epochs):
        order = torch.randperm(n_pairs, generator=g)
        for s in range(0, n_pairs, batch_size):
            pairs = order[s:s + batch_size]
            replies = torch.stack([2 * pairs, 2 * pairs + 1], 1).reshape(-1)
            rows, _ = reply_rows(offsets, counts, replies)
            x = (tokens[rows].float() - mu32) / sd32
            r = token_head_scores(x, counts[replies], dense.weight, dense.bias, out.weight)
            d = r[0::2] - r[1::2]
            loss = ((1 - label_smoothing) * F.softplus(-d) + label_smoothing * F.softplus(d)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        w1 = (dense.weight.double() / sd).float()  # W1 (h - mu) / sd + b1 = (W1 / sd) h + (b1 - (W1 / sd) mu)
        b1 = (dense.bias.double() - w1.double() @ mu).float()
        return {"w1": w1, "b1": b1, "w2": out.weight.detach().clone()}


@torch.no_grad()
def _train_accuracy(tokens: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor,
                    weights: dict[str, torch.Tensor]) -> float:
    """The head's pairwise accuracy on the pairs it was fitted on (ties count 1/2)."""
    n_pairs, hits = counts.numel() // 2, 0.0
    for s in range(0, n_pairs, 256):  # in chunks: no float copy of every token at once
        replies = torch.arange(2 * s, 2 * min(s + 256, n_pairs), device=counts.device)
        rows, _ = reply_rows(offsets, counts, replies)
        d = token_head_scores(tokens[rows], counts[replies], **weights)
        d = d[0::2] - d[1::2]
        hits += float(((d > 0).double() + 0.5 * (d == 0).double()).sum())
    return hits / n_pairs
