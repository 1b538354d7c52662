"""QoS policies: per decode step, how much finetune work to admit into the slack decode leaves.

A policy sees the next decode step (``DecodeShape``, or ``None`` when there is no decode work) and the
trainer's coming units (``FinetuneWork``), and answers with an ``Admission``: how many of those units to
run before that step, in which SM split. After the token interval completes, it is told what the interval
cost. The same objects run in the server's scheduler, in the GPU benchmark and in the trace simulator,
so what the benchmark measures is the policy that serves.

``HarliPolicy`` admits the longest prefix of units whose predicted co-run interval stays within a budget.
How the budget is set depends on what the SLO is held on (``--harli-slo-metric``):

- ``tpot`` (per request, ``core.colocation.tpot``): the smallest slack any request in the batch has banked
  (of it, what lies beyond a reserve of one SLO kept for the tokens still to come, ``BANKED_RESERVE``, and
  never less than one SLO while that much is there), less a margin kept for what the tokens still to come
  may cost beyond prediction (a prefill landing in a later interval, a step slower than predicted), and
  never past ``--harli-max-itl-ms`` (by default twice the SLO).
  The margin adapts as the ``itl`` one below, per interval, with the slack the budget was cut from in
  place of the SLO (an interval longer than that put its tightest request behind), and on finished
  requests too: each one over the SLO widens it by a larger step, since requests finish tens of times
  less often than intervals close. A cap on the interval has a margin of its own, adapted per interval
  against the cap.
- ``itl`` (per token interval): the SLO minus a safety margin. The margin tracks the SLO percentile by
  stochastic approximation: each violation widens it by ``step * (1 - r)`` of the SLO, each interval that
  holds narrows it by ``step * r``, so it settles where a fraction ``r`` of intervals violate, and it
  widens at once after a burst of violations. Each interval weighs as much as the tokens that waited
  through it (its batch, relative to the recent mean), so ``r`` is a share of tokens, as clients measure
  TPOT. ``r`` is half the violation rate the SLO allows (0.5% for p99): aiming exactly at the percentile
  would miss it in about half of all measurement windows, since the count of violations in a window is
  itself random. Intervals without finetune work count too: the percentile is over every token interval,
  so the violations decode causes on its own (a long prefill) leave training only what remains of the
  budget, and when decode alone uses all of it the margin grows to the whole SLO and ``harli`` trains only
  when idle.

On a server that also prefills, the budget leaves room for the prefills that may land in the interval
(``core.colocation.prefill.PrefillOutlook``): per-request TPOT's ``budget / (1 + rho)``, ``rho`` being the
share of time prefills are expected to take; a percentile of intervals (the cap, ``itl``) keeps a whole
mean prefill free where an arrival is likelier than the violations it allows.

The baselines, kept here so they run in the same server, are ``idle-only`` (train only with no decode
work), ``naive`` (a whole micro-batch after every step, no latency control) and ``static`` (a fixed number
of units per step, tuned offline, which is how token-budget co-serving systems behave).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, get_args

import msgspec

from sglang_harli.core.colocation.predictor import DecodeShape, LatencyPredictor
from sglang_harli.core.colocation.prefill import NO_PREFILLS, PrefillOutlook
from sglang_harli.core.colocation.work import SHARED, FinetuneWork, micro_batch_prefix
from sglang_harli.core.config import PolicyName, SloMetric

POLICY_NAMES: tuple[PolicyName, ...] = get_args(PolicyName)


class Admission(msgspec.Struct, kw_only=True):
    units: int
    """How many of the offered units to run before the next decode step."""
    split: str = SHARED
    """The SM split the units run in (``shared`` where there are no partitions)."""
    predicted_s: float | None = None
    """Predicted token interval with this work admitted (``None`` when the policy does not predict)."""
    budget_s: float | None = None
    """The interval the policy aimed to stay within; with no decode work, a time slice for training."""
    slack_s: float | None = None
    """With ``tpot``: the smallest slack in the batch the budget was cut from (``core.colocation.tpot``)."""
    work: tuple[FinetuneWork, ...] = ()
    """The admitted units themselves."""


class PolicyStats(msgspec.Struct, kw_only=True):
    name: str
    decisions: int
    admitted_units: int
    """Units admitted alongside decode steps (idle-time units are not counted)."""
    steps_with_work: int
    violations_with_work: int
    """Token intervals that carried finetune work and exceeded the SLO."""
    margin_ms: float | None


class QosPolicy(Protocol):
    name: str

    def admit(
        self,
        decode: DecodeShape | None,
        upcoming: Sequence[FinetuneWork],
        *,
        slack_s: float | None = None,
        prefills: PrefillOutlook = NO_PREFILLS,
    ) -> Admission: ...

    def observe(self, admission: Admission, interval_s: float, *, tokens: int = 1) -> None: ...

    def observe_request(self, tpot_s: float) -> None: ...

    def snapshot(self) -> PolicyStats: ...


class _Policy:
    """Shared bookkeeping; with no decode work every policy trains flat out for ``idle_budget_s``."""

    name: str = ""

    def __init__(self, *, slo_s: float, idle_budget_s: float):
        self.slo_s = slo_s
        self.idle_budget_s = idle_budget_s
        self.decisions = 0
        self.admitted_units = 0
        self.steps_with_work = 0
        self.violations_with_work = 0
        self.prefills = NO_PREFILLS  # of the decision being made

    def admit(
        self,
        decode: DecodeShape | None,
        upcoming: Sequence[FinetuneWork],
        *,
        slack_s: float | None = None,
        prefills: PrefillOutlook = NO_PREFILLS,
    ) -> Admission:
        """``slack_s``: the smallest per-request slack in the next step's batch (``core.colocation.tpot``),
        where the engine tracks it; only a policy holding per-request TPOT reads it. ``prefills``: the
        prefills that may land in the interval (``core.colocation.prefill``); only ``harli`` plans with
        them."""
        if decode is None:
            return Admission(units=len(upcoming), budget_s=self.idle_budget_s, work=tuple(upcoming))
        self.prefills = prefills
        admission = self._admit_with_decode(decode, upcoming, slack_s)
        self.decisions += 1
        self.admitted_units += admission.units
        return admission

    def _admit_with_decode(
        self, decode: DecodeShape, upcoming: Sequence[FinetuneWork], slack_s: float | None
    ) -> Admission:
        raise NotImplementedError

    def observe_request(self, tpot_s: float) -> None:
        """A request finished with this TPOT (``core.colocation.tpot``); the baselines do not listen."""

    def observe(self, admission: Admission, interval_s: float, *, tokens: int = 1) -> None:
        """The interval that ``admission`` landed in took ``interval_s``; ``tokens`` requests waited
        through it (the batch of the decode step that closed it)."""
        if admission.units:
            self.steps_with_work += 1
            self.violations_with_work += interval_s > self.slo_s

    def _margin_ms(self) -> float | None:
        return None

    def snapshot(self) -> PolicyStats:
        return PolicyStats(
            name=self.name,
            decisions=self.decisions,
            admitted_units=self.admitted_units,
            steps_with_work=self.steps_with_work,
            violations_with_work=self.violations_with_work,
            margin_ms=self._margin_ms(),
        )


TARGET_SHARE = 0.5
"""Of the violations the SLO percentile allows, the share the margin aims for."""
TOKENS_SMOOTHING = 0.01
"""Per interval, how fast the mean batch that weighs each interval's vote follows the load."""
MAX_WEIGHT = 8.0
"""One interval of a large batch after a quiet spell moves the margin at most this many steps."""
BANKED_RESERVE = 1.0
"""With ``tpot``, the slack (in SLOs) a request keeps banked for the tokens still to come: finetune work
spends only what a request banked beyond one SLO plus this. Decode itself may later need it (a burst of
arrivals makes every step slower, a prefill lands in an interval), and a request that had spent all of
it on finetune work would then finish over the SLO with no later token to win the overrun back."""
REQUEST_MARGIN_STEP = 0.1
"""Per finished request, the share of the SLO the ``tpot`` margin moves by (times ``1 - r`` or ``r``):
requests finish tens of times less often than intervals close, so each one moves it further."""


