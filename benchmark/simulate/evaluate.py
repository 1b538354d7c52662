"""The experiment: every policy on the same seeded traces at several loads, and harli's gain.

For each load and seed, one trace (``workload.Workload.trace``) is replayed under ``harli``,
``harli/shared``, ``harli/itl``, ``idle-only``, ``naive`` and the best ``static``. The SLO is judged per
request (``RunResult.slo_attainment``: TPOT as ``sglang.bench_serving`` defines it), for every policy;
``harli/itl`` is harli holding every token interval instead, to show what banked slack is worth. The
``static`` baseline is tuned offline the strongest way: for every load level, the largest number of units
per step that still holds the SLO on that very trace (a search over simulations, ``best_static``).
``harli/shared`` is harli with SM partitions off (time-sharing only), to separate what the splits add from
what adapting per step adds. The gain is harli's finetune throughput over the best baseline (``idle-only``,
``static``, ``naive``) that holds the SLO, where harli holds it too (``benchmark.verdicts``, shared with the
CPU benchmark), reported as a change: ratio - 1. ``run`` returns the ``Report`` that ``benchmark.run``
writes to ``simulate.json``; ``QUICK`` and ``FULL`` are the settings of its two modes.

With ``Settings.trace`` (``--trace azure-code``), ``run`` also replays a real trace (``evaluate_trace``),
time-scaled so that its mean rate is ``trace_load`` times the saturation rate of its request mix. Its
load moves as the recorded one did, so a budget must be picked for its peak (the busiest recorded
minute), as an operator would: ``static/peak`` (the most units per step that hold the SLO) and
``fixed-split/peak`` (MPS-style spatial sharing: the SM split and units per step that train the most while
holding it) are tuned on a constant-rate window at the peak rate with the trace's request mix
(``probe_s`` long), then scored on the trace. ``static/oracle`` is tuned on the scored trace itself, as
the load levels tune ``static``: a reference no operator can reach, reported apart. harli's gain is
given over the best *realistic* baseline that holds the SLO (``REALISTIC``: ``idle-only``, ``naive``,
``static/peak``, ``fixed-split/peak``) and over the oracle.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import msgspec

from benchmark import traces
from benchmark.simulate.loop import RunResult, SimTrainer, simulate
from benchmark.simulate.model import Assumptions, FinetuneSetup, Gpu, ModelShape, Roofline
from benchmark.simulate.workload import RecordedLengths, Workload, recorded, recorded_lengths, requests
from benchmark.verdicts import ORACLE, REALISTIC, gain_over_best_baseline, holds_slo
from sglang_harli.core.colocation.partition import DEFAULT_SHARES, plan_splits, sm_granularity
from sglang_harli.core.colocation.work import SHARED

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
    trace: str | None = None
    """Also replay this shipped trace (``benchmark.traces.TRACES``, e.g. ``azure-code``), once per seed."""
    trace_load: float = 0.15
    """The replayed trace's mean rate over the saturation rate of its request mix. Its busiest minute
    runs several times higher (``TraceResult.peak_rate``): 0.7 of saturation for ``azure-code`` at 0.15.
    Near 1 the KV pool is full at the peak, nothing can be lent to the trainer there, and a budget tuned
    at the peak sees no finetune work to tune against."""
    trace_start_s: float = 0.0
    """Where the replayed window starts in the recorded trace, seconds."""
    trace_span_s: float | None = None
    """How much of the recorded trace to replay, seconds (``None``: to its end)."""
    probe_s: float = 30.0
    """Simulated seconds of the constant-rate window at the trace's peak that ``static/peak`` and
    ``fixed-split/peak`` are tuned on."""


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


class TraceTuning(msgspec.Struct, kw_only=True):
    """What the trace replay's tuned baselines were tuned to, and each (split, units) tried at peak."""

    static_peak_units: int
    fixed_split: str
    fixed_split_units: int
    oracle_units: int
    probes: list[tuple[str, int, float, float]]
    """Every try at peak: [policy or split, units per step, SLO attainment, finetune tokens/s]."""


class TraceResult(msgspec.Struct, kw_only=True):
    trace: str
    source: str
    """Where the shipped trace comes from, and its licence."""
    start_s: float
    span_s: float
    """The recorded window replayed, seconds."""
    seed: int
    load: float
    """Mean arrival rate over ``capacity_rate``."""
    capacity_rate: float
    """Arrivals/s at load 1.0 for the trace's request mix (``Roofline.saturation_rate``)."""
    lengths: RecordedLengths
    arrival_rate: float
    peak_rate: float
    """The busiest recorded minute's rate, time-scaled: what the ``/peak`` baselines were tuned at."""
    duration_s: float
    """Simulated seconds the time-scaled trace spans (the recorded span times ``time_scale``)."""
    time_scale: float
    requests: int
    tuning: TraceTuning
    runs: list[RunResult]
    best_baseline: str | None
    """The realistic baseline (``REALISTIC``) that trains the most while holding the SLO."""
    gain: float | None
    """harli / best realistic baseline - 1, where harli holds the SLO too."""
    note: str
    oracle_gain: float | None
    """harli / ``static/oracle`` - 1, where both hold the SLO."""
    oracle_note: str


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
    replays: list[TraceResult] = msgspec.field(default_factory=list)
    """The trace replays (``Settings.trace``), one per seed; the gains above are the load levels'."""


