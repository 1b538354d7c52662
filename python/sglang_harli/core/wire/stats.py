"""``/harli/stats``: its typed body, and the decode step bookkeeping at its top.

``HarliStats`` is the whole reply, field by field, so the OpenAPI document describes it (``srt.openapi``):
the decode step counters (``StepRecorder``, kept apart from the scheduler so they can be tested without a
server), the finetune side (``FinetuneStats``: jobs, profile, partitions, lent memory) and the co-location
loop (``core.colocation.loop.CoLocationStats``: policy, predictor, token intervals).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from sglang_harli.core.colocation.tally import CoLocationStats
from sglang_harli.core.colocation.work import WorkKind
from sglang_harli.core.config import HarliConfig
from sglang_harli.core.fleet.peers import FleetStats
from sglang_harli.core.wire.memory import MemoryStats


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
    """The SM split menu and whether partitions fence finetune on this device
    (``core.colocation.partition``)."""
    memory: LendingStats
    """KV pages lent to the trainer (``srt.memory.lending``)."""


class HarliStats(StepStats, kw_only=True):
    """The body of ``GET /harli/stats``."""

    finetune: FinetuneStats
    colocation: CoLocationStats
    fleet: FleetStats | None = None
    """With --harli-peers: the peers, alive or not, and the adapter versions exchanged (``core.fleet``)."""
