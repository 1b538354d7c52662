"""Harli's Prometheus metrics, exported through SGLang's own ``/metrics`` (``--enable-metrics``).

SGLang runs prometheus-client in multiprocess mode: every process writes its samples to files under
``PROMETHEUS_MULTIPROC_DIR`` and the HTTP server's collector merges them. Metrics created here, in the
scheduler process after SGLang has set that directory, therefore appear beside ``sglang:*`` with the same
labels, and need no server or route of their own. Per-interval samples go to a histogram and counters;
gauges summarising a window are refreshed at most once a second so the decode loop never pays for them.
"""

from __future__ import annotations

import time

from sglang_harli.core.colocation.loop import CoLocation
from sglang_harli.core.colocation.tally import StepRecord
from sglang_harli.core.jobs.book import EvalRecord
from sglang_harli.core.wire.stats import LendingStats
from sglang_harli.srt.memory.lending import KvLending


class HarliMetrics:
    def __init__(self, labels: dict[str, str], slo_s: float, *, ttft_s: float):
        """``slo_s``: the TPOT SLO; ``ttft_s``: what TTFT attainment is judged against."""
        from prometheus_client import Counter, Gauge, Histogram  # after SGLang set the multiprocess dir

        names = list(labels)
        self.labels = labels
        self._last_refresh = 0.0
        buckets = sorted({round(slo_s * f, 6) for f in (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2, 4)})
        self.token_interval = Histogram(
            "harli:token_interval_seconds",
            "Time between consecutive decode steps' results (a streaming client's inter-token latency).",
            names,
            buckets=buckets,
        )
        self.units = Counter("harli:finetune_units", "Finetune units run.", [*names, "when"])
        self.finetune_tokens = Counter("harli:finetune_tokens", "Tokens of completed micro-batches.", names)
        self.floor_breaches = Counter(
            "harli:retention_floor_breaches",
            "Evaluations whose retention was below the job's eval.retention_floor.",
            [*names, "job"],
        )

        def gauge(name, doc, extra=()):
            return Gauge(name, doc, [*names, *extra], multiprocess_mode="mostrecent")

        self.predicted = gauge("harli:predicted_token_interval_seconds", "Prediction for the last interval.")
        self.observed = gauge("harli:observed_token_interval_seconds", "The last interval as observed.")
        self.admitted = gauge(
            "harli:admitted_units", "Units admitted beside the last decode step.", ["split"]
        )
        self.attainment = gauge("harli:slo_attainment", "Share of recent token intervals within the SLO.")
        self.request_tpot = Histogram(
            "harli:request_tpot_seconds",
            "Finished requests' TPOT: (latency - TTFT) / (output tokens - 1), as sglang.bench_serving.",
            names,
            buckets=buckets,
        )
        self.request_attainment = gauge(
            "harli:request_slo_attainment", "Share of recent finished requests whose TPOT met the SLO."
        )
        self.request_ttft = Histogram(
            "harli:request_ttft_seconds",
            "Time to first token, from the request's arrival at the scheduler to its first token.",
            names,
            buckets=sorted({round(ttft_s * f, 6) for f in (0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.25, 1.5, 2, 4)}),
        )
        self.ttft_attainment = gauge(
            "harli:ttft_slo_attainment", "Share of recent requests whose TTFT met the TTFT objective."
        )
        self.held_prefills = gauge(
            "harli:held_prefills", "Prefills held one decode step behind finetune work, in all."
        )
        self.margin = gauge("harli:qos_margin_seconds", "The QoS policy's current safety margin.")
        self.mape = gauge("harli:predictor_mape", "Predictor error (fraction).", ["stage", "window"])
        self.decode_rate = gauge("harli:decode_tokens_per_second", "Decode tokens/s over the rate window.")
        self.finetune_rate = gauge("harli:finetune_tokens_per_second", "Finetune tokens/s, rate window.")
        self.lent_tokens = gauge("harli:kv_lent_tokens", "KV-cache tokens lent to the trainer now.")
        self.lent_bytes = gauge("harli:kv_lent_bytes", "Bytes of the KV cache lent to the trainer now.")
        self.activation_bytes = gauge(
            "harli:activation_bytes", "Saved activations now, in lent KV pages or ordinary memory.", ["where"]
        )
        self.lending_events = Counter(
            "harli:kv_lending_events",
            "Reclaims of lent KV pages, and micro-batches spilled or dropped (replayed) by them.",
            [*names, "event"],
        )
        self._events_seen: dict[str, int] = {}
        self.eval_loss = gauge("harli:finetune_eval_loss", "Eval loss of a job's latest evaluation.", ["job"])
        self.eval_accuracy = gauge(
            "harli:finetune_eval_accuracy", "Eval token accuracy of a job's latest evaluation.", ["job"]
        )
        self.retention = gauge(
            "harli:finetune_retention_probes",
            "Retention probes of a job's latest evaluation: kept, and in all.",
            ["job", "probes"],
        )

    def interval(self, step: StepRecord) -> None:
        self.token_interval.labels(**self.labels).observe(step.observed_ms / 1e3)
        self.observed.labels(**self.labels).set(step.observed_ms / 1e3)
        if step.predicted_ms is not None:
            self.predicted.labels(**self.labels).set(step.predicted_ms / 1e3)
        self.admitted.labels(**self.labels, split=step.split).set(step.units)

    def requests(self, tpots: list[float]) -> None:
        for tpot in tpots:
            self.request_tpot.labels(**self.labels).observe(tpot)

    def first_tokens(self, ttfts: list[float]) -> None:
        for ttft in ttfts:
            self.request_ttft.labels(**self.labels).observe(ttft)

    def unit(self, when: str, micro_batch_tokens: int) -> None:
        self.units.labels(**self.labels, when=when).inc()
        if micro_batch_tokens:
            self.finetune_tokens.labels(**self.labels).inc(micro_batch_tokens)

    def evaluation(self, job: str, record: EvalRecord) -> None:
        if record.loss is not None:
            self.eval_loss.labels(**self.labels, job=job).set(record.loss)
            self.eval_accuracy.labels(**self.labels, job=job).set(record.accuracy)
        if record.retention_kept is not None:
            self.retention.labels(**self.labels, job=job, probes="kept").set(record.retention_kept)
            self.retention.labels(**self.labels, job=job, probes="total").set(record.retention_total)
        if record.kept_floor is False:
            self.floor_breaches.labels(**self.labels, job=job).inc()

    def refresh(self, colocation: CoLocation, lending: KvLending | None = None, *, force=False) -> None:
        now = time.monotonic()
        if not force and now - self._last_refresh < 1.0:
            return
        self._last_refresh = now
        stats = colocation.snapshot()
        if stats.token_intervals.slo_attainment is not None:
            self.attainment.labels(**self.labels).set(stats.token_intervals.slo_attainment)
        if stats.requests.slo_attainment is not None:
            self.request_attainment.labels(**self.labels).set(stats.requests.slo_attainment)
        if stats.prefill.ttft.slo_attainment is not None:
            self.ttft_attainment.labels(**self.labels).set(stats.prefill.ttft.slo_attainment)
        self.held_prefills.labels(**self.labels).set(stats.prefill.held)
        if stats.policy.margin_ms is not None:
            self.margin.labels(**self.labels).set(stats.policy.margin_ms / 1e3)
        self.decode_rate.labels(**self.labels).set(stats.decode_tokens_per_s)
        self.finetune_rate.labels(**self.labels).set(stats.finetune_tokens_per_s)
        stages = {"solo": stats.predictor.solo, **{f"corun-{k}": v for k, v in stats.predictor.corun.items()}}
        for stage, summary in stages.items():
            for window in ("recent", "overall"):
                value = getattr(summary, f"mape_{window}")
                if value is not None:
                    self.mape.labels(**self.labels, stage=stage, window=window).set(value)
        if lending is not None:
            self._lending(lending.snapshot())

    def _lending(self, stats: LendingStats) -> None:
        self.lent_tokens.labels(**self.labels).set(stats.lent_tokens)
        self.lent_bytes.labels(**self.labels).set(stats.activations.lent_bytes)
        self.activation_bytes.labels(**self.labels, where="lent").set(stats.activations.placed_bytes)
        self.activation_bytes.labels(**self.labels, where="ordinary").set(stats.activations.ordinary_bytes)
        for event, total in (
            ("reclaim", stats.reclaims),
            ("spilled", stats.spilled_micro_batches),
            ("replayed", stats.replayed_micro_batches),
        ):
            delta = total - self._events_seen.get(event, 0)
            if delta > 0:
                self.lending_events.labels(**self.labels, event=event).inc(delta)
            self._events_seen[event] = total
