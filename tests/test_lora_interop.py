"""Adapters made by plain peft, bases named by hub id or relative path, LoRA targets given as a
regex: what rlhfkit reads from and writes for the tools users already have."""

from __future__ import annotations

import json
import os

import pytest
import torch

from rlhfkit.cli import main

COMMON = ["train.max_steps=1", "train.batch_size=2", "train.micro_batch_size=2", "train.report_to=[]",
          "train.progress=false", "data.train=task:sentiment/sft.jsonl"]


def _peft_adapter(base_dir, out, base_name=None):
    """An adapter as plain peft writes it: no tokenizer, the base recorded as it was named."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_name or base_dir)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")).save_pretrained(out)
    assert not (out / "tokenizer_config.json").exists()
    return out


def test_an_adapter_saved_without_a_tokenizer_trains_with_its_bases(tmp_path, tiny_model_dir):
    """peft's save_pretrained writes no tokenizer: the tokenizer is its base's, as for eval and merge."""
    from rlhfkit.models import load_tokenizer

    adapter = _peft_adapter(tiny_model_dir, tmp_path / "peft")
    assert load_tokenizer(adapter).get_vocab() == load_tokenizer(tiny_model_dir).get_vocab()
    assert main(["sft", f"model.name={adapter}", "model.lora.enabled=true", *COMMON,
                 f"train.output_dir={tmp_path / 'run'}"]) == 0
    saved = json.loads((tmp_path / "run" / "model" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(tiny_model_dir)


def test_continuing_an_adapter_whose_base_is_relative_records_it_absolute(tmp_path, tiny_model_dir, monkeypatch):
    """A base recorded as "../tiny" means the directory peft was run in; the continued adapter
    records where that is, so it loads from any directory."""
    from peft import AutoPeftModelForCausalLM

    (tmp_path / "work").mkdir()
    os.symlink(tiny_model_dir, tmp_path / "tiny")
    monkeypatch.chdir(tmp_path / "work")
    adapter = _peft_adapter(tiny_model_dir, tmp_path / "work" / "peft", base_name="../tiny")
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "../tiny"
    out = tmp_path / "run"
    assert main(["sft", f"model.name={adapter}", "model.lora.enabled=true", *COMMON, f"train.output_dir={out}"]) == 0
    base = json.loads((out / "model" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str(tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    AutoPeftModelForCausalLM.from_pretrained(out / "model")  # from another directory


def test_an_adapter_whose_base_is_not_there_is_refused_before_anything_is_written(tmp_path, tiny_model_dir, capsys):
    adapter = _peft_adapter(tiny_model_dir, tmp_path / "peft")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "../nowhere"}))
    capsys.readouterr()  # the progress bar of building the adapter
    assert main(["sft", f"model.name={adapter}", "model.lora.enabled=true", *COMMON,
                 f"train.output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.name: " in err and "its base model ../nowhere (relative to" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.filterwarnings("ignore:Could not find a config file")  # peft, offline: the base is not a directory
def test_a_base_named_by_hub_id_is_recorded_by_that_id(tmp_path, tiny_model_dir, monkeypatch):
    """A hub model read from the local cache: the adapter names the id, not the cache snapshot,
    which exists on no other machine."""
    import shutil

    from rlhfkit.models import load_causal_lm, load_scalar_model

    hub = tmp_path / "hf" / "hub" / "models--me--tiny"
    shutil.copytree(tiny_model_dir, hub / "snapshots" / "abc123")  # the cache's layout: snapshots/<revision>
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("abc123")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_causal_lm("me/tiny").name_or_path == "me/tiny"
    assert load_scalar_model("me/tiny").name_or_path == "me/tiny"
    out = tmp_path / "run"
    assert main(["sft", "model.name=me/tiny", "model.lora.enabled=true", *COMMON, f"train.output_dir={out}"]) == 0
    assert json.loads((out / "model" / "adapter_config.json").read_text())["base_model_name_or_path"] == "me/tiny"


@pytest.mark.parametrize("targets, match", [
    (".*embed_tokens", "model.embed_tokens: this model's LM head and input embedding are one tied matrix"),
    ("[]", "model.lora.target_modules: empty: name the layers to adapt"),
    ("[norm]", "names modules LoRA cannot adapt (LlamaRMSNorm)"),
    ("[layers]", "names modules LoRA cannot adapt (ModuleList)"),
])
def test_lora_targets_that_cannot_be_trained_as_asked_are_refused_before_anything_is_written(
        tmp_path, tiny_model_dir, capsys, targets, match):
    """A regex reaching the tied embedding (which the list form already refused; the merged model
    differed from the trained one by 70 in the logits), no targets at all, or modules peft cannot
    wrap: one line, nothing written."""
    assert main(["sft", f"model.name={tiny_model_dir}", "model.lora.enabled=true",
                 f"model.lora.target_modules={targets}", *COMMON, f"train.output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and match in err, err
    assert not (tmp_path / "run").exists()


def test_apply_lora_refuses_a_regex_on_the_tied_embedding(tiny_model_dir):
    from rlhfkit.config import LoraSection
    from rlhfkit.models import load_causal_lm
    from rlhfkit.models.lora import apply_lora, tied_embedding_targets

    assert tied_embedding_targets(r".*\.(q_proj|embed_tokens)", True, ["model.embed_tokens", "a.q_proj"]) == [
        "model.embed_tokens"]
    with pytest.raises(ValueError, match="one tied matrix"):
        apply_lora(load_causal_lm(tiny_model_dir), LoraSection(enabled=True, target_modules=".*embed_tokens"),
                   "CAUSAL_LM")


def test_merging_an_adapter_whose_weights_are_a_pickle_of_code_is_one_line(tmp_path, tiny_model_dir, capsys):
    adapter = _peft_adapter(tiny_model_dir, tmp_path / "peft")
    (adapter / "adapter_model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"x": Evil()}, adapter / "adapter_model.bin")
    capsys.readouterr()
    assert main(["merge", str(adapter), "--out", str(tmp_path / "merged")]) == 2
    out, err = capsys.readouterr()
    assert "ran" not in out and err.strip().count("\n") == 0 and "not loadable as weights alone" in err
    assert not (tmp_path / "merged").exists()


def test_a_reward_model_trained_elsewhere_is_scored_with_a_warning_naming_where_it_is_read(
        tmp_path, tiny_model_dir, tokenizer, caplog):
    """A TRL / plain-transformers RM (no reward_pooling in its config.json) is accepted as rm:DIR,
    with a warning that rlhfkit reads it at the end-of-turn token; rlhfkit's own RMs get none."""
    from rlhfkit.judges.reward_model import find_rm_dir
    from rlhfkit.models import load_scalar_model, save_pretrained_atomic, set_reward_pooling

    model = load_scalar_model(tiny_model_dir, pad_token_id=tokenizer.pad_token_id)
    save_pretrained_atomic(model, tokenizer, tmp_path / "trl_rm")
    set_reward_pooling(model, "last")
    save_pretrained_atomic(model, tokenizer, tmp_path / "ours")
    with caplog.at_level("WARNING", logger="rlhfkit"):
        find_rm_dir(str(tmp_path / "ours"))
        assert "was not written by `rlhfkit rm`" not in caplog.text
        find_rm_dir(str(tmp_path / "trl_rm"))
    assert f"rm:{tmp_path / 'trl_rm'}: " in caplog.text and "end-of-turn token" in caplog.text


def test_a_lora_adapter_directory_holds_the_generation_config_that_stops_like_rollouts(tmp_path, tiny_model_dir):
    """peft saves the adapter's weights and config only: the directory also holds the generation
    config whose stop tokens are the full model's (eos and end-of-turn)."""
    from transformers import GenerationConfig

    from rlhfkit.data.render import end_of_turn_ids
    from rlhfkit.models import load_tokenizer

    assert main(["sft", f"model.name={tiny_model_dir}", "model.lora.enabled=true", *COMMON,
                 f"train.output_dir={tmp_path / 'lora'}"]) == 0
    gen = GenerationConfig.from_pretrained(tmp_path / "lora" / "model")
    stops = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert set(end_of_turn_ids(load_tokenizer(tiny_model_dir))) <= set(stops)
