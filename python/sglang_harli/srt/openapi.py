"""The OpenAPI description of the ``/harli`` and ``/api/v1`` routes, generated from the msgspec structs
they speak.

The routes read their bodies raw (``decode_spec`` and ``srt.body.decode`` are the validators) and answer
with msgspec-encoded ``Response`` objects, so FastAPI can infer neither side. ``document_routes`` states
both, with FastAPI's own extension points: each operation's request body and responses go on its route's
``openapi_extra`` (FastAPI merges that into the operation), and ``app.openapi`` is wrapped, as FastAPI's
docs on extending the document do, to add the struct schemas to ``components`` and the job-name rule to
the ``{name}`` path parameter (``openapi_extra`` would append a second ``name`` parameter instead of
refining the first).

The schemas come from ``msgspec.json.schema_components``, i.e. from the very types that decode requests
(``core.jobs.spec`` for ``/harli``, ``srt.tinker.bodies`` for ``/api/v1``) and encode replies, so the
document cannot drift from what the server accepts and sends. The Tinker API's replies are the SDK's to
read; they are documented as JSON objects (or protobuf, where the SDK takes protobuf).
"""

from __future__ import annotations

from typing import Any

import msgspec

from sglang_harli.core.jobs.book import JobStatus
from sglang_harli.core.jobs.spec import JOB_NAME_PATTERN, FinetuneJobSpec
from sglang_harli.core.wire.stats import HarliStats
from sglang_harli.srt.tinker import bodies as tinker

PREFIX = "/harli/"
TINKER_PREFIX = "/api/v1/"
PREFIXES = (PREFIX, TINKER_PREFIX)
COMPONENT_PREFIX = "Harli"
"""Component names are prefixed so they cannot collide with SGLang's own (pydantic) components."""
_REF = "#/components/schemas/"
_MARK = "_harli_documented"

ERROR_SCHEMA: dict[str, Any] = {
    "title": "HarliError",
    "type": "object",
    "properties": {
        "error": {"type": "string", "description": "What is wrong, for a human."},
        "field": {
            "type": "string",
            "description": 'The request part at fault: a spec field ("training.epochs", "dataset.path"), '
            '"body", a dataset record ("dataset.records[3]", "line 7"), or a Tinker datum '
            '("data[0].loss_fn_inputs.weights").',
        },
    },
    "required": ["error"],
}
"""Every refusal of a ``/harli`` or ``/api/v1`` route; ``field`` is present wherever one field is at
fault."""

EXAMPLE_JOB: dict[str, Any] = {
    "name": "support-bot",
    "dataset": {
        "records": [
            {"prompt": "Where is my order?", "completion": " Let me look it up for you."},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
        ]
    },
    "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    "training": {"epochs": 1, "learning_rate": 0.0002, "micro_batch_size": 2, "max_seq_len": 128},
}
"""A small inline-dataset job, shown in the document (and sent by API fuzzers as their valid example)."""

ROUTE_NOT_FOUND_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"detail": {"type": "string"}},
    "required": ["detail"],
}
"""FastAPI's own 404 body, for a ``{name}`` that does not form a routable path (e.g. it holds a ``/``)."""


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"{_REF}{COMPONENT_PREFIX}{name}"}


def _per_rank(schema: dict[str, Any]) -> dict[str, Any]:
    """A reply as one DP rank sends it, or (several DP ranks) ``{"dp_ranks": [one per rank]}``."""
    merged = {
        "type": "object",
        "properties": {"dp_ranks": {"type": "array", "items": schema}},
        "required": ["dp_ranks"],
    }
    return {"anyOf": [schema, merged]}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _refusal(description: str) -> dict[str, Any]:
    return _json(description, _ref("Error"))


