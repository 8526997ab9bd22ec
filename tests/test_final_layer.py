"""The last decoder layer run only where its output is read (`models.final_layer`): the keys each
read position may see equal the packed layout's mask; log-probs, reward scores and gradients equal
the full forward's; the layer's products really run on the read positions only; layers of
another layout run in full."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_rm_packing import _batches, rm  # noqa: F401  (fixture)
from test_segments import _groups, _packed

from rlhfkit.models import final_layer, segments, set_reward_pooling
from rlhfkit.models.forward import labelled_logprobs
from rlhfkit.models.packing import packed_logprobs
from rlhfkit.trainers.reward import pair_scores


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), prefix=st.sampled_from([0, 3, 9]), n_groups=st.integers(1, 4))
def test_key_rows_are_the_packed_mask_in_the_row(seed, prefix, n_groups):
    """Every real token of the packed batch attends, in the one-row layout, to exactly the row
    positions of the tokens the K-row mask (`pack_groups`' "allowed") lets it see."""
    groups, rows = _groups(seed, prefix, n_groups)
    packed = _packed(groups, rows)
    _, where, plan = segments.one_row(packed)
    (T, L), n_row = (packed["input_ids"].shape[1], packed["shared_prefix"]), plan.segments[-1].q1
    keys = plan.key_rows(torch.arange(n_row))

    def at(k: int, t: int) -> int:  # the row position of token t of packed sequence k
        return t if t < L else int(where[k * T + t])

    for k, (p, lengths) in enumerate(packed["lengths"]):
        for t in range(L if k else 0, p + sum(lengths)):  # the shared prefix is in the row once
            allowed = packed["allowed"][k, 0, t, :p + sum(lengths)].nonzero()[:, 0].tolist()
            assert keys[at(k, t)].nonzero()[:, 0].tolist() == sorted(at(k, u) for u in allowed)


def _q_rows(model):
    """The number of rows the last layer's query projection saw, per forward (a hook)."""
    seen: list[int] = []
    layer = final_layer.last_layer(model)
    handle = layer.self_attn.q_proj.register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[-2]))
    return seen, handle


def _grads(model):
    return [p.grad.clone() if p.grad is not None else None for p in model.parameters()]


def _close_grads(a, b):
    for x, y in zip(a, b):
        if x is None or y is None:
            assert x is None and y is None
        else:
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


def test_packed_logprobs_and_gradients_equal_the_full_last_layer(tiny_model, monkeypatch):
    """Responses that share their prompt's last token as their first predictor (a position read
    several times) included: counted once, so the gradients equal the full layer's."""
    groups, rows = _groups(0, prefix=9)
    packed = _packed(groups, rows)
    w = torch.randn(packed["shape"], generator=torch.Generator().manual_seed(0))
    out, seen = {}, {}
    for on in (True, False):
        monkeypatch.setattr(final_layer, "ENABLED", on)
        tiny_model.zero_grad()
        seen[on], handle = _q_rows(tiny_model)
        try:
            lp, ent = packed_logprobs(tiny_model, packed, with_entropy=True)
        finally:
            handle.remove()
        ((lp * w).sum() + ent.sum()).backward()
        out[on] = (lp.detach(), ent.detach(), _grads(tiny_model))
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[True][1], out[False][1], atol=1e-5, rtol=1e-5)
    _close_grads(out[True][2], out[False][2])
    n_row = segments.one_row(packed)[2].segments[-1].q1
    assert seen[False] == [n_row]
    assert seen[True] == [len(set(packed["pred"].tolist()))] and seen[True][0] < n_row


def test_labelled_logprobs_of_padded_rows_equal_the_full_last_layer(tiny_model, monkeypatch):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(10, 5000, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[2, -3:] = 0  # right padding
    labelled = torch.zeros(3, 11, dtype=torch.bool)
    labelled[:, 6:] = True
    labelled &= mask[:, 1:].bool() & mask[:, :-1].bool()
    out, seen = {}, {}
    for on in (True, False):
        monkeypatch.setattr(final_layer, "ENABLED", on)
        tiny_model.zero_grad()
        seen[on], handle = _q_rows(tiny_model)
        try:
            lp = labelled_logprobs(tiny_model, ids, mask, labelled)
        finally:
            handle.remove()
        (lp * torch.linspace(-1, 1, lp.numel())).sum().backward()
        out[on] = (lp.detach(), _grads(tiny_model))
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-5, rtol=1e-5)
    _close_grads(out[True][1], out[False][1])
    assert seen[True] == [int(labelled.sum())] and seen[False] == [int(mask.sum())]


