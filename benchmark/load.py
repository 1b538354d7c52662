"""The client side of every server benchmark: seeded bursty request traces, a real trace's time-scaled
replay (``recorded_trace``, ``recorded_peak``), the streaming client that times each token from the
streamed chunks, and the open-loop replay that sends a trace at its arrival times.
``benchmark.colocation`` and ``benchmark.overhead`` drive their servers with it; the server start/stop
costs below size their time budgets in ``benchmark.run``.
"""

from __future__ import annotations

import functools
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

import msgspec
import requests

from benchmark import traces

WORDS = (
    "amber basil cedar delta ember fjord garnet harbor indigo juniper kestrel lumen maple nectar onyx".split()
)
"""The vocabulary of synthetic prompts (and of ``benchmark.colocation``'s finetune data)."""
PROMPT_WORDS = (8, 40)
"""Words in a synthetic prompt (uniform in the bursty traces)."""
NEW_TOKENS = (24, 96)
"""Tokens a request generates (uniform in the bursty traces)."""

# What a server costs besides its traces, for the time budget of ``benchmark.run`` (measured on the
# 2-core CPU machine of RESULTS.md: a ``small`` server is ready about 30 s after launch, profile cached).
SERVER_START_S = 35.0
SERVER_STOP_S = 3.0


class Arrival(msgspec.Struct, array_like=True):
    at_s: float
    prompt: str
    max_new_tokens: int


class RequestResult(msgspec.Struct, kw_only=True):
    ok: bool
    tokens: int
    gaps_s: list[float]
    ttft_s: float | None = None
    """From sending the request to its first streamed token (``None`` if none came)."""
    truncated: bool = False
    """Cut at the level's deadline while still streaming: not a failure."""
    error: str | None = None


def bursty_trace(
    seed: int, duration_s: float, *, burst_rate: float, quiet_rate: float, period_s: float = 12.0
) -> list[Arrival]:
    """Poisson arrivals whose rate switches between a burst (first third of each period) and quiet."""
    rng = random.Random(seed)
    arrivals, now = [], 0.0
    while True:
        in_burst = (now % period_s) < period_s / 3
        now += rng.expovariate(burst_rate if in_burst else quiet_rate)
        if now >= duration_s:
            return arrivals
        prompt = " ".join(rng.choices(WORDS, k=rng.randint(*PROMPT_WORDS)))
        arrivals.append(Arrival(at_s=now, prompt=prompt, max_new_tokens=rng.randint(*NEW_TOKENS)))


@functools.cache
def bursty_mean_rate(*, burst_rate: float, quiet_rate: float, period_s: float = 12.0) -> float:
    """The long-run arrival rate of ``bursty_trace``, counted over 20,000 s of it. Less than the rates'
    time average: a gap drawn at the quiet rate often jumps over the next burst (0.37/s, not 0.63/s, at
    1.5/s and 0.2/s)."""
    horizon_s = 20_000.0
    arrivals = bursty_trace(0, horizon_s, burst_rate=burst_rate, quiet_rate=quiet_rate, period_s=period_s)
    return len(arrivals) / horizon_s


def _cpu_lengths(trace: traces.Trace, recorded: traces.Trace) -> traces.Trace:
    """Token counts scaled so that the recorded window's means become the bursty traces' (prompt words,
    new tokens), then clipped to their ranges: the small CPU models' context, as the bursty traces use it."""
    return trace.lengths(
        prompt_range=PROMPT_WORDS,
        output_range=NEW_TOKENS,
        prompt_scale=sum(PROMPT_WORDS) / 2 / float(recorded.prompt.mean()),
        output_scale=sum(NEW_TOKENS) / 2 / float(recorded.output.mean()),
    )


def _arrivals(trace: traces.Trace, seed: int) -> list[Arrival]:
    rng = random.Random(seed)
    return [
        Arrival(at_s=float(t), prompt=" ".join(rng.choices(WORDS, k=int(words))), max_new_tokens=int(new))
        for t, words, new in zip(trace.at_s, trace.prompt, trace.output, strict=True)
    ]


