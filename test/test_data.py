"""Dataset records -> token sequences, checked against the built-in model's real tokenizer.

The point of the module under test is that training sequences match what the server tokenizes at
inference, so the expectations here are computed with the tokenizer's own calls, not written out by hand.
"""

from __future__ import annotations

import os
import pickle

import msgspec
import pytest
from transformers import AutoTokenizer

from sglang_harli.core.jobs.data import (
    PLAIN_CHAT_TEMPLATE,
    DatasetError,
    DatasetSummary,
    Example,
    build_examples,
    load_examples,
    read_jsonl,
    record_to_example,
    resolve_dataset_path,
)

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, of course."},
]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def plain_tok(tiny_model_dir):
    """The same tokenizer without a chat template, as a base model ships."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = None
    return tokenizer


def chat_ids(tokenizer, messages, **kwargs) -> list[int]:
    """``apply_chat_template(tokenize=True)``; transformers 5 returns a BatchEncoding unless told not to."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out if isinstance(out, list) else out["input_ids"])


def targets(example: Example) -> list[int]:
    return [i for i, m in zip(example.input_ids, example.loss_mask, strict=True) if m]


def test_builtin_tokenizer_is_what_the_tests_assume(tok):
    assert tok("x")["input_ids"][0] == tok.bos_token_id
    assert tok.eos_token == "<|end|>"
    assert tok.chat_template


def test_prompt_completion_tokenizes_the_parts_as_inference_does(tok):
    prompt, completion = "The capital of France is", " Paris."
    example = record_to_example({"prompt": prompt, "completion": completion, "id": 7}, tok, where="line 1")
    prompt_ids = tok(prompt)["input_ids"]
    completion_ids = tok(completion, add_special_tokens=False)["input_ids"]
    assert prompt_ids[0] == tok.bos_token_id
    assert example.input_ids == prompt_ids + completion_ids + [tok.eos_token_id]
    assert example.loss_mask == [False] * len(prompt_ids) + [True] * (len(completion_ids) + 1)


