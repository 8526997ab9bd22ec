"""Packed batches as one row with per-segment attention (`models.segments`): the layout by hand,
log-probs, entropies and gradients equal to the K-row packing and to every row on its own, no
token seeing another segment, and the attention implementation switched for the forward only."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.models import segments
from rlhfkit.models.forward import causal_logprobs, common_prefix_len
from rlhfkit.models.packing import pack_groups, packed_logprobs


def _groups(seed: int, prefix: int, n_groups: int = 3):
    """Groups of (prompt, [(row, response), ...]): prompts start with the same ``prefix`` tokens,
    then 1-6 tokens of their own; 1-4 responses of 1-7 tokens each."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(10, 5000, (n,), generator=g)  # noqa: E731
    head, groups, row = rand(prefix), [], 0
    for _ in range(n_groups):
        prompt = torch.cat([head, rand(int(torch.randint(1, 7, (1,), generator=g)))])
        responses = []
        for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
            responses.append((row, rand(int(torch.randint(1, 8, (1,), generator=g)))))
            row += 1
        groups.append((prompt, responses))
    return groups, row


def _packed(groups, rows):
    return pack_groups(groups, (rows, max(r.shape[0] for _, rs in groups for _, r in rs)), pad_token_id=0)


def _alone(model, groups, rows, R):
    """(rows, R) log-probs and entropies of every [prompt; response] row on its own."""
    lp, ent = torch.zeros(rows, R), torch.zeros(rows, R)
    for prompt, responses in groups:
        for b, resp in responses:
            ids = torch.cat([prompt, resp])[None]
            a, e = causal_logprobs(model, ids, torch.ones_like(ids), keep_last=resp.shape[0], with_entropy=True)
            lp[b, :resp.shape[0]], ent[b, :resp.shape[0]] = a[0], e[0]
    return lp, ent


def test_one_row_layout_by_hand():
    A, B = torch.tensor([1, 2, 3, 4, 5]), torch.tensor([1, 2, 3, 6])
    groups = [(A, [(0, torch.tensor([10, 11])), (1, torch.tensor([12]))]), (B, [(2, torch.tensor([13, 14, 15]))])]
    packed = _packed(groups, 3)
    assert packed["shared_prefix"] == common_prefix_len([A.tolist(), B.tolist()]) == 3
    assert packed["lengths"] == [(5, [2, 1]), (4, [3])] and packed["input_ids"].shape == (2, 8)
    inputs, where, plan = segments.one_row(packed)
    assert inputs["input_ids"].tolist() == [[1, 2, 3, 4, 5, 10, 11, 12, 6, 13, 14, 15]]
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 5, 3, 4, 5, 6]]
    # (queries, key ranges, mask): the prefix and A's prompt one causal block; A's first reply
    # continues it; A's second sees the prompt and itself; B's prompt the prefix and itself; B's
    # reply the prefix, B's prompt and itself, causally
    lower_right = lambda q, k: torch.ones(q, k, dtype=torch.bool).tril(k - q)  # noqa: E731
    want = [((0, 5), ((0, 5),), None), ((5, 7), ((0, 7),), lower_right(2, 7)),
            ((7, 8), ((0, 5), (7, 8)), torch.ones(1, 6, dtype=torch.bool)),
            ((8, 9), ((0, 3), (8, 9)), torch.ones(1, 4, dtype=torch.bool)),
            ((9, 12), ((0, 3), (8, 12)), lower_right(3, 7))]
    assert len(plan.segments) == len(want)
    for s, (q, ctx, mask) in zip(plan.segments, want):
        assert ((s.q0, s.q1), s.ctx) == (q, ctx)
        assert (s.mask is None) if mask is None else torch.equal(s.mask, mask)
    # key blocks cut at every boundary: [0,3) [3,5) [5,7) [7,8) [8,9) [9,12)
    assert plan.sizes == [3, 2, 2, 1, 1, 3]
    assert plan.uses == [(0, 1), (0, 1, 2), (0, 1, 3), (0, 4), (0, 4, 5)]
    # every response token and the token before it land where their values are in the row
    row = inputs["input_ids"][0]
    assert row[where[packed["own"]]].tolist() == packed["target"].tolist() == [10, 11, 12, 13, 14, 15]
    assert row[where[packed["pred"]]].tolist() == [5, 10, 5, 6, 13, 14]


