"""Overhead: vanilla ``sglang.launch_server`` against ``sglang_harli.launch_server`` with no finetune job.

What Harli costs a server that is not training is its hooks: a scheduler subclass that records every
decode step, feeds the latency predictor and checks for finetune work, and the lending reserve check before
every batch. Both servers get the same built-in model and every flag the Harli launcher would add on this
machine (``--device cpu --dtype float32 --sleep-on-idle``; the CPU platform plugin fills the attention
backend, sampling backend and KV pool size for both, since it activates through its entry point for plain
SGLang too). Each run replays the same seeded bursty trace of streaming requests (client-side TPOT from the
streamed chunks) and then a closed-loop batch of simultaneous requests (output tokens/s at a full batch).

Servers run one at a time in the order A B B A (repeated ``--rounds`` times), and each ratio compares the
two runs of a pair (A B, then B A), so a drift of the machine over the run biases neither side; the
figure reported is the median over pairs. Target: Harli at most 2% slower.

    python -m benchmark.overhead                           # two rounds, 30 s traces
    python -m benchmark.overhead --rounds 1 --duration 10  # one A B B A, about 4 minutes
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

import msgspec
import numpy as np
from msgspec import Meta

from benchmark.cli import add_settings_flags, settings_from_flags
from benchmark.load import SERVER_START_S, SERVER_STOP_S, Arrival, bursty_trace, replay, stream
from benchmark.report import Target, _f, _table, verdict
from sglang_harli.models.builtin import PRESET_SCHEME, materialize
from sglang_harli.server_process import ServerProcess

SIDES = ("vanilla", "harli")
TARGET_SLOWDOWN = 0.02
WARMUP_REQUESTS = 4
THROUGHPUT_DRAIN_S = 2.0


class VanillaServer(ServerProcess):
    """``ServerProcess`` started as plain ``python -m sglang.launch_server`` (same lifecycle and helpers)."""

    def __init__(self, args: list[str], log_path: Path | str, port: int | None = None):
        super().__init__(args, log_path, port, module="sglang.launch_server")


class Settings(msgspec.Struct, kw_only=True):
    """What one run measures; the command line's options are derived from these fields (``benchmark.cli``)."""

    model: Annotated[str, Meta(description="Built-in preset both servers load.")] = "small"
    rounds: Annotated[int, Meta(description="A B B A repeated this many times.")] = 2
    duration_s: Annotated[float, Meta(description="Trace window, seconds.")] = 30.0
    burst_rate: Annotated[float, Meta(description="Arrivals/s during bursts.")] = 1.5
    quiet_rate: Annotated[float, Meta(description="Arrivals/s between bursts.")] = 0.2
    period_s: Annotated[float, Meta(description="Burst period, seconds (a burst is its first third).")] = 12.0
    batch: Annotated[int, Meta(description="Simultaneous requests of the closed-loop throughput phase.")] = 8
    batch_tokens: Annotated[int, Meta(description="Output tokens of each of those requests.")] = 48
    seed: Annotated[int, Meta(description="Seed of the trace.")] = 0


class RunResult(msgspec.Struct, kw_only=True):
    side: str
    index: int
    requests: int
    failed: int
    tpot_p50_ms: float
    tpot_mean_ms: float
    tpot_p99_ms: float
    output_tokens_per_s: float
    """Closed loop: ``batch`` requests sent at once, tokens over the wall time until the last finished."""


class PairRatio(msgspec.Struct, kw_only=True):
    runs: tuple[int, int]
    tpot_p50: float
    """harli / vanilla: above 1 means Harli is slower."""
    tpot_mean: float
    throughput: float
    """harli / vanilla: below 1 means Harli is slower."""


class Report(msgspec.Struct, kw_only=True):
    settings: Settings
    flags: dict[str, list[str]]
    runs: list[RunResult]
    pairs: list[PairRatio]
    median_tpot_ratio: float
    median_throughput_ratio: float
    slowdown: float
    """max(TPOT ratio - 1, 1 - throughput ratio): how much slower Harli is by the worse of the two."""
    met: bool


def server_flags(model: str) -> dict[str, list[str]]:
    """The same model and flags for both; the Harli launcher adds these itself on a CPU machine."""
    model_dir = str(materialize(model))
    common = ["--device", "cpu", "--dtype", "float32", "--sleep-on-idle"]
    return {
        "vanilla": ["--model-path", model_dir, "--served-model-name", f"harli-{model}", *common],
        "harli": ["--model-path", f"{PRESET_SCHEME}{model}", *common],
    }


def order(rounds: int) -> list[str]:
    return [side for _ in range(rounds) for side in ("vanilla", "harli", "harli", "vanilla")]


def throughput(url: str, settings: Settings) -> float:
    """Output tokens/s of ``batch`` identical-length requests sent together: decode at a full batch."""
    arrivals = [
        Arrival(
            at_s=0.0, prompt=f"request {i} " + "amber basil cedar " * 8, max_new_tokens=settings.batch_tokens
        )
        for i in range(settings.batch)
    ]
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=settings.batch) as pool:
        results = list(pool.map(lambda a: stream(url, a), arrivals))
    return sum(r.tokens for r in results) / (time.perf_counter() - started)


def measure(server: ServerProcess, side: str, index: int, trace: list[Arrival], settings: Settings):
    warm = [Arrival(at_s=0.2 * i, prompt="warm up " * 4, max_new_tokens=16) for i in range(WARMUP_REQUESTS)]
    replay(server.url, warm)
    results = replay(server.url, trace)
    gaps = np.array([g for r in results for g in r.gaps_s]) * 1e3
    return RunResult(
        side=side,
        index=index,
        requests=len(results),
        failed=sum(not r.ok for r in results),
        tpot_p50_ms=float(np.percentile(gaps, 50)),
        tpot_mean_ms=float(gaps.mean()),
        tpot_p99_ms=float(np.percentile(gaps, 99)),
        output_tokens_per_s=throughput(server.url, settings),
    )


