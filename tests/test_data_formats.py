"""Loading and validating records: every format gives the same examples; errors point at file:line:field."""

from __future__ import annotations

import csv
import json
import pickle

import pytest

from rlhfkit.data import (
    DataError,
    PreferenceExample,
    PromptExample,
    SFTExample,
    load_preference,
    load_prompts,
    load_records,
    load_sft,
    sft_from_preference,
)

PAIRS = [
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "category": "math", "margin": 1.5},
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Dog.", "category": "chat", "margin": 0.5},
    {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No.", "category": "chat", "margin": 2.0},
]
CHATS = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"},
                  {"role": "assistant", "content": "6"}]},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_all_formats(tmp_path, rows, csv_ok=True):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    sources = {
        "jsonl": write_jsonl(tmp_path / "d.jsonl", rows),
        "json": tmp_path / "d.json", "json_data": tmp_path / "d_data.json", "parquet": tmp_path / "d.parquet",
        "dataset": datasets.Dataset.from_list(rows),
        "datasetdict": datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}),
        "memory": rows,
    }
    sources["json"].write_text(json.dumps(rows, indent=2))
    sources["json_data"].write_text(json.dumps({"data": rows}))
    pq.write_table(pa.Table.from_pylist(rows), sources["parquet"])
    if csv_ok:
        sources["csv"] = tmp_path / "d.csv"
        with open(sources["csv"], "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return sources


# ------------------------------------------------------------------------------------- formats

def test_every_format_gives_the_same_preference_examples(tmp_path):
    sources = write_all_formats(tmp_path, PAIRS)
    expected = load_preference(sources["jsonl"])
    assert expected[0] == PreferenceExample([{"role": "user", "content": "What is 2+2?"}], "4", "5", "math", 1.5)
    for name, src in sources.items():
        got = load_preference(src)
        assert got == expected, name
        assert [ex.origin.line for ex in got] == ([2, 3, 4] if name == "csv" else [1, 2, 3]), name


def test_every_format_gives_the_same_sft_examples(tmp_path):
    sources = write_all_formats(tmp_path, CHATS, csv_ok=False)
    expected = load_sft(sources["jsonl"])
    assert expected[1].messages[-1] == {"role": "assistant", "content": "6"}
    for name, src in sources.items():
        assert load_sft(src) == expected, name
    # prompt/response rows (CSV) build the same [user, assistant] conversation
    csv_path = tmp_path / "pr.csv"
    csv_path.write_text("prompt,response\nHi,Hello!\n")
    assert load_sft(csv_path) == expected[:1]


def test_prompts_from_strings_and_messages(tmp_path):
    rows = [{"prompt": "2+2?", "answer": 4, "id": "a"},
            {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}], "reference": "x"}]
    got = load_prompts(write_jsonl(tmp_path / "p.jsonl", rows))
    assert got[0] == PromptExample([{"role": "user", "content": "2+2?"}], reference="4", meta={"answer": 4, "id": "a"})
    assert got[1].prompt[0]["role"] == "system" and got[1].reference == "x"
    # what a reward function receives: every field but the prompt; `reference` as a string
    assert got[0].reward_fields() == {"answer": 4, "id": "a", "reference": "4"}
    assert got[1].reward_fields() == {"answer": None, "id": None, "reference": "x"}  # the set's fields, None here


def test_prompt_records_keep_every_extra_field(tmp_path):
    """Extra columns of any JSON type reach reward functions unchanged, from every format."""
    rows = [{"prompt": "Sort 3 1 2", "reference": 123, "tests": ["assert f() == 1", "assert g()"],
             "info": {"level": 2, "tags": ["sort"], "strict": True}, "weight": 0.5, "note": None},
            {"prompt": "Hi", "tests": [], "info": {"level": 1, "tags": [], "strict": False}, "weight": 1.0,
             "note": "x"}]
    sources = write_all_formats(tmp_path, rows, csv_ok=False)
    for name, src in sources.items():
        got = load_prompts(src)
        assert got[0].reference == "123", name
        assert got[0].reward_fields() == {**{k: v for k, v in rows[0].items() if k != "prompt"},
                                          "reference": "123"}, name
        # a column absent from a record (Parquet / datasets fill it with null) is None or absent
        assert got[1].reward_fields().get("reference") is None and got[1].meta["tests"] == [], name