def test_messages_prompt_parts_match_chat_requests_and_only_replies_are_targets(tok):
    example = record_to_example({"messages": CHAT}, tok, where="dataset.records[0]")
    assert example.input_ids == chat_ids(tok, CHAT)
    expected = [False] * len(example.input_ids)
    for i, message in enumerate(CHAT):
        if message["role"] != "assistant":
            continue
        prompt = chat_ids(tok, CHAT[:i], add_generation_prompt=True)
        assert example.input_ids[: len(prompt)] == prompt
        reply = tok(message["content"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert example.input_ids[len(prompt) : len(prompt) + len(reply)] == reply
        expected[len(prompt) : len(prompt) + len(reply)] = [True] * len(reply)
    assert example.loss_mask == expected
    assert tok.decode(targets(example)) == "Paris.<|end|>Rome, of course.<|end|>"


def test_messages_after_the_last_reply_are_left_out(tok):
    example = record_to_example({"messages": CHAT + [{"role": "user", "content": "Thanks"}]}, tok, where="x")
    assert example == record_to_example({"messages": CHAT}, tok, where="x")


def test_plain_template_when_the_tokenizer_has_none(plain_tok):
    example = record_to_example({"messages": CHAT}, plain_tok, where="x")
    text = plain_tok.apply_chat_template(CHAT, chat_template=PLAIN_CHAT_TEMPLATE, tokenize=False)
    assert text == (
        "<|bos|>system: Be brief.\nuser: What is the capital of France?\nassistant: Paris.\n"
        "user: And of Italy?\nassistant: Rome, of course.\n"
    )
    ids = plain_tok(text, add_special_tokens=False)["input_ids"]
    # No end-of-turn token in this template, so EOS ends the last reply.
    assert example.input_ids == ids + [plain_tok.eos_token_id]
    assert plain_tok.decode(targets(example)) == " Paris.\n Rome, of course.\n<|end|>"
    prompt = plain_tok.apply_chat_template(
        CHAT[:4], chat_template=PLAIN_CHAT_TEMPLATE, add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("\nassistant:")
    prompt_ids = plain_tok(prompt, add_special_tokens=False)["input_ids"]
    assert example.input_ids[: len(prompt_ids)] == prompt_ids


def test_template_that_is_not_prefix_stable_is_refused(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # A generation prompt ending in a space: " Paris" is one pre-token with the reply, two without it.
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    with pytest.raises(DatasetError, match=r"not prefix-stable at messages\[2\]") as info:
        record_to_example({"messages": CHAT}, tokenizer, where="line 4")
    assert info.value.field == "line 4"


def test_text_trains_on_every_position_but_the_first(tok):
    example = record_to_example({"text": "Once upon a time."}, tok, where="x")
    assert example.input_ids == tok("Once upon a time.")["input_ids"] + [tok.eos_token_id]
    assert example.loss_mask == [False] + [True] * (len(example.input_ids) - 1)


def test_truncation_and_dropping(tok):
    long_prompt = "word " * 40
    records = [
        {"text": "A short line."},
        {"text": "word " * 40},
        {"prompt": long_prompt, "completion": " end"},  # the completion falls past the cut
        {"prompt": "Hi", "completion": " there"},
    ]
    max_len = 12
    assert len(tok(long_prompt)["input_ids"]) > max_len
    examples, summary = build_examples(records, tok, max_seq_len=max_len, where=lambda i: f"r{i}")
    assert summary == DatasetSummary(
        records=4,
        examples=3,
        truncated=1,
        dropped=1,
        tokens=sum(len(e.input_ids) for e in examples),
        target_tokens=sum(sum(e.loss_mask) for e in examples),
    )
    assert [len(e.input_ids) for e in examples][1] == max_len
    assert examples[1].input_ids == (tok("word " * 40)["input_ids"] + [tok.eos_token_id])[:max_len]
    assert examples[2] == record_to_example(records[3], tok, where="x")
    with pytest.raises(DatasetError, match="no example has a target token within the first 12") as info:
        build_examples(records[2:3], tok, max_seq_len=max_len, where=str)
    assert info.value.field == "dataset"


def test_example_encodes_as_an_array(tok):
    example = record_to_example({"prompt": "a", "completion": "b"}, tok, where="x")
    assert msgspec.json.decode(msgspec.json.encode(example)) == [example.input_ids, example.loss_mask]
    assert msgspec.json.decode(msgspec.json.encode(example), type=Example) == example


@pytest.mark.parametrize(
    "record, fragment",
    [
        (["not", "an", "object"], "expected a JSON object, got an array"),
        ({"input": "x"}, "has none of the keys"),
        ({"prompt": "a", "completion": "b", "text": "c"}, "more than one format"),
        ({"prompt": 3, "completion": "b"}, "'prompt' must be a string, got a number"),
        ({"prompt": "a"}, "has no 'completion'"),
        ({"completion": "b"}, "has no 'prompt'"),
        ({"prompt": "a", "completion": ""}, "'completion' is empty"),
        ({"text": None}, "'text' must be a string, got null"),
        ({"text": ""}, "'text' is empty"),
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"messages": "hi"}, "'messages' must be a non-empty list"),
        ({"messages": ["hi"]}, "messages[0] must be an object"),
        ({"messages": [{"role": "user"}]}, "messages[0] has no 'content'"),
        ({"messages": [{"content": "x"}]}, "messages[0] has no 'role'"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]},
            "messages[1].role",
        ),
        ({"messages": [{"role": "assistant", "content": ["a"]}]}, "messages[0].content must be a string"),
        ({"messages": [{"role": "user", "content": "a"}]}, "no assistant message"),
    ],
)
def test_bad_records_name_where_and_what(tok, record, fragment):
    with pytest.raises(DatasetError) as info:
        record_to_example(record, tok, where="dataset.records[5]")
    assert info.value.field == "dataset.records[5]"
    assert fragment in info.value.message
    assert str(info.value) == f"dataset.records[5]: {info.value.message}"


def test_dataset_error_survives_pickling():
    error = pickle.loads(pickle.dumps(DatasetError("line 3", "invalid JSON")))
    assert (error.field, error.message, str(error)) == ("line 3", "invalid JSON", "line 3: invalid JSON")


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_path_confinement(tmp_path):
    data = tmp_path / "data"
    write(data / "sub" / "ok.jsonl", '{"text": "x"}\n')
    write(tmp_path / "x.jsonl", '{"text": "secret"}\n')
    (data / "escape.jsonl").symlink_to(tmp_path / "x.jsonl")
    (data / "inside.jsonl").symlink_to(data / "sub" / "ok.jsonl")
    (data / "loop.jsonl").symlink_to(data / "loop.jsonl")

    assert resolve_dataset_path(str(data), "sub/ok.jsonl") == (data / "sub" / "ok.jsonl").resolve()
    assert resolve_dataset_path(str(data), "sub/../sub/ok.jsonl") == (data / "sub" / "ok.jsonl").resolve()
    assert resolve_dataset_path(str(data), "inside.jsonl") == (data / "sub" / "ok.jsonl").resolve()

    def refused(path, fragment, data_dir=str(data)):
        with pytest.raises(DatasetError) as info:
            resolve_dataset_path(data_dir, path)
        assert info.value.field == "dataset.path"
        assert fragment in info.value.message
        assert str(data) not in str(info.value)  # the server's own paths stay private

    refused("sub/ok.jsonl", "start the server with --harli-data-dir", data_dir=None)
    refused("../x.jsonl", "'../x.jsonl' is outside --harli-data-dir")
    refused("sub/../../x.jsonl", "outside --harli-data-dir")
    refused("escape.jsonl", "outside --harli-data-dir")
    refused(str(tmp_path / "x.jsonl"), "not absolute")
    refused("missing.jsonl", "does not exist")
    refused("sub", "is a directory")
    refused("", "non-empty")
    refused("loop.jsonl", "loop.jsonl")


