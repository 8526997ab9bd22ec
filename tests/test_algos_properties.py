"""Property tests (hypothesis) for the functions whose inputs have shape: masked values never matter,
extra padding changes nothing, micro-batches with the global normalizer add up to the full batch
in every aggregation mode, and a few algebraic identities."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from rlhfkit.algos import (
    agg_loss,
    bias_corrected_kl,
    bradley_terry_loss,
    dpo_loss,
    expand_to_tokens,
    kl_estimate,
    kl_penalized_scores,
    masked_whiten,
    pairwise_accuracy,
    ppo_policy_loss,
    sequence_policy_loss,
)
from rlhfkit.algos.stats import AGG_MODES

D = torch.float64
DTYPES = st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16])  # every dtype trained in
GARBAGE = st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e6])
SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def batches(draw, max_b=5, max_t=7):
    """A (B, T) batch: four tensors of moderate values, of any dtype the trainers compute in, and a
    mask with any layout."""
    B, T = draw(st.integers(1, max_b)), draw(st.integers(1, max_t))
    seed, dtype = draw(st.integers(0, 2**31 - 1)), draw(DTYPES)
    g = torch.Generator().manual_seed(seed)
    x = [(torch.randn(B, T, generator=g, dtype=D) * 0.5).to(dtype) for _ in range(4)]
    mask = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=T, max_size=T), min_size=B, max_size=B)))
    return x, mask


def _fill(garbage, dtype):
    """Garbage representable in ``dtype`` (1e6 is past float16's largest finite value)."""
    return garbage if not math.isfinite(garbage) else min(garbage, torch.finfo(dtype).max)


def _dirty(x, mask, garbage):
    return torch.where(mask, x, torch.full_like(x, _fill(garbage, x.dtype)))


def _pad(x, mask, k, garbage):
    B = x.shape[0]
    padded = torch.cat([x, torch.full((B, k), _fill(garbage, x.dtype), dtype=x.dtype)], 1)
    return padded, torch.cat([mask, torch.zeros(B, k, dtype=torch.bool)], 1)


def _loss_and_grad(fn, logp, *args, **kw):
    logp = logp.clone().requires_grad_()
    loss, metrics = fn(logp, *args, **kw)
    return loss, torch.autograd.grad(loss, logp)[0], metrics


@SETTINGS
@given(b=batches(), garbage=GARBAGE, agg=st.sampled_from(AGG_MODES), k=st.integers(1, 3))
def test_ppo_loss_ignores_masked_values_and_padding(b, garbage, agg, k):
    (logp, old, adv, _), m = b
    old = logp + 0.3 * old
    clean = _loss_and_grad(ppo_policy_loss, logp, old, adv, m, agg=agg)
    dirty = _loss_and_grad(ppo_policy_loss, _dirty(logp, m, garbage), _dirty(old, m, garbage),
                           _dirty(adv, m, garbage), m, agg=agg)
    assert_close(dirty[0], clean[0])
    assert_close(torch.where(m, dirty[1], 0.0), clean[1])
    assert torch.isfinite(dirty[1]).all()
    (lp, mp), (op, _), (ap, _) = (_pad(x, m, k, garbage) for x in (logp, old, adv))
    padded = _loss_and_grad(ppo_policy_loss, lp, op, ap, mp, agg=agg)
    assert_close(padded[0], clean[0])
    assert_close(padded[1][:, : m.shape[1]], clean[1])
    for key in ("clipfrac", "approx_kl", "ratio_mean"):  # approx_kl_trl counts padding on purpose
        assert_close(padded[2][key], clean[2][key])


@SETTINGS
@given(b=batches(), garbage=GARBAGE, kind=st.sampled_from(["sum", "mean"]), k=st.integers(1, 3))
def test_sequence_loss_ignores_masked_values_and_padding(b, garbage, kind, k):
    (logp, old, adv, _), m = b
    old, seq_adv = logp + 0.2 * old, adv[:, 0]
    clean = _loss_and_grad(sequence_policy_loss, logp, old, seq_adv, m, log_ratio=kind)
    dirty = _loss_and_grad(sequence_policy_loss, _dirty(logp, m, garbage), _dirty(old, m, garbage),
                           seq_adv, m, log_ratio=kind)
    assert_close(dirty[0], clean[0])
    assert_close(torch.where(m, dirty[1], 0.0), clean[1])
    (lp, mp), (op, _) = (_pad(x, m, k, garbage) for x in (logp, old))
    padded = _loss_and_grad(sequence_policy_loss, lp, op, seq_adv, mp, log_ratio=kind)
    assert_close(padded[0], clean[0])
    for key in clean[2]:
        assert_close(padded[2][key], clean[2][key])


@SETTINGS
@given(b=batches(max_b=8), agg=st.sampled_from(AGG_MODES), cut=st.integers(1, 7))
def test_micro_batches_with_global_normalizer_add_up(b, agg, cut):
    (loss_mat, _, _, _), m = b
    B = loss_mat.shape[0]
    cut = min(cut, B)
    norm = m.sum().clamp(min=1).item() if agg == "token-mean" else B
    parts = agg_loss(loss_mat[:cut], m[:cut], agg, normalizer=norm)
    if cut < B:
        parts = parts + agg_loss(loss_mat[cut:], m[cut:], agg, normalizer=norm)
    assert_close(parts, agg_loss(loss_mat, m, agg))


@SETTINGS
@given(b=batches(), garbage=GARBAGE, kind=st.sampled_from(["k1", "k2", "k3"]), beta=st.floats(0, 1))
def test_kl_penalized_scores_ignore_masked_values(b, garbage, kind, beta):
    (logp, ref, _, _), m = b
    scores = torch.arange(m.shape[0], dtype=logp.dtype)
    clean = kl_penalized_scores(scores, logp, ref, m, beta, kind)
    dirty = kl_penalized_scores(scores, _dirty(logp, m, garbage), _dirty(ref, m, garbage), m, beta, kind)
    for a, c in zip(dirty, clean):
        assert_close(a, c)
    assert (clean[1][~m.any(1)] == 0).all()  # empty responses: no KL


@SETTINGS
@given(b=batches(), garbage=GARBAGE, k=st.integers(1, 3))
def test_whiten_ignores_masked_values_and_padding(b, garbage, k):
    (x, _, _, _), m = b
    clean = masked_whiten(x, m)
    assert_close(masked_whiten(_dirty(x, m, garbage), m), clean)
    xp, mp = _pad(x, m, k, garbage)
    assert_close(masked_whiten(xp, mp)[:, : m.shape[1]], clean)
    assert (masked_whiten(xp, mp)[:, m.shape[1]:] == 0).all()


@SETTINGS
@given(b=batches())
def test_expand_to_tokens_then_token_mean_of_seq_mean_is_mean_advantage(b):
    # seq-mean-token-mean of the expanded advantage is the mean over rows that have tokens
    (_, _, adv, _), m = b
    seq = adv[:, 0]
    tok = expand_to_tokens(seq, m)
    assert (tok[~m] == 0).all()
    out = agg_loss(tok, m, "seq-mean-token-mean")
    assert_close(out, ((seq.double() * m.any(1)).sum() / m.shape[0]).to(out.dtype))


@SETTINGS
@given(b=batches())
def test_bias_corrected_kl_equals_k3_value_on_policy(b):
    (logp, ref, _, _), _ = b
    assert_close(bias_corrected_kl(logp, ref, logp), kl_estimate(logp, ref, "k3"))


pairs = st.lists(st.tuples(st.floats(-20, 20), st.floats(-20, 20)), min_size=1, max_size=16)


@SETTINGS
@given(p=pairs)
def test_pairwise_accuracy_is_antisymmetric(p):
    c, r = (torch.tensor(x, dtype=D) for x in zip(*p))
    total = pairwise_accuracy(c, r) + pairwise_accuracy(r, c)
    assert_close(total, torch.tensor(1.0))


@SETTINGS
@given(p=pairs, e=st.floats(0, 0.49), beta=st.floats(0.01, 2))
def test_pair_losses_reductions_and_permutation(p, e, beta):
    c, r = (torch.tensor(x, dtype=D) for x in zip(*p))
    perm = torch.randperm(len(p), generator=torch.Generator().manual_seed(len(p)))
    per, _ = bradley_terry_loss(c, r, label_smoothing=e, reduction="none")
    assert_close(bradley_terry_loss(c, r, label_smoothing=e)[0], per.mean())
    assert_close(bradley_terry_loss(c[perm], r[perm], label_smoothing=e, reduction="none")[0], per[perm])
    z = torch.zeros_like(c)
    for lt in ("sigmoid", "robust", "ipo", "hinge"):
        ls = e if lt in ("sigmoid", "robust") else 0.0
        per, _ = dpo_loss(c, r, z, z, beta=beta, loss_type=lt, label_smoothing=ls, reduction="none")
        assert torch.isfinite(per).all()
        assert_close(dpo_loss(c, r, z, z, beta=beta, loss_type=lt, label_smoothing=ls, reduction="sum")[0], per.sum())