def recorded_trace(
    name: str,
    seed: int,
    duration_s: float,
    mean_rate: float,
    *,
    start_s: float = 0.0,
    span_s: float | None = None,
) -> list[Arrival]:
    """A shipped trace's window (recorded seconds) squeezed into ``duration_s`` and thinned to
    ``mean_rate`` by a seeded subset of its requests (``traces.Trace.time_scaled``): the CPU server serves
    far fewer requests per second than the recorded service, so its shape is kept, its volume not. Each
    request's prompt words and new tokens are its recorded tokens scaled to the bursty traces' means."""
    recorded = traces.load(name).window(start_s, span_s)
    scaled = recorded.time_scaled(mean_rate, duration_s=duration_s, seed=seed)
    return _arrivals(_cpu_lengths(scaled, recorded), seed)


def recorded_peak(
    name: str,
    seed: int,
    duration_s: float,
    mean_rate: float,
    *,
    start_s: float = 0.0,
    span_s: float | None = None,
) -> tuple[float, list[Arrival]]:
    """The peak of ``recorded_trace`` with the same arguments (its busiest recorded minute's rate over the
    mean, times ``mean_rate``) and a constant-rate Poisson window of ``duration_s`` at that rate with the
    trace's request mix: what a static budget is tuned on when it must hold at the trace's peak."""
    recorded = traces.load(name).window(start_s, span_s)
    peak = recorded.peak_factor() * mean_rate
    probe = recorded.poisson(peak, duration_s, seed)
    return peak, _arrivals(_cpu_lengths(probe, recorded), seed)


def stream(url: str, arrival: Arrival, deadline: float | None = None) -> RequestResult:
    """Stream one request; past ``deadline`` (a ``perf_counter`` reading) close it and call it truncated."""
    body = {
        "text": arrival.prompt,
        "stream": True,
        "sampling_params": {"max_new_tokens": arrival.max_new_tokens, "temperature": 0, "ignore_eos": True},
    }
    gaps, last, tokens, first = [], None, 0, None
    sent = time.perf_counter()
    try:
        with requests.post(f"{url}/generate", json=body, stream=True, timeout=300) as resp:
            if resp.status_code != 200:
                return RequestResult(ok=False, tokens=0, gaps_s=[], error=f"HTTP {resp.status_code}")
            for line in resp.iter_lines():
                if deadline is not None and time.perf_counter() > deadline:
                    return RequestResult(ok=False, tokens=tokens, gaps_s=gaps, ttft_s=first, truncated=True)
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                now = time.perf_counter()
                chunk = json.loads(line[5:])
                new = len(chunk["output_ids"]) if "output_ids" in chunk else 1
                if last is not None and new > tokens:
                    # a chunk carrying k new tokens stands for k token intervals of equal share
                    gaps.extend([(now - last) / (new - tokens)] * (new - tokens))
                if first is None and new > 0:
                    first = now - sent
                last, tokens = now, new
    except requests.RequestException as exc:
        return RequestResult(ok=False, tokens=tokens, gaps_s=gaps, ttft_s=first, error=str(exc))
    return RequestResult(ok=tokens == arrival.max_new_tokens, tokens=tokens, gaps_s=gaps, ttft_s=first)


def replay(url: str, trace: list[Arrival], *, deadline_s: float | None = None) -> list[RequestResult]:
    """Open loop: each request is sent at its arrival time, whatever the server's state.

    ``deadline_s`` (seconds after the start) cuts requests still streaming then."""
    results: list[RequestResult | None] = [None] * len(trace)
    start = time.perf_counter()
    deadline = None if deadline_s is None else start + deadline_s

    def run(index: int) -> None:
        results[index] = stream(url, trace[index], deadline)

    with ThreadPoolExecutor(max_workers=64) as pool:
        for index, arrival in enumerate(trace):
            delay = arrival.at_s - (time.perf_counter() - start)
            if delay > 0:
                time.sleep(delay)
            pool.submit(run, index)
    return results  # type: ignore[return-value]
