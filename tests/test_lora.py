"""LoRA and gradient checkpointing on tiny random models.

- ``rlhfkit merge``: the merged full model gives the adapter model's logits (policies) or scores
  (reward models, whose trained head rides in the adapter);
- LoRA PPO and LoRA DPO runs learn while holding one copy of the base weights (actor, reference
  and critic share it);
- online DPO continues one adapter on pi_0 across iterations;
- gradient checkpointing is on for every trainer when asked, and changes no gradient.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import write_jsonl

from rlhfkit.config import LoraSection, RewardConfig, SFTConfig, load_config
from rlhfkit.models import load_causal_lm, load_scalar_model, sequence_scores
from rlhfkit.models.forward import causal_logprobs
from rlhfkit.models.lora import (
    apply_lora,
    enable_gradient_checkpointing,
    load_adapter_onto,
)
from rlhfkit.models.start import load_for_training

LORA = {"enabled": True, "r": 8, "alpha": 16}


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]


def _batch(tokenizer, texts):
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def _frozen_numel(*models) -> int:
    """Elements of frozen parameter storage held by the models together, each tensor counted once."""
    seen, total = set(), 0
    for m in models:
        for p in m.parameters():
            if not p.requires_grad and p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel()
    return total


def _base_numel(model_dir) -> int:
    return sum(p.numel() for p in load_causal_lm(model_dir).parameters())  # tied embeddings once


# --------------------------------------------------------------------------- merge

def _sft_rows(n, seed, held_out=False):
    import random

    rng = random.Random(seed)
    colors = (["grey", "gold", "silver"] if held_out  # colours no training row names
              else ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"])
    return [{"prompt": f"Repeat the colour: {c}", "response": f"The colour is {c}."}
            for c in (rng.choice(colors) for _ in range(n))]


def _trainer_cfg(cls, tmp_path, model_dir, train_path, eval_path, **sections):
    data = {"model": {"name": str(model_dir), "lora": LORA},
            "data": {"train": str(train_path), "eval": str(eval_path), "max_length": 96},
            "train": {"output_dir": str(tmp_path / "run"), "batch_size": 8, "micro_batch_size": 8,
                      "progress": False, "max_steps": 16},
            "optim": {"lr": 1e-2, "warmup_ratio": 0.0, "schedule": "constant"}}
    for sec, values in sections.items():
        data[sec] = {**data.get(sec, {}), **values}
    return load_config(cls, data=data)


def test_sft_lora_learns_and_merges_into_a_model_with_the_same_logits(tmp_path, tokenizer, capsys):
    from pg_utils import tiny_policy_dir
    from transformers import AutoModelForCausalLM

    from rlhfkit.cli import main
    from rlhfkit.trainers.sft import train_sft

    # A peaked tiny model: with the embeddings frozen (LoRA) and a final RMSNorm, a model whose
    # embeddings are ~0.02 cannot express a confident next token whatever its adapters do.
    tiny_model_dir = tiny_policy_dir(tokenizer, tmp_path / "policy")
    train = write_jsonl(tmp_path / "train.jsonl", _sft_rows(64, 0))
    held = write_jsonl(tmp_path / "eval.jsonl", _sft_rows(16, 1, held_out=True))
    train_sft(_trainer_cfg(SFTConfig, tmp_path, tiny_model_dir, train, held, train={"max_steps": 12}))
    evals = [r["eval/loss"] for r in _metrics(tmp_path / "run") if "eval/loss" in r]
    assert evals[-1] < 0.6 * evals[0], evals  # the adapters alone learn the task
    adapter = tmp_path / "run" / "model"
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "config.json").exists()

    merged = tmp_path / "merged"
    assert main(["merge", str(adapter), "--out", str(merged)]) == 0
    assert not (merged / "adapter_config.json").exists() and (merged / "tokenizer_config.json").is_file()
    full = AutoModelForCausalLM.from_pretrained(merged).eval()
    with_adapter = load_adapter_onto(load_causal_lm(tiny_model_dir), adapter).eval()
    base = load_causal_lm(tiny_model_dir).eval()
    ids, mask = _batch(tokenizer, ["Repeat the colour: red", "The colour is"])
    with torch.no_grad():
        want = with_adapter(input_ids=ids, attention_mask=mask).logits
        got = full(input_ids=ids, attention_mask=mask).logits
        assert (want - base(input_ids=ids, attention_mask=mask).logits).abs().max() > 1e-2  # adapters matter
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        # an adapter directory also loads directly, merged on the fly
        merged_on_the_fly = load_causal_lm(adapter)
        torch.testing.assert_close(merged_on_the_fly(input_ids=ids, attention_mask=mask).logits, want,
                                   atol=1e-4, rtol=1e-4)
    assert all(p.requires_grad for p in merged_on_the_fly.parameters())  # a plain, trainable model
    # full fine-tuning (LoRA off) can start from the adapter directory: the merged model trains
    train_sft(_trainer_cfg(SFTConfig, tmp_path / "full", adapter, train, held, train={"max_steps": 2},
                           model={"lora": {"enabled": False}}))
    assert (tmp_path / "full" / "run" / "model" / "config.json").is_file()
    assert main(["merge", str(tiny_model_dir), "--out", str(tmp_path / "x")]) == 2  # not an adapter
    # an --out that holds something is not replaced unasked, and never the adapter's own directory
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    for out in (tmp_path / "mine", tmp_path / "run", adapter, merged):
        assert main(["merge", str(adapter), "--out", str(out)]) == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep" and (adapter / "adapter_config.json").is_file()
    assert main(["merge", str(adapter), "--out", str(tmp_path / "run"), "--overwrite"]) == 2  # holds the adapter
    assert main(["merge", str(adapter), "--out", str(merged), "--overwrite"]) == 0
    assert (merged / "config.json").is_file()
    # nor the base it merges into (here a copy, named with --base), nor a directory inside either, nor ""
    import shutil

    base_copy = shutil.copytree(tiny_model_dir, tmp_path / "base")
    weights = (base_copy / "model.safetensors").read_bytes()
    for out in (base_copy, base_copy / "merged", adapter / "merged", ""):
        assert main(["merge", str(adapter), "--base", str(base_copy), "--out", str(out), "--overwrite"]) == 2
    assert (base_copy / "model.safetensors").read_bytes() == weights and not (adapter / "merged").exists()
    # a file is not a directory to write the model into, --overwrite or not
    (tmp_path / "afile").write_text("keep")
    for flags in ([], ["--overwrite"]):
        assert main(["merge", str(adapter), "--out", str(tmp_path / "afile"), *flags]) == 2
        assert "afile: is a file, not a directory" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "keep"


def _pref_rows(n, seed, held_out=False):
    import random

    rng = random.Random(seed)
    colors = (["grey", "gold", "silver"] if held_out  # colours no training row names
              else ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"])
    return [{"prompt": f"Describe something {c}.", "chosen": f"It is a wonderful {c} thing, I love it.",
             "rejected": f"It is a terrible {c} thing, I hate it."} for c in (rng.choice(colors) for _ in range(n))]


def test_rm_lora_trains_the_head_and_merges_into_a_sequence_classifier(tmp_path, tiny_model_dir, tokenizer):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from rlhfkit.cli import main
    from rlhfkit.judges.rewards import reward_model_fn
    from rlhfkit.trainers.reward import train_reward_model

    # Start from a saved reward model, so the head's starting value is known.
    rm0 = tmp_path / "rm0"
    from rlhfkit.models import save_pretrained_atomic

    save_pretrained_atomic(load_scalar_model(tiny_model_dir, pad_token_id=tokenizer.pad_token_id), tokenizer, rm0)
    head0 = load_file(str(rm0 / "model.safetensors"))["score.weight"]

    train = write_jsonl(tmp_path / "train.jsonl", _pref_rows(64, 0))
    held = write_jsonl(tmp_path / "eval.jsonl", _pref_rows(24, 1, held_out=True))
    cfg = _trainer_cfg(RewardConfig, tmp_path, rm0, train, held, optim={"lr": 3e-3})
    model, _ = load_for_training(cfg.model, "SEQ_CLS", pad_token_id=tokenizer.pad_token_id)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable) and all("lora_" in n or "score" in n for n in trainable)

    train_reward_model(cfg)
    evals = [r for r in _metrics(tmp_path / "run") if "eval/accuracy" in r]
    assert evals[-1]["eval/accuracy"] >= 0.9 and evals[-1]["eval/margin"] > evals[0]["eval/margin"] + 0.5
    adapter = tmp_path / "run" / "model"
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    heads = [k for k in saved if "score" in k]
    assert heads and (saved[heads[0]] - head0).abs().max() > 1e-3  # the head trained with the adapters

    merged = tmp_path / "merged"
    assert main(["merge", str(adapter), "--out", str(merged)]) == 0
    rm = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    unmerged = load_adapter_onto(load_scalar_model(rm0, pad_token_id=tokenizer.pad_token_id), adapter).eval()
    texts = ["It is a wonderful red thing, I love it.", "It is a terrible red thing, I hate it."]
    with torch.no_grad():
        want = torch.stack([sequence_scores(unmerged, *_batch(tokenizer, [t])) for t in texts]).squeeze(-1)
        got = torch.stack([rm(*_batch(tokenizer, [t])).logits[0, 0] for t in texts])  # HF's own pooling
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert want[0] > want[1]
    # rm:DIR accepts the adapter itself (merged on load) and scores like the merged directory
    prompts, responses = ["Describe something red."] * 2, ["It is a wonderful red thing.", "It is a terrible thing."]
    a = reward_model_fn(str(tmp_path / "run"), tokenizer=tokenizer)(prompts, responses)
    b = reward_model_fn(str(merged), tokenizer=tokenizer)(prompts, responses)
    assert a == pytest.approx(b, abs=1e-4)


# --------------------------------------------------------------------------- one copy of the base

def test_lora_ppo_learns_with_one_copy_of_the_base_weights(tokenizer, tmp_path, monkeypatch):
    from pg_utils import base_config, read_metrics

    from rlhfkit.trainers import ppo

    seen = {}
    real_fit, real_setup = ppo.fit, ppo.setup_run

    def spy_fit(run, step, total, *, models, **kw):
        seen.update(models)
        return real_fit(run, step, total, models=models, **kw)

    def spy_setup(*a, **kw):
        seen["run"] = real_setup(*a, **kw)
        return seen["run"]

    monkeypatch.setattr(ppo, "fit", spy_fit)
    monkeypatch.setattr(ppo, "setup_run", spy_setup)
    # The 1-layer tiny policy needs a wide adapter to move its (frozen, tied) output embeddings'
    # choices; even so the reward creeps for 10-30 steps before it climbs, and where it starts to
    # climb is chaotic in the float rounding (the thread count, the batch layout). With these
    # settings, mean reward of the last 3 steps minus the first 2, seeds 0-3: +0.07, +0.30, +0.29,
    # +0.22 on 2 threads; +0.13, +0.01, +0.16, +0.21 on 1 (a pytest-xdist worker on 2 cores).
    cfg = load_config(ppo.PPOConfig, data=base_config(
        tmp_path, tokenizer, critic_init="policy", model={"lora": {"enabled": True, "r": 32, "alpha": 64}},
        rollout={"n": 4, "max_new_tokens": 6}, train={"max_steps": 40, "seed": 3}, mini_batch_size=16,
        ppo_epochs=4, kl={"coef": 0.0}, vf_coef=0.5, optim={"lr": 5e-2}, critic_optim={"lr": 1e-2}))
    ppo.train_ppo(cfg)

    rows = read_metrics(tmp_path / "run")
    first = sum(r["reward/score_mean"] for r in rows[:2]) / 2
    last = sum(r["reward/score_mean"] for r in rows[-3:]) / 3
    assert last > first + 0.06 and last > 1.5 * first, [r["reward/score_mean"] for r in rows]
    assert all(abs(r["policy/ratio_first"] - 1.0) < 1e-6 for r in rows)

    actor, critic, run = seen["actor"], seen["critic"], seen["run"]
    assert run.ref is None  # the reference is the actor with its adapters disabled
    # Frozen storage of actor + reference + critic together: one base, plus the critic's frozen
    # copy of its initial head (peft's modules_to_save keeps the original next to the trained one).
    head_numel = critic.get_base_model().score.original_module.weight.numel()
    assert _frozen_numel(actor, critic) == _base_numel(cfg.model.name) + head_numel
    trainable = [n for m in (actor, critic) for n, p in m.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "score" in n for n in trainable)
    out = tmp_path / "run"
    assert (out / "model" / "adapter_config.json").is_file() and (out / "critic" / "adapter_config.json").is_file()


def test_lora_dpo_learns_with_one_copy_of_the_base_weights(tmp_path, tokenizer, monkeypatch):
    from rlhfkit.models import tiny_causal_lm
    from rlhfkit.trainers import dpo

    model_dir = tmp_path / "tiny"
    tiny_causal_lm(tokenizer, seed=1).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    words = ["apple", "river", "stone", "cloud", "music", "garden", "window", "forest"]
    for name, n, offset in (("train.jsonl", 32, 0), ("eval.jsonl", 16, 100)):  # separable: yes beats no
        write_jsonl(tmp_path / name, [{"prompt": f"Tell me about the {words[i % 8]} number {i + offset}.",
                                       "chosen": "yes yes yes", "rejected": "no no no"} for i in range(n)])
    seen = {}
    real_build = dpo.build_policy_and_reference

    def spy(*a, **kw):
        policy, reference = real_build(*a, **kw)
        seen.update(policy=policy, reference=reference)
        return policy, reference

    monkeypatch.setattr(dpo, "build_policy_and_reference", spy)
    cfg = load_config(dpo.DPOConfig, overrides=[
        f"model.name={model_dir}", f"data.train={tmp_path / 'train.jsonl'}", f"data.eval={tmp_path / 'eval.jsonl'}",
        f"train.output_dir={tmp_path / 'run'}", "train.progress=false", "data.max_length=64",
        "model.lora.enabled=true", "model.lora.r=8", "model.lora.alpha=16", "model.gradient_checkpointing=true",
        "optim.lr=1e-2", "optim.warmup_ratio=0", "optim.schedule=constant", "train.batch_size=8",
        "train.micro_batch_size=4", "train.max_steps=12", "dpo.beta=0.5"])
    metrics = dpo.train_dpo(cfg)
    start = _metrics(tmp_path / "run")[0]
    assert start["eval/rewards/accuracy"] == 0.0 and abs(start["eval/rewards/margin"]) < 1e-6
    assert float(metrics["eval/rewards/accuracy"]) >= 0.9  # held-out prompts

    policy, reference = seen["policy"], seen["reference"]
    assert reference.model is policy and reference.adapters_off
    assert _frozen_numel(policy) == _base_numel(model_dir)
    assert all("lora_" in n for n, p in policy.named_parameters() if p.requires_grad)
    assert (tmp_path / "run" / "model" / "adapter_config.json").is_file()


def test_online_dpo_with_lora_continues_one_adapter_on_pi0(tmp_path, tokenizer):
    from rlhfkit.models import tiny_causal_lm
    from rlhfkit.models.lora import adapter_config
    from rlhfkit.trainers.online_dpo import OnlineDPOConfig, train_online_dpo

    model_dir = tmp_path / "tiny"
    tiny_causal_lm(tokenizer, seed=3).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say something {i}"} for i in range(8)])
    (tmp_path / "rew.py").write_text("def reward(prompts, responses):\n    return [float(len(r)) for r in responses]\n")
    cfg = load_config(OnlineDPOConfig, overrides=[
        f"model.name={model_dir}", f"prompts.train={tmp_path / 'prompts.jsonl'}", f"scorer={tmp_path / 'rew.py'}:reward",
        "iterations=2", "prompts_per_iteration=4", "rollout.n=3", "rollout.max_new_tokens=6",
        "model.lora.enabled=true", "model.lora.r=4", "optim.lr=1e-3",
        "train.batch_size=2", "train.micro_batch_size=2", "train.max_steps=1", "train.progress=false",
        f"train.output_dir={tmp_path / 'run'}"])
    train_online_dpo(cfg)
    for k in (1, 2):  # iteration 2 trained the same adapter further, still on pi_0
        assert adapter_config(tmp_path / "run" / f"iter-{k}" / "model")["base_model_name_or_path"] == str(model_dir)
    from rlhfkit.cli import main

    assert main(["merge", str(tmp_path / "run" / "model"), "--out", str(tmp_path / "final")]) == 0
    assert (tmp_path / "final" / "config.json").is_file()


# --------------------------------------------------------------------------- gradient checkpointing

def _gc_on(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


@pytest.mark.parametrize("kind", ["causal", "scalar"])
@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(kind, lora):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
    )

    from rlhfkit.trainers.pg_score import response_values

    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0)
    torch.manual_seed(0)
    base = (LlamaForCausalLM if kind == "causal" else LlamaForSequenceClassification)(config)
    models = []
    for gc in (False, True):
        m = copy.deepcopy(base)
        if gc:
            enable_gradient_checkpointing(m)
        torch.manual_seed(1)
        m = apply_lora(m, LoraSection(enabled=lora, r=4, alpha=8), "CAUSAL_LM" if kind == "causal" else "SEQ_CLS")
        models.append(m.train())
    if lora:  # non-zero B, identical in both, so the adapters change the forward
        g = torch.Generator().manual_seed(2)
        for (n, p), (_, q) in zip(*(m.named_parameters() for m in models)):
            if "lora_B" in n:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                    q.copy_(p)
    assert not _gc_on(models[0]) and _gc_on(models[1])
    ids = torch.randint(1, 512, (3, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # one left-padded row
    for m in models:
        if kind == "causal":
            loss = -causal_logprobs(m, ids, mask, keep_last=5).sum()
        else:
            loss = response_values(m, ids, mask, 5).square().sum()
        loss.backward()
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in models]
    assert grads[0].keys() == grads[1].keys()
    assert all(g is not None for g in grads[1].values())  # checkpointing lost no gradient (LoRA: frozen inputs)
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5, msg=n)


def test_gradient_checkpointing_flag_reaches_every_trainer(tmp_path, tokenizer, tiny_model_dir):
    """model.gradient_checkpointing turns it on for SFT, RM, DPO (and online DPO, which runs DPO/SFT),
    PPO's actor and critic, and GRPO/RLOO (the same actor loader), with or without LoRA."""
    from pg_utils import base_config

    from rlhfkit.trainers.dpo import DPOConfig, build_policy_and_reference
    from rlhfkit.trainers.pg_setup import load_actor
    from rlhfkit.trainers.ppo import PPOConfig, load_critic

    for lora in (False, True):
        model = {"name": str(tiny_model_dir), "gradient_checkpointing": True, "lora": {**LORA, "enabled": lora}}
        common = {"model": model, "data": {"train": "x.jsonl"}}
        assert _gc_on(load_for_training(load_config(SFTConfig, data=common).model, "CAUSAL_LM")[0])
        assert _gc_on(load_for_training(load_config(RewardConfig, data=common).model, "SEQ_CLS",
                                        pad_token_id=tokenizer.pad_token_id)[0])
        policy, _ = build_policy_and_reference(load_config(DPOConfig, data=common), tokenizer)
        assert _gc_on(policy)
        cfg = load_config(PPOConfig, data=base_config(tmp_path, tokenizer, model=model, critic_init="policy",
                                                        mini_batch_size=8))
        actor, _ = load_actor(cfg.model, "cpu")
        assert _gc_on(actor) and _gc_on(load_critic(cfg, tokenizer, "cpu", actor=actor))


