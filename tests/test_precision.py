"""Mixed precision: fp32 master weights under bf16 autocast, fp16 loss scaling, FSDP's casting
policy, and tensors that follow their inputs' device (parallel/precision.py, docs/distributed.md)."""

from __future__ import annotations

import types

import pytest
import torch

import rlhfkit.algos as A
from rlhfkit.config.sections import ModelSection, OptimSection, TrainSection
from rlhfkit.models.forward import causal_logprobs
from rlhfkit.models.start import load_for_training
from rlhfkit.parallel import SingleProcess
from rlhfkit.parallel.fsdp import mixed_precision_policy
from rlhfkit.parallel.precision import Precision, keep_master_fp32
from rlhfkit.training import StepGuard, prepare_optimization


def _batch(model, seed=0, B=4, T=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (B, T), generator=g)
    return ids, torch.ones_like(ids)


def _one_step(model, strategy, lr):
    optim = OptimSection(lr=lr, weight_decay=0.0, warmup_ratio=0.0, schedule="constant", max_grad_norm=0.0)
    model, opt, sched = prepare_optimization(strategy, model, optim, TrainSection(micro_batch_size=4), 10)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, attn = _batch(model)
    with strategy.autocast():
        loss = -causal_logprobs(model, ids, attn).mean()
    strategy.backward(loss, model)
    stepped, _ = strategy.step(model, opt, sched, 0.0, loss.detach(), StepGuard())
    assert stepped
    return {n: (p.detach() != before[n]).float().mean().item() for n, p in model.named_parameters()}


def test_trained_model_loads_fp32_whatever_model_dtype(tiny_model_dir):
    model, _ = load_for_training(ModelSection(name=str(tiny_model_dir), dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_small_update_kept_by_fp32_master_weights_lost_by_bf16_params(tiny_model_dir):
    """AdamW's first step moves each weight by ~lr = 1e-6; bf16's spacing near |w| ~ 0.02 is ~1e-4 (2^-8 relative),
    so bf16 parameters round almost every step away. fp32 masters under bf16 autocast keep it."""
    strategy = SingleProcess("bf16")
    model, _ = load_for_training(ModelSection(name=str(tiny_model_dir), dtype="bfloat16"))
    changed = _one_step(model, strategy, lr=1e-6)
    weights = [n for n in changed if n.endswith("proj.weight")]
    assert min(changed[n] for n in weights) > 0.95  # the master weights moved

    low = load_for_training(ModelSection(name=str(tiny_model_dir), dtype="float32"))[0].to(torch.bfloat16)
    opt = torch.optim.AdamW(low.parameters(), lr=1e-6, weight_decay=0.0)  # the counterfactual: bf16 params
    before = {n: p.detach().clone() for n, p in low.named_parameters()}
    ids, attn = _batch(low)
    (-causal_logprobs(low, ids, attn).float().mean()).backward()
    opt.step()
    lost = [(p.detach() == before[n]).float().mean().item() for n, p in low.named_parameters()
            if n.endswith("proj.weight")]
    assert min(lost) > 0.9  # more than 90% of every matrix's updates vanished


def test_keep_master_fp32_casts_only_trained_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)).to(torch.bfloat16)
    model[0].requires_grad_(False)
    assert keep_master_fp32(model) == 2
    assert model[0].weight.dtype == torch.bfloat16 and model[1].weight.dtype == torch.float32


def _sft(model, ids, attn):
    return -causal_logprobs(model, ids, attn).float().mean()


def _dpo(model, ids, attn, ref):
    logp, ref_logp = causal_logprobs(model, ids, attn).float().sum(-1), causal_logprobs(ref, ids, attn).float().sum(-1)
    return A.dpo_loss(logp[0::2], logp[1::2], ref_logp[0::2], ref_logp[1::2], beta=0.1)[0]


def _ppo(model, ids, attn, ref):
    logp = causal_logprobs(model, ids, attn).float()
    old = causal_logprobs(ref, ids, attn).float()
    adv = torch.linspace(-1.0, 1.0, logp.numel()).view_as(logp)
    return A.ppo_policy_loss(logp, old, adv, torch.ones_like(logp, dtype=torch.bool))[0]


