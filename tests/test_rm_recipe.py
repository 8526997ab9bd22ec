"""Reward-model recipe options on tiny random models: the head's own learning rate, the linear-probe
head (alone or before fine-tuning), a shallower backbone, pooling, training only the top layers,
and one accuracy definition in training and evaluation."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_jsonl
from trainer_rows import pref_rows, read_metrics, trainer_cfg

from rlhfkit.config import RewardConfig, SFTConfig, load_config
from rlhfkit.trainers.reward import train_reward_model


def test_head_lr_gives_the_scalar_head_its_own_param_group(tiny_model_dir):
    """optim.head_lr: the reward/value head trains at its own rate; everything else at optim.lr."""
    from rlhfkit.config import ModelSection, OptimSection
    from rlhfkit.models.start import load_for_training
    from rlhfkit.training import build_optimizer, build_scheduler

    model, _ = load_for_training(ModelSection(name=str(tiny_model_dir)), "SEQ_CLS", pad_token_id=0)
    head = {id(p) for p in model.score.parameters()}
    opt = build_optimizer(model, OptimSection(lr=1e-5, head_lr=1e-3, warmup_ratio=0.5, schedule="linear"))
    groups = [g for g in opt.param_groups if any(id(p) in head for p in g["params"])]
    assert len(groups) == 1 and groups[0]["lr"] == 1e-3 and {id(p) for p in groups[0]["params"]} == head
    others = [g for g in opt.param_groups if g is not groups[0]]
    assert others and all(g["lr"] == 1e-5 for g in others)
    n_all = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in opt.param_groups) == n_all  # nothing dropped or doubled
    sched = build_scheduler(opt, OptimSection(lr=1e-5, head_lr=1e-3, warmup_ratio=0.5, schedule="linear"), 4)
    opt.step()
    sched.step()  # warm-up scales both groups alike, keeping the 100x ratio
    assert groups[0]["lr"] == pytest.approx(100 * others[0]["lr"])
    plain = build_optimizer(model, OptimSection(lr=1e-5))
    assert all(g["lr"] == 1e-5 for g in plain.param_groups)


def test_rm_head_init_probe_ranks_before_any_gradient_step(tmp_path, tiny_model_dir):
    """head_init=probe: the head is fitted on frozen features first, so the step-0 evaluation
    (before any optimizer step) already ranks held-out pairs; the fitted head is what training
    starts from and what gets saved when the learning rate is ~0."""
    train = write_jsonl(tmp_path / "train.jsonl", pref_rows(64, 0))
    held = write_jsonl(tmp_path / "eval.jsonl", pref_rows(24, 1, held_out=True))
    cfg = trainer_cfg(RewardConfig, tmp_path, tiny_model_dir, train, held, train__max_steps=1)
    cfg.optim.lr, cfg.head_init = 1e-12, "probe"
    train_reward_model(cfg)
    m = read_metrics(tmp_path / "run")
    probe = next(r for r in m if "probe/cv_accuracy" in r)
    step0 = next(r for r in m if r["step"] == 0 and "eval/accuracy" in r)
    assert probe["probe/cv_accuracy"] >= 0.95 and probe["probe/train_accuracy"] >= 0.95
    assert step0["eval/accuracy"] >= 0.95 and step0["eval/margin"] > 0
    from transformers import AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "model")
    assert rm.score.weight.abs().sum().item() > 0


def test_rm_epochs_0_with_probe_saves_the_probe_alone(tmp_path, tiny_model_dir):
    """train.epochs=0 with head_init=probe: no optimizer step; the saved model is the backbone
    unchanged with the probe as its head, it scores held-out pairs as the step-0 evaluation did,
    and the run's final metrics are that evaluation. Without head_init=probe, epochs 0 is refused."""
    from safetensors.torch import load_file

    from rlhfkit.config import ConfigError
    from rlhfkit.data import load_preference
    from rlhfkit.eval.preference_sets import reward_accuracy
    from rlhfkit.judges.rewards import build_reward_fn

    train = write_jsonl(tmp_path / "train.jsonl", pref_rows(64, 0))
    held = write_jsonl(tmp_path / "eval.jsonl", pref_rows(24, 1, held_out=True))
    cfg = trainer_cfg(RewardConfig, tmp_path, tiny_model_dir, train, held, train__epochs=0.0, train__max_steps=0,
               head_init="probe", pooling="mean")
    final = train_reward_model(cfg)
    m = read_metrics(tmp_path / "run")
    assert max(r["step"] for r in m) == 0 and not any("train/loss" in r for r in m)
    assert final["eval/accuracy"] >= 0.95
    init = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    backbone = [k for k in after if k.replace("model.", "", 1) in {x.replace("model.", "", 1) for x in init}
                and "score" not in k]
    assert backbone
    for k in backbone:
        src = init.get(k, init.get(k.replace("model.", "", 1)))
        torch.testing.assert_close(after[k], src, atol=0, rtol=0)
    got = reward_accuracy(build_reward_fn(f"rm:{tmp_path / 'run'}"), load_preference(str(held)))
    assert got["accuracy"] == pytest.approx(final["eval/accuracy"])
    with pytest.raises(ConfigError, match=r"train\.epochs: 0 \(no fine-tuning\) needs head_init: probe"):
        load_config(RewardConfig, data={"data": {"train": "x.jsonl"}, "train": {"epochs": 0}})
    with pytest.raises(ConfigError, match=r"train\.epochs: set epochs > 0"):
        load_config(SFTConfig, data={"data": {"train": "x.jsonl"}, "train": {"epochs": 0}})