class HarliPolicy(_Policy):
    name = "harli"

    def __init__(
        self,
        predictor: LatencyPredictor,
        *,
        slo_s: float,
        idle_budget_s: float,
        percentile: float = 99.0,
        splits: Sequence[str] = (SHARED,),
        metric: SloMetric = "tpot",
        max_itl_s: float | None = None,
        initial_margin: float = 0.05,
        margin_step: float = 0.05,
        max_margin: float = 1.0,
    ):
        super().__init__(slo_s=slo_s, idle_budget_s=idle_budget_s)
        self.predictor = predictor
        self.splits = tuple(splits)
        self.metric, self.max_itl_s = metric, max_itl_s
        self.target_violation_rate = (1 - percentile / 100) * TARGET_SHARE
        # itl: the margin under the SLO, per interval. tpot: the reserve kept from the smallest slack,
        # per request; the interval cap, if any, has its own margin (per interval, against the cap).
        self.margin_s = initial_margin * slo_s
        self.margin_step_s = margin_step * slo_s
        self.max_margin_s = max_margin * slo_s
        self.request_margin_step_s = REQUEST_MARGIN_STEP * slo_s
        self.cap_margin_s = 0.0 if max_itl_s is None else initial_margin * max_itl_s
        self._mean_tokens: float | None = None

    @property
    def budget_s(self) -> float:
        """The budget of an interval whose requests banked no slack (``itl``: every interval's)."""
        return self.budget_for(None)

    def budget_for(self, slack_s: float | None) -> float:
        """The interval the admitted work must fit in, given the smallest slack in the batch and the
        prefills that may land in it (``self.prefills``, from ``admit``)."""
        prefills, rate = self.prefills, self.target_violation_rate
        if self.metric == "itl":
            limit = self.slo_s - self.margin_s
            return min(limit / (1 + prefills.load), limit - prefills.reserve_s(self.slo_s, rate))
        slack = self.slo_s if slack_s is None else slack_s
        # never more than the SLO while no request has banked more than the reserve beyond it; never
        # more than the slack there is
        spendable = max(min(slack, self.slo_s), slack - BANKED_RESERVE * self.slo_s)
        budget = (spendable - self.margin_s) / (1 + prefills.load)
        if self.max_itl_s is not None:
            reserve = prefills.reserve_s(self.max_itl_s, rate)
            budget = min(budget, self.max_itl_s - self.cap_margin_s - reserve)
        return budget

    def _admit_with_decode(
        self, decode: DecodeShape, upcoming: Sequence[FinetuneWork], slack_s: float | None
    ) -> Admission:
        budget = self.budget_for(slack_s)
        slack_s = slack_s if self.metric == "tpot" else None
        solo = self.predictor.solo(decode)
        if solo is None:
            return Admission(units=0, budget_s=budget, slack_s=slack_s)
        predicted = self.predictor.interval(solo, 0.0)
        best = Admission(units=0, budget_s=budget, predicted_s=predicted, slack_s=slack_s)
        for split in self.splits:
            work_s = self._cumulative_work(upcoming, split)
            units, predicted = self._longest_prefix(solo, work_s, split, budget)
            if units > best.units:
                best = Admission(
                    units=units,
                    split=split,
                    predicted_s=predicted,
                    budget_s=budget,
                    slack_s=slack_s,
                    work=tuple(upcoming[:units]),
                )
        return best

    def _cumulative_work(self, upcoming: Sequence[FinetuneWork], split: str) -> list[float]:
        """Predicted run time of each prefix on ``split``, up to the first unit with no cost estimate."""
        known: dict[FinetuneWork, float | None] = {}  # a plan repeats a handful of distinct units
        total, cumulative = 0.0, []
        for work in upcoming:
            if work not in known:
                known[work] = self.predictor.unit_seconds(work, split)
            if known[work] is None:
                break
            total += known[work]
            cumulative.append(total)
        return cumulative

    def _longest_prefix(self, solo, work_s, split, budget) -> tuple[int, float | None]:
        """Predicted latency grows with every unit added, so the admissible prefixes form a range."""
        low, high, predicted = 0, len(work_s), None
        while low < high:
            middle = (low + high + 1) // 2
            latency = self.predictor.interval(solo, work_s[middle - 1], split)
            if latency <= budget:
                low, predicted = middle, latency
            else:
                high = middle - 1
        return low, predicted

    def observe(self, admission: Admission, interval_s: float, *, tokens: int = 1) -> None:
        super().observe(admission, interval_s, tokens=tokens)
        limit = self.slo_s
        if self.metric == "tpot":
            if self.max_itl_s is not None:
                over_cap = 1.0 if interval_s > self.max_itl_s else 0.0
                self.cap_margin_s += self.margin_step_s * (over_cap - self.target_violation_rate)
                self.cap_margin_s = min(max(self.cap_margin_s, 0.0), self.max_itl_s)
            # An interval past the slack it was budgeted from put the batch's tightest request behind.
            if admission.slack_s is not None:
                limit = admission.slack_s
        # Every interval counts, with work or without: the SLO percentile is over all of them, so when
        # decode alone already uses part of the violation budget, training gets only the rest of it.
        # Each counts by the tokens that waited through it, relative to the recent mean: clients measure
        # TPOT per token, and violations cluster in bursts, where batches are large.
        tokens = max(tokens, 1)
        if self._mean_tokens is None:
            self._mean_tokens = float(tokens)
        self._mean_tokens += TOKENS_SMOOTHING * (tokens - self._mean_tokens)
        weight = min(tokens / self._mean_tokens, MAX_WEIGHT)
        violated = 1.0 if interval_s > limit else 0.0
        self.margin_s += self.margin_step_s * weight * (violated - self.target_violation_rate)
        self.margin_s = min(max(self.margin_s, 0.0), self.max_margin_s)

    def observe_request(self, tpot_s: float) -> None:
        """A request finished: with ``tpot``, its TPOT against the SLO moves the margin too (requests,
        not tokens, are what per-request attainment counts, so each weighs the same)."""
        if self.metric != "tpot":
            return
        violated = 1.0 if tpot_s > self.slo_s else 0.0
        self.margin_s += self.request_margin_step_s * (violated - self.target_violation_rate)
        self.margin_s = min(max(self.margin_s, 0.0), self.max_margin_s)

    def _margin_ms(self) -> float | None:
        return self.margin_s * 1e3