def pair_ratios(runs: list[RunResult]) -> list[PairRatio]:
    """Consecutive runs two by two (A B, B A, ...): each pair holds one run of either side."""
    pairs = []
    for first, second in zip(runs[::2], runs[1::2], strict=False):
        by_side = {first.side: first, second.side: second}
        vanilla, harli = by_side["vanilla"], by_side["harli"]
        pairs.append(
            PairRatio(
                runs=(first.index, second.index),
                tpot_p50=harli.tpot_p50_ms / vanilla.tpot_p50_ms,
                tpot_mean=harli.tpot_mean_ms / vanilla.tpot_mean_ms,
                throughput=harli.output_tokens_per_s / vanilla.output_tokens_per_s,
            )
        )
    return pairs


def summarize(settings: Settings, flags: dict[str, list[str]], runs: list[RunResult]) -> Report:
    pairs = pair_ratios(runs)
    tpot = statistics.median(p.tpot_p50 for p in pairs)
    tput = statistics.median(p.throughput for p in pairs)
    slowdown = max(tpot - 1.0, 1.0 - tput)
    return Report(
        settings=settings,
        flags=flags,
        runs=runs,
        pairs=pairs,
        median_tpot_ratio=tpot,
        median_throughput_ratio=tput,
        slowdown=slowdown,
        met=slowdown <= TARGET_SLOWDOWN,
    )


def run(settings: Settings, log_dir: Path, log: Callable[[str], None] = print) -> Report:
    log_dir.mkdir(parents=True, exist_ok=True)
    flags = server_flags(settings.model)
    trace = bursty_trace(
        settings.seed,
        settings.duration_s,
        burst_rate=settings.burst_rate,
        quiet_rate=settings.quiet_rate,
        period_s=settings.period_s,
    )
    runs = []
    for index, side in enumerate(order(settings.rounds)):
        server_class = VanillaServer if side == "vanilla" else ServerProcess
        with server_class(flags[side], log_dir / f"overhead-{index}-{side}.log") as server:
            result = measure(server, side, index, trace, settings)
        runs.append(result)
        log(json.dumps(msgspec.to_builtins(result)))
    return summarize(settings, flags, runs)


def estimate_s(settings: Settings) -> float:
    """By construction: per run a server start and stop, the warm-up, the trace window plus the drain
    of its last requests (at most 96 tokens at the few tens of ms a step of an idle server), and the
    closed-loop batch."""
    trace_drain_s = 96 * 0.06
    batch_s = settings.batch_tokens * 0.08 + THROUGHPUT_DRAIN_S
    per_run = SERVER_START_S + 3.0 + settings.duration_s + trace_drain_s + batch_s + SERVER_STOP_S
    return 4 * settings.rounds * per_run


def overhead_summary(report: Report) -> tuple[list[Target], str, list[str]]:
    """The part's record in ``RESULTS.md`` (``benchmark.run``): its target, table and notes."""
    rows = [
        [str(r.index), r.side, f"{r.requests - r.failed}/{r.requests}", _f(r.tpot_p50_ms, ".1f"),
         _f(r.tpot_mean_ms, ".1f"), _f(r.tpot_p99_ms, ".1f"), _f(r.output_tokens_per_s, ".1f")]
        for r in report.runs
    ]  # fmt: skip
    table = _table(
        ["run", "server", "complete", "TPOT p50 ms", "TPOT mean ms", "TPOT p99 ms", "tokens/s"], rows
    )
    pairs = "; ".join(
        f"runs {p.runs}: TPOT x{p.tpot_p50:.3f}, throughput x{p.throughput:.3f}" for p in report.pairs
    )
    measured = (
        f"TPOT p50 x{report.median_tpot_ratio:.3f}, throughput x{report.median_throughput_ratio:.3f} "
        f"(harli/vanilla, median of {len(report.pairs)} pairs): {report.slowdown:+.1%}"
    )
    target = Target(
        target="Harli with no job <= 2% slower than vanilla SGLang",
        measured=measured,
        verdict=verdict(report.met),
    )
    notes = [
        f"Order {' '.join(r.side for r in report.runs)}; pair ratios: {pairs}.",
        f"Vanilla: `python -m sglang.launch_server {' '.join(report.flags['vanilla'])}`; Harli: "
        f"`python -m sglang_harli.launch_server {' '.join(report.flags['harli'])}`.",
    ]
    return [target], table, notes


def parse(argv: list[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_settings_flags(parser, Settings)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/harli-overhead"))
    args = parser.parse_args(argv)
    return settings_from_flags(parser, Settings, args), args


def main(argv: list[str] | None = None) -> None:
    settings, args = parse(argv)
    report = run(settings, args.log_dir, log=lambda line: print(line, flush=True))
    for pair in report.pairs:
        print(
            f"runs {pair.runs}: TPOT p50 harli/vanilla {pair.tpot_p50:.3f} (mean {pair.tpot_mean:.3f}), "
            f"throughput harli/vanilla {pair.throughput:.3f}"
        )
    print(
        f"median TPOT ratio {report.median_tpot_ratio:.3f}, throughput ratio "
        f"{report.median_throughput_ratio:.3f}: Harli {report.slowdown:+.1%} slower, target <= "
        f"{TARGET_SLOWDOWN:.0%}: {'met' if report.met else 'missed'}"
    )
    if args.json:
        args.json.write_bytes(msgspec.json.format(msgspec.json.encode(report), indent=1))


if __name__ == "__main__":
    main()