def _operations() -> dict[tuple[str, str], dict[str, Any]]:
    """``openapi_extra`` for each (method, path): the ``/api/v1`` routes', then the ``/harli`` routes'."""
    job = _per_rank(_ref("JobStatus"))
    missing = _json(
        "No job has this name (a HarliError), or the name does not form a route path at all.",
        {"anyOf": [_ref("Error"), ROUTE_NOT_FOUND_SCHEMA]},
    )
    return {
        **_tinker_operations(),
        ("GET", "/harli/stats"): {
            "responses": {
                "200": _json(
                    "Decode step counters, step latency percentiles, SLO attainment, finetune and "
                    "co-location state and the Harli config in force.",
                    _per_rank(_ref("HarliStats")),
                )
            }
        },
        ("POST", "/harli/jobs"): {
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("FinetuneJobSpec"), "example": EXAMPLE_JOB}},
            },
            "responses": {
                "201": _json("The job is queued.", job),
                "400": _refusal(
                    "The body is not JSON, the dataset cannot be read or tokenized, or the server cannot "
                    "serve the adapter (LoRA off, rank above --max-lora-rank, modules not served)."
                ),
                "409": _refusal("A job or a served adapter already has this name."),
                "413": _refusal(
                    "The body, or what it inflates to (Content-Encoding: zstd), is larger than "
                    "--harli-max-request-mb."
                ),
                "422": _refusal("The body does not match FinetuneJobSpec; `field` is the JSON path."),
                "429": _refusal("--harli-max-jobs jobs are already queued or running."),
                "501": _refusal(
                    "Finetuning is not supported in this server configuration (--tp-size > 1), or the spec "
                    "asks for a fleet (placement, training.instances) and there is no --harli-peers."
                ),
                "503": _refusal(
                    "The placement names no live instance of the fleet, fewer instances than "
                    "training.instances are alive, or the chosen instance did not answer."
                ),
                "507": _refusal("The job could not be recorded under --harli-state-dir (disk full?)."),
            },
        },
        ("GET", "/harli/jobs"): {
            "responses": {
                "200": _json(
                    "Every job of this server run, oldest first (with --harli-peers, every live "
                    "instance's, each with its `instance`).",
                    _per_rank({"type": "array", "items": _ref("JobStatus")}),
                )
            }
        },
        ("GET", "/harli/jobs/{name}"): {
            "responses": {"200": _json("The job.", job), "404": missing},
        },
        ("POST", "/harli/jobs/{name}/cancel"): {
            "responses": {
                "200": _json("The job, now cancelled.", job),
                "404": missing,
                "409": _refusal("The job already finished (completed, failed or cancelled)."),
            },
        },
    }


# -- /api/v1 --------------------------------------------------------------------------------------------
OBJECT: dict[str, Any] = {"type": "object"}
PROTOBUF = "application/x-protobuf"
BINARY: dict[str, Any] = {"type": "string", "format": "binary"}
_TINKER_REFUSALS = {
    400: "The body is not JSON (not a ForwardBackwardRequest, for forward_backward), or asks for what this "
    "server does not serve (another base model, a rank above --max-lora-rank, a loss or input not served); "
    "`field` names the part.",
    404: "No such training client, sampling session, saved path or future.",
    413: "The body, or what it inflates to (Content-Encoding: zstd), is larger than --harli-max-request-mb.",
    422: "The body does not match its schema; `field` is the JSON path.",
    429: "The server keeps as many training clients as it may; the SDK backs off and retries.",
    501: "Training clients need a server started with --enable-lora.",
}
_FUTURE = "The operation is submitted: its `request_id` (and `model_id`), for retrieve_future."
_COMMON = (400, 413, 422)
_TINKER_ROUTES: tuple[tuple[str, str, type | str | None, tuple[int, ...], str], ...] = (
    ("POST", "client/config", tinker.ClientConfig, _COMMON, "The SDK's flags."),
    ("POST", "client/dynamic_config", tinker.ClientConfig, _COMMON, "The SDK's refreshed flags."),
    ("POST", "create_session", tinker.CreateSession, _COMMON, "A new session's `session_id`."),
    ("POST", "session_heartbeat", tinker.Heartbeat, _COMMON, "The session is alive."),
    ("POST", "telemetry", tinker.Telemetry, _COMMON, "Accepted (and dropped)."),
    ("GET", "healthz", None, (), "The API answers."),
    ("GET", "get_server_capabilities", None, (), "The model served, trainable and sampleable."),
    ("POST", "create_model", tinker.CreateModel, (*_COMMON, 429, 501), _FUTURE),
    ("POST", "get_info", tinker.GetInfo, (*_COMMON, 404), "The training client's model and rank."),
    ("POST", "forward_backward", PROTOBUF, (400, 404, 413), _FUTURE),
    ("POST", "optim_step", tinker.OptimStep, (*_COMMON, 404), _FUTURE),
    ("POST", "save_weights", tinker.SaveWeights, (*_COMMON, 404), _FUTURE),
    ("POST", "save_weights_for_sampler", tinker.SaveWeightsForSampler, (*_COMMON, 404), _FUTURE),
    ("POST", "load_weights", tinker.LoadWeights, (*_COMMON, 404, 429, 501), _FUTURE),
    ("POST", "retrieve_future", tinker.RetrieveFuture, (*_COMMON, 404), ""),
    ("POST", "create_sampling_session", tinker.CreateSamplingSession, (*_COMMON, 404), "Its id."),
    ("GET", "samplers/{sampler_id}", None, (404,), "What the sampling session samples."),
    ("POST", "asample", tinker.Sample, (*_COMMON, 404), "Its `request_id` and `sample_sequence_ids`."),
    ("POST", "sessions/{session_id}/finish", tinker.FinishSession, (*_COMMON, 404), "The session ended."),
)
"""Each ``/api/v1`` route: method, path, body (a struct, a media type, or none), refusals, success."""


