"""The ``/harli/jobs`` routes: submit, list, get and cancel finetune jobs (``srt.routes`` mounts them).

Routes never touch scheduler state directly: they send a typed request (``core.wire.control``) through the
HTTP side's control client (``srt.service.HarliHttp.call``) and relay the scheduler's reply, so every
number they return is the scheduler's. A refusal is raised as a ``core.errors`` error and answered by the
app's one handler (``srt.app``); bodies are read within their limit by ``srt.body``. Read-only routes use
SGLang's normal API-key rule; routes that change state are marked ``AuthLevel.ADMIN_OPTIONAL`` like
SGLang's own admin endpoints. With ``--harli-peers`` the fleet's jobs (``srt.fleet.placement``) answer
instead of this instance's scheduler alone.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from sglang.srt.utils.auth import AuthLevel, auth_level

from sglang_harli.core.errors import Conflict, NotAvailable
from sglang_harli.core.jobs.spec import decode_spec
from sglang_harli.core.jobs.submission import tokenize_job
from sglang_harli.core.wire.control import (
    CancelJob,
    ControlRequest,
    GetJob,
    ListJobs,
)
from sglang_harli.srt.body import json_response, read_body, relayed
from sglang_harli.srt.jobs.base_answers import ask_base_model
from sglang_harli.srt.service import HarliHttp, harli

router = APIRouter(prefix="/harli", tags=["harli"])


async def _relay(service: HarliHttp, request: ControlRequest) -> Response:
    return relayed(*await service.call(request))


@router.post("/jobs")
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def submit_job(request: Request) -> Response:
    """Queue a LoRA finetune job (``FinetuneJobSpec``); the dataset is read and tokenized here, off the
    scheduler, so a bad file is refused before the scheduler sees anything."""
    service = harli(request)
    tokenizer_manager, config = service.tokenizer_manager, service.config
    spec = decode_spec(await read_body(request, service.request_limit))
    if spec.name in getattr(tokenizer_manager, "lora_ref_cache", {}):
        raise Conflict("name", f"an adapter named {spec.name!r} is already served; pick another")
    submit = await asyncio.to_thread(
        tokenize_job,
        spec,
        tokenizer_manager.tokenizer,
        data_dir=config.data_dir or None,
        model_dir=tokenizer_manager.server_args.model_path,
        context_len=getattr(tokenizer_manager, "context_len", None),
        max_file_bytes=int(config.max_dataset_mb * 2**20),
    )
    # rehearsal answers and the probes the base model gets right: asked of the served base model itself
    submit = await ask_base_model(tokenizer_manager, submit, tokenizer_manager.server_args.model_path)
    if service.jobs is not None:
        return relayed(*await service.jobs.submit(submit, service.submit_here))
    if spec.placement is not None:
        raise NotAvailable("placement", "this instance runs without --harli-peers")
    if spec.training.instances > 1:
        raise NotAvailable("training.instances", "this instance runs without --harli-peers")
    return relayed(*await service.submit_here(submit))


@router.get("/jobs")
async def list_jobs(request: Request) -> Response:
    """Every job of this server run, oldest first; with --harli-peers, every live instance's, each with
    the ``instance`` it runs on."""
    service = harli(request)
    if service.jobs is None:
        return await _relay(service, ListJobs())
    return json_response(await service.jobs.list())


@router.get("/jobs/{name}")
async def get_job(name: str, request: Request) -> Response:
    """One job's state, progress, loss, throughput and published adapter versions (with --harli-peers,
    wherever in the fleet it runs)."""
    service = harli(request)
    if service.jobs is None:
        return await _relay(service, GetJob(name=name))
    return relayed(*await service.jobs.get(name))


@router.post("/jobs/{name}/cancel")
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def cancel_job(name: str, request: Request) -> Response:
    """Stop a queued, running or publishing job (with --harli-peers, wherever in the fleet it runs);
    versions it already published stay served."""
    service = harli(request)
    if service.jobs is None:
        return await _relay(service, CancelJob(name=name))
    return relayed(*await service.jobs.cancel(name))
