"""The trace simulator's runs the engine-free tests assert on, computed in a child process started at the end
of collection (``helpers.background``), so they overlap the tests before ``test_simulate``'s. A run is a
pure function of its arguments (the simulator is seeded), and its result crosses as exact JSON, so a run
computed there is the run computed here; one the child did not plan is computed in the test's process.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import msgspec
from benchmark import simulate

from helpers import background
from helpers.background import Background

SLO_S = 0.050
DURATION_S = 60.0

PLANNED: list[tuple[str, float, dict]] = [
    ("harli", 0.2, {}),
    ("harli", 0.95, {}),
    ("naive", 0.5, {}),
    ("naive", 0.8, {}),
    ("harli", 0.5, {}),
    ("harli", 0.5, {"slo_metric": "itl"}),
    ("harli", 0.05, {}),
    ("idle-only", 0.05, {}),
    ("idle-only", 0.5, {}),
    ("harli", 0.5, {"duration_s": 90.0}),
    ("harli", 0.8, {"duration_s": 90.0}),
]
"""(policy, load, options) of every run ``test_simulate`` asks ``run`` for."""


def roofline() -> simulate.Roofline:
    return simulate.Roofline(
        simulate.ModelShape(), simulate.Gpu(), simulate.Assumptions(), simulate.FinetuneSetup()
    )


def simulated(
    roofline, rate, policy, load, *, seed=0, duration_s=DURATION_S, **options
) -> simulate.RunResult:
    trace = simulate.Workload().trace(seed, duration_s, load * rate)
    return simulate.simulate(
        roofline, policy, trace, duration_s=duration_s, slo_s=SLO_S, load=load, seed=seed, **options
    )


def key(policy: str, load: float, options: dict) -> str:
    return json.dumps([policy, load, options], sort_keys=True)


_CHILD = """
import sys, msgspec
from helpers import simulations
roofline = simulations.roofline()
rate = roofline.saturation_rate(simulations.simulate.Workload(), simulations.SLO_S)
runs = {simulations.key(policy, load, options): simulations.simulated(roofline, rate, policy, load, **options)
        for policy, load, options in simulations.PLANNED}
sys.stdout.write(msgspec.json.encode(runs).decode())
"""


_ROOT = Path(__file__).resolve().parents[2]


def _start() -> Background:
    path = os.pathsep.join([str(_ROOT), str(_ROOT / "test"), os.environ.get("PYTHONPATH", "")])
    return Background([sys.executable, "-c", _CHILD], env={**os.environ, "PYTHONPATH": path}, yielding=True)


def start() -> None:
    background.start("simulations", _start)


_results: dict[str, simulate.RunResult] | None = None


def planned(policy: str, load: float, options: dict) -> simulate.RunResult | None:
    """The child's run for these arguments, if it planned it."""
    global _results
    if _results is None:
        done = background.start("simulations", _start).result(timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        _results = msgspec.json.decode(done.stdout, type=dict[str, simulate.RunResult])
    return _results.get(key(policy, load, options))
