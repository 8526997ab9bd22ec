"""Plain-text PTX data: .txt documents or {"text"} records, every token trained, long documents
split into windows that predict each token exactly once."""

from __future__ import annotations

import pytest
from conftest import write_jsonl

from rlhfkit.config import PTXSection
from rlhfkit.data import DataError, load_plain_text, tokenize_plain_text
from rlhfkit.trainers.pg_setup import load_ptx


class CharTokenizer:
    """One id per character (ord), EOS = 0: windows can be checked by hand."""

    eos_token_id = 0

    def __call__(self, text):
        return {"input_ids": [ord(c) for c in text]}


def test_windows_overlap_by_one_token_so_each_is_predicted_once():
    feats = tokenize_plain_text(CharTokenizer(), [("abcdefg", None)], max_length=4)
    a, b, c, d, e, f, g = (ord(x) for x in "abcdefg")
    # ids a..g + EOS (8 tokens); windows of 4 starting at 0, 3, 6
    assert [x["input_ids"] for x in feats] == [[a, b, c, d], [d, e, f, g], [g, 0]]
    assert all(x["labels"] == x["input_ids"] for x in feats)  # every token is a label
    predicted = [t for x in feats for t in x["labels"][1:]]  # position 0 of a window is never predicted
    assert predicted == [b, c, d, e, f, g, 0]


def test_short_document_is_one_window_ending_in_eos():
    assert tokenize_plain_text(CharTokenizer(), [("hi", None)], max_length=16) == [
        {"input_ids": [ord("h"), ord("i"), 0], "labels": [ord("h"), ord("i"), 0]}]


def test_txt_documents_are_separated_by_blank_lines(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("First document,\nstill the first.\n\n\nSecond one.\n  \nThird.\n")
    docs = load_plain_text(str(path))
    assert [d for d, _ in docs] == ["First document,\nstill the first.", "Second one.", "Third."]
    assert [o.line for _, o in docs] == [1, 5, 7]


def test_text_records_are_plain_and_conversations_are_not(tmp_path):
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"text": "one", "source": "web"}, {"text": "two"}])
    assert [d for d, _ in load_plain_text(str(plain))] == ["one", "two"]
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "Hi", "response": "Hello"}])
    assert load_plain_text(str(chat)) is None


def test_mixed_or_bad_plain_records_name_the_line(tmp_path):
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "one"}, {"prompt": "Hi", "response": "Hello"}])
    with pytest.raises(DataError, match=r"mixed.jsonl:2.*mixes plain text and conversations"):
        load_plain_text(str(mixed))
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"text": "one"}, {"text": "  "}])
    with pytest.raises(DataError, match=r"empty.jsonl:2.*text.*empty"):
        load_plain_text(str(empty))


def test_load_ptx_trains_every_plain_token_but_only_replies_of_conversations(tokenizer, tmp_path):
    txt = tmp_path / "ptx.txt"
    txt.write_text(("The sea is blue and the sky is wide. " * 20 + "\n\n") * 3)
    plain = load_ptx(PTXSection(data=str(txt), coef=1.0, max_length=32), tokenizer, 4, 0)
    assert len(plain.examples) > 3  # long documents became several windows
    assert all(len(x["input_ids"]) <= 32 and x["labels"] == x["input_ids"] for x in plain.examples)
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "Say blue", "response": "blue"}] * 4)
    sft = load_ptx(PTXSection(data=str(chat), coef=1.0, max_length=64), tokenizer, 4, 0)
    assert all(-100 in x["labels"] for x in sft.examples)  # the prompt is not trained
