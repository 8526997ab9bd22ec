import math

import pytest
import torch
from torch.testing import assert_close

from rlhfkit.algos import (
    agg_loss,
    explained_variance,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

D = torch.float64


def _garbage(x, mask, value=float("nan")):
    return torch.where(mask.bool(), x, torch.full_like(x, value))


# --- 1. hand-computed values -------------------------------------------------------------------

def test_masked_sum_mean_var_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]], dtype=D)
    m = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert masked_sum(x, m).item() == 10.0  # 1+2+3+4
    assert masked_mean(x, m).item() == 2.5
    assert_close(masked_mean(x, m, dim=-1), torch.tensor([2.0, 4.0], dtype=D))
    # deviations from 2.5: -1.5 -0.5 0.5 1.5 -> squares sum 5; unbiased 5/3, biased 5/4
    assert_close(masked_var(x, m), torch.tensor(5 / 3, dtype=D))
    assert_close(masked_var(x, m, unbiased=False), torch.tensor(5 / 4, dtype=D))


def test_empty_selection_is_zero_not_nan():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=D)
    m = torch.tensor([[0, 0], [1, 1]])
    assert_close(masked_mean(x, m, dim=-1), torch.tensor([0.0, 3.5], dtype=D))
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0
    assert masked_var(x, torch.tensor([[1, 0], [0, 0]])).item() == 0.0


def test_agg_loss_modes_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]], dtype=D)
    m = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert agg_loss(loss, m, "token-mean").item() == 2.5  # 10 / 4 tokens
    assert agg_loss(loss, m, "seq-mean-token-sum").item() == 5.0  # (6 + 4) / 2
    assert agg_loss(loss, m, "seq-mean-token-mean").item() == 3.0  # (2 + 4) / 2
    assert agg_loss(loss, m, "token-mean", normalizer=8).item() == 10 / 8
    assert agg_loss(loss, m, "seq-mean-token-mean", normalizer=4).item() == 6 / 4
    with pytest.raises(ValueError):
        agg_loss(loss, m, "bogus")


def test_explained_variance_by_hand():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=D)
    m = torch.ones(1, 4)
    assert explained_variance(returns, returns, m).item() == 1.0
    mean_pred = torch.full_like(returns, 2.5)
    assert abs(explained_variance(mean_pred, returns, m).item()) < 1e-12
    # a constant offset leaves a zero-variance residual: EV 1
    assert explained_variance(returns - 1, returns, m).item() == 1.0
    assert math.isnan(explained_variance(returns, torch.ones_like(returns), m).item())


# --- 3. invariances -----------------------------------------------------------------------------

def test_whiten_mean_zero_var_one_on_valid_entries():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 9, generator=g, dtype=D) * 3 + 5
    m = torch.rand(6, 9, generator=g) > 0.3
    w = masked_whiten(x, m)
    assert abs(masked_mean(w, m).item()) < 1e-10
    assert abs(masked_var(w, m).item() - 1) < 1e-6
    assert (w[~m] == 0).all()
    # shift_mean=False keeps the original mean, spread normalised
    w2 = masked_whiten(x, m, shift_mean=False)
    assert_close(masked_mean(w2, m), masked_mean(x, m))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e30])
def test_masked_positions_never_matter(value):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 7, generator=g, dtype=D)
    m = torch.rand(4, 7, generator=g) > 0.4
    xg = _garbage(x, m, value)
    assert_close(masked_sum(xg, m), masked_sum(x, m))
    assert_close(masked_mean(xg, m, dim=1), masked_mean(x, m, dim=1))
    assert_close(masked_var(xg, m), masked_var(x, m))
    assert_close(masked_whiten(xg, m), masked_whiten(x, m))
    for mode in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"):
        assert_close(agg_loss(xg, m, mode), agg_loss(x, m, mode))
    r = torch.randn(4, 7, generator=g, dtype=D)
    assert_close(explained_variance(xg, _garbage(r, m, value), m), explained_variance(x, r, m))


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_agg_loss_micro_batches_with_global_normalizer_equal_full_batch(mode):
    # batch 8 x accumulation 1 == batch 1 x accumulation 8, for the loss and for the gradient.
    g = torch.Generator().manual_seed(2)
    B, T = 8, 11
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    m = torch.arange(T)[None, :] < lengths[:, None]  # ragged right padding
    w = torch.randn(B, T, generator=g, dtype=D, requires_grad=True)

    full = agg_loss(w.square(), m, mode)
    (full_grad,) = torch.autograd.grad(full, w)

    norm = m.sum().item() if mode == "token-mean" else B
    total, grad = 0.0, torch.zeros_like(w)
    for i in range(B):
        part = agg_loss(w[i : i + 1].square(), m[i : i + 1], mode, normalizer=norm)
        total = total + part
        grad += torch.autograd.grad(part, w)[0]
    assert_close(total, full)
    assert_close(grad, full_grad)
    if mode != "token-mean":  # seq-mean is naturally micro-batch invariant; token-mean is not
        return
    naive = sum(agg_loss(w[i : i + 1].square(), m[i : i + 1], mode) for i in range(B)) / B
    assert not torch.allclose(naive, full)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_statistics_are_reduced_in_float32(dtype):
    """bf16 sums of thousands of tokens lose the third digit and an fp16 count overflows at 65504:
    the statistics are the fp64 ones rounded once to the input's dtype."""
    from rlhfkit.algos import agg_loss, masked_mean, masked_var, masked_whiten

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3000, generator=gen, dtype=torch.float64) * 3 + 100
    m = torch.rand(4, 3000, generator=gen) > 0.1
    xl = x.to(dtype)
    ref = xl.double()[m]  # the values as the input holds them
    assert masked_mean(xl, m) == ref.mean().to(dtype)
    torch.testing.assert_close(masked_var(xl, m).double(), ref.var(), rtol=1e-2, atol=0)
    w = masked_whiten(xl, m).double()[m]
    assert abs(float(w.mean())) < 0.01 and abs(float(w.std()) - 1) < 0.01
    ones = torch.ones(1, 70000, dtype=dtype)
    assert float(agg_loss(ones, torch.ones(1, 70000))) == 1.0 and float(masked_mean(ones, torch.ones(1, 70000))) == 1.0
