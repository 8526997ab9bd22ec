"""Rollout engine: batched KV-cache sampling against naive references, on a tiny random Llama."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from decode_utils import context_dependent

from rlhfkit.models import load_tokenizer, position_ids_from_mask, tiny_causal_lm
from rlhfkit.rollout import Experience, generate, left_pad
from rlhfkit.rollout.sampler import pick as _pick

PAD = 0


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def model(tok):
    return context_dependent(tiny_causal_lm(tok, seed=0))


@pytest.fixture(scope="module")
def prompts(tok):
    # Unequal lengths and a shared prefix (exercises left padding and prefix sharing).
    texts = ["Hello there, how", "Hello there, what is the capital of", "Hi", "Hello there, tell me a very long story about a cat"]
    return [tok.encode(t) for t in texts]


def _naive_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """No cache, no padding, no batching: re-run the whole sequence for every token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def _full_forward_logprobs(model, exp: Experience, temperature: float = 1.0) -> torch.Tensor:
    """(B, R) log softmax(logits / temperature) at the response tokens from one pass over
    prompt+response, positions from the mask."""
    ids, mask = exp.input_ids(), exp.attention_mask()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    P = exp.prompt_ids.shape[1]
    logits = logits[:, P - 1:-1] / temperature  # position t predicts token t+1
    return logits.log_softmax(-1).gather(-1, exp.response_ids[..., None]).squeeze(-1)


def _gen(model, prompts, **kw):
    kw.setdefault("max_new_tokens", 10)
    return generate(model, prompts, eos_token_id=kw.pop("eos_token_id", []), pad_token_id=PAD, **kw)


def test_left_padded_batch_equals_each_prompt_alone(model, prompts):
    exp = _gen(model, prompts, temperature=0)
    assert exp.prompt_ids.shape == (4, max(map(len, prompts)))
    for i, p in enumerate(prompts):
        alone = _gen(model, [p], temperature=0)
        assert exp.response_ids[i].tolist() == alone.response_ids[0].tolist()
        assert exp.response_ids[i].tolist() == _naive_greedy(model, p, 10)
        # The prompt is stored left-padded.
        assert exp.prompt_ids[i, -len(p):].tolist() == p
        assert exp.prompt_mask[i].sum() == len(p)


def test_shared_prefix_and_duplicate_prompts(model, tok):
    """Prompts sharing a chat-template-like prefix, one of them twice: the prefix and the duplicate
    are prefilled once; results must equal unshared decoding, and the forward pass in float64."""
    head = tok.encode("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    tails = ["Hello", "What is the capital of France?", "Hello", "Tell me a story"]
    prompts = [head + tok.encode(t) for t in tails]
    exp = _gen(model, prompts, n=2, temperature=0)
    for i, p in enumerate(prompts):
        want = _naive_greedy(model, p, 10)
        assert exp.response_ids[2 * i].tolist() == want and exp.response_ids[2 * i + 1].tolist() == want
    m64 = copy.deepcopy(model).double()
    exp = _gen(m64, prompts, n=2, temperature=1.0, seed=0)
    ref = _full_forward_logprobs(m64, exp)
    torch.testing.assert_close(exp.logprobs, ref * exp.response_mask, atol=1e-9, rtol=0)


def test_outputs_depend_on_context(model, prompts):
    """Guard for the test model itself: different prompts give different continuations."""
    exp = _gen(model, prompts, temperature=0)
    assert len({tuple(r) for r in exp.response_ids.tolist()}) == len(prompts)


@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.7, top_p=0.9), dict(temperature=1.3, top_k=20)])
def test_logprobs_equal_fresh_forward_pass(model, prompts, settings):
    """Stored log-probs are log softmax(logits / T) at the sampling temperature T, before top-k /
    top-p, and the record says T: the trainer's recomputation at T makes PPO's first ratio 1.

    In float64 the match is exact to rounding, which checks the logic (positions, cache, masks,
    tempered distribution); in float32 different kernel shapes (cached steps vs one long pass)
    leave ~1e-5 of noise on log-probs of magnitude ~5.
    """
    for m, atol in [(copy.deepcopy(model).double(), 1e-9), (model, 1e-4)]:
        exp = _gen(m, prompts, n=2, micro_batch_size=3, seed=1, max_new_tokens=12, **settings)
        assert exp.temperature == settings["temperature"]
        ref = _full_forward_logprobs(m, exp, settings["temperature"])
        mask = exp.response_mask.bool()
        assert exp.logprobs.dtype == ref.dtype
        torch.testing.assert_close(exp.logprobs[mask], ref[mask], atol=atol, rtol=0)
        assert (exp.logprobs[~mask] == 0).all()


