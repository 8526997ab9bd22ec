"""The ``rm:DIR`` reward source: a frozen Bradley-Terry reward model trained by ``rlhfkit rm``.

`find_rm_dir` checks the directory before any weight is read, so that a wrong path (a policy,
a classifier, a config without weights) fails with one line naming the path and what is there,
instead of a traceback from transformers or a model with a random scalar head.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rlhfkit.data import DataError, length_batches, render_ids, render_reply
from rlhfkit.judges.reward_fn import Messages, RewardFn, RewardSpecError, default_name
from rlhfkit.models import (
    PACKABLE_POOLINGS,
    load_scalar_model,
    load_tokenizer,
    reward_pooling,
)
from rlhfkit.models.forward import common_prefix_len, shared_token_values
from rlhfkit.models.heads import POOLING_KEY, pool_mask, pool_values
from rlhfkit.models.loading import to_device, warn_once
from rlhfkit.models.lora import adapter_config, is_seq_cls_adapter
from rlhfkit.models.names import WEIGHT_FILES
from rlhfkit.models.packing import pack_groups, packed_token_values, packs
from rlhfkit.rollout import left_pad



def find_rm_dir(path: str) -> Path:
    """Accept a reward-model directory or the run directory that holds it in ``model/``; a LoRA
    reward-model adapter (``rlhfkit rm`` with model.lora.enabled) is accepted too and is loaded
    merged into its base (`models.load_scalar_model`)."""

    p = Path(path).expanduser()
    if (p / "model" / "config.json").is_file() or (p / "model" / "adapter_config.json").is_file():
        p = p / "model"
    if adapter_config(p) is not None and not (p / "config.json").is_file():
        if not is_seq_cls_adapter(p):
            raise RewardSpecError(f"rm:{path}: {p} is not a reward model (a LoRA adapter of a policy); its scalar "
                                  "head would be random. Train one with `rlhfkit rm`.")
        return p
    if not (p / "config.json").is_file():
        what = "does not exist" if not p.exists() else "is a file" if p.is_file() else "has no config.json"
        raise FileNotFoundError(f"rm:{path}: no reward model found: {p} {what} (expected a directory with "
                                "config.json, as written by `rlhfkit rm` to OUTPUT_DIR/model)")
    _check_rm_config(path, p)
    if not any((p / w).is_file() for w in WEIGHT_FILES):
        raise RewardSpecError(f"rm:{path}: {p} has a config.json but no weights ({', '.join(WEIGHT_FILES[::2])})")
    return p


def _check_rm_config(path: str, p: Path) -> None:
    """One scalar output, saved as *ForSequenceClassification: what `rlhfkit rm` writes."""
    try:
        config = json.loads((p / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RewardSpecError(f"rm:{path}: {p / 'config.json'} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise RewardSpecError(f"rm:{path}: {p / 'config.json'} is not a JSON object")
    archs = config.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in archs):
        kind = " (a causal language model, e.g. a policy)" if any(str(a).endswith("ForCausalLM") for a in archs) else ""
        raise RewardSpecError(f"rm:{path}: {p} is not a reward model: its config.json says "
                              f"{', '.join(map(str, archs)) or 'no architectures'}{kind}; its scalar head would be "
                              "random. Train one with `rlhfkit rm`.")
    labels = len(config.get("id2label") or {}) or config.get("num_labels") or 1
    if labels != 1:
        raise RewardSpecError(f"rm:{path}: {p} is a classifier with {labels} labels, not a reward model "
                              "(one score per sequence)")
    if POOLING_KEY not in config:  # every `rlhfkit rm` records its pooling: this one was trained elsewhere
        warn_once(f"rm:{path}: {p} was not written by `rlhfkit rm` (its config.json records no {POOLING_KEY}): it "
                  "is scored at the reply's end-of-turn token, where rlhfkit's reward models read; a model trained "
                  "elsewhere may read another position (TRL's RewardTrainer: the rendering's last token, after the "
                  "end-of-turn), so check its accuracy (rlhfkit eval with preference_set) before optimising it")


def reward_model_fn(path: str, *, tokenizer=None, device="cpu", batch_size: int = 16) -> RewardFn:
    """A frozen Bradley-Terry reward model scoring chat renderings of (prompt messages + response)."""

    rm_dir = find_rm_dir(path)
    if (rm_dir / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(rm_dir)
    if tokenizer is None:
        raise RewardSpecError(f"rm:{path}: the directory has no tokenizer; pass tokenizer=")
    model = to_device(load_scalar_model(rm_dir, pad_token_id=tokenizer.pad_token_id), device)
    model.eval().requires_grad_(False)
    fn = RewardFn(RewardModelScorer(model, tokenizer, batch_size), default_name(f"rm:{path}"), f"rm:{path}")
    fn.model = model  # exposed so trainers can reuse its weights (e.g. to initialise the critic)
    return fn


class RewardModelScorer:
    """Scores (messages, response) without grad, in micro-batches: the replies to one prompt as one
    packed sequence (``models.packing.pack_groups``) when the pooling allows, other rows in batches
    of similar length (``models.forward.shared_token_values``, pooled); either way the prompts'
    common start is computed once per forward."""

    def __init__(self, model, tokenizer, batch_size: int = 16):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = max(1, batch_size)

    def render(self, messages: Messages, response: str) -> list[int]:
        """Token ids exactly as `rlhfkit rm` trained on them (data.tokenize_preference): the prompt
        with its generation header, then the reply up to and including its end-of-turn token
        (the template's trailing newline is not part of it: the score is read at end-of-turn)."""
        prompt, reply = self.render_parts(messages, response)
        return prompt + reply

    def render_parts(self, messages: Messages, response: str) -> tuple[list[int], list[int]]:
        """(prompt ids, reply ids) of `render` (`data.render.render_reply`). A template that
        rewrites the prompt once a reply follows gives ([], whole rendering): then a "mean"-pooled
        RM averages over every token."""
        try:
            return render_reply(self.tokenizer, messages, response)
        except DataError:
            return [], render_ids(self.tokenizer, [*messages, {"role": "assistant", "content": response}])

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str], messages: list[Messages]) -> list[float]:
        """`messages` by name: the RewardFn passes the prompt conversations to a parameter so named.
        The scores are pooled as stored in the RM's config.json (`models.reward_pooling`). Replies
        to the same prompt (GRPO's group, online DPO's n samples) are scored as one packed sequence,
        the prompt once, when the pooling reads the reply alone; other rows one by one."""

        pooling = reward_pooling(self.model)
        parts = [self.render_parts(m, r) for m, r in zip(messages, responses)]
        scores = [0.0] * len(parts)
        groups, singles = (shared_prompt_groups(parts) if pooling in PACKABLE_POOLINGS and packs(self.model)
                           else ([], range(len(parts))))
        for i, v in self._packed(parts, groups, pooling) + self._rows(parts, list(singles), pooling):
            scores[i] = v
        return scores

    def _rows(self, parts: list, rows: list[int], pooling: str) -> list[tuple[int, float]]:
        """(row, score) of each listed row, scored on its own (left-padded batches of similar length),
        the prompts' common start (the chat template's system turn) computed once per batch."""
        device, out = next(self.model.parameters()).device, []
        for batch in length_batches([len(parts[i][0]) + len(parts[i][1]) for i in rows], self.batch_size):
            idx = [rows[j] for j in batch]
            chunk = [parts[i] for i in idx]
            ids, mask = left_pad([p + r for p, r in chunk], self.tokenizer.pad_token_id, device)
            # left-padded: each row's reply is its last len(reply) positions
            n_reply = torch.tensor([len(r) for _, r in chunk], device=device)[:, None]  # (B, 1)
            cols = torch.arange(ids.shape[1], device=device)[None]  # (1, T)
            response_mask = (cols >= ids.shape[1] - n_reply).long()  # (B, T)
            read = pool_mask(mask, response_mask, pooling) > 0  # the positions the pooling reads
            values = shared_token_values(self.model, ids, mask, common_prefix_len([p for p, _ in chunk]), read=read)
            out += zip(idx, pool_values(values, mask, pooling, response_mask).float().tolist())
        return out

    def _packed(self, parts: list, groups: list[list[int]], pooling: str) -> list[tuple[int, float]]:
        """(row, score) of the rows of each group: one packed sequence per group, up to
        `batch_size` rows per forward."""
        device, out = next(self.model.parameters()).device, []
        sizes = [sum(len(parts[i][1]) for i in g) + len(parts[g[0]][0]) for g in groups]
        per_forward = max(1, self.batch_size // max(map(len, groups), default=1))  # groups per forward
        for batch in length_batches(sizes, per_forward):
            rows = [i for j in batch for i in groups[j]]
            local = {i: b for b, i in enumerate(rows)}
            packed = pack_groups([(torch.tensor(parts[groups[j][0]][0], device=device),
                                   [(local[i], torch.tensor(parts[i][1], device=device)) for i in groups[j]])
                                  for j in batch], (len(rows), max(len(parts[i][1]) for i in rows)),
                                 self.tokenizer.pad_token_id)
            values, mask = packed_token_values(self.model, packed, last_only=pooling == "last")
            out += zip(rows, pool_values(values, mask, pooling, mask).float().tolist())
        return out


def shared_prompt_groups(parts: list[tuple[list[int], list[int]]]) -> tuple[list[list[int]], list[int]]:
    """Rows of (prompt ids, reply ids) -> (groups of >= 2 rows with the same non-empty prompt and
    non-empty replies, in first-seen order; every other row). A prompt seen once gains nothing
    from packing and keeps the plain path."""
    by_prompt: dict[tuple, list[int]] = {}
    singles = []
    for i, (prompt, reply) in enumerate(parts):
        if prompt and reply:
            by_prompt.setdefault(tuple(prompt), []).append(i)
        else:
            singles.append(i)
    groups = [g for g in by_prompt.values() if len(g) > 1]
    singles += [g[0] for g in by_prompt.values() if len(g) == 1]
    return groups, sorted(singles)
