"""``/harli/*`` HTTP routes, mounted on SGLang's own FastAPI app.

Routes never touch scheduler state directly: they send a control command through the tokenizer manager
(see ``control.py``) and relay the scheduler's reply, so every number they return is the scheduler's.
Read-only routes use SGLang's normal API-key rule; routes that change state are marked
``AuthLevel.ADMIN_OPTIONAL`` like SGLang's own admin endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import msgspec
from fastapi import APIRouter, Request, Response
from sglang.srt.entrypoints import http_server
from sglang.srt.runtime_context import get_parallel
from sglang.srt.utils.auth import AuthLevel, auth_level
from sglang.utils import TypeBasedDispatcher

from sglang_harli.core.config import HarliConfig
from sglang_harli.core.data import DatasetError, load_examples
from sglang_harli.core.evaluation import build_eval_data
from sglang_harli.core.job_store import discard_staged, stage_examples
from sglang_harli.core.jobs import SpecError, decode_spec
from sglang_harli.srt.control import HarliControlClient, HarliPublishReq, register_control_types
from sglang_harli.srt.finetune import JobName, PublishAgain, PublishedAck, SubmitRequest
from sglang_harli.srt.openapi import document_routes
from sglang_harli.srt.pd_guard import install_pd_guard
from sglang_harli.srt.publisher import publish_adapter

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/harli", tags=["harli"])
_client: HarliControlClient | None = None
_background: set[asyncio.Task] = set()


def _tokenizer_manager():
    return http_server.get_global_state().tokenizer_manager


def _control_client() -> HarliControlClient:
    global _client
    if _client is None:
        tokenizer_manager = _tokenizer_manager()
        _client = HarliControlClient(tokenizer_manager, get_parallel().num_dp_ranks)
        tokenizer_manager._result_dispatcher += TypeBasedDispatcher([(HarliPublishReq, _on_publish_request)])
    return _client


def _on_publish_request(req: HarliPublishReq) -> None:
    """Runs in the tokenizer manager's receive loop: publish in the background, then tell the scheduler."""
    task = asyncio.create_task(_publish(req))
    _background.add(task)
    task.add_done_callback(_background.discard)


async def _publish(req: HarliPublishReq) -> None:
    error = None
    try:
        await publish_adapter(_tokenizer_manager(), req.name, req.version, req.path)
    except Exception as exc:
        logger.exception("publishing %s version %d failed", req.name, req.version)
        error = f"{type(exc).__name__}: {exc}"
    await _control_client().call(
        "jobs.published", PublishedAck(name=req.name, version=req.version, error=error)
    )


def _json(body, status: int = 200) -> Response:
    return Response(content=msgspec.json.encode(body), status_code=status, media_type="application/json")


async def _relay(command: str, body=None) -> Response:
    replies = await _control_client().call(command, body)
    first = replies[0]
    if len(replies) == 1 or first.status >= 300:
        return Response(content=first.payload, status_code=first.status, media_type="application/json")
    # Several DP ranks: one object per rank.
    merged = [msgspec.json.decode(r.payload) for r in replies]
    return _json({"dp_ranks": merged}, status=first.status)


def _config() -> HarliConfig:
    return getattr(_tokenizer_manager().server_args, "_harli_config", None) or HarliConfig()


async def _body(request: Request, limit_mb: float) -> bytes:
    """The request body, refused with 413 beyond ``limit_mb`` before more of it is read."""
    limit = int(limit_mb * 2**20)
    too_large = SpecError("body", f"larger than {limit_mb:g} MiB (--harli-max-request-mb)", status=413)
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


def _refuse(exc: SpecError | DatasetError) -> Response:
    status = getattr(exc, "status", 400)
    return _json({"error": str(exc), "field": exc.field}, status=status)


@router.get("/stats")
async def harli_stats() -> Response:
    """Decode step counters, recent step latency percentiles, SLO attainment and the config in force."""
    return await _relay("stats")


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
            raise SpecError("name", f"an adapter named {spec.name!r} is already served; pick another", 409)
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
    except (SpecError, DatasetError) as exc:
        return _refuse(exc)
    if config.state_dir and examples:  # on disk before the job is acknowledged (core.job_store)
        staged = await asyncio.to_thread(stage_examples, config.state_dir, examples)
        submit = SubmitRequest(spec=spec, count=len(examples), staged=staged, evaluation=evaluation)
    else:
        staged = None
        submit = SubmitRequest(spec=spec, count=len(examples), examples=examples, evaluation=evaluation)
    try:
        response = await _relay("jobs.submit", submit)
    finally:
        if staged is not None:
            discard_staged(config.state_dir, staged)
    if response.status_code == 200:
        response.status_code = 201
    return response


@router.get("/jobs")
async def list_jobs() -> Response:
    """Every job of this server run, oldest first."""
    return await _relay("jobs.list")


@router.get("/jobs/{name}")
async def get_job(name: str) -> Response:
    """One job's state, progress, loss, throughput and published adapter versions."""
    return await _relay("jobs.get", JobName(name=name))


@router.post("/jobs/{name}/cancel")
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def cancel_job(name: str, request: Request) -> Response:
    """Stop a queued or running job; versions it already published stay served."""
    return await _relay("jobs.cancel", JobName(name=name))


async def serve_published_adapters() -> None:
    """After a restart, serve every job's newest adapter again (``--harli-state-dir``).

    Runs at start-up, before the server reports healthy, so a client never sees an adapter it used
    before the restart missing."""
    replies = await _control_client().call("jobs.served")
    for reply in replies:
        for again in msgspec.json.decode(reply.payload, type=list[PublishAgain]):
            logger.info("serving adapter %s version %d again", again.name, again.version)
            await _publish(HarliPublishReq(name=again.name, version=again.version, path=again.path))


def _with_harli_startup(lifespan):
    """SGLang's app lifespan, preceded by Harli's start-up: our reply types are known to the tokenizer
    manager before anything can arrive from a scheduler, and published adapters serve again."""

    @contextlib.asynccontextmanager
    async def harli_lifespan(app):
        _control_client()
        if _config().state_dir:
            try:
                await serve_published_adapters()
            except Exception:  # serving without them beats not serving; each job shows what failed
                logger.exception("re-publishing adapters at start-up failed")
        async with lifespan(app) as state:
            yield state

    harli_lifespan.harli = True
    return harli_lifespan


def install_routes(app=None) -> None:
    """Mount the routes on SGLang's app (idempotent) and register our IPC types in this process; also
    document them in the app's OpenAPI schema, run Harli's start-up before SGLang's (``_with_harli_startup``)
    and guard PD-decode admission (``pd_guard``).

    Each route is added to the app itself rather than through ``include_router``: SGLang's API-key
    middleware reads the ``@auth_level`` mark from the endpoint of the app route that matches, and
    FastAPI's included routers hide their endpoints from that lookup.
    """
    register_control_types()
    app = app if app is not None else http_server.app
    if any(getattr(r, "path", "").startswith("/harli/") for r in app.router.routes):
        return
    for route in router.routes:
        app.add_api_route(
            route.path, route.endpoint, methods=sorted(route.methods), name=route.name, tags=["harli"]
        )
    if not getattr(app.router.lifespan_context, "harli", False):
        app.router.lifespan_context = _with_harli_startup(app.router.lifespan_context)
    document_routes(app)
    install_pd_guard()
