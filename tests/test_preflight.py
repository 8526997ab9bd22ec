"""Every input a command reads later (reward, gold, scorer and judge specs, the other models it
loads, PTX data, an eval's preference set and alignment-tax data) is checked before the run
writes anything or loads a model: a bad one is one line naming its key, exit status 2, and no
output directory."""

import json
import os
import sys
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
MISSING = "/nonexistent/rlhfkit-preflight"


def _cases(model: str, reward_file: str, rm: str = MISSING, short: str = MISSING):
    ppo = ["ppo", "-c", str(CONFIGS / "ppo.yaml"), f"model.name={model}", "critic_init=policy",
           "reward.spec=task:sentiment"]
    online = ["online-dpo", "-c", str(CONFIGS / "online_dpo.yaml"), f"model.name={model}"]
    ev = ["eval", f"policies=[{model}]", f"baseline={model}", "gold=task:sentiment"]
    return [
        ([*ppo, f"reward.spec=rm:{MISSING}"], "reward.spec: rm:"),
        (["grpo", "-c", str(CONFIGS / "grpo.yaml"), f"model.name={model}", "reward.spec=task:nosuch"],
         "reward.spec: reward spec 'task:nosuch': unknown task"),
        (["rloo", "-c", str(CONFIGS / "rloo.yaml"), f"model.name={model}", "reward.spec=task:sentiment",
          "prompts.eval=task:sentiment", "reward.gold=task:nosuch"], "reward.gold: reward spec 'task:nosuch'"),
        (["rloo", "-c", str(CONFIGS / "rloo.yaml"), f"model.name={model}", "reward.spec=task:sentiment",
          "reward.gold=task:sentiment"], "reward.gold: the gold judge scores the held-out evaluation, which needs "
                                         "prompts.eval"),
        ([*ppo, f"reward.spec=[task:sentiment, rm:{model}]"], "reward.spec: rm:"),
        ([*ppo, f"reward.spec={reward_file}:nofunction"], "has no function 'nofunction'"),
        ([*ppo, "reward.spec=[{spec: task:sentiment, name: a}, {spec: task:arithmetic, name: a}]"],
         "reward.spec: two reward functions are named 'a'"),
        ([*ppo, "reward.spec=[{spec: task:sentiment, weight: 1.0}]", "reward.weights=[2.0]"],
         "reward.spec: reward weights given twice"),
        ([*ppo, f"critic_model={MISSING}"], f"critic_model: model directory not found: {MISSING}"),
        ([*ppo, "ptx.coef=0.1", f"ptx.data={MISSING}.jsonl"], f"data file not found: {MISSING}.jsonl"),
        ([*online, f"scorer=pm:{MISSING}"], f"scorer: pairwise judge 'pm:{MISSING}': {MISSING} does not exist"),
        ([*online, "scorer=annotator:nosuch"], "scorer: pairwise judge 'annotator:nosuch': unknown task"),
        ([*online, "gold=task:nosuch"], "gold: reward spec 'task:nosuch'"),
        (["dpo", "-c", str(CONFIGS / "dpo.yaml"), f"model.name={model}", f"dpo.reference={MISSING}"],
         f"dpo.reference: model directory not found: {MISSING}"),
        (["eval", f"policies=[{MISSING}]", f"baseline={model}", "gold=task:sentiment"],
         f"policies: model directory not found: {MISSING}"),
        ([*ev, f"judges=[judge:{MISSING}]"], f"judges: pairwise judge 'judge:{MISSING}'"),
        ([*ev, f"proxy=rm:{model}"], "proxy: rm:"),
        ([*ev, f"preference_set={MISSING}.jsonl"], "data file not found"),
        ([*ev, f"alignment_tax.sft_data={MISSING}.jsonl"], "data file not found"),
        ([*ppo, f"reward.spec={reward_file}:exact"], "reward.spec: prompts.train (task:sentiment): reward function "
                                                     "exact"),
        ([*ppo, "reward.spec=[task:sentiment, task:arithmetic]"], "reward.spec: prompts.train (task:sentiment): "),
        ([*ppo, "reward.spec=[task:sentiment, task:arithmetic]", "reward.combine=normalize_then_sum"],
         "reward.combine: normalize_then_sum standardises each reward within a prompt's group"),
        ([*online, "rollout.temperature=0"], "rollout.temperature: training samples need temperature > 0"),
        ([*online, "scorer=annotator:arithmetic"], "scorer: prompts.train (task:sentiment): "),
        ([*online, "scorer=task:sentiment", "gold=task:arithmetic"], "gold: prompts.train (task:sentiment): "),
        ([*ppo, "prompts.max_prompt_length=128", "rollout.max_new_tokens=1000"],
         "rollout.max_new_tokens: prompts.max_prompt_length + rollout.max_new_tokens = 1128 tokens, more than the "
         "1024 positions of"),
        ([*online, "prompts.max_prompt_length=128", "rollout.max_new_tokens=1000"], "rollout.max_new_tokens: "),
        ([*ppo, "reward.spec=[task:sentiment, task:sentiment]", "reward.weights=[0, 0]"],
         "reward.spec: two reward functions are named"),
        ([*ppo, "reward.spec=[{spec: task:sentiment, name: a}, {spec: task:sentiment, name: b}]",
          "reward.weights=[0, 0]"], "reward.spec: reward weights [0, 0]: all 0"),
        # the model's own settings, checked against its config.json (no weight loaded)
        (["sft", "-c", str(CONFIGS / "sft.yaml"), f"model.name={model}", "model.lora.enabled=true",
          "model.lora.target_modules=[q_proj, nosuch_proj]"],
         f"model.lora.target_modules: nosuch_proj: no module of {model} is named so; its linear layers: down_proj"),
        (["sft", "-c", str(CONFIGS / "sft.yaml"), f"model.name={model}", "model.lora.enabled=true",
          "model.lora.target_modules=.*(q_proj"], "model.lora.target_modules: '.*(q_proj' is not a regular expression"),
        (["dpo", "-c", str(CONFIGS / "dpo.yaml"), f"model.name={model}", f"dpo.reference={rm}"],
         f"dpo.reference: {rm} is not a policy"),
        (["dpo", "-c", str(CONFIGS / "dpo.yaml"), f"model.name={model}", "sft_first.enabled=true", "sft_first.epochs=0"],
         "sft_first.epochs: 0.0 with max_steps 0: the SFT stage needs epochs > 0 or max_steps > 0"),
        (["pm", "-c", str(CONFIGS / "pm.yaml"), f"model.name={rm}"], f"model.name: {rm} is not a policy"),
        (["rm", "-c", str(CONFIGS / "rm.yaml"), f"model.name={model}", "backbone_layers=0", "train_top_layers=5"],
         f"train_top_layers: 5, but {model} has 2 decoder layers"),
        (["sft", "-c", str(CONFIGS / "sft.yaml"), "model.name="], "model.name: empty; name a model"),
        (["sft", "-c", str(CONFIGS / "sft.yaml"), f"model.name={model}", f"data.train={CONFIGS}"],
         f"{CONFIGS}: a directory, not a data file (a directory of dataset files loads as hf:{CONFIGS})"),
        ([*ppo, "ptx.coef=0.1", f"ptx.data={CONFIGS}"], f"{CONFIGS}: a directory, not a data file"),
        (["eval", "baseline=", f"policies=[{model}]"], "baseline: empty; name the model the policies are compared"),
        # a sequence length past the model's positions (an absolute position table fails mid-run)
        *(([k, "-c", str(CONFIGS / f"{k}.yaml"), f"model.name={model}", "data.max_length=2000"],
           "data.max_length: 2000 tokens, more than the 1024 positions of") for k in ("sft", "rm", "dpo", "pm")),
        (["dpo", "-c", str(CONFIGS / "dpo.yaml"), f"model.name={model}", f"dpo.reference={short}"],
         f"dpo.reference: data.max_length = 256 tokens, more than the 64 positions of {short}"),
        ([*ppo, "ptx.coef=0.1", "ptx.data=task:sentiment", "ptx.max_length=2000"],
         "ptx.max_length: 2000 tokens, more than the 1024 positions of"),
        ([*ev, "alignment_tax.sft_data=task:sentiment", "alignment_tax.max_length=2000"],
         "alignment_tax.max_length = 2000 tokens, more than the 1024 positions of"),
        # fewer prompts (or PTX examples) than a batch: every batch would be that short, silently
        ([*ppo, "prompts.limit=3", "train.batch_size=8", "mini_batch_size=8"],
         "prompts.train: 3 prompts, fewer than train.batch_size 8 per iteration: lower train.batch_size, or set "
         "train.drop_last=false"),
        (["grpo", "-c", str(CONFIGS / "grpo.yaml"), f"model.name={model}", "reward.spec=task:sentiment",
          "prompts.limit=3", "train.batch_size=4", "rollout.n=2", "mini_batch_size=8"],
         "prompts.train: 3 prompts, fewer than train.batch_size 4"),
        ([*ppo, "ptx.coef=0.1", "ptx.data=task:sentiment", "ptx.batch_size=100000"],
         "examples, fewer than ptx.batch_size 100000: lower ptx.batch_size"),
        # fewer training examples than a batch (the RM fine-tuned, not the probe alone)
        *(([k, "-c", str(CONFIGS / f"{k}.yaml"), f"model.name={model}", "data.limit=3", "data.eval_fraction=0",
            "train.eval_every=0", "train.select_best=", "train.batch_size=8", "train.micro_batch_size=8", *extra],
           f"data.train: 3 {unit}, fewer than train.batch_size 8: lower train.batch_size, or set "
           f"train.drop_last=false to fill each batch from the next pass over the {unit}")
          for k, unit, extra in (("sft", "examples", []), ("dpo", "pairs", []), ("pm", "A/B questions", []),
                                 ("rm", "pairs", ["head_init=random", "train.epochs=1"]))),
        # packed, SFT's batch counts rows of several examples
        (["sft", "-c", str(CONFIGS / "sft.yaml"), f"model.name={model}", "data.limit=16", "data.eval_fraction=0",
          "train.eval_every=0", "train.select_best=", "train.batch_size=8", "train.micro_batch_size=8",
          "packing=true", "data.max_length=1024"],
         "packed rows (of 16 examples, data.max_length 1024), fewer than train.batch_size 8"),
        # online DPO trains each iteration with DPO (or SFT): its model settings are checked before
        # the first iteration samples, not when its training starts
        ([*online, "model.lora.enabled=true", "model.lora.target_modules=[nosuch_proj]"],
         f"model.lora.target_modules: nosuch_proj: no module of {model} is named so"),
        ([*online, "max_length=2000"], "max_length: 2000 tokens, more than the 1024 positions of"),
    ]


