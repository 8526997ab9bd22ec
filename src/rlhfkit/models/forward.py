"""The one forward pass every trainer uses to get token log-probs from a causal LM.

Keeping this in one place is what makes rollout-time and training-time log-probs agree:
same position ids (from the attention mask, so left padding is harmless), same dtype path.
"""

from __future__ import annotations

import torch

from rlhfkit.algos import entropy_from_logits, token_logprobs
from rlhfkit.models.heads import position_ids_from_mask


def causal_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                    keep_last: int | None = None, with_entropy: bool = False,
                    position_ids: torch.Tensor | None = None):
    """Log-probs of each token given the ones before it.

    input_ids, attention_mask: (B, T). Returns logp (B, T-1) where ``logp[:, t-1] = log p(x_t | x_<t)``,
    or, with ``keep_last=K``, only the last K of those: (B, K) for tokens x_{T-K}..x_{T-1}
    (the response block of a prompt+response batch; avoids materialising (B, T, V) logits for
    the prompt). With ``with_entropy`` also returns the policy entropy at the same positions.
    Packed batches pass their own ``position_ids`` (restarting per example) and a 4D
    block-diagonal ``attention_mask`` (see ``rlhfkit.data.PackedSFTCollator``).
    """
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    T = input_ids.shape[1]
    k = T - 1 if keep_last is None else keep_last
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids, use_cache=False,
                logits_to_keep=k + 1)
    logits = out.logits[:, :-1].float()  # (B, k, V): position t predicts token t+1
    targets = input_ids[:, T - k:]  # (B, k)
    logp = token_logprobs(logits, targets)
    if with_entropy:
        return logp, entropy_from_logits(logits)
    return logp
