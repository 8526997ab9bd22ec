"""A prefix every row shares (the chat template's system turn) computed once, as a separate
forward whose key/value cache the rows continue (the K-row layout): the log-probs, entropies and
gradients must equal the plain forward's, whatever the padding, and the path must be the same in
scoring and update (the first PPO ratio stays exactly 1)."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.models import forward
from rlhfkit.models.forward import causal_logprobs
from rlhfkit.rollout.experience import common_prefix_len


@pytest.fixture(autouse=True)
def _rows_as_rows(monkeypatch):
    """These tests are of the K-row path (a separate forward for the prefix, as on GPU and under
    data parallelism); on CPU rows run as one row by default (tests/test_rows_one_row.py)."""
    from rlhfkit.models import segments

    monkeypatch.setattr(segments, "SEGMENT_ATTENTION", False)


def _rows(tokenizer, seed: int, L: int = 10, B: int = 5, R: int = 6):
    """B left-padded prompts that start with the same L tokens (then each its own), right-padded
    responses of random lengths (one may be empty); pads carry random ids (they must not matter)."""
    g = torch.Generator().manual_seed(seed)
    plen = [L + 1 + int(torch.randint(0, 9, (1,), generator=g)) for _ in range(B)]
    rlen = [int(torch.randint(0, R + 1, (1,), generator=g)) for _ in range(B)]
    P = max(plen)
    ids = torch.randint(10, 5000, (B, P + R), generator=g)  # padding positions hold junk ids
    mask = torch.zeros(B, P + R, dtype=torch.long)
    prefix = torch.randint(10, 5000, (L,), generator=g)
    for i, (p, r) in enumerate(zip(plen, rlen)):
        ids[i, P - p:P - p + L] = prefix
        ids[i, P - p + L] = 5000 + i  # the rows differ right after the prefix
        mask[i, P - p:P + r] = 1
    return ids, mask, P, R, L


def test_common_prefix_len_by_hand():
    rows = [[7, 8, 9, 4], [7, 8, 9, 5, 6], [7, 8, 3]]
    assert common_prefix_len(rows) == 2  # "7 8"; row 2 has 3 tokens, so at most 2 are shared
    assert common_prefix_len(rows[:2]) == 3  # "7 8 9", each row keeps a token of its own
    assert common_prefix_len(rows[:1]) == 0  # one row: nothing to share
    assert common_prefix_len([[1, 2, 3], [2, 2, 3]]) == 0


@pytest.mark.parametrize("seed", range(4))
def test_shared_prefix_logprobs_entropy_and_gradients_equal_the_plain_forward(tokenizer, seed):
    from rlhfkit.models import tiny_causal_lm

    model = tiny_causal_lm(tokenizer, seed=seed)
    ids, mask, P, R, L = _rows(tokenizer, seed)
    assert common_prefix_len([row[m.bool()].tolist() for row, m in zip(ids[:, :P], mask[:, :P])]) >= L
    m = mask[:, P:].bool()
    params = [p for p in model.parameters() if p.requires_grad]

    def run(shared):
        logp, ent = causal_logprobs(model, ids, mask, keep_last=R, with_entropy=True, shared_prefix=shared)
        grads = torch.autograd.grad((logp * m).sum() + (ent * m).sum(), params)
        return logp.detach(), ent.detach(), grads

    calls = []
    real = forward.prefix_shared_forward
    try:
        forward.prefix_shared_forward = lambda *a, **k: calls.append(1) or real(*a, **k)
        a_lp, a_ent, a_g = run(0)
        assert not calls
        b_lp, b_ent, b_g = run(L)
        assert calls, "the shared-prefix path did not run"
    finally:
        forward.prefix_shared_forward = real
    torch.testing.assert_close(b_lp[m], a_lp[m], atol=1e-5, rtol=0)
    torch.testing.assert_close(b_ent[m], a_ent[m], atol=1e-5, rtol=0)
    for ga, gb in zip(a_g, b_g):
        torch.testing.assert_close(gb, ga, atol=1e-5, rtol=1e-4)


def test_shared_prefix_through_lora_and_with_adapters_disabled(tokenizer):
    from rlhfkit.config import LoraSection
    from rlhfkit.models import tiny_causal_lm
    from rlhfkit.models.lora import adapters_disabled, apply_lora

    model = apply_lora(tiny_causal_lm(tokenizer, seed=2), LoraSection(enabled=True, r=4, alpha=8), "CAUSAL_LM")
    with torch.no_grad():  # non-zero adapters, so "disabled" is a different function
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ids, mask, P, R, L = _rows(tokenizer, 7)
    m = mask[:, P:].bool()
    shared = {}
    with torch.no_grad():
        for name, ctx in (("on", torch.enable_grad), ("off", lambda: adapters_disabled(model))):
            with ctx():
                a = causal_logprobs(model, ids, mask, keep_last=R)
                shared[name] = causal_logprobs(model, ids, mask, keep_last=R, shared_prefix=L)
            torch.testing.assert_close(shared[name][m], a[m], atol=1e-5, rtol=0)
    assert (shared["off"][m] - shared["on"][m]).abs().max() > 1e-3  # the adapters were really off


def test_rows_without_the_prefix_are_refused(tokenizer):
    from rlhfkit.models import tiny_causal_lm

    ids, mask, P, R, L = _rows(tokenizer, 1)
    ids[2, mask[2].argmax() + 3] += 1  # row 2's prefix differs at its 4th token
    with pytest.raises(ValueError, match="first 10 real tokens differ"):
        causal_logprobs(tiny_causal_lm(tokenizer), ids, mask, keep_last=R, shared_prefix=L)


def test_checkpointed_wrapped_or_short_prefixes_take_the_plain_path(tokenizer, monkeypatch):
    from rlhfkit.models import tiny_causal_lm
    from rlhfkit.models.lora import enable_gradient_checkpointing

    def boom(*a, **k):
        raise AssertionError("prefix_shared_forward ran")

    monkeypatch.setattr(forward, "prefix_shared_forward", boom)
    ids, mask, P, R, L = _rows(tokenizer, 3)
    model = tiny_causal_lm(tokenizer)
    causal_logprobs(model, ids, mask, keep_last=R, shared_prefix=forward.MIN_SHARED_PREFIX - 1)
    wrapped = torch.nn.Module()
    wrapped.module = model  # how DDP and DeepSpeed hold the model
    assert not forward.can_share_prefix(wrapped, mask)
    enable_gradient_checkpointing(model)
    model.train()
    causal_logprobs(model, ids, mask, keep_last=R, shared_prefix=L)


def test_rollout_records_the_shared_system_turn_and_cat_recomputes_it(tokenizer):
    from rlhfkit.config import RolloutSection
    from rlhfkit.models import tiny_causal_lm
    from rlhfkit.rollout import Experience, rollout
    from rlhfkit.rollout.prompts import PromptItem, render_prompt_ids

    def item(text):
        msgs = [{"role": "user", "content": text}]
        return PromptItem(render_prompt_ids(tokenizer, msgs), msgs, text)

    items = [item("Hi"), item("Write a poem about the sea."), item("Why?")]
    system = common_prefix_len([it.ids for it in items])
    assert system >= forward.MIN_SHARED_PREFIX  # the template's system turn and the user header
    exp = rollout(tiny_causal_lm(tokenizer), items, RolloutSection(n=2, max_new_tokens=3), tokenizer)
    assert exp.shared_prefix == system
    assert exp.select([4, 0]).shared_prefix == system  # minibatches keep the batch's value
    other = Experience(**{**exp.__dict__, "prompt_ids": exp.prompt_ids.roll(1, 1), "shared_prefix": 5})
    assert Experience.cat([exp, exp]).shared_prefix == system
    assert Experience.cat([exp, other]).shared_prefix < system



# --------------------------------------------------------------------------- scalar heads and SFT

@pytest.fixture()
def scalar_model(tiny_model_dir, tokenizer):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1,
                                                              pad_token_id=tokenizer.pad_token_id).float()


def _spy(monkeypatch):
    """Counts the calls that compute a shared prefix once."""
    calls = []
    real = forward.prefix_inputs
    monkeypatch.setattr(forward, "prefix_inputs", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("lora", [False, True])
def test_shared_token_values_and_gradients_equal_the_plain_forward(scalar_model, tokenizer, monkeypatch, lora):
    """The critic's and the RM's per-token values with the system turn computed once: every real
    position's value (the prefix's included, so any pooling can read them) and the gradients."""
    from rlhfkit.config import LoraSection
    from rlhfkit.models import token_values
    from rlhfkit.models.forward import shared_token_values
    from rlhfkit.models.lora import apply_lora

    model = scalar_model
    if lora:
        model = apply_lora(model, LoraSection(enabled=True, r=4, alpha=8), "SEQ_CLS")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
    model.train()
    ids, mask, P, R, L = _rows(tokenizer, 5)
    m = mask.bool()
    params = [p for p in model.parameters() if p.requires_grad]
    calls = _spy(monkeypatch)
    a = token_values(model, ids, mask)
    b = shared_token_values(model, ids, mask, L)
    assert calls == [1]
    torch.testing.assert_close(b[m], a[m], atol=1e-5, rtol=1e-5)
    weights = torch.randn(a.shape, generator=torch.Generator().manual_seed(0)) * m
    for ga, gb in zip(torch.autograd.grad((a * weights).sum(), params), torch.autograd.grad((b * weights).sum(), params)):
        torch.testing.assert_close(gb, ga, atol=1e-4, rtol=1e-4)
    shared_token_values(model, ids, mask, forward.MIN_SHARED_PREFIX - 1)  # too short to pay: the plain path
    assert calls == [1]


def test_critic_values_take_the_batch_shared_prefix(scalar_model, tokenizer, monkeypatch):
    from rlhfkit.trainers.pg_score import response_values

    ids, mask, P, R, L = _rows(tokenizer, 6)
    calls = _spy(monkeypatch)
    with torch.no_grad():
        a = response_values(scalar_model, ids, mask, R)
        b = response_values(scalar_model, ids, mask, R, shared_prefix=L)
    assert calls == [1]
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["last", "mean", "mean_all"])
def test_rm_scorer_computes_the_system_turn_once_per_batch(scalar_model, tokenizer, monkeypatch, pooling):
    """`rm:DIR` on replies to different prompts (PPO's batch, an evaluation's samples): each batch's
    common start is computed once, and every score equals the row scored alone."""
    from rlhfkit.judges.reward_model import RewardModelScorer
    from rlhfkit.models import set_reward_pooling

    set_reward_pooling(scalar_model, pooling)
    prompts = [[{"role": "user", "content": t}] for t in ("Describe a park.", "Say hi", "Write about the sea and sky.",
                                                           "Why?", "Tell me about rain at night.")]
    replies = ["It is green and calm.", "Hi!", "The sea is wide, the sky is grey.", "Because.", "Rain taps softly."]
    scorer = RewardModelScorer(scalar_model, tokenizer, batch_size=3)
    alone = [scorer([""], [r], messages=[p])[0] for p, r in zip(prompts, replies)]
    calls = _spy(monkeypatch)
    got = scorer([""] * 5, replies, messages=prompts)
    assert len(calls) == 2  # batches of 3 and 2 rows
    torch.testing.assert_close(torch.tensor(got), torch.tensor(alone), atol=1e-5, rtol=1e-5)
    assert len({round(v, 4) for v in got}) == 5


def test_common_prefix_of_rows_by_hand():
    from rlhfkit.models.forward import common_prefix_of_rows

    ids = torch.tensor([[7, 8, 9, 4, 0], [7, 8, 9, 5, 6], [0, 7, 8, 9, 3]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])  # right- and left-padded rows
    assert common_prefix_of_rows(ids, mask) == 3
    labelled = torch.zeros(3, 4, dtype=torch.bool)
    labelled[1, 2] = True  # position 2 predicts row 1's 4th token: the prefix must end before it
    assert common_prefix_of_rows(ids, mask, labelled) == 2
    assert common_prefix_of_rows(ids[:1], mask[:1]) == 0  # one row: nothing to share
    assert common_prefix_of_rows(ids[:, [1, 0, 2, 3, 4]], mask) == 0


def test_sft_loss_and_gradients_with_the_system_turn_once(tokenizer, monkeypatch, tmp_path):
    """SFT on chat rows: the labelled (response) tokens' loss and every gradient equal the plain
    forward's; a labelled token inside the prefix is refused."""
    from conftest import write_jsonl

    from rlhfkit.data import SFTCollator, load_sft, tokenize_dataset
    from rlhfkit.models import tiny_causal_lm
    from rlhfkit.models.forward import labelled_logprobs
    from rlhfkit.trainers.sft import sft_batch_loss

    model = tiny_causal_lm(tokenizer, seed=1)
    texts = [("Describe a park.", "It is green."), ("Say hi", "Hi there, friend!"), ("Why?", "Because it rains.")]
    rows = [{"prompt": p, "response": r} for p, r in texts]
    feats, _ = tokenize_dataset(tokenizer, load_sft(str(write_jsonl(tmp_path / "sft.jsonl", rows))), "sft", 96)
    batch = SFTCollator(tokenizer.pad_token_id)(feats)
    params = [p for p in model.parameters() if p.requires_grad]
    calls = _spy(monkeypatch)
    shared_loss, _, n = sft_batch_loss(model, batch, 1.0)
    shared_grads = torch.autograd.grad(shared_loss, params)
    assert calls == [1]
    monkeypatch.setattr(forward, "SHARE_PREFIX", False)
    plain_loss, _, _ = sft_batch_loss(model, batch, 1.0)
    assert calls == [1] and n > 0
    torch.testing.assert_close(shared_loss, plain_loss, atol=1e-5, rtol=1e-5)
    for ga, gb in zip(torch.autograd.grad(plain_loss, params), shared_grads):
        torch.testing.assert_close(gb, ga, atol=1e-5, rtol=1e-4)
    monkeypatch.setattr(forward, "SHARE_PREFIX", True)
    labelled = torch.zeros_like(batch["input_ids"][:, 1:], dtype=torch.bool)
    labelled[0, 3] = True
    with pytest.raises(ValueError, match="inside the shared prefix"):
        labelled_logprobs(model, batch["input_ids"], batch["attention_mask"], labelled, shared_prefix=10)