def test_rm_backbone_layers_saves_a_shallower_model_whose_head_reads_that_layer(tmp_path, tiny_model_dir):
    """backbone_layers=1 on the 2-layer model: the saved RM is an ordinary 1-layer model
    (config, weights, from_pretrained with nothing missing or left over); with the probe alone its
    token scores are the start model's layer-1 hidden state through the final norm and the head;
    rm:DIR scores as the trainer evaluated; a fine-tuning step runs on the cut model. A cut deeper
    than the model, a negative one and one with LoRA are refused before anything is written."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from rlhfkit.config import ConfigError
    from rlhfkit.data import load_preference
    from rlhfkit.eval.preference_sets import reward_accuracy
    from rlhfkit.judges.rewards import build_reward_fn

    train = write_jsonl(tmp_path / "train.jsonl", pref_rows(64, 0))
    held = write_jsonl(tmp_path / "eval.jsonl", pref_rows(24, 1, held_out=True))
    cfg = trainer_cfg(RewardConfig, tmp_path, tiny_model_dir, train, held, train__epochs=0.0, train__max_steps=0,
               head_init="probe", pooling="mean", backbone_layers=1)
    final = train_reward_model(cfg)
    out = tmp_path / "run" / "model"
    conf = json.loads((out / "config.json").read_text())
    assert conf["num_hidden_layers"] == 1 and len(conf.get("layer_types") or [None]) == 1
    assert not any(".layers.1." in k for k in load_file(str(out / "model.safetensors")))
    cut, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert len(cut.model.layers) == 1 and not any(info[k] for k in ("missing_keys", "unexpected_keys"))
    full = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    ids = torch.tensor([[5, 17, 42, 9, 3]])
    with torch.no_grad():
        h1 = full.model(ids, output_hidden_states=True).hidden_states[1]  # after decoder layer 0
        want = cut.score(cut.model.norm(h1))
        torch.testing.assert_close(cut(ids).logits, want[:, -1], rtol=1e-5, atol=1e-6)
    got = reward_accuracy(build_reward_fn(f"rm:{tmp_path / 'run'}"), load_preference(str(held)))
    assert got["accuracy"] == pytest.approx(final["eval/accuracy"])

    step = trainer_cfg(RewardConfig, tmp_path / "step", tiny_model_dir, train, held, train__max_steps=1, backbone_layers=1)
    train_reward_model(step)
    assert json.loads((tmp_path / "step" / "run" / "model" / "config.json").read_text())["num_hidden_layers"] == 1
    deep = trainer_cfg(RewardConfig, tmp_path / "deep", tiny_model_dir, train, held, backbone_layers=3)
    with pytest.raises(ConfigError, match="backbone_layers: 3, but .* has 2 decoder layers"):
        train_reward_model(deep)
    assert not (tmp_path / "deep" / "run").exists()
    with pytest.raises(ConfigError, match="backbone_layers"):
        load_config(RewardConfig, data={"data": {"train": "x.jsonl"}, "backbone_layers": -1})
    with pytest.raises(ConfigError, match="backbone_layers"):
        load_config(RewardConfig, data={"data": {"train": "x.jsonl"}, "backbone_layers": 1,
                                        "model": {"lora": {"enabled": True}}})


def test_keep_lower_layers_leaves_any_architecture_alone_at_0():
    """backbone_layers 0 (the default) never inspects the model; above 0 a GPT-2 scalar model's
    blocks (its `h` list) are cut; a backbone with no list of layers is one line naming the key."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from rlhfkit.models import keep_lower_layers
    from rlhfkit.models.heads import decoder_layers

    m = GPT2ForSequenceClassification(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, num_labels=1))
    assert keep_lower_layers(m, 0) is None and len(m.transformer.h) == 2
    assert keep_lower_layers(m, 1) == 2 and len(m.transformer.h) == 1 and m.config.n_layer == 1
    with pytest.raises(ValueError, match="backbone_layers: Linear has no list of decoder layers"):
        decoder_layers(torch.nn.Linear(2, 2), "backbone_layers")


