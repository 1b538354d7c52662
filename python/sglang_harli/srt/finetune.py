"""``FinetuneService``: the finetune side of one SGLang scheduler, and the one thing the scheduler talks to.

It lives inside SGLang's scheduler process because that is where the served weights are: the trainer's
frozen base is a set of views of ``model_runner.model`` (``srt.weights``). It composes the rooms, each in
a file named for its one job, and wires them once:

- ``srt.job_control``  the job book's commands (submit, list, get, cancel) and the durable record;
- ``srt.unit_runner``  the one job at work: start, coming units, run a plan, evaluate, finish;
- ``srt.publishing``   write an adapter version, ask the tokenizer manager to serve it, hear back;
- ``srt.profiling``    the start-up profile of unit costs and the predictor cache;
- ``core.colocation``  the token-interval events, the latency predictor and the QoS policy.

The scheduler (``srt.scheduler``) reports loop events here, asks ``train`` to use a place in its loop,
and hands over control requests (``handle``). With ``--tp-size N`` every rank trains its slice; rank 0
decides when (``srt.tensor_parallel``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec

from sglang_harli.core.adapter_store import AdapterStore
from sglang_harli.core.colocation import CoLocation
from sglang_harli.core.config import HarliConfig
from sglang_harli.core.control import (
    AdapterServed,
    AdaptersToServe,
    CancelJob,
    GetCapacity,
    GetJob,
    GetStats,
    ListJobs,
    SubmitJob,
    TinkerCreateModel,
    TinkerDropModel,
    TinkerForwardBackward,
    TinkerLoad,
    TinkerOptimStep,
    TinkerSave,
)
from sglang_harli.core.fleet import FleetCapacity
from sglang_harli.core.job_store import JobStore
from sglang_harli.core.jobs import FINISHED_STATES, ServingLimits
from sglang_harli.core.local_sgd import host_store
from sglang_harli.core.partition import make_partitioner
from sglang_harli.core.plan import BesideDecode, IdleSlice, Slot, WorkPlan
from sglang_harli.core.predictor import DecodeShape
from sglang_harli.core.stats import FinetuneStats, HarliStats, StepRecorder
from sglang_harli.core.tensor_parallel import TensorParallelError
from sglang_harli.core.timing import EventStopwatch, Timing, stopwatch
from sglang_harli.core.tpot import RequestTokens
from sglang_harli.models.builtin import cache_root
from sglang_harli.srt.control import ControlDispatcher, HarliControlReq, HarliControlReqOutput
from sglang_harli.srt.job_control import JobControl
from sglang_harli.srt.lending import KvLending
from sglang_harli.srt.metrics import HarliMetrics
from sglang_harli.srt.profiling import StartupProfile
from sglang_harli.srt.publishing import Publishing
from sglang_harli.srt.tensor_parallel import RankAgreement, training_group
from sglang_harli.srt.tinker_models import MAX_MODELS, TinkerModels
from sglang_harli.srt.unit_runner import UnitRunner

logger = logging.getLogger(__name__)

# SGLang's fused LoRA module names -> the PEFT names they serve.
_SERVED_AS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "o_proj": ("o_proj",),
    "down_proj": ("down_proj",),
}


class FinetuneService:
    def __init__(self, scheduler, config: HarliConfig):
        self.scheduler, self.config = scheduler, config
        self.steps = StepRecorder(config)
        self.metrics = None
        if scheduler.server_args.enable_metrics:
            labels = dict(getattr(scheduler.metrics_collector, "labels", None) or {})
            self.metrics = HarliMetrics(labels, config.tpot_slo_ms / 1e3)
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
        store = AdapterStore(config.output_dir or cache_root() / "adapters")
        self.jobs = JobControl(
            max_jobs=config.max_jobs,
            store=store,
            durable=JobStore(config.state_dir) if config.state_dir else None,
            limits=self.limits,
            unsupported=unsupported,
            tensor_parallel=tensor_parallel is not None,
            fleet=self.rendezvous is not None,
        )
        self.publishing = Publishing(
            jobs=self.jobs,
            store=store,
            writes=self.agreement.leader,
            send=lambda message: scheduler.ipc_channels.send_to_tokenizer.send_output(message),
        )
        send = lambda message: scheduler.ipc_channels.send_to_tokenizer.send_output(message)  # noqa: E731
        self.tinker = TinkerModels(
            scheduler, max_models=MAX_MODELS, layers_per_unit=config.layers_per_unit, send=send
        )
        self.runner = UnitRunner(
            scheduler,
            layers_per_unit=config.layers_per_unit,
            checkpoint_every_steps=config.checkpoint_every_steps,
            jobs=self.jobs,
            publishing=self.publishing,
            colocation=self.colocation,
            partitioner=self.partitioner,
            lending=self.lending,
            agreement=self.agreement,
            tensor_parallel=tensor_parallel,
            stopwatch=self.stopwatch,
            on_release=lambda: self.profile.save(self.colocation.predictor),
            metrics=self.metrics,
            rendezvous=self.rendezvous,
            tinker=self.tinker,
        )
        self.handle: Callable[[HarliControlReq], HarliControlReqOutput] = ControlDispatcher(
            {
                SubmitJob: self.jobs.submit,
                ListJobs: self.jobs.list,
                GetJob: self.jobs.get,
                CancelJob: self.jobs.cancel,
                GetStats: self.stats,
                GetCapacity: self.capacity,
                AdapterServed: self.publishing.served,
                AdaptersToServe: self.publishing.to_serve,
                TinkerCreateModel: self.tinker.create,
                TinkerForwardBackward: self.tinker.forward_backward,
                TinkerOptimStep: self.tinker.optim_step,
                TinkerSave: self.tinker.save,
                TinkerLoad: self.tinker.load,
                TinkerDropModel: self.tinker.drop,
            }
        )
        """Answer one control request (``core.control``) from the HTTP side."""
        self.profile.run(self.colocation.predictor, skip=bool(unsupported) or not self.limits().enable_lora)

    def limits(self) -> ServingLimits:
        """What SGLang's LoRA pool can serve, which a job's adapter must fit."""
        manager = getattr(self.scheduler.tp_worker.model_runner, "lora_manager", None)
        if manager is None:
            return ServingLimits(enable_lora=False)
        served = set(getattr(manager, "target_modules", None) or ())
        modules = None
        if "all" not in served:
            modules = frozenset(m for name in served for m in _SERVED_AS.get(name, ()))
        return ServingLimits(enable_lora=True, max_lora_rank=manager.max_lora_rank, target_modules=modules)

    # -- loop events ---------------------------------------------------------------------------------
    def forward_ran(
        self,
        decode: DecodeShape | None,
        seconds: float,
        *,
        device: Timing | None = None,
        nothing_waiting: bool = False,
    ) -> None:
        """A forward ran for ``seconds`` of host time (``device``: as the device timed it): a decode step
        of shape ``decode``, or (``None``) another batch."""
        self.steps.record_forward(seconds)
        if decode is not None:
            self.steps.record_decode(seconds, decode.batch_size)
        step = device if device is not None else seconds
        self.colocation.forward_ran(decode, step, nothing_waiting=nothing_waiting)

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
            if record is not None:
                self.metrics.interval(record)
                self.metrics.refresh(self.colocation, self.lending)

    def went_idle(self) -> None:
        self.colocation.idle()
        self.colocation.requests.clear()

    def prefill_waits(self, *, decoding: bool) -> bool:
        """Whether the next prefill waits one decode step, because a request arrived during finetune
        work beside decode (``CoLocation.arrival_during_work``); only while requests are ``decoding``."""
        if self.colocation.prefill_waits() and decoding:
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
        """Use one place in the loop for finetune work: ``place()`` says where (``None``: not here, the
        next forward is a prefill); a queued job starts if it may, and the policy's plan runs. With
        --tp-size N, rank 0 decides (it alone sees the request socket, and the ranks' clocks differ) and
        every rank starts the same job and runs the same units."""
        started, plan = False, None
        if self.agreement.leader:
            slot = place()
            if slot is not None:
                started = self.runner.start_due(may_start=slot.may_start)
                plan = self._plan(slot)
        if self.agreement.group is not None:
            started, plan = self.agreement.agree_plan(started, plan, self.partitioner.splits)
            if started and not self.agreement.leader and self.runner.trainer is None:
                self.runner.start_next()
        if plan is None:
            return
        ran = self.runner.run(plan, should_yield=should_yield)
        if ran and isinstance(plan, BesideDecode) and self.agreement.group is None and should_yield():
            self.colocation.arrival_during_work()

    def _plan(self, slot: Slot) -> WorkPlan | None:
        started = time.perf_counter()
        self.runner.read_costs()  # the previous interval's units, if the device has finished them
        upcoming = self.runner.upcoming()
        if not upcoming:
            return None
        admission = self.colocation.admit(slot.next_decode, upcoming, started=started)
        split = self.partitioner.split(admission.split)
        if slot.next_decode is None:
            return IdleSlice(budget_s=admission.budget_s, split=split)
        return BesideDecode(units=admission.units, split=split)

    # -- stats ---------------------------------------------------------------------------------------
    def capacity(self, request: GetCapacity) -> FleetCapacity:
        memory = self.lending.snapshot()
        return FleetCapacity(
            finetunes=self._unsupported is None and self.limits().enable_lora,
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
            training=self.runner.job.name if self.runner.job else None,
            base_weights=self.runner.base_weights,
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
