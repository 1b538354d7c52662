"""What the co-location loop reports (``/harli/stats``, ``/metrics``, the benchmarks), kept as events come.

``_Tally`` holds the token intervals, decision times and unit run times of the stats window, the latest
steps, and token and busy-time rates over the rate window; ``CoLocationStats`` is its snapshot, with the
policy's, the predictor's, the TPOT ledger's and the prefill side's own.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec
import numpy as np

from sglang_harli.core.colocation.predictor import PredictorStats
from sglang_harli.core.colocation.prefill import PrefillStats
from sglang_harli.core.colocation.qos import PolicyStats
from sglang_harli.core.colocation.tpot import LatencySummary, TpotSummary

if TYPE_CHECKING:
    from sglang_harli.core.colocation.loop import CoLocation


class StepRecord(msgspec.Struct, array_like=True):
    """One token interval: [time, batch, predicted ms, observed ms, units, split]."""

    at_s: float
    batch_size: int
    predicted_ms: float | None
    observed_ms: float
    units: int
    split: str


class IntervalSummary(LatencySummary, kw_only=True):
    """Token intervals over the stats window: what streaming clients experience between two tokens."""


class CoLocationStats(msgspec.Struct, kw_only=True):
    policy: PolicyStats
    predictor: PredictorStats
    token_intervals: IntervalSummary
    requests: TpotSummary
    """Per-request TPOT of finished requests (``sglang.bench_serving``'s definition) and its attainment."""
    slo_metric: str
    """What the policy holds the SLO on: ``tpot`` (per request) or ``itl`` (per token interval)."""
    itl_cap_ms: float | None
    """The cap on any one token interval the policy holds with ``tpot`` (``None``: off)."""
    prefill: PrefillStats
    """Time to first token, prefill cost and load (``core.colocation.prefill``)."""
    decode_tokens_per_s: float
    finetune_tokens_per_s: float
    """Tokens of micro-batches completed per second, over the rate window."""
    finetune_busy_fraction: float
    """Share of the rate window spent running finetune units."""
    decode_busy_fraction: float
    """Share of the rate window spent in decode forwards (what a fleet's placement leaves to decode)."""
    unit_ms: dict[str, float | None]
    """Run time of recent finetune units (p50/p99)."""
    decision_us: dict[str, float | None]
    """How long the policy took to decide (p50/p99): the only delay Harli adds before a decode launch."""
    recent_steps: list[StepRecord]


class _Rate:
    """Events summed over a sliding time window."""

    def __init__(self, window_s: float, clock: Callable[[], float]):
        self.window_s, self.clock = window_s, clock
        self.started = clock()
        self._events: deque[tuple[float, float]] = deque()
        self._sum = 0.0

    def add(self, amount: float) -> None:
        self._events.append((self.clock(), amount))
        self._sum += amount

    def per_s(self) -> float:
        now = self.clock()
        while self._events and self._events[0][0] < now - self.window_s:
            self._sum -= self._events.popleft()[1]
        span = min(self.window_s, now - self.started)
        return self._sum / span if span > 0 else 0.0


class _Tally:
    """What ``CoLocation.snapshot`` reports, kept as the events come: the token intervals, decision times
    and unit run times of the stats window, the latest steps, and token and busy-time rates over the rate
    window."""

    def __init__(self, window: int, rate_window_s: float, recent: int, clock: Callable[[], float]):
        self.intervals: deque[float] = deque(maxlen=window)
        self.decisions: deque[float] = deque(maxlen=window)
        self.units: deque[float] = deque(maxlen=window)
        self.recent: deque[StepRecord] = deque(maxlen=recent)
        self.decode_tokens = _Rate(rate_window_s, clock)
        self.finetune_tokens = _Rate(rate_window_s, clock)
        self.finetune_busy = _Rate(rate_window_s, clock)
        self.decode_busy = _Rate(rate_window_s, clock)

    def stats(self, colocation: CoLocation) -> CoLocationStats:
        cap = colocation.itl_cap_s
        return CoLocationStats(
            policy=colocation.policy.snapshot(),
            predictor=colocation.predictor.snapshot(),
            token_intervals=IntervalSummary.of(self.intervals, colocation.slo_s),
            requests=colocation.requests.summary(),
            slo_metric=colocation.slo_metric,
            itl_cap_ms=None if cap is None else cap * 1e3,
            prefill=colocation.prefills.snapshot(),
            decode_tokens_per_s=self.decode_tokens.per_s(),
            finetune_tokens_per_s=self.finetune_tokens.per_s(),
            finetune_busy_fraction=min(self.finetune_busy.per_s(), 1.0),
            decode_busy_fraction=min(self.decode_busy.per_s(), 1.0),
            unit_ms=_p50_p99(self.units, 1e3),
            decision_us=_p50_p99(self.decisions, 1e6),
            recent_steps=list(self.recent),
        )


def _p50_p99(values: deque[float], scale: float) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None}
    p50, p99 = np.percentile(np.fromiter(values, dtype=np.float64) * scale, [50, 99])
    return {"p50": float(p50), "p99": float(p99)}
