"""API fuzzing of the ``/harli`` and ``/api/v1`` (Tinker) routes on one real server: schemathesis against the
routes' own OpenAPI document, crafted hostile bodies, and a campaign of schema-valid jobs that must all be
accepted and train.

The server is dedicated to this module (generated jobs queue and train on it); every job still unfinished
is cancelled at the end, and the server must still answer ``/health`` and ``/generate`` afterwards.
"""

from __future__ import annotations

import json
import time
import uuid

import jsonschema
import pytest
import requests
import schemathesis
import zstandard
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from sglang_harli.core.jobs.book import FINISHED_STATES
from sglang_harli.core.jobs.spec import MAX_SEED, PEFT_TARGET_MODULES
from sglang_harli.server_process import ServerProcess
from sglang_harli.srt.openapi import COMPONENT_PREFIX, components

pytestmark = pytest.mark.server

MAX_EXAMPLES = 30  # per operation and generation mode; the whole module stays within ~90 s on 2 cores
CAMPAIGN_JOBS = 6
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    unsupported_method,
]
NESTED = b"[" * 20_000 + b"]" * 20_000
FUZZED = ("/harli/", "/api/v1/")
# forward_backward takes a protobuf body: the fuzzer sends its bytes as they are
schemathesis.serializer.alias("application/x-protobuf", "application/octet-stream")


def _validator(name: str) -> jsonschema.Draft202012Validator:
    root = {"$ref": f"#/components/schemas/{COMPONENT_PREFIX}{name}", "components": {"schemas": components()}}
    return jsonschema.Draft202012Validator(root)


JOB_STATUS, ERROR = _validator("JobStatus"), _validator("Error")


@pytest.fixture(scope="module")
def harli_server(server, data_dir):
    """The shared server, with the dataset files the crafted jobs name. The fuzzer runs last on it (see
    ``conftest.py``): it leaves behind what it created (jobs, Tinker sessions), which no test should meet."""
    (data_dir / "ok.jsonl").write_text('{"text": "a line to learn"}\n')
    (data_dir / "deep.jsonl").write_bytes(b'{"text": "x"}\n' + NESTED + b"\n")
    yield server
    _cancel_all(server)


def _cancel_all(srv: ServerProcess) -> list[str]:
    """Cancel every unfinished job; the names cancelled."""
    cancelled = []
    try:
        for job in srv.get("/harli/jobs", timeout=30).json():
            if job["state"] not in FINISHED_STATES:
                requests.post(f"{srv.url}/harli/jobs/{job['name']}/cancel", timeout=30)
                cancelled.append(job["name"])
    except requests.RequestException:
        pass  # a dead server is reported by test_server_still_healthy_after_fuzzing
    return cancelled


@pytest.fixture(scope="module")
def harli_schema(harli_server):
    document = harli_server.get("/openapi.json").json()
    document["paths"] = {p: item for p, item in document["paths"].items() if p.startswith(FUZZED)}
    config = schemathesis.Config.from_dict(
        {
            "base-url": harli_server.url,
            "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "database": "none"},
        }
    )
    return schemathesis.openapi.from_dict(document, config=config)


schema = schemathesis.pytest.from_fixture("harli_schema")


def test_openapi_document_describes_the_harli_routes(harli_server):
    document = harli_server.get("/openapi.json").json()
    openapi_spec_validator = pytest.importorskip("openapi_spec_validator")
    # SGLang's own routes repeat operation ids; the /harli and /api/v1 part must be valid on its own.
    harli = {
        **document,
        "paths": {p: item for p, item in document["paths"].items() if p.startswith(FUZZED)},
    }
    openapi_spec_validator.validate(harli)
    submit = document["paths"]["/harli/jobs"]["post"]
    body = submit["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": f"#/components/schemas/{COMPONENT_PREFIX}FinetuneJobSpec"}
    assert set(submit["responses"]) >= {"201", "400", "409", "422"} and "200" not in submit["responses"]
    spec = document["components"]["schemas"][f"{COMPONENT_PREFIX}FinetuneJobSpec"]
    assert spec["additionalProperties"] is False
    (name,) = document["paths"]["/harli/jobs/{name}"]["get"]["parameters"]
    assert name["schema"]["pattern"].startswith("^[A-Za-z0-9]")
    # /harli/stats is described field by field (HarliStats), down to the co-location and memory figures
    stats = document["paths"]["/harli/stats"]["get"]["responses"]["200"]["content"]["application/json"]
    assert {"$ref": f"#/components/schemas/{COMPONENT_PREFIX}HarliStats"} in stats["schema"]["anyOf"]
    schemas = document["components"]["schemas"]
    fields = schemas[f"{COMPONENT_PREFIX}HarliStats"]["properties"]
    assert {"decode_steps", "decode_step_latency", "config", "finetune", "colocation"} <= set(fields)
    assert {"profile", "memory", "jobs"} <= set(schemas[f"{COMPONENT_PREFIX}FinetuneStats"]["properties"])
    assert "publishing" in schemas[f"{COMPONENT_PREFIX}JobStatus"]["properties"]["state"]["enum"]


