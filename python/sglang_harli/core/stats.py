"""``/harli/stats``: its typed body, and the decode step bookkeeping at its top.

``HarliStats`` is the whole reply, field by field, so the OpenAPI document describes it (``srt.openapi``):
the decode step counters (``StepRecorder``, kept apart from the scheduler so they can be tested without a
server), the finetune side (``FinetuneStats``: jobs, profile, partitions, lent memory) and the co-location
loop (``core.colocation.CoLocationStats``: policy, predictor, token intervals).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Literal

import msgspec
import numpy as np

from sglang_harli.core.colocation import CoLocationStats
from sglang_harli.core.config import HarliConfig
from sglang_harli.core.fleet import FleetStats
from sglang_harli.core.memory import MemoryStats
from sglang_harli.core.work import WorkKind


class LatencySummary(msgspec.Struct, kw_only=True):
    count: int
    mean_ms: float | None
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    slo_attainment: float | None
    """Fraction of the window's steps that finished within the TPOT SLO."""


class StepStats(msgspec.Struct, kw_only=True):
    """Decode and prefill steps since start, and the recent decode step latencies."""

    uptime_s: float
    decode_steps: int
    decode_tokens: int
    prefill_steps: int
    prefill_tokens: int
    prefills_deferred: int
    """Prefills run one decode step late because their request arrived while finetune work was running
    in the running requests' token interval: decode first, so that interval stays within the SLO."""
    forward_s: float
    """Seconds spent in forward passes (decode and prefill): the time decode itself needs."""
    decode_step_latency: LatencySummary
    config: HarliConfig


class StepRecorder:
    """Counts decode and prefill steps and keeps a sliding window of decode step wall times."""

    def __init__(self, config: HarliConfig):
        self.config = config
        self.started = time.monotonic()
        self.decode_steps = 0
        self.decode_tokens = 0
        self.prefill_steps = 0
        self.prefill_tokens = 0
        self.prefills_deferred = 0
        self.forward_s = 0.0
        self._decode_latencies: deque[float] = deque(maxlen=config.stats_window)

    def record_decode(self, latency_s: float, batch_size: int) -> None:
        self.decode_steps += 1
        self.decode_tokens += batch_size
        self._decode_latencies.append(latency_s)

    def record_forward(self, seconds: float) -> None:
        self.forward_s += seconds

    def record_prefill(self, num_tokens: int) -> None:
        self.prefill_steps += 1
        self.prefill_tokens += num_tokens

    def record_deferred_prefill(self) -> None:
        self.prefills_deferred += 1

    def summary(self) -> LatencySummary:
        if not self._decode_latencies:
            return LatencySummary(
                count=0, mean_ms=None, p50_ms=None, p99_ms=None, max_ms=None, slo_attainment=None
            )
        ms = np.fromiter(self._decode_latencies, dtype=np.float64) * 1e3
        p50, p99 = np.percentile(ms, [50, 99])
        return LatencySummary(
            count=int(ms.size),
            mean_ms=float(ms.mean()),
            p50_ms=float(p50),
            p99_ms=float(p99),
            max_ms=float(ms.max()),
            slo_attainment=float(np.mean(ms <= self.config.tpot_slo_ms)),
        )

    def snapshot(self) -> StepStats:
        return StepStats(
            uptime_s=time.monotonic() - self.started,
            decode_steps=self.decode_steps,
            decode_tokens=self.decode_tokens,
            prefill_steps=self.prefill_steps,
            prefill_tokens=self.prefill_tokens,
            prefills_deferred=self.prefills_deferred,
            forward_s=self.forward_s,
            decode_step_latency=self.summary(),
            config=self.config,
        )


class LendingStats(msgspec.Struct, kw_only=True):
    enabled: bool
    reason: str | None
    """Why lending is off, when it is."""
    pool_tokens: int
    free_tokens: int
    """Free for decode now (SGLang's available size); lent tokens are not among them."""
    cached_tokens: int
    """Held by the prefix cache and evictable on demand."""
    lent_tokens: int
    reserve_tokens: int
    bytes_per_token: int
    """KV bytes one lent token gives (all layers, K and V)."""
    reclaims: int
    last_reclaim_ms: float
    reclaim_ms_total: float
    spilled_micro_batches: int
    replayed_micro_batches: int
    waits: int
    """Times training was held back because the pool could not lend enough under the budget."""
    poison_violations: int
    lent_allocations: int
    """With --harli-kv-poison: allocations that returned a lent page; always 0 unless something is wrong."""
    activations: MemoryStats


class ProfileStats(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The start-up profile of finetune unit costs (``srt.profiling``)."""

    state: Literal["not run", "skipped", "cached", "profiled", "failed"]
    path: str | None = None
    """The predictor cache entry read or written."""
    seconds: float | None = None
    units: int | None = None
    """Units timed (the first micro-batch only warms caches up)."""
    kinds: list[WorkKind] | None = None
    """The kinds of unit that got a cost."""
    error: str | None = None


class FinetuneStats(msgspec.Struct, kw_only=True):
    jobs: dict[str, int]
    """How many jobs are in each state."""
    training: str | None
    """The job training now."""
    base_weights: dict[str, int] | None
    """How the running job's frozen base reached the served weights: views shared, copies made."""
    output_dir: str
    state_dir: str | None
    profile: ProfileStats
    partitions: dict[str, Any]
    """The SM split menu and whether partitions fence finetune on this device (``core.partition``)."""
    memory: LendingStats
    """KV pages lent to the trainer (``srt.lending``)."""


class HarliStats(StepStats, kw_only=True):
    """The body of ``GET /harli/stats``."""

    finetune: FinetuneStats
    colocation: CoLocationStats
    fleet: FleetStats | None = None
    """With --harli-peers: the peers, alive or not, and the adapter versions exchanged (``core.fleet``)."""
