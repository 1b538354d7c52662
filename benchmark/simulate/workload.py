"""The simulated traffic: request shapes and seeded bursty arrivals (``Workload``), a real trace replayed
(``recorded``, ``requests``), and ``Request``.

- Requests: prompt lengths log-normal (median 512, sigma 0.8, clipped to [32, 4096]), output lengths
  log-normal (median 192, sigma 0.8, clipped to [16, 1024]): assumed chat-like shapes, no dataset.
- Arrivals: Poisson, at twice the mean rate for the first third of every 30 s period and half of it
  otherwise. Load 1.0 is the rate at which the steady-state batch fills the KV pool (or the decode step
  reaches the SLO, whichever comes first): ``model.Roofline.saturation_rate``.
- A real trace (``benchmark.traces``, e.g. ``azure-code``): its recorded arrivals and token counts, the
  tokens clipped to the same ranges, time-scaled (``Trace.time_scaled``) so that its mean rate is a load
  times the saturation rate of its own request mix (``RecordedLengths``).
"""

from __future__ import annotations

import math

import msgspec
import numpy as np

from benchmark import traces


class Workload(msgspec.Struct, frozen=True, kw_only=True):
    prompt_median: float = 512
    prompt_sigma: float = 0.8
    prompt_range: tuple[int, int] = (32, 4096)
    output_median: float = 192
    output_sigma: float = 0.8
    output_range: tuple[int, int] = (16, 1024)
    period_s: float = 30.0
    burst_factor: float = 2.0
    """Arrival rate in the burst (first third of each period) over the mean; quiet gets the rest."""

    def mean_lengths(self, samples: int = 200_000) -> tuple[float, float]:
        rng = np.random.default_rng(12345)
        prompts, outputs = self._lengths(rng, samples)
        return float(prompts.mean()), float(outputs.mean())

    def _lengths(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        prompts = rng.lognormal(math.log(self.prompt_median), self.prompt_sigma, n)
        outputs = rng.lognormal(math.log(self.output_median), self.output_sigma, n)
        return (
            np.clip(np.round(prompts), *self.prompt_range).astype(int),
            np.clip(np.round(outputs), *self.output_range).astype(int),
        )

    def trace(self, seed: int, duration_s: float, mean_rate: float) -> list[Request]:
        """Seeded Poisson arrivals, bursty: ``burst_factor`` x the mean rate for a third of each period."""
        rng = np.random.default_rng(seed)
        burst = self.burst_factor * mean_rate
        quiet = max(mean_rate * (3 - self.burst_factor) / 2, 1e-9)
        times, now = [], 0.0
        while True:
            in_burst = (now % self.period_s) < self.period_s / 3
            now += rng.exponential(1.0 / (burst if in_burst else quiet))
            if now >= duration_s:
                break
            times.append(now)
        prompts, outputs = self._lengths(rng, len(times))
        return [
            Request(at_s=t, prompt=int(p), output=int(o))
            for t, p, o in zip(times, prompts, outputs, strict=True)
        ]


class Request(msgspec.Struct, array_like=True):
    at_s: float
    prompt: int
    output: int


class RecordedLengths(msgspec.Struct, frozen=True, kw_only=True):
    """A recorded trace's mean token counts (after clipping): what ``Roofline.saturation_rate`` needs of a
    workload to find the capacity for that request mix."""

    prompt_mean: float
    output_mean: float

    def mean_lengths(self) -> tuple[float, float]:
        return self.prompt_mean, self.output_mean


def recorded(
    name: str, workload: Workload, *, start_s: float = 0.0, span_s: float | None = None
) -> traces.Trace:
    """A shipped trace's window (recorded seconds), its tokens clipped to ``workload``'s ranges, as the
    synthetic requests are."""
    window = traces.load(name).window(start_s, span_s)
    return window.lengths(prompt_range=workload.prompt_range, output_range=workload.output_range)


def recorded_lengths(trace: traces.Trace) -> RecordedLengths:
    return RecordedLengths(prompt_mean=float(trace.prompt.mean()), output_mean=float(trace.output.mean()))


def requests(trace: traces.Trace) -> list[Request]:
    return [
        Request(at_s=float(t), prompt=int(p), output=int(o))
        for t, p, o in zip(trace.at_s, trace.prompt, trace.output, strict=True)
    ]