@pytest.mark.parametrize("case", range(len(_cases("", ""))))
def test_a_bad_input_stops_the_command_before_it_writes_or_loads_a_model(case, tiny_model_dir, tmp_path, capsys,
                                                                           monkeypatch):
    import transformers

    from rlhfkit.cli import main

    reward = tmp_path / "reward.py"
    reward.write_text("def score(prompts, responses):\n    return [0.0 for _ in responses]\n\n\n"
                      "def exact(prompts, responses, reference):\n    return [0.0 for _ in responses]\n")
    rm = tmp_path / "rm"  # a reward model's directory: a config.json naming a scalar head
    rm.mkdir()
    for f in tiny_model_dir.iterdir():
        (rm / f.name).symlink_to(f)
    (rm / "config.json").unlink()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (rm / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForSequenceClassification"]}))
    short = tmp_path / "short"  # the policy with 64 positions
    short.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.name != "config.json":
            (short / f.name).symlink_to(f)
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    argv, fragment = _cases(str(tiny_model_dir), str(reward), str(rm), str(short))[case]

    def loaded(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")

    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForSequenceClassification):
        monkeypatch.setattr(auto, "from_pretrained", loaded)
    out = tmp_path / "run"
    assert main([*argv, f"train.output_dir={out}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"rlhfkit {argv[0]}: error: ") and fragment in lines[0], lines
    assert not out.exists()


def test_a_reward_module_in_the_working_directory_imports_without_shadowing_packages(tmp_path, monkeypatch):
    """A console script has neither '' nor the working directory on sys.path: a reward module
    there is found anyway, after the installed packages (a colorsys.py there does not replace the
    standard library's)."""
    from rlhfkit.judges import build_reward_fn, check_reward_spec

    (tmp_path / "preflight_cwd_reward.py").write_text("def score(prompts, responses):\n    return [1.0] * len(responses)\n")
    (tmp_path / "colorsys.py").write_text("raise RuntimeError('the working directory shadowed colorsys')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd(), str(tmp_path))])
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    check_reward_spec("preflight_cwd_reward:score")
    assert build_reward_fn("preflight_cwd_reward:score")(["p"], ["r"]) == [1.0]
    assert sys.path[-1] == str(tmp_path)
    assert Path(build_reward_fn("colorsys:rgb_to_yiq").fn.__code__.co_filename).parent != tmp_path
    monkeypatch.delitem(sys.modules, "preflight_cwd_reward")


def test_a_reward_file_runs_once_for_its_check_and_its_build_and_again_when_it_changes(tmp_path):
    from rlhfkit.judges import build_reward_fn, check_reward_spec

    log = tmp_path / "imported.txt"
    path = tmp_path / "counted.py"
    body = ("open({log!r}, 'a').write('x')\n"
            "def score(prompts, responses):\n    return [{v}] * len(responses)\n")
    path.write_text(body.format(log=str(log), v=1.0))
    check_reward_spec(f"{path}:score")
    assert build_reward_fn(f"{path}:score")(["p"], ["r"]) == [1.0]
    assert log.read_text() == "x"
    path.write_text(body.format(log=str(log), v=22.0))
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 10**9))
    assert build_reward_fn(f"{path}:score")(["p"], ["r"]) == [22.0]
    assert log.read_text() == "xx"


@pytest.mark.parametrize("change, match", [
    (lambda c: setattr(c.train, "batch_size", 3), r"train\.batch_size: 3 is not divisible"),
    (lambda c: setattr(c.optim, "lr", -5.0), r"optim\.lr: must be > 0"),
])
def test_a_config_changed_in_python_is_checked_before_anything_is_written(tmp_path, change, match):
    """Notebook use: load_config, change a field, train_*: the change is checked as the CLI checks
    it, with the key named, before the run writes its directory."""
    from rlhfkit.config import ConfigError, SFTConfig, load_config
    from rlhfkit.trainers.sft import train_sft

    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "response": "b"}\n' * 4)
    cfg = load_config(SFTConfig, overrides=[f"data.train={tmp_path / 'd.jsonl'}", "model.name=some/model",
                                            f"train.output_dir={tmp_path / 'run'}", "train.micro_batch_size=2",
                                            "train.batch_size=2"])
    change(cfg)
    with pytest.raises(ConfigError, match=match):
        train_sft(cfg)
    assert not (tmp_path / "run").exists()


def test_an_rm_selected_by_a_category_its_held_out_pairs_lack_is_refused_before_it_writes(tmp_path, tiny_model_dir,
                                                                                        capsys):
    """train.select_best: eval/accuracy/CATEGORY is checked against the held-out pairs' categories
    when the data is read (it stopped after the model loaded and the first evaluation ran)."""
    from conftest import write_jsonl

    from rlhfkit.cli import main

    pairs = [{"prompt": f"Count {i}", "chosen": f"{i} {i + 1}", "rejected": "no",
              "category": "even" if i % 2 else "odd"} for i in range(40)]
    train, held = write_jsonl(tmp_path / "t.jsonl", pairs), write_jsonl(tmp_path / "h.jsonl", pairs[:8])
    common = ["rm", f"model.name={tiny_model_dir}", f"data.train={train}", f"data.eval={held}", "backbone_layers=0",
              f"train.output_dir={tmp_path / 'run'}"]
    assert main([*common, "train.select_best=eval/accuracy/odds"]) == 2
    line = capsys.readouterr().err.strip()
    assert line == ("rlhfkit rm: error: train.select_best: 'eval/accuracy/odds': the held-out pairs' categories are "
                    "even, odd"), line
    write_jsonl(held, [{k: v for k, v in p.items() if k != "category"} for p in pairs[:8]])
    assert main([*common, "train.select_best=eval/accuracy/odd"]) == 2
    assert "categories fewer than two, so none is logged on its own" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