@pytest.mark.parametrize("loss_fn", [_sft, _dpo, _ppo], ids=["sft", "dpo", "ppo"])
def test_bf16_autocast_losses_agree_with_fp32(tokenizer, loss_fn):
    """Tolerance: 5e-3 relative to max(|fp32 loss|, 0.1). Measured on this model: SFT 2e-6, DPO 3e-4,
    PPO 6e-4 (log-probs are upcast before the log-softmax). The frozen reference is itself bf16."""
    from rlhfkit.models import tiny_causal_lm

    model, ref = tiny_causal_lm(tokenizer, seed=0), tiny_causal_lm(tokenizer, seed=1)
    ids, attn = _batch(model, B=4, T=16)
    extra = () if loss_fn is _sft else (ref,)
    with torch.no_grad():
        exact = loss_fn(model, ids, attn, *extra)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = loss_fn(model, ids, attn, *((ref.to(torch.bfloat16),) if extra else ()))
    assert torch.isfinite(mixed)
    assert abs(float(mixed) - float(exact)) <= 5e-3 * max(abs(float(exact)), 1e-1)


def test_fp16_overflow_skips_the_step_and_lowers_the_scale():
    strategy = SingleProcess("fp16")
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = StepGuard()
    scale0 = strategy.precision.scale
    w0 = model.weight.detach().clone()
    loss = model(torch.ones(1, 2)).sum()
    strategy.backward(loss, model)
    model.weight.grad[0, 0] = float("inf")
    stepped, _ = strategy.step(model, opt, None, 1.0, loss.detach(), guard)
    assert not stepped and torch.equal(model.weight, w0)
    assert strategy.precision.scale == scale0 / 2
    assert guard.consecutive == 0  # an overflow is the scaler's, not a divergence
    # the next, finite step goes through, unscaled: SGD moves w by lr * dL/dw = 0.1 * 1
    loss = model(torch.ones(1, 2)).sum()
    strategy.backward(loss, model)
    stepped, gnorm = strategy.step(model, opt, None, 0.0, loss.detach(), guard)
    assert stepped and gnorm == pytest.approx(3 ** 0.5)  # weight (1, 1) and bias 1
    assert torch.allclose(model.weight, w0 - 0.1)
    assert strategy.precision.state_dict()["scale"] == scale0 / 2


def test_fp16_scale_is_updated_once_for_two_optimizers():
    """PPO steps the actor and the critic with one scale: the second must be unscaled by the scale
    its gradients were multiplied with, even when the first step's update changes it."""
    p = Precision("fp16")
    a, c = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    oa, oc = torch.optim.SGD(a.parameters(), lr=1.0), torch.optim.SGD(c.parameters(), lr=1.0)
    p.backward(a(torch.ones(1, 1)).sum())
    p.backward(c(torch.ones(1, 1)).sum())
    a.weight.grad.fill_(float("inf"))
    for opt in (oa, oc):
        p.unscale(opt)
        p.apply(opt)
    assert c.weight.grad.item() == pytest.approx(1.0)  # unscaled by the scale it was scaled with
    assert p.scale == 65536.0 / 2


def test_fp16_scaler_state_round_trips():
    p, q = Precision("fp16"), Precision("fp16")
    p.backward(torch.ones(1, requires_grad=True).sum())
    p.scaler.update(1024.0)
    q.load_state_dict(p.state_dict())
    assert q.scale == 1024.0 and Precision("fp32").state_dict() == {}


def test_fsdp_policy_gathers_low_precision_and_reduces_fp32():
    policy = mixed_precision_policy("bf16")
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    assert mixed_precision_policy("fp16").param_dtype == torch.float16
    assert mixed_precision_policy("fp32") is None


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _tensors(x):
    if torch.is_tensor(x):
        yield x
    elif isinstance(x, (tuple, list)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)