def test_reward_read_at_the_last_token_runs_the_last_layer_on_those_tokens_only(rm, tokenizer, tmp_path,  # noqa: F811
                                                                                monkeypatch):
    """pair_scores with "last" pooling: the last layer runs on one token per sequence, and scores
    and gradients equal the full layer's; "mean" runs it on the response tokens."""
    _, packed = _batches(tmp_path, tokenizer, seed=1)
    n_seq = packed["input_ids"].shape[0]
    n_resp = int(packed["loss_mask"].sum())
    for pooling, rows_read in (("last", n_seq), ("mean", n_resp)):
        set_reward_pooling(rm, pooling)
        out, seen = {}, {}
        for on in (True, False):
            monkeypatch.setattr(final_layer, "ENABLED", on)
            rm.zero_grad()
            seen[on], handle = _q_rows(rm)
            try:
                rc, rr = pair_scores(rm, packed)
            finally:
                handle.remove()
            (rc - 2 * rr).sum().backward()
            out[on] = (rc.detach(), rr.detach(), _grads(rm))
        torch.testing.assert_close(out[True][0], out[False][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[True][1], out[False][1], atol=1e-5, rtol=1e-5)
        _close_grads(out[True][2], out[False][2])
        assert seen[True] == [rows_read] and seen[True][0] < seen[False][0], pooling


def test_a_layer_of_another_layout_runs_in_full(tiny_model, monkeypatch):
    """A decoder layer that is not laid out as Llama's (here: its class not in LAYOUTS) is not
    touched: the query projection sees the whole row."""
    monkeypatch.setattr(final_layer, "LAYOUTS", ())
    groups, rows = _groups(1, prefix=0)
    packed = _packed(groups, rows)
    seen, handle = _q_rows(tiny_model)
    try:
        with torch.no_grad():
            packed_logprobs(tiny_model, packed)
    finally:
        handle.remove()
    assert seen == [segments.one_row(packed)[2].segments[-1].q1]
    assert not final_layer.supported(final_layer.last_layer(tiny_model))


def test_critic_values_read_at_the_response_states_only(rm, monkeypatch):  # noqa: F811
    """`shared_token_values` with ``read``: the values there (and their gradients) are the full
    forward's, 0 at every other position, and the last layer runs on the read positions."""
    from rlhfkit.models.forward import shared_token_values

    g = torch.Generator().manual_seed(4)
    ids = torch.randint(10, 5000, (3, 14), generator=g)
    ids[:, :9] = ids[0, :9]  # a shared prefix of 9 tokens, as a chat template's system turn
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    read = torch.zeros_like(mask, dtype=torch.bool)
    read[:, 10:] = True
    read &= mask.bool()
    out, seen = {}, {}
    for on in (True, False):
        monkeypatch.setattr(final_layer, "ENABLED", on)
        rm.zero_grad()
        seen[on], handle = _q_rows(rm)
        try:
            v = shared_token_values(rm, ids, mask, shared_prefix=9, read=read if on else None)
        finally:
            handle.remove()
        (v * read * torch.linspace(-1, 1, v.numel()).view(v.shape)).sum().backward()
        out[on] = (v.detach(), _grads(rm))
    torch.testing.assert_close(out[True][0][read], out[False][0][read], atol=1e-5, rtol=1e-5)
    assert not out[True][0][~read].any()
    _close_grads(out[True][1], out[False][1])
    assert seen[True] == [int(read.sum())] and seen[False] == [9 + int((mask[:, 9:]).sum())]


def test_reward_model_scorer_scores_equal_the_full_last_layer(rm, tokenizer, monkeypatch):  # noqa: F811
    """`rm:DIR` scoring (packed groups and rows on their own, "last" and "mean") gives the full
    forward's scores."""
    from rlhfkit.judges.reward_model import RewardModelScorer

    scorer = RewardModelScorer(rm.eval(), tokenizer, batch_size=4)
    msgs = [[{"role": "user", "content": c}] for c in ("Say hi.", "Say hi.", "Name a colour.", "Count to three.")]
    replies = ["Hi there!", "Hello.", "Blue, like the sea.", "One, two, three."]
    for pooling in ("last", "mean"):
        set_reward_pooling(rm, pooling)
        got = {}
        for on in (True, False):
            monkeypatch.setattr(final_layer, "ENABLED", on)
            with torch.no_grad():
                got[on] = scorer([m[0]["content"] for m in msgs], replies, msgs)
        assert got[True] == pytest.approx(got[False], abs=1e-5), pooling
