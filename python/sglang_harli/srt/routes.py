"""``/harli/*`` HTTP routes, mounted on SGLang's own FastAPI app.

Routes never touch scheduler state directly: they send a control command through the tokenizer manager
(see ``control.py``) and relay the scheduler's reply, so every number they return is the scheduler's.
Read-only routes use SGLang's normal API-key rule; routes that change state are marked
``AuthLevel.ADMIN_OPTIONAL`` like SGLang's own admin endpoints.
"""

from __future__ import annotations

import msgspec
from fastapi import APIRouter, Response
from sglang.srt.entrypoints import http_server
from sglang.srt.runtime_context import get_parallel

from sglang_harli.srt.control import HarliControlClient, register_control_types

router = APIRouter(prefix="/harli", tags=["harli"])
_client: HarliControlClient | None = None


def _control_client() -> HarliControlClient:
    global _client
    if _client is None:
        _client = HarliControlClient(
            http_server.get_global_state().tokenizer_manager, get_parallel().num_dp_ranks
        )
    return _client


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


@router.get("/stats")
async def harli_stats() -> Response:
    """Decode step counters, recent step latency percentiles, SLO attainment and the config in force."""
    return await _relay("stats")


def install_routes(app=None) -> None:
    """Mount the routes on SGLang's app (idempotent) and register our IPC types in this process."""
    register_control_types()
    app = app if app is not None else http_server.app
    if not any(getattr(r, "path", "").startswith("/harli/") for r in app.routes):
        app.include_router(router)
