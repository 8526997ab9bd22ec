"""The one training loop (`training.fit`): held-out evaluations, keeping the best model, early
stopping; and the configuration reference generated from the config classes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhfkit.config import TrainSection
from rlhfkit.models import tiny_causal_lm
from rlhfkit.parallel import SingleProcess
from rlhfkit.training import StepGuard, fit
from rlhfkit.training.best import greater_is_better
from rlhfkit.training.run import Run

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path, **train) -> Run:
    train = TrainSection(output_dir=str(tmp_path), progress=False, max_steps=6, **train)
    return Run("test", tmp_path, SingleProcess(), train, StepGuard())


def _scripted(model, scores: list[float], metric: str = "eval/score"):
    """A step that moves one weight to the step's number, and evaluations that return ``scores`` in turn."""
    evals = iter(scores)
    weight = model.model.norm.weight

    def step(i):
        with torch.no_grad():
            weight.fill_(float(i + 1))
        return {"train/loss": 1.0}

    return step, (lambda: {metric: next(evals)})


def test_select_best_makes_the_best_evaluation_the_final_model(tmp_path, tokenizer):
    model = tiny_causal_lm(tokenizer)
    step, evaluate = _scripted(model, [0.1, 0.5, 0.9, 0.3])  # evaluations at steps 0, 2, 4 and 6
    result = fit(_run(tmp_path, eval_every=2, select_best="eval/score"), step, 6, models={"model": model},
                 optimizers={}, evaluate=evaluate)
    assert result.best == {"metric": "eval/score", "step": 4, "value": 0.9, "last_eval": {"eval/score": 0.3}}
    assert result.metrics["eval/score"] == 0.9  # the final metrics describe the model kept
    assert torch.all(model.model.norm.weight == 4.0)  # the weights of step 4, not of the last step (6)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/score" in r] == [0, 2, 4, 6]


def test_every_evaluation_is_logged_whatever_log_every(tmp_path, tokenizer):
    model = tiny_causal_lm(tokenizer)
    step, evaluate = _scripted(model, [0.1, 0.9, 0.3])  # evaluations at steps 0, 3 and 6
    result = fit(_run(tmp_path, eval_every=3, log_every=2, select_best="eval/score"), step, 6,
                 models={"model": model}, optimizers={}, evaluate=evaluate)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("eval/score")) for r in rows] == [(0, 0.1), (2, None), (3, 0.9), (4, None), (6, 0.3)]
    assert result.best["step"] == 3 and result.metrics["eval/score"] == 0.9


def test_without_select_best_the_last_model_stays(tmp_path, tokenizer):
    model = tiny_causal_lm(tokenizer)
    step, evaluate = _scripted(model, [0.1, 0.9, 0.3, 0.2])
    result = fit(_run(tmp_path, eval_every=2), step, 6, models={"model": model}, optimizers={}, evaluate=evaluate)
    assert result.best == {} and torch.all(model.model.norm.weight == 6.0)
    assert not (tmp_path / "best").exists()


def test_the_start_can_be_the_best(tmp_path, tokenizer):
    """A run whose every evaluation is worse than step 0's ends with the starting weights."""
    model = tiny_causal_lm(tokenizer)
    start = model.model.norm.weight.detach().clone()
    step, evaluate = _scripted(model, [1.0, 2.0, 3.0, 4.0], metric="eval/loss")  # a loss: lower is better
    result = fit(_run(tmp_path, eval_every=2, select_best="eval/loss"), step, 6, models={"model": model},
                 optimizers={}, evaluate=evaluate)
    assert result.best["step"] == 0 and torch.equal(model.model.norm.weight, start)


def test_early_stopping_after_patience_evaluations_without_improvement(tmp_path, tokenizer):
    model = tiny_causal_lm(tokenizer)
    step, evaluate = _scripted(model, [0.5, 0.6, 0.55, 0.58, 0.9, 0.9, 0.9])
    result = fit(_run(tmp_path, eval_every=1, select_best="eval/score", early_stopping_patience=2), step, 6,
                 models={"model": model}, optimizers={}, evaluate=evaluate)
    assert result.steps == 3 and result.best["step"] == 1  # evaluations at 1 (best), 2 and 3 (worse): stop
    assert result.best["stopped_early_at"] == 3  # in the results file, not only on the console
    assert torch.all(model.model.norm.weight == 1.0)


