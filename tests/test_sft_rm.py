"""SFT and reward-model trainers on tiny random models: they learn, and the invariances hold."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_jsonl
from trainer_rows import pref_rows, read_metrics, sft_rows, trainer_cfg

from rlhfkit.config import RewardConfig, SFTConfig
from rlhfkit.trainers.reward import train_reward_model
from rlhfkit.trainers.sft import train_sft


def test_sft_learns_and_saves_loadable_model(tmp_path, tiny_model_dir):
    train = write_jsonl(tmp_path / "train.jsonl", sft_rows(64, 0))
    held = write_jsonl(tmp_path / "eval.jsonl", sft_rows(16, 1, held_out=True))
    cfg = trainer_cfg(SFTConfig, tmp_path, tiny_model_dir, train, held, train__max_steps=24)
    train_sft(cfg)
    m = read_metrics(tmp_path / "run")
    first = next(r for r in m if "eval/loss" in r)["eval/loss"]
    last = [r for r in m if "eval/loss" in r][-1]["eval/loss"]
    assert last < 0.5 * first, (first, last)  # held-out loss falls a lot, not just moves
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert model.config.vocab_size == json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    assert (tmp_path / "run" / "tb").is_dir() and (tmp_path / "run" / "sft_results.json").is_file()


def _params_after_one_step(tmp_path, tiny_model_dir, name, micro, packing=False):
    # data.limit=8 keeps the first 8 records: the longer rows must be among them so the rows have
    # different token counts (else dividing each micro-batch by its own count only rescales the step)
    train = write_jsonl(tmp_path / "train.jsonl", sft_rows(3, 3) + [
        {"prompt": "A longer prompt with several more words in it", "response": "and a longer reply too, see"}]
        + sft_rows(3, 4) + [{"prompt": "Hi", "response": "a much longer reply, with many more words than the rest"}]
        + sft_rows(2, 5))
    cfg = trainer_cfg(SFTConfig, tmp_path / name, tiny_model_dir, train, train, train__max_steps=1,
               train__micro_batch_size=micro)
    cfg.data.eval = ""
    cfg.data.eval_fraction = 0.0
    cfg.data.limit = 8
    # Adam's first step is lr * g / (|g| + eps): with the default eps a gradient near zero moves its
    # weight by up to lr whatever its size, so float32 rounding of the summed gradient (the head's
    # products run over other row counts) would show at lr scale; eps 1e-4 keeps the step
    # proportional to tiny gradients, so the weights compare the gradients
    cfg.optim.adam_eps = 1e-4
    train_sft(cfg)
    from safetensors.torch import load_file

    return load_file(str(tmp_path / name / "run" / "model" / "model.safetensors"))


def test_sft_batch8_accum1_equals_batch1_accum8(tmp_path, tiny_model_dir):
    a = _params_after_one_step(tmp_path, tiny_model_dir, "a", micro=8)
    b = _params_after_one_step(tmp_path, tiny_model_dir, "b", micro=1)
    from safetensors.torch import load_file

    init = load_file(str(tiny_model_dir / "model.safetensors"))
    moved = 0.0
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-6, rtol=1e-5)
        moved = max(moved, (a[k] - init[k]).abs().max().item())
    assert moved > 1e-3  # the step did move the weights (lr 3e-3, no weight decay)



def test_reward_model_learns_heldout_accuracy(tmp_path, tiny_model_dir):
    train = write_jsonl(tmp_path / "train.jsonl", pref_rows(64, 0))
    held = write_jsonl(tmp_path / "eval.jsonl", pref_rows(24, 1, held_out=True))
    cfg = trainer_cfg(RewardConfig, tmp_path, tiny_model_dir, train, held, train__max_steps=16)
    cfg.optim.lr = 1e-3
    train_reward_model(cfg)
    m = read_metrics(tmp_path / "run")
    evals = [r for r in m if "eval/accuracy" in r]
    assert evals[0]["step"] == 0 and evals[-1]["eval/accuracy"] >= 0.95
    assert evals[-1]["eval/margin"] > evals[0]["eval/margin"] + 0.5
    assert "eval/accuracy/even" in evals[-1] and "eval/accuracy/odd" in evals[-1]
    from transformers import AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "model")
    assert rm.config.num_labels == 1


def _rm_params_after_one_step(tmp_path, tiny_model_dir, name, micro):
    rows = pref_rows(7, 3) + [{"prompt": "A longer prompt with several more words in it, about colours.",
                                "chosen": "A long and friendly answer that goes on for a while.", "rejected": "No."}]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = trainer_cfg(RewardConfig, tmp_path / name, tiny_model_dir, train, train, train__max_steps=1,
               train__micro_batch_size=micro)
    cfg.data.eval, cfg.data.eval_fraction = "", 0.0
    cfg.center_rewards_coef = 0.1  # the centring term must accumulate exactly too
    cfg.optim.lr, cfg.optim.adam_eps = 0.05, 1.0  # Adam's first step ~ lr * grad: compares gradients
    metrics = train_reward_model(cfg)
    from safetensors.torch import load_file

    return metrics, load_file(str(tmp_path / name / "run" / "model" / "model.safetensors"))


def test_rm_label_smoothing_is_the_loss_it_trains_on(tmp_path, tiny_model_dir):
    """One pair, one step, the same start: the plain loss L0 = softplus(-d) gives d, and the
    smoothed loss must be -(1-e) log s(d) - e log s(-d) = L0 + e d of that same d."""
    import math

    row = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "Say something kind.", "chosen": "You are lovely.",
                                               "rejected": "Go away."}])

    def first_loss(name, e):
        cfg = trainer_cfg(RewardConfig, tmp_path / name, tiny_model_dir, row, row, train__max_steps=1,
                   train__batch_size=1, train__micro_batch_size=1, label_smoothing=e)
        cfg.data.eval, cfg.data.eval_fraction = "", 0.0
        return float(train_reward_model(cfg)["train/loss"])

    plain, smoothed = first_loss("plain", 0.0), first_loss("smoothed", 0.3)
    d = -math.log(math.expm1(plain))
    assert smoothed == pytest.approx(plain + 0.3 * d, abs=1e-5) and abs(d) > 1e-3


def test_use_margin_without_any_margin_in_the_data_is_refused(tmp_path, tiny_model_dir):
    """use_margin with no 'margin' field (or a misnamed one) would train exactly as without it."""
    from rlhfkit.config import ConfigError

    train = write_jsonl(tmp_path / "train.jsonl", [{**r, "margins": 1.0} for r in pref_rows(16, 0)])
    cfg = trainer_cfg(RewardConfig, tmp_path, tiny_model_dir, train, train, use_margin=True)
    with pytest.raises(ConfigError, match=r"use_margin: no training pair in .*train\.jsonl has a 'margin' field"):
        train_reward_model(cfg)
    assert not (tmp_path / "run").exists()


def test_a_probe_on_too_few_pairs_is_refused_before_anything_is_written(tmp_path, tiny_model_dir):
    """head_init probe cross-validates over 4 folds: fewer than 8 training pairs are refused with the
    data file named, before the run directory is written or the model loads."""
    from rlhfkit.config import ConfigError

    train = write_jsonl(tmp_path / "six.jsonl", pref_rows(6, 0))
    cfg = trainer_cfg(RewardConfig, tmp_path, tiny_model_dir, train, train, head_init="probe")
    cfg.data.eval, cfg.data.eval_fraction = "", 0.0
    with pytest.raises(ConfigError, match=r"head_init: probe fits the head by 4-fold cross-validation, which needs at "
                                          r"least 8 training pairs; .*six\.jsonl has 6 \(head_init: random"):
        train_reward_model(cfg)
    assert not (tmp_path / "run").exists()


def test_a_single_lora_target_module_name_is_a_list_of_one():
    """peft reads a string as a full-name regex: "q_proj" alone matched nothing; a regex stays one."""
    from rlhfkit.config import load_config

    def targets(value):
        cfg = load_config(SFTConfig, overrides=["data.train=x", f"model.lora.target_modules={value}"])
        return cfg.model.lora.target_modules

    assert targets("q_proj") == ["q_proj"] and targets("all-linear") == "all-linear"
    assert targets(".*q_proj") == ".*q_proj" and targets("[q_proj,v_proj]") == ["q_proj", "v_proj"]


def test_rm_batch8_accum1_equals_batch1_accum8(tmp_path, tiny_model_dir):
    (m8, a), (m1, b) = (_rm_params_after_one_step(tmp_path, tiny_model_dir, n, micro=m)
                        for n, m in (("a", 8), ("b", 1)))
    assert float(m8["train/loss"]) == pytest.approx(float(m1["train/loss"]), abs=1e-6)
    from safetensors.torch import load_file

    init = load_file(str(tiny_model_dir / "model.safetensors"))
    assert "score.weight" in a
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-6, rtol=1e-5)
    assert max((a[k] - init[k]).abs().max().item() for k in a if k in init) > 1e-3  # the step moved weights


def test_sft_packing_learns(tmp_path, tiny_model_dir):
    train = write_jsonl(tmp_path / "train.jsonl", sft_rows(64, 0))
    held = write_jsonl(tmp_path / "eval.jsonl", sft_rows(16, 1, held_out=True))
    cfg = trainer_cfg(SFTConfig, tmp_path, tiny_model_dir, train, held, train__max_steps=16, train__batch_size=2,
               train__micro_batch_size=2)
    cfg.packing = True
    cfg.data.max_length = 256
    train_sft(cfg)
    evals = [r for r in read_metrics(tmp_path / "run") if "eval/loss" in r]
    assert evals[-1]["eval/loss"] < 0.7 * evals[0]["eval/loss"]


@pytest.mark.parametrize("drop_last", [True, False])
def test_an_epoch_leaves_out_its_remainder_only_when_told_and_says_so(tmp_path, tiny_model_dir, capsys, drop_last):
    """18 examples in batches of 4: drop_last takes 4 batches and says 2 examples are left out of the
    epoch; drop_last=false takes 5 (the last completed from the next shuffle) and says nothing."""
    train = write_jsonl(tmp_path / "train.jsonl", sft_rows(18, 0))
    cfg = trainer_cfg(SFTConfig, tmp_path, tiny_model_dir, train, train, train__batch_size=4,
                      train__micro_batch_size=4, train__drop_last=drop_last)
    train_sft(cfg)
    steps = [r["step"] for r in read_metrics(tmp_path / "run") if "train/loss" in r]
    out = capsys.readouterr().out
    assert steps == list(range(1, 5 if drop_last else 6))
    assert ("[sft] batches of 4 leave 2 of the 18 training examples out of each epoch" in out) is drop_last, out


def test_bad_data_fails_before_training(tmp_path, tiny_model_dir):
    from rlhfkit.data import DataError

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "response": "ok"}) + "\n" + json.dumps({"prompt": "x", "respons": "y"}) + "\n")
    cfg = trainer_cfg(SFTConfig, tmp_path, tiny_model_dir, bad, bad, train__max_steps=1)
    with pytest.raises(DataError, match=r"bad.jsonl:2.*response"):
        train_sft(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def _forbid_model_loading(monkeypatch):
    """Fail the test if any model is loaded: data errors must surface before one."""
    import transformers

    def loaded(*a, **k):
        raise AssertionError("a model was loaded before the data was validated")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoModelForSequenceClassification):
        monkeypatch.setattr(cls, "from_pretrained", loaded)


@pytest.mark.parametrize("line, field, fragment", [
    ('{"prompt": "x", "response": }', None, "invalid JSON"),
    (json.dumps({"prompt": "x"}), "response", "missing"),
    (json.dumps({"prompt": "x", "response": 5}), "response", "got int"),
    (json.dumps({"prompt": "x", "response": "  "}), "response", "empty or whitespace-only text"),
    (json.dumps({"prompt": "", "response": "y"}), "prompt", "empty or whitespace-only text"),
    (json.dumps({"prompt": "x", "response": "word " * 200}), "response", "longer than max_length=96"),
    (json.dumps({"prompt": "word " * 200, "response": "y"}), "prompt", "the prompt is"),
    (json.dumps({"prompt": "x", "response": "y", "prompt_ids": [1] * 200, "response_ids": [2]}), "prompt", "the prompt is 200 tokens"),
    (json.dumps({"prompt": "x", "response": "y", "prompt_ids": [1] * 20, "response_ids": [2] * 90}), "response", "the conversation is 110 tokens"),
])
def test_bad_sft_data_names_file_line_and_field(tmp_path, tiny_model_dir, monkeypatch, line, field, fragment):
    from rlhfkit.data import DataError

    ok = json.dumps({"prompt": "hi", "response": "ok"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(f"{ok}\n{ok}\n{line}\n")
    _forbid_model_loading(monkeypatch)
    with pytest.raises(DataError) as info:
        train_sft(trainer_cfg(SFTConfig, tmp_path, tiny_model_dir, bad, bad, train__max_steps=1))
    msg = str(info.value)
    assert msg.startswith(f"{bad}:3: ") and (field is None or f"field '{field}'" in msg) and fragment in msg, msg
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("row, field, fragment", [
    ({"prompt": "x", "chosen": "a"}, "rejected", "missing"),
    ({"prompt": "x", "chosen": "a", "rejected": "a"}, "rejected", "identical to 'chosen'"),
    ({"prompt": "x " * 100, "chosen": "a", "rejected": "b"}, "prompt", "longer than max_length=96"),
])
def test_bad_reward_model_data_names_file_line_and_field(tmp_path, tiny_model_dir, monkeypatch, row, field, fragment):
    from rlhfkit.data import DataError

    bad = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "hi", "chosen": "yes", "rejected": "no"}, row])
    _forbid_model_loading(monkeypatch)
    with pytest.raises(DataError) as info:
        train_reward_model(trainer_cfg(RewardConfig, tmp_path, tiny_model_dir, bad, bad, train__max_steps=1))
    msg = str(info.value)
    assert msg.startswith(f"{bad}:2: field '{field}': ") and fragment in msg, msg


def test_a_list_of_training_sources_is_read_in_order_and_a_bad_line_names_its_own_file(tmp_path, tiny_model_dir,
                                                                                          tokenizer, monkeypatch):
    from rlhfkit.data import DataError
    from rlhfkit.trainers.reward import prepare_preference_data

    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "chosen": "yes", "rejected": "no"} for i in range(3)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "chosen": "good", "rejected": "bad"} for i in range(2)])
    cfg = trainer_cfg(RewardConfig, tmp_path, tiny_model_dir, "", "", data__train=[str(a), str(b)], data__eval=[str(b)])
    train, evals, _ = prepare_preference_data(cfg, tokenizer)
    assert len(train) == 5 and len(evals) == 2
    prompts = [tokenizer.decode(ex["prompt_ids"]) for ex in train]
    assert [p for p in prompts if "a0" in p or "a2" in p or "b1" in p] == [prompts[0], prompts[2], prompts[4]]
    assert train[3:] == evals  # a's pairs, then b's

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "chosen": "a"}])
    _forbid_model_loading(monkeypatch)
    cfg = trainer_cfg(RewardConfig, tmp_path, tiny_model_dir, "", "", data__train=[str(a), str(bad)], train__max_steps=1)
    with pytest.raises(DataError) as info:
        train_reward_model(cfg)
    assert str(info.value).startswith(f"{bad}:1: field 'rejected': "), info.value
    assert not (tmp_path / "run").exists()
