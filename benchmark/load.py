"""The client side of every server benchmark: seeded bursty request traces, the streaming client that
times each token from the streamed chunks, and the open-loop replay that sends a trace at its arrival
times. ``benchmark.colocation`` and ``benchmark.overhead`` drive their servers with it; the server
start/stop costs below size their time budgets in ``benchmark.run``.
"""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

import msgspec
import requests

WORDS = (
    "amber basil cedar delta ember fjord garnet harbor indigo juniper kestrel lumen maple nectar onyx".split()
)
"""The vocabulary of synthetic prompts (and of ``benchmark.colocation``'s finetune data)."""

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
        prompt = " ".join(rng.choices(WORDS, k=rng.randint(8, 40)))
        arrivals.append(Arrival(at_s=now, prompt=prompt, max_new_tokens=rng.randint(24, 96)))


def stream(url: str, arrival: Arrival, deadline: float | None = None) -> RequestResult:
    """Stream one request; past ``deadline`` (a ``perf_counter`` reading) close it and call it truncated."""
    body = {
        "text": arrival.prompt,
        "stream": True,
        "sampling_params": {"max_new_tokens": arrival.max_new_tokens, "temperature": 0, "ignore_eos": True},
    }
    gaps, last, tokens = [], None, 0
    try:
        with requests.post(f"{url}/generate", json=body, stream=True, timeout=300) as resp:
            if resp.status_code != 200:
                return RequestResult(ok=False, tokens=0, gaps_s=[], error=f"HTTP {resp.status_code}")
            for line in resp.iter_lines():
                if deadline is not None and time.perf_counter() > deadline:
                    return RequestResult(ok=False, tokens=tokens, gaps_s=gaps, truncated=True)
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                now = time.perf_counter()
                chunk = json.loads(line[5:])
                new = len(chunk["output_ids"]) if "output_ids" in chunk else 1
                if last is not None and new > tokens:
                    # a chunk carrying k new tokens stands for k token intervals of equal share
                    gaps.extend([(now - last) / (new - tokens)] * (new - tokens))
                last, tokens = now, new
    except requests.RequestException as exc:
        return RequestResult(ok=False, tokens=tokens, gaps_s=gaps, error=str(exc))
    return RequestResult(ok=tokens == arrival.max_new_tokens, tokens=tokens, gaps_s=gaps)


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
