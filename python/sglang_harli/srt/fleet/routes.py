"""The fleet's peer routes (``/harli/fleet/...``): what one instance of a fleet asks another.

They open only to the admin key (``--admin-api-key``, the same on every instance), and are refused
outright without one; they check it themselves, as SGLang's own admin-only endpoints do, because marking a
route ``ADMIN_FORCE`` would put every SGLang request through the API-key middleware. They are internal, so
they are left out of the OpenAPI document. Bodies are read within the peer limit (``srt.body``).
"""

from __future__ import annotations

import asyncio
import secrets

import msgspec
from fastapi import APIRouter, Request, Response
from sglang.srt.utils.auth import AuthLevel, auth_level

from sglang_harli.core.errors import Forbidden, NotAvailable, NotFound, SpecError, Unauthorized
from sglang_harli.core.fleet.bundles import decode_msgpack
from sglang_harli.core.jobs.spec import check_eval
from sglang_harli.core.wire.control import CancelJob, ControlRequest, GetCapacity, ListJobs, SubmitJob
from sglang_harli.srt.body import json_response, read_body, relayed
from sglang_harli.srt.fleet.peers import Fleet
from sglang_harli.srt.service import HarliHttp, harli

router = APIRouter(prefix="/harli/fleet", tags=["harli"])


async def _relay(service: HarliHttp, request: ControlRequest) -> Response:
    return relayed(*await service.call(request))


def _peer(request: Request) -> tuple[HarliHttp, Fleet]:
    """The service and its fleet, for a caller holding the admin key; a ``HarliError`` otherwise."""
    service = harli(request)
    key = service.tokenizer_manager.server_args.admin_api_key
    if not key:
        raise Forbidden("authorization", "peer routes need --admin-api-key on this instance")
    if not secrets.compare_digest(request.headers.get("authorization", ""), f"Bearer {key}"):
        raise Unauthorized("authorization", "peer routes need the admin key (Authorization: Bearer <key>)")
    if service.fleet is None:
        raise NotAvailable("fleet", "this instance runs without --harli-peers")
    return service, service.fleet


@router.post("/adapters", include_in_schema=False)
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def receive_adapter(request: Request) -> Response:
    """A peer hands over a version it published (``core.fleet.bundles.AdapterBundle``, msgpack): checked,
    written under this instance's own directory and served here under the job's name."""
    service, fleet = _peer(request)
    body = await read_body(request, service.peer_limit)
    try:
        served = await fleet.receive(body)
    except RuntimeError as exc:  # SGLang refused to load it (srt.jobs.publisher): the sender reports it
        return json_response({"error": f"bundle: not served here: {exc}", "field": "bundle"}, status=500)
    return json_response(served)


@router.get("/adapters", include_in_schema=False)
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def served_adapters(request: Request) -> Response:
    """Every adapter this instance serves, with its newest version: what a peer catches up on."""
    return json_response(_peer(request)[1].served())


@router.get("/adapters/{name}", include_in_schema=False)
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def adapter_bundle(name: str, request: Request) -> Response:
    """The newest version of one adapter served here, as a bundle (msgpack)."""
    bundle = await asyncio.to_thread(_peer(request)[1].bundle, name)
    if bundle is None:
        raise NotFound("name", f"no adapter named {name!r} serves here")
    return Response(content=msgspec.msgpack.encode(bundle), media_type="application/msgpack")


@router.get("/capacity", include_in_schema=False)
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def fleet_capacity(request: Request) -> Response:
    """What this instance has to give a new job now (``core.fleet.placement.FleetCapacity``): placement reads
    it."""
    return await _relay(_peer(request)[0], GetCapacity())


@router.get("/jobs", include_in_schema=False)
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def fleet_local_jobs(request: Request) -> Response:
    """This instance's own jobs (the fleet-wide ``GET /harli/jobs`` gathers them)."""
    return await _relay(_peer(request)[0], ListJobs())


@router.post("/jobs", include_in_schema=False)
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def fleet_placed_job(request: Request) -> Response:
    """A job a peer placed here (msgpack ``SubmitJob``), checked and tokenized there; queued here."""
    service, _ = _peer(request)
    submit = decode_msgpack(await read_body(request, service.peer_limit), SubmitJob, "a placed job")
    if submit.staged is not None:  # a path on the sender's disk: never read here
        raise SpecError("staged", "a placed job carries its examples, not a path")
    if submit.count != len(submit.examples):
        raise SpecError("count", f"{submit.count} examples announced, {len(submit.examples)} given")
    check_eval(submit.spec)
    return relayed(*await service.submit_here(submit))


@router.post("/jobs/{name}/cancel", include_in_schema=False)
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def fleet_cancel_job(name: str, request: Request) -> Response:
    """Cancel this instance's own job (the fleet-wide cancel sends it here)."""
    return await _relay(_peer(request)[0], CancelJob(name=name))
