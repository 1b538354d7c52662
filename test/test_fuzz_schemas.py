"""Property-based tests (hypothesis) of every ``/harli`` schema and of the dataset parser, without a server.

Whatever a client sends, the code behind the routes must either accept it or refuse it with a
``SpecError``/``DatasetError`` that names the field at fault; any other exception would reach the client
as a 500. Accepted values must keep the invariants the trainer relies on, and the OpenAPI schemas (built
from the same msgspec structs by ``sglang_harli.srt.openapi``) must accept exactly what the server accepts.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jsonschema
import msgspec
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from sglang_harli.core.config import HarliConfig, config_from_flags, flag_name
from sglang_harli.core.jobs.book import JobStatus
from sglang_harli.core.jobs.data import DatasetError, Example, load_examples, resolve_dataset_path
from sglang_harli.core.jobs.spec import (
    JOB_NAME_PATTERN,
    MAX_SEED,
    DatasetSpec,
    FinetuneJobSpec,
    LoraSpec,
    PublishSpec,
    SpecError,
    TrainingSpec,
    decode_spec,
)
from sglang_harli.srt.openapi import COMPONENT_PREFIX, EXAMPLE_JOB, components

FAST = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
TOKENIZING = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def show(**inputs) -> None:
    """Print the inputs of a failing example: schemathesis' pytest plugin blanks Hypothesis' own
    "Falsifying example" values (it swaps in a no-op pretty-printer), so every property notes them."""
    note(", ".join(f"{key}={value!r}" for key, value in inputs.items()))


# -- strategies: JSON -----------------------------------------------------------------------------------

INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1  # what msgspec decodes as an integer
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(INT64_MIN, UINT64_MAX)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)


def json_values(scalars=json_scalars, max_leaves: int = 10):
    return st.recursive(
        scalars,
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=max_leaves,
    )


# Floats that are whole numbers are integers to JSON Schema but not to msgspec; the schema-agreement
# property leaves them out (a client's JSON encoder writes 2.0 as "2.0", which both read as a float).
agreement_scalars = (
    st.none()
    | st.booleans()
    | st.integers(INT64_MIN, UINT64_MAX)
    | st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer())
    | st.text(max_size=12)
)

# -- strategies: valid spec values (msgspec.Meta constraints, written out) -----------------------------

valid_names = st.from_regex(JOB_NAME_PATTERN, fullmatch=True)
finite = {"allow_nan": False, "allow_infinity": False}
records = st.lists(st.dictionaries(st.text(max_size=8), json_values(max_leaves=6), max_size=3), max_size=3)

lora_specs = st.builds(
    LoraSpec,
    r=st.integers(1, 1024),
    alpha=st.floats(min_value=0, exclude_min=True, **finite),
    dropout=st.floats(min_value=0, max_value=1, exclude_max=True, **finite),
    target_modules=st.lists(st.text(max_size=10), min_size=1, max_size=4),
)
training_specs = st.builds(
    TrainingSpec,
    epochs=st.integers(1, 1000),
    learning_rate=st.floats(min_value=0, max_value=1, exclude_min=True, **finite),
    micro_batch_size=st.integers(1, 1024),
    gradient_accumulation_steps=st.integers(1, 4096),
    max_seq_len=st.integers(2, 1 << 20),
    seed=st.integers(0, MAX_SEED),
    lr_scheduler=st.sampled_from(["linear", "cosine", "constant"]),
    warmup_steps=st.integers(0, UINT64_MAX),
    weight_decay=st.floats(min_value=0, **finite),
    max_grad_norm=st.floats(min_value=0, **finite),
    max_steps=st.none() | st.integers(1, UINT64_MAX),
)
specs = st.builds(
    FinetuneJobSpec,
    name=valid_names,
    dataset=st.builds(DatasetSpec, records=st.none() | records, path=st.none() | st.text(max_size=20)),
    lora=lora_specs,
    training=training_specs,
    publish=st.builds(PublishSpec, every_steps=st.integers(0, UINT64_MAX)),
)

SECTIONS = {
    "": [f.name for f in msgspec.structs.fields(FinetuneJobSpec)],
    "dataset": [f.name for f in msgspec.structs.fields(DatasetSpec)],
    "lora": [f.name for f in msgspec.structs.fields(LoraSpec)],
    "training": [f.name for f in msgspec.structs.fields(TrainingSpec)],
    "publish": [f.name for f in msgspec.structs.fields(PublishSpec)],
}


@st.composite
def spec_bodies(draw, values=None):
    """A valid spec as JSON-ready builtins, then up to three fields replaced, dropped or added."""
    values = values if values is not None else json_values()
    body = msgspec.to_builtins(draw(specs))
    for _ in range(draw(st.integers(0, 3))):
        section = draw(st.sampled_from(sorted(SECTIONS)))
        target = body if not section else body.get(section)
        if not isinstance(target, dict):
            continue
        key = draw(st.sampled_from(SECTIONS[section]) | st.text(max_size=6))
        if key in target and draw(st.booleans()):
            del target[key]
        else:
            target[key] = draw(values)
    return body


@st.composite
def utf8_broken(draw):
    """A spec body's JSON with one byte that cannot start or continue UTF-8 spliced in somewhere."""
    raw = json.dumps(draw(json_values() | st.just(EXAMPLE_JOB))).encode()
    at = draw(st.integers(0, len(raw)))
    bad = draw(st.sampled_from([b"\x80", b"\xc3", b"\xed\xa0\x80", b"\xff", b"\xfe"]))
    return raw[:at] + bad + raw[at:]


