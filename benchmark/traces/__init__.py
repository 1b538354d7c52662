"""Real request traces, time-scaled to an instance's capacity: the one loader the simulator
(``benchmark.simulate.workload``) and the CPU server benchmark (``benchmark.load``) share.

``load(name)`` reads a shipped trace (``TRACES``; files and attribution in this directory's README.md),
checks its checksum and row count, and returns a ``Trace``: arrival offsets from the first request and
each request's prompt and output tokens, as recorded. A ``Trace`` is changed only by the methods below,
each returning a new one:

- ``window(start_s, span_s)``: a stretch of it, in its own time;
- ``time_scaled(mean_rate)``: arrival times compressed or stretched by one factor, so that the mean rate
  is ``mean_rate`` (every request kept: the shape in time is the trace's, only faster or slower);
- ``time_scaled(mean_rate, duration_s=...)``: the trace squeezed into ``duration_s`` seconds and thinned
  to ``mean_rate`` by a seeded subset of its requests (a random thinning of a point process keeps its
  rate's shape, scaled): for an instance far slower than the trace's service, such as the CPU server,
  whose capacity would otherwise stretch an hour of trace into many;
- ``lengths(...)``: token counts scaled and clipped to a model's context;
- ``poisson(rate, duration_s, seed)``: a constant-rate window with the trace's request mix.

``peak_rate(window_s)`` is the highest arrival rate over any window of that length: what an operator
provisions a static budget for. ``peak_factor()`` is that rate over the mean at the trace's own time scale
(a minute of the recorded trace by default), which time-scaling preserves.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import io
from pathlib import Path
from typing import Literal, get_args

import msgspec
import numpy as np

HERE = Path(__file__).resolve().parent
TraceName = Literal["azure-code"]
"""The names of ``TRACES``, for settings fields whose command-line choices they are."""
PEAK_WINDOW_S = 60.0
"""The peak is the busiest minute of the recorded trace (its own time scale, before time-scaling)."""


class TraceFile(msgspec.Struct, frozen=True, kw_only=True):
    file: str
    """Under ``benchmark/traces``: the original CSV, gzip'd."""
    rows: int
    """Data rows after the header."""
    sha256: str
    """Of the decompressed bytes, which are the original file's."""
    source: str
    licence: str


TRACES: dict[str, TraceFile] = {
    "azure-code": TraceFile(
        file="AzureLLMInferenceTrace_code.csv.gz",
        rows=8819,
        sha256="54e9a6d2a4bd06ba1e060304b900abbc74cbea53de96506e60fe5bb4f2277fb6",
        source="https://github.com/Azure/AzurePublicDataset/blob/master/data/AzureLLMInferenceTrace_code.csv",
        licence="CC-BY-4.0 (Azure LLM inference trace 2023; Patel et al., Splitwise, ISCA 2024)",
    ),
}
"""The shipped traces, by the name the command lines take."""
assert tuple(TRACES) == get_args(TraceName)


