"""Chat-template tokenization: which tokens are trained, preference splits, truncation and its counts."""

from __future__ import annotations

import copy
import json

import pytest

from rlhfkit.data import (
    IGNORE_INDEX,
    DataError,
    PreferenceExample,
    PromptExample,
    SFTExample,
    TruncationStats,
    load_preference,
    load_sft,
    render_ids,
    render_prompt_ids,
    tokenize_dataset,
    tokenize_preference,
    tokenize_prompt,
    tokenize_sft,
)

EOT = "<|im_end|>"


def labelled_runs(feature) -> list[list[int]]:
    """Maximal runs of consecutive labelled positions, as token ids."""
    runs, cur = [], []
    for tok_id, lab in zip(feature["input_ids"], feature["labels"]):
        if lab == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert lab == tok_id
            cur.append(tok_id)
    return runs + ([cur] if cur else [])


def chat(*turns, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    for i, t in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    return msgs


# ---------------------------------------------------------------------------------------- SFT

def test_sft_labels_are_exactly_the_reply_and_end_of_turn(tokenizer):
    ex = SFTExample(chat("What is the capital of France?", "Paris, of course."))
    f = tokenize_sft(tokenizer, ex, 512)
    assert f["input_ids"] == render_ids(tokenizer, ex.messages)
    runs = labelled_runs(f)
    assert [tokenizer.decode(r) for r in runs] == ["Paris, of course." + EOT]
    # everything before the reply (system, user turn, assistant header) is masked
    n_prompt = len(render_prompt_ids(tokenizer, ex.messages[:1]))
    assert all(lab == IGNORE_INDEX for lab in f["labels"][:n_prompt])
    assert f["labels"][n_prompt] != IGNORE_INDEX
    # the template's newline after <|im_end|> is not trained
    assert tokenizer.decode(f["input_ids"][-1:]) == "\n" and f["labels"][-1] == IGNORE_INDEX


def test_sft_multi_turn_trains_every_assistant_turn(tokenizer):
    ex = SFTExample(chat("2+2?", "4", "And 3+3?", "It is 6.", system="Be brief."))
    runs = labelled_runs(tokenize_sft(tokenizer, ex, 512))
    assert [tokenizer.decode(r) for r in runs] == ["4" + EOT, "It is 6." + EOT]


@pytest.mark.parametrize("record", [
    {"prompt": chat("2+2?", "4", "And 3+3?"), "completion": [{"role": "assistant", "content": "It is 6."}]},
    {"prompt": chat("2+2?", "4", "And 3+3?"), "response": "It is 6."},
    {"prompt": "\n\nHuman: 2+2?\n\nAssistant: 4\n\nHuman: And 3+3?\n\nAssistant:", "response": " It is 6."},
])
def test_sft_prompt_with_earlier_assistant_turns_trains_only_its_completion(tokenizer, tmp_path, record):
    """A prompt / completion record trains the completion alone, as TRL's completion_only_loss
    does: an assistant turn inside a multi-turn prompt is context (the same conversation as
    ``messages`` trains both replies); so does SFT on a pair's chosen reply (DPO's sft_first)."""
    from rlhfkit.data.formats import sft_from_preference

    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps({"messages": chat("2+2?", "4", "And 3+3?", "It is 6.")}) + "\n")
    split, whole = (tokenize_sft(tokenizer, ex, 512) for ex in load_sft(path))
    assert split["input_ids"] == whole["input_ids"]
    assert [tokenizer.decode(r) for r in labelled_runs(split)] == ["It is 6." + EOT]
    assert [tokenizer.decode(r) for r in labelled_runs(whole)] == ["4" + EOT, "It is 6." + EOT]
    pair = PreferenceExample(chat("2+2?", "4", "And 3+3?"), "It is 6.", "It is 7.")
    (chosen,) = sft_from_preference([pair])
    assert [tokenizer.decode(r) for r in labelled_runs(tokenize_sft(tokenizer, chosen, 512))] == ["It is 6." + EOT]


def test_sft_prompt_response_rows_equal_messages_rows(tokenizer, tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": "Hi", "response": "Hello!"}) + "\n"
                    + json.dumps({"messages": chat("Hi", "Hello!")}) + "\n")
    a, b = (tokenize_sft(tokenizer, ex, 128) for ex in load_sft(path))
    assert a == b


