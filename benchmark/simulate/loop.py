"""One decode instance on a simulated clock, co-running LoRA finetuning: the event loop and ``simulate()``.

The instance (a PD-disaggregated decode instance, as in the paper). Requests arrive with their prompt's
KV cache already computed (the transfer is not modelled); one joins the running batch at the next step
once the KV pool can hold its prompt and its whole output (SGLang's reservation, without its optimism).
Each decode step emits one token for every running request. Between two steps the policy may admit
finetune units: in the ``shared`` split they run before the step on the whole GPU (time-sharing), in an
``ft-X%`` split they run concurrently with the step, fenced to X% of the SMs, and the token interval ends
when both are done. With no request running the trainer gets idle slices of ``--harli-idle-train-ms``
(yielding at a unit boundary when a request arrives). Saved activations of the micro-batch in flight live
in lent KV pages: a micro-batch starts only when the free pool can lend them, and a request that needs
those pages back takes them, dropping the micro-batch (its progress is lost and replayed), as the
server's lending does. A request's first token (from the prefill instance) and its wait for memory are
TTFT; its first token here is its first decode step's. Both SLO metrics are reported, as
``sglang.bench_serving`` defines them: a request's TPOT is the time from that first token to its last
over the tokens after the first, and its attainment the share of requests within the SLO; ITL is the
gap between consecutive tokens of a request, each weighed by the requests that waited through it. The
verdicts (``slo_attainment``) are per request. With ``--harli-slo-metric tpot`` the policy is told the
smallest slack in the batch (``core.colocation.tpot``), kept here in closed form (``_Batch.slack``), and each
finished request's TPOT.

The co-location is built as the server builds it, by ``core.colocation.loop.CoLocation.from_config`` from a
``HarliConfig`` (policy, SLO, static units), the SM split menu ``core.colocation.partition.plan_splits`` gives
an H100, and this module's clock in place of the host's. Where the simulator has to play the engine, it does
what the server does: a unit's observed time is its run time on the split it ran in
(``CoLocation.unit_done`` with its split, as ``core.runner.runner`` reports it; unit costs are learnt per
split and partitioned splits use the overlap form of stage 2), the policy's idle slices and the start-up unit
profile are the server's, and a decode step that ran beside finetune work does not train stage 1, and
units are offered as ``srt`` offers them (``core.colocation.work.look_ahead`` of them): even the first unit of
a micro-batch that cannot start for want of lendable pages (``--runnable-only`` offers only units that can
start). Such admitted units do not run, and ``CoLocation`` pairs the interval with the units that ran.
The baselines never consult the predictor, so under them it is not fed (that only saves time).

Not modelled: prefill (another instance's), KV transfer time, CPU-side scheduling jitter, the time the
policy itself takes, and finetune work overlapping the next token interval.
"""

from __future__ import annotations

import heapq
import math
import statistics
from collections import deque
from collections.abc import Sequence

import msgspec
import numpy as np

from benchmark.simulate.model import FinetuneSetup, ModelShape, Roofline
from benchmark.simulate.workload import Request
from sglang_harli.core.colocation.loop import CoLocation
from sglang_harli.core.colocation.partition import DEFAULT_SHARES, plan_splits, sm_granularity
from sglang_harli.core.colocation.predictor import DecodeShape, LatencyPredictor
from sglang_harli.core.colocation.work import SHARED, FinetuneWork, ends_micro_batch, look_ahead
from sglang_harli.core.config import HarliConfig