class Trace:
    """Requests in arrival order: ``at_s`` (seconds since the start of the trace's span), ``prompt`` and
    ``output`` tokens; ``duration_s`` is the span they arrive in, so the mean rate is ``len / duration_s``."""

    def __init__(
        self,
        name: str,
        at_s: np.ndarray,
        prompt: np.ndarray,
        output: np.ndarray,
        duration_s: float,
        time_scale: float = 1.0,
    ):
        self.name, self.duration_s = name, float(duration_s)
        self.at_s, self.prompt, self.output = (
            _frozen(at_s, np.float64),
            _frozen(prompt, np.int64),
            _frozen(output, np.int64),
        )
        self.time_scale = time_scale
        """Seconds here per second of the recorded trace (1 before time-scaling)."""

    def __len__(self) -> int:
        return len(self.at_s)

    @property
    def mean_rate(self) -> float:
        return len(self) / self.duration_s

    def _replace(self, **changes) -> Trace:
        fields = {
            "name": self.name,
            "at_s": self.at_s,
            "prompt": self.prompt,
            "output": self.output,
            "duration_s": self.duration_s,
            "time_scale": self.time_scale,
        }
        return Trace(**(fields | changes))

    def window(self, start_s: float = 0.0, span_s: float | None = None) -> Trace:
        """The requests arriving in ``[start_s, start_s + span_s)`` (to the end when ``span_s`` is None),
        their times counted from ``start_s``."""
        end = self.duration_s if span_s is None else min(start_s + span_s, self.duration_s)
        if not 0 <= start_s < end:
            raise ValueError(f"window [{start_s}, {end}) is outside the trace's {self.duration_s:.0f} s")
        keep = (self.at_s >= start_s) & (self.at_s < end)
        return self._replace(
            at_s=self.at_s[keep] - start_s,
            prompt=self.prompt[keep],
            output=self.output[keep],
            duration_s=end - start_s,
        )

    def time_scaled(self, mean_rate: float, *, duration_s: float | None = None, seed: int = 0) -> Trace:
        """Arrivals at ``mean_rate`` on average, the trace's shape kept (see the module's docstring).

        Without ``duration_s`` every request is kept and time runs ``mean_rate / self.mean_rate`` times
        as fast. With it, the span becomes ``duration_s`` and a seeded random subset of
        ``round(mean_rate * duration_s)`` requests is kept (more than the trace holds is an error)."""
        if mean_rate <= 0:
            raise ValueError(f"mean rate must be positive, got {mean_rate}")
        if duration_s is None:
            factor = self.mean_rate / mean_rate
            return self._replace(
                at_s=self.at_s * factor,
                duration_s=self.duration_s * factor,
                time_scale=self.time_scale * factor,
            )
        count = round(mean_rate * duration_s)
        if count > len(self):
            raise ValueError(
                f"{count} requests in {duration_s:g} s at {mean_rate:g}/s, but the trace holds {len(self)}: "
                "thinning cannot add requests (leave the duration out to keep them all)"
            )
        keep = np.sort(np.random.default_rng(seed).choice(len(self), size=count, replace=False))
        factor = duration_s / self.duration_s
        return self._replace(
            at_s=self.at_s[keep] * factor,
            prompt=self.prompt[keep],
            output=self.output[keep],
            duration_s=float(duration_s),
            time_scale=self.time_scale * factor,
        )

    def lengths(
        self,
        *,
        prompt_range: tuple[int, int],
        output_range: tuple[int, int],
        prompt_scale: float = 1.0,
        output_scale: float = 1.0,
    ) -> Trace:
        """Token counts times their scale, rounded and clipped to the ranges (a model's context)."""
        return self._replace(
            prompt=np.clip(np.round(self.prompt * prompt_scale), *prompt_range).astype(np.int64),
            output=np.clip(np.round(self.output * output_scale), *output_range).astype(np.int64),
        )

    def poisson(self, rate: float, duration_s: float, seed: int) -> Trace:
        """Constant-rate Poisson arrivals for ``duration_s`` at ``rate``, each request's tokens drawn from
        this trace's (seeded): a steady window at one rate, such as the peak a static budget is tuned
        for, with the trace's request mix."""
        rng = np.random.default_rng(seed)
        count = rng.poisson(rate * duration_s)
        at_s = np.sort(rng.uniform(0.0, duration_s, count))
        pick = rng.integers(0, len(self), count)
        return self._replace(
            name=f"{self.name} (Poisson, {rate:.3g}/s)",
            at_s=at_s,
            prompt=self.prompt[pick],
            output=self.output[pick],
            duration_s=float(duration_s),
        )

    def peak_rate(self, window_s: float) -> float:
        """The most arrivals in any window of ``window_s`` seconds, per second (a busiest window starts at
        an arrival, so those are the windows counted)."""
        if not len(self):
            return 0.0
        counts = np.searchsorted(self.at_s, self.at_s + window_s, side="left") - np.arange(len(self))
        return float(counts.max()) / window_s

    def peak_factor(self, recorded_window_s: float = PEAK_WINDOW_S) -> float:
        """Peak over mean rate, the peak taken over windows of ``recorded_window_s`` of the recorded
        trace (``time_scale`` times that here)."""
        return self.peak_rate(recorded_window_s * self.time_scale) / self.mean_rate


def _frozen(values, dtype) -> np.ndarray:
    """A read-only copy: ``load`` caches its traces, so nobody may change one in place."""
    array = np.array(values, dtype=dtype)
    array.flags.writeable = False
    return array


def read_rows(name: str) -> list[tuple[str, int, int]]:
    """The shipped file's rows (timestamp, context tokens, generated tokens), its checksum and row count
    checked: the bytes are the original's, so the figures trace back to the published data."""
    spec = TRACES[name]
    data = gzip.decompress((HERE / spec.file).read_bytes())
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec.sha256:
        raise ValueError(f"{spec.file}: sha256 {digest}, expected {spec.sha256}")
    reader = csv.reader(io.StringIO(data.decode()))
    header = next(reader)
    if header != ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]:
        raise ValueError(f"{spec.file}: unexpected header {header}")
    rows = [(stamp, int(context), int(generated)) for stamp, context, generated in reader]
    if len(rows) != spec.rows:
        raise ValueError(f"{spec.file}: {len(rows)} rows, expected {spec.rows}")
    return rows


@functools.cache
def load(name: str) -> Trace:
    """A shipped trace (``TRACES``), arrival times as offsets from its first request.

    The trace spans from its first arrival to one mean gap past its last, so that its mean rate is its
    request count over its duration."""
    if name not in TRACES:
        raise ValueError(f"unknown trace {name!r}; choose from {', '.join(TRACES)}")
    rows = read_rows(name)
    # "2023-11-16 18:17:03.9799600": whole seconds by numpy, the 7-digit fraction (100 ns) by hand
    seconds = np.array([stamp[:19].replace(" ", "T") for stamp, _, _ in rows], dtype="datetime64[s]")
    fraction = np.array([int(stamp[20:].ljust(7, "0")) for stamp, _, _ in rows]) / 1e7
    at_s = (seconds - seconds[0]).astype(np.float64) + fraction - fraction[0]
    if np.any(np.diff(at_s) < 0):
        raise ValueError(f"{name}: arrivals are not in time order")
    span = at_s[-1] * len(rows) / (len(rows) - 1)
    prompt = np.array([context for _, context, _ in rows])
    output = np.array([generated for _, _, generated in rows])
    return Trace(name, at_s, prompt, output, span)
