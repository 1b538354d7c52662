"""The experiment: every policy on the same seeded traces at several loads, and harli's gain.

For each load and seed, one trace (``workload.Workload.trace``) is replayed under ``harli``,
``harli/shared``, ``idle-only``, ``naive`` and the best ``static``. The ``static`` baseline is tuned
offline the strongest way: for every load level, the largest number of units per step that still holds
the SLO on that very trace (a search over simulations, ``best_static``). ``harli/shared`` is harli with SM
partitions off (time-sharing only), to separate what the splits add from what adapting per step adds.
The gain is harli's finetune throughput over the best baseline (``idle-only``, ``static``, ``naive``)
that holds the SLO, where harli holds it too (``benchmark.verdicts``, shared with the CPU benchmark),
reported as a change: ratio - 1. ``run`` returns the ``Report`` that ``benchmark.run``
writes to ``simulate.json``; ``QUICK`` and ``FULL`` are the settings of its two modes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import msgspec

from benchmark.simulate.loop import RunResult, SimTrainer, simulate
from benchmark.simulate.model import Assumptions, FinetuneSetup, Gpu, ModelShape, Roofline
from benchmark.simulate.workload import Workload
from benchmark.verdicts import gain_over_best_baseline, holds_slo

PAPER_AVERAGE_GAIN = 0.462
PAPER_MAX_GAIN = 0.920


class Settings(msgspec.Struct, kw_only=True):
    loads: list[float] = msgspec.field(default_factory=lambda: [0.2, 0.5, 0.8, 0.95])
    duration_s: float = 90.0
    """Simulated seconds per run."""
    seeds: list[int] = msgspec.field(default_factory=lambda: [0])
    slo_ms: float = 50.0
    max_static_units: int = 2 * 32 + 1
    """Upper end of the static search: one micro-batch's units."""
    offer_blocked: bool = True
    """Offer the policy units that cannot start for want of lendable pages, as ``srt`` does."""


class LoadResult(msgspec.Struct, kw_only=True):
    load: float
    seed: int
    arrival_rate: float
    runs: list[RunResult]
    best_baseline: str | None
    """The baseline with the most finetune throughput among those holding the SLO."""
    gain: float | None
    """harli / best baseline - 1, where harli holds the SLO too (``verdicts.Gain.claimed`` - 1)."""
    note: str = ""


class Report(msgspec.Struct, kw_only=True):
    label: str
    settings: Settings
    model: ModelShape
    gpu: Gpu
    assumptions: Assumptions
    workload: Workload
    finetune: FinetuneSetup
    kv_pool_tokens: int
    solo_step_ms: dict[str, float]
    """Roofline decode step at a few batch sizes (1k-token contexts), for orientation."""
    finetune_alone_tokens_per_s: float
    saturation_rate: float
    """Arrivals/s at load 1.0."""
    loads: list[LoadResult]
    average_gain: float | None
    max_gain: float | None
    seconds: float


def best_static(roofline: Roofline, trace, *, settings: Settings, load: float, seed: int) -> RunResult:
    """The largest units-per-step that holds the SLO on this trace (attainment falls as units grow)."""
    runs: dict[int, RunResult] = {}

    def run(units: int) -> RunResult:
        if units not in runs:
            runs[units] = simulate(
                roofline, "static", trace, duration_s=settings.duration_s, slo_s=settings.slo_ms / 1e3,
                load=load, static_units=units, seed=seed,
            )  # fmt: skip
        return runs[units]

    low, high = 0, settings.max_static_units
    while low < high:
        middle = (low + high + 1) // 2
        if holds_slo(run(middle)):
            low = middle
        else:
            high = middle - 1
    return run(low)