@pytest.mark.parametrize("extra, field, fragment", [
    ({"when": __import__("datetime").date(2024, 1, 1)}, "when", "expected a JSON value"),
    ({"info": {"ids": [1, {1, 2}]}}, "info.ids[1]", "got set"),
    ({"info": {1: "a"}}, "info", "object keys must be strings"),
    ({"responses": "r"}, "responses", "reserved name"),
    ({"prompts": ["p"]}, "prompts", "reserved name"),
])
def test_prompt_fields_errors_name_the_field(extra, field, fragment):
    with pytest.raises(DataError) as info:
        load_prompts([{"prompt": "ok"}, {"prompt": "Hi", **extra}])
    assert (info.value.source, info.value.line, info.value.field) == ("<memory>", 2, field)
    assert str(info.value).startswith(f"<memory>:record 2: field '{field}': ") and fragment in str(info.value)


def test_prompt_fields_from_parquet_must_be_json_values(tmp_path):
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "Hi", "at": datetime.datetime(2024, 1, 1)}]), path)
    with pytest.raises(DataError, match=r"p\.parquet:record 1: field 'at': expected a JSON value .* got datetime"):
        load_prompts(path)


def test_limit_and_splits(tmp_path):
    import datasets

    assert len(load_records(write_jsonl(tmp_path / "d.jsonl", PAIRS), limit=2)) == 2
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(PAIRS),
                               "test": datasets.Dataset.from_list(PAIRS[:1])})
    assert len(load_records(dd)) == 3 and len(load_records(dd, split="test")) == 1
    with pytest.raises(ValueError, match="split"):
        load_records(tmp_path / "d.jsonl", split="train")


HH_CHOSEN = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: 6."
HH_REJECTED = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: 7, I think."
HH_PROMPT = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
             {"role": "user", "content": "And 3+3?"}]