@pytest.mark.parametrize("reply", ["\n\nHello", "  two spaces", "    def f():\n        return 1", "  - item"])
def test_reply_whose_first_token_merges_with_the_header_is_labelled_as_a_rollout_writes_it(tokenizer, reply):
    """"assistant\\n" + "\\n\\nHello" tokenizes differently from the two parts: the prompt keeps
    the generation prompt's tokens and the reply is tokenized after it, as a model writes it."""
    ex = SFTExample(chat("Hi", reply), origin=("x.jsonl", 4))
    f = tokenize_sft(tokenizer, ex, 128)
    prompt = render_prompt_ids(tokenizer, chat("Hi"))
    assert f["input_ids"][:len(prompt)] == prompt
    (run,) = labelled_runs(f)
    assert run == tokenizer(reply, add_special_tokens=False)["input_ids"] + tokenizer.convert_tokens_to_ids([EOT])
    pair = tokenize_preference(tokenizer, PreferenceExample(chat("Hi"), reply, "No."), 128)
    assert pair["prompt_ids"] == prompt and pair["chosen_ids"] == run


def test_multi_turn_with_a_separator_that_merges_into_the_next_header(tokenizer):
    """An Alpaca-style template: the "\\n\\n" after a reply merges with the next "###"; every turn
    is still found, and each labelled run is a reply."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ '### Instruction:\\n' + m['content'] "
                         "+ '\\n\\n' }}{% else %}{{ '### Response:\\n' + m['content'] + '\\n\\n' }}{% endif %}"
                         "{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}")
    f = tokenize_sft(tok, SFTExample(chat("hi", "yo", "again", "ok")), 256)
    assert [tok.decode(r) for r in labelled_runs(f)] == ["yo\n\n", "ok\n\n"]


def test_template_that_rewrites_earlier_turns_is_reported(tokenizer):
    tok = copy.deepcopy(tokenizer)  # the number of messages at the top: every prefix renders differently
    tok.chat_template = "{{ messages|length }}" + tokenizer.chat_template
    ex = SFTExample(chat("Hi", "Hello"), origin=("x.jsonl", 4))
    with pytest.raises(DataError, match=r"x.jsonl:4: field 'messages': .*prefix-stable.*rewrites earlier turns"):
        tokenize_sft(tok, ex, 128)


# ---------------------------------------------------------------------------------- preference

def test_preference_prompt_plus_response_is_the_full_rendering(tokenizer):
    prompt = chat("Hi", "Hello!", "Tell me a joke.", system="Be funny.")
    ex = PreferenceExample(prompt, "Why did the chicken cross the road?", "No.", category="chat", margin=1.0)
    f = tokenize_preference(tokenizer, ex, 512)
    assert f["prompt_ids"] == render_prompt_ids(tokenizer, prompt)
    for key, text in (("chosen", ex.chosen), ("rejected", ex.rejected)):
        full = render_ids(tokenizer, [*prompt, {"role": "assistant", "content": text}])
        seq = f["prompt_ids"] + f[f"{key}_ids"]
        assert full[:len(seq)] == seq and tokenizer.decode(full[len(seq):]) == "\n"
        assert tokenizer.decode(f[f"{key}_ids"]) == text + EOT
    assert f["category"] == "chat" and f["margin"] == 1.0


def test_prompt_rendering_ends_with_generation_header(tokenizer):
    ex = PromptExample(chat("2+2?"), reference="4", meta={"id": 7})
    f = tokenize_prompt(tokenizer, ex, 128)
    assert f["input_ids"] == render_prompt_ids(tokenizer, ex.prompt)
    assert tokenizer.decode(f["input_ids"]).endswith("<|im_start|>assistant\n")
    assert (f["reference"], f["meta"]) == ("4", {"id": 7})


# ---------------------------------------------------------------------------------- truncation

def test_over_long_with_error_names_file_line_field_and_lengths(tokenizer, tmp_path):
    rows = [{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
            {"prompt": "Hi", "chosen": "word " * 100, "rejected": "Hey."}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as info:
        tokenize_dataset(tokenizer, load_preference(path), "preference", max_length=64)
    msg = str(info.value)
    assert "pairs.jsonl:2: field 'chosen'" in msg and "max_length=64" in msg, msg
    assert (info.value.line, info.value.field) == (2, "chosen")


def test_sft_truncation_sides_and_counts(tokenizer):
    ex = SFTExample(chat("Hi", "one two three four five six seven eight"), origin=("a.jsonl", 1))
    full = tokenize_sft(tokenizer, ex, 512)
    n = len(full["input_ids"])
    stats = TruncationStats()
    right = tokenize_sft(tokenizer, ex, n - 3, "right", stats)
    left = tokenize_sft(tokenizer, ex, n - 3, "left", stats)
    assert right["input_ids"] == full["input_ids"][:n - 3] and right["labels"] == full["labels"][:n - 3]
    assert left["input_ids"] == full["input_ids"][3:] and left["labels"] == full["labels"][3:]
    assert stats.by_source["a.jsonl"] == {"examples": 2, "truncated": 2, "dropped": 0, "tokens_removed": 6}


def test_tokenize_dataset_counts_truncations_and_drops_per_source(tokenizer):
    short = SFTExample(chat("Hi", "Yo."), origin=("a.jsonl", 1))
    long_reply = SFTExample(chat("Hi", "word " * 40), origin=("a.jsonl", 2))
    long_prompt = SFTExample(chat("word " * 60, "Yo."), origin=("b.jsonl", 1))  # right-cut removes the whole reply
    L = 48
    feats, stats = tokenize_dataset(tokenizer, [short, long_reply, long_prompt], "sft", L, "right")
    assert len(feats) == 2 and all(len(f["input_ids"]) <= L for f in feats)
    assert stats.by_source["a.jsonl"]["truncated"] == 1 and stats.by_source["a.jsonl"]["dropped"] == 0
    n_long = len(tokenize_sft(tokenizer, long_prompt, 999)["input_ids"])
    assert stats.by_source["b.jsonl"] == {"examples": 1, "truncated": 1, "dropped": 1, "tokens_removed": n_long - L}
    assert (stats.examples, stats.truncated, stats.dropped) == (3, 2, 1)
    assert "b.jsonl: 1/1 truncated" in stats.summary()
    with pytest.raises(DataError, match="all 1 examples were dropped"):
        tokenize_dataset(tokenizer, [long_prompt], "sft", L, "right")


def test_preference_truncation_keeps_prompt_end_and_response_start(tokenizer):
    ex = PreferenceExample(chat("context " * 50 + "Question?"), "answer " * 40, "no " * 10)
    full = tokenize_preference(tokenizer, ex, 1024)
    L = 64
    stats = TruncationStats()
    cut = tokenize_preference(tokenizer, ex, L, "left", stats)
    p = cut["prompt_ids"]
    assert len(p) + max(len(cut["chosen_ids"]), len(cut["rejected_ids"])) <= L
    assert p == full["prompt_ids"][-len(p):] and len(p) >= L // 2  # end of the prompt, at least half the budget
    assert cut["chosen_ids"] == full["chosen_ids"][:len(cut["chosen_ids"])]
    assert cut["rejected_ids"] == full["rejected_ids"]  # short enough to survive
    assert stats.truncated == 1


def test_prompt_truncation_keeps_the_generation_header(tokenizer):
    ex = PromptExample(chat("word " * 100))
    f = tokenize_prompt(tokenizer, ex, 16, "left")
    assert len(f["input_ids"]) == 16 and tokenizer.decode(f["input_ids"]).endswith("<|im_start|>assistant\n")


def test_tokenize_dataset_in_processes_matches_and_reports_the_first_error(tokenizer):
    exs = [SFTExample(chat(f"Question {i}?", f"Answer {i}."), origin=("c.jsonl", i + 1)) for i in range(24)]
    one, s1 = tokenize_dataset(tokenizer, exs, "sft", 64)
    two, s2 = tokenize_dataset(tokenizer, exs, "sft", 64, num_proc=2)
    assert one == two and s1 == s2
    bad = list(exs)
    bad[9] = SFTExample(chat("Hi", "word " * 80), origin=("c.jsonl", 10))
    bad[20] = SFTExample(chat("Hi", "word " * 80), origin=("c.jsonl", 21))
    with pytest.raises(DataError, match=r"c.jsonl:10: field 'messages'"):
        tokenize_dataset(tokenizer, bad, "sft", 64, num_proc=2)


def test_tokenize_dataset_checks_kind(tokenizer):
    with pytest.raises(TypeError, match="PreferenceExample"):
        tokenize_dataset(tokenizer, [SFTExample(chat("a", "b"))], "preference", 64)


def test_a_template_whose_replies_end_in_no_end_of_turn_token_is_warned_about(tokenizer, caplog):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    with caplog.at_level("WARNING", logger="rlhfkit"):
        tokenize_dataset(tok, [SFTExample(chat("hi", "yo"), origin=("x.jsonl", 1))], "sft", 64)
        tokenize_dataset(tok, [SFTExample(chat("ho", "yo"), origin=("x.jsonl", 2))], "sft", 64)  # its held-out split
    assert caplog.text.count("x.jsonl: no trained reply ends with an end-of-turn token (<|im_end|>)") == 1
    caplog.clear()
    with caplog.at_level("WARNING", logger="rlhfkit"):
        tokenize_dataset(tokenizer, [SFTExample(chat("hi", "yo"), origin=("x.jsonl", 1))], "sft", 64)
    assert "end-of-turn" not in caplog.text  # ChatML closes each reply with <|im_end|>
    cut = SFTExample(chat("hi", "yo"), origin=("best.jsonl", 1), token_ids=([1, 2], [3, 4]))  # sampled, cut
    with caplog.at_level("WARNING", logger="rlhfkit"):
        tokenize_dataset(tokenizer, [cut], "sft", 64)
    assert "best.jsonl: no trained reply ends with an end-of-turn token" in caplog.text
    assert "every reply given as token ids was cut before its end" in caplog.text


def test_text_already_rendered_with_the_template_is_refused(tokenizer, tmp_path):
    """A TRL 'standard' dataset rendered with apply_chat_template(tokenize=False) would be wrapped
    twice, its <|im_start|> read as real turns: one located line instead."""
    from rlhfkit.rollout import load_prompt_items

    rendered = tokenizer.apply_chat_template(chat("Hi"), tokenize=False, add_generation_prompt=True)
    with pytest.raises(DataError, match=r"x.jsonl:3: field 'prompt': .*control token '<\|im_(start|end)\|>'"):
        tokenize_preference(tokenizer, PreferenceExample(chat(rendered), "a", "b", origin=("x.jsonl", 3)), 256)
    with pytest.raises(DataError, match=r"x.jsonl:3: field 'response': .*control token '<\|im_end\|>'"):
        tokenize_sft(tokenizer, SFTExample(chat("Hi", "yo<|im_end|>"), origin=("x.jsonl", 3), field="response"), 256)
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": rendered}) + "\n")
    with pytest.raises(DataError, match=r"p.jsonl:1: field 'prompt': .*control token"):
        load_prompt_items(str(path), tokenizer, max_prompt_length=256)
    tokenize_sft(tokenizer, SFTExample(chat("Write <b>bold</b> and </s>", "ok")), 256)  # other markup is text
    for msgs, field, named in ((chat("<|im_start|>", "ok"), "response", "prompt"),
                               (chat("Hi", "ok", "<|im_end|>", "yes"), "messages", r"messages\[2\]\.content")):
        with pytest.raises(DataError, match=rf"x.jsonl:3: field '{named}': .*control token"):
            tokenize_sft(tokenizer, SFTExample(msgs, origin=("x.jsonl", 3), field=field), 256)


def test_preference_truncation_counts_the_tokens_cut_from_both_responses(tokenizer):
    ex = PreferenceExample(chat("context " * 30 + "Question?"), "answer " * 40, "no " * 40, origin=("p.jsonl", 1))
    full = tokenize_preference(tokenizer, ex, 1024)
    stats = TruncationStats()
    cut = tokenize_preference(tokenizer, ex, 48, "right", stats)
    assert len(full["rejected_ids"]) > len(cut["rejected_ids"]) > 0  # both responses were cut
    assert len(full["chosen_ids"]) > len(cut["chosen_ids"]) > 0
    removed = sum(len(full[k]) - len(cut[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
    assert stats.by_source["p.jsonl"]["tokens_removed"] == removed


def test_sft_example_left_with_only_its_first_label_is_dropped(tokenizer):
    """A left cut to the reply's end-of-turn token and the newline after it: label 0 is never predicted."""
    ex = SFTExample(chat("Hi", "Yo."), origin=("a.jsonl", 1))
    cut = tokenize_sft(tokenizer, ex, 2, "left")
    assert cut["labels"][0] != IGNORE_INDEX and cut["labels"][1:] == [IGNORE_INDEX]
    with pytest.raises(DataError, match="all 1 examples were dropped"):
        tokenize_dataset(tokenizer, [ex], "sft", 2, "left")