def best_static(
    roofline: Roofline,
    trace,
    *,
    settings: Settings,
    load: float,
    seed: int,
    duration_s: float | None = None,
    policy: str = "static",
    split: str | None = None,
    tried: list[RunResult] | None = None,
) -> RunResult:
    """The largest units-per-step that holds the SLO on this trace (attainment falls as units grow).

    ``duration_s`` the trace's (``settings.duration_s`` by default); ``policy`` ``static`` or
    ``fixed-split`` (pinned to ``split``); every run is appended to ``tried``, its units recorded."""
    runs: dict[int, RunResult] = {}

    def run(units: int) -> RunResult:
        if units not in runs:
            result = simulate(
                roofline, policy, trace, duration_s=settings.duration_s if duration_s is None else duration_s,
                slo_s=settings.slo_ms / 1e3, load=load, static_units=units, seed=seed,
                **({} if split is None else {"split": split}),
            )  # fmt: skip
            runs[units] = msgspec.structs.replace(result, static_units=units)
            if tried is not None:
                tried.append(runs[units])
        return runs[units]

    low, high = 0, settings.max_static_units
    while low < high:
        middle = (low + high + 1) // 2
        if holds_slo(run(middle)):
            low = middle
        else:
            high = middle - 1
    return run(low)


def _untuned_runs(roofline, trace, common: dict, offer: dict) -> list[RunResult]:
    """The policies that need no tuning, on one trace: ``harli``, ``harli/shared`` (no SM partitions, to
    show what the splits add), ``harli/itl`` (holding every token interval instead of each request's
    TPOT, to show what banked slack adds), ``idle-only`` and ``naive``."""
    return [
        simulate(roofline, "harli", trace, **common, **offer),
        msgspec.structs.replace(
            simulate(roofline, "harli", trace, partitions=False, **common, **offer), policy="harli/shared"
        ),
        msgspec.structs.replace(
            simulate(roofline, "harli", trace, slo_metric="itl", **common, **offer), policy="harli/itl"
        ),
        simulate(roofline, "idle-only", trace, **common),
        simulate(roofline, "naive", trace, **common),
    ]