def test_hh_string_transcripts_split_at_last_assistant_turn():
    ex = load_preference([{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])[0]
    assert ex == PreferenceExample(HH_PROMPT, "6.", "7, I think.")


def test_hh_message_transcripts_and_other_common_shapes():
    as_lists = {k: [*HH_PROMPT, {"role": "assistant", "content": c}]
                for k, c in (("chosen", "6."), ("rejected", "7, I think."))}
    open_prompt = {"prompt": HH_CHOSEN.rsplit(" 6.", 1)[0], "chosen": " 6.", "rejected": " 7, I think."}
    # UltraFeedback style: a string prompt and full [user, assistant] transcripts
    uf = {"prompt": "And 3+3?", "chosen": [HH_PROMPT[-1], {"role": "assistant", "content": "6."}],
          "rejected": [HH_PROMPT[-1], {"role": "assistant", "content": "7, I think."}]}
    single = {"prompt": HH_PROMPT, "chosen": [{"role": "assistant", "content": "6."}], "rejected": "7, I think."}
    got = load_preference([as_lists, open_prompt, single, uf])
    want = PreferenceExample(HH_PROMPT, "6.", "7, I think.")
    assert got[0] == want and got[2] == want
    assert got[1] == want  # the space after "Assistant:" is not part of the reply
    assert got[3] == PreferenceExample(HH_PROMPT[-1:], "6.", "7, I think.")


def test_hh_split_into_prompt_and_response_trains_sft_on_the_reply_as_the_pairs_do():
    """The space after "Assistant:" belongs to the separator: SFT and the preference pairs built
    from the same split rows see the same reply."""
    prompt = HH_CHOSEN.rsplit(" 6.", 1)[0]
    sft = load_sft([{"prompt": prompt, "response": " 6."}])[0]
    pair = load_preference([{"prompt": prompt, "chosen": " 6.", "rejected": " 7, I think."}])[0]
    assert sft.messages == [*HH_PROMPT, {"role": "assistant", "content": "6."}]
    assert sft.messages[-1]["content"] == pair.chosen
    plain = load_sft([{"prompt": "Indent this", "response": "    x = 1"}])[0]
    assert plain.messages[-1]["content"] == "    x = 1"  # content of other formats is kept verbatim


def test_a_prompt_with_full_hh_transcripts_trains_on_the_replies_alone():
    """HH-RLHF as many copies ship it: a prompt column and chosen / rejected that repeat it in full."""
    want = PreferenceExample(HH_PROMPT, "6.", "7, I think.")
    hh_prompt = HH_CHOSEN.rsplit(" 6.", 1)[0]
    got = load_preference([{"prompt": hh_prompt, "chosen": HH_CHOSEN, "rejected": HH_REJECTED},
                           {"prompt": "And 3+3?", "chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
    assert got[0] == want and got[1] == want
    with pytest.raises(DataError, match=r"'chosen'.*does not match 'prompt'"):
        load_preference([{"prompt": "What is 5+5?", "chosen": HH_CHOSEN, "rejected": HH_REJECTED}])


def test_csv_cells_holding_message_lists_are_read_as_lists(tmp_path):
    """pandas' to_csv writes a column of message lists as their Python repr: read back as the lists,
    never as reply text; a cell that is neither JSON nor a literal is refused, naming line and field."""
    import pandas as pd

    rows = [{"prompt": [HH_PROMPT[-1]], "chosen": [HH_PROMPT[-1], {"role": "assistant", "content": "6."}],
             "rejected": json.dumps([HH_PROMPT[-1], {"role": "assistant", "content": "7, I think."}])},
            {"prompt": "Name a bracket", "chosen": "[", "rejected": "[{ is two"}]
    pd.DataFrame(rows).to_csv(tmp_path / "uf.csv", index=False)
    got = load_preference(tmp_path / "uf.csv")
    assert got[0] == PreferenceExample(HH_PROMPT[-1:], "6.", "7, I think.")
    assert (got[1].chosen, got[1].rejected) == ("[", "[{ is two")
    (tmp_path / "np.csv").write_text('prompt,chosen,rejected\np,"[{\'role\': \'user\', \'content\': \'a\'}\n '
                                     '{\'role\': \'assistant\', \'content\': \'b\'}]",c\n')
    raises_at(load_preference, tmp_path / "np.csv", 2, "chosen", "neither JSON nor a Python literal")


def test_sft_from_preference_trains_on_chosen():
    ex = load_preference(PAIRS[:1])[0]
    assert sft_from_preference([ex])[0] == SFTExample([*ex.prompt, {"role": "assistant", "content": "4"}])


# ---------------------------------------------------------------------------------- malformed

def raises_at(loader, path, line, field, *fragments):
    with pytest.raises(DataError) as info:
        loader(path)
    err, msg = info.value, str(info.value)
    assert err.source == str(path) and err.line == line and err.field == field, msg
    assert f"{path.name}:{line}:" in msg and (field is None or f"'{field}'" in msg), msg
    for frag in fragments:
        assert frag in msg, msg
    return err


def test_bad_json_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n\n" + '{"prompt": "x", "chosen": }\n')
    raises_at(load_preference, path, 3, None, "invalid JSON")


def test_empty_file_and_non_object(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl.*no records"):
        load_records(tmp_path / "empty.jsonl")
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    raises_at(load_records, tmp_path / "list.jsonl", 1, None, "expected a JSON object")


@pytest.mark.parametrize("row, field, fragment", [
    ({"prompt": "p", "chosen": "a"}, "rejected", "missing"),
    ({"prompt": "p", "chosen": 5, "rejected": "b"}, "chosen", "got int"),
    ({"prompt": "   ", "chosen": "a", "rejected": "b"}, "prompt", "whitespace-only"),
    ({"prompt": "p", "chosen": "a", "rejected": " a "}, "rejected", "identical to 'chosen'"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "margin", "expected a number"),
    ({"chosen": "just text", "rejected": "other"}, "prompt", "missing"),
    ({"chosen": HH_CHOSEN, "rejected": HH_REJECTED.replace("And 3+3?", "And 4+4?")},
     "rejected", "differs from 'chosen'"),
    ({"chosen": HH_CHOSEN, "rejected": HH_REJECTED + "\n\nHuman: ok?"},
     "rejected", "must end with the assistant reply"),
    ({"prompt": [{"role": "user", "content": "p"}, {"role": "human", "content": "q"}], "chosen": "a", "rejected": "b"},
     "prompt[1].role", "unknown role 'human'"),
])
def test_malformed_preference_rows(tmp_path, row, field, fragment):
    path = write_jsonl(tmp_path / "pairs.jsonl", [PAIRS[0], row])
    raises_at(load_preference, path, 2, field, fragment)


@pytest.mark.parametrize("row, field, fragment", [
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "x"}]},
     "messages[1].role", "unknown role"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]},
     "messages[1].content", "empty"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, "messages", "must end with an assistant turn"),
    ({"messages": [{"role": "assistant", "content": "Hi"}]}, "messages[0].role", "first non-system message"),
    ({"messages": "Hi"}, "messages", "got str"),
    ({"prompt": "Hi"}, "response", "missing"),
    ({"text": "Hi"}, "messages", "missing"),
])
def test_malformed_sft_rows(tmp_path, row, field, fragment):
    path = write_jsonl(tmp_path / "sft.jsonl", [CHATS[0], CHATS[1], row])
    raises_at(load_sft, path, 3, field, fragment)


