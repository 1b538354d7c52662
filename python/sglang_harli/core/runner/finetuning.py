"""``Finetuning``: the scheduler-side rooms of finetuning, wired once.

The job book's commands (``core.jobs.control``), publishing (``core.jobs.publishing``), the job starter
and the Tinker training clients (``core.jobs.source``, ``core.tinker.models``) as work sources, the one
scheduling object over them (``SourceOrder``) and the unit runner. ``handlers`` maps each control request
(``core.wire.control``) these rooms answer to its handler.

SGLang's side (``srt.finetune.FinetuneService``) builds it over the real scheduler (``srt.host``), with KV
lending, tensor-parallel agreement and metrics; the engine-free tests build it over a fake host, so the
whole lifecycle of jobs and Tinker clients runs there without a server.
"""

from __future__ import annotations

from collections.abc import Callable

from sglang_harli.core.colocation.loop import CoLocation
from sglang_harli.core.colocation.partition import Partitioner
from sglang_harli.core.colocation.timing import Stopwatch
from sglang_harli.core.config import HarliConfig
from sglang_harli.core.jobs.adapters import AdapterStore
from sglang_harli.core.jobs.control import JobControl
from sglang_harli.core.jobs.publishing import Publishing
from sglang_harli.core.jobs.source import JobStarter
from sglang_harli.core.jobs.store import JobStore
from sglang_harli.core.runner.host import SOLO, Agreement, Host, Lending
from sglang_harli.core.runner.order import SourceOrder
from sglang_harli.core.runner.runner import UnitRunner
from sglang_harli.core.tinker.models import MAX_MODELS, TinkerModels
from sglang_harli.core.training.memory import ActivationStore, TrainerMemory
from sglang_harli.core.wire import control
from sglang_harli.models.builtin import cache_root


class Finetuning:
    def __init__(
        self,
        host: Host,
        config: HarliConfig,
        *,
        colocation: CoLocation,
        partitioner: Partitioner,
        stopwatch: Stopwatch,
        lending: Lending | None = None,
        agreement: Agreement = SOLO,
        tensor_parallel=None,
        metrics=None,
        rendezvous=None,
        unsupported: str | None = None,
        on_release: Callable[[], None] = lambda: None,
    ):
        """``lending``: where a job's trainer keeps its activations (default: ordinary memory, no budget);
        ``unsupported``: why this server cannot finetune at all, if it cannot (jobs are refused with
        it); ``rendezvous``: with --harli-peers, this instance's store for jobs trained on several
        instances; ``on_release``: a job let go of its trainer."""
        lending = lending if lending is not None else TrainerMemory(ActivationStore())
        self.store = AdapterStore(config.output_dir or cache_root() / "adapters")
        self.jobs = JobControl(
            max_jobs=config.max_jobs,
            store=self.store,
            durable=JobStore(config.state_dir) if config.state_dir else None,
            limits=host.serving_limits,
            unsupported=unsupported,
            tensor_parallel=tensor_parallel is not None,
            fleet=rendezvous is not None,
        )
        self.publishing = Publishing(
            jobs=self.jobs, store=self.store, writes=agreement.leader, send=host.publish
        )
        self.order = SourceOrder()
        self.starter = JobStarter(
            host,
            jobs=self.jobs,
            publishing=self.publishing,
            order=self.order,
            lending=lending,
            layers_per_unit=config.layers_per_unit,
            checkpoint_every_steps=config.checkpoint_every_steps,
            tensor_parallel=tensor_parallel,
            metrics=metrics,
            rendezvous=rendezvous,
            on_release=on_release,
        )
        self.tinker = TinkerModels(
            host, self.order, max_models=MAX_MODELS, layers_per_unit=config.layers_per_unit
        )
        self.runner = UnitRunner(
            self.order,
            self.starter,
            colocation=colocation,
            partitioner=partitioner,
            stopwatch=stopwatch,
            agreement=agreement,
            metrics=metrics,
        )
        self.handlers: dict[type[control.ControlRequest], Callable] = {
            control.SubmitJob: self.jobs.submit,
            control.ListJobs: self.jobs.list,
            control.GetJob: self.jobs.get,
            control.CancelJob: self.jobs.cancel,
            control.AdapterServed: self.publishing.served,
            control.AdaptersToServe: self.publishing.to_serve,
            control.TinkerCreateModel: self.tinker.create,
            control.TinkerForwardBackward: self.tinker.forward_backward,
            control.TinkerOptimStep: self.tinker.optim_step,
            control.TinkerSave: self.tinker.save,
            control.TinkerLoad: self.tinker.load,
            control.TinkerDropModel: self.tinker.drop,
        }
        """Each control request these rooms answer, to its handler (``GetStats`` and ``GetCapacity`` are the
        façade's)."""

    @property
    def has_work(self) -> bool:
        return self.runner.has_work

    @property
    def training(self) -> str | None:
        """The name of the job training now, if one is."""
        return self.starter.active.name if self.starter.active is not None else None
