"""The ``simulate`` part of ``benchmark.run``: the simulator's ``Report`` as targets, tables and notes
for ``RESULTS.md``, the real-trace replay's included."""

from __future__ import annotations

import math

from benchmark.report import Target, _f, _table, verdict
from benchmark.simulate.evaluate import (
    PAPER_AVERAGE_GAIN,
    PAPER_MAX_GAIN,
    Report,
    TraceResult,
    gains_by_load,
)
from benchmark.verdicts import ATTAINMENT_TARGET, TPOT_OVER_ITL_TARGET, holds_slo


def simulate_summary(report: Report) -> tuple[list[Target], str, list[str]]:
    """The part's record in ``RESULTS.md`` (``benchmark.run``): its targets, tables and notes."""
    rows = []
    for result in report.loads:
        for r in result.runs:
            rows.append(
                [
                    f"{result.load:g}",
                    str(result.seed),
                    f"`{r.policy}`" + (f" ({r.static_units}/step)" if r.static_units is not None else ""),
                    _f(r.finetune_tokens_per_s, ".0f"),
                    _f(r.slo_attainment, ".4f"),
                    _f(r.tpot_p99_ms, ".1f"),
                    _f(r.itl_attainment, ".4f"),
                    _f(r.itl_p99_ms, ".1f"),
                    _f(r.mean_batch, ".0f"),
                    f"{result.gain:+.1%} vs `{result.best_baseline}`"
                    if r.policy == "harli" and result.gain is not None
                    else (result.note if r.policy == "harli" else ""),
                ]
            )
    table = _table(
        ["load", "seed", "policy", "finetune tok/s", "SLO att. (requests)", "TPOT p99 ms", "ITL att.",
         "ITL p99 ms", "mean batch", "harli gain"],
        rows,
    )  # fmt: skip
    harli = [r for lr in report.loads for r in lr.runs if r.policy == "harli"]
    worst = min((r.slo_attainment for r in harli), default=math.nan)
    average = report.average_gain
    by_load = gains_by_load(report)
    per_load = ", ".join(f"{load:g}: {100 * sum(g) / len(g):+.1f}%" for load, g in by_load.items())
    targets = [
        Target(
            target="SIMULATED: `harli` holds the SLO (>= 0.99) at every load",
            measured=f"lowest {worst:.4f}",
            verdict=verdict(worst >= ATTAINMENT_TARGET),
        ),
        Target(
            target=f"SIMULATED: average gain over the best SLO-holding baseline >= the paper's "
            f"+{PAPER_AVERAGE_GAIN:.1%} (up to +{PAPER_MAX_GAIN:.1%})",
            measured=(
                "-"
                if average is None
                else f"{average:+.1%} average, {report.max_gain:+.1%} max (per load: {per_load})"
            ),
            verdict="missed" if average is None else verdict(average >= PAPER_AVERAGE_GAIN),
        ),
        *_simulated_tpot_over_itl(report),
    ]
    steps = ", ".join(f"batch {b}: {ms:.1f} ms" for b, ms in report.solo_step_ms.items())
    notes = [
        f"SIMULATED, not measured: {report.gpu.name}, LLaMA3-8B shape, roofline step model and interference "
        f"model documented in `benchmark/simulate/model.py`. Decode step alone at 1k-token contexts: "
        f"{steps}. "
        f"KV pool {report.kv_pool_tokens} tokens; finetune alone {report.finetune_alone_tokens_per_s:.0f} "
        f"tokens/s; load 1.0 = {report.saturation_rate:.1f} requests/s; SLO {report.settings.slo_ms:g} ms; "
        f"{report.settings.duration_s:g} simulated s per run, seeds {report.settings.seeds}; "
        f"{report.seconds:.0f} s of wall time.",
        "`static` is tuned per load on the very trace it is scored on (the largest units/step that holds the "
        "SLO): the strongest static baseline there can be. `harli/shared` is harli without SM partitions "
        "(time-sharing only), shown to separate what the splits add from what adaptivity adds. `harli/itl` "
        "is harli holding every token interval instead of each request's TPOT. The SLO columns are per "
        "request as `sglang.bench_serving` reports TPOT; ITL is every token interval, weighed by the "
        "requests that waited through it.",
    ]
    if report.replays:
        trace_targets, trace_table, trace_notes = _simulate_trace_summary(report.replays)
        targets += trace_targets
        table = f"{table}\n\n{trace_table}" if report.loads else trace_table
        notes += trace_notes
    return targets, table, notes


def _simulated_tpot_over_itl(report: Report) -> list[Target]:
    """Issue 21 at paper scale: harli holding per-request TPOT against harli holding every interval, at
    the loads of half the saturation rate and more (the simulator's stand-in for "decode busy more than
    half the time": a decode instance is never idle there)."""
    pairs = []
    for result in report.loads:
        runs = {r.policy: r for r in result.runs}
        if "harli" in runs and "harli/itl" in runs and result.load >= 0.5:
            pairs.append((runs["harli"], runs["harli/itl"]))
    if not pairs:
        return []
    ratios = [t.finetune_tokens_per_s / i.finetune_tokens_per_s for t, i in pairs if i.finetune_tokens_per_s]
    holds = all(holds_slo(t) for t, _ in pairs)
    average = sum(ratios) / len(ratios) if ratios else None
    measured = "-" if average is None else f"{average:.2f}x average ({min(ratios):.2f}-{max(ratios):.2f}x)"
    return [
        Target(
            target=f"SIMULATED: `harli` (tpot) >= {TPOT_OVER_ITL_TARGET}x `harli/itl` at loads >= 0.5, "
            "per-request attainment held",
            measured=measured + ("" if holds else "; harli misses per-request attainment somewhere"),
            verdict="missed" if average is None else verdict(holds and average >= TPOT_OVER_ITL_TARGET),
        )
    ]