# ------------------------------------------------------------------------- records carrying token ids

def test_records_with_token_ids_train_those_tokens(tokenizer, tmp_path):
    """prompt_ids / chosen_ids / rejected_ids (SFT: prompt_ids / response_ids) are trained as given,
    not the text rendered again: a reply cut before its end-of-turn token stays cut; max_length
    truncates them as it truncates rendered ones."""
    prompt = render_prompt_ids(tokenizer, chat("Hi"))
    cut = tokenizer.encode("Hello there, how", add_special_tokens=False)  # sampled, then cut
    ended = tokenizer.encode("Go away.", add_special_tokens=False) + tokenizer.encode(EOT, add_special_tokens=False)
    rows = [{"prompt": "Hi", "chosen": "Hello there, how", "rejected": "Go away.", "prompt_ids": prompt,
             "chosen_ids": cut, "rejected_ids": ended}]
    (tmp_path / "pairs.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (ex,) = load_preference(tmp_path / "pairs.jsonl")
    feat = tokenize_preference(tokenizer, ex, 512)
    assert (feat["prompt_ids"], feat["chosen_ids"], feat["rejected_ids"]) == (prompt, cut, ended)
    rendered = tokenize_preference(tokenizer, PreferenceExample(ex.prompt, ex.chosen, ex.rejected), 512)
    assert rendered["chosen_ids"] == cut + ended[-1:]  # the text alone would close the cut reply
    short = tokenize_preference(tokenizer, ex, len(prompt) + 2, truncation="right")  # the prompt loses its start
    assert (short["prompt_ids"], short["chosen_ids"], short["rejected_ids"]) == (prompt[2:], cut, ended)
    short = tokenize_preference(tokenizer, ex, 8, truncation="right")  # 4 prompt tokens kept, 4 of each reply
    assert (short["prompt_ids"], short["chosen_ids"], short["rejected_ids"]) == (prompt[-4:], cut[:4], ended[:4])
    sft = {"prompt": "Hi", "response": "Hello there, how", "prompt_ids": prompt, "response_ids": cut}
    (tmp_path / "sft.jsonl").write_text(json.dumps(sft) + "\n")
    feat = tokenize_sft(tokenizer, load_sft(tmp_path / "sft.jsonl")[0], 512)
    assert feat["input_ids"] == prompt + cut and feat["labels"] == [IGNORE_INDEX] * len(prompt) + cut


@pytest.mark.parametrize("kind, change, field, fragment", [
    ("preference", {"rejected_ids": None}, "rejected_ids", "token ids come as prompt_ids, chosen_ids, rejected_ids"),
    ("preference", {"chosen_ids": []}, "chosen_ids", "non-empty list of token ids"),
    ("preference", {"chosen_ids": [1, -2]}, "chosen_ids", "integers >= 0"),
    ("preference", {"chosen_ids": [1, 2.0]}, "chosen_ids", "integers >= 0"),
    ("preference", {"chosen_ids": [1, True]}, "chosen_ids", "integers >= 0"),
    ("preference", {"rejected_ids": [10 ** 9]}, "rejected_ids", "not in the tokenizer's vocabulary"),
    ("sft", {"response_ids": None}, "response_ids", "token ids come as prompt_ids, response_ids"),
    ("sft", {"prompt_ids": "1 2 3"}, "prompt_ids", "non-empty list of token ids"),
    ("sft", {"response_ids": [10 ** 9]}, "response_ids", "not in the tokenizer's vocabulary"),
])
def test_bad_token_ids_name_the_file_line_and_field(tokenizer, tmp_path, kind, change, field, fragment):
    if kind == "preference":
        rec = {"prompt": "Hi", "chosen": "Hello", "rejected": "Bye", "prompt_ids": [1, 2], "chosen_ids": [3],
               "rejected_ids": [4]}
    else:
        rec = {"prompt": "Hi", "response": "Hello", "prompt_ids": [1, 2], "response_ids": [3]}
    rec = {k: v for k, v in {**rec, **change}.items() if v is not None}
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    with pytest.raises(DataError) as info:
        load = load_preference if kind == "preference" else load_sft
        tokenize_dataset(tokenizer, load(path), kind, max_length=64)
    assert (info.value.line, info.value.field) == (1, field) and fragment in str(info.value), str(info.value)


def test_token_ids_need_the_prompt_form(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"messages": chat("Hi", "Hello"), "prompt_ids": [1], "response_ids": [2]}) + "\n")
    with pytest.raises(DataError, match="token ids go with 'prompt' and 'response', not 'messages'"):
        load_sft(path)
    path.write_text(json.dumps({"chosen": chat("Hi", "A"), "rejected": chat("Hi", "B"), "prompt_ids": [1],
                                "chosen_ids": [2], "rejected_ids": [3]}) + "\n")
    with pytest.raises(DataError, match="token ids go with 'prompt', 'chosen' and 'rejected'"):
        load_preference(path)
