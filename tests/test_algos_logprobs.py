import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from rlhfkit.algos import (
    entropy_from_logits,
    sequence_logps,
    shift_for_causal,
    token_logprobs,
)

D = torch.float64


def _naive_logprobs(logits, labels):
    return torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)


def test_token_logprobs_by_hand():
    # logits [0, ln 3] -> probs [1/4, 3/4]
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(3)]]], dtype=D)
    labels = torch.tensor([[1, 0]])
    assert_close(token_logprobs(logits, labels), torch.tensor([[math.log(0.75), math.log(0.25)]], dtype=D))


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 16, 1024])
def test_token_logprobs_matches_log_softmax_gather(chunk_size):
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 5, 11
    logits = (torch.randn(B, T, V, generator=g, dtype=D) * 4).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    fast = token_logprobs(logits, labels, chunk_size=chunk_size)
    ref = _naive_logprobs(logits, labels)
    assert fast.shape == (B, T)
    assert_close(fast, ref)
    w = torch.randn(B, T, generator=g, dtype=D)
    (g_fast,) = torch.autograd.grad((fast * w).sum(), logits)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), logits)
    assert_close(g_fast, g_ref)


def test_token_logprobs_on_shifted_view_with_ignore_labels():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 9, generator=g)
    ids = torch.randint(0, 9, (2, 6), generator=g)
    ids[0, 3:] = -100  # ignore labels: clamped to 0, caller masks them
    mask = (ids != -100).long()
    lg, lab, m = shift_for_causal(logits, ids, mask)
    assert lg.shape == (2, 5, 9) and lab.shape == (2, 5) and m.shape == (2, 5)
    assert lg.data_ptr() == logits.data_ptr()  # a view, not a copy
    assert_close(token_logprobs(lg, lab, chunk_size=4), _naive_logprobs(lg, lab))
    assert_close(lab, ids[:, 1:])


def test_token_logprobs_half_precision_upcasts():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 50, generator=g) * 5
    labels = torch.randint(0, 50, (2, 4), generator=g)
    out = token_logprobs(logits.to(torch.bfloat16), labels)
    assert out.dtype == torch.float32
    ref = _naive_logprobs(logits.to(torch.bfloat16).float(), labels)
    assert_close(out, ref)


def test_entropy_by_hand_and_vs_naive():
    V = 8
    uniform = torch.zeros(1, 2, V, dtype=D)
    assert_close(entropy_from_logits(uniform), torch.full((1, 2), math.log(V), dtype=D))
    peaked = torch.tensor([[[1000.0, 0.0, 0.0]]], dtype=D)  # essentially one-hot: H ~ 0
    assert entropy_from_logits(peaked).abs().item() < 1e-12
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 7, 13, generator=g, dtype=D) * 3
    logp = torch.log_softmax(logits, -1)
    naive = -(logp.exp() * logp).sum(-1)
    for cs in (1, 5, 100):
        assert_close(entropy_from_logits(logits, chunk_size=cs), naive)


def test_sequence_logps():
    lp = torch.tensor([[-1.0, -2.0, float("nan")], [-0.5, -0.5, -0.5], [0.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    assert_close(sequence_logps(lp, m), torch.tensor([-3.0, -1.5, 0.0]))
    assert_close(sequence_logps(lp, m, average=True), torch.tensor([-1.5, -0.5, 0.0]))


def test_sft_style_cross_entropy_agrees_with_torch():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 6, 9, generator=g, dtype=D)
    ids = torch.randint(0, 9, (2, 6), generator=g)
    lg, lab, _ = shift_for_causal(logits, ids, torch.ones_like(ids))
    ce = F.cross_entropy(lg.reshape(-1, 9), lab.reshape(-1), reduction="none").view(2, 5)
    assert_close(-token_logprobs(lg, lab), ce)


def test_temperature_by_hand():
    # logits [0, 2 ln 3] at T = 2 -> [0, ln 3] -> probs [1/4, 3/4]; entropy of (1/4, 3/4)
    logits = torch.tensor([[[0.0, 2 * math.log(3)]]], dtype=D)
    assert_close(token_logprobs(logits, torch.tensor([[1]]), temperature=2.0),
                 torch.tensor([[math.log(0.75)]], dtype=D))
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert_close(entropy_from_logits(logits, temperature=2.0), torch.tensor([[h]], dtype=D))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.6])
def test_tempered_logprobs_and_entropy_match_naive_with_gradients(dtype, temperature):
    """softmax(logits / T), in blocks: values and gradients as the naive full log_softmax of the
    upcast, divided logits gives (the division happens per block, after the upcast)."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 6, 13, generator=g, dtype=D) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, 13, (2, 6), generator=g)
    z = logits.to(torch.float64 if dtype == D else torch.float32) / temperature
    tol = dict(atol=1e-5, rtol=1e-5) if dtype != D else {}
    fast = token_logprobs(logits, labels, chunk_size=4, temperature=temperature)
    assert_close(fast, _naive_logprobs(z, labels), **tol)
    assert_close(entropy_from_logits(logits, chunk_size=4, temperature=temperature),
                 -(z.softmax(-1) * z.log_softmax(-1)).sum(-1), **tol)
    (g_fast,) = torch.autograd.grad(fast.sum(), logits)
    (g_ref,) = torch.autograd.grad(_naive_logprobs(z, labels).sum(), logits)
    assert_close(g_fast, g_ref, **tol)
