"""Harli's additions to SGLang's HTTP app: the ``/harli`` and ``/api/v1`` routes, Harli's start-up, the one
handler of refusals, the OpenAPI description of the routes, and the PD-decode admission guard.

``install`` is what the launcher calls, once, before SGLang starts serving.
"""

from __future__ import annotations

import contextlib

from fastapi import Request, Response
from sglang.srt.entrypoints import http_server

from sglang_harli.core.errors import HarliError
from sglang_harli.srt.body import json_response
from sglang_harli.srt.control import register_control_types
from sglang_harli.srt.openapi import document_routes
from sglang_harli.srt.pd_guard import install_pd_guard
from sglang_harli.srt.routes import ROUTERS as HARLI_ROUTERS
from sglang_harli.srt.service import HarliHttp
from sglang_harli.srt.tinker import auth as tinker_auth
from sglang_harli.srt.tinker.routes import ROUTERS as TINKER_ROUTERS


def _with_harli_startup(lifespan):
    """SGLang's app lifespan, preceded by Harli's start-up: the HTTP side's state (``HarliHttp``) is made
    and kept as ``app.state.harli``, so our reply types are known to the tokenizer manager before anything
    can arrive from a scheduler, and published adapters serve again before the server reports healthy."""

    @contextlib.asynccontextmanager
    async def harli_lifespan(app):
        service = HarliHttp.from_tokenizer_manager(http_server.get_global_state().tokenizer_manager)
        app.state.harli = service
        await service.start()
        async with lifespan(app) as state:
            yield state

    harli_lifespan.harli = True
    return harli_lifespan


async def refused(request: Request, exc: HarliError) -> Response:
    """Every refusal a Harli route raises, answered one way: ``{"error", "field"}`` with its status."""
    return json_response(exc.body(), status=exc.status)


def install(app=None) -> None:
    """Mount the routes on SGLang's app (idempotent) and register our IPC types in this process; also
    answer refusals (``refused``, for ``HarliError`` only: SGLang's own routes never raise one), document
    the routes in the app's OpenAPI schema, run Harli's start-up before SGLang's
    (``_with_harli_startup``) and guard PD-decode admission (``pd_guard``).

    Each route is added to the app itself rather than through ``include_router``: SGLang's API-key
    middleware reads the ``@auth_level`` mark from the endpoint of the app route that matches, and
    FastAPI's included routers hide their endpoints from that lookup.
    """
    register_control_types()
    app = app if app is not None else http_server.app
    if any(getattr(r, "path", "").startswith("/harli/") for r in app.router.routes):
        return
    for routes, tag in (*((r, "harli") for r in HARLI_ROUTERS), *((r, "tinker") for r in TINKER_ROUTERS)):
        for route in routes.routes:
            app.add_api_route(
                route.path, route.endpoint, methods=sorted(route.methods), name=route.name, tags=[tag],
                include_in_schema=route.include_in_schema,
            )  # fmt: skip
    app.add_exception_handler(HarliError, refused)
    if not getattr(app.router.lifespan_context, "harli", False):
        app.router.lifespan_context = _with_harli_startup(app.router.lifespan_context)
    document_routes(app)
    install_pd_guard()
    tinker_auth.install()
