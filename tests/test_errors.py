"""User errors end in one line on stderr and exit status 2, with no traceback (RLHFKIT_DEBUG=1
shows it): broken YAML, a missing run, an unreachable model, a model without a chat template, a
reward module that does not import, a closed pipe. And the fixes that go with them: a chat
template from the config, DPO's reference cache keyed by what it was computed from, DPO's
truncation summary."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_jsonl
from test_reliability import _cli, _sft_args, _sft_data

RLHFKIT = [sys.executable, "-m", "rlhfkit.cli"]


def _run(argv, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*RLHFKIT, *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})}, **kw)


def _one_error_line(err: str, command: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip() and "real_accelerator.py" not in ln]
    assert len(lines) == 1 and lines[0].startswith(f"rlhfkit {command}: error: "), err
    return lines[0]


def test_broken_pipeline_yaml_is_one_line(tmp_path, capsys):
    bad = tmp_path / "broken.yaml"
    bad.write_text("output_dir: runs/x\nstages:\n  - name: sft\n    kind: [sft\n")
    code, line = _cli(capsys, ["pipeline", "-c", str(bad)])
    assert code == 2 and line == (f"rlhfkit pipeline: error: {bad}: invalid YAML at line 5, column 1: while parsing "
                                  "a flow sequence, expected ',' or ']', but got '<stream end>'"), line


def test_a_pipeline_without_stages_is_refused_before_anything_is_written(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text(f"output_dir: {tmp_path / 'out'}\nstages: []\n")
    code, line = _cli(capsys, ["pipeline", "-c", str(empty)])
    assert code == 2 and line == (f"rlhfkit pipeline: error: {empty}: stages: empty; a pipeline runs at least one "
                                  "stage (see configs/demo.yaml)"), line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, reason", [("[1", "not readable as JSON"), ("[1, 2]", "expected a JSON object")])
def test_merge_of_an_adapter_whose_config_does_not_read_is_one_line(tmp_path, capsys, text, reason):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(text)
    code, line = _cli(capsys, ["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")])
    config = tmp_path / "adapter" / "adapter_config.json"
    assert code == 2 and line.startswith(f"rlhfkit merge: error: {config}: {reason}"), line
    assert not (tmp_path / "merged").exists()


def test_report_of_a_missing_run_is_one_line(tmp_path, capsys):
    code, line = _cli(capsys, ["report", str(tmp_path / "nonexistent")])
    assert code == 2 and line == f"rlhfkit report: error: run directory not found: {tmp_path / 'nonexistent'}"


def test_report_reads_a_tampered_run_safely(tmp_path, capsys):
    """A stage config with a YAML tag that would run code is a warning naming the file (the tag never
    runs), and the page shows the rest; a config that is not a mapping and metrics rows that are
    not objects are skipped, and the report is built from the rest."""
    bad = tmp_path / "tagged" / "sft"
    bad.mkdir(parents=True)
    (bad / "sft_config.yaml").write_text(f'a: !!python/object/apply:os.system ["touch {tmp_path}/ran"]\n')
    (bad / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1.0}\n')
    code, _ = _cli(capsys, ["report", str(tmp_path / "tagged")])
    warnings = json.loads((tmp_path / "tagged" / "report_warnings.json").read_text())
    (w,) = [w for w in warnings if w["kind"] == "unreadable"]
    assert code == 0 and w["path"] == str(bad / "sft_config.yaml")
    assert "could not determine a constructor" in w["message"] and "sft Training loss" in (
        tmp_path / "tagged" / "report.html").read_text()
    assert not (tmp_path / "ran").exists()
    odd = tmp_path / "odd" / "sft"
    odd.mkdir(parents=True)
    (odd / "sft_config.yaml").write_text("- a\n")
    (odd / "metrics.jsonl").write_text('[1, 2]\n"text"\n{"step": 1, "train/loss": 1.0}\n'
                                       '{"step": 2, "train/loss": 0.5}\n')
    code, _ = _cli(capsys, ["report", str(tmp_path / "odd")])
    assert code == 0 and (tmp_path / "odd" / "report.html").is_file()


def test_report_into_a_directory_is_one_line_naming_it(tmp_path, capsys):
    run = tmp_path / "run" / "sft"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1.0}\n')
    (tmp_path / "pages").mkdir()
    code, line = _cli(capsys, ["report", str(tmp_path / "run"), "--out", str(tmp_path / "pages")])
    assert code == 2 and line == (f"rlhfkit report: error: --out: {tmp_path / 'pages'} is a directory; name the page "
                                  f"to write, e.g. {tmp_path / 'pages' / 'report.html'}"), line
    assert not any((tmp_path / "pages").iterdir())


def test_output_dir_that_is_a_file_is_refused(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "afile").write_text("x")
    code, line = _cli(capsys, _sft_args(tiny_model_dir, _sft_data(tmp_path / "d.jsonl"), tmp_path / "afile"))
    assert code == 2 and "train.output_dir: " in line and "is not a directory" in line, line
    code, line = _cli(capsys, _sft_args(tiny_model_dir, tmp_path / "d.jsonl", tmp_path / "afile" / "run"))
    assert code == 2 and "is a file, not a directory" in line, line


@pytest.mark.parametrize("offline", [True, False])
def test_an_unreachable_model_fails_fast_in_one_line(tmp_path, offline):
    """Neither a local path nor in the Hugging Face cache, with no network: said at once, not
    after a minute of retries and a long traceback."""
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1" if offline else "0", "HF_ENDPOINT": "https://127.0.0.1:9"}  # nothing listens
    data = _sft_data(tmp_path / "d.jsonl")
    t0 = time.time()
    res = _run(_sft_args("someorg/some-model", data, tmp_path / "run"), env=env)
    line = _one_error_line(res.stderr, "sft")
    assert res.returncode == 2 and time.time() - t0 < 60
    assert "model 'someorg/some-model': not a local path" in line and "smollm2-135m-instruct" in line
    assert ("HF_HUB_OFFLINE is set" if offline else "https://127.0.0.1:9 cannot be reached") in line
    assert not (tmp_path / "run").exists()


def _templateless_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").unlink()
    return dst


def test_a_model_without_chat_template_names_the_key_and_the_key_fixes_it(tmp_path, tiny_model_dir, capsys):
    model = _templateless_model(tiny_model_dir, tmp_path / "base")
    data = _sft_data(tmp_path / "d.jsonl")
    code, line = _cli(capsys, _sft_args(model, data, tmp_path / "run"))
    assert code == 2 and "has no chat template" in line and "set data.chat_template" in line, line
    assert "ppo, grpo, rloo, online-dpo and eval take the template from the model" in line
    assert not (tmp_path / "run").exists()
    code, _ = _cli(capsys, _sft_args(model, data, tmp_path / "run", "data.chat_template=chatml"))
    assert code == 0
    from rlhfkit.data.chat_templates import CHATML
    from rlhfkit.models import load_tokenizer

    assert load_tokenizer(tmp_path / "run" / "model").chat_template == CHATML  # later stages find it
    jinja = tmp_path / "mine.jinja"
    jinja.write_text(CHATML.replace("<|im_start|>assistant", "<|im_start|>assistant"))
    assert _cli(capsys, _sft_args(model, data, tmp_path / "run2", f"data.chat_template={jinja}"))[0] == 0


def test_a_reward_module_with_a_syntax_error_is_one_line(tmp_path, tokenizer, capsys):
    from pg_utils import tiny_policy_dir, write_prompts

    bad = tmp_path / "reward.py"
    bad.write_text("def score(prompts, responses):\n    return [1.0 for r in responses\n")
    code, line = _cli(capsys, ["grpo", f"model.name={tiny_policy_dir(tokenizer, tmp_path / 'policy')}",
                               f"prompts.train={write_prompts(tmp_path / 'p.jsonl')}", f"reward.spec={bad}:score",
                               f"train.output_dir={tmp_path / 'run'}", "rollout.n=2", "train.batch_size=2",
                               "mini_batch_size=4", "train.max_steps=1", "train.progress=false"])
    assert code == 2 and line.startswith("rlhfkit grpo: error: ") and f"syntax error in {bad}:2" in line, line


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    from rlhfkit.cli import main

    monkeypatch.setenv("RLHFKIT_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(["report", str(tmp_path / "nonexistent")])


def test_print_config_into_a_closed_pipe_is_quiet(tmp_path):
    cmd = [*RLHFKIT, "dpo", "--print-config", "data.train=x.jsonl"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # like `| head` exiting before reading
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


# --------------------------------------------------------------------------- DPO

def _pairs(path: Path, n: int, word: str) -> Path:
    rows = [{"prompt": f"Do you like {word} number {i}?", "chosen": " ".join(["yes"] * (1 + i % 3)),
             "rejected": " ".join(["no"] * (1 + i % 2))} for i in range(n)]
    return write_jsonl(path, rows)


def _dpo_args(model_dir, data, out, *extra):
    return ["dpo", f"model.name={model_dir}", f"data.train={data}", "data.eval_fraction=0", "data.max_length=64",
            f"train.output_dir={out}", "train.batch_size=4", "train.micro_batch_size=4", "train.max_steps=2",
            "train.save_every=1", "train.progress=false", "dpo.precompute_ref_logps=true", *extra]


def test_dpo_reference_cache_is_keyed_by_what_it_was_computed_from(tmp_path, tiny_model_dir, capsys):
    """Continued on other pairs (allowed explicitly), the precomputed reference log-probs are
    recomputed for them instead of silently reusing the old pairs' numbers (same count) or
    failing (another count)."""
    a, b, c = _pairs(tmp_path / "a.jsonl", 8, "apples"), _pairs(tmp_path / "b.jsonl", 8, "rivers"), \
        _pairs(tmp_path / "c.jsonl", 12, "stones")
    assert _cli(capsys, _dpo_args(tiny_model_dir, b, tmp_path / "b"))[0] == 0  # the right numbers for b
    expect = json.loads((tmp_path / "b" / "ref_logps.json").read_text())["train"]
    out = tmp_path / "run"
    assert _cli(capsys, _dpo_args(tiny_model_dir, a, out))[0] == 0
    first = json.loads((out / "ref_logps.json").read_text())["train"]
    assert first != expect
    for data, steps in ((b, 3), (c, 4)):
        code, line = _cli(capsys, ["dpo", "--resume", *_dpo_args(tiny_model_dir, data, out)[1:],
                                   f"train.max_steps={steps}", "train.resume_mismatch_ok=true"])
        assert code == 0, line
        if data is b:
            assert json.loads((out / "ref_logps.json").read_text())["train"] == expect
        else:
            assert len(json.loads((out / "ref_logps.json").read_text())["train"]) == 12


def test_dpo_reference_cache_is_keyed_by_the_temperature(tmp_path, tiny_model_dir, capsys):
    """Log-probs at another dpo.temperature are other numbers: a resume that changes it (allowed
    explicitly) recomputes the cached reference log-probs."""
    data = _pairs(tmp_path / "a.jsonl", 8, "apples")
    assert _cli(capsys, _dpo_args(tiny_model_dir, data, tmp_path / "t", "dpo.temperature=0.5"))[0] == 0
    expect = json.loads((tmp_path / "t" / "ref_logps.json").read_text())["train"]
    out = tmp_path / "run"
    assert _cli(capsys, _dpo_args(tiny_model_dir, data, out))[0] == 0
    assert json.loads((out / "ref_logps.json").read_text())["train"] != expect
    code, line = _cli(capsys, ["dpo", "--resume", *_dpo_args(tiny_model_dir, data, out)[1:], "train.max_steps=3",
                               "dpo.temperature=0.5", "train.resume_mismatch_ok=true"])
    assert code == 0, line
    assert json.loads((out / "ref_logps.json").read_text())["train"] == expect


def test_dpo_prints_its_truncation_summary(tmp_path, tiny_model_dir, capsys):
    long = write_jsonl(tmp_path / "long.jsonl", [
        {"prompt": "word " * 40 + str(i), "chosen": "yes " * 30, "rejected": "no"} for i in range(8)])
    from rlhfkit.cli import main

    assert main(_dpo_args(tiny_model_dir, long, tmp_path / "run", "data.truncation=right", "data.max_length=32")) == 0
    assert "[dpo] train truncation (max_length 32): " in capsys.readouterr().out


def test_deepspeeds_cpu_fallback_note_is_dropped_and_nothing_else():
    """transformers' save imports DeepSpeed when it is installed, which then warns on every CPU run
    that it falls back to the CPU; rlhfkit drops that one line, no other DeepSpeed message."""
    import logging

    import rlhfkit  # noqa: F401  (installs the filter)

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    ds, handler = logging.getLogger("DeepSpeed"), Keep()
    ds.addHandler(handler)
    try:
        ds.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
        ds.warning("ZeRO stage 2: something else")
    finally:
        ds.removeHandler(handler)
    assert seen == ["ZeRO stage 2: something else"]


@pytest.mark.parametrize("argv", [["eval", "policies=[a]"], ["pipeline", "-c", "configs/demo.yaml"]])
def test_eval_and_pipeline_under_torchrun_are_refused_in_one_line(monkeypatch, capsys, argv):
    """Single-process orchestration: under torchrun each rank would run it into one directory."""
    from rlhfkit.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "runs on one process" in err[0] and "without torchrun" in err[0], err


def test_eval_help_describes_eval(capsys):
    """eval has no checkpoints, optimizer or in-training evaluation: its help offers none of them,
    and says task:NAME means the task's held-out prompts."""
    from rlhfkit.cli import main
    from rlhfkit.config import ConfigError, load_config
    from rlhfkit.eval.config import EvalConfig

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    assert "--resume" not in out and "--overwrite" not in out and "optim.lr" not in out
    assert "task:NAME (its\n        prompts_eval.jsonl)" in out and "prompts.eval_limit" not in out
    with pytest.raises(ConfigError, match=r"prompts\.eval: unknown key"):
        load_config(EvalConfig, overrides=["policies=[a]", "prompts.eval=x.jsonl"])