class SimTrainer:
    """The unit stream ``LoraTrainer.peek`` announces (forward per layer, loss, backward per layer, an
    optimizer step every ``accumulation`` micro-batches), for ever; a dropped micro-batch is replayed.

    ``peek`` units are offered per decision; by default ``core.colocation.work.look_ahead``, as the server
    offers."""

    def __init__(self, model: ModelShape, finetune: FinetuneSetup, peek: int | None = None):
        tokens, layers = finetune.tokens, model.layers
        micro = (
            [FinetuneWork(kind="forward", tokens=tokens, layers=1)] * layers
            + [FinetuneWork(kind="loss", tokens=tokens)]
            + [FinetuneWork(kind="backward", tokens=tokens, layers=1)] * layers
        )
        optimizer = FinetuneWork(
            kind="optimizer", params=model.layers * model.lora_params_per_layer(finetune.rank)
        )
        self.plan = micro * finetune.accumulation + [optimizer]
        self.tokens, self.units_per_micro_batch = tokens, len(micro)
        self.peek_count = look_ahead(self.units_per_micro_batch) if peek is None else peek
        self._ring = self.plan * (2 + self.peek_count // len(self.plan))
        self.position = 0
        self.micro_start: int | None = None
        """Position of the in-flight micro-batch's first unit; ``None`` between micro-batches."""
        self.trained_tokens = 0
        self.dropped = 0

    def peek(self) -> list[FinetuneWork]:
        start = self.position % len(self.plan)
        return self._ring[start : start + self.peek_count]

    def next_unit(self) -> FinetuneWork:
        return self.plan[self.position % len(self.plan)]

    @property
    def in_flight(self) -> bool:
        return self.micro_start is not None

    def advance(self) -> int:
        """Past the next unit; returns the tokens of the micro-batch it completed, if it completed one."""
        work = self.next_unit()
        if work.kind == "forward" and self.micro_start is None:
            self.micro_start = self.position
        self.position += 1
        if ends_micro_batch(work, self.next_unit()):
            self.micro_start = None
            self.trained_tokens += self.tokens
            return self.tokens
        return 0

    def units_left_in_micro_batch(self) -> int:
        """Units up to and including the in-flight micro-batch's last backward."""
        count, position = 0, self.position
        while True:
            work = self.plan[position % len(self.plan)]
            following = self.plan[(position + 1) % len(self.plan)]
            count += 1
            if ends_micro_batch(work, following):
                return count
            position += 1

    def drop(self) -> None:
        """Its lent pages were taken back: the micro-batch in flight starts again from its first unit."""
        if self.micro_start is not None:
            self.position, self.micro_start = self.micro_start, None
            self.dropped += 1


class _Clock:
    """The simulated time, handed to ``CoLocation`` in place of ``time.perf_counter``."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Unobserved:
    """Stands in for the predictor under the baselines, whose decisions never consult it: feeding the real
    one there would only cost time (every unit refits it) and buy error figures nobody acts on."""

    def observe_solo(self, *args, **kwargs) -> None: ...

    def observe_unit(self, *args, **kwargs) -> None: ...

    def observe_corun(self, *args, **kwargs) -> None: ...

    def set_split_shares(self, shares) -> None: ...

    def snapshot(self):
        return LatencyPredictor().snapshot()


class RunResult(msgspec.Struct, kw_only=True):
    policy: str
    load: float
    static_units: int | None
    finetune_tokens_per_s: float
    slo_attainment: float
    """Share of finished requests whose TPOT met the SLO (per request, as ``bench_serving``)."""
    tpot_p50_ms: float
    tpot_p99_ms: float
    """Per-request TPOT: (last token - first token) / (output tokens - 1)."""
    itl_attainment: float
    """Share of token intervals within the SLO, each weighed by the requests that waited through it."""
    itl_p50_ms: float
    itl_p99_ms: float
    decode_tokens_per_s: float
    mean_batch: float
    requests: int
    finished: int
    micro_batches_dropped: int
    lent_gb_mean: float
    """KV memory lent to the trainer, averaged over time (as seen at step boundaries)."""
    split_units: dict[str, int]
    """Units run beside decode steps, per SM split."""
    margin_ms: float | None
    predictor_solo_mape: float | None
    predictor_corun_mape: float | None
    """Mean over the splits that carried work of stage 2's error (MAPE) on intervals with work."""
    corun_mape_by_split: dict[str, float] = msgspec.field(default_factory=dict)
    """Stage 2's error per split (``shared``: serial sum; a partition: the overlap model)."""


class _Batch:
    """The running requests, kept as totals: a step touches every request, so per-request state would
    make each step cost the batch size; a request's end is known when it joins.

    Per-request TPOT needs only each request's first and last step: with ``times[k]`` the time step
    ``k``'s results came out, a request that joined before step ``s + 1`` (its first token) and ends at
    step ``e`` has TPOT ``(times[e] - times[s + 1]) / (e - s - 1)``. Its slack after step ``k`` is
    ``SLO x (k - s) - (times[k] - times[s + 1])``, whose only per-request part is ``times[s + 1] - SLO x s``:
    the smallest slack is a heap minimum, entries leaving it lazily when their request ends."""

    def __init__(self, slo_s: float):
        self.slo_s = slo_s
        self.size = 0
        self.context = 0
        self.step = 0
        self.times: list[float] = [0.0]
        # step -> [(final context, reserved, joined at step)]
        self._ending: dict[int, list[tuple[int, int, int]]] = {}
        self._first: dict[int, list[int]] = {}  # step -> end steps of the requests it gives a first token
        self._slack: list[tuple[float, int]] = []  # (times[s + 1] - SLO x s, end step)

    def join(self, request: Request) -> int:
        reserved = request.prompt + request.output
        self.size += 1
        self.context += request.prompt
        end = self.step + request.output
        self._ending.setdefault(end, []).append((request.prompt + request.output, reserved, self.step))
        self._first.setdefault(self.step + 1, []).append(end)
        return reserved

    def advance(self, now: float) -> tuple[int, int, list[float]]:
        """One decode step, its results out at ``now``: every request gains a token; returns (requests
        finished, tokens released, the TPOT of each finished request with more than one token)."""
        self.step += 1
        self.times.append(now)
        self.context += self.size
        joined_at = self.step - 1
        for end in self._first.pop(self.step, []):
            heapq.heappush(self._slack, (now - self.slo_s * joined_at, end))
        ended = self._ending.pop(self.step, [])
        tpots = []
        for context, _, joined in ended:
            self.context -= context
            if self.step - joined >= 2:
                tpots.append((now - self.times[joined + 1]) / (self.step - joined - 1))
        self.size -= len(ended)
        return len(ended), sum(reserved for _, reserved, _ in ended), tpots

    def slack(self) -> float | None:
        """The smallest slack of the running requests past their first token, for the next interval."""
        while self._slack and self._slack[0][1] <= self.step:
            heapq.heappop(self._slack)
        if not self._slack:
            return None
        return self.slo_s * self.step - self.times[-1] + self._slack[0][0]


class Instance:
    """One decode instance on the simulated clock, with a policy and a trainer."""

    def __init__(
        self,
        roofline: Roofline,
        policy: str,
        *,
        slo_s: float,
        static_units: int = 0,
        seed: int = 0,
        partitions: bool = True,
        offer_blocked: bool = True,
        slo_metric: str = "tpot",
    ):
        self.roofline, self.slo_s, self.offer_blocked = roofline, slo_s, offer_blocked
        self.slo_metric = slo_metric
        gpu = roofline.gpu
        shares = DEFAULT_SHARES if partitions else ()
        menu = plan_splits(gpu.sms, shares, sm_granularity(*gpu.compute_capability))
        self.splits = {split.name: split.share for split in menu}
        self.clock = _Clock()
        config = HarliConfig(
            tpot_slo_ms=slo_s * 1e3,
            policy=policy,
            static_units=static_units,
            slo_metric=slo_metric,  # type: ignore[arg-type]
        )
        self.colocation = CoLocation.from_config(
            config,
            splits=self.splits,
            predictor=None if policy == "harli" else _Unobserved(),  # type: ignore[arg-type]
            clock=self.clock,
        )
        self.policy, self.predictor = self.colocation.policy, self.colocation.predictor
        self.trainer = SimTrainer(roofline.model, roofline.finetune)
        self.rng = np.random.default_rng(seed)
        self.free = roofline.kv_pool_tokens
        """Pool tokens neither reserved by a request nor lent."""
        self.lent = 0
        self.split_units = dict.fromkeys(self.splits, 0)
        if policy == "harli":
            self._profile()

    def _profile(self) -> None:
        """The server's start-up profile: every unit of a micro-batch on the whole GPU, at two sizes."""
        for sequences in (1, 2):
            setup = msgspec.structs.replace(self.roofline.finetune, sequences=sequences)
            for work in SimTrainer(self.roofline.model, setup, peek=1).plan:
                seconds = self._jitter(self.roofline.unit_s(work), self.roofline.assume.unit_jitter)
                self.predictor.observe_unit(work, seconds)

    def _jitter(self, seconds: float, sigma: float) -> float:
        return seconds * float(self.rng.lognormal(0.0, sigma))

    # -- finetune units --------------------------------------------------------------------------------
    def _offer(self) -> list[FinetuneWork]:
        """The coming units, up to the first that could not start now for want of pages to lend.

        Offering units that cannot run would let the policy admit work that then does not happen, and
        teach the co-run model intervals shorter than the work it was told about."""
        upcoming = self.trainer.peek()
        if self.offer_blocked or self.free >= self.roofline.activation_tokens:
            return upcoming
        if not self.trainer.in_flight:
            return []
        return upcoming[: self.trainer.units_left_in_micro_batch()]

    def _run_unit(self, split: str) -> float | None:
        """Run the next unit in ``split``; ``None`` when a new micro-batch finds no pages."""
        share = self.splits[split]
        work = self.trainer.next_unit()
        if work.kind == "forward" and not self.trainer.in_flight:  # the server's ``lending.prepare``
            need = self.roofline.activation_tokens
            if self.free < need:
                return None
            self.free, self.lent = self.free - need, need
        seconds = self._jitter(self.roofline.unit_s(work, share), self.roofline.assume.unit_jitter)
        tokens = self.trainer.advance()
        if tokens:
            self.free, self.lent = self.free + self.lent, 0
        self.colocation.unit_done(work, seconds, split=split, micro_batch_tokens=tokens)
        return seconds

    def _reclaim(self) -> None:
        """Decode needs the lent pages: drop the micro-batch in flight (it will be replayed)."""
        if self.lent:
            self.trainer.drop()
            self.free, self.lent = self.free + self.lent, 0

    # -- the loop ----------------------------------------------------------------------------------------
    def run(self, trace: Sequence[Request], duration_s: float) -> dict:
        clock, colocation = self.clock, self.colocation
        queue: deque[Request] = deque()
        batch = _Batch(self.slo_s)
        tpots: list[float] = []
        tracks_slack = self.slo_metric == "tpot"
        arrivals = iter(trace)
        upcoming_arrival = next(arrivals, None)
        gaps: list[tuple[float, int]] = []  # (token interval, requests that waited for it)
        decode_tokens = finished = 0
        batch_time = lent_time = 0.0
        chained = False  # the last event was a decode step's result
        while clock.now < duration_s:
            while upcoming_arrival is not None and upcoming_arrival.at_s <= clock.now:
                queue.append(upcoming_arrival)
                upcoming_arrival = next(arrivals, None)
            joined = 0
            while queue:
                need = queue[0].prompt + queue[0].output
                if self.free < need <= self.free + self.lent:
                    self._reclaim()
                if need > self.free:
                    break
                self.free -= batch.join(queue.popleft())
                joined += 1
            if not batch.size:
                chained = False
                colocation.idle()
                next_at = duration_s if upcoming_arrival is None else min(upcoming_arrival.at_s, duration_s)
                if not self._idle_slice(next_at):
                    clock.now = max(clock.now, next_at)
                continue
            shape = DecodeShape(batch_size=batch.size, context_tokens=batch.context)
            if chained:
                slack = batch.slack() if tracks_slack else None
                admission = colocation.admit(shape, self._offer(), slack_s=slack)
                interval, step_s, solo = self._interval(shape, admission)
            else:  # the first step after idle closes no interval; nothing is admitted before it
                step_s = self._decode_s(shape)
                interval, solo = step_s, True
            clock.now += interval
            lent_time += self.lent * interval
            batch_time += batch.size * interval
            colocation.decode_done(shape, step_s, solo=solo)
            if chained and batch.size > joined:
                gaps.append((interval, batch.size - joined))
            chained = True
            decode_tokens += batch.size
            ended, released, done = batch.advance(clock.now)
            for tpot in done:
                colocation.request_finished(tpot)
            tpots += done
            finished += ended
            self.free += released
        return {
            "gaps": gaps,
            "tpots": tpots,
            "decode_tokens": decode_tokens,
            "finished": finished,
            "lent_time": lent_time,
            "batch_time": batch_time,
        }

    def _decode_s(self, shape: DecodeShape, finetune_share: float = 0.0) -> float:
        seconds = self.roofline.decode_s(shape.batch_size, shape.context_tokens, finetune_share)
        return self._jitter(seconds, self.roofline.assume.decode_jitter)

    def _interval(self, shape: DecodeShape, admission) -> tuple[float, float, bool]:
        """Run the admitted units and the step: (token interval, decode step time, step ran alone)."""
        share = self.splits[admission.split]
        work_s, ran = 0.0, 0
        for _ in range(admission.units):
            seconds = self._run_unit(admission.split)
            if seconds is None:
                break  # no pages to lend for a new micro-batch: decode keeps them
            work_s, ran = work_s + seconds, ran + 1
        self.split_units[admission.split] += ran
        if ran and admission.split != SHARED:  # concurrent, fenced: both must finish
            step = self._decode_s(shape, share)
            return max(step, work_s), step, False
        step = self._decode_s(shape)  # time-sharing: the units, then the step on the whole GPU
        return work_s + step, step, True

    def _idle_slice(self, next_arrival_s: float) -> bool:
        """No request running: train on the whole GPU for one slice, yielding when a request arrives."""
        admission = self.colocation.admit(None, self.trainer.peek())
        deadline = self.clock.now + (admission.budget_s or 0.0)
        ran = False
        while self.clock.now < deadline and self.clock.now < next_arrival_s:
            seconds = self._run_unit(SHARED)
            if seconds is None:
                return ran
            self.clock.now += seconds
            ran = True
        return ran


def simulate(
    roofline: Roofline,
    policy: str,
    trace: Sequence[Request],
    *,
    duration_s: float,
    slo_s: float,
    load: float,
    static_units: int = 0,
    seed: int = 0,
    partitions: bool = True,
    offer_blocked: bool = True,
    split: str | None = None,
    slo_metric: str = "tpot",
) -> RunResult:
    """``split``: the SM split ``fixed-split`` is pinned to (by default the menu's largest);
    ``slo_metric``: what ``harli`` holds (``--harli-slo-metric``)."""
    instance = Instance(
        roofline,
        policy,
        slo_s=slo_s,
        static_units=static_units,
        seed=seed,
        partitions=partitions,
        offer_blocked=offer_blocked,
        slo_metric=slo_metric,
    )
    if split is not None:
        instance.policy.split = split  # type: ignore[attr-defined]
    out = instance.run(trace, duration_s)
    intervals = np.array([g for g, _ in out["gaps"]] or [math.nan])
    weights = np.array([w for _, w in out["gaps"]] or [1])
    itl_p50, itl_p99 = _weighted_percentiles(intervals * 1e3, weights, (0.50, 0.99))
    itl_attainment = float(weights[intervals <= slo_s].sum() / weights.sum()) if out["gaps"] else math.nan
    tpots = np.array(out["tpots"] or [math.nan])
    p50, p99 = (float(v) for v in np.percentile(tpots * 1e3, [50, 99]))
    attainment = float(np.mean(tpots <= slo_s)) if out["tpots"] else math.nan
    stats = instance.colocation.snapshot()
    corun = [s.mape_overall for s in stats.predictor.corun.values() if s.mape_overall is not None]
    return RunResult(
        policy=policy,
        load=load,
        static_units=static_units if policy == "static" else None,
        finetune_tokens_per_s=instance.trainer.trained_tokens / duration_s,
        slo_attainment=attainment,
        tpot_p50_ms=p50,
        tpot_p99_ms=p99,
        itl_attainment=itl_attainment,
        itl_p50_ms=itl_p50,
        itl_p99_ms=itl_p99,
        decode_tokens_per_s=out["decode_tokens"] / duration_s,
        mean_batch=out["batch_time"] / duration_s,
        requests=len(trace),
        finished=out["finished"],
        micro_batches_dropped=instance.trainer.dropped,
        lent_gb_mean=out["lent_time"] / duration_s * roofline.model.kv_bytes_per_token / 1e9,
        split_units=instance.split_units,
        margin_ms=stats.policy.margin_ms,
        predictor_solo_mape=stats.predictor.solo.mape_overall,
        predictor_corun_mape=statistics.fmean(corun) if corun else None,
        corun_mape_by_split={
            split: s.mape_overall for split, s in stats.predictor.corun.items() if s.mape_overall is not None
        },
    )


def _weighted_percentiles(values: np.ndarray, weights: np.ndarray, qs: Sequence[float]) -> list[float]:
    order = np.argsort(values)
    values, cumulative = values[order], np.cumsum(weights[order])
    return [float(values[min(np.searchsorted(cumulative, q * cumulative[-1]), len(values) - 1)]) for q in qs]
