"""Harli's control messages between the HTTP process and the scheduler, over SGLang's own IPC.

SGLang ships control requests (load a LoRA, flush the cache, ...) from the tokenizer manager to the
scheduler as tagged msgspec structs and collects the replies with a ``FanOutCommunicator``. Harli adds one
request type and one reply type to that channel (registered with ``io_struct.hook_custom_types``, SGLang's
seam for exactly this) instead of opening a side channel: ordering, DP fan-out and shutdown then behave
like SGLang's own control paths, and nothing is shared between processes except messages.

The payloads are JSON bytes encoded with msgspec by the two ends, so the schemas live in
``sglang_harli.core`` and the wire types never change when a command is added.
"""

from __future__ import annotations

from typing import Any

import msgspec
from sglang.srt.managers.communicator import FanOutCommunicator
from sglang.srt.managers.io_struct import BaseReq, hook_custom_types
from sglang.utils import TypeBasedDispatcher


class HarliControlReq(BaseReq, kw_only=True):
    command: str
    payload: bytes = b""


class HarliControlReqOutput(BaseReq, kw_only=True):
    status: int = 200
    """HTTP status the route answers with: 2xx on success, 4xx for a request the scheduler refused."""
    payload: bytes = b""


class HarliPublishReq(BaseReq, kw_only=True):
    """Scheduler -> tokenizer manager, unsolicited: load this adapter version under the job's name.

    The adapter-name registry lives in the tokenizer manager, so only it can publish; the scheduler, which
    trains, asks it to. The answer comes back as a ``published`` control command."""

    name: str
    version: int
    path: str


def register_control_types() -> None:
    """Teach this process's IPC decoder our types. Needed once in every process that receives them."""
    hook_custom_types(HarliControlReq, HarliControlReqOutput, HarliPublishReq)


class ControlError(Exception):
    """A command the scheduler refuses; carries the HTTP status for the route."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def reply(body: Any, status: int = 200) -> HarliControlReqOutput:
    return HarliControlReqOutput(status=status, payload=msgspec.json.encode(body))


class HarliControlClient:
    """Tokenizer-manager side: send one command to every scheduler (DP rank) and await the replies."""

    def __init__(self, tokenizer_manager, fan_out: int):
        self._tokenizer_manager = tokenizer_manager
        self._communicator = FanOutCommunicator(tokenizer_manager._dispatch_to_scheduler, fan_out, "queueing")
        tokenizer_manager._result_dispatcher += TypeBasedDispatcher(
            [(HarliControlReqOutput, self._communicator.handle_recv)]
        )

    async def call(self, command: str, body: Any = None) -> list[HarliControlReqOutput]:
        self._tokenizer_manager.auto_create_handle_loop()
        payload = b"" if body is None else msgspec.json.encode(body)
        return await self._communicator(HarliControlReq(command=command, payload=payload))
