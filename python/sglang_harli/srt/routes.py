"""``/harli/*`` HTTP routes, mounted on SGLang's own FastAPI app by ``srt.app``.

Routes never touch scheduler state directly: they send a typed request (``core.control``) through the
tokenizer manager (``srt.control``) and relay the scheduler's reply, so every number they return is the
scheduler's. Read-only routes use SGLang's normal API-key rule; routes that change state are marked
``AuthLevel.ADMIN_OPTIONAL`` like SGLang's own admin endpoints. The fleet's peer routes
(``/harli/fleet/...``, ``srt.fleet``) open only to the admin key, and are refused outright without one;
they check it themselves, as SGLang's own admin-only endpoints do, because marking a route
``ADMIN_FORCE`` would put every SGLang request through the API-key middleware. They are internal, so
they are left out of the OpenAPI document.
"""

from __future__ import annotations

import asyncio
import secrets

import msgspec
from fastapi import APIRouter, Request, Response
from sglang.srt.entrypoints import http_server
from sglang.srt.utils.auth import AuthLevel, auth_level

from sglang_harli.core.config import HarliConfig
from sglang_harli.core.control import (
    CancelJob,
    ControlRequest,
    GetCapacity,
    GetJob,
    GetStats,
    ListJobs,
    SubmitJob,
)
from sglang_harli.core.data import load_examples
from sglang_harli.core.errors import (
    Conflict,
    Forbidden,
    HarliError,
    NotAvailable,
    NotFound,
    SpecError,
    TooLarge,
    Unauthorized,
)
from sglang_harli.core.evaluation import build_eval_data
from sglang_harli.core.fleet import decode_msgpack
from sglang_harli.core.job_store import discard_staged, stage_examples
from sglang_harli.core.jobs import check_eval, decode_spec
from sglang_harli.srt.control import control_client
from sglang_harli.srt.placement import FleetJobs

router = APIRouter(prefix="/harli", tags=["harli"])


def _tokenizer_manager():
    return http_server.get_global_state().tokenizer_manager


def _config() -> HarliConfig:
    return getattr(_tokenizer_manager().server_args, "_harli_config", None) or HarliConfig()


def _json(body, status: int = 200) -> Response:
    return Response(content=msgspec.json.encode(body), status_code=status, media_type="application/json")


async def _relay(request: ControlRequest) -> Response:
    replies = await control_client(_tokenizer_manager()).call(request)
    first = replies[0]
    if len(replies) == 1 or first.status >= 300:
        return Response(content=first.payload, status_code=first.status, media_type="application/json")
    # Several DP ranks: one object per rank.
    merged = [msgspec.json.decode(r.payload) for r in replies]
    return _json({"dp_ranks": merged}, status=first.status)


async def _call(request: ControlRequest) -> tuple[int, bytes]:
    """This instance's scheduler's reply: status and JSON (several DP ranks: one object per rank)."""
    response = await _relay(request)
    return response.status_code, bytes(response.body)


async def _submit_here(submit: SubmitJob) -> tuple[int, bytes]:
    """Queue a checked, tokenized job on this instance's scheduler; 201 and its status once queued."""
    config = _config()
    staged = None
    if config.state_dir and submit.examples:  # on disk before the job is acknowledged (core.job_store)
        staged = await asyncio.to_thread(stage_examples, config.state_dir, submit.examples)
        submit = msgspec.structs.replace(submit, examples=[], staged=staged)
    try:
        status, body = await _call(submit)
    finally:
        if staged is not None:
            discard_staged(config.state_dir, staged)
    return (201 if status == 200 else status), body


