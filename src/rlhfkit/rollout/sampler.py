"""Choosing the next token: temperature, top-k, top-p and inverse-CDF sampling, with the token's
log-probability under the tempered model, softmax(logits / temperature) before the top-k / top-p
filters (1 for greedy), from the same logits."""

from __future__ import annotations

import torch


def pick(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator) -> torch.Tensor:
    """(B, V) raw logits -> (B,) sampled token ids."""
    return Sampler(temperature, top_p, top_k, generator)(logits, False)[0]


def _filters(logits: torch.Tensor, top_p: float, top_k: int) -> bool:
    """Whether top-k or top-p removes any token."""
    return bool(top_k and top_k < logits.shape[-1]) or top_p < 1.0


def _filtered(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
              want_lse: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tempered logits with tokens outside top-k / top-p set to -inf (`logits` itself if nothing to
    do), and, with `want_lse` and a filter on, logsumexp(logits / T) taken before the filters."""
    filtering = _filters(logits, top_p, top_k)
    if temperature == 1.0 and not filtering:
        return logits, None
    z = logits / temperature if temperature != 1.0 else logits.clone()
    lse = z.logsumexp(-1) if want_lse and filtering else None
    if top_k and top_k < z.shape[-1]:
        kth = z.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        z.masked_fill_(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = z.sort(dim=-1, descending=True)
        cum = sorted_z.softmax(-1).cumsum(-1)
        # Drop a token when the mass *before* it already reaches top_p (the top token always stays).
        drop_sorted = (cum - sorted_z.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z.masked_fill_(drop, float("-inf"))
    return z, lse


class Sampler:
    """One decode step's token choice and its log pi at the sampling temperature, with few passes over the
    (B, V) logits and no (B, V) allocation after the first step.

    Inverse-CDF sampling with one uniform per row (same distribution as torch.multinomial, which
    draws V exponentials per row: ~20 ms per step for 16 x 49k on CPU), done in two levels so that
    only block sums and one block of `BLOCK` tokens are summed cumulatively, in float64: a single
    float32 cumulative sum over a 49k vocabulary would round away the mass of its tail (absolute
    error ~6e-8 per token near a total of 1), while here every error is relative to a block's mass.
    Unnormalised weights exp(z - max z) go into a buffer reused across steps; their total also
    gives logsumexp, so the log-prob costs no extra pass when sampling without filters.
    """

    BLOCK = 256

    def __init__(self, temperature: float, top_p: float, top_k: int, generator):
        self.temperature, self.top_p, self.top_k, self.generator = temperature, top_p, top_k, generator
        self.buf: torch.Tensor | None = None

    def _buffer(self, z: torch.Tensor) -> torch.Tensor:
        """(b, n_blocks * BLOCK) buffer; columns from V on stay zero (padding of the last block)."""
        b, V = z.shape
        width = -(-V // self.BLOCK) * self.BLOCK
        buf = self.buf
        if buf is None or buf.shape[0] < b or buf.shape[1] != width or buf.dtype != z.dtype or buf.device != z.device:
            buf = self.buf = torch.zeros((b, width), dtype=z.dtype, device=z.device)
        return buf[:b]

    def __call__(self, logits: torch.Tensor, want_logp: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(b, V) raw logits -> (b,) token ids, (b,) log-softmax(logits / T) at those ids (or None),
        T the temperature (1 for greedy)."""
        if self.temperature == 0:
            tok = logits.argmax(-1)
            return tok, (token_logprob(logits, tok) if want_logp else None)
        z, lse_all = _filtered(logits, self.temperature, self.top_p, self.top_k, want_logp)
        b, V = z.shape
        m = z.amax(-1, keepdim=True)  # (b, 1), finite: the top token is never filtered out
        buf = self._buffer(z)
        torch.sub(z, m, out=buf[:, :V]).exp_()  # weights in (0, 1], 0 for filtered tokens
        blocks = buf.view(b, -1, self.BLOCK)  # (b, nb, BLOCK)
        cum = blocks.sum(-1).double().cumsum_(-1)  # (b, nb); block sums have relative error ~1e-7
        total = cum[:, -1:]  # (b, 1) >= 1 (the max contributes exp(0))
        zero = torch.zeros_like(total)
        u = torch.rand((b, 1), generator=self.generator, device=z.device, dtype=torch.float64)
        # First block / token whose cumulative weight exceeds the target (right=True): a token of
        # weight 0 can never be that first one. The target is kept strictly below the total.
        target = torch.minimum(u * total, total.nextafter(zero))
        blk = torch.searchsorted(cum, target, right=True)  # (b, 1)
        before = torch.where(blk > 0, cum.gather(-1, (blk - 1).clamp_(min=0)), zero)
        inner = blocks.gather(1, blk[:, :, None].expand(b, 1, self.BLOCK)).squeeze(1).cumsum(-1, dtype=torch.float64)
        rest = torch.minimum(target - before, inner[:, -1:].nextafter(zero[:, :1]))
        tok = (blk * self.BLOCK + torch.searchsorted(inner, rest, right=True)).squeeze(-1)  # (b,)
        if not want_logp:
            return tok, None
        if lse_all is None:  # no filter, z = logits / T: log pi = z - max - log(sum exp(z - max))
            lse = m.squeeze(-1) + total.squeeze(-1).log().to(z.dtype)
            return tok, z.gather(-1, tok[:, None]).squeeze(-1) - lse
        # filtered: log pi under the unfiltered tempered model, its normaliser taken before the filters
        return tok, logits.gather(-1, tok[:, None]).squeeze(-1) / self.temperature - lse_all


def token_logprob(logits: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    """(b, V), (b,) -> (b,) log-softmax(logits) at tok, without materialising the (b, V) result."""
    return logits.gather(-1, tok[:, None]).squeeze(-1) - logits.logsumexp(-1)
