"""``WorkSource``: one source of finetune units, as the unit runner sees it.

A finetune job and a Tinker training client train different things in different orders, but the runner
needs the same four things of each: whether it has work at all (``pending``), whether it can run a unit
now (``ready``), its coming units for the QoS policy to plan on (``upcoming``), and to run one
(``run_one``); a unit that raises fails what it belongs to (``fail``): the job, or the client's request.

A source runs its unit inside the ``UnitMeter`` the runner hands it, around exactly the computation whose
time the latency predictor should learn: what comes before (borrowing memory for a micro-batch) and after
(progress, checkpoints, publishing) stays outside, on the host's time, as it is no part of a unit's cost.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import ClassVar

from sglang_harli.core.colocation.work import FinetuneWork


class UnitRun:
    """What a source reports of the unit it ran: the tokens of a micro-batch the unit finished, if any."""

    __slots__ = ("tokens",)

    def __init__(self) -> None:
        self.tokens = 0


class UnitMeter:
    """The runner's side of a unit: ``with meter.unit(work) as run:`` runs the body on the plan's split and
    times it; once the body is done, ``on_unit(work, timing, tokens)`` tells the runner. A body that raises
    is not counted."""

    def __init__(self, enter: Callable[[], contextlib.AbstractContextManager], stopwatch, on_unit):
        self._enter, self._stopwatch, self._on_unit = enter, stopwatch, on_unit

    @contextlib.contextmanager
    def unit(self, work: FinetuneWork) -> Iterator[UnitRun]:
        run = UnitRun()
        with self._enter():  # the unit's events go on its own stream, in its partition
            started = self._stopwatch.start()
            yield run
            timing = self._stopwatch.stop(started)
        self._on_unit(work, timing, run.tokens)


class WorkSource(ABC):
    interactive: ClassVar[bool] = False
    """A client waits on each answer (the Tinker API): its units go before a batch job's."""

    name: str
    """How logs and metrics name it."""

    @property
    @abstractmethod
    def pending(self) -> bool:
        """Work to do now or soon: a job until it lets go, a Tinker client while requests are queued."""

    @abstractmethod
    def ready(self) -> bool:
        """Whether it can run a unit now. A source may catch up on its own state here (a job trained on
        several instances takes in its group's average)."""

    @abstractmethod
    def upcoming(self) -> list[FinetuneWork]:
        """The coming units, for the policy to plan on (a few micro-batches' worth); a pure query."""

    @abstractmethod
    def run_one(self, meter: UnitMeter) -> bool:
        """Run its next unit inside ``meter.unit``; False when none ran (it must wait, e.g. for memory)."""

    @abstractmethod
    def fail(self, exc: Exception) -> None:
        """A unit (or planning it) raised ``exc``: fail what the unit belongs to, never the scheduler."""
