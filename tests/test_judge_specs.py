"""Pairwise judges (pm:, judge:) read with their own tokenizer, and every judge spec a command will
load is refused in one line before anything is written (docs/reliability.md)."""

import json
import shutil

import pytest
import torch


def _small_vocab_model(path):
    """A tiny Llama with a tokenizer of its own, far smaller than the default model's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from rlhfkit.data.chat_templates import apply_chat_template

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    specials = ["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"]
    bpe.train_from_iterator(["Which response is better? Answer A or B. [CONTEXT] [RESPONSE A] [RESPONSE B]",
                             "user assistant system the a good bad movie great awful"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", pad_token="<pad>",
                                  eos_token="<|im_end|>", bos_token="<|im_start|>")
    tok = apply_chat_template(tok, "chatml")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return tok


def test_a_judge_reads_with_its_own_tokenizer(tmp_path, tokenizer):
    """judge:MODEL with a vocabulary unlike the policy's: its comparisons use its own tokenizer
    (the policy's ids would index past its embedding), through both commands that build judges."""
    from rlhfkit.judges.sample_scorer import Scorer
    from rlhfkit.rollout.prompts import PromptItem

    own = _small_vocab_model(tmp_path / "judge")
    assert len(own) < len(tokenizer)
    scorer = Scorer(f"judge:{tmp_path / 'judge'}", tokenizer, "cpu", batch_size=4)
    assert scorer.judge.tokenizer.get_vocab() == own.get_vocab()
    rows = [PromptItem([], [{"role": "user", "content": "Review a movie"}], "Review a movie")] * 2
    scores, info = scorer.score(rows, ["a great movie, truly good", "awful"], n=2)
    assert info["judge_calls"] == 2 and abs(sum(scores) - 1.0) < 1e-6


def _rm_dir(path, tokenizer):
    from rlhfkit.models import tiny_causal_lm

    tiny_causal_lm(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForSequenceClassification"]}))


@pytest.fixture()
def bad_judges(tmp_path, tiny_model_dir, tokenizer):
    """name -> (spec, what its one-line error must say)."""
    _rm_dir(tmp_path / "rm" / "model", tokenizer)
    (tmp_path / "cfgonly").mkdir()
    shutil.copy(tiny_model_dir / "config.json", tmp_path / "cfgonly")
    notok = tmp_path / "notok"
    shutil.copytree(tiny_model_dir, notok)
    for f in notok.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
            f.unlink()
    think = tmp_path / "think"
    shutil.copytree(tiny_model_dir, think)
    cfg = json.loads((think / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>{% endif %}")
    (think / "tokenizer_config.json").write_text(json.dumps(cfg))
    (think / "chat_template.jinja").unlink(missing_ok=True)
    return {"reward model": (f"pm:{tmp_path / 'rm'}", "is not a policy"),
            "config only": (f"judge:{tmp_path / 'cfgonly'}", "has no weights"),
            "no tokenizer": (f"judge:{notok}", "has no tokenizer"),
            "template": (f"judge:{think}", "does not render the assistant turn"),
            "missing pm": ("pm:runs/no-such-pm-run", "does not exist")}


@pytest.mark.parametrize("name", ["reward model", "config only", "no tokenizer", "template", "missing pm"])
def test_a_bad_judge_is_refused_naming_its_spec(bad_judges, name):
    from rlhfkit.judges.sample_scorer import check_scorer_spec

    spec, says = bad_judges[name]
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        check_scorer_spec(spec)
    msg = str(e.value)
    assert f"pairwise judge {spec!r}" in msg and says in msg and "\n" not in msg


@pytest.mark.parametrize("name", ["reward model", "template"])
def test_eval_with_a_bad_judge_keeps_the_earlier_results(tmp_path, tiny_model_dir, bad_judges, name):
    """The judges are checked before the output directory is touched: an earlier evaluation's
    results stay as they were."""
    from rlhfkit.config import load_config
    from rlhfkit.eval.config import EvalConfig
    from rlhfkit.eval.policy_compare import run_eval

    out = tmp_path / "eval"
    common = [f"baseline={tiny_model_dir}", f"policies=[a={tiny_model_dir}]", "prompts.limit=2", "rollout.n=1",
              "rollout.max_new_tokens=2", f"train.output_dir={out}"]
    run_eval(load_config(EvalConfig, overrides=common))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    spec = bad_judges[name][0]
    with pytest.raises((ValueError, FileNotFoundError), match="judges: pairwise judge"):
        run_eval(load_config(EvalConfig, overrides=[*common, f"judges=[{spec}]"]))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("spec", ["pm:runs/pm", "judge:smollm2-135m-instruct", "annotator:sentiment"])
def test_a_pairwise_judge_as_a_pointwise_reward_is_refused(spec):
    from rlhfkit.judges import check_reward_spec
    from rlhfkit.judges.reward_fn import RewardSpecError

    with pytest.raises(RewardSpecError, match="a pairwise judge compares two responses"):
        check_reward_spec(spec)


def test_pm_of_a_base_model_with_a_configured_chat_template_evaluates_the_untrained_judge(tmp_path, tiny_model_dir,
                                                                                          caplog):
    """data.chat_template serves the untrained model's evaluation as LLM-as-judge too, not only its training;
    data.eval_fraction, which splits the pairs, is not called unused by the SFT step that trains on them."""
    from rlhfkit.config import load_config
    from rlhfkit.trainers.pm import PMConfig, train_pm

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    (base / "chat_template.jinja").unlink(missing_ok=True)
    rows = [{"prompt": f"Say something {i}", "chosen": "A fine answer.", "rejected": "No."} for i in range(8)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(PMConfig, overrides=[f"model.name={base}", f"data.train={tmp_path / 'pairs.jsonl'}",
                                           "data.eval_fraction=0.5", "data.chat_template=chatml", "train.max_steps=1",
                                           "train.batch_size=4", "train.micro_batch_size=4",
                                           "train.report_to=[]", f"train.output_dir={tmp_path / 'run'}",
                                           "train.select_best=eval/loss", "train.select_best_mode=max"])
    with caplog.at_level("WARNING", logger="rlhfkit"):
        results = train_pm(cfg)
    assert results["llm_judge"]["pairs"] == 4 and results["pm"]["pairs"] == 4
    assert not [r.message for r in caplog.records if "not used" in r.message]
    # the step select_best kept is in pm_results.json, as in every trainer's results
    saved = json.loads((tmp_path / "run" / "pm_results.json").read_text())
    assert saved["best"]["metric"] == "eval/loss" and saved["best"]["step"] in (0, 1) and saved["best"] == results["best"]


@pytest.mark.parametrize("mode", ["left", "right"])
def test_pm_truncation_cuts_the_responses_and_keeps_the_question_and_answer(tmp_path, tiny_model_dir, tokenizer, mode):
    """data.truncation for A/B questions (docs/configuration.md): the context keeps its end, the
    responses lose their ends, the question and the answer letter stay; every question fits."""
    from rlhfkit.config import load_config
    from rlhfkit.data.render import render_ids
    from rlhfkit.judges.preference import QUESTION
    from rlhfkit.trainers.pm import PMConfig, train_pm

    rows = [{"prompt": f"context start {i} " + "filler " * 30 + "context end",
             "chosen": "good " * (60 + 10 * i) + "goodend", "rejected": "bad " * 30 + "badend"} for i in range(6)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(PMConfig, overrides=[f"model.name={tiny_model_dir}", f"data.train={tmp_path / 'pairs.jsonl'}",
                                           "data.eval_fraction=0.34", "data.max_length=160", f"data.truncation={mode}",
                                           "train.max_steps=1", "train.batch_size=4", "train.micro_batch_size=4",
                                           "train.report_to=[]", "eval_untrained=false",
                                           f"train.output_dir={tmp_path / 'run'}"])
    results = train_pm(cfg)
    assert results["truncation"]["truncated"] == 6 and results["truncation"]["dropped"] == 0
    records = [json.loads(line) for split in ("train", "eval")
               for line in (tmp_path / "run" / "pm_data" / f"{split}.jsonl").read_text().splitlines()]
    assert len(records) == 6
    for rec in records:
        user, answer = rec["messages"][0]["content"], rec["messages"][1]["content"]
        assert len(render_ids(tokenizer, rec["messages"])) <= 160
        assert answer in ("A", "B") and user.endswith(QUESTION)
        context, rest = user.split(" [RESPONSE A] ")
        first, second = rest[:-len(QUESTION) - 1].split(" [RESPONSE B] ")
        assert context.endswith("context end")
        chosen, rejected = (first, second) if answer == "A" else (second, first)
        assert chosen.startswith("good") and "bad" not in chosen and "good" not in rejected
        assert "goodend" not in chosen  # the longer response lost its end


def test_pm_without_held_out_pairs_trains_on_every_pair(tmp_path, tiny_model_dir):
    """data.eval_fraction 0: every pair is an A/B question of training; the SFT step holds none out."""
    from rlhfkit.config import load_config
    from rlhfkit.trainers.pm import PMConfig, train_pm

    rows = [{"prompt": f"Say something {i}", "chosen": "A fine answer.", "rejected": "No."} for i in range(4)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(PMConfig, overrides=[f"model.name={tiny_model_dir}", f"data.train={tmp_path / 'pairs.jsonl'}",
                                           "data.eval_fraction=0", "train.batch_size=4", "train.micro_batch_size=4",
                                           "train.max_steps=1", "train.report_to=[]", "eval_untrained=false",
                                           f"train.output_dir={tmp_path / 'run'}"])
    train_pm(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/tokens"] for r in rows] == [8], rows  # 4 questions' answers: a letter and end-of-turn each
    assert not (tmp_path / "run" / "pm_data" / "eval.jsonl").read_text()


def test_pm_truncation_that_leaves_no_pair_stops_before_anything_is_written(tmp_path, tiny_model_dir):
    from rlhfkit.config import load_config
    from rlhfkit.data import DataError
    from rlhfkit.trainers.pm import PMConfig, train_pm

    rows = [{"prompt": f"Say something {i}", "chosen": "Short.", "rejected": "No."} for i in range(4)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(PMConfig, overrides=[f"model.name={tiny_model_dir}", f"data.train={tmp_path / 'pairs.jsonl'}",
                                           "data.max_length=16", "data.truncation=right",
                                           f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(DataError, match=r"pairs\.jsonl: all \d+ training pairs were dropped"):
        train_pm(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("max_length", [100, 110, 120, 130])
def test_pm_truncation_never_cuts_a_response_to_nothing(tokenizer, max_length):
    """A long context with two short responses: the context goes below half before a response is
    emptied, as rm and dpo keep at least one response token; a question with an empty response
    (a label for nothing) is never written."""
    from rlhfkit.data.render import render_ids
    from rlhfkit.judges.preference import pm_record
    from rlhfkit.trainers.pm import PairFitter

    context = "Please summarise the following long article about bread making in Europe. " * 4
    fitter = PairFitter(tokenizer, max_length)
    out = fitter(context, "Bread making in Europe began with flat breads.", "I do not know.", "A")
    if out is None:
        assert fitter.dropped == 1
        return
    _, first, second = out
    assert first.strip() and second.strip()
    assert len(render_ids(tokenizer, pm_record(*out, "A")["messages"])) <= max_length


def test_pm_held_out_accuracy_is_measured_on_the_questions_as_training_cut_them(tmp_path, tiny_model_dir, tokenizer,
                                                                                 monkeypatch):
    """With data.truncation the held-out pairs are judged cut to data.max_length as the training
    questions were, not whole (past the length the model trained at, or its positions)."""
    from rlhfkit.config import load_config
    from rlhfkit.data.render import render_ids
    from rlhfkit.judges.preference import PairwiseJudge, pm_record
    from rlhfkit.trainers.pm import PMConfig, train_pm

    seen = []
    original = PairwiseJudge.prob_first

    def spy(self, contexts, firsts, seconds):
        seen.extend(zip(contexts, firsts, seconds))
        return original(self, contexts, firsts, seconds)

    monkeypatch.setattr(PairwiseJudge, "prob_first", spy)
    rows = [{"prompt": f"context {i} " + "filler " * 30, "chosen": "good " * 80, "rejected": "bad " * 50}
            for i in range(6)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(PMConfig, overrides=[f"model.name={tiny_model_dir}", f"data.train={tmp_path / 'pairs.jsonl'}",
                                           "data.eval_fraction=0.34", "data.max_length=160", "data.truncation=right",
                                           "train.max_steps=1", "train.batch_size=4", "train.micro_batch_size=4",
                                           "train.report_to=[]", f"train.output_dir={tmp_path / 'run'}"])
    results = train_pm(cfg)
    assert results["pm"]["pairs"] == results["llm_judge"]["pairs"] == 2 and len(seen) == 8  # 2 judges x 2 orders
    assert all(len(render_ids(tokenizer, pm_record(c, a, b, "A")["messages"])) <= 160 for c, a, b in seen)


def test_pm_truncation_never_leaves_half_a_character(tokenizer):
    from rlhfkit.trainers.pm import PairFitter

    context, first, second = PairFitter(tokenizer, 97)("\U0001F600 " * 100, "yes \U0001F600" * 20, "no", "A")
    assert "\ufffd" not in context + first + second and first.strip() and second.strip()