def test_adapter_records_an_absolute_base_and_loads_from_any_directory(tmp_path, tiny_model_dir, monkeypatch):
    """model.name given relative to the working directory: the saved adapter names its base by an
    absolute path, so peft loads it (base included) from anywhere."""
    import shutil

    from peft import AutoPeftModelForCausalLM

    from rlhfkit.models.lora import adapter_config
    from rlhfkit.trainers.sft import train_sft

    work = tmp_path / "work"
    shutil.copytree(tiny_model_dir, work / "base")
    write_jsonl(work / "train.jsonl", _sft_rows(8, 0))
    monkeypatch.chdir(work)
    train_sft(load_config(SFTConfig, data={
        "model": {"name": "base", "lora": LORA}, "data": {"train": "train.jsonl", "eval": "train.jsonl"},
        "train": {"output_dir": "run", "batch_size": 4, "micro_batch_size": 4, "max_steps": 1, "progress": False}}))
    assert adapter_config(work / "run" / "model")["base_model_name_or_path"] == str(work / "base")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model = AutoPeftModelForCausalLM.from_pretrained(str(work / "run" / "model"))
    assert model.peft_config["default"].base_model_name_or_path == str(work / "base")


def test_continuing_an_adapter_says_which_lora_settings_it_does_not_apply(tmp_path, tiny_model_dir, caplog):
    """A continued adapter keeps its own rank, alpha and targets; model.lora values that differ are
    named in a warning (they were silently unused), and matching ones give none."""
    from rlhfkit.config import ModelSection
    from rlhfkit.models.loading import load_causal_lm
    from rlhfkit.models.lora import apply_lora
    from rlhfkit.models.start import load_for_training

    first = ModelSection(name=str(tiny_model_dir))
    first.lora.enabled, first.lora.r, first.lora.alpha, first.lora.target_modules = True, 4, 8, ["q_proj", "v_proj"]
    apply_lora(load_causal_lm(str(tiny_model_dir)), first.lora, "CAUSAL_LM").save_pretrained(tmp_path / "adapter")
    again = ModelSection(name=str(tmp_path / "adapter"))
    again.lora.enabled, again.lora.r, again.lora.alpha, again.lora.target_modules = True, 4, 8, ["v_proj", "q_proj"]
    with caplog.at_level("WARNING", logger="rlhfkit"):
        load_for_training(again)
    assert "not applied" not in caplog.text
    again.lora.r, again.lora.dropout = 8, 0.3
    with caplog.at_level("WARNING", logger="rlhfkit"):
        load_for_training(again)
    assert "model.lora r 8 (the adapter's: 4); dropout 0.3 (the adapter's: 0.0) not applied" in caplog.text


