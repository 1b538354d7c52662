"""``FinetuneService``: the finetune side of one SGLang scheduler, and the one thing the scheduler talks to.

It lives inside SGLang's scheduler process because that is where the served weights are: the trainer's
frozen base is a set of views of ``model_runner.model`` (``srt.weights``). It builds SGLang's pieces once
(the scheduler as a ``core.runner.host.Host``, KV lending, tensor-parallel agreement, metrics, the start-up
profile) and wires the engine-free rooms over them (``core.runner.finetuning.Finetuning``: jobs,
publishing, Tinker clients, the scheduling object and the unit runner), beside the co-location loop
(``core.colocation``: token-interval events, the latency predictor and the QoS policy).

The scheduler (``srt.scheduler``) reports loop events here, asks ``train`` to use a place in its loop,
and hands over control requests (``handle``). With ``--tp-size N`` every rank trains its slice; rank 0
decides when (``srt.tensor_parallel``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec

from sglang_harli.core.colocation.loop import CoLocation, reported_ttft_s
from sglang_harli.core.colocation.partition import make_partitioner
from sglang_harli.core.colocation.plan import Slot
from sglang_harli.core.colocation.predictor import DecodeShape
from sglang_harli.core.colocation.steps import StepRecorder
from sglang_harli.core.colocation.timing import EventStopwatch, Timing, stopwatch
from sglang_harli.core.colocation.tpot import RequestTokens
from sglang_harli.core.config import HarliConfig
from sglang_harli.core.fleet.local_sgd import host_store
from sglang_harli.core.fleet.placement import FleetCapacity
from sglang_harli.core.jobs.book import FINISHED_STATES
from sglang_harli.core.runner.finetuning import Finetuning
from sglang_harli.core.training.tensor_parallel import TensorParallelError
from sglang_harli.core.wire.control import GetCapacity, GetStats
from sglang_harli.core.wire.stats import FinetuneStats, HarliStats
from sglang_harli.srt.control import ControlDispatcher, HarliControlReq, HarliControlReqOutput
from sglang_harli.srt.host import SchedulerHost
from sglang_harli.srt.memory.lending import KvLending
from sglang_harli.srt.metrics import HarliMetrics
from sglang_harli.srt.profiling import StartupProfile
from sglang_harli.srt.tensor_parallel import RankAgreement, training_group

logger = logging.getLogger(__name__)


class FinetuneService:
    def __init__(self, scheduler, config: HarliConfig):
        self.scheduler, self.config = scheduler, config
        self.steps = StepRecorder(config)
        self.metrics = None
        if scheduler.server_args.enable_metrics:
            labels = dict(getattr(scheduler.metrics_collector, "labels", None) or {})
            self.metrics = HarliMetrics(labels, config.tpot_slo_ms / 1e3, ttft_s=reported_ttft_s(config))
        self.agreement = RankAgreement(scheduler)
        tensor_parallel, unsupported = None, None
        try:
            tensor_parallel = training_group(scheduler)
        except TensorParallelError as exc:  # the server serves; jobs get this reason
            unsupported = str(exc)
            logger.warning("finetuning is off: %s", exc)
        device = getattr(scheduler.tp_worker.model_runner, "device", "cpu")
        self.partitioner = make_partitioner(device, enabled=config.sm_partitions != "off")
        self.stopwatch = stopwatch(device)
        """Device time of units and decode steps: events on CUDA, the host clock on CPU."""
        self.profile = StartupProfile(scheduler, config, tensor_parallel)
        self.colocation = CoLocation.from_config(
            config,
            splits={split.name: split.share for split in self.partitioner.splits},
            predictor=self.profile.cached_predictor(),
        )
        self.partitioner.prepare()  # green contexts built now, not inside a token interval
        self.lending = KvLending(scheduler, config)
        self.rendezvous = host_store() if config.peers else None
        """With --harli-peers: this instance's store for jobs trained on several instances."""
        self._unsupported = unsupported
        self.host = SchedulerHost(scheduler)
        self.finetuning = Finetuning(
            self.host,
            config,
            colocation=self.colocation,
            partitioner=self.partitioner,
            stopwatch=self.stopwatch,
            lending=self.lending,
            agreement=self.agreement,
            tensor_parallel=tensor_parallel,
            metrics=self.metrics,
            rendezvous=self.rendezvous,
            unsupported=unsupported,
            on_release=lambda: self.profile.save(self.colocation.predictor),
        )
        self.jobs, self.runner = self.finetuning.jobs, self.finetuning.runner
        self.handle: Callable[[HarliControlReq], HarliControlReqOutput] = ControlDispatcher(
            {**self.finetuning.handlers, GetStats: self.stats, GetCapacity: self.capacity}
        )
        """Answer one control request (``core.wire.control``) from the HTTP side."""
        self.profile.run(
            self.colocation.predictor, skip=bool(unsupported) or not self.host.serving_limits().enable_lora
        )

    # -- loop events ---------------------------------------------------------------------------------
    def forward_ran(
        self,
        decode: DecodeShape | None,
        seconds: float,
        *,
        device: Timing | None = None,
        nothing_waiting: bool = False,
        prefill_tokens: int = 0,
    ) -> None:
        """A forward ran for ``seconds`` of host time (``device``: as the device timed it): a decode step
        of shape ``decode``, or (``None``) another batch, a prefill of ``prefill_tokens`` new tokens."""
        self.steps.record_forward(seconds)
        if decode is not None:
            self.steps.record_decode(seconds, decode.batch_size)
        step = device if device is not None else seconds
        self.colocation.forward_ran(
            decode, step, nothing_waiting=nothing_waiting, prefill_tokens=prefill_tokens
        )

    def request_arrived(self, rid: str, prompt_tokens: int) -> None:
        """A request joined the waiting queue of a server that prefills (its TTFT counts from here)."""
        self.colocation.request_arrived(rid, prompt_tokens)

    def result_arrived(
        self, *, decode: bool, prefill_tokens: int | None = None, requests: Sequence[RequestTokens] = ()
    ) -> None:
        """A batch's results were processed; ``prefill_tokens`` for an extend (prefill) batch;
        ``requests``: its requests with their output tokens so far and whether each finished."""
        if prefill_tokens is not None:
            self.steps.record_prefill(prefill_tokens)
        record = self.colocation.result_arrived(decode=decode, requests=requests)
        if self.metrics is not None:
            if self.colocation.just_finished:
                self.metrics.requests(self.colocation.just_finished)
            if self.colocation.first_tokens:
                self.metrics.first_tokens(self.colocation.first_tokens)
            if record is not None:
                self.metrics.interval(record)
                self.metrics.refresh(self.colocation, self.lending)

    def went_idle(self) -> None:
        self.colocation.idle()
        self.colocation.requests.clear()

    def prefill_waits(self, *, decoding: bool) -> bool:
        """Whether the next prefill waits one decode step (``CoLocation.prefill_waits``)."""
        if self.colocation.prefill_waits(decoding=decoding):
            self.steps.record_deferred_prefill()
            return True
        return False

    @property
    def device_timed(self) -> bool:
        """Whether decode steps are timed by device events (CUDA) rather than by the host's clock."""
        return isinstance(self.stopwatch, EventStopwatch)

    def reclaim_kv(self) -> None:
        """Lent KV pages come back now if decode needs them (before SGLang admits or grows anything)."""
        self.lending.ensure_reserve()

    def refresh_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.refresh(self.colocation, self.lending)

    # -- training ------------------------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        return self.runner.has_work

    def train(self, place: Callable[[], Slot | None], *, should_yield: Callable[[], bool]) -> None:
        """Use one place in the loop for finetune work (``core.runner.runner.UnitRunner.train``)."""
        self.runner.train(place, should_yield=should_yield)

    # -- stats ---------------------------------------------------------------------------------------
    def capacity(self, request: GetCapacity) -> FleetCapacity:
        memory = self.lending.snapshot()
        return FleetCapacity(
            finetunes=self._unsupported is None and self.host.serving_limits().enable_lora,
            active_jobs=self.jobs.book.active(),
            free_share=max(0.0, 1.0 - self.colocation.decode_busy_fraction()),
            finetune_tokens_per_s=self.colocation.finetune_tokens_per_s(),
            lendable_tokens=memory.free_tokens if memory.enabled else 0,
            store_port=self.rendezvous.port if self.rendezvous is not None else None,
        )

    def stats(self, request: GetStats | None = None) -> HarliStats:
        states = [job.state for job in self.jobs.book.all()]
        durable = self.jobs.durable
        finetune = FinetuneStats(
            jobs={s: states.count(s) for s in ("queued", "running", "publishing", *sorted(FINISHED_STATES))},
            training=self.finetuning.training,
            base_weights=self.finetuning.starter.base_weights,
            output_dir=str(Path(self.jobs.store.root)),
            state_dir=str(durable.root) if durable else None,
            profile=self.profile.stats,
            partitions=self.partitioner.describe(),
            memory=self.lending.snapshot(),
        )
        return HarliStats(
            **msgspec.structs.asdict(self.steps.snapshot()),
            finetune=finetune,
            colocation=self.colocation.snapshot(),
        )