def test_eos_stops_rows_and_masks_the_rest(model, prompts):
    free = _gen(model, prompts, temperature=0, max_new_tokens=12)
    # Choose stop tokens that greedy decoding is known to produce: row 0 at step 2, row 1 at step 5.
    eos = [int(free.response_ids[0, 2]), int(free.response_ids[1, 5])]
    exp = _gen(model, prompts, temperature=0, max_new_tokens=12, eos_token_id=eos)
    for i in range(len(prompts)):
        row = free.response_ids[i].tolist()
        hits = [t for t, x in enumerate(row) if x in eos]
        if hits:
            stop = hits[0]
            assert exp.eos[i]
            assert exp.response_mask[i].sum() == stop + 1  # EOS itself counts
            assert exp.response_ids[i, : stop + 1].tolist() == row[: stop + 1]
            assert (exp.response_ids[i, stop + 1:] == PAD).all()
            assert (exp.logprobs[i, stop + 1:] == 0).all()
        else:
            assert not exp.eos[i]
            assert exp.response_mask[i].all()
    assert exp.response_lengths().tolist() == exp.response_mask.sum(-1).tolist()
    # Rows that finished early were dropped from the batch; the others are unaffected.
    ref = _full_forward_logprobs(model, exp)
    mask = exp.response_mask.bool()
    torch.testing.assert_close(exp.logprobs[mask], ref[mask], atol=1e-4, rtol=0)


def test_sampling_with_eos_matches_forward_pass(model, prompts):
    """Many rows ending at different steps (batch compaction at work), sampled, in float64."""
    m64 = copy.deepcopy(model).double()
    free = _gen(m64, prompts, n=4, temperature=1.0, seed=3, max_new_tokens=12)
    eos = sorted({int(x) for x in free.response_ids[:, :6].flatten()})[:12]  # frequent early tokens
    exp = _gen(m64, prompts, n=4, temperature=1.0, seed=3, max_new_tokens=12, eos_token_id=eos)
    assert 0 < int(exp.eos.sum()) < len(exp)
    lengths = exp.response_lengths()
    assert len(set(lengths.tolist())) > 2
    ref = _full_forward_logprobs(m64, exp)
    mask = exp.response_mask.bool()
    torch.testing.assert_close(exp.logprobs[mask], ref[mask], atol=1e-9, rtol=0)
    for i in range(len(exp)):
        k = int(lengths[i])
        assert bool(exp.eos[i]) == (int(exp.response_ids[i, k - 1]) in eos)
        assert (exp.response_ids[i, k:] == PAD).all()


def test_stops_early_when_every_row_finished(model, prompts):
    free = _gen(model, prompts[:2], temperature=0, max_new_tokens=12)
    eos = [int(free.response_ids[0, 1]), int(free.response_ids[1, 3])]
    exp = _gen(model, prompts[:2], temperature=0, max_new_tokens=12, eos_token_id=eos)
    assert exp.eos.all()
    assert exp.response_ids.shape[1] == int(exp.response_lengths().max()) <= 4


def test_n_samples_are_contiguous(model, prompts):
    exp = _gen(model, prompts[:3], n=4, temperature=1.0, seed=0)
    assert len(exp) == 12
    assert exp.prompt_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for i, p in enumerate(prompts[:3]):
        for r in range(i * 4, (i + 1) * 4):
            assert exp.prompt_ids[r, -len(p):].tolist() == p
        assert len({tuple(x) for x in exp.response_ids[i * 4:(i + 1) * 4].tolist()}) > 1  # samples differ