def test_openapi_document_describes_the_tinker_routes(harli_server):
    """Every /api/v1 route the SDK calls is in the document, each JSON body with its schema (from the
    structs that decode it) and forward_backward's as protobuf; refusals are the Error schema."""
    document = harli_server.get("/openapi.json").json()
    tinker = {p: item for p, item in document["paths"].items() if p.startswith("/api/v1/")}
    assert len(tinker) == 19, sorted(tinker)
    create = tinker["/api/v1/create_model"]["post"]
    body = create["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": f"#/components/schemas/{COMPONENT_PREFIX}CreateModel"}
    assert set(create["responses"]) >= {"200", "400", "413", "422", "429"}
    assert create["responses"]["413"]["content"]["application/json"]["schema"] == {
        "$ref": f"#/components/schemas/{COMPONENT_PREFIX}Error"
    }
    forward_backward = tinker["/api/v1/forward_backward"]["post"]["requestBody"]["content"]
    assert set(forward_backward) == {"application/x-protobuf"}
    schemas = document["components"]["schemas"]
    sample = schemas[f"{COMPONENT_PREFIX}Sample"]
    assert {"sampling_session_id", "seq_id", "prompt"} <= set(sample["required"])
    assert "additionalProperties" not in sample  # fields the SDK adds are ignored, not refused
    session = schemas[f"{COMPONENT_PREFIX}CreateModel"]["properties"]["session_id"]
    assert session["pattern"].startswith("^[A-Za-z0-9]")


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_harli_routes_conform_to_their_schema(case):
    """Every /harli and /api/v1 operation: no 5xx, only documented statuses and bodies, and everything
    outside the schema refused."""
    case.call_and_validate(checks=CHECKS, timeout=60)


# -- crafted bodies: each must be refused with a 4xx naming the field, never answered with a 500 -----------

CRAFTED = {
    "invalid UTF-8 inside a JSON string": b'{"name": "a\xff", "dataset": {"records": [{"text": "hi"}]}}',
    "a record nested 20000 deep": b'{"name": "deep", "dataset": {"records": [{"text": "x", "extra": '
    + NESTED
    + b"}]}}",
    "a JSONL line nested 20000 deep": json.dumps(
        {"name": "deep-file", "dataset": {"path": "deep.jsonl"}}
    ).encode(),
    "NUL in dataset.path": json.dumps({"name": "nul-path", "dataset": {"path": "ok\x00.jsonl"}}).encode(),
    "dataset.path longer than NAME_MAX": json.dumps(
        {"name": "long-path", "dataset": {"path": "x" * 300}}
    ).encode(),
    "job name with a trailing newline": json.dumps(
        {"name": "nl\n", "dataset": {"path": "ok.jsonl"}}
    ).encode(),
    "not JSON at all": b"\x00\x01not json",
    "a JSON array": b"[]",
}