@pytest.mark.parametrize("prefix", [0, 9])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_row_equals_k_rows_and_rows_alone(tiny_model, monkeypatch, seed, prefix):
    """Log-probs and entropies as every row alone, and gradients as the K-row packing, with and
    without a shared prefix; the one-row layout is the one that runs."""
    groups, rows = _groups(seed, prefix)
    packed = _packed(groups, rows)
    assert packed["shared_prefix"] == (prefix if prefix else 0)
    calls = []
    real = segments.one_row
    monkeypatch.setattr(segments, "one_row", lambda *a: calls.append(1) or real(*a))
    w = torch.randn(packed["shape"], generator=torch.Generator().manual_seed(seed))
    out = {}
    for on in (True, False):
        monkeypatch.setattr(segments, "SEGMENT_ATTENTION", on)
        tiny_model.zero_grad()
        lp, ent = packed_logprobs(tiny_model, packed, with_entropy=True)
        ((lp * w).sum() + ent.sum()).backward()
        out[on] = (lp.detach(), ent.detach(), [p.grad.clone() for p in tiny_model.parameters()])
    assert calls == [1]
    with torch.no_grad():
        lp_alone, ent_alone = _alone(tiny_model, groups, rows, packed["shape"][1])
    (lp1, ent1, g1), (lp2, ent2, g2) = out[True], out[False]
    torch.testing.assert_close(lp1, lp_alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent1, ent_alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp1, lp2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent1, ent2, atol=1e-5, rtol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("one_row", [True, False])
def test_an_empty_response_in_a_group_gives_zeros_and_moves_nothing(tiny_model, monkeypatch, one_row):
    """A response of no tokens has no log-prob to predict: its row is 0 and every other response's
    log-probs are those of the rows alone, in both layouts (a stray prediction for it would shift
    every later response's targets)."""
    monkeypatch.setattr(segments, "SEGMENT_ATTENTION", one_row)
    groups, rows = _groups(5, prefix=9)
    prompt, responses = groups[0]
    groups[0] = (prompt, [(rows, torch.zeros(0, dtype=torch.long)), *responses])  # an empty row first
    packed = _packed(groups, rows + 1)
    assert len(packed["pred"]) == len(packed["target"])
    with torch.no_grad():
        lp = packed_logprobs(tiny_model, packed)
        want, _ = _alone(tiny_model, [(p, [(b, r) for b, r in rs if r.numel()]) for p, rs in groups], rows + 1,
                         packed["shape"][1])
    assert not lp[rows].any()
    torch.testing.assert_close(lp, want, atol=1e-5, rtol=1e-5)


def test_one_row_equals_k_rows_in_bfloat16(tiny_model):
    """The additive masks are made in the model's dtype: a bf16 model gives the K-row log-probs
    to bf16 rounding (a mask made in fp32, or a -inf in the wrong place, would not)."""
    import copy

    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    groups, rows = _groups(4, prefix=9)
    packed = _packed(groups, rows)
    out = {}
    with torch.no_grad():
        for on in (True, False):
            segments.SEGMENT_ATTENTION = on
            try:
                out[on] = packed_logprobs(model, packed).float()
            finally:
                segments.SEGMENT_ATTENTION = True
    torch.testing.assert_close(out[True], out[False], atol=0.1, rtol=0.02)
    inputs, _, plan = segments.one_row(packed)
    masks = plan.additive(torch.bfloat16)
    assert masks is plan.additive(torch.bfloat16)  # made once per forward, not per layer
    for s, m in zip(plan.segments, masks):
        assert (m is None) == (s.mask is None)
        if m is not None:
            assert m.dtype == torch.bfloat16 and torch.equal(m == 0, s.mask) and bool(torch.isinf(m[~s.mask]).all())


def test_no_token_sees_another_segment(tiny_model):
    """New tokens in one response change its own later log-probs and nothing else: not its group's
    other responses, not another group (a leak through the segment masks would)."""
    groups, rows = _groups(3, prefix=9)
    (prompt, responses) = groups[1]
    b, resp = responses[0]
    assert resp.shape[0] >= 2
    changed = [(p, [(r, x.flip(0) + 7 if r == b else x) for r, x in rs]) for p, rs in groups]
    with torch.no_grad():
        before = packed_logprobs(tiny_model, _packed(groups, rows))
        after = packed_logprobs(tiny_model, _packed(changed, rows))
    others = torch.ones(rows, dtype=torch.bool)
    others[b] = False
    torch.testing.assert_close(after[others], before[others], atol=1e-6, rtol=0)
    assert not torch.allclose(after[b, 1:resp.shape[0]], before[b, 1:resp.shape[0]])


def test_only_plain_single_process_cpu_models_use_it(tiny_model, monkeypatch):
    cpu = torch.device("cpu")
    assert segments.usable(tiny_model, cpu)
    assert not segments.usable(tiny_model, torch.device("meta"))
    monkeypatch.setattr(segments, "SEGMENT_ATTENTION", False)
    assert not segments.usable(tiny_model, cpu)
    monkeypatch.setattr(segments, "SEGMENT_ATTENTION", True)
    tiny_model.config.sliding_window = 4
    assert not segments.usable(tiny_model, cpu)
    tiny_model.config.sliding_window = None
    tiny_model.activation_checkpointing_enable()
    assert not segments.usable(tiny_model, cpu)


def test_the_attention_implementation_is_restored_even_when_the_forward_fails(tiny_model):
    groups, rows = _groups(4, prefix=9)
    packed = _packed(groups, rows)
    packed_logprobs(tiny_model, packed)
    assert tiny_model.config._attn_implementation == "sdpa"
    handle = tiny_model.model.layers[-1].register_forward_hook(lambda *a: (_ for _ in ()).throw(ValueError("boom")))
    with pytest.raises(ValueError, match="boom"):
        packed_logprobs(tiny_model, packed)
    handle.remove()
    assert tiny_model.config._attn_implementation == "sdpa"
    q = torch.zeros(1, 4, 3, 16)
    with pytest.raises(RuntimeError, match="inside segments.attending"):
        segments.attention(None, q, q[:, :2], q[:, :2], None)
    _, _, plan = segments.one_row(packed)
    with segments.attending(tiny_model, plan), pytest.raises(RuntimeError, match="sliding windows"):
        segments.attention(None, q, q[:, :2], q[:, :2], None, sliding_window=2)
