"""The unit runner: where finetune work meets a place in the scheduler's loop.

At each place (after a batch's results, or when the loop is idle) the runner starts a queued job if one
may start (``JobStarter``), asks the scheduling object which source goes next (``SourceOrder``), offers
the policy that source's coming units (``CoLocation.admit``), and runs the resulting ``core.colocation.plan``
plan: a counted prefix beside a decode step, or units for an idle slice, polling for arriving requests
before each unit. Every unit's run time goes to the co-location loop (and so to the latency predictor),
read once the device has measured it: at once on CPU, one token interval later on CUDA, never by waiting.

With ``--tp-size N`` every rank runs the same units: rank 0 decides (it alone sees the request socket,
and the ranks' clocks differ) and ``Agreement`` hands its decisions to the others.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sglang_harli.core.colocation.loop import CoLocation
from sglang_harli.core.colocation.partition import Partitioner, SMSplit
from sglang_harli.core.colocation.plan import BesideDecode, IdleSlice, Slot, WorkPlan
from sglang_harli.core.colocation.timing import PendingTimings, Stopwatch, Timing
from sglang_harli.core.colocation.work import FinetuneWork
from sglang_harli.core.jobs.source import JobStarter
from sglang_harli.core.runner.host import Agreement
from sglang_harli.core.runner.order import SourceOrder
from sglang_harli.core.runner.source import UnitMeter

logger = logging.getLogger(__name__)


class UnitRunner:
    def __init__(
        self,
        order: SourceOrder,
        jobs: JobStarter,
        *,
        colocation: CoLocation,
        partitioner: Partitioner,
        stopwatch: Stopwatch,
        agreement: Agreement,
        metrics=None,
    ):
        self.order, self.jobs, self.colocation = order, jobs, colocation
        self.partitioner, self.stopwatch, self.agreement, self.metrics = (
            partitioner,
            stopwatch,
            agreement,
            metrics,
        )
        self._costs: PendingTimings[tuple[FinetuneWork, str]] = PendingTimings()

    @property
    def has_work(self) -> bool:
        return self.order.pending or self.jobs.queued

    def train(self, place: Callable[[], Slot | None], *, should_yield: Callable[[], bool]) -> None:
        """Use one place in the loop for finetune work: ``place()`` says where (``None``: not here, the
        next forward is a prefill); a queued job starts if it may, and the policy's plan runs."""
        started, plan = False, None
        if self.agreement.leader:
            slot = place()
            if slot is not None:
                started = self.jobs.start_due(may_start=slot.may_start)
                plan = self._plan(slot)
        if self.agreement.group is not None:
            started, plan = self.agreement.agree_plan(started, plan, self.partitioner.splits)
            if started and not self.agreement.leader and self.jobs.active is None:
                self.jobs.start_next()
        if plan is None:
            return
        ran = self.run(plan, should_yield=should_yield)
        if ran and isinstance(plan, BesideDecode) and self.agreement.group is None and should_yield():
            self.colocation.arrival_during_work()

    def _plan(self, slot: Slot) -> WorkPlan | None:
        started = time.perf_counter()
        self.read_costs()  # the previous interval's units, if the device has finished them
        upcoming = self.upcoming()
        if not upcoming:
            return None
        admission = self.colocation.admit(slot.next_decode, upcoming, started=started)
        split = self.partitioner.split(admission.split)
        if slot.next_decode is None:
            return IdleSlice(budget_s=admission.budget_s, split=split)
        return BesideDecode(units=admission.units, split=split)

    def upcoming(self) -> list[FinetuneWork]:
        """The coming units of the source that runs next, for the policy to plan on."""
        source = self.order.next()
        if source is None:
            return []
        try:
            return source.upcoming()
        except (
            Exception
        ) as exc:  # planning is the source's code too: it fails the source, never the scheduler
            source.fail(exc)
            return []

    def run(self, plan: WorkPlan, *, should_yield: Callable[[], bool]) -> int:
        """Run ``plan``: its units beside decode, or units for its idle slice; stop early as soon as
        ``should_yield()`` says a request arrived. Returns the units run."""
        idle = isinstance(plan, IdleSlice)
        deadline = time.perf_counter() + plan.budget_s if idle else None
        done = 0
        while self.order.pending and (idle or done < plan.units):
            stop = should_yield() or (deadline is not None and time.perf_counter() >= deadline)
            if self.agreement.flag(stop) or not self._run_one(plan.split, plan.label):
                break
            done += 1
        return done

    def _run_one(self, split: SMSplit, label: str) -> bool:
        """One unit of the source that goes next; False when none ran (none is ready, one must wait, or
        the unit failed what it belongs to)."""
        source = self.order.next()
        if source is None:
            return False
        meter = UnitMeter(
            lambda: self.partitioner.finetune(split),
            self.stopwatch,
            lambda work, timing, tokens: self._unit_ran(work, split, label, timing, tokens),
        )
        try:
            return source.run_one(meter)
        except Exception as exc:  # a failing source must not take decode down with it
            source.fail(exc)
            return False

    def _unit_ran(self, work: FinetuneWork, split: SMSplit, label: str, timing: Timing, tokens: int) -> None:
        """Tell the co-location loop and metrics that a unit ran (with the tokens of the micro-batch it
        finished, if it finished one); its cost follows when the device has measured it."""
        self.colocation.unit_ran(micro_batch_tokens=tokens)
        self._costs.add((work, split.name), timing)
        self.read_costs()
        if self.metrics is not None:
            self.metrics.unit(label, tokens)

    def read_costs(self) -> None:
        """Hand the co-location loop (and so the predictor) every unit cost the device has finished."""
        for (work, split), seconds in self._costs.ready():
            self.colocation.unit_cost(work, seconds, split=split)