def nested(depth: int) -> bytes:
    """A JSON array nested ``depth`` deep: a few kilobytes that recurse past any parser's stack."""
    return b"[" * depth + b"]" * depth


def check_refusal(exc: SpecError) -> None:
    assert exc.field, exc
    assert exc.status in (400, 422), exc
    if exc.field != "body":  # a JSON path into the spec: its first part is a spec field
        assert re.split(r"[.\[]", exc.field)[0] in SECTIONS[""], exc.field


def decode_or_refuse(body: bytes) -> FinetuneJobSpec | None:
    try:
        spec = decode_spec(body)
    except SpecError as exc:
        check_refusal(exc)
        return None
    assert isinstance(spec, FinetuneJobSpec)
    return spec


# -- decode_spec ------------------------------------------------------------------------------------------


@FAST
@given(body=st.binary(max_size=200) | utf8_broken())
def test_decode_spec_any_bytes(body):
    show(body=body)
    decode_or_refuse(body)


@pytest.mark.parametrize("depth", [100, 20_000])
def test_decode_spec_deeply_nested_body(depth):
    decode_or_refuse(
        b'{"name": "deep", "dataset": {"records": [{"text": "x", "extra": ' + nested(depth) + b"}]}}"
    )


@FAST
@given(value=json_values(max_leaves=20) | spec_bodies())
def test_decode_spec_any_json(value):
    show(value=value)
    decode_or_refuse(json.dumps(value).encode())


@FAST
@given(spec=specs)
def test_valid_specs_round_trip(spec):
    show(spec=spec)
    assert decode_spec(msgspec.json.encode(spec)) == spec


@st.composite
def invalid_names(draw):
    name = draw(valid_names)
    kind = draw(st.sampled_from(["slash", "dotdot", "backslash", "nul", "space", "long", "empty", "first"]))
    if kind == "dotdot":
        return ".." + name
    if kind == "long":
        return (name * 65)[: draw(st.integers(65, 300))]
    if kind == "empty":
        return ""
    if kind == "first":  # anything but a letter or digit first
        return draw(st.sampled_from([".", "-", "_"])) + name
    bad = {"slash": "/", "backslash": "\\", "nul": "\x00", "space": draw(st.sampled_from([" ", "\t"]))}
    at = draw(st.integers(0, len(name)))
    return name[:at] + bad[kind] + name[at:]


@FAST
@given(name=invalid_names())
def test_invalid_job_names_are_refused(name):
    show(name=name)
    body = json.dumps({"name": name, "dataset": {"records": [{"text": "hi"}]}}).encode()
    with pytest.raises(SpecError) as caught:
        decode_spec(body)
    assert caught.value.field == "name"
    assert caught.value.status == 422


@FAST
@given(name=st.text(max_size=70) | valid_names.map(lambda n: n + "\n"))
def test_job_name_accepted_iff_it_matches_the_whole_pattern(name):
    """``^...$`` lets Python's ``re.search`` accept a trailing newline; the name must match in full."""
    show(name=name)
    body = json.dumps({"name": name, "dataset": {"records": [{"text": "hi"}]}}).encode()
    spec = decode_or_refuse(body)
    assert (spec is not None) == bool(re.fullmatch(JOB_NAME_PATTERN, name)), repr(name)


# -- the OpenAPI schemas agree with the structs ------------------------------------------------------------

SCHEMAS = components()


def validator(name: str) -> jsonschema.Draft202012Validator:
    root = {"$ref": f"#/components/schemas/{COMPONENT_PREFIX}{name}", "components": {"schemas": SCHEMAS}}
    return jsonschema.Draft202012Validator(root)


