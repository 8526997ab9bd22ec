"""The Experience record: one batch of rollouts, the single input every trainer consumes.

`generate` fills the first group of fields; trainers fill the optional ones (reference log-probs,
critic values, scores, rewards, advantages, returns) as they go through the numbered steps of
docs/concepts.md: PPO, GRPO and RLOO. Shapes: B rows, P prompt tokens (left-padded), R response tokens (right-padded).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from rlhfkit.models.forward import common_prefix_len

# Fields padded on the left when records of different widths are concatenated.
_PROMPT_FIELDS = ("prompt_ids", "prompt_mask")


@dataclass
class Experience:
    prompt_ids: torch.Tensor  # (B, P) long, left-padded with pad_token_id
    prompt_mask: torch.Tensor  # (B, P) long, 1 on real prompt tokens
    response_ids: torch.Tensor  # (B, R) long, right-padded; pad after EOS
    response_mask: torch.Tensor  # (B, R) long, 1 up to and including EOS, 0 after
    # (B, R) float32 log pi_theta'(a_t | x, a_<t) of the sampled tokens under the sampling policy at
    # `temperature`, softmax(logits / T) over the full vocabulary (top-k / top-p filters are not
    # applied, as in TRL and verl). PPO's ratio pi_theta / pi_theta' and the KL to the reference are
    # taken at the same temperature (docs/concepts.md: sampling temperature). 0 where response_mask is 0.
    logprobs: torch.Tensor | None
    eos: torch.Tensor  # (B,) bool, whether the row emitted EOS within the budget
    prompt_index: torch.Tensor  # (B,) long, which input prompt the row came from (n rows per prompt)
    pad_token_id: int = 0  # used to pad ids when concatenating records of different widths
    # leading prompt tokens every row shares (the chat template's system turn): the log-prob
    # forwards compute them once (`models.forward.prefix_shared_forward`); 0 = none
    shared_prefix: int = 0
    # the temperature the rows were sampled at (1 for greedy rows): every log-prob of these rows
    # (`logprobs`, the trainer's pi_theta, the reference's) is of softmax(logits / temperature)
    temperature: float = 1.0

    # Filled later by trainers.
    ref_logprobs: torch.Tensor | None = None  # (B, R) log pi_ref(a_t | ...)
    values: torch.Tensor | None = None  # (B, R) critic V(t) at rollout time (V_old)
    scores: torch.Tensor | None = None  # (B,) sequence score (RM / gold reward / verifier)
    rewards: torch.Tensor | None = None  # (B, R) per-token reward (KL penalty + score at last token)
    advantages: torch.Tensor | None = None  # (B, R)
    returns: torch.Tensor | None = None  # (B, R) value targets A_t + V(t)

    # ---- views -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def input_ids(self) -> torch.Tensor:
        """(B, P+R) prompt followed by response."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    def attention_mask(self) -> torch.Tensor:
        """(B, P+R) 1 on real prompt and response tokens (left padding, then right padding)."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    def response_lengths(self) -> torch.Tensor:
        """(B,) number of response tokens, EOS included."""
        return self.response_mask.sum(-1)

    def _tensor_items(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                yield f.name, v

    # ---- transforms --------------------------------------------------------------------------
    def to(self, device: torch.device | str) -> Experience:
        return replace(self, **{k: v.to(device) for k, v in self._tensor_items()})

    def select(self, idx: torch.Tensor | list[int] | slice) -> Experience:
        """Rows `idx` of every tensor field (minibatching). Widths P and R are kept."""
        if isinstance(idx, list):
            idx = torch.as_tensor(idx, dtype=torch.long)
        if isinstance(idx, torch.Tensor):
            idx = idx.to(self.prompt_ids.device)
        return replace(self, **{k: v[idx] for k, v in self._tensor_items()})

    @staticmethod
    def cat(items: list[Experience]) -> Experience:
        """Concatenate rows. Prompts are re-padded on the left and responses on the right to the
        widest record, so the result obeys the same padding conventions. prompt_index is kept as
        is (records from the same `generate` call share one numbering)."""
        if not items:
            raise ValueError("Experience.cat needs at least one record")
        if len(items) == 1:
            return items[0]
        P = max(e.prompt_ids.shape[1] for e in items)
        R = max(e.response_ids.shape[1] for e in items)
        pad_id = items[0].pad_token_id
        out = {}
        for f in fields(Experience):
            vals = [getattr(e, f.name) for e in items]
            if not isinstance(vals[0], torch.Tensor):
                if f.name == "shared_prefix":  # what the rows of all records share
                    out[f.name] = 0
                    continue
                if f.name == "temperature" and len(set(vals)) > 1:
                    raise ValueError(f"cannot concatenate rows sampled at different temperatures {sorted(set(vals))}")
                if f.name not in ("pad_token_id", "temperature") and any(v is not None for v in vals):
                    raise ValueError(f"cannot concatenate field {f.name}: set in some records only")
                out[f.name] = vals[0]
                continue
            if any(v is None for v in vals):
                raise ValueError(f"cannot concatenate field {f.name}: missing in some records")
            if vals[0].dim() == 2:
                left = f.name in _PROMPT_FIELDS
                fill = pad_id if f.name in ("prompt_ids", "response_ids") else 0
                width = P if left else R
                vals = [_pad_to(v, width, fill, left) for v in vals]
            out[f.name] = torch.cat(vals, dim=0)
        if all(e.shared_prefix for e in items):
            out["shared_prefix"] = common_prefix_len(
                [row[m.bool()].tolist() for row, m in zip(out["prompt_ids"], out["prompt_mask"])])
        return Experience(**out)


def _pad_to(x: torch.Tensor, width: int, value, left: bool) -> torch.Tensor:
    """Pad a (B, W) tensor to (B, width) on the left or right."""
    extra = width - x.shape[1]
    if extra <= 0:
        return x
    pad = x.new_full((x.shape[0], extra), value)
    return torch.cat([pad, x] if left else [x, pad], dim=1)