def test_resuming_a_run_that_stopped_early_takes_no_more_steps(tmp_path, tokenizer, capsys):
    """A run that stopped early is finished: --resume of it (same config) takes no step, ends with
    the best model as the run did, and keeps the stop's metrics as its final ones (resuming went
    on training, past the patience)."""
    model = tiny_causal_lm(tokenizer)
    step, evaluate = _scripted(model, [0.5, 0.6, 0.55, 0.58])
    opts = dict(eval_every=1, select_best="eval/score", early_stopping_patience=2, save_every=1)
    first = fit(_run(tmp_path, **opts), step, 6, models={"model": model}, optimizers={}, evaluate=evaluate)
    assert first.steps == 3
    again = tiny_causal_lm(tokenizer)
    calls = []
    result = fit(_run(tmp_path, resume=True, **opts), lambda i: calls.append(i) or {}, 6, models={"model": again},
                 optimizers={}, evaluate=lambda: calls.append("eval") or {"eval/score": 0.0})
    assert calls == [] and result.steps == 3 and result.best == first.best
    assert torch.all(again.model.norm.weight == 1.0)  # the best model (step 1), as the first run ended
    assert result.metrics == first.metrics
    assert "the run stopped early at step 3" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]


def test_the_last_step_is_evaluated_even_off_the_eval_every_grid(tmp_path, tokenizer):
    model = tiny_causal_lm(tokenizer)
    step, evaluate = _scripted(model, [0.1, 0.2, 0.3])
    result = fit(_run(tmp_path, eval_every=4), step, 6, models={"model": model}, optimizers={}, evaluate=evaluate)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/score" in r] == [0, 4, 6] and result.metrics["eval/score"] == 0.3


def test_a_later_evaluation_that_only_equals_the_best_does_not_replace_it(tmp_path, tokenizer):
    model = tiny_causal_lm(tokenizer)
    step, evaluate = _scripted(model, [0.1, 0.9, 0.9, 0.9])  # evaluations at steps 0, 2, 4 and 6
    result = fit(_run(tmp_path, eval_every=2, select_best="eval/score"), step, 6, models={"model": model},
                 optimizers={}, evaluate=evaluate)
    assert result.best["step"] == 2 and torch.all(model.model.norm.weight == 2.0)


def test_a_nan_evaluation_is_never_the_best(tmp_path, tokenizer):
    model = tiny_causal_lm(tokenizer)
    step, evaluate = _scripted(model, [float("nan"), 0.3, 0.2, 0.1])
    result = fit(_run(tmp_path, eval_every=2, select_best="eval/score"), step, 6, models={"model": model},
                 optimizers={}, evaluate=evaluate)
    assert result.best == {"metric": "eval/score", "step": 2, "value": 0.3, "last_eval": {"eval/score": 0.1}}
    assert torch.all(model.model.norm.weight == 2.0)


def test_metric_direction():
    assert not greater_is_better("eval/loss") and not greater_is_better("eval/kl") and not greater_is_better("eval/ppl")
    assert greater_is_better("eval/accuracy") and greater_is_better("eval/gold_mean")
    assert greater_is_better("eval/loss", "max") and not greater_is_better("eval/accuracy", "min")
    assert not greater_is_better("eval/nll") and not greater_is_better("eval/perplexity")
    assert not greater_is_better("eval/sft_nll") and greater_is_better("eval/capability_exact_match")


def test_unknown_select_best_metric_is_named(tmp_path, tokenizer):
    model = tiny_causal_lm(tokenizer)
    step, evaluate = _scripted(model, [0.1] * 4)
    from rlhfkit.config import ConfigError

    with pytest.raises(ConfigError, match="eval/acuracy.*eval/score"):  # one line from the CLI, exit status 2
        fit(_run(tmp_path, eval_every=2, select_best="eval/acuracy"), step, 6, models={"model": model},
            optimizers={}, evaluate=evaluate)


# --------------------------------------------------------------------------- configuration reference

