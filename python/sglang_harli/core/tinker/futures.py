"""The Tinker API's futures, and the order a model's operations run in (engine-free).

Every long Tinker operation answers at once with a ``request_id``; the SDK then polls
``POST /api/v1/retrieve_future`` (45 s client timeout, no pause between polls) until the result is in.
So the server long-polls: ``FutureTable.wait`` holds a poll until the result arrives or ``POLL_S`` has
passed, and the route answers ``{"type": "try_again"}`` in the second case.

The SDK orders *submissions* per model, not completions: it fires ``forward_backward`` and
``optim_step`` back to back, posts the chunks of one ``forward_backward`` concurrently (the first one
last, on purpose), and resends an identical body (same ``seq_id``) when a response was lost or refused
with a retryable status. ``ModelSequence`` therefore runs a model's operations strictly in ``seq_id``
order, holds one that arrives ahead of its predecessor until the gap fills, and answers a repeated
``seq_id`` with the ``request_id`` it first got, never running it twice.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Literal

import msgspec

POLL_S = 30.0
"""How long one ``retrieve_future`` is held before ``try_again``: well under the SDK's 45 s timeout."""
KEEP_FUTURES = 4096
"""Finished futures kept for polling (the oldest forgotten first); a poll for a forgotten one is a 404."""

ErrorCategory = Literal["user", "server", "unknown"]


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    """A finished future: its body and media type (JSON, or protobuf for forward_backward and sample),
    or an error in the protocol's own shape."""

    body: bytes = b""
    media_type: str = "application/json"
    error: str | None = None
    category: ErrorCategory = "server"

    def payload(self) -> tuple[bytes, str]:
        """What the poll answers with."""
        if self.error is not None:
            return msgspec.json.encode({"error": self.error, "category": self.category}), "application/json"
        return self.body, self.media_type


class FutureTable:
    """Every future handed out: pending until ``resolve``; finished ones kept for ``KEEP_FUTURES``."""

    def __init__(self, keep: int = KEEP_FUTURES):
        self._keep = keep
        self._ids = itertools.count(1)
        self._pending: dict[str, asyncio.Future[Outcome]] = {}
        self._done: OrderedDict[str, Outcome] = OrderedDict()

    def create(self) -> str:
        request_id = f"req-{next(self._ids)}-{int(time.time() * 1e3) % 1_000_000:06d}"
        self._pending[request_id] = asyncio.get_running_loop().create_future()
        return request_id

    def resolve(self, request_id: str, outcome: Outcome) -> None:
        future = self._pending.pop(request_id, None)
        if future is not None and not future.done():
            future.set_result(outcome)
        self._done[request_id] = outcome
        while len(self._done) > self._keep:
            self._done.popitem(last=False)

    def known(self, request_id: str) -> bool:
        return request_id in self._pending or request_id in self._done

    async def wait(self, request_id: str, timeout_s: float = POLL_S) -> Outcome | None:
        """The outcome once it is in, or ``None`` after ``timeout_s`` (the poll answers ``try_again``).
        ``KeyError`` for a request id this table never handed out (or has forgotten)."""
        done = self._done.get(request_id)
        if done is not None:
            return done
        future = self._pending[request_id]
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except TimeoutError:
            return None


Operation = Callable[[str], Awaitable[Outcome]]
"""An operation, given the request id its future has; returns its outcome."""


class ModelSequence:
    """One model's operations, run one at a time in ``seq_id`` order, each exactly once."""

    def __init__(self, futures: FutureTable, *, first_seq_id: int = 1):
        self._futures = futures
        self._next = first_seq_id
        self._ids: dict[int, str] = {}  # seq_id -> request_id, for a resent submission
        self._waiting: dict[int, tuple[str, Operation]] = {}
        self._runner: asyncio.Task | None = None

    def submit(self, seq_id: int, operation: Operation) -> str:
        """The request id of operation ``seq_id``: a new one, or the one a resent submission first got."""
        if seq_id in self._ids:
            return self._ids[seq_id]
        if seq_id < self._next:  # run and forgotten long ago: answer with a future that says so
            request_id = self._futures.create()
            error = f"seq_id {seq_id} already ran on this model (next is {self._next})"
            self._futures.resolve(request_id, Outcome(error=error, category="user"))
            return request_id
        request_id = self._futures.create()
        self._ids[seq_id] = request_id
        self._waiting[seq_id] = (request_id, operation)
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        return request_id

    @property
    def next_seq_id(self) -> int:
        return self._next

    async def _run(self) -> None:
        while self._next in self._waiting:
            request_id, operation = self._waiting.pop(self._next)
            try:
                outcome = await operation(request_id)
            except Exception as exc:  # an operation's failure is its future's, never the server's
                outcome = Outcome(error=f"{type(exc).__name__}: {exc}", category="server")
            self._futures.resolve(request_id, outcome)
            self._next += 1
            for old in [s for s in self._ids if s < self._next - 64]:  # resends come soon or not at all
                del self._ids[old]
