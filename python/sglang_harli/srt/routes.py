"""The ``/harli`` route family, as ``srt.app`` mounts it: ``/harli/stats`` here, the job routes
(``srt.jobs.routes``) and the fleet's peer routes (``srt.fleet.routes``).
"""

from __future__ import annotations

import msgspec
from fastapi import APIRouter, Request, Response

from sglang_harli.core.wire.control import GetStats
from sglang_harli.srt.body import json_response, relayed
from sglang_harli.srt.fleet.routes import router as fleet_router
from sglang_harli.srt.jobs.routes import router as jobs_router
from sglang_harli.srt.service import harli

router = APIRouter(prefix="/harli", tags=["harli"])


@router.get("/stats")
async def harli_stats(request: Request) -> Response:
    """Decode step counters, recent step latency percentiles, SLO attainment and the config in force;
    with --harli-peers, what this instance knows of its fleet (``fleet``)."""
    service = harli(request)
    status, body = await service.call(GetStats())
    if service.fleet is None or status != 200:
        return relayed(status, body)
    stats = msgspec.json.decode(body)
    if isinstance(stats, dict) and "dp_ranks" not in stats:
        stats["fleet"] = service.fleet.stats()
    return json_response(stats)


ROUTERS = (router, jobs_router, fleet_router)