SPEC_SCHEMA, STATUS_SCHEMA = validator("FinetuneJobSpec"), validator("JobStatus")


def test_document_example_is_a_valid_spec():
    SPEC_SCHEMA.validate(EXAMPLE_JOB)
    assert decode_spec(json.dumps(EXAMPLE_JOB).encode()).name == EXAMPLE_JOB["name"]


def test_spec_schema_forbids_unknown_fields():
    for name in ("FinetuneJobSpec", "DatasetSpec", "LoraSpec", "TrainingSpec", "PublishSpec"):
        assert SCHEMAS[COMPONENT_PREFIX + name]["additionalProperties"] is False, name


@FAST
@given(body=spec_bodies(json_values(agreement_scalars)))
def test_request_schema_accepts_what_decode_spec_accepts(body):
    show(body=body)
    accepted = decode_or_refuse(json.dumps(body).encode()) is not None
    errors = [e.message for e in SPEC_SCHEMA.iter_errors(body)]
    assert accepted == (not errors), errors


@FAST
@given(spec=specs, state=st.sampled_from(["queued", "running", "completed", "failed", "cancelled"]))
def test_job_status_matches_its_schema(spec, state):
    show(spec=spec, state=state)
    status = JobStatus(name=spec.name, state=state, epochs=spec.training.epochs, spec=spec, loss=float("nan"))
    STATUS_SCHEMA.validate(json.loads(msgspec.json.encode(status)))


# -- config_from_flags ------------------------------------------------------------------------------------

CONFIG_FIELDS = [f.name for f in msgspec.structs.fields(HarliConfig)]
flag_values = st.none() | json_scalars | st.floats() | st.binary(max_size=4) | json_values(max_leaves=3)


@FAST
@given(values=st.dictionaries(st.sampled_from(CONFIG_FIELDS), flag_values))
def test_config_from_flags_names_the_flag(values):
    show(values=values)
    try:
        config = config_from_flags(values)
    except ValueError as exc:
        assert type(exc) is ValueError
        flags = [flag_name(k) for k, v in values.items() if v is not None]
        assert any(str(exc).startswith(f"argument {flag}: ") for flag in flags), str(exc)
        return
    assert isinstance(config, HarliConfig)


# -- the dataset parser -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


texts = st.text(max_size=40)
ROLES = ["system", "user", "assistant"]
well_formed_records = st.one_of(  # each of the three formats, as a client means to send it
    st.fixed_dictionaries({"prompt": texts, "completion": st.text(min_size=1, max_size=40)}),
    st.fixed_dictionaries(
        {
            "messages": st.lists(
                st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": texts}), max_size=4
            )
        }
    ),
    st.fixed_dictionaries({"text": st.text(min_size=1, max_size=40)}),
)
roles = st.sampled_from(ROLES) | st.text(max_size=6)
messages = st.fixed_dictionaries({"role": roles, "content": texts}) | json_values(max_leaves=4)
dataset_records = st.one_of(
    well_formed_records,
    st.fixed_dictionaries({"prompt": texts, "completion": texts}),
    st.fixed_dictionaries({"messages": st.lists(messages, max_size=5)}),
    st.fixed_dictionaries({"text": texts}),
    st.dictionaries(
        st.sampled_from(["prompt", "completion", "messages", "text", "role", "content"])
        | st.text(max_size=6),
        texts | json_values(max_leaves=4),
        max_size=4,
    ),
    json_values(max_leaves=6),
)
max_seq_lens = st.integers(2, 48) | st.integers(2, 4096)


def check_examples(result, tokenizer, max_seq_len: int, n_records: int) -> None:
    examples, summary = result
    event("accepted")
    assert examples and summary.examples == len(examples)
    assert summary.examples + summary.dropped == summary.records == n_records
    assert summary.tokens == sum(len(e.input_ids) for e in examples)
    for example in examples:
        assert isinstance(example, Example)
        assert len(example.loss_mask) == len(example.input_ids) <= max_seq_len
        assert any(example.loss_mask) and not example.loss_mask[0]
        assert all(0 <= i < len(tokenizer) for i in example.input_ids)