class IdleOnlyPolicy(_Policy):
    name = "idle-only"

    def _admit_with_decode(self, decode, upcoming, slack_s) -> Admission:
        return Admission(units=0)


class NaivePolicy(_Policy):
    name = "naive"

    def _admit_with_decode(self, decode, upcoming, slack_s) -> Admission:
        units = micro_batch_prefix(upcoming)
        return Admission(units=units, work=tuple(upcoming[:units]))


class StaticPolicy(_Policy):
    name = "static"

    def __init__(self, *, units_per_step: int, slo_s: float, idle_budget_s: float):
        super().__init__(slo_s=slo_s, idle_budget_s=idle_budget_s)
        self.units_per_step = units_per_step

    def _admit_with_decode(self, decode, upcoming, slack_s) -> Admission:
        units = min(self.units_per_step, len(upcoming))
        return Admission(units=units, work=tuple(upcoming[:units]))


def make_policy(
    name: PolicyName,
    predictor: LatencyPredictor,
    *,
    slo_s: float,
    idle_budget_s: float,
    percentile: float = 99.0,
    static_units: int = 2,
    splits: Sequence[str] = (SHARED,),
    metric: SloMetric = "tpot",
    max_itl_s: float | None = None,
) -> QosPolicy:
    if name == "harli":
        return HarliPolicy(
            predictor, slo_s=slo_s, idle_budget_s=idle_budget_s, percentile=percentile, splits=splits,
            metric=metric, max_itl_s=max_itl_s,
        )  # fmt: skip
    if name == "idle-only":
        return IdleOnlyPolicy(slo_s=slo_s, idle_budget_s=idle_budget_s)
    if name == "naive":
        return NaivePolicy(slo_s=slo_s, idle_budget_s=idle_budget_s)
    if name == "static":
        return StaticPolicy(units_per_step=static_units, slo_s=slo_s, idle_budget_s=idle_budget_s)
    if name == "fixed-split":
        return FixedSplitPolicy(
            split=splits[-1], units_per_step=static_units, slo_s=slo_s, idle_budget_s=idle_budget_s
        )
    raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICY_NAMES)}")


class FixedSplitPolicy(_Policy):
    """MPS-style spatial sharing: ``units_per_step`` units after every decode step, always in the same SM
    split, without a predictor; like ``static``, tuned offline (the benchmarks tune split and units so
    the SLO holds at the trace's peak). ``make_policy`` gives it the menu's last split, the one with the
    most SMs for finetuning (``shared``, where there are no partitions, makes it ``static``); a benchmark
    may pin another by setting ``split``."""

    name = "fixed-split"

    def __init__(self, *, split: str, units_per_step: int, slo_s: float, idle_budget_s: float):
        super().__init__(slo_s=slo_s, idle_budget_s=idle_budget_s)
        self.split = split
        self.units_per_step = units_per_step

    def _admit_with_decode(self, decode, upcoming, slack_s) -> Admission:
        units = min(self.units_per_step, len(upcoming))
        return Admission(units=units, split=self.split, work=tuple(upcoming[:units]))
