"""A finetune job as a work source, from its start to its last unit; and the starter that makes one.

Starting a job is an explicit step (``JobStarter.start_next``): bind the served weights as the trainer's
frozen base (``Host.bind_model``), build the trainer, restore its newest checkpoint. The job is then a
``WorkSource`` (``core.runner.source``) in the runner's ``SourceOrder``: its units are the trainer's, or an
evaluation pass's while one runs. Between optimizer steps it checkpoints, publishes and evaluates as the
job's spec asks; an evaluation pass runs as units too, admitted by the same policy. When training ends
the final adapter (the best eval's, with ``publish: "best"``) goes to ``core.jobs.publishing``. Any
exception from a job fails that job, never the scheduler.

A job trained on several instances (``core.fleet.local_sgd``) averages its adapter with the group's at each
due optimizer step: the average runs in the group's thread while the job offers no units (decode goes on),
and what follows the step (checkpoint, publish, finish) waits for the average, so every member publishes
the same weights.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sglang_harli.core.colocation.work import FinetuneWork, look_ahead
from sglang_harli.core.fleet.group import Contribution
from sglang_harli.core.fleet.local_sgd import LocalSgd
from sglang_harli.core.jobs.book import JobStatus
from sglang_harli.core.jobs.control import JobControl
from sglang_harli.core.jobs.evaluation import EvalPass, EvalTracker
from sglang_harli.core.jobs.publishing import Publishing
from sglang_harli.core.jobs.store import JobStoreError
from sglang_harli.core.runner.host import Host, Lending
from sglang_harli.core.runner.order import SourceOrder
from sglang_harli.core.runner.source import UnitMeter, WorkSource
from sglang_harli.core.training.lora import training_mode
from sglang_harli.core.training.memory import TrainerMemoryError
from sglang_harli.core.training.trainer import LoraTrainer

logger = logging.getLogger(__name__)

START_WITHIN_S = 2.0
"""A queued job starts in idle time; under unbroken decode load it starts anyway after this long."""


class JobStarter:
    """Starts queued jobs, one at a time in submission order, as work sources in ``order``."""

    def __init__(
        self,
        host: Host,
        *,
        jobs: JobControl,
        publishing: Publishing,
        order: SourceOrder,
        lending: Lending,
        layers_per_unit: int,
        checkpoint_every_steps: int,
        tensor_parallel=None,
        metrics=None,
        rendezvous=None,
        on_release: Callable[[], None] = lambda: None,
    ):
        self.host, self.jobs, self.publishing, self.order, self.lending = (
            host,
            jobs,
            publishing,
            order,
            lending,
        )
        self.layers_per_unit, self.checkpoint_every_steps = layers_per_unit, checkpoint_every_steps
        self.tensor_parallel, self.metrics, self.rendezvous = tensor_parallel, metrics, rendezvous
        self.on_release = on_release  # the trainer is let go: the predictor's fit is worth caching
        self.active: JobSource | None = None
        self.base_weights: dict[str, int] | None = None
        """The latest bound model's parameter count, and how many share storage with the server."""
        jobs.on_cancel = self._cancelled

    @property
    def queued(self) -> bool:
        return self.jobs.book.next_queued() is not None

    def start_due(self, *, may_start: bool) -> bool:
        """Start the next queued job if it may start now (``may_start``) or has waited long; True if one
        started."""
        if self.active is not None:
            return False
        queued = self.jobs.book.next_queued()
        if queued is None or not (may_start or time.time() - queued.created_at > START_WITHIN_S):
            return False
        return self.start_next()

    def start_next(self) -> bool:
        """Start the next queued job, if any; True if one is training now."""
        job = self.jobs.book.next_queued()
        if job is None:
            return False
        self.jobs.book.start(job)
        try:
            source = JobSource(self, job)
        except Exception as exc:
            logger.error(
                "finetune job %s failed: %s", job.name, exc, exc_info=not isinstance(exc, JobStoreError)
            )
            self.jobs.book.finish(job, "failed", f"{type(exc).__name__}: {exc}")
            self.jobs.save(job)
            return self.start_next()
        self.active = source
        self.order.add(source)
        self.jobs.save(job)
        logger.info("finetune job %s started: base weights %s", job.name, self.base_weights)
        return True

    def released(self, source: JobSource) -> None:
        self.order.remove(source)
        if self.active is source:
            self.active = None

    def _cancelled(self, job: JobStatus) -> None:
        if self.active is not None and self.active.job is job:
            self.active.release()