def test_a_reward_adapter_is_told_by_its_task_type_or_its_saved_score_head(tmp_path):
    from rlhfkit.models.lora import is_seq_cls_adapter

    for name, config in [("task", {"task_type": "SEQ_CLS"}), ("head", {"modules_to_save": ["score"]}),
                         ("policy", {"task_type": "CAUSAL_LM", "modules_to_save": None})]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps(config))
    assert is_seq_cls_adapter(tmp_path / "task") and is_seq_cls_adapter(tmp_path / "head")
    assert not is_seq_cls_adapter(tmp_path / "policy") and not is_seq_cls_adapter(tmp_path / "missing")


def test_tied_embedding_targets_match_the_last_part_of_a_module_name():
    from rlhfkit.models.lora import tied_embedding_targets

    targets = ["q_proj", "model.embed_tokens", "lm_head", "model.layers.0.mlp.up_proj"]
    assert tied_embedding_targets(targets, tied=True) == ["lm_head", "model.embed_tokens"]
    assert tied_embedding_targets(targets, tied=False) == []
    assert tied_embedding_targets("all-linear", tied=True) == []  # leaves the LM head out


@pytest.mark.parametrize("command", ["sft", "dpo", "grpo"])
def test_lora_on_a_tied_lm_head_is_refused_before_anything_is_written(tmp_path, tiny_model_dir, capsys, command):
    """The tiny model (as SmolLM2) ties its LM head to the input embedding: an adapter on lm_head
    would change the embedding too when merged, so the merged model would not be the trained one."""
    from rlhfkit.cli import main
    from rlhfkit.models.lora import apply_lora

    data = {"sft": "task:sentiment/sft.jsonl", "dpo": "task:sentiment", "grpo": None}[command]
    argv = [command, f"model.name={tiny_model_dir}", "model.lora.enabled=true",
            "model.lora.target_modules=[lm_head,q_proj]", f"train.output_dir={tmp_path / 'run'}",
            *([f"data.train={data}"] if data else [])]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "model.lora.target_modules: lm_head: this model's LM head and input embedding are one tied matrix" in err
    assert not (tmp_path / "run").exists()
    seq_cls = load_scalar_model(tiny_model_dir)  # no LM head: its embedding is tied to nothing
    apply_lora(seq_cls, LoraSection(enabled=True, target_modules=["q_proj", "embed_tokens"]), "SEQ_CLS")
    with pytest.raises(ValueError, match="one tied matrix"):  # and in Python, where no command checked first
        apply_lora(load_causal_lm(tiny_model_dir), LoraSection(enabled=True, target_modules=["lm_head"]), "CAUSAL_LM")