def _tinker_body(body: type | str) -> dict[str, Any]:
    if isinstance(body, str):
        return {"required": True, "content": {body: {"schema": BINARY}}}
    required = any(field.required for field in msgspec.structs.fields(body))
    return {"required": required, "content": {"application/json": {"schema": _ref(body.__name__)}}}


def _tinker_operations() -> dict[tuple[str, str], dict[str, Any]]:
    """``openapi_extra`` for each ``/api/v1`` (method, path)."""
    operations = {}
    for method, path, body, refusals, success in _TINKER_ROUTES:
        responses = {str(status): _refusal(_TINKER_REFUSALS[status]) for status in refusals}
        if "{" in path:  # a parameter that does not form a route path at all: FastAPI's own 404
            missing = {"anyOf": [_ref("Error"), ROUTE_NOT_FOUND_SCHEMA]}
            responses["404"] = _json(_TINKER_REFUSALS[404], missing)
        if path == "retrieve_future":
            responses["200"] = {
                "description": "The outcome: JSON (`try_again` while it runs, the result, or "
                '`{"error", "category"}`), or protobuf for forward_backward and asample.',
                "content": {"application/json": {"schema": OBJECT}, PROTOBUF: {"schema": BINARY}},
            }
        else:
            responses["200"] = _json(success, OBJECT)
        extra: dict[str, Any] = {"responses": responses}
        if body is not None:
            extra["requestBody"] = _tinker_body(body)
        operations[(method, f"{TINKER_PREFIX}{path}")] = extra
    return operations


def components() -> dict[str, dict[str, Any]]:
    """The schemas the ``/harli`` and ``/api/v1`` operations refer to, keyed by their (prefixed) component
    names."""
    structs = [FinetuneJobSpec, JobStatus, HarliStats, *tinker.BODIES]
    _, schemas = msgspec.json.schema_components(structs, ref_template=f"{_REF}{COMPONENT_PREFIX}{{name}}")
    schemas["Error"] = ERROR_SCHEMA
    return {f"{COMPONENT_PREFIX}{name}": schema for name, schema in schemas.items()}


def _refine(document: dict[str, Any], schemas: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Complete a generated document in place (idempotent): components, ``name`` rule, no placeholders."""
    document.setdefault("components", {}).setdefault("schemas", {}).update(schemas)
    operations = _operations()
    for path, item in document.get("paths", {}).items():
        if not path.startswith(PREFIXES):
            continue
        for method, operation in item.items():
            extra = operations.get((method.upper(), path))
            if extra is None or not isinstance(operation, dict):
                continue
            # FastAPI documents a schemaless 200 for every route; drop it where 200 is not what comes back.
            if "200" not in extra["responses"]:
                operation.get("responses", {}).pop("200", None)
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "path" and parameter.get("name") == "name":
                    parameter["schema"] = {"type": "string", "pattern": JOB_NAME_PATTERN, "title": "Name"}
                    parameter["description"] = "The job's name (also its adapter's name)."
                    parameter["example"] = EXAMPLE_JOB["name"]
    return document


def document_routes(app) -> None:
    """Describe the ``/harli`` and ``/api/v1`` routes of ``app`` in its OpenAPI document (idempotent)."""
    operations = _operations()
    for route in app.router.routes:
        path = getattr(route, "path", "")
        if not path.startswith(PREFIXES):
            continue
        for method in getattr(route, "methods", None) or ():
            extra = operations.get((method, path))
            if extra is not None:
                route.openapi_extra = {**(route.openapi_extra or {}), **extra}
    if getattr(app.openapi, _MARK, False):
        return
    generate = app.openapi
    schemas = components()

    def openapi() -> dict[str, Any]:
        return _refine(generate(), schemas)

    setattr(openapi, _MARK, True)
    app.openapi = openapi
    app.openapi_schema = None  # a document generated before now lacks the extras