def test_the_repeated_prefix_is_a_broadcast_so_its_gradient_is_a_plain_sum(tokenizer):
    """The prefix's cache is repeated as a broadcast view (backward: a sum over rows), not a row
    selection (backward: atomic adds in thread order, not bitwise reproducible on CPU): two
    backward passes give bitwise-equal gradients."""
    from rlhfkit.models import tiny_causal_lm
    from rlhfkit.models.forward import prefix_cache

    model = tiny_causal_lm(tokenizer, seed=4)
    ids, mask, P, R, L = _rows(tokenizer, 2)
    cache = prefix_cache(model, ids[:1, mask[0].argmax():mask[0].argmax() + L], 5)
    assert all(layer.keys.shape[0] == 5 and layer.keys.stride(0) == 0 for layer in cache.layers)
    params = [p for p in model.parameters() if p.requires_grad]
    m = mask[:, P:].bool()
    grads = [torch.autograd.grad((causal_logprobs(model, ids, mask, keep_last=R, shared_prefix=L) * m).sum(), params)
             for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_common_prefix_len_leaves_every_row_a_token_of_its_own():
    assert common_prefix_len([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the shorter row is all prefix: its last token stays
    assert common_prefix_len([[5, 6], [5, 6], [5, 6]]) == 1  # identical rows
    assert common_prefix_len([[5], [5, 6]]) == 0