def test_config_ergonomics_that_lost_settings_or_trained_by_mistake(tmp_path, capsys):
    """A key given twice in a YAML mapping, a list override missing its bracket, -c given twice:
    each is one line naming the problem (each silently dropped a setting before); --explain alone
    prints the config and trains nothing; --version answers."""
    from rlhfkit.cli import main
    from rlhfkit.config import ConfigError, SFTConfig, load_config

    dup = tmp_path / "dup.yaml"
    dup.write_text("optim: {lr: 0.1}\noptim: {schedule: linear}\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: invalid YAML at line 2, column 1: key 'optim' given twice"):
        load_config(SFTConfig, dup)
    anchors = tmp_path / "anchors.yaml"  # a merge key may be overridden: not a duplicate
    anchors.write_text("data: {train: x.jsonl}\nbase: &b {lr: 0.5, schedule: linear}\noptim:\n  <<: *b\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"base: unknown key"):
        load_config(SFTConfig, anchors)
    with pytest.raises(ConfigError, match=r"override data\.train: invalid YAML list .*: \[a\.jsonl,b\.jsonl$"):
        load_config(SFTConfig, overrides=["data.train=[a.jsonl,b.jsonl"])
    with pytest.raises(ConfigError, match=r"expected a list of key\.path=value strings"):
        load_config(SFTConfig, overrides="optim.lr=1e-4")
    cfg = tmp_path / "sft.yaml"
    cfg.write_text("data: {train: x.jsonl}\n")
    with pytest.raises(SystemExit):
        main(["sft", "-c", str(cfg), "-c", str(dup), "--print-config"])
    assert "-c given twice" in capsys.readouterr().err
    assert main(["sft", "-c", str(cfg), "--explain", f"train.output_dir={tmp_path / 'run'}"]) == 0
    assert "# The model to fine-tune." in capsys.readouterr().out and not (tmp_path / "run").exists()
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("rlhfkit ")


def test_the_interrupted_line_is_the_last_line(monkeypatch, capsys):
    """Ctrl-C during a run: its progress bar is closed before the one line, not redrawn after it."""
    import sys

    from tqdm.auto import tqdm

    from rlhfkit import cli

    def interrupted(*a, **k):
        bar = tqdm(total=10, desc="sft", file=sys.stderr)
        bar.update(3)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_trainer", interrupted)
    assert cli.main(["sft", "data.train=x"]) == 130
    err = capsys.readouterr().err
    assert err.rstrip("\n").rsplit("\n", 1)[-1].rsplit("\r", 1)[-1] == "rlhfkit sft: interrupted", repr(err[-200:])


def test_log_level_is_accepted_after_the_command_and_checked(capsys):
    from rlhfkit.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["sft", "--log-level", "info"]).log_level == "INFO"
    assert parser.parse_args(["--log-level", "debug", "sft"]).log_level == "DEBUG"
    assert parser.parse_args(["sft"]).log_level in ("DEBUG", "INFO", "WARNING", "ERROR")
    with pytest.raises(SystemExit):
        parser.parse_args(["--log-level", "bogus", "sft"])
    assert "invalid choice: 'BOGUS'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["make-data", "--task", "nosuch", "--out", "x"], "rlhfkit make-data: error: argument --task: invalid choice"),
    (["make-data", "--task", "sentiment"], "rlhfkit make-data: error: the following arguments are required: --out"),
    (["eval", "--resume"], "rlhfkit eval: error: unrecognized arguments: --resume (`rlhfkit eval --help`"),
    (["sft", "-c", "a.yaml", "--nosuch", "x=1"], "rlhfkit sft: error: unrecognized arguments: --nosuch (`rlhfkit sft"),
    (["report", "a", "b"], "rlhfkit report: error: comparing several runs needs --out FILE"),
    (["sft", "-c", "a.yaml", "-c", "b.yaml"], "rlhfkit sft: error: -c given twice"),
    (["nosuch"], "rlhfkit: error: argument command: invalid choice: 'nosuch'"),
])
def test_a_usage_error_is_one_line(tmp_path, capsys, argv, message):
    """What argparse refuses is one line naming the command, with where to find the usage, and
    exit status 2 (argparse's own print the usage block first)."""
    from rlhfkit.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and err.startswith(message), err
    assert err.rstrip().endswith("--help` for usage)")