def test_malformed_prompt_row(tmp_path):
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "ok"}, row])
    raises_at(load_prompts, path, 2, "messages", "must end with a user turn")


def test_csv_line_numbers_follow_multiline_cells(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text('prompt,chosen,rejected\n"two\nlines",a,b\np,a,\n')
    raises_at(load_preference, path, 4, "rejected", "missing")


def test_non_text_formats_report_record_numbers(tmp_path):
    sources = write_all_formats(tmp_path, [PAIRS[0], {**PAIRS[1], "chosen": "Dog."}], csv_ok=False)
    with pytest.raises(DataError) as info:
        load_preference(sources["parquet"])
    assert info.value.line == 2 and "d.parquet:record 2: field 'rejected'" in str(info.value)


def test_data_error_survives_pickling():
    err = DataError("bad", source="x.jsonl", line=3, field="chosen")
    back = pickle.loads(pickle.dumps(err))
    assert (back.source, back.line, back.field, str(back)) == ("x.jsonl", 3, "chosen", "x.jsonl:3: field 'chosen': bad")


def test_a_lone_surrogate_and_a_key_given_twice_are_one_located_line(tmp_path):
    r"""JSON allows "\ud800" and a repeated key; neither is text a tokenizer can read or a record
    that says what it means."""
    (tmp_path / "s.jsonl").write_text('{"prompt": "hi", "response": "ok"}\n{"prompt": "hi \\ud800", "response": "ok"}\n')
    with pytest.raises(DataError, match=r"s\.jsonl:2: field 'prompt': not valid Unicode text: a lone surrogate"):
        load_sft(tmp_path / "s.jsonl")
    (tmp_path / "p.jsonl").write_text('{"prompt": [{"role": "user", "content": "\\udfff"}]}\n')
    with pytest.raises(DataError, match=r"p\.jsonl:1: field 'prompt\[0\]\.content': not valid Unicode"):
        load_prompts(tmp_path / "p.jsonl")
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c", "chosen": "d"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:1: key 'chosen' appears twice"):
        load_preference(tmp_path / "d.jsonl")
    (tmp_path / "d.json").write_text('[{"prompt": "a", "prompt": "b", "response": "c"}]')
    with pytest.raises(DataError, match=r"d\.json: key 'prompt' appears twice"):
        load_sft(tmp_path / "d.json")


