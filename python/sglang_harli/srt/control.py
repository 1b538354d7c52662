"""Harli's control messages over SGLang's own IPC, and their dispatch on the scheduler.

SGLang ships control requests (load a LoRA, flush the cache, ...) from the tokenizer manager to the
scheduler as tagged msgspec structs and collects the replies with a ``FanOutCommunicator``. Harli adds
four IPC types to that channel (registered with ``io_struct.hook_custom_types``, SGLang's seam for
exactly this) instead of opening a side channel: ordering, DP fan-out and shutdown then behave like
SGLang's own control paths, and nothing is shared between processes except messages.

The operations themselves are the typed requests of ``core.wire.control``; ``HarliControlReq`` carries
one, ``HarliControlReqOutput`` its reply as JSON with the HTTP status; ``HarliPublishReq`` is the
scheduler's unsolicited request to serve an adapter version and ``HarliTinkerResult`` a Tinker
operation's outcome (both sent by ``srt.host``). ``ControlDispatcher`` routes a request to its handler by
type, as SGLang's ``TypeBasedDispatcher`` does, and is the one place a refusal becomes a status.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import msgspec
from sglang.srt.managers.communicator import FanOutCommunicator
from sglang.srt.managers.io_struct import BaseReq, hook_custom_types
from sglang.utils import TypeBasedDispatcher

from sglang_harli.core.errors import HarliError, http_status
from sglang_harli.core.tinker.futures import Outcome
from sglang_harli.core.wire.control import AdapterVersion, AnyControlRequest, ControlRequest

logger = logging.getLogger(__name__)


class HarliControlReq(BaseReq, kw_only=True):
    request: AnyControlRequest


class HarliControlReqOutput(BaseReq, kw_only=True):
    status: int = 200
    """HTTP status the route answers with: 2xx on success, 4xx for a request the scheduler refused."""
    payload: bytes = b""
    """JSON: the request's ``Reply``, or the error body of ``core.errors``."""


class HarliPublishReq(BaseReq, kw_only=True):
    """Scheduler -> tokenizer manager, unsolicited: load this adapter version under the job's name.

    The adapter-name registry lives in the tokenizer manager, so only it can publish; the scheduler, which
    trains, asks it to. The answer comes back as an ``AdapterServed`` request."""

    adapter: AdapterVersion


class HarliTinkerResult(BaseReq, kw_only=True):
    """Scheduler -> tokenizer manager, unsolicited: a Tinker operation's outcome, for the future the
    client polls (``srt.tinker.state``)."""

    request_id: str
    outcome: Outcome


def register_control_types() -> None:
    """Teach this process's IPC decoder our types. Needed once in every process that receives them."""
    hook_custom_types(HarliControlReq, HarliControlReqOutput, HarliPublishReq, HarliTinkerResult)


class ControlDispatcher:
    """Scheduler side: each request to its handler by type; a refusal to its status, never a crash."""

    def __init__(self, handlers: dict[type[ControlRequest], Callable[[ControlRequest], object]]):
        self._dispatch = TypeBasedDispatcher(list(handlers.items()))

    def __call__(self, req: HarliControlReq) -> HarliControlReqOutput:
        try:
            return HarliControlReqOutput(payload=msgspec.json.encode(self._dispatch(req.request)))
        except HarliError as exc:
            return HarliControlReqOutput(status=exc.status, payload=msgspec.json.encode(exc.body()))
        except Exception as exc:  # a broken command must never take the scheduler down
            logger.exception("harli %s failed", type(req.request).__name__)
            body = {"error": f"{type(exc).__name__}: {exc}"}
            return HarliControlReqOutput(status=http_status(exc), payload=msgspec.json.encode(body))


class HarliControlClient:
    """Tokenizer-manager side: send one request to every scheduler (DP rank) and await the replies. The
    HTTP side makes one, at start-up (``srt.service``): its reply type is then registered with the
    manager's result dispatcher before any request is sent."""

    def __init__(self, tokenizer_manager, fan_out: int | None = None):
        if fan_out is None:
            from sglang.srt.runtime_context import get_parallel

            fan_out = get_parallel().num_dp_ranks
        self._tokenizer_manager = tokenizer_manager
        self._communicator = FanOutCommunicator(tokenizer_manager._dispatch_to_scheduler, fan_out, "queueing")
        tokenizer_manager._result_dispatcher += TypeBasedDispatcher(
            [(HarliControlReqOutput, self._communicator.handle_recv)]
        )

    async def call(self, request: ControlRequest) -> list[HarliControlReqOutput]:
        self._tokenizer_manager.auto_create_handle_loop()
        return await self._communicator(HarliControlReq(request=request))