def test_a_reward_model_given_as_the_policy_is_refused_before_anything_is_written(tmp_path, tiny_model_dir,
                                                                                tokenizer, capsys):
    """A reward model's or critic's directory (*ForSequenceClassification) where a policy is wanted
    (model.name of a training command, an eval policy or baseline) is refused in one line naming
    the key, before anything is written: loaded as a causal LM it would train or sample with a
    random LM head. load_causal_lm refuses it too."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from rlhfkit.models import load_causal_lm, save_pretrained_atomic

    rm_dir = tmp_path / "rm" / "model"
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1,
                                                            pad_token_id=tokenizer.pad_token_id)
    save_pretrained_atomic(rm, tokenizer, rm_dir)
    data = _sft_data(tmp_path / "d.jsonl")
    code, line = _cli(capsys, _sft_args(rm_dir, data, tmp_path / "sft"))
    assert code == 2 and line.startswith(f"rlhfkit sft: error: model.name: {rm_dir} is not a policy: its config.json "
                                         "says LlamaForSequenceClassification (a reward model or critic)"), line
    assert not (tmp_path / "sft").exists()
    code, line = _cli(capsys, ["eval", f"baseline={tiny_model_dir}", f"policies=[{rm_dir}]", "prompts.train=task:sentiment",
                               f"train.output_dir={tmp_path / 'ev'}"])
    assert code == 2 and line.startswith(f"rlhfkit eval: error: policies: {rm_dir} is not a policy"), line
    assert not (tmp_path / "ev").exists()
    with pytest.raises(ValueError, match="is not a policy"):
        load_causal_lm(rm_dir, torch.float32)
    load_causal_lm(tiny_model_dir, torch.float32)  # a policy still loads


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _pickle_that_runs_code(d: Path) -> None:
    """The weights as a pytorch_model.bin whose pickle would run a shell command if unpickled freely."""
    import pickle

    (d / "model.safetensors").unlink()
    _RunsCode.marker = d / "ran"
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _RunsCode()}))


def _sharded(d: Path, kind: str) -> None:
    """The weights as one shard named by an index: a safetensors shard that is a pickle, or a .bin
    shard whose pickle would run code."""
    import pickle

    (d / "model.safetensors").unlink()
    _RunsCode.marker = d / "ran"
    name = "model-00001-of-00001.safetensors" if kind == "safetensors" else "pytorch_model-00001-of-00001.bin"
    (d / name).write_bytes(pickle.dumps({"w": _RunsCode()}))
    index = "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
    (d / index).write_text(json.dumps({"weight_map": {"model.embed_tokens.weight": name}}))


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "config.json").write_text("{}"), "config.json: no model_type"),
    (lambda d: _sharded(d, "safetensors"), "model-00001-of-00001.safetensors: not a readable safetensors file"),
    (lambda d: _sharded(d, "bin"), "pytorch_model-00001-of-00001.bin: not loadable as weights alone (UnpicklingError"),
    (lambda d: _sharded(d, "bin") or (d / "pytorch_model-00001-of-00001.bin").unlink(),
     "pytorch_model.bin.index.json: names pytorch_model-00001-of-00001.bin, which is not a file in"),
    (lambda d: (d / "config.json").write_text("[1"), "config.json: not readable as JSON"),
    (lambda d: (d / "model.safetensors").unlink(), "has no weights: it holds a config.json but none of"),
    (lambda d: (d / "model.safetensors").write_text("garbage"), "model.safetensors: not a readable safetensors file"),
    (lambda d: _pickle_that_runs_code(d), "pytorch_model.bin: not loadable as weights alone (UnpicklingError"),
])
def test_a_model_directory_that_cannot_load_is_refused_before_anything_is_written(tmp_path, tiny_model_dir, capsys,
                                                                                   damage, message):
    """A model directory whose config names no model type, whose weights are missing, or whose
    safetensors header does not read is one line naming the key and the file, for a training
    command's model.name and for an evaluated policy, before anything is written or any model loads."""
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    damage(bad)
    data = _sft_data(tmp_path / "d.jsonl")
    code, line = _cli(capsys, _sft_args(bad, data, tmp_path / "sft"))
    assert code == 2 and line.startswith("rlhfkit sft: error: model.name: ") and message in line, line
    assert not (tmp_path / "sft").exists()
    code, line = _cli(capsys, ["eval", f"baseline={tiny_model_dir}", f"policies=[{bad}]",
                               "prompts.train=task:sentiment", f"train.output_dir={tmp_path / 'ev'}"])
    assert code == 2 and line.startswith("rlhfkit eval: error: policies: ") and message in line, line
    assert not (tmp_path / "ev").exists() and not (bad / "ran").exists()


