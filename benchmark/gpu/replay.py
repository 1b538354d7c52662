"""The ``replay`` part: a bursty trace replayed in real time on the stand-in for every policy, through
the real ``CoLocation``, and harli's gain over the best baseline that holds the SLO."""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
import time
import traceback
from collections import deque
from collections.abc import Sequence
from typing import Any

from benchmark.gpu.colocated import Colocated, colocated_trainer
from benchmark.gpu.device import Run
from benchmark.gpu.model import Decoder
from benchmark.gpu.settings import POLICIES, SPATIAL
from benchmark.gpu.tables import _f


@dataclasses.dataclass(frozen=True)
class Request:
    at_s: float
    prompt: int
    output: int


def batch_buckets(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
    return sorted({b for b in sizes if b < max_batch} | {max_batch})


def _bucket(value: float, buckets: Sequence[int]) -> int:
    for b in buckets:
        if value <= b:
            return b
    return buckets[-1]


def _weighted(values: list[float], weights: list[int], q: float) -> float | None:
    if not values:
        return None
    order = sorted(range(len(values)), key=values.__getitem__)
    total, seen = sum(weights), 0
    for i in order:
        seen += weights[i]
        if seen >= q * total:
            return values[i]
    return values[order[-1]]


def part_replay(run: Run) -> dict[str, Any]:
    from benchmark.load import bursty_trace
    from benchmark.verdicts import BASELINES, gain_over_best_baseline

    s = run.settings
    menu = run.menu()
    shared = menu[0]
    decoder = Decoder(
        run.base(), max_batch=s.replay_max_batch, max_context=max(s.replay_contexts), seed=s.seed
    )
    trainer = colocated_trainer(run)
    colocated = Colocated(run, decoder, trainer)
    buckets = batch_buckets(s.replay_max_batch)
    started = time.perf_counter()
    for batch in buckets:  # every graph captured before any clock runs
        for context in s.replay_contexts:
            decoder.runner(batch, context)
    run.log(
        f"replay: {len(buckets) * len(s.replay_contexts)} steps ready ({time.perf_counter() - started:.1f} s)"
    )
    # Calibration, on the stand-in itself: the unit cost on the whole device, and the solo interval at the
    # peak batch and at half of it (mean context), from which the SLO, the arrival rates and static's
    # units are derived, so the same trace is as hard for a CPU smoke as for an H200.
    unit_costs = [colocated.idle_unit(shared)[1] for _ in range(trainer.units_per_micro_batch)]
    unit_s = statistics.median(unit_costs)
    mid_context = _bucket(
        statistics.fmean(s.prompt_tokens) + statistics.fmean(s.output_tokens) / 2, s.replay_contexts
    )
    half = _bucket(s.replay_max_batch / 2, buckets)

    def solo_interval(batch: int) -> float:
        colocated.interval(batch, mid_context, shared, 0)
        return statistics.median(
            colocated.interval(batch, mid_context, shared, 0).seconds for _ in range(s.calibration_steps)
        )

    peak_s, half_s = solo_interval(s.replay_max_batch), solo_interval(half)
    slo_s = s.slo_ms / 1e3 if s.slo_ms else s.slo_factor * peak_s
    static_units = max(0, math.floor((0.9 * slo_s - peak_s) / unit_s)) if unit_s > 0 else 0
    policies, fixed_units = list(POLICIES), 0
    if menu[-1].partitioned:  # fixed-split runs in the menu's largest split, beside the step
        fixed_costs = [colocated.idle_unit(menu[-1])[1] for _ in range(trainer.units_per_micro_batch)]
        fixed_units = max(0, math.floor(0.9 * slo_s / statistics.median(fixed_costs)))
        policies.append(SPATIAL)
    lifetime_s = statistics.fmean(s.output_tokens) * half_s
    burst_rate = s.burst_fill * s.replay_max_batch / lifetime_s
    quiet_rate = burst_rate * s.quiet_share
    arrivals = bursty_trace(
        s.seed, s.replay_s, burst_rate=burst_rate, quiet_rate=quiet_rate, period_s=s.period_s
    )
    rng = random.Random(s.seed)
    requests = [
        Request(a.at_s, rng.randint(*s.prompt_tokens), rng.randint(*s.output_tokens)) for a in arrivals
    ]
    run.log(
        f"replay: unit {unit_s * 1e3:.3f} ms, solo interval {peak_s * 1e3:.3f} ms at batch "
        f"{s.replay_max_batch} and {half_s * 1e3:.3f} ms at {half} (context {mid_context}); SLO "
        f"{slo_s * 1e3:.3f} ms; static {static_units} units/step"
        + (f", {SPATIAL} {fixed_units} in {menu[-1].name}" if SPATIAL in policies else "")
        + f"; {len(requests)} requests in "
        f"{s.replay_s:g} s (burst {burst_rate:.2f}/s, quiet {quiet_rate:.2f}/s)"
    )
    runs, failures = [], {}
    for policy in policies:
        units = fixed_units if policy == SPATIAL else static_units
        try:
            result = _replay_policy(run, colocated, policy, requests, slo_s, units, buckets)
        except Exception as exc:  # the other policies still replay, and the gain says what is missing
            traceback.print_exc()
            failures[policy] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            run.log(f"replay {policy} failed: {failures[policy]}")
            run.sync()
            continue
        runs.append(result)
        run.log(
            f"replay {policy}: attainment {_f(result['slo_attainment'], '.4f')} of requests, TPOT p99 "
            f"{_f(result['tpot_p99_ms'], '.3f')} ms, ITL p99 {_f(result['itl_p99_ms'], '.3f')} ms, "
            f"finetune {result['finetune_tokens_per_s']:.0f} "
            f"tokens/s, units by split {result['split_units']}"
        )
    gain = gain_over_best_baseline((_PolicyRun(r) for r in runs), baselines=(*BASELINES, SPATIAL))
    return {
        "duration_s": s.replay_s,
        "slo_ms": slo_s * 1e3,
        "slo_rule": f"--slo-ms {s.slo_ms:g}"
        if s.slo_ms
        else f"{s.slo_factor:g} x solo interval at batch {s.replay_max_batch}",
        "solo_interval_peak_ms": peak_s * 1e3,
        "solo_interval_half_ms": half_s * 1e3,
        "unit_ms": unit_s * 1e3,
        "static_units": static_units,
        "static_rule": "the most units whose cost fits between the solo interval at the peak batch and 90% "
        "of the SLO (tuned once, for the trace's peak)",
        "fixed_split": menu[-1].name if SPATIAL in policies else None,
        "fixed_split_units": fixed_units if SPATIAL in policies else None,
        "fixed_split_rule": "the most units whose cost in the split (they overlap the step) fits in 90% of "
        "the SLO",
        "burst_rate": burst_rate,
        "quiet_rate": quiet_rate,
        "period_s": s.period_s,
        "requests": len(requests),
        "max_batch": s.replay_max_batch,
        "contexts": list(s.replay_contexts),
        "decode_mode": decoder.mode,
        "splits": [x.name for x in menu],
        "runs": runs,
        "failures": failures,
        "gain": {"ratio": gain.ratio, "best": gain.best, "harli_holds": gain.harli_holds, "note": gain.note},
    }


class _PolicyRun:
    def __init__(self, record: dict[str, Any]):
        self.policy = record["policy"]
        attainment = record["slo_attainment"]
        self.slo_attainment = attainment if attainment is not None else math.nan
        self.finetune_tokens_per_s = record["finetune_tokens_per_s"]


def _replay_policy(run: Run, colocated: Colocated, policy: str, requests, slo_s, static_units, buckets):
    """One policy over the trace, in real time, driving ``CoLocation`` as ``srt`` does (and as
    ``benchmark.simulate.loop`` does on its simulated clock)."""
    from sglang_harli.core.colocation.loop import CoLocation
    from sglang_harli.core.colocation.predictor import DecodeShape
    from sglang_harli.core.colocation.work import look_ahead
    from sglang_harli.core.config import HarliConfig

    s = run.settings
    trainer, partitioner = colocated.trainer, colocated.partitioner
    menu = run.menu()
    shared = menu[0]
    config = HarliConfig(
        policy=policy,  # type: ignore[arg-type]
        tpot_slo_ms=slo_s * 1e3,
        static_units=static_units,
        layers_per_unit=s.layers_per_unit,
    )
    colocation = CoLocation.from_config(config, splits={split.name: split.share for split in menu})
    if policy == "harli":  # the server's start-up profile: every unit of a micro-batch, in every split
        for split in menu:
            for _ in range(trainer.units_per_micro_batch):
                work, seconds, _ = colocated.idle_unit(split)
                colocation.predictor.observe_unit(work, seconds, split.name)
    run.sync()
    peek = look_ahead(trainer.units_per_micro_batch)
    tokens_before = trainer.tokens_trained
    pending, queue = deque(requests), deque()
    running: list[list[int]] = []  # [context, tokens still to generate, id, tokens generated]
    arrived = 0
    tpots: list[float] = []
    gaps: list[float] = []
    weights: list[int] = []
    split_units = {split.name: 0 for split in menu}
    idle_units = decode_tokens = finished = 0
    batch_time = 0.0
    chained = False
    start = time.perf_counter()
    while (now := time.perf_counter() - start) < s.replay_s:
        while pending and pending[0].at_s <= now:
            queue.append(pending.popleft())
        joined = 0
        while queue and len(running) < s.replay_max_batch:
            request = queue.popleft()
            running.append([request.prompt, request.output, arrived, 0])
            arrived += 1
            joined += 1
        if not running:
            chained = False
            colocation.idle()
            next_at = min(pending[0].at_s if pending else s.replay_s, s.replay_s)
            admission = colocation.admit(None, trainer.peek(peek))
            deadline = min(now + (admission.budget_s or 0.0), next_at)
            ran = 0
            while ran < admission.units and time.perf_counter() - start < deadline:
                work, seconds, tokens = colocated.idle_unit(shared)
                colocation.unit_done(work, seconds, split=shared.name, micro_batch_tokens=tokens)
                ran += 1
            idle_units += ran
            if not ran:
                time.sleep(max(0.0, next_at - (time.perf_counter() - start)))
            continue
        batch = len(running)
        shape = DecodeShape(batch_size=batch, context_tokens=sum(r[0] for r in running))
        step = (_bucket(batch, buckets), _bucket(shape.context_tokens / batch, s.replay_contexts))
        if chained:
            admission = colocation.admit(shape, trainer.peek(peek))
            split = partitioner.split(admission.split)
            result = colocated.interval(*step, split, admission.units)
            for work, seconds, tokens in result.units:
                colocation.unit_done(work, seconds, split=split.name, micro_batch_tokens=tokens)
            split_units[split.name] += len(result.units)
            solo = not result.units or not split.partitioned
        else:  # the first step after idle closes no interval; nothing is admitted before it
            result = colocated.interval(*step, shared, 0)
            solo = True
        record = colocation.decode_done(shape, result.step_s, solo=solo)
        if chained and record is not None and batch > joined:
            gaps.append(record.observed_ms / 1e3)
            weights.append(batch - joined)
            batch_time += batch * record.observed_ms / 1e3
        chained = True
        decode_tokens += batch
        for r in running:
            r[0] += 1
            r[1] -= 1
            r[3] += 1
        # per-request TPOT from each request's first decode token, as the server's ledger keeps it
        tpots += colocation.tokens_out([(str(r[2]), r[3], r[1] <= 0) for r in running], decode=True)
        finished += sum(1 for r in running if r[1] <= 0)
        running = [r for r in running if r[1] > 0]
    elapsed = time.perf_counter() - start
    run.sync()
    tokens = trainer.tokens_trained - tokens_before
    held = sum(w for g, w in zip(gaps, weights, strict=True) if g <= slo_s)
    stats = colocation.snapshot()
    corun = {name: st.mape_overall for name, st in stats.predictor.corun.items()}
    p50, p99 = _weighted(gaps, weights, 0.5), _weighted(gaps, weights, 0.99)
    ones = [1] * len(tpots)
    tpot_p50, tpot_p99 = _weighted(tpots, ones, 0.5), _weighted(tpots, ones, 0.99)
    return {
        "policy": policy,
        "static_units": static_units if policy in ("static", SPATIAL) else None,
        # per request, as sglang.bench_serving: (last token - first token) / (output tokens - 1)
        "slo_attainment": sum(t <= slo_s for t in tpots) / len(tpots) if tpots else None,
        "tpot_p50_ms": None if tpot_p50 is None else tpot_p50 * 1e3,
        "tpot_p99_ms": None if tpot_p99 is None else tpot_p99 * 1e3,
        "requests_finished": len(tpots),
        # every token interval, weighed by the requests that waited through it
        "itl_attainment": held / sum(weights) if weights else None,
        "itl_p50_ms": None if p50 is None else p50 * 1e3,
        "itl_p99_ms": None if p99 is None else p99 * 1e3,
        "intervals": len(gaps),
        "finetune_tokens": tokens,
        "finetune_tokens_per_s": tokens / elapsed,
        "decode_tokens_per_s": decode_tokens / elapsed,
        "mean_batch": batch_time / elapsed,
        "finished": finished,
        "split_units": split_units,
        "idle_units": idle_units,
        "margin_ms": stats.policy.margin_ms,
        "predictor_solo_mape": stats.predictor.solo.mape_overall if policy == "harli" else None,
        "predictor_corun_mape": corun if policy == "harli" else None,
    }
