"""``CoLocation``: the engine-independent loop glue between a decode loop, a QoS policy and a trainer.

It is the one owner of token-interval state. An engine that launches forwards and collects their results
later (SGLang's scheduler, whose overlap loop launches step ``k+1`` before it processes step ``k``'s
results) reports its events as they happen: a forward ran (``forward_ran``: a decode step with its batch
shape, or another batch such as a prefill), a batch's results arrived (``result_arrived``), it has
nothing to do (``idle``), a request arrived while finetune work ran beside decode
(``arrival_during_work``, after which ``prefill_waits`` says the next prefill goes after one decode
step). A loop that steps its own clock (the trace simulator) reports the lower-level facts directly: a
decode step finished (``decode_done``), another batch ran in between (``other_batch``), or the chain of
intervals ends (``idle``). In between, either asks ``admit()`` how many of the trainer's coming units to
run and reports each unit it ran.
From those events this class feeds the two-stage predictor (solo step latencies, unit costs, co-run token
intervals), gives the policy its feedback, and keeps the per-step record that ``/harli/stats`` and the
benchmarks read. It imports no engine, so SGLang's scheduler, the GPU decode stand-in and the trace
simulator all drive the same code.

On a server that prefills it keeps ``core.colocation.prefill``'s state too: each request's arrival
(``request_arrived``) and first token (TTFT), what prefill batches cost, the arrival rate, and so the room
admission leaves for prefills and whether a prefill may be held one decode step (``prefill_waits``).

It also keeps the per-request TPOT ledger (``core.colocation.tpot``): the engine passes each batch's requests
with its results (``result_arrived(requests=...)``), admission reads the smallest slack in the batch from it,
and each finished request's TPOT goes to the policy and to the stats. A loop that keeps per-request time
itself passes the slack to ``admit`` and reports finished requests (``request_finished``).

A *token interval* is the time between two consecutive decode steps' results: what a streaming client
sees as its time per output token. With finetune work admitted after step ``k``, interval ``k+1`` holds
that work plus step ``k+1``, which is exactly what the stage-2 predictor is asked to predict. When a
prefill also ran in it, the interval still counts where clients feel it (SLO attainment, the policy's
margin) but does not train the predictor, whose stage 2 describes decode and finetune work only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import msgspec

from sglang_harli.core.colocation.predictor import DecodeShape, LatencyPredictor
from sglang_harli.core.colocation.prefill import DEFAULT_TTFT_FACTOR, NO_PREFILLS, Prefills
from sglang_harli.core.colocation.qos import Admission, QosPolicy, make_policy
from sglang_harli.core.colocation.tally import CoLocationStats, IntervalSummary, StepRecord, _Tally
from sglang_harli.core.colocation.timing import Timing
from sglang_harli.core.colocation.tpot import RequestTokens, TpotLedger
from sglang_harli.core.colocation.work import SHARED, FinetuneWork
from sglang_harli.core.config import HarliConfig, SloMetric

PREDICTOR_FORGETTING = 0.995
"""Decode step times on a shared CPU are noisy; a longer memory (about 200 steps) averages the noise
while still following load drift within seconds."""


def new_predictor(state: dict | None = None) -> LatencyPredictor:
    """The latency predictor a co-located instance runs with: fresh, or from a cached ``state()``."""
    if state is None:
        return LatencyPredictor(forgetting=PREDICTOR_FORGETTING)
    return LatencyPredictor.from_state(state, forgetting=PREDICTOR_FORGETTING)


class CoLocation:
    def __init__(
        self,
        predictor: LatencyPredictor,
        policy: QosPolicy,
        *,
        slo_s: float,
        window: int = 2048,
        rate_window_s: float = 30.0,
        recent: int = 64,
        clock: Callable[[], float] = time.perf_counter,
        slo_metric: SloMetric = "tpot",
        itl_cap_s: float | None = None,
        prefills: Prefills | None = None,
    ):
        """``itl_cap_s``: the interval cap held (reported); ``prefills``: the prefill side (default: none)."""
        self.predictor, self.policy, self.slo_s, self.clock = predictor, policy, slo_s, clock
        self.itl_cap_s = itl_cap_s
        reported_s = DEFAULT_TTFT_FACTOR * slo_s
        self.prefills = prefills or Prefills(
            objective_s=None, reported_s=reported_s, clock=clock, forgetting=PREDICTOR_FORGETTING
        )
        self._prefill: tuple[int, float | Timing] | None = None  # the latest prefill, until its result
        self.requests = TpotLedger(slo_s, window)
        self.just_finished: list[float] = []
        """TPOTs of the requests the latest ``result_arrived`` finished (for the engine's metrics)."""
        self.first_tokens: list[float] = []
        """TTFTs of the requests the latest ``result_arrived`` gave their first token."""
        self.slo_metric = slo_metric
        self._last_decode_done: float | None = None
        self._pending: Admission | None = None  # admitted after the last decode step, not yet observed
        self._ran = 0  # units of the pending admission that actually ran
        self._interrupted = False  # another batch ran since the last decode result
        # Engine events (``forward_ran``/``result_arrived``): the latest decode forward, and whether
        # anything other than a decode forward ran since the last decode result. Between two decode
        # results exactly one forward runs: that step's own in a normal loop, the next step's in an
        # overlap loop, so the flag is read when the decode result arrives, whichever forward set it.
        self._forward: tuple[DecodeShape, float | Timing] | None = None
        self._chain_broken = True
        self._fresh_batch = False  # the latest non-decode batch ran while no request awaited a token
        self._decode_first = False
        self._tally = _Tally(window, rate_window_s, recent, clock)

    @classmethod
    def from_config(cls, config: HarliConfig, **options) -> CoLocation:
        """The one assembly of predictor, policy and split menu, for the server and the simulator alike
        (``assemble``, with its ``options``)."""
        return assemble(cls, config, **options)

    # -- events from an engine that launches forwards and collects their results ------------------------
    def forward_ran(
        self,
        decode: DecodeShape | None,
        seconds: float | Timing,
        *,
        nothing_waiting: bool = False,
        prefill_tokens: int = 0,
    ) -> None:
        """A forward ran for ``seconds`` (or a device ``Timing``, read when its result arrives): a
        decode step of shape ``decode``, or (``None``) another batch, a prefill of ``prefill_tokens`` new
        tokens, during which ``nothing_waiting`` says no running request awaited its next token."""
        if decode is not None:
            self._forward = (decode, seconds)
        else:
            self._chain_broken = True
            self._fresh_batch = nothing_waiting
            self._prefill = (prefill_tokens, seconds) if prefill_tokens else None

    def result_arrived(self, *, decode: bool, requests: Sequence[RequestTokens] = ()) -> StepRecord | None:
        """A batch's results are out; for a decode batch, returns the token interval it closed, if any.
        ``requests``: the batch's requests, each with the output tokens it has and whether it finished."""
        record = None
        self.tokens_out(requests, decode=decode)
        if not decode and self._prefill is not None:
            tokens, step = self._prefill
            self._prefill = None
            step_s = step if isinstance(step, float) else step.seconds()
            if step_s is not None:
                self.prefills.prefill_ran(tokens, step_s)
        if not decode:
            if self._fresh_batch:  # only new requests: their first tokens start the chain
                self.chain_restarts()
                self._chain_broken = self._fresh_batch = False
            return None
        if self._forward is not None:
            shape, step = self._forward
            step_s = step if isinstance(step, float) else step.seconds()
            if self._chain_broken:
                self.other_batch()  # a prefill ran since the last decode result
            # A device timing not finished yet (it should be, once the result is in) teaches no stage 1.
            record = self.decode_done(shape, step_s or 0.0, solo=step_s is not None)
        self._chain_broken = False
        return record

    def arrival_during_work(self) -> None:
        """A request arrived while finetune work ran beside decode (``prefill_waits`` may hold it)."""
        self._decode_first = True

    def request_arrived(self, rid: str, prompt_tokens: int) -> None:
        self.prefills.arrived(rid, prompt_tokens)  # its TTFT counts from here

    def prefill_waits(self, *, decoding: bool = True) -> bool:
        """Whether the prefill about to be scheduled waits one decode step: a request arrived during
        finetune work beside decode (``arrival_during_work``), requests are ``decoding`` (else there is no
        interval to protect) and the TTFT objective leaves room for the wait (``Prefills.hold``); asking
        consumes the answer."""
        waits, self._decode_first = self._decode_first, False
        if not (waits and decoding):
            return False
        solo = self.predictor.solo(self._forward[0]) if self._forward is not None else None
        return self.prefills.hold(solo)

    def tokens_out(self, requests: Sequence[RequestTokens], *, decode: bool) -> list[float]:
        """A batch's requests got their tokens now (``result_arrived`` calls it; a loop that keeps its own
        clock calls it after ``decode_done``); returns the TPOTs of those it finished."""
        self.just_finished = self.requests.results(self.clock(), requests, decode=decode) if requests else []
        self.first_tokens = []
        if self.prefills.waiting:  # a decode batch of running requests costs nothing here
            self.first_tokens = [
                ttft
                for rid, tokens, _ in requests
                if (ttft := self.prefills.tokens_out(rid, tokens)) is not None
            ]
        for tpot in self.just_finished:
            self.policy.observe_request(tpot)
        return self.just_finished

    # -- events from a loop that keeps its own clock (and the primitives of those above) --------------
    def request_finished(self, tpot_s: float) -> None:
        """A request finished with this TPOT (a loop that keeps per-request time itself)."""
        self.requests.finished(tpot_s)
        self.policy.observe_request(tpot_s)

    def decode_done(self, shape: DecodeShape, step_s: float, *, solo: bool = True) -> StepRecord | None:
        """A decode step's results are out. ``solo``: the step ran with no finetune work beside it.

        Returns the token interval it closed, if decode results came before it with no idle gap."""
        now = self.clock()
        self._tally.decode_tokens.add(shape.batch_size)
        self._tally.decode_busy.add(step_s)
        record = None
        if self._last_decode_done is not None:
            interval = now - self._last_decode_done
            admission = self._pending or Admission(units=0)
            if self._ran < admission.units:
                # Fewer ran than were admitted (a request arrived, the job ended, no memory to lend): the
                # interval is evidence about the work that ran, and the prediction was for other work.
                admission = msgspec.structs.replace(
                    admission, units=self._ran, work=admission.work[: self._ran], predicted_s=None
                )
            if not self._interrupted:
                predicted = admission.predicted_s if admission.units else None
                self.predictor.observe_corun(
                    shape, admission.work, interval, split=admission.split, predicted=predicted
                )
            self.policy.observe(admission, interval, tokens=shape.batch_size)
            self._tally.intervals.append(interval)
            record = StepRecord(
                at_s=now,
                batch_size=shape.batch_size,
                predicted_ms=None if admission.predicted_s is None else admission.predicted_s * 1e3,
                observed_ms=interval * 1e3,
                units=admission.units,
                split=admission.split,
            )
            self._tally.recent.append(record)
        if solo:
            self.predictor.observe_solo(shape, step_s)
        self._last_decode_done = now
        self._pending, self._ran = None, 0
        self._interrupted = False
        return record

    def other_batch(self) -> None:
        """A prefill (or any non-decode batch) ran inside the current token interval."""
        self._interrupted = True

    def chain_restarts(self) -> None:
        """A batch whose requests were all new (a prefill while nothing was decoding) gave them their
        first tokens: the next decode result closes an interval counted from here. Counted from the last
        decode result instead, it would hold that prefill and look to no client like a token interval,
        yet count as a violation against the SLO and the margin."""
        self.idle()
        self._last_decode_done = self.clock()

    def idle(self) -> None:
        """Nothing to run: no request is waiting for a next token, so the chain of intervals ends."""
        self._chain_broken = True
        self._last_decode_done = None
        self._pending, self._ran = None, 0
        self._interrupted = False

    # -- admission -----------------------------------------------------------------------------------
    def admit(
        self,
        next_decode: DecodeShape | None,
        upcoming: Sequence[FinetuneWork],
        *,
        started: float | None = None,
        slack_s: float | None = None,
    ) -> Admission:
        """Ask the policy; ``started`` (a ``perf_counter`` reading) when the caller's own preparation,
        such as listing the coming units, should count as decision time too. ``slack_s``: the smallest
        per-request slack in the batch, from a loop that tracks it itself; otherwise the ledger's, for the
        interval counted from the last decode result."""
        started = time.perf_counter() if started is None else started
        if slack_s is None and next_decode is not None and self.slo_metric == "tpot":
            last = self._last_decode_done
            slack_s = self.requests.slack(self.clock() if last is None else last)
        prefills = self.prefills.outlook() if next_decode is not None else NO_PREFILLS
        admission = self.policy.admit(next_decode, upcoming, slack_s=slack_s, prefills=prefills)
        self._tally.decisions.append(time.perf_counter() - started)
        if next_decode is not None:
            self._pending, self._ran = admission, 0
        return admission

    def unit_done(
        self, work: FinetuneWork, seconds: float, *, split: str = SHARED, micro_batch_tokens: int = 0
    ) -> None:
        """A unit ran for ``seconds`` on ``split``; ``micro_batch_tokens`` when it completed a
        micro-batch. Where the cost is read later than the unit ran (device timing), the two halves
        are ``unit_ran`` and ``unit_cost``."""
        self.unit_ran(micro_batch_tokens=micro_batch_tokens)
        self.unit_cost(work, seconds, split=split)

    def unit_ran(self, *, micro_batch_tokens: int = 0) -> None:
        """A unit of the pending admission ran (its cost may not be known yet)."""
        if self._pending is not None:
            self._ran += 1
        if micro_batch_tokens:
            self._tally.finetune_tokens.add(micro_batch_tokens)

    def unit_cost(self, work: FinetuneWork, seconds: float, *, split: str = SHARED) -> None:
        """What a unit that ran on ``split`` cost, measured on its device."""
        self.predictor.observe_unit(work, seconds, split)
        self._tally.units.append(seconds)
        self._tally.finetune_busy.add(seconds)

    # -- stats ---------------------------------------------------------------------------------------
    def interval_summary(self) -> IntervalSummary:
        return IntervalSummary.of(self._tally.intervals, self.slo_s)

    def finetune_tokens_per_s(self) -> float:
        return self._tally.finetune_tokens.per_s()

    def decode_busy_fraction(self) -> float:
        return min(self._tally.decode_busy.per_s(), 1.0)

    def snapshot(self) -> CoLocationStats:
        return self._tally.stats(self)


def reported_ttft_s(config: HarliConfig) -> float:
    """What TTFT attainment is reported against: ``--harli-ttft-slo-ms``, or by default
    ``DEFAULT_TTFT_FACTOR`` TPOT SLOs."""
    ms = config.ttft_slo_ms if config.ttft_slo_ms is not None else DEFAULT_TTFT_FACTOR * config.tpot_slo_ms
    return ms / 1e3


def itl_cap_s(config: HarliConfig) -> float | None:
    """The token-interval cap ``config`` asks for: ``--harli-max-itl-ms``, twice the TPOT SLO when it is
    unset, none when it is 0."""
    if config.max_itl_ms is None:
        return 2 * config.tpot_slo_ms / 1e3
    return config.max_itl_ms / 1e3 if config.max_itl_ms > 0 else None


def assemble(
    cls: type[CoLocation],
    config: HarliConfig,
    *,
    splits: Sequence[str] | Mapping[str, float] = (SHARED,),
    predictor: LatencyPredictor | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> CoLocation:
    """The one assembly of predictor, policy and split menu, for the server and the simulator alike.

    ``splits`` is the partitioner's menu, ``shared`` first: names, or names with finetune's SM share
    (partitioned splits then overlap decode in stage 2, ``core.colocation.predictor``); ``predictor`` a
    cached one, or a stand-in the baselines never consult; ``clock`` the simulator's time in place of the
    host's."""
    predictor = predictor if predictor is not None else new_predictor()
    if isinstance(splits, Mapping):
        predictor.set_split_shares({name: share for name, share in splits.items() if share < 1.0})
    slo_s = config.tpot_slo_ms / 1e3
    cap_s = itl_cap_s(config)
    policy = make_policy(
        config.policy,
        predictor,
        slo_s=slo_s,
        idle_budget_s=config.idle_train_ms / 1e3,
        percentile=config.slo_percentile,
        static_units=config.static_units,
        splits=list(splits),
        metric=config.slo_metric,
        max_itl_s=cap_s,
    )
    objective_s = None if config.ttft_slo_ms is None else config.ttft_slo_ms / 1e3
    prefills = Prefills(
        objective_s=objective_s,
        reported_s=reported_ttft_s(config),
        clock=clock,
        forgetting=PREDICTOR_FORGETTING,
        window=config.stats_window,
    )
    return cls(
        predictor, policy, slo_s=slo_s, window=config.stats_window, clock=clock,
        slo_metric=config.slo_metric, itl_cap_s=cap_s if config.slo_metric == "tpot" else None,
        prefills=prefills,
    )  # fmt: skip
