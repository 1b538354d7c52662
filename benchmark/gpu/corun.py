"""The ``corun`` part: the decode step alone and beside trainer units in every split of the menu, and
the predictor's error on those intervals."""

from __future__ import annotations

import statistics
import time
import traceback
from typing import Any

from benchmark.gpu.colocated import Colocated, colocated_trainer
from benchmark.gpu.device import Run
from benchmark.gpu.model import Decoder


def part_corun(run: Run) -> dict[str, Any]:
    from sglang_harli.core.colocation.loop import CoLocation
    from sglang_harli.core.colocation.predictor import DecodeShape
    from sglang_harli.core.config import HarliConfig

    s = run.settings
    menu = run.menu()
    decoder = Decoder(
        run.base(),
        max_batch=max(b for b, _ in s.corun_shapes),
        max_context=max(c for _, c in s.corun_shapes),
        seed=s.seed,
    )
    trainer = colocated_trainer(run)
    colocated = Colocated(run, decoder, trainer)
    # the predictor the server runs, told the menu as the server tells it
    predictor = CoLocation.from_config(HarliConfig(), splits={x.name: x.share for x in menu}).predictor
    shared = menu[0]
    per_unit_tokens = _mean_micro_batch_tokens(trainer) / trainer.units_per_micro_batch
    # warm-up and start-up profile, as the server's: one micro-batch on the whole device
    for _ in range(trainer.units_per_micro_batch):
        work, seconds, _ = colocated.idle_unit(shared)
        predictor.observe_unit(work, seconds, shared.name)
    solo: dict[tuple[int, int], list[float]] = {}
    solo_intervals: dict[tuple[int, int], list[float]] = {}
    for batch, context in s.corun_shapes:
        shape = DecodeShape(batch_size=batch, context_tokens=batch * context)
        colocated.interval(batch, context, shared, 0)
        for _ in range(s.corun_intervals):
            result = colocated.interval(batch, context, shared, 0)
            predictor.observe_solo(shape, result.step_s)
            solo.setdefault((batch, context), []).append(result.step_s)
            solo_intervals.setdefault((batch, context), []).append(result.seconds)
    rows: list[dict[str, Any]] = []
    for (batch, context), times in solo.items():
        rows.append(
            {
                "split": "alone",
                "share": 0.0,
                "batch": batch,
                "context": context,
                "units": 0,
                "decode_ms": statistics.median(times) * 1e3,
                "inflation": 1.0,
                "interval_ms": statistics.median(solo_intervals[(batch, context)]) * 1e3,
                "finetune_tokens_per_s": 0.0,
            }
        )
    failures: dict[str, str] = {}
    for split in menu:
        try:
            rows += _corun_split(run, colocated, predictor, split, solo, per_unit_tokens)
        except Exception as exc:  # one split's failure must not cost the others their rows
            traceback.print_exc()
            failures[split.name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            run.log(f"corun split {split.name} failed: {failures[split.name]}")
            run.sync()
    stats = predictor.snapshot()
    result = {
        "splits": [{"name": x.name, "share": x.share, "sms": x.finetune_sms} for x in menu],
        "partitions": run.partitioner().describe(),
        "decode_mode": decoder.mode,
        "rows": rows,
        "failures": failures,
        "predictor": {
            "solo_mape": stats.solo.mape_overall,
            "solo_mape_recent": stats.solo.mape_recent,
            "corun_mape": {name: st.mape_overall for name, st in stats.corun.items()},
            "corun_mape_recent": {name: st.mape_recent for name, st in stats.corun.items()},
            "corun_samples": {name: st.samples for name, st in stats.corun.items()},
        },
    }
    return result


def _mean_micro_batch_tokens(trainer) -> float:
    lengths = [len(e.input_ids) for e in trainer.examples]
    return statistics.fmean(lengths) * trainer.training.micro_batch_size


def _corun_split(run: Run, colocated: Colocated, predictor, split, solo, per_unit_tokens) -> list[dict]:
    from sglang_harli.core.colocation.predictor import DecodeShape

    s = run.settings
    rows = []
    for batch, context in s.corun_shapes:
        shape = DecodeShape(batch_size=batch, context_tokens=batch * context)
        for units in s.corun_units:
            first = colocated.interval(batch, context, split, units)  # the split's first use: not a row
            for w, seconds, _ in first.units:
                predictor.observe_unit(w, seconds, split.name)
            steps, intervals, ran = [], [], 0
            started = time.perf_counter()
            for _ in range(s.corun_intervals):
                upcoming = colocated.trainer.peek(units)
                predicted = predictor.corun(shape, upcoming, split.name)
                result = colocated.interval(batch, context, split, units)
                work = [w for w, _, _ in result.units]
                # the prediction the policy would have acted on, then what the interval teaches
                predictor.observe_corun(shape, work, result.seconds, split=split.name, predicted=predicted)
                for w, seconds, _ in result.units:
                    predictor.observe_unit(w, seconds, split.name)
                if not split.partitioned:  # time-sharing: the step ran alone on the whole device
                    predictor.observe_solo(shape, result.step_s)
                steps.append(result.step_s)
                intervals.append(result.seconds)
                ran += len(result.units)
            wall = time.perf_counter() - started
            alone = statistics.median(solo[(batch, context)])
            decode = statistics.median(steps)
            row = {
                "split": split.name,
                "share": split.share,
                "batch": batch,
                "context": context,
                "units": units,
                "decode_ms": decode * 1e3,
                "inflation": decode / alone,
                "interval_ms": statistics.median(intervals) * 1e3,
                "interval_p99_ms": sorted(intervals)[int(0.99 * (len(intervals) - 1))] * 1e3,
                "finetune_tokens_per_s": ran * per_unit_tokens / wall,
            }
            rows.append(row)
            run.log(
                f"corun {split.name} batch {batch} context {context} units {units}: decode "
                f"{decode * 1e3:.3f} ms (x{row['inflation']:.2f}), interval {row['interval_ms']:.3f} ms, "
                f"finetune {row['finetune_tokens_per_s']:.0f} tokens/s"
            )
    return rows