@pytest.mark.parametrize("what", list(CRAFTED))
def test_crafted_bodies_are_refused_not_crashed(harli_server, what):
    response = requests.post(
        f"{harli_server.url}/harli/jobs",
        data=CRAFTED[what],
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert 400 <= response.status_code < 500, f"{what}: {response.status_code} {response.text[:200]}"
    ERROR.validate(response.json())
    assert response.json().get("field"), response.text


TINKER_CRAFTED = {
    "invalid UTF-8 inside a JSON string": b'{"session_id": "a\xff", "model_seq_id": 0}',
    "a field nested 20000 deep": b'{"session_id": "s", "model_seq_id": 0, "extra": ' + NESTED + b"}",
    "not JSON at all": b"\x00\x01not json",
    "a JSON array": b"[]",
    "a session id that is a path": json.dumps({"session_id": "../../tmp/x", "model_seq_id": 0}).encode(),
    "a session id with a trailing newline": json.dumps({"session_id": "s\n", "model_seq_id": 0}).encode(),
    "a sequence number past int64": b'{"session_id": "s", "model_seq_id": 9223372036854775808}',
}
ZSTD = {"Content-Type": "application/x-protobuf", "Content-Encoding": "zstd"}
FORWARD_BACKWARD_CRAFTED = {
    "not a ForwardBackwardRequest": (b"\xff" * 64, {"Content-Type": "application/x-protobuf"}),
    "zstd that is not zstd": (b"\x28\xb5\x2f\xfd" + b"\xff" * 64, ZSTD),
    "a zstd frame cut short": (zstandard.ZstdCompressor().compress(b"\x00" * 100_000)[:-3], ZSTD),
    "an empty zstd body": (b"", ZSTD),
    "an encoding the server does not take": (b"\x1f\x8b", {"Content-Encoding": "gzip"}),
}


@pytest.mark.parametrize("route", ["create_model", "create_sampling_session"])
@pytest.mark.parametrize("what", list(TINKER_CRAFTED))
def test_crafted_tinker_bodies_are_refused_not_crashed(harli_server, route, what):
    response = requests.post(
        f"{harli_server.url}/api/v1/{route}",
        data=TINKER_CRAFTED[what],
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert 400 <= response.status_code < 500, f"{what}: {response.status_code} {response.text[:200]}"
    ERROR.validate(response.json())
    assert response.json().get("field"), response.text


@pytest.mark.parametrize("what", list(FORWARD_BACKWARD_CRAFTED))
def test_crafted_forward_backward_bodies_are_refused_naming_the_body(harli_server, what):
    body, headers = FORWARD_BACKWARD_CRAFTED[what]
    response = requests.post(
        f"{harli_server.url}/api/v1/forward_backward", data=body, headers=headers, timeout=60
    )
    assert response.status_code == 400, f"{what}: {response.status_code} {response.text[:200]}"
    ERROR.validate(response.json())
    assert response.json()["field"] in ("body", "content-encoding", "loss_fn"), response.text


@pytest.mark.parametrize(
    "name", ["does-not-exist", "-x", "a%20b", "a%5Cb", "%00", "nl%0A", "x" * 80, "a%2Fb", ".."]
)
def test_unknown_and_malformed_job_names_are_not_found(harli_server, name):
    """A name outside the pattern is just a job that does not exist: 404, as for an unknown one."""
    for method, suffix in (("GET", ""), ("POST", "/cancel")):
        response = requests.request(method, f"{harli_server.url}/harli/jobs/{name}{suffix}", timeout=30)
        assert response.status_code == 404, (method, name, response.status_code, response.text)


# -- a campaign of schema-valid jobs the server can serve: all accepted, all train ---------------------------

INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1
finite = {"allow_nan": False, "allow_infinity": False}
campaign_specs = st.fixed_dictionaries(
    {
        "dataset": st.fixed_dictionaries(
            {
                "records": st.lists(
                    st.fixed_dictionaries({"text": st.text(min_size=1, max_size=60)}), min_size=1
                )
            }
        ),
        "lora": st.fixed_dictionaries(
            {},
            optional={
                "r": st.integers(1, 16),  # the server's --max-lora-rank
                "alpha": st.floats(min_value=0, exclude_min=True, **finite),
                "dropout": st.floats(min_value=0, max_value=1, exclude_max=True, **finite),
                "target_modules": st.lists(st.sampled_from(PEFT_TARGET_MODULES), min_size=1, max_size=7),
            },
        ),
        "training": st.fixed_dictionaries(
            {"max_steps": st.integers(1, 2)},  # short jobs, so the campaign can wait for all of them
            optional={
                "epochs": st.integers(1, 1000),
                "learning_rate": st.floats(min_value=0, max_value=1, exclude_min=True, **finite),
                "micro_batch_size": st.integers(1, 1024),
                "gradient_accumulation_steps": st.integers(1, 4096),
                "max_seq_len": st.integers(2, 4096),  # the tiny model's context length
                "seed": st.integers(0, MAX_SEED),
                "lr_scheduler": st.sampled_from(["linear", "cosine", "constant"]),
                "warmup_steps": st.integers(0, UINT64_MAX),
                "weight_decay": st.floats(min_value=0, **finite),
                "max_grad_norm": st.floats(min_value=0, **finite),
            },
        ),
        "publish": st.fixed_dictionaries({}, optional={"every_steps": st.integers(0, UINT64_MAX)}),
    }
)
submitted: dict[str, dict] = {}  # accepted jobs' specs, by name
refused: dict[str, dict] = {}  # the refusals, by name


@settings(
    max_examples=CAMPAIGN_JOBS,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: jobs train after the request returns
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(spec=campaign_specs)
@example(  # an adapter on q_proj alone: SGLang's loader stacks q/k/v and insists on v_proj
    spec={
        "dataset": {"records": [{"text": "q only"}]},
        "lora": {"target_modules": ["q_proj"]},
        "training": {"max_steps": 1},
    }
)
def test_schema_valid_jobs_are_accepted_or_refused_up_front(harli_server, spec):
    """A schema-valid job is either refused at once (a 4xx naming the field the server cannot serve) or
    accepted, queued and echoed back; whether accepted jobs then train is the next test's."""
    spec = {"name": f"fuzz-{len(submitted) + len(refused)}-{uuid.uuid4().hex[:6]}", **spec}
    try:
        response = requests.post(f"{harli_server.url}/harli/jobs", json=spec, timeout=60)
    except requests.ConnectionError:
        pytest.fail(f"the server went away; jobs accepted so far:\n{json.dumps(submitted, indent=1)}")
    if response.status_code != 201:
        assert 400 <= response.status_code < 500, response.text
        ERROR.validate(response.json())
        assert response.json().get("field"), response.text
        refused[spec["name"]] = response.json()
        return
    submitted[spec["name"]] = spec
    job = response.json()
    JOB_STATUS.validate(job)
    assert job["state"] == "queued" and job["name"] == spec["name"]
    for key in ("lora", "training", "publish"):  # what was sent, plus defaults
        echoed, sent = job["spec"][key], spec.get(key, {})
        assert echoed | sent == echoed, (key, echoed, sent)


def test_accepted_jobs_train_to_completion(harli_server):
    """Every accepted job finishes; a job may fail only by diverging (a FloatingPointError it explains)."""
    assert submitted, f"no job was accepted: {json.dumps(refused, indent=1)}"
    deadline = time.monotonic() + 60
    jobs: dict[str, dict] = {}
    while time.monotonic() < deadline:
        try:
            jobs = {job["name"]: job for job in harli_server.get("/harli/jobs", timeout=30).json()}
        except requests.ConnectionError:
            running = [name for name, job in jobs.items() if job["state"] == "running"]
            pytest.fail(
                f"the server died while training {running}; their specs: "
                f"{json.dumps([submitted.get(n) for n in running])}\n{harli_server.log_tail(40)}"
            )
        if all(jobs.get(name, {}).get("state") in FINISHED_STATES for name in submitted):
            break
        time.sleep(0.5)
    bad = {
        name: (jobs.get(name, {}).get("state"), jobs.get(name, {}).get("error"), submitted[name])
        for name in submitted
        if not (
            jobs.get(name, {}).get("state") == "completed"
            or str(jobs.get(name, {}).get("error")).startswith("FloatingPointError: ")
        )
    }
    assert not bad, json.dumps(bad, indent=1)


def _wait_finished(srv: ServerProcess, name: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = srv.get(f"/harli/jobs/{name}", timeout=30).json()
        if job["state"] in FINISHED_STATES or time.monotonic() > deadline:
            return job
        time.sleep(0.5)


@pytest.mark.parametrize("seed", [0, MAX_SEED])
def test_extreme_seeds_train(harli_server, seed):
    """Every seed the schema allows seeds a job (and never kills the server)."""
    spec = {"name": f"seed-{seed & 0xFFFF}", "dataset": {"records": [{"text": "hello"}]}}
    spec["training"] = {"seed": seed, "max_steps": 1}
    try:
        assert harli_server.post("/harli/jobs", spec).status_code == 201
        job = _wait_finished(harli_server, spec["name"], timeout_s=30)
    except requests.ConnectionError:
        pytest.fail(f"the server died training {json.dumps(spec)}:\n{harli_server.log_tail(30)}")
    assert job["state"] == "completed", job["error"]


@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1, INT64_MIN, UINT64_MAX])
def test_seeds_beyond_the_schema_are_refused(harli_server, seed):
    spec = {"name": "seed-out", "dataset": {"records": [{"text": "hello"}]}, "training": {"seed": seed}}
    response = harli_server.post("/harli/jobs", spec)
    assert response.status_code == 422 and response.json()["field"] == "training.seed", response.text


def test_server_still_healthy_after_fuzzing(harli_server):
    _cancel_all(harli_server)
    for job in harli_server.get("/harli/jobs").json():
        assert job["state"] in FINISHED_STATES, job
    assert harli_server.get("/health").status_code == 200
    assert harli_server.get("/harli/stats").status_code == 200
    response = harli_server.post("/generate", {"text": "Hello", "sampling_params": {"max_new_tokens": 4}})
    assert response.status_code == 200, response.text
    assert response.json()["meta_info"]["completion_tokens"] == 4
