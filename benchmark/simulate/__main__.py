"""``python -m benchmark.simulate``: the simulator's command line (``evaluate.run`` on ``QUICK`` or ``FULL``
settings, with overrides).

    python -m benchmark.simulate --quick        # seconds
    python -m benchmark.simulate --json benchmark/results/simulate.json
    python -m benchmark.simulate --quick --trace-only   # the real trace alone
    python -m benchmark.simulate --quick --trace none   # the load levels alone
"""

from __future__ import annotations

import argparse
from pathlib import Path

import msgspec

from benchmark import simulate, traces
from benchmark.simulate.evaluate import FULL, PAPER_AVERAGE_GAIN, PAPER_MAX_GAIN, QUICK, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark.simulate", description=simulate.__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="fewer loads and seeds, shorter traces")
    parser.add_argument("--loads", type=float, nargs="+", help="fractions of the saturation arrival rate")
    parser.add_argument("--duration", type=float, help="simulated seconds per run")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--slo-ms", type=float)
    parser.add_argument(
        "--runnable-only", action="store_true", help="offer only units that can start (srt offers all)"
    )
    parser.add_argument(
        "--trace",
        choices=[*traces.TRACES, "none"],
        help="also replay this real trace, time-scaled to the instance (--quick and the full run replay "
        "azure-code; none: only the load levels)",
    )
    parser.add_argument("--trace-load", type=float, help="the trace's mean rate over its saturation rate")
    parser.add_argument("--trace-start-s", type=float, help="start of the replayed window, recorded seconds")
    parser.add_argument("--trace-span-s", type=float, help="length of the replayed window, recorded seconds")
    parser.add_argument("--probe-s", type=float, help="simulated seconds of the peak window tuned on")
    parser.add_argument("--trace-only", action="store_true", help="replay the trace, skip the load levels")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.trace_only and args.trace == "none":
        parser.error("--trace-only needs a trace")
    overrides = {
        "loads": [] if args.trace_only else args.loads,
        "duration_s": args.duration,
        "seeds": args.seeds,
        "slo_ms": args.slo_ms,
        "offer_blocked": False if args.runnable_only else None,
        "trace": None if args.trace == "none" else args.trace,
        "trace_load": args.trace_load,
        "trace_start_s": args.trace_start_s,
        "trace_span_s": args.trace_span_s,
        "probe_s": args.probe_s,
    }
    settings = msgspec.structs.replace(
        QUICK if args.quick else FULL, **{k: v for k, v in overrides.items() if v is not None}
    )
    if args.trace == "none":
        settings = msgspec.structs.replace(settings, trace=None)
    report = run(settings)
    average = "n/a" if report.average_gain is None else f"{report.average_gain:+.1%}"
    best = "n/a" if report.max_gain is None else f"{report.max_gain:+.1%}"
    if settings.loads:
        print(
            f"SIMULATED harli gain over the best SLO-holding baseline: average {average}, max {best} "
            f"(paper, measured on GPUs: +{PAPER_AVERAGE_GAIN:.1%} average, up to +{PAPER_MAX_GAIN:.1%}); "
            f"{report.seconds:.1f} s"
        )
    for replay in report.replays:
        gain = f"{replay.gain:+.1%} over {replay.best_baseline}" if replay.gain is not None else replay.note
        oracle = f"{replay.oracle_gain:+.1%}" if replay.oracle_gain is not None else replay.oracle_note
        print(
            f"SIMULATED trace {replay.trace} (seed {replay.seed}): harli gain over the best realistic "
            f"SLO-holding baseline {gain}; over the oracle static {oracle}; {report.seconds:.1f} s"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_bytes(msgspec.json.format(msgspec.json.encode(report), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