def test_seeded_sampling_is_reproducible(model, prompts):
    a = _gen(model, prompts, n=2, seed=123, temperature=1.0)
    b = _gen(model, prompts, n=2, seed=123, temperature=1.0)
    c = _gen(model, prompts, n=2, seed=124, temperature=1.0)
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.response_ids, c.response_ids)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(_gen(model, prompts, generator=g1).response_ids, _gen(model, prompts, generator=g2).response_ids)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_top_k_1_is_greedy(model, prompts, temperature):
    greedy = _gen(model, prompts, temperature=0)
    topk1 = _gen(model, prompts, temperature=temperature, top_k=1, seed=0)
    """Top-k 1 picks the greedy tokens; their log-probs are those of the tempered, unfiltered distribution."""
    assert torch.equal(greedy.response_ids, topk1.response_ids)
    mask = topk1.response_mask.bool()
    torch.testing.assert_close(topk1.logprobs[mask], _full_forward_logprobs(model, topk1, temperature)[mask],
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(greedy.logprobs[mask], _full_forward_logprobs(model, greedy)[mask], atol=1e-4, rtol=0)


def test_micro_batching_matches_one_batch(model, prompts):
    full = _gen(model, prompts, n=2, temperature=0)
    micro = _gen(model, prompts, n=2, temperature=0, micro_batch_size=3)
    assert torch.equal(full.response_ids, micro.response_ids)
    assert torch.equal(full.prompt_index, micro.prompt_index)
    torch.testing.assert_close(full.logprobs, micro.logprobs, atol=1e-5, rtol=0)


def test_accepts_tensor_prompts_and_validates(model, prompts):
    a = _gen(model, prompts, temperature=0, max_new_tokens=4)
    b = _gen(model, [torch.tensor(p) for p in prompts], temperature=0, max_new_tokens=4)
    assert torch.equal(a.response_ids, b.response_ids)
    with pytest.raises(ValueError, match="empty prompt"):
        _gen(model, [prompts[0], []])
    with pytest.raises(ValueError, match="sampling settings"):
        _gen(model, prompts, top_p=0.0)


def test_restores_train_mode_and_returns_normal_tensors(model, prompts):
    model.train()
    exp = _gen(model, prompts[:1], max_new_tokens=3)
    assert model.training
    model.eval()
    assert not exp.logprobs.is_inference()
    exp.logprobs.add_(0)  # in-place ops are forbidden on inference tensors


def test_zero_new_tokens(model, prompts):
    exp = _gen(model, prompts, max_new_tokens=0)
    assert exp.response_ids.shape == (4, 0) and exp.input_ids().shape == exp.prompt_ids.shape


def test_pick_matches_naive_filters():
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 2
    for top_k, top_p, temp in [(0, 0.8, 1.0), (5, 1.0, 0.7), (10, 0.5, 1.5)]:
        z = logits / temp
        # Naive: keep the k best, then the smallest set of tokens (by probability) reaching top_p.
        allowed = torch.zeros_like(z, dtype=torch.bool)
        for b in range(3):
            order = z[b].argsort(descending=True)
            if top_k:
                order = order[:top_k]
            p = z[b, order].softmax(-1)
            n_keep = int((p.cumsum(0) < top_p).sum()) + 1
            allowed[b, order[:n_keep]] = True
        g = torch.Generator().manual_seed(0)
        draws = torch.stack([_pick(logits, temp, top_p, top_k, g) for _ in range(400)], 1)  # (3, 400)
        assert allowed.gather(1, draws).all()
        assert all(len(set(draws[b].tolist())) == int(allowed[b].sum()) for b in range(3))


def test_pick_samples_from_the_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1e9, 0.5]])
    g = torch.Generator().manual_seed(0)
    draws = _pick(logits.repeat(40000, 1), 1.0, 1.0, 0, g)
    freq = torch.bincount(draws, minlength=5).float() / 40000
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.01, rtol=0)


