"""``python -m benchmark.simulate``: the simulator's command line (``evaluate.run`` on ``QUICK`` or ``FULL``
settings, with overrides).

    python -m benchmark.simulate --quick        # seconds
    python -m benchmark.simulate --json benchmark/results/simulate.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import msgspec

from benchmark import simulate
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
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    overrides = {
        "loads": args.loads,
        "duration_s": args.duration,
        "seeds": args.seeds,
        "slo_ms": args.slo_ms,
        "offer_blocked": False if args.runnable_only else None,
    }
    settings = msgspec.structs.replace(
        QUICK if args.quick else FULL, **{k: v for k, v in overrides.items() if v is not None}
    )
    report = run(settings)
    average = "n/a" if report.average_gain is None else f"{report.average_gain:+.1%}"
    best = "n/a" if report.max_gain is None else f"{report.max_gain:+.1%}"
    print(
        f"SIMULATED harli gain over the best SLO-holding baseline: average {average}, max {best} "
        f"(paper, measured on GPUs: +{PAPER_AVERAGE_GAIN:.1%} average, up to +{PAPER_MAX_GAIN:.1%}); "
        f"{report.seconds:.1f} s"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_bytes(msgspec.json.format(msgspec.json.encode(report), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
