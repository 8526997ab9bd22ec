"""Batches of padded rows as one row (`models.segments.rows_one_row`, the CPU path of
`causal_logprobs`, `labelled_logprobs` and `shared_token_values`): the layout by hand; log-probs,
entropies, values and gradients equal to the plain padded forward at every real token; 0 at
padding, whatever the padding holds; no row seeing another; the prefix checked."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.models import forward, segments
from rlhfkit.models.forward import causal_logprobs, labelled_logprobs, shared_token_values


def _rows(seed: int, L: int, B: int = 4):
    """B rows: left padding, the same L first tokens, a few of each row's own, right padding; the
    padding holds junk ids."""
    g = torch.Generator().manual_seed(seed)
    lead = [int(torch.randint(0, 4, (1,), generator=g)) for _ in range(B)]
    own = [int(torch.randint(2, 9, (1,), generator=g)) for _ in range(B)]
    T = max(a + L + n for a, n in zip(lead, own)) + 2
    ids = torch.randint(10, 5000, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)
    prefix = torch.randint(10, 5000, (L,), generator=g)
    for b, (a, n) in enumerate(zip(lead, own)):
        ids[b, a:a + L] = prefix
        mask[b, a:a + L + n] = 1
    return ids, mask


def _plain(monkeypatch):
    """The padded (B, T) forward, every row computing its prefix itself."""
    monkeypatch.setattr(segments, "SEGMENT_ATTENTION", False)
    monkeypatch.setattr(forward, "SHARE_PREFIX", False)


def test_rows_one_row_layout_by_hand():
    ids = torch.tensor([[0, 7, 8, 1, 2, 0],   # left-padded, 7 8 shared, then 1 2
                        [7, 8, 3, 0, 0, 0],   # right-padded, then 3
                        [0, 0, 7, 8, 4, 5]])
    mask = (ids != 0).long()
    inputs, where, plan = segments.rows_one_row(ids, mask, 2)
    assert inputs["input_ids"].tolist() == [[7, 8, 1, 2, 3, 4, 5]]
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 3, 2, 2, 3]]
    assert where.tolist() == [[-1, 0, 1, 2, 3, -1], [0, 1, 4, -1, -1, -1], [-1, -1, 0, 1, 5, 6]]
    # the prefix and row 0 one causal block; row 1 the prefix and itself; row 2 likewise, causally
    got = [((s.q0, s.q1), s.ctx, None if s.mask is None else s.mask.long().tolist()) for s in plan.segments]
    assert got == [((0, 4), ((0, 4),), None), ((4, 5), ((0, 2), (4, 5)), [[1, 1, 1]]),
                   ((5, 7), ((0, 2), (5, 7)), [[1, 1, 1, 0], [1, 1, 1, 1]])]
    # no shared prefix: every row a causal block of its own
    inputs, where, plan = segments.rows_one_row(ids, mask, 0)
    assert inputs["input_ids"].tolist() == [[7, 8, 1, 2, 7, 8, 3, 7, 8, 4, 5]]
    assert [((s.q0, s.q1), s.mask) for s in plan.segments] == [((0, 4), None), ((4, 7), None), ((7, 11), None)]
    with pytest.raises(ValueError, match="first 3 real tokens differ"):
        segments.rows_one_row(ids, mask, 3)


@pytest.mark.parametrize("L", [0, 9])
@pytest.mark.parametrize("seed", [0, 1])
def test_logprobs_entropies_and_gradients_equal_the_padded_forward(tiny_model, monkeypatch, seed, L):
    ids, mask = _rows(seed, L)
    B, T = ids.shape
    k = T - 3
    both = (mask[:, T - k - 1:T - 1] * mask[:, T - k:]).bool()  # the token and the one before it are real
    w = torch.randn(B, k, generator=torch.Generator().manual_seed(seed)) * both
    calls = []
    real = segments.rows_one_row
    monkeypatch.setattr(segments, "rows_one_row", lambda *a: calls.append(a[2]) or real(*a))
    out = []
    for one_row in (True, False):
        if not one_row:
            _plain(monkeypatch)
        tiny_model.zero_grad()
        lp, ent = causal_logprobs(tiny_model, ids, mask, keep_last=k, with_entropy=True, shared_prefix=L)
        ((lp * w).sum() + (ent * both).sum()).backward()
        out.append((lp.detach(), ent.detach(), [p.grad.clone() for p in tiny_model.parameters()]))
    assert calls == [L]  # the one-row path ran, with the prefix once
    (lp1, ent1, g1), (lp2, ent2, g2) = out
    torch.testing.assert_close(lp1[both], lp2[both], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent1[both], ent2[both], atol=1e-5, rtol=1e-5)
    assert not lp1[~both].any() and not ent1[~both].any()
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_labelled_logprobs_equal_the_padded_forward(tiny_model, monkeypatch):
    ids, mask = _rows(2, 9)
    labelled = (mask[:, :-1] * mask[:, 1:]).bool()
    labelled[:, :12] = False  # past the prefix, as SFT's response tokens
    got = labelled_logprobs(tiny_model, ids, mask, labelled, shared_prefix=9)
    _plain(monkeypatch)
    want = labelled_logprobs(tiny_model, ids, mask, labelled)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_token_values_and_gradients_equal_the_padded_forward(tiny_model_dir, tokenizer, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1,
                                                               pad_token_id=tokenizer.pad_token_id).float()
    ids, mask = _rows(3, 9)
    m = mask.bool()
    w = torch.randn(ids.shape, generator=torch.Generator().manual_seed(1)) * m
    out = []
    for one_row in (True, False):
        if not one_row:
            _plain(monkeypatch)
        model.zero_grad()
        v = shared_token_values(model, ids, mask, 9)
        (v * w).sum().backward()
        out.append((v.detach(), [p.grad.clone() for p in model.parameters()]))
    (v1, g1), (v2, g2) = out
    torch.testing.assert_close(v1[m], v2[m], atol=1e-5, rtol=1e-5)  # the prefix's values in every row too
    assert not v1[~m].any()
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_padding_and_other_rows_do_not_matter(tiny_model):
    """What the padding holds changes nothing (bitwise); new tokens in one row change that row's
    later log-probs and no other row's (a leak between segments would)."""
    ids, mask = _rows(4, 9)
    T = ids.shape[1]
    with torch.no_grad():
        before = causal_logprobs(tiny_model, ids, mask, shared_prefix=9)
        junk = torch.where(mask.bool(), ids, torch.randint(10, 5000, ids.shape))
        assert torch.equal(causal_logprobs(tiny_model, junk, mask, shared_prefix=9), before)
        changed = ids.clone()
        last = int(mask[1].nonzero()[-1])
        changed[1, last - 1] += 1
        after = causal_logprobs(tiny_model, changed, mask, shared_prefix=9)
    others = torch.ones(ids.shape[0], dtype=torch.bool)
    others[1] = False
    assert torch.equal(after[others], before[others])
    assert not torch.equal(after[1, last - 2:], before[1, last - 2:]) and torch.equal(after[1, :last - 2], before[1, :last - 2])
    assert T > last