def test_experience_select_and_cat():
    def make(P, R, offset):
        ids, mask = left_pad([[5] * (P - 1), [6] * P], PAD)
        return Experience(
            prompt_ids=ids, prompt_mask=mask, response_ids=torch.full((2, R), 7), response_mask=torch.ones(2, R, dtype=torch.long),
            logprobs=torch.full((2, R), -1.0), eos=torch.tensor([True, False]), prompt_index=torch.tensor([offset, offset + 1]),
            pad_token_id=PAD, scores=torch.tensor([1.0, 2.0]),
        )

    a, b = make(3, 2, 0), make(5, 4, 2)
    c = Experience.cat([a, b])
    assert c.prompt_ids.shape == (4, 5) and c.response_ids.shape == (4, 4)
    assert c.prompt_ids[0].tolist() == [PAD, PAD, PAD, 5, 5]  # prompts stay left-padded
    assert c.response_ids[0].tolist() == [7, 7, PAD, PAD]  # responses stay right-padded
    assert c.response_mask[0].tolist() == [1, 1, 0, 0] and c.logprobs[0].tolist() == [-1, -1, 0, 0]
    assert c.scores.tolist() == [1, 2, 1, 2] and c.prompt_index.tolist() == [0, 1, 2, 3]
    assert c.input_ids().shape == c.attention_mask().shape == (4, 9)
    s = c.select(torch.tensor([3, 0]))
    assert s.prompt_index.tolist() == [3, 0] and s.scores.tolist() == [2, 1] and s.values is None
    assert c.select([1]).response_lengths().tolist() == [2]
    assert c.to("cpu").prompt_ids.device.type == "cpu"
    assert c.temperature == 1.0
    with pytest.raises(ValueError, match="different temperatures"):
        Experience.cat([a, dataclasses.replace(b, temperature=0.7)])
    assert Experience.cat([dataclasses.replace(a, temperature=0.7), dataclasses.replace(b, temperature=0.7)]
                          ).select([0]).temperature == 0.7


def test_pick_across_blocks_of_a_vocabulary_not_a_multiple_of_the_block():
    """The two-level sampler: tokens at block edges and in a partial last block get their mass."""
    from rlhfkit.rollout.sampler import Sampler as _Sampler

    V = 2 * _Sampler.BLOCK + 88
    support = [0, _Sampler.BLOCK - 1, _Sampler.BLOCK, 2 * _Sampler.BLOCK, V - 1]
    logits = torch.full((1, V), float("-inf"))
    logits[0, support] = torch.tensor([0.0, 1.0, -0.5, 0.5, 1.5])
    g = torch.Generator().manual_seed(0)
    draws = _pick(logits.repeat(40000, 1), 1.0, 1.0, 0, g)
    freq = torch.bincount(draws, minlength=V).float() / 40000
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.01, rtol=0)
    assert freq[[i for i in range(V) if i not in support]].sum() == 0


def test_sampler_logprobs_are_the_log_softmax():
    from rlhfkit.rollout.sampler import Sampler as _Sampler

    logits = torch.randn(6, 700, dtype=torch.float64) * 3
    for kw in [dict(temperature=1.0, top_p=1.0, top_k=0), dict(temperature=0.6, top_p=0.9, top_k=50),
               dict(temperature=1.7, top_p=1.0, top_k=0), dict(temperature=0.5, top_p=1.0, top_k=700),
               dict(temperature=0.0, top_p=1.0, top_k=0)]:
        sampler = _Sampler(generator=torch.Generator().manual_seed(0), **kw)
        tempered = logits / (kw["temperature"] or 1.0)  # greedy: the untempered distribution
        for b in (6, 3):  # the work buffer is reused for fewer rows (finished rows dropped)
            tok, lp = sampler(logits[:b], True)
            torch.testing.assert_close(lp, tempered[:b].log_softmax(-1).gather(-1, tok[:, None]).squeeze(-1),
                                       atol=1e-12, rtol=0)