def test_invalid_json_reports_the_file_line(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "a"}\n\n{"text": oops}\n')
    with pytest.raises(DatasetError, match="invalid JSON") as info:
        read_jsonl(path)
    assert info.value.field == "line 3"


def test_read_jsonl_skips_blank_lines_and_checks_objects_and_counts(tmp_path):
    path = write(tmp_path / "d.jsonl", '\ufeff{"text": "a"}\n  \n{"text": "b"}\n')
    assert read_jsonl(path) == [{"text": "a"}, {"text": "b"}]
    assert read_jsonl(path, max_records=2) == [{"text": "a"}, {"text": "b"}]
    with pytest.raises(DatasetError, match="more than 1 records") as info:
        read_jsonl(path, max_records=1)
    assert info.value.field == "dataset.path"
    with pytest.raises(DatasetError, match="expected a JSON object, got an array") as info:
        read_jsonl(write(tmp_path / "e.jsonl", '{"text": "a"}\n[1, 2]\n'))
    assert info.value.field == "line 2"
    (tmp_path / "f.jsonl").write_bytes(b'{"text": "\xff"}\n')
    with pytest.raises(DatasetError, match="not valid UTF-8") as info:
        read_jsonl(tmp_path / "f.jsonl")
    assert info.value.field == "line 1"


def test_load_examples_from_a_file_keeps_file_line_numbers(tok, tmp_path):
    write(tmp_path / "train.jsonl", '{"text": "a"}\n\n\n{"prompt": "a", "completion": 1}\n')
    with pytest.raises(DatasetError, match="'completion' must be a string") as info:
        load_examples(None, "train.jsonl", tok, data_dir=str(tmp_path), max_seq_len=64)
    assert info.value.field == "line 4"

    chat = msgspec.json.encode({"messages": CHAT}).decode()
    write(tmp_path / "train.jsonl", '{"text": "a"}\n\n' + chat + "\n")
    examples, summary = load_examples(None, "train.jsonl", tok, data_dir=str(tmp_path), max_seq_len=64)
    assert examples == [
        record_to_example({"text": "a"}, tok, where="x"),
        record_to_example({"messages": CHAT}, tok, where="x"),
    ]
    assert (summary.records, summary.examples) == (2, 2)

    write(tmp_path / "empty.jsonl", "\n\n")
    with pytest.raises(DatasetError, match="has no records"):
        load_examples(None, "empty.jsonl", tok, data_dir=str(tmp_path), max_seq_len=64)


def test_load_examples_inline(tok):
    records = [{"text": "a"}, {"text": "b"}]
    examples, summary = load_examples(records, None, tok, data_dir=None, max_seq_len=64)
    assert summary.examples == 2 and len(examples) == 2
    with pytest.raises(DatasetError, match="put larger datasets in a file under --harli-data-dir") as info:
        load_examples(records, None, tok, data_dir=None, max_seq_len=64, max_inline_records=1)
    assert info.value.field == "dataset.records"
    with pytest.raises(DatasetError) as info:
        load_examples([{"text": "a"}, {"text": 2}], None, tok, data_dir=None, max_seq_len=64)
    assert info.value.field == "dataset.records[1]"
    for bad in ([], {"text": "a"}):
        with pytest.raises(DatasetError) as info:
            load_examples(bad, None, tok, data_dir=None, max_seq_len=64)
        assert info.value.field == "dataset.records"


@pytest.mark.parametrize("records, path", [(None, None), ([{"text": "a"}], "train.jsonl")])
def test_load_examples_wants_exactly_one_source(tok, records, path):
    with pytest.raises(DatasetError, match="give exactly one of records or path") as info:
        load_examples(records, path, tok, data_dir=os.getcwd(), max_seq_len=64)
    assert info.value.field == "dataset"