def test_lora_on_a_mean_pooled_reward_model_is_refused_before_anything_is_written(tmp_path, tiny_model_dir,
                                                                                  tokenizer, capsys):
    """rm:DIR scores a LoRA adapter with the pooling its base's config.json records: a LoRA RM
    (pooling last) on a mean-pooled RM would be trained on one reading and scored on another."""
    from rlhfkit.cli import main
    from rlhfkit.models import save_pretrained_atomic, set_reward_pooling
    from rlhfkit.models.heads import stored_reward_pooling

    base = tmp_path / "rm_mean"
    model = load_scalar_model(tiny_model_dir, pad_token_id=tokenizer.pad_token_id)
    set_reward_pooling(model, "mean")
    save_pretrained_atomic(model, tokenizer, base)
    assert stored_reward_pooling(base) == "mean" and stored_reward_pooling(tiny_model_dir) == "last"
    train = write_jsonl(tmp_path / "train.jsonl", _pref_rows(8, 0))
    assert main(["rm", f"model.name={base}", f"data.train={train}", "model.lora.enabled=true",
                 f"train.output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "model.name: " in err and "records reward_pooling 'mean'" in err and "train without LoRA" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.filterwarnings("ignore:Could not find a config file")  # peft, saving an adapter whose base is one
def test_an_adapter_on_top_of_an_adapter_says_how_to_get_one_loadable_model(tmp_path, tiny_model_dir, caplog):
    """GRPO with LoRA from a LoRA SFT adapter trains fresh adapters on the merged SFT model: the
    saved adapter's base is the SFT adapter, which peft alone cannot apply; the run says so, and
    `rlhfkit merge` writes the chain as one model equal to what rlhfkit loads."""
    from rlhfkit.cli import main

    sft, grpo = tmp_path / "sft", tmp_path / "grpo"
    assert main(["sft", f"model.name={tiny_model_dir}", "data.train=task:sentiment/sft.jsonl", "model.lora.enabled=true",
                 "train.max_steps=1", "train.batch_size=2", "train.micro_batch_size=2", "train.report_to=[]",
                 "train.progress=false", f"train.output_dir={sft}"]) == 0
    with caplog.at_level("WARNING", logger="rlhfkit"):
        assert main(["grpo", f"model.name={sft / 'model'}", "model.lora.enabled=true", "prompts.limit=4",
                     "train.max_steps=1", "train.batch_size=2", "rollout.n=2", "rollout.max_new_tokens=4",
                     "train.micro_batch_size=4", "mini_batch_size=4", "train.report_to=[]", "train.progress=false",
                     f"train.output_dir={grpo}"]) == 0
    assert f"{grpo / 'model'} is an adapter on top of the adapter {sft / 'model'}" in caplog.text
    assert main(["merge", str(grpo / "model"), "--out", str(tmp_path / "merged")]) == 0
    ids = torch.tensor([[1, 5, 9, 13]])
    want = load_causal_lm(grpo / "model")(ids).logits  # the chain, merged level by level
    from transformers import AutoModelForCausalLM

    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(ids).logits, want,
                               atol=1e-4, rtol=1e-4)
