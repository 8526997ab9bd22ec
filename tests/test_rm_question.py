"""benchmarks/rm_question.py: replies read through a question, cached per pair in the right order."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import write_jsonl

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def bench_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))


def test_question_features_follow_each_reply_and_read_the_answer_position(bench_path, tiny_model_dir, tmp_path):
    import rm_question

    from rlhfkit.models import load_causal_lm, load_tokenizer

    rows = [{"prompt": "p0", "chosen": "A lovely day.", "rejected": "A dull day.", "gold_chosen": 0.6, "gold_rejected": -0.2},
            {"prompt": "p1", "chosen": "A dull day.", "rejected": "Terrible food, awful service.", "gold_chosen": -0.2,
             "gold_rejected": -0.8},
            {"prompt": "p2", "chosen": "Great!", "rejected": "A lovely day.", "gold_chosen": 0.7, "gold_rejected": 0.6}]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = rm_question.extract(str(tiny_model_dir), [str(data)], str(tmp_path / "f.pt"), batch=2)
    feats = out["feats"]
    assert set(feats) == {"final/last", "final/mean", "zero_shot/last"}  # the tiny model has 2 layers
    assert feats["final/last"].shape == (3, 2, 64) and feats["zero_shot/last"].shape == (3, 2, 1)
    # a reply's features are the same wherever it appears (padded in another batch, other position)
    for key in feats:
        torch.testing.assert_close(feats[key][0, 1], feats[key][1, 0])  # "A dull day."
        torch.testing.assert_close(feats[key][0, 0], feats[key][2, 1])  # "A lovely day."
    assert not torch.allclose(feats["final/last"][0, 0], feats["final/last"][0, 1])
    # the zero-shot feature: logit("Positive") - logit("Negative") after the turn, one reply alone
    tok, model = load_tokenizer(str(tiny_model_dir)), load_causal_lm(str(tiny_model_dir)).eval()
    pos, neg = rm_question.answer_ids(tok)
    assert pos != neg
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([rm_question.turn_ids(tok, "Great!")])).logits[0, -1]
    assert float(feats["zero_shot/last"][2, 0]) == pytest.approx(float(logits[pos] - logits[neg]), abs=1e-4)
    assert out["gold_c"].tolist() == pytest.approx([0.6, -0.2, 0.7])
    many = {"feats": {k: v.repeat(4, 1, 1) for k, v in feats.items()}, "gold_c": out["gold_c"].repeat(4),
            "gold_r": out["gold_r"].repeat(4), "prompts": out["prompts"] * 4}  # a probe needs 8 pairs
    table = rm_question.probes(many, many)
    assert [r["key"] for r in table] == list(feats) and all(0 <= r["acc"] <= 1 for r in table)
