"""How long work took on the device that ran it, read without making anyone wait for it.

On CPU the device is the host, so a host clock around the call is the cost. On CUDA a host clock around
a kernel launch measures the launch, not the work: the predictor would learn that finetune units are
nearly free and the policy would over-admit. There the cost is the time between two CUDA events recorded
on the stream the work ran on, read once the device has passed the second one. Nobody synchronises for
it: the caller keeps the ``Timing`` and asks again later (the scheduler reads the units of the previous
token interval when it plans the next one), and ``seconds()`` answers ``None`` until the events are done.

The client-visible token interval is not measured here: it stays wall-clock, as clients measure it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Generic, Protocol, TypeVar


class Timing(Protocol):
    def seconds(self) -> float | None:
        """The work's duration, or ``None`` while the device has not finished it; never blocks."""
        ...


class HostTiming:
    def __init__(self, seconds: float):
        self._seconds = seconds

    def seconds(self) -> float | None:
        return self._seconds


class EventTiming:
    """Two recorded events (``torch.cuda.Event(enable_timing=True)`` or anything with ``query`` and
    ``elapsed_time`` in milliseconds)."""

    def __init__(self, start: Any, end: Any):
        self._start, self._end = start, end

    def seconds(self) -> float | None:
        if not self._end.query():
            return None
        return self._start.elapsed_time(self._end) / 1e3


class Stopwatch(Protocol):
    def start(self) -> Any: ...

    def stop(self, started: Any) -> Timing: ...


class HostStopwatch:
    """The device is the host: a monotonic host clock."""

    def start(self) -> float:
        return time.perf_counter()

    def stop(self, started: float) -> Timing:
        return HostTiming(time.perf_counter() - started)


class EventStopwatch:
    """Events recorded on the stream current at ``start``/``stop`` (a unit's side stream inside its SM
    partition, or the decode forward's stream). ``event`` makes one timing-enabled event."""

    def __init__(self, event: Callable[[], Any]):
        self._event = event

    def start(self) -> Any:
        event = self._event()
        event.record()
        return event

    def stop(self, started: Any) -> Timing:
        end = self._event()
        end.record()
        return EventTiming(started, end)


def stopwatch(device: Any) -> Stopwatch:
    """Events on a CUDA device, the host clock anywhere else."""
    if str(device).startswith("cuda"):
        import torch

        return EventStopwatch(lambda: torch.cuda.Event(enable_timing=True))
    return HostStopwatch()


T = TypeVar("T")


class PendingTimings(Generic[T]):
    """Timings not read yet, each with what it measured, in the order they were taken."""

    def __init__(self, limit: int = 4096):
        self._pending: deque[tuple[T, Timing]] = deque()
        self._limit = limit

    def add(self, what: T, timing: Timing) -> None:
        self._pending.append((what, timing))
        while len(self._pending) > self._limit:  # never read (a stuck device): forget the oldest
            self._pending.popleft()

    def ready(self) -> Iterator[tuple[T, float]]:
        """Every timing the device has finished, oldest first, stopping at the first still running
        (work on one stream finishes in order)."""
        while self._pending:
            what, timing = self._pending[0]
            seconds = timing.seconds()
            if seconds is None:
                return
            self._pending.popleft()
            yield what, seconds

    def __len__(self) -> int:
        return len(self._pending)