def test_preallocated_cache_layer_grows_and_selects_rows():
    from rlhfkit.rollout.kv_cache import PreallocatedLayer

    k, v = torch.randn(3, 2, 4, 5), torch.randn(3, 2, 4, 5)
    layer = PreallocatedLayer(k, v, 2, torch.tensor([0, 0, 2, 1]))  # room for 2 more
    ref_k, ref_v = k[[0, 0, 2, 1]], v[[0, 0, 2, 1]]
    for n_new in (1, 1, 3, 1):  # the third update overflows the buffer
        nk, nv = torch.randn(4, 2, n_new, 5), torch.randn(4, 2, n_new, 5)
        ref_k, ref_v = torch.cat([ref_k, nk], -2), torch.cat([ref_v, nv], -2)
        keys, values = layer.update(nk, nv)
        assert torch.equal(keys, ref_k) and torch.equal(values, ref_v)
        assert layer.get_seq_length() == ref_k.shape[-2]
    layer.batch_select_indices(torch.tensor([3, 1]))
    assert torch.equal(layer.keys, ref_k[[3, 1]]) and torch.equal(layer.values, ref_v[[3, 1]])


def test_packed_linears_match_default_kernels_and_are_removed(model, prompts, monkeypatch):
    import importlib

    gen_module = importlib.import_module("rlhfkit.rollout.cpu_linears")
    # the fallback of models the lean Llama decoder does not run (tests/test_rollout_fast.py)
    monkeypatch.setattr(importlib.import_module("rlhfkit.rollout.llama_decode"), "LEAN_DECODE", False)
    packed = _gen(model, prompts, n=2, temperature=0, max_new_tokens=10)
    assert not any("forward" in m.__dict__ for m in model.modules())  # the model is left as it was
    monkeypatch.setattr(gen_module, "PACK_CPU_LINEARS", False)
    plain = _gen(model, prompts, n=2, temperature=0, max_new_tokens=10)
    assert torch.equal(packed.response_ids, plain.response_ids)
    torch.testing.assert_close(packed.logprobs, plain.logprobs, atol=1e-4, rtol=0)
    monkeypatch.setattr(gen_module, "PACK_CPU_LINEARS", True)
    # Inside the call the linear layers do run the packed kernel.
    seen = []
    real = gen_module._packed_linear_forward
    monkeypatch.setattr(gen_module, "_packed_linear_forward", lambda *a: seen.append(1) or real(*a))
    _gen(model, prompts, temperature=0, max_new_tokens=8)
    if torch.backends.mkldnn.is_available():
        assert seen
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_a_rollout_stops_at_the_chat_turn_end_and_the_models_eos_ids(model, tok):
    """A base model trained with a chat template: its tokenizer's eos (<|endoftext|>) is not the
    template's turn end (<|im_end|>); a rollout stops at both, and at the model's
    generation_config.eos_token_id (one id or a list), as make-data and the reward model read them."""
    from rlhfkit.config import RolloutSection
    from rlhfkit.rollout.backends import make_backend
    from rlhfkit.rollout.sampling import rollout, stop_ids

    base_tok = copy.deepcopy(tok)
    base_tok.eos_token = "<|endoftext|>"
    end, im_end = base_tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    assert base_tok.eos_token_id == end != im_end
    m = copy.deepcopy(model)
    m.generation_config.eos_token_id = [7, end]
    assert stop_ids(m, base_tok) == sorted({end, im_end, 7})
    m.generation_config.eos_token_id = None
    assert stop_ids(m, base_tok) == sorted({end, im_end})

    class Spy:
        def __init__(self):
            self.real, self.eos = make_backend("own"), None

        def sync_weights(self, weights):
            self.real.sync_weights(weights)

        def generate(self, *args, **kwargs):
            self.eos = kwargs["eos_token_id"]
            return self.real.generate(*args, **kwargs)

    spy = Spy()
    items = [type("Item", (), {"ids": base_tok.encode("Hello"), "text": "Hello"})()]
    exp = rollout(m, items, RolloutSection(n=2, max_new_tokens=3), base_tok, seed=0, backend=spy)
    assert spy.eos == sorted({end, im_end}) and exp.response_ids.shape[0] == 2