def evaluate_load(
    roofline: Roofline, workload: Workload, settings: Settings, *, load, seed, rate
) -> LoadResult:
    """Every policy on one seeded trace; ``harli/shared`` (no SM partitions) shows what the splits add."""
    trace = workload.trace(seed, settings.duration_s, load * rate)
    common = {"duration_s": settings.duration_s, "slo_s": settings.slo_ms / 1e3, "load": load, "seed": seed}
    offer = {"offer_blocked": settings.offer_blocked}
    runs = [
        simulate(roofline, "harli", trace, **common, **offer),
        msgspec.structs.replace(
            simulate(roofline, "harli", trace, partitions=False, **common, **offer), policy="harli/shared"
        ),
        simulate(roofline, "idle-only", trace, **common),
        simulate(roofline, "naive", trace, **common),
        best_static(roofline, trace, settings=settings, load=load, seed=seed),
    ]
    gain = gain_over_best_baseline(runs)
    return LoadResult(
        load=load,
        seed=seed,
        arrival_rate=load * rate,
        runs=runs,
        best_baseline=gain.best,
        gain=None if gain.claimed is None else gain.claimed - 1,
        note=gain.note,
    )


def run(settings: Settings, log: Callable[[str], None] = print) -> Report:
    started = time.perf_counter()
    model, gpu, assume, finetune, workload = ModelShape(), Gpu(), Assumptions(), FinetuneSetup(), Workload()
    roofline = Roofline(model, gpu, assume, finetune)
    rate = roofline.saturation_rate(workload, settings.slo_ms / 1e3)
    plan = SimTrainer(model, finetune, peek=1).plan
    alone = finetune.tokens * finetune.accumulation / sum(roofline.unit_s(work) for work in plan)
    log(
        f"SIMULATED {gpu.name}, LLaMA3-8B shape: KV pool {roofline.kv_pool_tokens} tokens, finetune alone "
        f"{alone:.0f} tokens/s, load 1.0 = {rate:.1f} requests/s, SLO {settings.slo_ms:g} ms"
    )
    results = []
    for seed in settings.seeds:
        for load in sorted(settings.loads):
            result = evaluate_load(roofline, workload, settings, load=load, seed=seed, rate=rate)
            results.append(result)
            log(describe_load(result))
    gains = [r.gain for r in results if r.gain is not None]
    return Report(
        label="SIMULATED",
        settings=settings,
        model=model,
        gpu=gpu,
        assumptions=assume,
        workload=workload,
        finetune=finetune,
        kv_pool_tokens=roofline.kv_pool_tokens,
        solo_step_ms={str(b): roofline.decode_s(b, 1024 * b) * 1e3 for b in (1, 16, 64, 256)},
        finetune_alone_tokens_per_s=alone,
        saturation_rate=rate,
        loads=results,
        average_gain=statistics.fmean(gains) if gains else None,
        max_gain=max(gains) if gains else None,
        seconds=time.perf_counter() - started,
    )


def gains_by_load(report: Report) -> dict[float, list[float]]:
    """Every seed's gain, per load level (loads where no gain is defined are left out)."""
    by_load: dict[float, list[float]] = {}
    for result in report.loads:
        if result.gain is not None:
            by_load.setdefault(result.load, []).append(result.gain)
    return dict(sorted(by_load.items()))


def describe_load(result: LoadResult) -> str:
    parts = [
        f"{r.policy}{'' if r.static_units is None else f'({r.static_units})'} "
        f"{r.finetune_tokens_per_s:.0f} tok/s att {r.slo_attainment:.4f}"
        for r in result.runs
    ]
    gain = f"gain {result.gain:+.1%} over {result.best_baseline}" if result.gain is not None else result.note
    rate = f"{result.arrival_rate:.1f} req/s"
    return f"load {result.load:g} (seed {result.seed}, {rate}): " + "; ".join(parts) + f" -> {gain}"


QUICK = Settings(loads=[0.2, 0.5, 0.8, 0.95], duration_s=90.0, seeds=[0, 1])
FULL = Settings(loads=[0.05, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.95], duration_s=300.0, seeds=[0, 1, 2])
