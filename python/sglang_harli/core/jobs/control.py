"""The job book's commands: submit, list, get and cancel, and the durable record behind them.

A submitted job waits here with its tokenized examples (and eval data) until the unit runner starts it
(``take_data``). With ``--harli-state-dir`` every change is recorded (``core.jobs.store``), so a restart
takes the book back: unfinished jobs queue again and resume from their newest checkpoint when they start,
and every job's newest adapter is served again before the server reports healthy (``core.jobs.publishing``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import msgspec

from sglang_harli.core.errors import NotAvailable, SpecError, StorageFailed, TooManyJobs
from sglang_harli.core.fleet.group import GroupStatus
from sglang_harli.core.jobs.adapters import AdapterStore
from sglang_harli.core.jobs.book import FINISHED_STATES, JobBook, JobStatus
from sglang_harli.core.jobs.data import Example
from sglang_harli.core.jobs.eval_data import EvalData
from sglang_harli.core.jobs.spec import ServingLimits, check_servable
from sglang_harli.core.jobs.store import JobStore
from sglang_harli.core.training.trainer import LoraTrainer, plan_steps, rehearsed_per_epoch
from sglang_harli.core.wire.control import CancelJob, GetJob, ListJobs, SubmitJob

logger = logging.getLogger(__name__)


class JobControl:
    def __init__(
        self,
        *,
        max_jobs: int,
        store: AdapterStore,
        durable: JobStore | None,
        limits: Callable[[], ServingLimits],
        unsupported: str | None,
        tensor_parallel: bool,
        fleet: bool = False,
    ):
        self.book = JobBook()
        self.store, self.durable = store, durable
        self.max_jobs = max_jobs
        self._limits = limits
        self._unsupported = unsupported  # why this server cannot finetune at all, if it cannot
        self._tensor_parallel = tensor_parallel
        self._fleet = fleet  # --harli-peers: jobs may be trained on several instances
        self._examples: dict[str, list[Example]] = {}  # without --harli-state-dir, until the job starts
        self._eval_data: dict[str, EvalData] = {}
        self.on_cancel: Callable[[JobStatus], None] = lambda job: None
        """Set by the unit runner: let go of a cancelled job that is training."""
        if durable is not None:
            self._restore()

    # -- commands ------------------------------------------------------------------------------------
    def submit(self, request: SubmitJob) -> JobStatus:
        spec = request.spec
        check_servable(spec, self._limits())
        if self._unsupported:
            raise NotAvailable("name", f"finetuning is not available on this server: {self._unsupported}")
        trained = request.count - request.rehearsal
        if trained <= 0:
            raise SpecError("dataset", "no trainable examples")
        if spec.eval is not None and self._tensor_parallel:
            raise NotAvailable("eval", "evaluation is not available with --tp-size above 1 yet")
        if request.group is not None and not self._fleet:
            raise NotAvailable("training.instances", "this instance runs without --harli-peers")
        if request.group is not None and self._tensor_parallel:
            raise NotAvailable("training.instances", "is not available with --tp-size above 1 yet")
        if self.book.active() >= self.max_jobs and self.book.name_is_free(spec.name):
            raise TooManyJobs(
                "name",
                f"{self.book.active()} jobs are queued or running, the most this server takes "
                "(--harli-max-jobs); retry when one has finished",
            )
        stored = msgspec.structs.replace(spec, dataset=msgspec.structs.replace(spec.dataset, records=None))
        output_dir = str(self.store.job_dir(spec.name))
        if self.durable is not None:
            self.durable.job_dir(spec.name)  # a name that cannot be stored is refused before it is taken
        ratio = spec.rehearsal.ratio if spec.rehearsal is not None else 0.0
        per_epoch = trained + rehearsed_per_epoch(trained, request.rehearsal, ratio)
        job = self.book.submit(
            stored,
            examples=trained,
            total_steps=plan_steps(per_epoch, spec.training),
            output_dir=output_dir,
        )
        job.rehearsal_examples = request.rehearsal
        if request.group is not None:
            job.group = GroupStatus(assignment=request.group)
        if self.durable is not None:
            try:
                self.durable.add(job, request.staged, request.evaluation)
            except OSError as exc:  # a job that is not on disk is not acknowledged
                self.book.forget(spec.name)
                raise StorageFailed(
                    "name", f"could not record the job under --harli-state-dir: {exc}"
                ) from None
        else:
            self._examples[spec.name] = request.examples
            if request.evaluation is not None:
                self._eval_data[spec.name] = request.evaluation
        logger.info("finetune job %s queued: %d examples, %d steps", job.name, job.examples, job.total_steps)
        return job

    def list(self, request: ListJobs) -> list[JobStatus]:
        return self.book.all()

    def get(self, request: GetJob) -> JobStatus:
        return self.book.get(request.name)

    def cancel(self, request: CancelJob) -> JobStatus:
        job = self.book.cancel(request.name)
        self._examples.pop(request.name, None)
        self._eval_data.pop(request.name, None)
        self.on_cancel(job)
        self.save(job)
        logger.info("finetune job %s cancelled", request.name)
        return job

    # -- for the unit runner -------------------------------------------------------------------------
    def take_data(self, job: JobStatus) -> tuple[list[Example], EvalData | None]:
        """The examples and eval data ``job`` was submitted with; ``JobStoreError`` if stored ones are
        damaged."""
        examples = self._examples.pop(job.name, None)
        if examples is None and self.durable is not None:
            examples = self.durable.examples(job.name)
        evaluation = self._eval_data.pop(job.name, None)
        if evaluation is None and self.durable is not None and job.spec.eval is not None:
            evaluation = self.durable.evaluation(job.name)
        return examples, evaluation

    def save(self, job: JobStatus) -> None:
        if self.durable is not None:
            if job.state in FINISHED_STATES:
                self.durable.finished(job)
            else:
                self.durable.save(job)

    def checkpoint(self, job: JobStatus, trainer: LoraTrainer) -> None:
        if self.durable is not None:
            job.checkpoint_step = trainer.step
            self.durable.checkpoint(job.name, trainer.state(), job)

    def checkpoints(self, job: JobStatus):
        """The job's checkpoint directory, or ``None`` without --harli-state-dir."""
        return self.durable.checkpoints(job.name) if self.durable is not None else None

    # -- durable state -------------------------------------------------------------------------------
    def _restore(self) -> None:
        """Take back the jobs of the previous run: unfinished ones queue again and resume from their
        newest checkpoint when they start; a job that was publishing waits for its adapter to be served
        again (``core.jobs.publishing``)."""
        for job in self.durable.load():
            for version in job.published:
                version.loaded, version.error = False, None
            if job.group is not None and job.state in ("queued", "running"):
                # Its group averaged on without it; a copy that rejoined would hold other weights.
                self.book.restore(job)
                self.book.finish(
                    job, "failed", "this instance restarted while training its share; the group went on"
                )
                continue
            if job.state == "running":
                last = job.published[-1] if job.published else None
                if last is not None and (last.final or last.step >= job.total_steps):
                    job.state = "publishing"  # recorded by a server that had no such state yet
                else:
                    job.state, job.resumes = "queued", job.resumes + 1
            self.book.restore(job)
            logger.info("finetune job %s restored (%s, step %d)", job.name, job.state, job.step)