def test_overrides_may_follow_the_flags(tmp_path, capsys):
    """`rlhfkit sft -c X --resume optim.lr=1e-3` (docs/reliability.md's example): overrides after a
    flag are overrides, in the order given, as before it; an unknown flag is still argparse's error."""
    import yaml

    from rlhfkit.cli import main

    cfg = tmp_path / "sft.yaml"
    cfg.write_text("data: {train: x.jsonl}\n")
    assert main(["sft", "-c", str(cfg), "optim.lr=2", "--print-config", "optim.lr=1e-3", "train.seed=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 1e-3 and printed["train"]["seed"] == 3
    with pytest.raises(SystemExit):
        main(["sft", "-c", str(cfg), "--print-config", "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    data = _sft_data(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    args = ["sft", f"data.train={data}", f"train.output_dir={out}", "model.name=some/model"]
    (out).mkdir()
    (out / "sft_run.json").write_text("{}")
    (out / "checkpoints" / "step-00000002").mkdir(parents=True)
    code = main([*args, "--resume", "optim.lr=1e-3"])
    err = capsys.readouterr().err
    assert code == 2 and "unrecognized arguments" not in err and err.startswith("rlhfkit sft: error: ")


def _model_with_code(src: Path, dst: Path, model_type: str) -> Path:
    """A model directory whose config.json points at Python code shipped with it (auto_map);
    the code writes a marker file when imported."""
    shutil.copytree(src, dst)
    marker = dst.parent / f"RAN_{model_type}"
    (dst / "evil_modeling.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        f"class EvilConfig(LlamaConfig):\n    model_type = {model_type!r}\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(model_type=model_type, auto_map={"AutoConfig": "evil_modeling.EvilConfig",
                                                "AutoModelForCausalLM": "evil_modeling.EvilForCausalLM"})
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("command", ["sft", "rm", "grpo"])
def test_a_model_directory_with_its_own_code_is_refused_and_its_code_never_runs(tmp_path, tiny_model_dir, capsys,
                                                                                 command):
    model = _model_with_code(tiny_model_dir, tmp_path / "evil", "evil")
    argv = {"sft": _sft_args(model, _sft_data(tmp_path / "d.jsonl"), tmp_path / "run"),
            "rm": ["rm", f"model.name={model}", "data.train=task:sentiment", f"train.output_dir={tmp_path / 'run'}"],
            "grpo": ["grpo", f"model.name={model}", f"train.output_dir={tmp_path / 'run'}"]}[command]
    code, line = _cli(capsys, argv)
    assert code == 2 and "model.name:" in line and "never runs code from a model directory" in line, line
    assert not (tmp_path / "run").exists() and not (tmp_path / "RAN_evil").exists()


def test_a_known_architecture_with_an_auto_map_loads_without_running_the_shipped_code(tmp_path, tiny_model_dir):
    from rlhfkit.models import load_causal_lm, load_scalar_model, load_tokenizer

    model = _model_with_code(tiny_model_dir, tmp_path / "llama_with_code", "llama")
    assert type(load_causal_lm(model)).__name__ == "LlamaForCausalLM"
    assert type(load_scalar_model(model)).__name__ == "LlamaForSequenceClassification"
    load_tokenizer(model)
    assert not (tmp_path / "RAN_llama").exists()


def test_a_base_model_given_a_template_saves_a_generation_config_that_stops_at_its_end_of_turn(
        tmp_path, tiny_model_dir, capsys):
    """A base model whose eos is <|endoftext|>, given ChatML by data.chat_template, learns to end a
    reply with <|im_end|>: its saved generation_config stops there too (as rlhfkit's rollouts do),
    so transformers' generate does not run past it."""
    from transformers import AutoTokenizer, GenerationConfig

    model = _templateless_model(tiny_model_dir, tmp_path / "base")
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "<|endoftext|>"
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    gen = json.loads((model / "generation_config.json").read_text())
    gen.update(eos_token_id=0, pad_token_id=None)
    (model / "generation_config.json").write_text(json.dumps(gen))
    data = _sft_data(tmp_path / "d.jsonl")
    assert _cli(capsys, _sft_args(model, data, tmp_path / "run", "data.chat_template=chatml"))[0] == 0
    saved = GenerationConfig.from_pretrained(tmp_path / "run" / "model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "model")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert saved.eos_token_id == sorted({0, im_end}) and saved.pad_token_id == tok.pad_token_id


def test_chatml_on_a_vocabulary_without_its_tokens_is_refused(tmp_path, tiny_model_dir, capsys):
    """A base model whose vocabulary has no <|im_start|> / <|im_end|> (as Llama, Mistral or GPT-2
    base): ChatML's end marker would be text in pieces, never an end-of-turn token to learn."""
    model = _templateless_model(tiny_model_dir, tmp_path / "base")
    tj = json.loads((model / "tokenizer.json").read_text())
    renamed = {"<|im_start|>": "<bos_x>", "<|im_end|>": "<eos_x>"}
    for tok in tj["added_tokens"]:
        tok["content"] = renamed.get(tok["content"], tok["content"])
    vocab = tj["model"]["vocab"]
    for old, new in renamed.items():
        vocab[new] = vocab.pop(old)
    (model / "tokenizer.json").write_text(json.dumps(tj))
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg.update(bos_token="<bos_x>", eos_token="<eos_x>")
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    code, line = _cli(capsys, _sft_args(model, _sft_data(tmp_path / "d.jsonl"), tmp_path / "run",
                                        "data.chat_template=chatml"))
    assert code == 2 and "data.chat_template: chatml needs <|im_start|> and <|im_end|>" in line, line
    assert "splits <|im_end|> into" in line and "'<eos_x>'" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command, errno_, hint", [
    ("sft", 28, "(free some space, then rerun with --resume: the run continues from its last complete checkpoint, if "
                "it saved one (train.save_every))"),
    ("pipeline", 28, "(free some space, then rerun: the stages continue from their last complete checkpoints)"),
    ("merge", 28, "(free some space, then rerun)"),
    ("eval", 28, "(free some space, then rerun)"),
    ("sft", 30, "(choose a writable train.output_dir)"),
    ("eval", 13, "(choose a writable train.output_dir)"),
    ("pipeline", 30, "(choose a writable output_dir)"),
    ("report", 30, "(choose a writable --out)"),
    ("make-data", 13, "(choose a writable --out)"),
])
def test_a_full_or_read_only_disk_says_what_to_do_in_the_commands_own_terms(command, errno_, hint):
    """Only a trainer can continue with --resume, and only the trainers and eval have
    train.output_dir: report, merge and make-data write to --out, a pipeline to output_dir."""
    import os

    from rlhfkit.cli import _one_line

    line = _one_line(OSError(errno_, os.strerror(errno_), "/x/y"), command)
    assert line == f"{os.strerror(errno_)}: /x/y {hint}"


def test_a_gguf_file_that_is_not_one_is_one_line(tmp_path, capsys):
    """A .gguf cut short or of another format: the GGUF reader's struct error, as one line naming
    the file, before the run directory is written."""
    from rlhfkit.cli import main

    junk = tmp_path / "model.gguf"
    junk.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 8)
    out = tmp_path / "run"
    assert main(["sft", f"model.name={junk}", "data.train=task:sentiment", f"train.output_dir={out}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"{junk}: not a readable GGUF model" in lines[0], lines
    assert not out.exists()


def test_an_adapter_whose_weights_are_a_pickle_or_a_template_that_escapes_is_one_line(tmp_path, tiny_model_dir,
                                                                                       capsys):
    """An adapter_model.bin whose pickle would run code is refused from the adapter's files, before
    anything is written; a chat template that reaches for Python internals is stopped by the
    sandbox and said in one line (it was a traceback)."""
    import pickle

    from rlhfkit.models import check_model_path

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model_dir),
                                                             "peft_type": "LORA"}))
    _RunsCode.marker = adapter / "ran"
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps({"w": _RunsCode()}))
    with pytest.raises(ValueError, match="adapter_model.bin: not loadable as weights alone"):
        check_model_path(adapter)
    assert not (adapter / "ran").exists()
    judge = shutil.copytree(tiny_model_dir, tmp_path / "judge")
    (judge / "chat_template.jinja").write_text(
        "{{ cycler.__init__.__globals__.os.system('touch " + str(tmp_path / "ran") + "') }}")
    code, line = _cli(capsys, ["eval", f"baseline={tiny_model_dir}", f"policies=[{tiny_model_dir}]",
                               f"judges=[judge:{judge}]", "prompts.train=task:sentiment", "prompts.limit=2",
                               "rollout.n=1", "rollout.max_new_tokens=2", f"train.output_dir={tmp_path / 'ev'}"])
    assert code == 2 and line.startswith("rlhfkit eval: error: ") and "unsafe" in line, line
    assert not (tmp_path / "ran").exists()