def test_nesting_huge_numbers_and_bad_bytes_are_one_located_line(tmp_path):
    """What json or csv cannot read, or what is nested too deeply for the code that walks a record,
    names the file and line: a list nested past the parser's recursion limit, one nested within
    it but past `MAX_DEPTH` (in a field no format reads), an integer too long to convert, a byte
    that is not UTF-8 in a CSV, and a message cell nested past the limit."""
    from rlhfkit.data.records import MAX_DEPTH

    good = '{"prompt": "hi", "response": "ok"}\n'
    cases = {
        "deep.jsonl": (good + '{"prompt": ' + "[" * 100000 + "]" * 100000 + ', "response": "x"}\n',
                       r"deep\.jsonl:2: invalid JSON: nested too deeply"),
        "nested.jsonl": (good + '{"prompt": "hi", "response": "ok", "x": ' + "[" * 600 + "]" * 600 + "}\n",
                         rf"nested\.jsonl:2: lists and objects nested more than {MAX_DEPTH} levels deep"),
        "bigint.jsonl": (good + '{"prompt": "hi", "response": "ok", "n": ' + "9" * 5000 + "}\n",
                         r"bigint\.jsonl:2: invalid JSON: Exceeds the limit"),
        "deep.json": ("[" * 100000 + "]" * 100000, r"deep\.json: invalid JSON: nested too deeply"),
        "cell.csv": ('prompt,response\nhi,ok\n"[{""role"": ' + "[" * 50000 + "]" * 50000 + '}]",x\n',
                     r"cell\.csv:3: field 'prompt': the cell looks like a list of messages"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=message):
            load_sft(tmp_path / name)
    (tmp_path / "bytes.csv").write_bytes(b"prompt,response\nhi,there\nx\xff,y\n")
    with pytest.raises(DataError, match=r"bytes\.csv:\d+: not valid UTF-8"):
        load_sft(tmp_path / "bytes.csv")
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi", "x": ' + "[" * 600 + "]" * 600 + "}\n")
    with pytest.raises(DataError, match=r"p\.jsonl:1: lists and objects nested more than"):
        load_prompts(tmp_path / "p.jsonl")


def test_hf_datasets_that_cannot_load_are_one_located_line(tmp_path, monkeypatch):
    """hf:ID that is not a directory while the hub is unreachable fails at once (no minute of
    retries); a directory with a loading script (never run) or an unknown split is one line
    naming the dataset, not a traceback."""
    import rlhfkit.hub as hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "reachable", lambda url, timeout=3.0: False)
    with pytest.raises(DataError, match=r"hf:someorg/some-ds:train: not a local directory, and .* cannot be reached"):
        load_sft("hf:someorg/some-ds")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # datasets' own switch: its cache is tried, not refused
    with pytest.raises(DataError, match=r"hf:someorg/some-ds:train: cannot load: "):
        load_sft("hf:someorg/some-ds")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    script = tmp_path / "scripted"
    script.mkdir()
    (script / "scripted.py").write_text(f"open({str(tmp_path / 'RAN')!r}, 'w')\n")
    with pytest.raises(DataError, match=r"hf:.*scripted:train: cannot load: \w+"):
        load_sft(f"hf:{script}")
    assert not (tmp_path / "RAN").exists()
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "train.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    assert len(load_sft(f"hf:{plain}")) == 1
    with pytest.raises(DataError, match=r"hf:.*plain:nosplit: cannot load: ValueError: Unknown split"):
        load_sft(f"hf:{plain}:nosplit")