def test_experience_cat_pads_ids_with_the_records_pad_token():
    def make(P, R):
        ids, mask = left_pad([[5] * P, [6] * P], 9)
        return Experience(prompt_ids=ids, prompt_mask=mask, response_ids=torch.full((2, R), 7),
                          response_mask=torch.ones(2, R, dtype=torch.long), logprobs=None,
                          eos=torch.tensor([True, False]), prompt_index=torch.tensor([0, 1]), pad_token_id=9)

    c = Experience.cat([make(1, 1), make(2, 3)])
    assert c.prompt_ids[0].tolist() == [9, 5] and c.prompt_mask[0].tolist() == [0, 1]
    assert c.response_ids[0].tolist() == [7, 9, 9] and c.response_mask[0].tolist() == [1, 0, 0]


def test_rank_streams_differ_by_seed_step_and_rank_and_repeat():
    from rlhfkit.rollout.sampling import rank_stream_seed

    seeds = {rank_stream_seed(1, step, rank) for step in range(3) for rank in range(4)}
    assert len(seeds) == 12 and all(0 <= s < 2 ** 63 for s in seeds)
    assert rank_stream_seed(1, 2, 3) == rank_stream_seed(1, 2, 3) != rank_stream_seed(2, 2, 3)


def test_response_metrics_and_decoding_by_hand(tok):
    from rlhfkit.rollout.sampling import decode_responses, response_metrics

    eos = tok.convert_tokens_to_ids("<|im_end|>")
    hello = tok.encode("Hello")
    ids, mask = left_pad([[1], [1], [1]], PAD)
    rows = [[3, 4, 3, 4, eos, PAD], [5, 5, 5, PAD, PAD, PAD], [*hello, eos] + [PAD] * (5 - len(hello))]
    lengths = [5, 3, len(hello) + 1]
    resp_mask = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths])
    exp = Experience(prompt_ids=ids, prompt_mask=mask, response_ids=torch.tensor(rows), response_mask=resp_mask,
                     logprobs=None, eos=torch.tensor([True, False, True]), prompt_index=torch.arange(3),
                     pad_token_id=PAD)
    assert decode_responses(exp, tok)[2] == "Hello"  # the end-of-turn token is not text
    m = response_metrics(exp, ["ab", "", "Hello"])
    assert float(m["response/length_mean"]) == pytest.approx(sum(lengths) / 3)
    assert float(m["response/eos_frac"]) == pytest.approx(2 / 3) and m["response/empty_frac"] == pytest.approx(1 / 3)
    # distinct bigrams over the real tokens: 3/4, 1/2 and, for the third row, all distinct
    third = list(zip(rows[2][:lengths[2] - 1], rows[2][1:lengths[2]]))
    assert m["response/distinct2"] == pytest.approx((0.75 + 0.5 + len(set(third)) / len(third)) / 3)


def test_logprobs_are_zero_after_eos_in_a_row_kept_in_the_batch(model, prompts):
    """One row of 17 stops: too few finished rows to drop (1 < 17 // 8), so it keeps decoding pad
    tokens until the others end, and their log-probs must be 0 (`Experience.logprobs`)."""
    rows = [prompts[0]] + [prompts[2]] * 16
    free = _gen(model, rows[:2], temperature=0, max_new_tokens=8)
    first, other = free.response_ids[0].tolist(), set(free.response_ids[1].tolist())
    stop = next(t for t in range(1, 6) if first[t] not in other and first[t] not in first[:t])
    exp = _gen(model, rows, temperature=0, max_new_tokens=8, eos_token_id=[first[stop]])
    assert exp.eos.tolist() == [True] + [False] * 16 and int(exp.response_mask[0].sum()) == stop + 1
    assert exp.response_ids.shape[1] == 8 and (exp.logprobs[~exp.response_mask.bool()] == 0).all()
