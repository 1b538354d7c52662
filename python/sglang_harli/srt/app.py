"""Harli's additions to SGLang's HTTP app: the ``/harli`` routes, Harli's start-up, the OpenAPI
description of the routes, and the PD-decode admission guard.

``install`` is what the launcher calls, once, before SGLang starts serving.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from sglang.srt.entrypoints import http_server

from sglang_harli.core.config import HarliConfig
from sglang_harli.core.fleet import own_url, parse_peers
from sglang_harli.models.builtin import cache_root
from sglang_harli.srt import publisher, tinker_auth
from sglang_harli.srt.control import control_client, register_control_types
from sglang_harli.srt.fleet import Fleet
from sglang_harli.srt.openapi import document_routes
from sglang_harli.srt.pd_guard import install_pd_guard
from sglang_harli.srt.routes import router
from sglang_harli.srt.tinker import router as tinker_router

logger = logging.getLogger(__name__)


def _with_harli_startup(lifespan):
    """SGLang's app lifespan, preceded by Harli's start-up: our reply types are known to the tokenizer
    manager before anything can arrive from a scheduler, and published adapters serve again."""

    @contextlib.asynccontextmanager
    async def harli_lifespan(app):
        tokenizer_manager = http_server.get_global_state().tokenizer_manager
        control_client(tokenizer_manager)
        publisher.install_receiver(tokenizer_manager)
        config = getattr(tokenizer_manager.server_args, "_harli_config", None) or HarliConfig()
        if config.state_dir:
            try:
                await publisher.serve_again(tokenizer_manager)
            except Exception:  # serving without them beats not serving; each job shows what failed
                logger.exception("re-publishing adapters at start-up failed")
        if config.peers:
            server_args = tokenizer_manager.server_args
            fleet = Fleet(
                tokenizer_manager,
                own_url(server_args.host, server_args.port),
                parse_peers(config.peers),
                tokenizer_manager.server_args.admin_api_key,
                Path(config.output_dir or cache_root() / "adapters") / ".peers",
            )
            tokenizer_manager.harli_fleet = fleet
            await fleet.catch_up()  # the peers' newest adapters serve here before this reports healthy
            fleet.start()
        async with lifespan(app) as state:
            yield state

    harli_lifespan.harli = True
    return harli_lifespan


def install(app=None) -> None:
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
    for routes, tag in ((router, "harli"), (tinker_router, "tinker")):
        for route in routes.routes:
            app.add_api_route(
                route.path, route.endpoint, methods=sorted(route.methods), name=route.name, tags=[tag],
                include_in_schema=route.include_in_schema,
            )  # fmt: skip
    if not getattr(app.router.lifespan_context, "harli", False):
        app.router.lifespan_context = _with_harli_startup(app.router.lifespan_context)
    document_routes(app)
    install_pd_guard()
    tinker_auth.install()