class JobSource(WorkSource):
    """One started job: its trainer over the served weights, its evaluation and its group, if any."""

    def __init__(self, starter: JobStarter, job: JobStatus):
        self.starter, self.job, self.name = starter, job, job.name
        self.jobs, self.lending, self.metrics = starter.jobs, starter.lending, starter.metrics
        examples, self.eval_data = self.jobs.take_data(job)
        self.eval_probes = self.eval_data.probes if self.eval_data is not None else []
        rehearsal = examples[len(examples) - job.rehearsal_examples :] if job.rehearsal_examples else []
        examples = examples[: len(examples) - len(rehearsal)]
        self.tracker = EvalTracker.for_job(job, self.eval_data) if self.eval_data is not None else None
        self.eval_pass: EvalPass | None = None
        self._final_eval = False  # the pass in progress is the last one, and publishing waits for it
        self._publish_after = False  # a periodic version waits for the pass in progress to keep the floor
        self.local_sgd: LocalSgd | None = None
        self._after_average: Callable[[], None] | None = None
        with training_mode():
            model, starter.base_weights = starter.host.bind_model(starter.tensor_parallel)
            self.trainer: LoraTrainer | None = LoraTrainer(
                model,
                examples,
                job.spec.lora,
                job.spec.training,
                layers_per_unit=starter.layers_per_unit,
                saved_tensor_hooks=self.lending.hooks,
                on_micro_batch_end=self.lending.micro_batch_done,
                place_grads=self.lending.place_grads,
                tensor_parallel=starter.tensor_parallel,
                rehearsal=rehearsal,
                rehearsal_ratio=job.spec.rehearsal.ratio if job.spec.rehearsal is not None else 0.0,
            )
            if job.group is not None:
                self.local_sgd = LocalSgd(job.group, starter.rendezvous)
            checkpoints = self.jobs.checkpoints(job)
            checkpoint = checkpoints.latest() if checkpoints is not None else None
            if checkpoint is not None:
                self.trainer.restore(checkpoint)
            self.lending.attach(self.trainer)
        job.total_steps = self.trainer.total_steps
        self._tokens_at_start = self.trainer.tokens_trained  # what a resumed job had trained before this run
        if checkpoint is not None:
            job.checkpoint_step = checkpoint.progress.step
            self._sync()
            logger.info("finetune job %s resumed from its checkpoint at step %d", job.name, job.step)

    # -- WorkSource ----------------------------------------------------------------------------------
    @property
    def pending(self) -> bool:
        return self.trainer is not None

    def ready(self) -> bool:
        """False while the group's average is out; once it is in, load it and go on with what followed
        the step."""
        if self.trainer is None:
            return False
        if self.local_sgd is None or not self.local_sgd.pending:
            return True
        try:
            average = self.local_sgd.poll()
            if average is None:
                return False
            self.trainer.load_lora_state(average)
        except Exception as exc:  # the group is gone for this member: its copy of the job fails
            self._fail(exc, traceback=not isinstance(exc, RuntimeError))
            return False
        then, self._after_average = self._after_average, None
        self.jobs.save(self.job)
        then()
        return self.trainer is not None

    def upcoming(self) -> list[FinetuneWork]:
        """The evaluation pass's units while one runs, else training's."""
        source = self.eval_pass if self.eval_pass is not None else self.trainer
        return source.peek(look_ahead(self.trainer.units_per_micro_batch))

    def run_one(self, meter: UnitMeter) -> bool:
        trainer = self.trainer
        if self.eval_pass is not None:
            with meter.unit(self.eval_pass.peek(1)[0]):
                self.eval_pass.run_unit()
            if self.eval_pass.done:
                self._evaluated()
            return True
        work = trainer.peek(1)[0]
        if work.kind == "forward" and not trainer.in_flight and not self.lending.prepare(work.tokens):
            return False  # not enough memory to start a micro-batch now; decode keeps its pages
        step_before = trainer.step
        try:
            with meter.unit(work) as unit:
                tokens_before = trainer.tokens_trained
                more = trainer.run_unit()
                unit.tokens = trainer.tokens_trained - tokens_before
        except TrainerMemoryError as exc:
            if trainer.in_flight and self.lending.out_of_memory():
                logger.info("finetune job %s: %s; replaying it with a larger loan", self.name, exc)
                return False
            raise
        self._sync()
        if not more:
            self._after_step(self._trained)
        elif trainer.step != step_before:
            self._after_step(self._step_done)
        return True

    def fail(self, exc: Exception) -> None:
        self._fail(exc, traceback=not isinstance(exc, TrainerMemoryError))

    # -- progress ------------------------------------------------------------------------------------
    def _sync(self) -> None:
        sync_progress(self.job, self.trainer, self._tokens_at_start)

    def _after_step(self, then: Callable[[], None]) -> None:
        """After an optimizer step: ``then`` now, or, in a group at a due step, once the average is in."""
        trainer = self.trainer
        if self.local_sgd is None or not self.local_sgd.due(trainer.step):
            then()
            return
        mine = Contribution(
            steps=trainer.step, tokens_trained=trainer.tokens_trained, examples=self.job.examples
        )
        self.local_sgd.start(trainer.lora_state(), mine)
        self._after_average = then

    def _step_done(self) -> None:
        """After an optimizer step: checkpoint (then publish) when one is due; evaluate when due."""
        job, trainer = self.job, self.trainer
        publish, checkpoint = job.spec.publish.every_steps, self.starter.checkpoint_every_steps
        publish_now = bool(publish) and trainer.step % publish == 0
        if publish_now or (checkpoint and trainer.step % checkpoint == 0):
            self.jobs.checkpoint(job, trainer)
        floor = self.tracker is not None and self.tracker.floor is not None
        if publish_now and not floor:
            self.starter.publishing.publish(job, trainer)
        every = job.spec.eval.every_steps if job.spec.eval is not None else 0
        due = self.eval_data is not None and every and trainer.step % every == 0
        if due or (publish_now and floor):  # with a floor, a periodic version is evaluated first
            self._publish_after = publish_now and floor
            self._start_eval(final=False)

    def _trained(self) -> None:
        """The last unit ran: checkpoint, then evaluate the final adapter (if the job evaluates) before
        publishing it."""
        self.jobs.checkpoint(self.job, self.trainer)
        if self.eval_data is not None:
            self._start_eval(final=True)
        else:
            self._finish()

    # -- evaluation ----------------------------------------------------------------------------------
    def _start_eval(self, *, final: bool) -> None:
        host = self.starter.host
        self.eval_pass = EvalPass(
            self.trainer,
            self.eval_data,
            step=self.trainer.step,
            micro_batch_size=self.job.spec.training.micro_batch_size,
            eos_ids=host.eos_ids,
            decode=lambda ids: host.tokenizer.decode(ids, skip_special_tokens=True),
        )
        self._final_eval = final
        if self.eval_pass.done:  # nothing to score
            self._evaluated()

    def _evaluated(self) -> None:
        job, record = self.job, self.eval_pass.result()
        self.eval_pass = None
        job.evals.append(record)
        job.eval_loss, job.eval_accuracy = record.loss, record.accuracy
        job.retention_kept, job.retention_total = record.retention_kept, record.retention_total
        self.tracker.observe(record, self.trainer.lora_state)
        job.best_step, job.floor_breaches = self.tracker.best_step, self.tracker.breaches
        if self.metrics is not None:
            self.metrics.evaluation(job.name, record)
        logger.info(
            "finetune job %s eval at step %d: loss %s, accuracy %s, retention %s/%s%s",
            job.name, record.step, record.loss, record.accuracy, record.retention_kept,
            record.retention_total, " (below the floor)" if record.kept_floor is False else "",
        )  # fmt: skip
        if self._publish_after:
            self._publish_after = False
            if record.kept_floor:
                self.starter.publishing.publish(job, self.trainer, record=record)
            else:
                logger.info("finetune job %s: the version of step %d is below the retention floor; "
                            "not published", job.name, record.step)  # fmt: skip
        if self._final_eval:
            self._finish()
        elif self.tracker.should_stop:
            job.stopped_early = True
            logger.info("finetune job %s stops early: %s", job.name, self.tracker.stop_reason)
            self._finish()
        else:
            self.jobs.save(job)

    # -- letting go ----------------------------------------------------------------------------------
    def _finish(self) -> None:
        """Publish the final version (the best eval's adapter with ``publish: "best"``) and let go; with a
        retention floor, only an adapter an evaluation found keeping it (else the job fails)."""
        job, trainer, tracker = self.job, self.trainer, self.tracker
        step, record = trainer.step, (job.evals[-1] if job.evals else None)
        if tracker is not None and tracker.floor is not None:
            step, weights = tracker.choose(job.evals, trainer.step, job.spec.publish.version)
            if step is None:
                self._forgot()
                return
            if weights is not None:
                trainer.load_lora_state(weights)
            record = next((r for r in job.evals if r.step == step), None)
        elif job.spec.publish.version == "best" and tracker is not None and tracker.best_weights:
            trainer.load_lora_state(tracker.best_weights)
            step = tracker.best_step
            record = next((r for r in job.evals if r.step == step), record)
        self.starter.publishing.publish(job, trainer, step=step, final=True, record=record)
        self.release()
        logger.info("finetune job %s trained; publishing the adapter of step %d", job.name, step)

    def _forgot(self) -> None:
        """No evaluation kept the retention floor: nothing is published; the adapter that kept the most
        probes stays in the job's directory, and the job fails naming the probes it lost."""
        job, trainer, tracker = self.job, self.trainer, self.tracker
        if tracker.most_kept_weights is not None:
            trainer.load_lora_state(tracker.most_kept_weights)
        path = self.starter.publishing.store.job_dir(job.name) / "forgot"
        trainer.save_adapter(str(path))
        job.unpublished_path = str(path)
        error = tracker.forgot(job.evals[-1], self.eval_probes, path)
        logger.error("finetune job %s failed: %s", job.name, error)
        self.jobs.book.finish(job, "failed", error)
        self.release()
        self.jobs.save(job)

    def _fail(self, exc: Exception, *, traceback: bool) -> None:
        logger.error("finetune job %s failed: %s", self.name, exc, exc_info=traceback)
        self.jobs.book.finish(self.job, "failed", f"{type(exc).__name__}: {exc}")
        self.release()
        self.jobs.save(self.job)

    def release(self) -> None:
        """Let go of the trainer, its pages and its group."""
        if self.trainer is not None:
            self.starter.on_release()
            self.lending.detach()
        if self.local_sgd is not None:
            self.local_sgd.close()
        self.trainer, self.local_sgd, self._after_average = None, None, None
        self.eval_data, self.tracker, self.eval_pass = None, None, None
        self.starter.released(self)


def sync_progress(job: JobStatus, trainer: LoraTrainer, tokens_at_start: int) -> None:
    """A job's progress as its trainer stands (``tokens_at_start``: what a resumed job had trained before
    this server run, left out of its tokens/s)."""
    job.step, job.epoch, job.tokens_trained, job.loss = (
        trainer.step,
        min(trainer.epoch + 1, job.epochs),
        trainer.tokens_trained,
        trainer.loss,
    )
    elapsed = time.time() - (job.started_at or time.time())
    trained = trainer.tokens_trained - tokens_at_start
    job.tokens_per_s = trained / elapsed if elapsed > 0 else None