def test_rm_mean_pooling_is_trained_saved_and_scored_the_same_way(tmp_path, tiny_model_dir):
    """pooling=mean: the probe, the training loss and the evaluation pool over response tokens,
    the saved config.json records it, and rm:DIR scores the held-out pairs exactly as the
    trainer's last evaluation did (same accuracy and mean margin)."""
    from rlhfkit.data import load_preference
    from rlhfkit.eval.preference_sets import reward_accuracy
    from rlhfkit.judges.rewards import build_reward_fn

    train = write_jsonl(tmp_path / "train.jsonl", pref_rows(64, 0))
    held = write_jsonl(tmp_path / "eval.jsonl", pref_rows(24, 1, held_out=True))
    cfg = trainer_cfg(RewardConfig, tmp_path, tiny_model_dir, train, held, train__max_steps=2)
    cfg.head_init, cfg.pooling, cfg.optim.lr = "probe", "mean", 1e-3
    final = train_reward_model(cfg)
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert saved["reward_pooling"] == "mean"
    m = read_metrics(tmp_path / "run")
    assert next(r for r in m if r["step"] == 0 and "eval/accuracy" in r)["eval/accuracy"] >= 0.95
    got = reward_accuracy(build_reward_fn(f"rm:{tmp_path / 'run'}"), load_preference(str(held)))
    assert got["accuracy"] == pytest.approx(final["eval/accuracy"])
    assert got["margin"] == pytest.approx(final["eval/margin"], rel=1e-4, abs=1e-5)


def test_rm_train_top_layers_moves_only_the_top(tmp_path, tiny_model_dir):
    """train_top_layers=1 on a 2-layer model: after a step the embeddings and layer 0 are the
    starting weights exactly; layer 1, the final norm's neighbours and the head moved."""
    from safetensors.torch import load_file

    from rlhfkit.config import ConfigError

    train = write_jsonl(tmp_path / "train.jsonl", pref_rows(16, 0))
    cfg = trainer_cfg(RewardConfig, tmp_path, tiny_model_dir, train, train, train__max_steps=1)
    cfg.train_top_layers, cfg.optim.lr = 1, 1e-2
    train_reward_model(cfg)
    init = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    lower = [k for k in after if "embed_tokens" in k or ".layers.0." in k]
    upper = [k for k in after if ".layers.1." in k and k.endswith("proj.weight")]
    assert lower and upper
    for k in lower:
        torch.testing.assert_close(after[k], init[k], atol=0, rtol=0)
    assert all((after[k] - init[k]).abs().max() > 1e-4 for k in upper)
    with pytest.raises(ConfigError, match="train_top_layers"):
        load_config(RewardConfig, data={"data": {"train": "x.jsonl"}, "train_top_layers": -1})
    with pytest.raises(ConfigError, match="pooling"):
        load_config(RewardConfig, data={"data": {"train": "x.jsonl"}, "pooling": "mean",
                                        "model": {"lora": {"enabled": True}}})
def test_rm_training_accuracy_counts_ties_as_half(tmp_path, tiny_model_dir, monkeypatch):
    """Training and held-out accuracy share `algos.pairwise_accuracy`: a model that ties every
    pair scores 0.5 in both (counting ties as wrong would log 0)."""
    import rlhfkit.trainers.reward as reward

    real = reward.pair_scores
    monkeypatch.setattr(reward, "pair_scores", lambda m, b: tuple(0.0 * s for s in real(m, b)))
    train = write_jsonl(tmp_path / "train.jsonl", pref_rows(16, 0))
    held = write_jsonl(tmp_path / "eval.jsonl", pref_rows(8, 1, held_out=True))
    cfg = trainer_cfg(RewardConfig, tmp_path, tiny_model_dir, train, held, train__max_steps=1)
    train_reward_model(cfg)
    m = read_metrics(tmp_path / "run")
    assert [r["train/accuracy"] for r in m if "train/accuracy" in r] == [0.5]
    assert all(r["eval/accuracy"] == 0.5 for r in m if "eval/accuracy" in r)


def test_rm_backbone_layers_starts_from_a_lora_policy_adapter(tmp_path, tiny_model_dir):
    """The documented next step after a LoRA SFT run: `rlhfkit rm` with backbone_layers on its
    model/ (an adapter, no config.json of its own) cuts the adapter's merged model, checked against
    the depth of the model under the adapter (it was refused, transformers finding no model_type)."""
    from rlhfkit.config import ConfigError, ModelSection
    from rlhfkit.models.loading import load_causal_lm, load_tokenizer
    from rlhfkit.models.lora import apply_lora

    lora = ModelSection(name=str(tiny_model_dir)).lora
    lora.enabled, lora.r = True, 4
    apply_lora(load_causal_lm(str(tiny_model_dir)), lora, "CAUSAL_LM").save_pretrained(tmp_path / "sft")
    load_tokenizer(tiny_model_dir).save_pretrained(tmp_path / "sft")  # as a trainer saves its adapter
    train = write_jsonl(tmp_path / "train.jsonl", pref_rows(32, 0))
    held = write_jsonl(tmp_path / "eval.jsonl", pref_rows(16, 1, held_out=True))
    cfg = trainer_cfg(RewardConfig, tmp_path, tmp_path / "sft", train, held, train__epochs=0.0, train__max_steps=0,
                      head_init="probe", pooling="mean", backbone_layers=1)
    train_reward_model(cfg)
    assert json.loads((tmp_path / "run" / "model" / "config.json").read_text())["num_hidden_layers"] == 1
    deep = trainer_cfg(RewardConfig, tmp_path / "deep", tmp_path / "sft", train, held, backbone_layers=3)
    with pytest.raises(ConfigError, match="backbone_layers: 3, but .*sft has 2 decoder layers"):
        train_reward_model(deep)