B, T, V = 4, 5, 7
META_CALLS = {
    "kl_penalized_rewards": lambda m: A.kl_penalized_rewards(_meta(B), _meta(B, T), _meta(B, T), m, 0.1),
    "gae_advantages": lambda m: A.gae_advantages(_meta(B, T), _meta(B, T), m, 1.0, 0.95),
    "group_advantages": lambda m: A.group_advantages(_meta(B), 2),
    "rloo_advantages": lambda m: A.rloo_advantages(_meta(B), 2),
    "batch_mean_advantages": lambda m: A.batch_mean_advantages(_meta(B)),
    "expand_to_tokens": lambda m: A.expand_to_tokens(_meta(B), m),
    "kl_estimate": lambda m: A.kl_estimate(_meta(B, T), _meta(B, T), "k3"),
    "bias_corrected_kl": lambda m: A.bias_corrected_kl(_meta(B, T), _meta(B, T), _meta(B, T)),
    "token_logprobs": lambda m: A.token_logprobs(_meta(B, T, V), _meta(B, T, dtype=torch.long)),
    "entropy_from_logits": lambda m: A.entropy_from_logits(_meta(B, T, V)),
    "ppo_policy_loss": lambda m: A.ppo_policy_loss(_meta(B, T), _meta(B, T), _meta(B, T), m),
    "sequence_policy_loss": lambda m: A.sequence_policy_loss(_meta(B, T), _meta(B, T), _meta(B), m),
    "value_loss": lambda m: A.value_loss(_meta(B, T), _meta(B, T), _meta(B, T), m),
    "dpo_loss": lambda m: A.dpo_loss(_meta(B), _meta(B), _meta(B), _meta(B), 0.1),
    "bradley_terry_loss": lambda m: A.bradley_terry_loss(_meta(B), _meta(B)),
    "masked_whiten": lambda m: A.masked_whiten(_meta(B, T), m),
    "agg_loss": lambda m: A.agg_loss(_meta(B, T), m, "seq-mean-token-sum"),
    "explained_variance": lambda m: A.explained_variance(_meta(B, T), _meta(B, T), m),
}


@pytest.mark.parametrize("name", sorted(META_CALLS))
def test_algos_create_tensors_on_the_inputs_device(name):
    """On 'meta' inputs, a tensor made on the default device (CPU) inside the function would fail
    to combine with them or show up in the outputs."""
    out = META_CALLS[name](torch.ones(B, T, dtype=torch.bool, device="meta"))
    found = list(_tensors(out))
    assert found and all(t.device.type == "meta" for t in found if t.dim() > 0)


def test_tensor_factories_in_algos_and_trainers_name_a_device():
    """grep-like: every torch.zeros/ones/full/arange/tensor/empty call in algos/ and trainers/
    passes device= (or is on the allow-list: host-side sums that `Strategy.sum` moves)."""
    import pathlib
    import re

    import rlhfkit

    root = pathlib.Path(rlhfkit.__file__).parent
    allowed = {("trainers/dpo.py", "strategy.sum(torch.tensor"), ("trainers/pg_update.py", "strategy.sum(torch.tensor"),
               ("trainers/pg_update.py", "total = torch.tensor(sum(losses"),
               ("trainers/pg_eval.py", "columns[name] = torch.tensor"),
               ("trainers/sft.py", "sums = torch.zeros(2"), ("trainers/sft.py", "sums += torch.tensor")}
    call = re.compile(r"torch\.(zeros|ones|full|arange|tensor|empty|rand|randn|randint)\(")
    bad = []
    for sub in ("algos", "trainers"):
        for path in sorted((root / sub).glob("*.py")):
            rel = f"{sub}/{path.name}"
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if call.search(line) and "device=" not in line and not line.lstrip().startswith("#"):
                    if not any(rel == f and frag in line for f, frag in allowed):
                        bad.append(f"{rel}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)


def test_rollout_generates_under_the_strategys_autocast(tiny_model, tokenizer):
    from rlhfkit.rollout.sampling import rollout

    seen = []
    hook = tiny_model.lm_head.register_forward_hook(lambda m, i, o: seen.append(torch.is_autocast_enabled("cpu")))
    settings = types.SimpleNamespace(max_new_tokens=3, temperature=1.0, top_p=1.0, top_k=0, n=1, micro_batch_size=0,
                                     backend="own")
    items = [types.SimpleNamespace(ids=tokenizer("hello there")["input_ids"])]
    exp = rollout(tiny_model, items, settings, tokenizer, seed=0, strategy=SingleProcess("bf16"))
    hook.remove()
    assert seen and all(seen)
    assert exp.response_ids.shape == (1, 3)


def test_checkpoint_stores_and_restores_the_loss_scale(tiny_model, tmp_path):
    from rlhfkit.training.checkpoint import (
        Checkpointer,
        load_checkpoint,
        save_checkpoint,
    )

    strategy = SingleProcess("fp16")
    strategy.precision.backward(torch.ones(1, requires_grad=True).sum())
    strategy.precision.scaler.update(512.0)
    ckpt = Checkpointer(tmp_path)
    save_checkpoint(ckpt, strategy, 3, {"model": tiny_model}, {}, {"kind": "sft"})
    resumed = SingleProcess("fp16")
    state = load_checkpoint(ckpt.latest(), resumed, {"model": tiny_model}, {})
    assert state["grad_scaler"]["scale"] == 512.0 and resumed.precision.scale == 512.0
