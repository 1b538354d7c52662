"""The Tinker API (``/api/v1``), the HTTP side: what the official ``tinker`` SDK calls, on the served model.

The SDK (pinned, ``tinker==0.38.0``) starts with ``client/config``, ``client/dynamic_config`` and
``create_session``, then beats ``session_heartbeat`` and sends ``telemetry`` every 10 s. Every operation
that does work answers at once with a ``request_id`` (and the ``model_id``); the SDK polls
``retrieve_future``, which is held up to ``core.tinker.futures.POLL_S`` and answers ``try_again`` until
the outcome is in: JSON, or protobuf for ``forward_backward`` and ``asample`` (``core.tinker.codec``).

This module holds the session and future routes; the training clients' routes are in
``srt.tinker.training``, the sampling routes in ``srt.tinker.sampling``, the bodies they read in
``srt.tinker.bodies`` and the API's state in ``srt.tinker.state``. Every body is read within
``--harli-max-request-mb`` (``srt.body``); a request that cannot be read is refused with HTTP 4xx and
``{"error", "field"}`` (``srt.app``'s handler), an operation that fails later resolves its future with
``{"error", "category"}``.
"""

from __future__ import annotations

import secrets

from fastapi import APIRouter, Request, Response

from sglang_harli.core.errors import NotFound
from sglang_harli.srt.body import decode, json_response, read_body
from sglang_harli.srt.service import HarliHttp, harli
from sglang_harli.srt.tinker import auth, sampling, training
from sglang_harli.srt.tinker.bodies import (
    ClientConfig,
    CreateSession,
    FinishSession,
    Heartbeat,
    RetrieveFuture,
    Telemetry,
)

router = APIRouter(prefix="/api/v1", tags=["tinker"])

SDK_CHUNK_BYTES = 5_000_000
"""The SDK's own default for the estimated size of one ``forward_backward`` request's datums."""


def chunk_bytes(service: HarliHttp) -> int:
    """What the SDK is told to put in one ``forward_backward`` request: its default, or half the body limit
    if that is less (its estimate is of the datums alone, so the whole body must have room to spare)."""
    return max(1, min(SDK_CHUNK_BYTES, service.request_limit.bytes // 2))


@router.post("/client/config")
async def client_config(request: Request) -> Response:
    """The SDK's flags: its ``forward_backward`` bodies are zstd-compressed, cut to fit the body limit."""
    service = harli(request)
    decode(await read_body(request, service.request_limit), ClientConfig)
    return json_response(
        {"proto_compress_fwdbwd": True, "fwdbwd_max_chunk_bytes_count": chunk_bytes(service)}
    )


@router.post("/client/dynamic_config")
async def dynamic_config(request: Request) -> Response:
    decode(await read_body(request, harli(request).request_limit), ClientConfig)
    return json_response({})


@router.post("/create_session")
async def create_session(request: Request) -> Response:
    decode(await read_body(request, harli(request).request_limit), CreateSession)
    # Random, not counted: model ids and saved paths (``tinker://<session>:train:<n>/...``) must not repeat
    # after a restart, when a resumed loop's new session saves beside the old one's checkpoints.
    return json_response({"session_id": f"sess-{secrets.token_hex(6)}", "type": "create_session"})


@router.post("/session_heartbeat")
async def session_heartbeat(request: Request) -> Response:
    service = harli(request)
    body = decode(await read_body(request, service.request_limit), Heartbeat)
    service.tinker.beat(body.session_id)  # one this process never made (it restarted) is simply taken up
    return json_response({"type": "session_heartbeat"})


@router.post("/telemetry")
async def telemetry(request: Request) -> Response:
    decode(await read_body(request, harli(request).request_limit), Telemetry)
    return json_response({"status": "accepted"})


@router.get("/healthz")
async def healthz() -> Response:
    return json_response({"status": "ok"})


@router.get("/get_server_capabilities")
async def server_capabilities(request: Request) -> Response:
    state = harli(request).tinker
    model = {
        "model_name": state.base_model,
        "max_context_length": state.context_len,
        "trainable": True,
        "sampleable": True,
    }
    return json_response({"supported_models": [model]})


@router.post("/retrieve_future")
async def retrieve_future(request: Request) -> Response:
    """An operation's outcome, held up to ``POLL_S`` while it runs (``try_again`` after that)."""
    service = harli(request)
    request_id = decode(await read_body(request, service.request_limit), RetrieveFuture).request_id
    futures = service.tinker.futures
    if not futures.known(request_id):
        raise NotFound("request_id", "no such request (or it was forgotten)")
    outcome = await futures.wait(request_id)
    if outcome is None:
        return json_response({"type": "try_again", "request_id": request_id, "queue_state": "active"})
    content, media_type = outcome.payload()
    return Response(content=content, media_type=media_type)


@router.post("/sessions/{session_id}/finish")
async def finish_session(session_id: str, request: Request) -> Response:
    """``ServiceClient.close()``: the session's training clients and sampling sessions are dropped."""
    service = harli(request)
    decode(await read_body(request, service.request_limit), FinishSession)
    await service.tinker.end_session(session_id)
    return json_response({})


auth.mark_routes(router)
ROUTERS = (router, training.router, sampling.router)
"""Every ``/api/v1`` route, for ``srt.app`` to mount."""
