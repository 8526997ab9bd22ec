"""Data: formats (SFT, preference, prompts), chat-template tokenization, collators, packing.

Typical use:
    examples = load_preference("data/pairs.jsonl")                        # validated, or DataError
    features, stats = tokenize_dataset(tok, examples, "preference", 1024)  # all errors before training
    batch = PreferenceCollator(tok.pad_token_id)(features[:8])
"""

from rlhfkit.data.collate import (
    PackedSFTCollator,
    PreferenceCollator,
    PromptCollator,
    SFTCollator,
    batch_to_device,
    block_causal_mask,
    length_batches,
    pack_sft,
    pad_sequences,
)
from rlhfkit.data.errors import DataError, Origin
from rlhfkit.data.formats import (
    PreferenceExample,
    PromptExample,
    SFTExample,
    load_preference,
    load_sft,
    parse_preference,
    parse_sft,
    sft_from_preference,
)
from rlhfkit.data.prompt_records import load_prompts, parse_prompts
from rlhfkit.data.plain_text import load_plain_text, tokenize_plain_text
from rlhfkit.data.records import Record, load_records
from rlhfkit.data.render import end_of_turn_ids, render_ids, render_prompt_ids, render_reply
from rlhfkit.data.tokenize import (
    IGNORE_INDEX,
    TruncationStats,
    tokenize_dataset,
    tokenize_preference,
    tokenize_prompt,
    tokenize_sft,
)

__all__ = [
    "DataError", "Origin", "Record", "load_records",
    "SFTExample", "PreferenceExample", "PromptExample",
    "parse_sft", "parse_preference", "parse_prompts", "load_sft", "load_preference", "load_prompts",
    "sft_from_preference", "load_plain_text", "tokenize_plain_text",
    "IGNORE_INDEX", "TruncationStats", "render_ids", "render_prompt_ids", "render_reply", "end_of_turn_ids",
    "tokenize_sft", "tokenize_preference", "tokenize_prompt", "tokenize_dataset",
    "pad_sequences", "SFTCollator", "PreferenceCollator", "PromptCollator",
    "pack_sft", "block_causal_mask", "length_batches", "PackedSFTCollator", "batch_to_device",
]