TRACE_ORACLE_TARGET = 0.10
"""harli's gain over ``static`` tuned on the very trace it is scored on (issue 18)."""


def _simulate_trace_summary(replays: list[TraceResult]) -> tuple[list[Target], str, list[str]]:
    """The real-trace replay: every policy, harli's gain over the best realistic baseline and the oracle."""
    rows = []
    for result in replays:
        for r in result.runs:
            split = result.tuning.fixed_split if r.policy == "fixed-split/peak" else ""
            units = (
                "" if r.static_units is None else f" ({r.static_units}/step{' in ' + split if split else ''})"
            )
            gains = ""
            if r.policy == "harli":
                gains = (
                    f"{result.gain:+.1%} vs `{result.best_baseline}`"
                    if result.gain is not None
                    else result.note
                )
                oracle = (
                    f"{result.oracle_gain:+.1%}" if result.oracle_gain is not None else result.oracle_note
                )
                gains += f"; {oracle} vs oracle"
            rows.append(
                [
                    result.trace,
                    str(result.seed),
                    f"`{r.policy}`{units}",
                    _f(r.finetune_tokens_per_s, ".0f"),
                    _f(r.slo_attainment, ".4f"),
                    _f(r.tpot_p99_ms, ".1f"),
                    gains,
                ]
            )
    table = _table(
        ["trace", "seed", "policy", "finetune tok/s", "SLO att.", "TPOT p99 ms", "harli gain"], rows
    )
    first = replays[0]
    harli = [r for result in replays for r in result.runs if r.policy == "harli"]
    worst = min((r.slo_attainment for r in harli), default=math.nan)
    gains = [result.gain for result in replays if result.gain is not None]
    oracle = [result.oracle_gain for result in replays if result.oracle_gain is not None]
    per_seed = ", ".join(
        f"seed {result.seed}: {result.gain:+.1%} over `{result.best_baseline}`"
        if result.gain is not None
        else f"seed {result.seed}: {result.note}"
        for result in replays
    )
    name = f"SIMULATED, trace {first.trace}"
    targets = [
        Target(
            target=f"{name}: `harli` holds the SLO (>= 0.99)",
            measured=f"lowest {worst:.4f}",
            verdict=verdict(worst >= ATTAINMENT_TARGET),
        ),
        Target(
            target=f"{name}: average gain over the best realistic SLO-holding baseline >= "
            f"+{PAPER_AVERAGE_GAIN:.1%}",
            measured=f"{sum(gains) / len(gains):+.1%} average ({per_seed})" if gains else per_seed,
            verdict=verdict(bool(gains) and sum(gains) / len(gains) >= PAPER_AVERAGE_GAIN),
        ),
        Target(
            target=f"{name}: average gain over the oracle `static` (tuned on the scored trace) >= "
            f"+{TRACE_ORACLE_TARGET:.0%}",
            measured=(
                f"{sum(oracle) / len(oracle):+.1%} average"
                if oracle
                else "; ".join(result.oracle_note for result in replays)
            ),
            verdict=verdict(bool(oracle) and sum(oracle) / len(oracle) >= TRACE_ORACLE_TARGET),
        ),
    ]
    notes = [
        f"Trace replay: {first.trace}, {first.source}; recorded window {first.start_s:g}-"
        f"{first.start_s + first.span_s:.0f} s ({first.requests} requests; mean prompt "
        f"{first.lengths.prompt_mean:.0f}, output {first.lengths.output_mean:.0f} tokens after clipping) "
        f"time-scaled x{first.time_scale:.3f} to a mean {first.arrival_rate:.1f} requests/s = load "
        f"{first.load:g} of this mix's saturation rate ({first.capacity_rate:.1f}/s); its busiest recorded "
        f"minute runs at {first.peak_rate:.1f}/s ({first.peak_rate / first.capacity_rate:.2f} of it), "
        f"{first.duration_s:.0f} simulated s per run. Realistic baselines: `idle-only`, `naive`, "
        f"`static/peak` ({first.tuning.static_peak_units}/step) and `fixed-split/peak` (MPS-style, "
        f"{first.tuning.fixed_split_units}/step in {first.tuning.fixed_split}), both tuned on a "
        "constant-rate window at the peak rate with the trace's request mix, as an operator must tune "
        f"before the load arrives; `static/oracle` ({first.tuning.oracle_units}/step) is tuned on the scored "
        f"trace itself, a reference no deployment can reach (seed {first.seed}'s tuning shown).",
    ]
    return targets, table, notes
