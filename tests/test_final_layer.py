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


def _on_and_off(model, monkeypatch, forward, loss) -> dict:
    """``forward(on)`` with the last layer where read (on) and in full (off), each followed by the
    backward of ``loss(outputs)``: per flag, (the outputs detached, the gradients, the rows the last
    layer's query projection saw per forward)."""
    out = {}
    for on in (True, False):
        monkeypatch.setattr(final_layer, "ENABLED", on)
        model.zero_grad()
        seen, handle = _q_rows(model)
        try:
            outputs = forward(on)
        finally:
            handle.remove()
        loss(outputs).backward()
        out[on] = ([o.detach() for o in outputs], _grads(model), seen)
    return out


def _same(got: dict, where=None) -> None:
    """The outputs (at ``where``, if given) and the gradients of the two runs agree."""
    for a, b in zip(got[True][0], got[False][0]):
        torch.testing.assert_close(a if where is None else a[where], b if where is None else b[where],
                                   atol=1e-5, rtol=1e-5)
    for x, y in zip(got[True][1], got[False][1]):
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
    got = _on_and_off(tiny_model, monkeypatch, lambda on: packed_logprobs(tiny_model, packed, with_entropy=True),
                      lambda out: (out[0] * w).sum() + out[1].sum())
    _same(got)
    n_row = segments.one_row(packed)[2].segments[-1].q1
    assert got[False][2] == [n_row]
    assert got[True][2] == [len(set(packed["pred"].tolist()))] and got[True][2][0] < n_row


def test_labelled_logprobs_of_padded_rows_equal_the_full_last_layer(tiny_model, monkeypatch):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(10, 5000, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[2, -3:] = 0  # right padding
    labelled = torch.zeros(3, 11, dtype=torch.bool)
    labelled[:, 6:] = True
    labelled &= mask[:, 1:].bool() & mask[:, :-1].bool()
    got = _on_and_off(tiny_model, monkeypatch, lambda on: (labelled_logprobs(tiny_model, ids, mask, labelled),),
                      lambda out: (out[0] * torch.linspace(-1, 1, out[0].numel())).sum())
    _same(got)
    assert got[True][2] == [int(labelled.sum())] and got[False][2] == [int(mask.sum())]


def test_reward_read_at_the_last_token_runs_the_last_layer_on_those_tokens_only(rm, tokenizer, tmp_path,  # noqa: F811
                                                                                monkeypatch):
    """pair_scores with "last" pooling: the last layer runs on one token per sequence, and scores
    and gradients equal the full layer's; "mean" runs it on the response tokens."""
    _, packed = _batches(tmp_path, tokenizer, seed=1)
    n_seq = packed["input_ids"].shape[0]
    n_resp = int(packed["loss_mask"].sum())
    for pooling, rows_read in (("last", n_seq), ("mean", n_resp)):
        set_reward_pooling(rm, pooling)
        got = _on_and_off(rm, monkeypatch, lambda on: pair_scores(rm, packed), lambda out: (out[0] - 2 * out[1]).sum())
        _same(got)
        assert got[True][2] == [rows_read] and got[True][2][0] < got[False][2][0], pooling


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
    got = _on_and_off(rm, monkeypatch, lambda on: (shared_token_values(rm, ids, mask, shared_prefix=9,
                                                                         read=read if on else None),),
                      lambda out: (out[0] * read * torch.linspace(-1, 1, out[0].numel()).view(out[0].shape)).sum())
    _same(got, where=read)
    assert not got[True][0][0][~read].any()
    assert got[True][2] == [int(read.sum())] and got[False][2] == [9 + int((mask[:, 9:]).sum())]


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