def test_a_collective_broken_by_another_process_is_one_line_naming_the_rank(tmp_path, capsys, monkeypatch):
    """On N processes, the process that fails says why (one line); the others, whose next collective
    finds the connection closed, say only that another process failed: no traceback."""
    import torch.distributed as dist

    from rlhfkit import cli

    def broken(argv):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:60045. This is "
                           "typically caused by a remote worker crashing.")

    monkeypatch.setattr(cli, "_main", broken)
    with pytest.raises(RuntimeError, match="closed by peer"):  # no process group: not a peer's failure
        cli.main(["grpo"])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert cli.main(["grpo"]) == 2
        assert capsys.readouterr().err == ("rlhfkit grpo: stopped on rank 0: another process of this job failed (its "
                                           "error is reported first, by that process): [gloo/transport/tcp/pair.cc:"
                                           "553] Connection closed by peer [127.0.0.1]:60045. This is typically "
                                           "caused by a remote worker crashing.\n")
        monkeypatch.setattr(cli, "_main", lambda argv: (_ for _ in ()).throw(RuntimeError("a bug of ours")))
        with pytest.raises(RuntimeError, match="a bug of ours"):  # any other RuntimeError keeps its traceback
            cli.main(["grpo"])
        monkeypatch.setattr(cli, "_main", lambda argv: (_ for _ in ()).throw(dist.DistNetworkError("peer gone")))
        assert cli.main(["grpo"]) == 2 and capsys.readouterr().err.endswith("by that process): peer gone\n")
        monkeypatch.setattr(cli, "_main", lambda argv: (_ for _ in ()).throw(dist.DistBackendError("NCCL timeout")))
        with pytest.raises(dist.DistBackendError):  # a backend's own failure may be this process's: kept
            cli.main(["grpo"])
    finally:
        dist.destroy_process_group()