@TOKENIZING
@given(
    value=st.one_of(
        st.lists(well_formed_records, min_size=1, max_size=4),
        st.lists(dataset_records, min_size=1, max_size=4),
        json_values(max_leaves=6),
    ),
    max_seq_len=max_seq_lens,
)
def test_load_examples_any_inline_records(tok, value, max_seq_len):
    show(value=value, max_seq_len=max_seq_len)
    try:
        result = load_examples(value, None, tok, data_dir=None, max_seq_len=max_seq_len)
    except DatasetError as exc:
        assert exc.field
        event(f"refused: {re.sub(r'[0-9]+', 'N', exc.field)}")
        return
    check_examples(result, tok, max_seq_len, len(value))


def jsonl(lines: list) -> bytes:
    return b"\n".join(line if isinstance(line, bytes) else json.dumps(line).encode() for line in lines)


jsonl_files = st.one_of(
    st.binary(max_size=300),
    st.lists(well_formed_records, min_size=1, max_size=4).map(jsonl),
    st.lists(dataset_records | st.binary(max_size=20) | st.just(b""), min_size=1, max_size=4).map(jsonl),
    st.lists(dataset_records, min_size=1, max_size=4).map(lambda lines: b"\xef\xbb\xbf" + jsonl(lines)),
    st.lists(dataset_records, min_size=1, max_size=4).map(lambda lines: jsonl(lines).replace(b"\n", b"\r\n")),
)


@pytest.fixture(scope="module")
def fuzz_data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-data")
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.jsonl").write_text('{"text": "secret"}\n')
    (root / "sub").mkdir()
    (root / "inside.jsonl").write_text('{"text": "inside"}\n')
    (root / "sub" / "x.jsonl").write_text('{"text": "x"}\n')
    os.symlink(outside, root / "out")
    os.symlink(outside / "secret.jsonl", root / "link.jsonl")
    os.symlink(root / "sub" / "x.jsonl", root / "inner-link.jsonl")
    os.symlink("loop", root / "loop")
    return root


@TOKENIZING
@given(data=jsonl_files, max_seq_len=max_seq_lens)
def test_load_examples_any_jsonl_file(tok, fuzz_data_dir, data, max_seq_len):
    show(data=data, max_seq_len=max_seq_len)
    (fuzz_data_dir / "f.jsonl").write_bytes(data)
    try:
        result = load_examples(None, "f.jsonl", tok, data_dir=str(fuzz_data_dir), max_seq_len=max_seq_len)
    except DatasetError as exc:
        assert exc.field
        event(f"refused: {re.sub(r'[0-9]+', 'N', exc.field)}")
        return
    check_examples(result, tok, max_seq_len, result[1].records)


@pytest.mark.parametrize("depth", [100, 20_000])
def test_load_examples_deeply_nested_jsonl_line(tok, fuzz_data_dir, depth):
    (fuzz_data_dir / "deep.jsonl").write_bytes(b'{"text": "x"}\n' + nested(depth) + b"\n")
    with pytest.raises(DatasetError) as caught:
        load_examples(None, "deep.jsonl", tok, data_dir=str(fuzz_data_dir), max_seq_len=16)
    assert caught.value.field == "line 2"


segments = st.sampled_from(
    [
        "..",
        ".",
        "",
        "out",
        "sub",
        "inside.jsonl",
        "x.jsonl",
        "link.jsonl",
        "inner-link.jsonl",
        "loop",
        "secret.jsonl",
    ]
)
dataset_paths = st.one_of(
    st.text(max_size=30),
    st.lists(segments | st.text(max_size=4), min_size=1, max_size=5).map("/".join),
    st.lists(segments, min_size=1, max_size=5).map("\\".join),
    st.lists(segments, min_size=1, max_size=3).map(lambda parts: "/" + "/".join(parts)),
    st.sampled_from(["inside\x00.jsonl", "x" * 300, "/".join(["sub"] * 2000), "~/x", "C:\\x.jsonl"]),
)


@FAST
@given(path=dataset_paths)
def test_resolve_dataset_path_stays_inside(fuzz_data_dir, path):
    show(path=path)
    try:
        target = resolve_dataset_path(str(fuzz_data_dir), path)
    except DatasetError as exc:
        assert exc.field == "dataset.path"
        return
    assert target.is_file()
    assert target.resolve().is_relative_to(fuzz_data_dir.resolve())


def test_links_out_of_the_data_dir_are_refused(fuzz_data_dir):
    for path in ("out/secret.jsonl", "link.jsonl", "sub/../out/secret.jsonl", "loop"):
        with pytest.raises(DatasetError) as caught:
            resolve_dataset_path(str(fuzz_data_dir), path)
        assert caught.value.field == "dataset.path"
    assert resolve_dataset_path(str(fuzz_data_dir), "inner-link.jsonl").name == "x.jsonl"
