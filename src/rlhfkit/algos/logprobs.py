"""Per-token log-probabilities and entropies from LM logits, without a full log_softmax copy.

A (B, T, V) float32 log_softmax for B*T = 16k tokens and V = 150k is ~10 GB. We only need one
entry per token, log p(y) = z_y - logsumexp(z), so we gather z_y and compute logsumexp over
blocks of tokens: peak extra memory is one block of (chunk_size, V) instead of the whole tensor.
Blocks are views of the logits (never reshaped), so a sliced `logits[:, :-1]` is not copied.
Half-precision logits are upcast per block: bf16 logsumexp loses ~2 digits, too much for PPO ratios.
``temperature`` T gives the distribution the sampler drew from, softmax(z / T) (docs/concepts.md:
sampling temperature); each block is divided on its own, never the whole (B, T, V) tensor at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhfkit.algos.stats import masked_sum


def shift_for_causal(
    logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align causal-LM outputs with the tokens they predict.

    The logit at position t is the distribution of token t+1, so:
    logits (B, T, V) -> logits[:, :-1] (B, T-1, V), a view (no copy);
    input_ids (B, T) -> input_ids[:, 1:] (B, T-1), the labels;
    mask (B, T)      -> mask[:, 1:] (B, T-1), the loss mask *of the labels*
    (e.g. 1 on response tokens, 0 on prompt and padding).
    """
    return logits[:, :-1], input_ids[:, 1:], mask[:, 1:]


def _blocks(B: int, T: int, chunk_size: int):
    """Yield (batch slice, time slice) blocks of about `chunk_size` tokens covering (B, T)."""
    t_step = max(1, min(T, chunk_size))
    b_step = max(1, chunk_size // t_step)
    for b0 in range(0, B, b_step):
        for t0 in range(0, T, t_step):
            yield slice(b0, b0 + b_step), slice(t0, t0 + t_step)


def _out_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _block(logits: torch.Tensor, bs: slice, ts: slice, out_dtype: torch.dtype, temperature: float) -> torch.Tensor:
    """One block of the logits in ``out_dtype``, divided by ``temperature`` (no copy when neither applies)."""
    z = logits[bs, ts].to(out_dtype)
    return z if temperature == 1.0 else z / temperature


def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024, temperature: float = 1.0
) -> torch.Tensor:
    """log p(labels) under softmax(logits / temperature), per token.

    logits: (B, T, V), already aligned with labels (see `shift_for_causal`).
    labels: (B, T) long. Ignore values (-100) or pad ids are allowed: indices < 0 are clamped to 0
            and give a meaningless number there, which the caller's mask removes.
    chunk_size: tokens per block; bounds the temporary memory to chunk_size * V floats.
    Returns (B, T) float32 (float64 if the logits are float64). Differentiable.
    """
    B, T, _ = logits.shape
    labels = labels.clamp(min=0)
    out_dtype = _out_dtype(logits)
    pieces = []
    for bs, ts in _blocks(B, T, chunk_size):
        z = _block(logits, bs, ts, out_dtype, temperature)  # (b, t, V)
        # log_softmax + pick, as the fused cross-entropy kernel (one pass over V forward and
        # backward; `picked - logsumexp(z)` materialises z - max and its exp, twice as slow on CPU)
        nll = F.cross_entropy(z.flatten(0, 1), labels[bs, ts].flatten(), reduction="none")
        pieces.append((bs, ts, -nll.view(z.shape[0], z.shape[1])))
    return _assemble(pieces, B, T, out_dtype, logits.device)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 1024, temperature: float = 1.0) -> torch.Tensor:
    """Entropy H = logsumexp(z) - sum_v softmax(z)_v * z_v of each token's distribution, z = logits / temperature.

    logits: (B, T, V), finite. Returns (B, T) float32 (float64 for float64 logits). Computed in
    blocks of `chunk_size` tokens for the same memory reason as `token_logprobs`; the identity
    above needs one (block, V) temporary (the softmax) instead of softmax and log_softmax.
    """
    B, T, _ = logits.shape
    out_dtype = _out_dtype(logits)
    pieces = []
    for bs, ts in _blocks(B, T, chunk_size):
        z = _block(logits, bs, ts, out_dtype, temperature)
        p = torch.softmax(z, dim=-1)
        pieces.append((bs, ts, torch.logsumexp(z, dim=-1) - (p * z).sum(-1)))
    return _assemble(pieces, B, T, out_dtype, logits.device)


def _assemble(pieces, B, T, dtype, device) -> torch.Tensor:
    """Stitch block results back into (B, T), keeping autograd (cat, not in-place writes)."""
    if len(pieces) == 1:
        return pieces[0][2]
    rows, row, row_start = [], [], None
    for bs, _, val in pieces:
        if row and bs.start != row_start:
            rows.append(torch.cat(row, dim=1))
            row = []
        row_start = bs.start
        row.append(val)
    if row:
        rows.append(torch.cat(row, dim=1))
    if not rows:  # B == 0 or T == 0
        return torch.zeros(B, T, dtype=dtype, device=device)
    return torch.cat(rows, dim=0)


def sequence_logps(
    token_logp: torch.Tensor, mask: torch.Tensor, average: bool = False
) -> torch.Tensor:
    """Log-probability of each sequence: sum of token log-probs over valid tokens.

    token_logp, mask: (B, T) -> (B,). average=True divides by the number of valid tokens
    (length-normalised, as TRL does for IPO and SimPO); rows without valid tokens give 0.
    DPO (docs/concepts.md: DPO) uses the plain sum.
    """
    total = masked_sum(token_logp, mask, dim=-1)
    if not average:
        return total
    count = mask.bool().sum(-1).clamp(min=1)
    return total / count