def test_help_lists_every_key_with_type_default_and_meaning(capsys):
    from rlhfkit.cli import main

    with pytest.raises(SystemExit):
        main(["dpo", "--help"])
    out = capsys.readouterr().out
    assert "dpo.beta (number, default 0.1)" in out and "KL anchor" in out
    assert "optim.lr (number, default 1e-06)" in out  # DPO's own default for the shared section
    assert "train.select_best (string, default \"\")" in out


def test_print_config_explain_comments_each_key(capsys):
    import yaml

    from rlhfkit.cli import main

    assert main(["sft", "data.train=x.jsonl", "--print-config", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "# Peak learning rate." in out and yaml.safe_load(out)["optim"]["lr"] == 2e-5


def test_explain_without_required_keys_prints_the_config_then_says_what_is_missing(capsys):
    """`rlhfkit sft --explain` with no config is how a user first sees the keys: it prints them,
    then names the missing key in one line with exit status 2 (a pipe learns the config is
    incomplete). Bad key names are still refused before anything is printed."""
    import yaml

    from rlhfkit.cli import main

    assert main(["sft", "--explain"]) == 2
    captured = capsys.readouterr()
    assert "# Peak learning rate." in captured.out and yaml.safe_load(captured.out)["optim"]["lr"] == 2e-5
    assert captured.err.strip().splitlines() == [
        "rlhfkit sft: error: config (printed above): data.train: a training data source is required"]
    assert main(["sft", "--print-config", "optim.lrr=1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "optim.lrr" in captured.err


def test_every_config_field_is_documented():
    from rlhfkit.config.reference import keys
    from rlhfkit.registry import config_classes

    missing = [f"{name}: {k.path}" for name, (cls, _) in config_classes().items() for k in keys(cls) if not k.doc]
    assert not missing, missing


def test_configuration_reference_is_in_sync():
    """docs/configuration.md is generated: `python -m rlhfkit.config.reference > docs/configuration.md`."""
    from rlhfkit.config.reference import markdown
    from rlhfkit.registry import config_classes

    assert (ROOT / "docs" / "configuration.md").read_text() == markdown(config_classes())


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), batch_size=st.integers(1, 24), seed=st.integers(0, 3), epochs=st.integers(1, 3),
       drop_last=st.booleans())
def test_batches_walk_shuffled_epochs(n, batch_size, seed, epochs, drop_last):
    """Every batch has batch_size examples (at most n with drop_last). drop_last=false: the shuffled
    epochs laid end to end, and total_steps batches cover every example of each pass; true: each
    epoch's first n // batch_size batches of its own shuffle, the rest (left_out) not taken."""
    from types import SimpleNamespace

    from rlhfkit.training.batches import batch_indices, epoch_order, left_out, total_steps

    train = SimpleNamespace(max_steps=0, epochs=epochs, batch_size=batch_size, drop_last=drop_last)
    steps = total_steps(n, train)
    batches = [batch_indices(n, batch_size, s, seed, drop_last) for s in range(steps)]
    if drop_last:
        per = max(n // batch_size, 1)
        assert steps == epochs * per and left_out(n, train) == (n % batch_size if n > batch_size else 0)
        for e in range(epochs):
            taken = [i for b in batches[e * per:(e + 1) * per] for i in b]
            assert taken == epoch_order(n, seed, e)[:len(taken)] and len(taken) == n - left_out(n, train)
        return
    assert steps == -(-epochs * n // batch_size) and left_out(n, train) == 0
    seen = [i for b in batches for i in b]
    assert all(len(b) == batch_size for b in batches)
    stream = [i for e in range(epochs + batch_size // n + 2) for i in epoch_order(n, seed, e)]
    assert seen == stream[:len(seen)]
    assert all(seen.count(i) >= epochs for i in range(n))


def test_total_steps_by_hand():
    from types import SimpleNamespace

    from rlhfkit.training.batches import total_steps

    def train(**kw):
        return SimpleNamespace(**{"max_steps": 0, "epochs": 1.0, "batch_size": 4, "drop_last": False, **kw})

    assert total_steps(10, train(max_steps=5)) == 5  # max_steps wins over epochs
    assert total_steps(10, train(epochs=0)) == 0  # the probe alone
    assert total_steps(100, train(epochs=0.07, batch_size=1)) == 7  # 0.07 * 100 is 7.000000000000001 in floats
    assert total_steps(10, train()) == 3 and total_steps(10, train(drop_last=True)) == 2


def test_checkpoints_keep_the_newest_and_a_resume_continues_from_the_newest(tmp_path, tokenizer):
    model = tiny_causal_lm(tokenizer)
    step, _ = _scripted(model, [])
    fit(_run(tmp_path, save_every=1, keep_checkpoints=2), step, 6, models={"model": model}, optimizers={})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000005", "step-00000006"]
    calls = []
    result = fit(_run(tmp_path, save_every=1, keep_checkpoints=2, resume=True), lambda i: calls.append(i) or {}, 7,
                 models={"model": tiny_causal_lm(tokenizer)}, optimizers={})
    assert calls == [6] and result.steps == 7


class Killed(Exception):
    pass


def _killed_at(step_fn, at: int):
    """``step_fn`` until step ``at`` starts, which raises (a kill)."""
    def step(i):
        if i == at:
            raise Killed
        return step_fn(i)
    return step


def test_a_kill_between_a_new_best_and_its_checkpoint_resumes_with_the_best_it_had(tmp_path, tokenizer, caplog):
    """The best (step 2) is no checkpoint's step; a new best at step 6 is written, then the run is
    killed before step 8's checkpoint. The resumed run (from step 4's checkpoint, whose best is step
    2) still has step 2's models: its later evaluations (of steps it does again) are worse, and
    the final model is step 2's, as if the kill had not happened. The kill's step-6 models are not
    mixed in."""
    opts = dict(eval_every=2, save_every=4, keep_checkpoints=1, select_best="eval/score")
    model = tiny_causal_lm(tokenizer)
    step, evaluate = _scripted(model, [0.1, 0.9, 0.5, 0.95])  # evaluations at steps 0, 2, 4, 6
    with pytest.raises(Killed):
        fit(_run(tmp_path, **opts), _killed_at(step, 6), 8, models={"model": model}, optimizers={},
            evaluate=evaluate)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000004"]
    assert json.loads((tmp_path / "best" / "step.json").read_text()) == {"step": 2}
    again = tiny_causal_lm(tokenizer)
    step, evaluate = _scripted(again, [0.3, 0.4])  # steps 6 and 8, done again
    with caplog.at_level("WARNING", logger="rlhfkit"):
        result = fit(_run(tmp_path, resume=True, **opts), step, 8, models={"model": again}, optimizers={},
                     evaluate=evaluate)
    assert "chosen again" not in caplog.text
    assert result.best["step"] == 2 and result.best["value"] == 0.9
    assert torch.all(again.model.norm.weight == 2.0)  # step 2's weights
    assert not (tmp_path / "best-pending").exists()


def test_a_kill_after_the_checkpoint_that_records_a_new_best_keeps_that_best(tmp_path, tokenizer, monkeypatch):
    """Killed after step 4's checkpoint (whose best is step 4) but before its models moved to best/:
    the resume takes them from best-pending/, and step 4 is the final model."""
    from rlhfkit.training import best as best_module
    from rlhfkit.training import loop

    opts = dict(eval_every=2, save_every=4, keep_checkpoints=1, select_best="eval/score")
    model = tiny_causal_lm(tokenizer)
    step, evaluate = _scripted(model, [0.1, 0.5, 0.9])
    monkeypatch.setattr(loop, "promote", lambda run: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        fit(_run(tmp_path, **opts), step, 8, models={"model": model}, optimizers={}, evaluate=evaluate)
    assert json.loads((tmp_path / "best-pending" / "step.json").read_text()) == {"step": 4}
    assert not (tmp_path / "best").exists()  # no checkpoint before step 4's
    monkeypatch.setattr(loop, "promote", best_module.promote)
    again = tiny_causal_lm(tokenizer)
    step, evaluate = _scripted(again, [0.3, 0.4])
    result = fit(_run(tmp_path, resume=True, **opts), step, 8, models={"model": again}, optimizers={},
                 evaluate=evaluate)
    assert result.best["step"] == 4 and torch.all(again.model.norm.weight == 4.0)
    assert json.loads((tmp_path / "best" / "step.json").read_text()) == {"step": 4}
