"""``python -m benchmark.gpu``: the command line (``run_parts`` over the parts asked for, each on its
own, then the tables).

    python -m benchmark.gpu                  # full, on CUDA
    python -m benchmark.gpu --quick          # fewer cells, 30 s replays
    python -m benchmark.gpu --smoke          # the tiny CPU shape (automatic without CUDA)
    python -m benchmark.gpu --only ceilings,decode --out /tmp/gpu
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmark import gpu
from benchmark.gpu.ceilings import part_ceilings
from benchmark.gpu.corun import part_corun
from benchmark.gpu.decode import part_decode
from benchmark.gpu.device import Run
from benchmark.gpu.replay import part_replay
from benchmark.gpu.settings import PARTS, make_settings
from benchmark.gpu.tables import tables
from benchmark.gpu.trainer import part_trainer

ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_OUT = ROOT / "benchmark" / "results" / "gpu"

RUNNERS: dict[str, Callable[[Run], dict[str, Any]]] = {
    "ceilings": part_ceilings,
    "trainer": part_trainer,
    "decode": part_decode,
    "corun": part_corun,
    "replay": part_replay,
}


def run_parts(run: Run, parts: Sequence[str]) -> dict[str, Any]:
    for name in parts:
        started = time.perf_counter()
        run.log(f"== {name} ==")
        record: dict[str, Any]
        try:
            record = {"status": "ok", **RUNNERS[name](run)}
        except Exception as exc:  # one broken part must not cost the others their figures
            traceback.print_exc()
            record = {"status": f"failed: {type(exc).__name__}: {exc}".splitlines()[0][:300]}
            with contextlib.suppress(Exception):
                run.sync()
        run.free()  # what the part held (its decoder's KV cache, its trainer), not the base weights
        record["seconds"] = time.perf_counter() - started
        run.result["parts"][name] = record
        run.save()
        run.log(f"== {name}: {record['status']} ({record['seconds']:.1f} s) ==")
    return run.result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.gpu", description=gpu.__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer cells, 30 s replays (about 4.5 minutes)")
    parser.add_argument("--smoke", action="store_true", help="the tiny CPU shape (automatic without CUDA)")
    parser.add_argument("--out", type=Path, default=None, help="gpu.json and gpu.log here ($OUT if set)")
    parser.add_argument("--only", help=f"comma-separated parts of {','.join(PARTS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slo-ms", type=float, default=None, help="replay SLO (default: derived)")
    parser.add_argument("--replay-s", type=float, default=None, help="replay length per policy")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in (args.only or ",".join(PARTS)).split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    cuda = torch.cuda.is_available() and not args.smoke
    mode = "smoke" if not cuda else "quick" if args.quick else "full"
    settings = make_settings(mode, args.seed, slo_ms=args.slo_ms, replay_s=args.replay_s)
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else DEFAULT_OUT)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    command = "python -m benchmark.gpu " + " ".join(sys.argv[1:] if argv is None else argv)
    run = Run(settings, device, out, command.strip())
    why = "" if cuda else (" (--smoke)" if args.smoke else " (no CUDA device)")
    run.log(f"benchmark.gpu {mode}{why} on {run.result['device']['name']}: {', '.join(parts)} -> {out}")
    started = time.perf_counter()
    run_parts(run, parts)
    run.result["seconds"] = time.perf_counter() - started
    path = run.save()
    print(tables(run.result), flush=True)
    run.log(f"done in {run.result['seconds']:.0f} s; {path}")
    return 0 if all(run.result["parts"][p]["status"] == "ok" for p in parts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
