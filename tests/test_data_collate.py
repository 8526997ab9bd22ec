"""Collators and packing: masks cover exactly the right tokens; packed log-probs equal unpacked ones."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rlhfkit.data import (
    IGNORE_INDEX,
    PackedSFTCollator,
    PreferenceCollator,
    PreferenceExample,
    PromptCollator,
    PromptExample,
    SFTCollator,
    SFTExample,
    block_causal_mask,
    pack_sft,
    pad_sequences,
    tokenize_dataset,
)
from rlhfkit.models import tiny_causal_lm


def test_pad_sequences_both_sides():
    ids, mask = pad_sequences([[1, 2, 3], [4]], pad_value=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_sequences([[1, 2, 3], [4]], pad_value=9, side="left")
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == torch.long


def test_sft_collator_masks_padding():
    batch = SFTCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                         {"input_ids": [8], "labels": [-100]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def chat(*turns):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def test_preference_collator_masks_exactly_the_responses(tokenizer):
    exs = [PreferenceExample(chat("Hi"), "Hello there, friend!", "Go.", category="chat", margin=2.0),
           PreferenceExample(chat("What is 2+2?"), "4", "It is definitely five.")]
    feats, _ = tokenize_dataset(tokenizer, exs, "preference", 256)
    batch = PreferenceCollator(tokenizer.pad_token_id)(feats)
    B = len(feats)
    assert batch["input_ids"].shape == batch["loss_mask"].shape == (2 * B, batch["input_ids"].shape[1])
    for row in range(2 * B):
        f = feats[row % B]
        resp = f["chosen_ids"] if row < B else f["rejected_ids"]
        ids, lm, am = batch["input_ids"][row], batch["loss_mask"][row].bool(), batch["attention_mask"][row]
        assert ids[lm].tolist() == resp
        n = len(f["prompt_ids"]) + len(resp)
        assert ids[:n].tolist() == f["prompt_ids"] + resp and am.sum() == n and not lm[n:].any()
    assert batch["category"] == ["chat", None] and batch["margin"].tolist() == [2.0, 0.0]


def test_prompt_collator_left_pads_and_passes_metadata(tokenizer):
    exs = [PromptExample(chat("Hi"), reference="a"), PromptExample(chat("A much longer question here?"))]
    feats, _ = tokenize_dataset(tokenizer, exs, "prompt", 128)
    batch = PromptCollator(tokenizer.pad_token_id)(feats)
    short = len(feats[0]["input_ids"])
    assert batch["input_ids"][0, -short:].tolist() == feats[0]["input_ids"]
    assert (batch["input_ids"][0, :-short] == tokenizer.pad_token_id).all()
    assert batch["attention_mask"][0].sum() == short and batch["attention_mask"][1].all()
    assert batch["reference"] == ["a", None] and batch["messages"][1] == exs[1].prompt


# ------------------------------------------------------------------------------------- packing

def sft_features(tokenizer, n=5):
    """Short conversations of 30-60 tokens (the template adds a ~20-token system turn); every third has two turns."""
    exs = [SFTExample(chat(f"Q{i}: " + "why " * (i % 4), f"A{i}. " + "because " * (3 * i % 5),
                           *(("Thanks!", "Sure.") if i % 3 == 0 else ())))
           for i in range(n)]
    return tokenize_dataset(tokenizer, exs, "sft", 256)[0]


def test_pack_sft_blocks_hold_every_example_once(tokenizer):
    feats = sft_features(tokenizer, n=7)
    block = 100
    blocks = pack_sft(feats, block)
    assert len(blocks) < len(feats)
    seen = []
    for b in blocks:
        assert len(b["input_ids"]) == sum(b["seq_lens"]) <= block
        start = 0
        for s, n in enumerate(b["seq_lens"]):
            piece = b["input_ids"][start:start + n]
            seen.append(piece)
            assert b["position_ids"][start:start + n] == list(range(n))
            assert b["segment_ids"][start:start + n] == [s] * n
            assert b["labels"][start] == IGNORE_INDEX  # never predicted across examples
            start += n
    assert sorted(seen) == sorted(f["input_ids"] for f in feats)
    with pytest.raises(ValueError, match="block_size"):
        pack_sft(feats, 8)


def test_block_causal_mask_by_hand():
    m = block_causal_mask(torch.tensor([[0, 0, 1]]))
    allowed = (m[0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0], [1, 1, 0], [0, 0, 1]] and m.shape == (1, 1, 3, 3)


@pytest.fixture(scope="module")
def packing(tokenizer):
    """7 tokenized conversations, their packing into blocks of 100 tokens, and a tiny random Llama."""
    feats = sft_features(tokenizer, n=7)
    blocks = pack_sft(feats, 100)
    assert len(blocks) < len(feats)  # some rows really hold several examples
    return {"feats": feats, "blocks": blocks, "model": tiny_causal_lm(tokenizer).eval(),
            "plain": SFTCollator(tokenizer.pad_token_id)(feats),
            "packed": PackedSFTCollator(tokenizer.pad_token_id)(blocks)}


def unpack(x, packing):
    """Per-example slices of packed rows [(example index, x[row, start:start+n]), ...]."""
    index = {tuple(f["input_ids"]): i for i, f in enumerate(packing["feats"])}
    out = []
    for r, b in enumerate(packing["blocks"]):
        start = 0
        for n in b["seq_lens"]:
            out.append((index[tuple(b["input_ids"][start:start + n])], x[r, start:start + n]))
            start += n
    return out


def max_err(x_packed, x_plain, packing) -> float:
    """Largest |packed - unpacked| over the real tokens of every example."""
    return max((got - x_plain[i, :len(got)]).abs().max().item() for i, got in unpack(x_packed, packing))


def hidden(model, batch, **kw):
    """(B, T, H) final hidden states; logits are a per-position linear map of these."""
    return model.model(input_ids=batch["input_ids"], **kw).last_hidden_state


@pytest.mark.parametrize("dtype, attn, atol", [(torch.float64, "sdpa", 1e-12), (torch.float64, "eager", 1e-12),
                                               (torch.float32, "sdpa", 1e-5)])
def test_packed_hidden_states_equal_unpacked(packing, dtype, attn, atol):
    """Block mask + position resets = each example alone: exact in float64, float32 rounding otherwise.
    The reference uses the same kernel: eager softmax runs in float32 even in a float64 model."""
    model, plain, packed = packing["model"], packing["plain"], packing["packed"]
    model.set_attn_implementation(attn)
    try:
        model.to(dtype)
        with torch.no_grad():
            ref = hidden(model, plain, attention_mask=plain["attention_mask"])
            got = hidden(model, packed, attention_mask=packed["attention_mask"].to(dtype),
                         position_ids=packed["position_ids"])
            # negative control: one causal sequence per row, no block mask -> examples see each other
            leaky = hidden(model, packed, position_ids=packed["position_ids"])
    finally:
        model.float().set_attn_implementation("sdpa")
    assert max_err(got, ref, packing) <= atol
    assert max_err(leaky, ref, packing) > 1e-3  # the mask is what makes packing correct


def test_packed_log_probs_and_loss_equal_unpacked(packing):
    """Per-token log-probs and the summed SFT loss (so the packed labels are right as well)."""
    model, plain, packed = packing["model"], packing["plain"], packing["packed"]

    def logps_and_loss(batch, **kw):
        logits = model(input_ids=batch["input_ids"], **kw).logits[:, :-1]  # (B, T-1, V)
        logps = torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], reduction="sum")
        return logps, loss.item()

    with torch.no_grad():
        lp_plain, loss_plain = logps_and_loss(plain, attention_mask=plain["attention_mask"])
        lp_packed, loss_packed = logps_and_loss(packed, attention_mask=packed["attention_mask"],
                                                position_ids=packed["position_ids"])
    # packed row: position t-1 predicts token t; drop each example's last slot (it predicts the next example)
    errs = [(got[:-1] - lp_plain[i, :len(got) - 1]).abs().max().item() for i, got in unpack(lp_packed, packing)]
    assert max(errs) <= 1e-5
    n_labels = (plain["labels"][:, 1:] != IGNORE_INDEX).sum()
    assert n_labels == (packed["labels"][:, 1:] != IGNORE_INDEX).sum()
    assert loss_packed == pytest.approx(loss_plain, rel=1e-6)


def test_position_ids_alone_pack_only_without_cache(packing):
    """Documents transformers' behaviour for the flash-attention path (no 4D mask): position-id
    resets isolate the examples only with use_cache=False."""
    model, plain, packed = packing["model"], packing["plain"], packing["packed"]
    with torch.no_grad():
        ref = hidden(model, plain, attention_mask=plain["attention_mask"])
        no_cache = hidden(model, packed, position_ids=packed["position_ids"], use_cache=False)
        cached = hidden(model, packed, position_ids=packed["position_ids"], use_cache=True)
    assert max_err(no_cache, ref, packing) <= 1e-5
    assert max_err(cached, ref, packing) > 1e-3


@given(st.lists(st.integers(0, 50), max_size=40), st.integers(1, 9))
def test_length_batches_cover_every_index_once_in_length_order(lengths, size):
    from rlhfkit.data import length_batches

    batches = length_batches(lengths, size)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(1 <= len(b) <= size for b in batches) and all(len(b) == size for b in batches[:-1])
    assert [lengths[i] for i in flat] == sorted(lengths)


def test_pack_sft_best_fit_puts_an_example_into_a_block_it_fills_exactly():
    exs = [{"input_ids": [i + 1] * n, "labels": [i + 1] * n} for i, n in enumerate([6, 4, 4, 6])]
    blocks = pack_sft(exs, 10)
    assert [b["seq_lens"] for b in blocks] == [[6, 4], [4, 6]]
    assert blocks[1]["input_ids"] == [3] * 4 + [4] * 6
    assert blocks[1]["labels"] == [IGNORE_INDEX, 3, 3, 3, IGNORE_INDEX, 4, 4, 4, 4, 4]