async def _body(request: Request, limit_mb: float) -> bytes:
    """The request body, refused with 413 beyond ``limit_mb`` before more of it is read."""
    limit = int(limit_mb * 2**20)
    too_large = TooLarge("body", f"larger than {limit_mb:g} MiB (--harli-max-request-mb)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


@router.get("/stats")
async def harli_stats() -> Response:
    """Decode step counters, recent step latency percentiles, SLO attainment and the config in force;
    with --harli-peers, what this instance knows of its fleet (``fleet``)."""
    response = await _relay(GetStats())
    fleet = _fleet()
    if fleet is None or response.status_code != 200:
        return response
    stats = msgspec.json.decode(response.body)
    if isinstance(stats, dict) and "dp_ranks" not in stats:
        stats["fleet"] = fleet.stats()
    return _json(stats)


@router.post("/jobs")
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def submit_job(request: Request) -> Response:
    """Queue a LoRA finetune job (``FinetuneJobSpec``); the dataset is read and tokenized here, off the
    scheduler, so a bad file is refused before the scheduler sees anything."""
    tokenizer_manager = _tokenizer_manager()
    config = _config()
    try:
        spec = decode_spec(await _body(request, config.max_request_mb))
        if spec.name in getattr(tokenizer_manager, "lora_ref_cache", {}):
            raise Conflict("name", f"an adapter named {spec.name!r} is already served; pick another")
        if tokenizer_manager.tokenizer is None:
            raise SpecError(
                "dataset", "the server runs with --skip-tokenizer-init and cannot tokenize datasets"
            )
        context = getattr(tokenizer_manager, "context_len", None)
        if context and spec.training.max_seq_len > context:
            raise SpecError(
                "training.max_seq_len",
                f"{spec.training.max_seq_len} is longer than the model's context length ({context})",
            )
        examples, _ = await asyncio.to_thread(
            load_examples,
            spec.dataset.records,
            spec.dataset.path,
            tokenizer_manager.tokenizer,
            data_dir=config.data_dir or None,
            max_seq_len=spec.training.max_seq_len,
            max_file_bytes=int(config.max_dataset_mb * 2**20),
        )
        examples, evaluation = await asyncio.to_thread(
            build_eval_data,
            spec,
            examples,
            tokenizer_manager.tokenizer,
            data_dir=config.data_dir or None,
            model_dir=tokenizer_manager.server_args.model_path,
            max_file_bytes=int(config.max_dataset_mb * 2**20),
        )
        submit = SubmitJob(spec=spec, count=len(examples), examples=examples, evaluation=evaluation)
        jobs = _fleet_jobs()
        if jobs is None:
            if spec.placement is not None:
                raise NotAvailable("placement", "this instance runs without --harli-peers")
            if spec.training.instances > 1:
                raise NotAvailable("training.instances", "this instance runs without --harli-peers")
            status, body = await _submit_here(submit)
        else:
            status, body = await jobs.submit(submit, _submit_here)
    except HarliError as exc:
        return _json(exc.body(), status=exc.status)
    return Response(content=body, status_code=status, media_type="application/json")


@router.get("/jobs")
async def list_jobs() -> Response:
    """Every job of this server run, oldest first; with --harli-peers, every live instance's, each with
    the ``instance`` it runs on."""
    jobs = _fleet_jobs()
    if jobs is None:
        return await _relay(ListJobs())
    return _json(await jobs.list())


@router.get("/jobs/{name}")
async def get_job(name: str) -> Response:
    """One job's state, progress, loss, throughput and published adapter versions (with --harli-peers,
    wherever in the fleet it runs)."""
    jobs = _fleet_jobs()
    if jobs is None:
        return await _relay(GetJob(name=name))
    status, body = await jobs.get(name)
    return Response(content=body, status_code=status, media_type="application/json")


@router.post("/jobs/{name}/cancel")
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def cancel_job(name: str, request: Request) -> Response:
    """Stop a queued, running or publishing job (with --harli-peers, wherever in the fleet it runs);
    versions it already published stay served."""
    jobs = _fleet_jobs()
    if jobs is None:
        return await _relay(CancelJob(name=name))
    status, body = await jobs.cancel(name)
    return Response(content=body, status_code=status, media_type="application/json")


# -- the fleet's peer routes (srt.fleet) ---------------------------------------------------------------


def _fleet():
    return getattr(_tokenizer_manager(), "harli_fleet", None)


def _fleet_jobs() -> FleetJobs | None:
    fleet = _fleet()
    if fleet is None:
        return None
    jobs = getattr(fleet, "jobs", None)
    if jobs is None:
        jobs = fleet.jobs = FleetJobs(fleet, _call)
    return jobs


def _fleet_or_refuse(request: Request):
    """The fleet, for a caller holding the admin key; else a ``HarliError`` to answer with."""
    key = _tokenizer_manager().server_args.admin_api_key
    if not key:
        raise Forbidden("authorization", "peer routes need --admin-api-key on this instance")
    if not secrets.compare_digest(request.headers.get("authorization", ""), f"Bearer {key}"):
        raise Unauthorized("authorization", "peer routes need the admin key (Authorization: Bearer <key>)")
    fleet = _fleet()
    if fleet is None:
        raise NotAvailable("fleet", "this instance runs without --harli-peers")
    return fleet


@router.post("/fleet/adapters", include_in_schema=False)
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def receive_adapter(request: Request) -> Response:
    """A peer hands over a version it published (``core.fleet.AdapterBundle``, msgpack): checked, written
    under this instance's own directory and served here under the job's name."""
    try:
        fleet = _fleet_or_refuse(request)
        served = await fleet.receive(await _body(request, _config().max_request_mb * 16))
    except HarliError as exc:
        return _json(exc.body(), status=exc.status)
    except RuntimeError as exc:  # SGLang refused to load it (srt.publisher): the sender reports it
        return _json({"error": f"bundle: not served here: {exc}", "field": "bundle"}, status=500)
    return _json(served)


@router.get("/fleet/adapters", include_in_schema=False)
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def served_adapters(request: Request) -> Response:
    """Every adapter this instance serves, with its newest version: what a peer catches up on."""
    try:
        return _json(_fleet_or_refuse(request).served())
    except HarliError as exc:
        return _json(exc.body(), status=exc.status)


@router.get("/fleet/adapters/{name}", include_in_schema=False)
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def adapter_bundle(name: str, request: Request) -> Response:
    """The newest version of one adapter served here, as a bundle (msgpack)."""
    try:
        bundle = await asyncio.to_thread(_fleet_or_refuse(request).bundle, name)
        if bundle is None:
            raise NotFound("name", f"no adapter named {name!r} serves here")
    except HarliError as exc:
        return _json(exc.body(), status=exc.status)
    return Response(content=msgspec.msgpack.encode(bundle), media_type="application/msgpack")


@router.get("/fleet/capacity", include_in_schema=False)
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def fleet_capacity(request: Request) -> Response:
    """What this instance has to give a new job now (``core.fleet.FleetCapacity``): placement reads it."""
    return await _peer_relay(request, GetCapacity())


@router.get("/fleet/jobs", include_in_schema=False)
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def fleet_local_jobs(request: Request) -> Response:
    """This instance's own jobs (the fleet-wide ``GET /harli/jobs`` gathers them)."""
    return await _peer_relay(request, ListJobs())


@router.post("/fleet/jobs", include_in_schema=False)
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def fleet_placed_job(request: Request) -> Response:
    """A job a peer placed here (msgpack ``SubmitJob``), checked and tokenized there; queued here."""
    try:
        _fleet_or_refuse(request)
        body = await _body(request, _config().max_request_mb * 16)
        submit = decode_msgpack(body, SubmitJob, "a placed job")
        if submit.staged is not None:  # a path on the sender's disk: never read here
            raise SpecError("staged", "a placed job carries its examples, not a path")
        if submit.count != len(submit.examples):
            raise SpecError("count", f"{submit.count} examples announced, {len(submit.examples)} given")
        check_eval(submit.spec)
        status, reply = await _submit_here(submit)
    except HarliError as exc:
        return _json(exc.body(), status=exc.status)
    return Response(content=reply, status_code=status, media_type="application/json")


@router.post("/fleet/jobs/{name}/cancel", include_in_schema=False)
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def fleet_cancel_job(name: str, request: Request) -> Response:
    """Cancel this instance's own job (the fleet-wide cancel sends it here)."""
    return await _peer_relay(request, CancelJob(name=name))


async def _peer_relay(request: Request, control: ControlRequest) -> Response:
    """A peer's call answered by this instance's scheduler, once the caller has shown the admin key."""
    try:
        _fleet_or_refuse(request)
    except HarliError as exc:
        return _json(exc.body(), status=exc.status)
    return await _relay(control)