def test_a_misspelled_optional_preference_field_is_said_once_per_file(tmp_path, caplog):
    """'categroy' or 'Margin' would be dropped like any extra column (a dataset's 'source' or
    'prompt_id' is, silently): a near miss of an optional field gets one warning naming the file,
    the first line and the field it resembles; the pairs load as they are."""
    rows = [{**PAIRS[0], "source": "x", "prompt_id": "7"},
            *({"prompt": f"p{i}", "chosen": "a", "rejected": "b", "categroy": "chat", "Margin": 1} for i in range(3))]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with caplog.at_level("WARNING", logger="rlhfkit"):
        pairs = load_preference(path)
    assert [p.category for p in pairs] == ["math", None, None, None]
    lines = caplog.text.strip().splitlines()
    assert len(lines) == 2, lines
    assert f"{path}:2: field 'categroy' is not used: did you mean 'category'? (said once for this file)" in lines[0]
    assert f"{path}:2: field 'Margin' is not used: did you mean 'margin'?" in lines[1]


def test_a_message_key_the_template_is_not_given_is_said_once_per_file(tmp_path, caplog):
    """reasoning_content, tool_calls or name on a message are not passed to the chat template (a
    template may render them, as a reasoning model's does): one warning per file and key names the
    first place; a key holding nothing (null, empty) is not worth a word."""
    rows = [{"messages": [{"role": "user", "content": "2+2?", "name": None},
                          {"role": "assistant", "content": "4", "reasoning_content": "two and two"}]}] * 3
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    with caplog.at_level("WARNING", logger="rlhfkit"):
        (ex, *_), = [load_sft(path)]
    assert ex.messages == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    lines = caplog.text.strip().splitlines()
    assert len(lines) == 1, lines
    assert (f"{path}:1: field 'messages[1].reasoning_content' is not used: a message's role and content are "
            "passed to the chat template, nothing else (said once for this file)") in lines[0]


def test_a_record_with_messages_and_a_completion_trains_the_messages_and_says_so(tmp_path, caplog):
    """Both forms in one record: the messages are trained and the completion left, said once per
    file; a record with a prompt beside its messages (as UltraChat's) is not worth a word."""
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    rows = [{"messages": conv, "prompt": "hi"},
            {"messages": conv, "prompt": "hi", "completion": "other"},
            {"messages": conv, "response": "other"}]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    with caplog.at_level("WARNING", logger="rlhfkit"):
        examples = load_sft(path)
    assert [e.messages for e in examples] == [conv] * 3
    lines = caplog.text.strip().splitlines()
    assert len(lines) == 1, lines
    assert (f"{path}:2: field 'completion' is not used: the record has 'messages', which are trained "
            "(every assistant turn); give one form per record (said once for this file)") in lines[0]


def test_a_record_of_other_fields_names_the_fields_it_has(tmp_path):
    """A dataset of other columns (question / answer): the error names the field it lacks and the
    fields it has, so the mapping to make is plain."""
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"qa\.jsonl:1: field 'messages': missing: an SFT record needs 'messages', or "
                                        r"'prompt' and 'response' \(or 'completion'\); the record's fields: answer, "
                                        r"question"):
        load_sft(path)
    with pytest.raises(DataError, match=r"qa\.jsonl:1: field 'chosen': missing \(or null\); the record's fields: "
                                        r"answer, question"):
        load_preference(path)


def test_a_source_of_another_type_names_what_is_accepted_and_the_conversions():
    """A DataFrame or an IterableDataset is not a source: the error names the sources there are
    and the one-call conversion of each, rather than only the type."""
    import datasets
    import pandas as pd

    frame = pd.DataFrame({"prompt": ["hi"], "response": ["hello"]})
    with pytest.raises(TypeError, match=r"of type DataFrame: give a file path, .*df\.to_dict\('records'\)"):
        load_sft(frame)
    stream = datasets.Dataset.from_list([{"prompt": "hi", "response": "hello"}]).to_iterable_dataset()
    with pytest.raises(TypeError, match=r"of type IterableDataset: .*list\(ds\.take\(n\)\)"):
        load_sft(stream)
    assert load_sft(frame.to_dict("records"))[0].messages[-1] == {"role": "assistant", "content": "hello"}
    assert load_sft(list(stream.take(1)))[0].messages[0] == {"role": "user", "content": "hi"}
