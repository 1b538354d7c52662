"""``HarliHttp``: everything Harli keeps in the HTTP server process, made once at start-up.

``srt.app``'s lifespan builds it before SGLang's own start-up, from the tokenizer manager SGLang made and
the ``HarliConfig`` the launcher put on the server args, and keeps it as ``app.state.harli`` (where SGLang
keeps its own OpenAI serving objects); every route reaches it there, through ``harli(request)``. It holds

- ``config``: the ``--harli-*`` flags in force;
- ``control``: the one client of the scheduler's control path (``srt.control``);
- ``publisher``: the receiver of the scheduler's publish requests and the adapter versions serving
  (``srt.jobs.publisher``);
- ``fleet`` and ``jobs``, with ``--harli-peers``: the peers (``srt.fleet.peers``) and the fleet's jobs
  (``srt.fleet.placement``), else ``None``;
- ``tinker``: the Tinker API's state (``srt.tinker.state``);
- the body limit of each route family (``srt.body``).

SGLang's objects are left as they are, except for SGLang's own seam for replies: the control client, the
publisher and the Tinker API each register the reply types they receive with the tokenizer manager's
result dispatcher, here, before anything can arrive from a scheduler.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import msgspec
from fastapi import Request

from sglang_harli.core.config import HarliConfig
from sglang_harli.core.fleet.peers import own_url, parse_peers
from sglang_harli.core.jobs.staging import discard_staged, stage_examples
from sglang_harli.core.wire.control import ControlRequest, SubmitJob
from sglang_harli.models.builtin import cache_root
from sglang_harli.srt.body import BodyLimit
from sglang_harli.srt.control import HarliControlClient
from sglang_harli.srt.fleet.peers import Fleet
from sglang_harli.srt.fleet.placement import FleetJobs
from sglang_harli.srt.jobs.publisher import Publisher
from sglang_harli.srt.tinker.state import TinkerApi

logger = logging.getLogger(__name__)

PEER_BODY_FACTOR = 16
"""The fleet's peer routes take this many times ``--harli-max-request-mb``: they carry adapter bundles
(hundreds of MB for a large model at a high rank) and placed jobs with their tokenized datasets."""


class HarliHttp:
    def __init__(self, tokenizer_manager, config: HarliConfig):
        self.tokenizer_manager = tokenizer_manager
        self.config = config
        self.control = HarliControlClient(tokenizer_manager)
        self.publisher = Publisher(tokenizer_manager, self.control)
        self.tinker = TinkerApi(tokenizer_manager, config, self.control, self.publisher)
        self.fleet: Fleet | None = None
        self.jobs: FleetJobs | None = None
        if config.peers:
            args = tokenizer_manager.server_args
            self.fleet = Fleet(
                self.publisher,
                own_url(args.host, args.port),
                parse_peers(config.peers),
                args.admin_api_key,
                Path(config.output_dir or cache_root() / "adapters") / ".peers",
            )
            self.publisher.on_published = self.fleet.published
            self.jobs = FleetJobs(self.fleet, self.call)
        self.request_limit = BodyLimit(config.max_request_mb)
        """``/harli`` and ``/api/v1`` bodies: an inline dataset; a Tinker request (the SDK cuts its
        ``forward_backward`` datums into chunks that fit, ``srt.tinker.routes.client_config``)."""
        self.peer_limit = BodyLimit(
            config.max_request_mb * PEER_BODY_FACTOR, f"{PEER_BODY_FACTOR} x --harli-max-request-mb"
        )

    @classmethod
    def from_tokenizer_manager(cls, tokenizer_manager) -> HarliHttp:
        config = getattr(tokenizer_manager.server_args, "_harli_config", None) or HarliConfig()
        return cls(tokenizer_manager, config)

    async def start(self) -> None:
        """Before SGLang's start-up (and so before the server reports healthy): every job's newest adapter
        serves again (--harli-state-dir), and the fleet's newest adapters serve here (--harli-peers)."""
        if self.config.state_dir:
            try:
                await self.publisher.serve_again()
            except Exception:  # serving without them beats not serving; each job shows what failed
                logger.exception("re-publishing adapters at start-up failed")
        if self.fleet is not None:
            await self.fleet.catch_up()
            self.fleet.start()

    # -- the scheduler -----------------------------------------------------------------------------------
    async def call(self, request: ControlRequest) -> tuple[int, bytes]:
        """This instance's scheduler's reply: status and JSON (several DP ranks: one object per rank)."""
        replies = await self.control.call(request)
        first = replies[0]
        if len(replies) == 1 or first.status >= 300:
            return first.status, first.payload
        merged = [msgspec.json.decode(r.payload) for r in replies]
        return first.status, msgspec.json.encode({"dp_ranks": merged})

    async def submit_here(self, submit: SubmitJob) -> tuple[int, bytes]:
        """Queue a checked, tokenized job on this instance's scheduler; 201 and its status once queued."""
        state_dir = self.config.state_dir
        staged = None
        if state_dir and submit.examples:  # on disk before the job is acknowledged (core.jobs.store)
            staged = await asyncio.to_thread(stage_examples, state_dir, submit.examples)
            submit = msgspec.structs.replace(submit, examples=[], staged=staged)
        try:
            status, body = await self.call(submit)
        finally:
            if staged is not None:
                discard_staged(state_dir, staged)
        return (201 if status == 200 else status), body


def harli(request: Request) -> HarliHttp:
    """The HTTP side's Harli state, for a route: made by the start-up (``srt.app``)."""
    return request.app.state.harli