def evaluate_load(
    roofline: Roofline, workload: Workload, settings: Settings, *, load, seed, rate
) -> LoadResult:
    """Every policy on one seeded trace; ``harli/shared`` (no SM partitions) shows what the splits add."""
    trace = workload.trace(seed, settings.duration_s, load * rate)
    common = {"duration_s": settings.duration_s, "slo_s": settings.slo_ms / 1e3, "load": load, "seed": seed}
    offer = {"offer_blocked": settings.offer_blocked}
    runs = [
        *_untuned_runs(roofline, trace, common, offer),
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


def partitioned_splits(gpu: Gpu) -> list[str]:
    """The SM splits of the simulated GPU's menu (as ``loop.Instance`` builds it), ``shared`` left out."""
    menu = plan_splits(gpu.sms, DEFAULT_SHARES, sm_granularity(*gpu.compute_capability))
    return [split.name for split in menu if split.name != SHARED]


def tune_at_peak(
    roofline: Roofline, probe, *, settings: Settings, load: float, seed: int
) -> tuple[int, str, int, list[tuple[str, int, float, float]]]:
    """What an operator can tune before the trace: on a constant-rate window at its peak, the most
    ``static`` units per step that hold the SLO, and the SM split and units per step of ``fixed-split``
    that train the most while holding it. Returns (static units, split, split units, every try)."""
    common = {"settings": settings, "load": load, "seed": seed, "duration_s": settings.probe_s}
    tried: list[RunResult] = []
    static = best_static(roofline, probe, **common, tried=tried)
    probes = [("static", r.static_units or 0, r.slo_attainment, r.finetune_tokens_per_s) for r in tried]
    best: tuple[float, str, int] | None = None
    for split in partitioned_splits(roofline.gpu):
        tried = []
        run = best_static(roofline, probe, **common, policy="fixed-split", split=split, tried=tried)
        probes += [(split, r.static_units or 0, r.slo_attainment, r.finetune_tokens_per_s) for r in tried]
        candidate = (run.finetune_tokens_per_s if holds_slo(run) else -1.0, split, run.static_units or 0)
        if best is None or candidate[0] > best[0]:
            best = candidate
    assert best is not None, "the simulated GPU has no SM partitions"
    return static.static_units or 0, best[1], best[2], probes


def evaluate_trace(
    roofline: Roofline, workload: Workload, settings: Settings, *, seed: int, capacity_rate: float
) -> TraceResult:
    """Every policy on the time-scaled trace: harli, harli/shared, the realistic baselines (two tuned at
    its peak) and the oracle static (tuned on it)."""
    assert settings.trace is not None
    window = recorded(settings.trace, workload, start_s=settings.trace_start_s, span_s=settings.trace_span_s)
    load = settings.trace_load
    trace = window.time_scaled(load * capacity_rate)
    replay = requests(trace)
    peak = trace.peak_factor() * trace.mean_rate
    slo_s = settings.slo_ms / 1e3
    probe = requests(trace.poisson(peak, settings.probe_s, seed))
    static_units, split, split_units, probes = tune_at_peak(
        roofline, probe, settings=settings, load=load, seed=seed
    )
    common = {"duration_s": trace.duration_s, "slo_s": slo_s, "load": load, "seed": seed}
    offer = {"offer_blocked": settings.offer_blocked}
    oracle = best_static(
        roofline, replay, settings=settings, load=load, seed=seed, duration_s=trace.duration_s
    )
    runs = [
        *_untuned_runs(roofline, replay, common, offer),
        msgspec.structs.replace(
            simulate(roofline, "static", replay, static_units=static_units, **common), policy="static/peak"
        ),
        msgspec.structs.replace(
            simulate(roofline, "fixed-split", replay, static_units=split_units, split=split, **common),
            policy="fixed-split/peak",
            static_units=split_units,
        ),
        msgspec.structs.replace(oracle, policy="static/oracle"),
    ]
    gain = gain_over_best_baseline(runs, baselines=REALISTIC)
    versus_oracle = gain_over_best_baseline(runs, baselines=ORACLE)
    spec = traces.TRACES[settings.trace]
    return TraceResult(
        trace=settings.trace,
        source=f"{spec.source} ({spec.licence})",
        start_s=settings.trace_start_s,
        span_s=window.duration_s,
        seed=seed,
        load=load,
        capacity_rate=capacity_rate,
        lengths=recorded_lengths(window),
        arrival_rate=trace.mean_rate,
        peak_rate=peak,
        duration_s=trace.duration_s,
        time_scale=trace.time_scale,
        requests=len(trace),
        tuning=TraceTuning(
            static_peak_units=static_units,
            fixed_split=split,
            fixed_split_units=split_units,
            oracle_units=oracle.static_units or 0,
            probes=probes,
        ),
        runs=runs,
        best_baseline=gain.best,
        gain=None if gain.claimed is None else gain.claimed - 1,
        note=gain.note,
        oracle_gain=None if versus_oracle.claimed is None else versus_oracle.claimed - 1,
        oracle_note=versus_oracle.note,
    )


def describe_trace(result: TraceResult) -> str:
    parts = [
        f"{r.policy}{'' if r.static_units is None else f'({r.static_units})'} "
        f"{r.finetune_tokens_per_s:.0f} tok/s att {r.slo_attainment:.4f}"
        for r in result.runs
    ]
    gain = f"gain {result.gain:+.1%} over {result.best_baseline}" if result.gain is not None else result.note
    oracle = f"{result.oracle_gain:+.1%}" if result.oracle_gain is not None else result.oracle_note
    return (
        f"trace {result.trace} (seed {result.seed}, load {result.load:g}: {result.arrival_rate:.1f} req/s, "
        f"peak {result.peak_rate:.1f} req/s, {result.requests} requests in {result.duration_s:.0f} s; "
        f"fixed split {result.tuning.fixed_split}): "
        + "; ".join(parts)
        + f" -> {gain}; vs oracle static {oracle}"
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
    replays = []
    if settings.trace is not None:
        window = recorded(
            settings.trace, workload, start_s=settings.trace_start_s, span_s=settings.trace_span_s
        )
        capacity = roofline.saturation_rate(recorded_lengths(window), settings.slo_ms / 1e3)  # type: ignore[arg-type]
        for seed in settings.seeds:
            replays.append(evaluate_trace(roofline, workload, settings, seed=seed, capacity_rate=capacity))
            log(describe_trace(replays[-1]))
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
        replays=replays,
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


QUICK = Settings(loads=[0.2, 0.5, 0.8, 0.95], duration_s=90.0, seeds=[0, 1], trace="azure-code")
FULL = Settings(
    loads=[0.05, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.95],
    duration_s=300.0,
    seeds=[0, 1, 2],
    trace="azure-code",
)
