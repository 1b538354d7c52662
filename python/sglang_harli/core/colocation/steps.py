"""Decode and prefill step counters, and a sliding window of decode step latencies, for ``/harli/stats``."""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from sglang_harli.core.config import HarliConfig
from sglang_harli.core.wire.stats import LatencySummary, StepStats


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
