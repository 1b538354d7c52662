"""``TinkerApi``: the Tinker API's state in the HTTP server process, one per server (``srt.service``).

It holds the sessions (``core.tinker.sessions``), each training client's operation sequence
(``core.tinker.futures.ModelSequence``), the futures the SDK polls, the saved weights
(``core.tinker.store``), the sampling sessions and the snapshots served for them (``srt.tinker.snapshots``).
A training operation goes to the scheduler as a control request (``queued``); its outcome comes back
unsolicited, as a ``HarliTinkerResult``, which ``_arrived`` hands to the operation waiting for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from pathlib import Path

import msgspec
from sglang.utils import TypeBasedDispatcher

from sglang_harli.core.config import HarliConfig
from sglang_harli.core.errors import NotAvailable, NotFound, SpecError
from sglang_harli.core.tinker.futures import FutureTable, ModelSequence, Outcome
from sglang_harli.core.tinker.models import MAX_MODELS
from sglang_harli.core.tinker.sessions import SESSION_TIMEOUT_S, Sessions, session_of
from sglang_harli.core.tinker.store import TinkerStore
from sglang_harli.core.wire.control import ControlRequest, TinkerDropModel
from sglang_harli.models.builtin import cache_root
from sglang_harli.srt.control import HarliControlClient, HarliTinkerResult
from sglang_harli.srt.jobs.publisher import Publisher
from sglang_harli.srt.tinker.snapshots import SamplingSession, Snapshots

logger = logging.getLogger(__name__)

KEEP_SAMPLE_IDS = 4096
"""Sample submissions remembered for deduplication (the SDK resends the same seq_id on a lost answer)."""


def store_root(config: HarliConfig) -> Path:
    """Where saved weights live: under --harli-state-dir (durable), else beside the adapters."""
    if config.state_dir:
        return Path(config.state_dir) / "tinker"
    return Path(config.output_dir or cache_root() / "adapters") / "tinker"


class TinkerApi:
    def __init__(
        self, tokenizer_manager, config: HarliConfig, control: HarliControlClient, publisher: Publisher
    ):
        self.tokenizer_manager = tokenizer_manager
        self.control = control
        self.futures = FutureTable()
        self.models: dict[str, ModelSequence] = {}
        self.ranks: dict[str, int] = {}
        self.sessions = Sessions(MAX_MODELS)
        self._reaper: asyncio.Task | None = None
        args = tokenizer_manager.server_args
        self.store = TinkerStore(store_root(config))
        self.served_names = {n for n in (args.served_model_name, args.model_path) if n}
        if (args.served_model_name or "").startswith("harli-"):  # a preset is served as harli-tiny
            self.served_names.add(args.served_model_name.replace("-", ":", 1))  # and named harli:tiny
        self.store.forget_unnamed()  # their sessions died with the last process
        self.snapshots = Snapshots(publisher)
        self.sampling: dict[str, SamplingSession] = {}
        self.samples: OrderedDict[tuple[str, int], dict] = OrderedDict()  # dedup of asample
        self._results: dict[str, asyncio.Future[Outcome]] = {}
        self._tasks: set[asyncio.Task] = set()
        # SGLang's seam for replies: the scheduler's unsolicited outcomes are handled here.
        tokenizer_manager._result_dispatcher += TypeBasedDispatcher([(HarliTinkerResult, self._arrived)])

    # -- what the routes ask -----------------------------------------------------------------------------
    def model(self, model_id: str) -> ModelSequence:
        """The model's operation sequence; ``NotFound`` naming ``model_id``."""
        model = self.models.get(model_id)
        if model is None:
            raise NotFound("model_id", f"no training client {model_id!r}")
        return model

    def sampler(self, sampler_id: str, field: str) -> SamplingSession:
        """A sampling session; ``NotFound`` naming ``field``."""
        session = self.sampling.get(sampler_id)
        if session is None:
            raise NotFound(field, f"no sampling session {sampler_id!r}")
        return session

    @property
    def base_model(self) -> str:
        args = self.tokenizer_manager.server_args
        return args.served_model_name or args.model_path

    @property
    def context_len(self) -> int | None:
        return getattr(self.tokenizer_manager, "context_len", None)

    def check_base_model(self, value: str | None, field: str = "base_model") -> None:
        """A client naming a model must name the one this server serves (its path or served name)."""
        if value is not None and value not in self.served_names:
            raise SpecError(
                field, f"{value!r} is not served here; this server serves {sorted(self.served_names)}"
            )

    def check_servable(self, rank: int) -> None:
        """A training client's snapshots are sampled as SGLang adapters: its rank must fit the server's."""
        args = self.tokenizer_manager.server_args
        if not args.enable_lora:
            raise NotAvailable("lora_config", "training clients need a server started with --enable-lora")
        if args.max_lora_rank is not None and rank > args.max_lora_rank:
            raise SpecError(
                "lora_config.rank", f"rank {rank} is above the server's --max-lora-rank {args.max_lora_rank}"
            )

    # -- sessions ----------------------------------------------------------------------------------------
    def beat(self, session: str) -> None:
        self.sessions.beat(session)
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap())

    def reserve(self, model_id: str) -> str:
        """A new training client's place (``Sessions.reserve``) and the request id of its creation."""
        request_id = self.sessions.reserve(model_id, self.futures.create)
        self.beat(session_of(model_id))
        return request_id

    async def end_session(self, session: str) -> None:
        """Drop the session's training clients (freeing their places and memory) and sampling sessions."""
        for model_id in self.sessions.end(session):
            self.models.pop(model_id, None)
            self.ranks.pop(model_id, None)
            await self.call(TinkerDropModel(model_id=model_id))
        for sampler in [s for s in self.sampling if session_of(s) == session]:
            del self.sampling[sampler]

    async def _reap(self) -> None:
        while self.sessions.any_alive:
            await asyncio.sleep(SESSION_TIMEOUT_S / 4)
            for session in self.sessions.expired():
                logger.info("tinker session %s ended: no heartbeat for %.0f s", session, SESSION_TIMEOUT_S)
                await self.end_session(session)

    # -- operations --------------------------------------------------------------------------------------
    def create(self, model_id: str, rank: int, control: ControlRequest, answer: dict) -> dict:
        """A new training client (``create_model``, or ``load_weights`` creating one): its place held, the
        scheduler asked to make it, the answer once it is made; a resent submission gets the first's future.
        The route's reply."""
        if (request_id := self.sessions.creating(model_id)) is not None:
            return {"request_id": request_id, "model_id": model_id}
        request_id = self.reserve(model_id)

        async def create() -> None:
            outcome = await self.on_scheduler(control, answer)
            if outcome.error is None:
                self.models[model_id] = ModelSequence(self.futures)
                self.ranks[model_id] = rank
            else:  # its place is free again
                self.sessions.release(model_id)
            self.futures.resolve(request_id, outcome)

        self.spawn(create())
        return {"request_id": request_id, "model_id": model_id}

    def spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _arrived(self, message: HarliTinkerResult) -> None:
        waiter = self._results.pop(message.request_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(message.outcome)

    async def queued(self, request_id: str, control: ControlRequest) -> Outcome:
        """Send a training operation to the scheduler and wait for its outcome (``HarliTinkerResult``)."""
        waiter = asyncio.get_running_loop().create_future()
        self._results[request_id] = waiter
        refused = await self.call(control)
        if refused is not None:
            self._results.pop(request_id, None)
            return refused
        return await waiter

    async def call(self, control: ControlRequest) -> Outcome | None:
        """A control request; ``None`` when the scheduler took it, else the refusal as an outcome."""
        reply = (await self.control.call(control))[0]
        if reply.status < 300:
            return None
        error = msgspec.json.decode(reply.payload)
        category = "user" if reply.status < 500 else "server"
        return Outcome(error=error.get("error", str(error)), category=category)

    async def on_scheduler(self, control: ControlRequest, answer: dict) -> Outcome:
        """Send ``control`` and answer with ``answer`` once the scheduler took it (its refusal otherwise)."""
        return await self.call(control) or Outcome(body=msgspec.json.encode(answer))
