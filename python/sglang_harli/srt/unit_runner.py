"""The unit runner: the one job at work, from its start to its last unit.

Starting a job is an explicit step (``start_next``): bind the served weights as the trainer's frozen base
(``srt.weights``), build the trainer, restore its newest checkpoint. Then the scheduler asks for the
coming units (``upcoming``, a pure query the QoS policy plans on) and has the runner execute a
``core.plan`` plan: a counted prefix beside a decode step, or an idle slice. Every unit's run time goes to
the co-location loop (and so to the latency predictor). Between optimizer steps the runner checkpoints,
publishes and evaluates as the job's spec asks; an evaluation pass runs as units too, admitted by the
same policy. When training ends the final adapter (the best eval's, with ``publish: "best"``) goes to
``srt.publishing``. Any exception from a job fails that job, never the scheduler.

A job trained on several instances (``core.local_sgd``) averages its adapter with the group's at each due
optimizer step: the average runs in the group's thread while the job offers no units (decode goes on),
and what follows the step (checkpoint, publish, finish) waits for the average, so every member publishes
the same weights.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sglang_harli.core.colocation import CoLocation
from sglang_harli.core.evaluation import EvalData, EvalPass, EvalTracker
from sglang_harli.core.job_store import JobStoreError
from sglang_harli.core.jobs import JobStatus
from sglang_harli.core.local_sgd import Contribution, LocalSgd
from sglang_harli.core.memory import TrainerMemoryError
from sglang_harli.core.partition import Partitioner, SMSplit
from sglang_harli.core.plan import IdleSlice, WorkPlan
from sglang_harli.core.tensor_parallel import TensorParallel
from sglang_harli.core.timing import PendingTimings, Stopwatch
from sglang_harli.core.trainer import LoraTrainer, training_mode
from sglang_harli.core.work import FinetuneWork, look_ahead
from sglang_harli.srt.job_control import JobControl
from sglang_harli.srt.lending import KvLending
from sglang_harli.srt.publishing import Publishing
from sglang_harli.srt.tensor_parallel import RankAgreement
from sglang_harli.srt.weights import bind_training_model

logger = logging.getLogger(__name__)

# A queued job starts in idle time; under unbroken decode load it starts anyway after this long.
START_WITHIN_S = 2.0


class UnitRunner:
    def __init__(
        self,
        scheduler,
        *,
        layers_per_unit: int,
        checkpoint_every_steps: int,
        jobs: JobControl,
        publishing: Publishing,
        colocation: CoLocation,
        partitioner: Partitioner,
        lending: KvLending,
        agreement: RankAgreement,
        tensor_parallel: TensorParallel | None,
        stopwatch: Stopwatch,
        on_release: Callable[[], None],
        metrics=None,
        rendezvous=None,
        tinker=None,
    ):
        self.scheduler = scheduler
        self.layers_per_unit, self.checkpoint_every_steps = layers_per_unit, checkpoint_every_steps
        self.jobs, self.publishing, self.colocation = jobs, publishing, colocation
        self.partitioner, self.lending, self.agreement = partitioner, lending, agreement
        self.tensor_parallel, self.metrics = tensor_parallel, metrics
        # Unit costs as the device measured them, read once it has finished them (``core.timing``): at
        # once on CPU, one token interval later on CUDA, never by waiting.
        self.stopwatch = stopwatch
        self._costs: PendingTimings[tuple[FinetuneWork, str]] = PendingTimings()
        self._on_release = on_release  # the trainer is let go: the predictor's fit is worth caching
        self.trainer: LoraTrainer | None = None
        self.job: JobStatus | None = None
        self.base_weights: dict[str, int] | None = None
        self._tokens_at_start = 0  # tokens a resumed job had trained before this run
        # The running job's evaluation: its data, best-so-far tracking, and the pass in progress if any.
        self.eval_data: EvalData | None = None
        self.tracker: EvalTracker | None = None
        self.eval_pass: EvalPass | None = None
        self._final_eval = False  # the pass in progress is the last one, and publishing waits for it
        # A job trained on several instances: its group, and what follows the step whose average is out.
        self._rendezvous = rendezvous
        self.local_sgd: LocalSgd | None = None
        self._after_average: Callable[[], None] | None = None
        self.tinker = tinker
        """The Tinker API's training clients (``srt.tinker_models``): their units go before a job's."""
        jobs.on_cancel = self._cancelled

    @property
    def has_work(self) -> bool:
        return (
            self.trainer is not None
            or self.jobs.book.next_queued() is not None
            or self._tinker_busy() is not None
        )

    def _tinker_busy(self):
        return self.tinker.busy if self.tinker is not None else None

    # -- starting ------------------------------------------------------------------------------------
    def start_due(self, *, may_start: bool) -> bool:
        """Start the next queued job if it may start now (``may_start``) or has waited long; True if one
        started."""
        if self.trainer is not None:
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
            checkpoint = self._build_trainer(job)
        except Exception as exc:
            self._fail(job, exc, traceback=not isinstance(exc, JobStoreError))
            return self.jobs.book.next_queued() is not None and self.start_next()
        self.job = job
        job.total_steps = self.trainer.total_steps
        self._tokens_at_start = self.trainer.tokens_trained
        if checkpoint is not None:
            job.checkpoint_step = checkpoint.progress.step
            self._sync(job, self.trainer)
            logger.info("finetune job %s resumed from its checkpoint at step %d", job.name, job.step)
        self.jobs.save(job)
        logger.info("finetune job %s started: base weights %s", job.name, self.base_weights)
        return True

    def _build_trainer(self, job: JobStatus):
        """The job's trainer over the served weights, its eval tracking, and the checkpoint it resumed
        from (or ``None``)."""
        examples, self.eval_data = self.jobs.take_data(job)
        if self.eval_data is not None:
            stopping = job.spec.training.early_stopping
            self.tracker = EvalTracker(
                patience=stopping.patience if stopping else None,
                min_delta=stopping.min_delta if stopping else 0.0,
                keep_best=job.spec.publish.version == "best",
            )
            self.tracker.restore_from(job.evals)
        with training_mode():
            model, self.base_weights = bind_training_model(
                self.scheduler.tp_worker.model_runner.model,
                self.scheduler.server_args.model_path,
                self.tensor_parallel,
            )
            self.trainer = LoraTrainer(
                model,
                examples,
                job.spec.lora,
                job.spec.training,
                layers_per_unit=self.layers_per_unit,
                saved_tensor_hooks=self.lending.hooks,
                on_micro_batch_end=self.lending.micro_batch_done,
                place_grads=self.lending.place_grads,
                tensor_parallel=self.tensor_parallel,
            )
            if job.group is not None:
                self.local_sgd = LocalSgd(job.group, self._rendezvous)
            checkpoints = self.jobs.checkpoints(job)
            checkpoint = checkpoints.latest() if checkpoints is not None else None
            if checkpoint is not None:
                self.trainer.restore(checkpoint)
            self.lending.attach(self.trainer)
        return checkpoint

    # -- planning ------------------------------------------------------------------------------------
    def upcoming(self) -> list[FinetuneWork]:
        """The coming units to offer the policy: a Tinker client's if one has requests queued, else the
        evaluation pass's while one runs, else training's."""
        tinker = self._tinker_busy()
        if tinker is not None:
            return tinker.peek(look_ahead(tinker.units_per_micro_batch))
        if self.trainer is None or not self._averaged():
            return []
        try:
            count = look_ahead(self.trainer.units_per_micro_batch)
            source = self.eval_pass if self.eval_pass is not None else self.trainer
            return source.peek(count)
        except Exception as exc:  # planning is the job's code too: it fails the job, never the scheduler
            self._fail(self.job, exc, traceback=True)
            return []

    # -- running -------------------------------------------------------------------------------------
    def run(self, plan: WorkPlan, *, should_yield: Callable[[], bool]) -> int:
        """Run ``plan``: its units beside decode, or units for its idle slice; stop early as soon as
        ``should_yield()`` says a request arrived. Returns the units run."""
        idle = isinstance(plan, IdleSlice)
        deadline = time.perf_counter() + plan.budget_s if idle else None
        done = 0
        while (self.trainer is not None or self._tinker_busy() is not None) and (idle or done < plan.units):
            stop = should_yield() or (deadline is not None and time.perf_counter() >= deadline)
            if self.agreement.flag(stop) or not self._run_one(plan.split, plan.label):
                break
            done += 1
        return done

    def _run_one(self, split: SMSplit, label: str) -> bool:
        """One unit of the running job (or of its evaluation); False when none ran: no memory to start a
        micro-batch now, or the unit failed its job."""
        tinker = self._tinker_busy()
        if tinker is not None:
            return self._run_tinker(tinker, split, label)
        job, trainer = self.job, self.trainer
        if not self._averaged():
            return False
        try:
            if self.eval_pass is not None:
                self._timed_unit(self.eval_pass.peek(1)[0], self.eval_pass.run_unit, split, label)
                if self.eval_pass.done:
                    self._evaluated(job, trainer)
                return True
            work = trainer.peek(1)[0]
            if work.kind == "forward" and not trainer.in_flight and not self.lending.prepare(work.tokens):
                return False  # not enough memory to start a micro-batch now; decode keeps its pages
            step_before = trainer.step
            more = self._timed_unit(work, trainer.run_unit, split, label, trainer=trainer)
            self._sync(job, trainer)
            if not more:
                self._after_step(job, trainer, lambda: self._trained(job, trainer))
            elif trainer.step != step_before:
                self._after_step(job, trainer, lambda: self._step_done(job, trainer))
            return True
        except TrainerMemoryError as exc:
            if trainer.in_flight and self.lending.out_of_memory():
                logger.info("finetune job %s: %s; replaying it with a larger loan", job.name, exc)
                return False
            self._fail(job, exc)
        except Exception as exc:  # a failing job must not take decode down with it
            self._fail(job, exc, traceback=True)
        return False

    def _run_tinker(self, trainer, split: SMSplit, label: str) -> bool:
        """One unit of a Tinker client's head request; a unit that raises fails that request alone."""
        try:
            self._timed_unit(trainer.peek(1)[0], trainer.run_unit, split, label, trainer=trainer)
            return True
        except Exception as exc:  # the client's request fails, never the scheduler
            logger.warning("tinker request failed: %s", exc, exc_info=True)
            self.tinker.fail_head(trainer, exc)
            return False

    def _timed_unit(
        self,
        work: FinetuneWork,
        run: Callable[[], bool | None],
        split: SMSplit,
        label: str,
        *,
        trainer: LoraTrainer | None = None,
    ) -> bool | None:
        """Run one unit on ``split`` and tell the co-location loop and metrics that it ran (with
        ``trainer``, a training unit, also the tokens of the micro-batch it finished, if it finished one);
        its cost follows when the device has measured it (``read_costs``)."""
        tokens_before = trainer.tokens_trained if trainer is not None else 0
        with self.partitioner.finetune(split):  # events go on the unit's own stream in its partition
            started = self.stopwatch.start()
            result = run()
            timing = self.stopwatch.stop(started)
        trained = trainer.tokens_trained - tokens_before if trainer is not None else 0
        self.colocation.unit_ran(micro_batch_tokens=trained)
        self._costs.add((work, split.name), timing)
        self.read_costs()
        if self.metrics is not None:
            self.metrics.unit(label, trained)
        return result

    def read_costs(self) -> None:
        """Hand the co-location loop (and so the predictor) every unit cost the device has finished."""
        for (work, split), seconds in self._costs.ready():
            self.colocation.unit_cost(work, seconds, split=split)

    def _sync(self, job: JobStatus, trainer: LoraTrainer) -> None:
        job.step, job.epoch, job.tokens_trained, job.loss = (
            trainer.step,
            min(trainer.epoch + 1, job.epochs),
            trainer.tokens_trained,
            trainer.loss,
        )
        elapsed = time.time() - (job.started_at or time.time())
        trained = trainer.tokens_trained - self._tokens_at_start
        job.tokens_per_s = trained / elapsed if elapsed > 0 else None

    def _after_step(self, job: JobStatus, trainer: LoraTrainer, then: Callable[[], None]) -> None:
        """After an optimizer step: ``then`` now, or, in a group at a due step, once the average is in."""
        if self.local_sgd is None or not self.local_sgd.due(trainer.step):
            then()
            return
        mine = Contribution(steps=trainer.step, tokens_trained=trainer.tokens_trained, examples=job.examples)
        self.local_sgd.start(trainer.lora_state(), mine)
        self._after_average = then

    def _averaged(self) -> bool:
        """False while the group's average of the running job is out; once it is in, load it and go on
        with what followed the step."""
        if self.local_sgd is None or not self.local_sgd.pending:
            return True
        job = self.job
        try:
            average = self.local_sgd.poll()
            if average is None:
                return False
            self.trainer.load_lora_state(average)
        except Exception as exc:  # the group is gone for this member: its copy of the job fails
            self._fail(job, exc, traceback=not isinstance(exc, RuntimeError))
            return False
        then, self._after_average = self._after_average, None
        self.jobs.save(job)
        then()
        return self.trainer is not None

    def _step_done(self, job: JobStatus, trainer: LoraTrainer) -> None:
        """After an optimizer step: checkpoint (then publish) when one is due; evaluate when due."""
        publish, checkpoint = job.spec.publish.every_steps, self.checkpoint_every_steps
        publish_now = bool(publish) and trainer.step % publish == 0
        if publish_now or (checkpoint and trainer.step % checkpoint == 0):
            self.jobs.checkpoint(job, trainer)
        if publish_now:
            self.publishing.publish(job, trainer)
        every = job.spec.eval.every_steps if job.spec.eval is not None else 0
        if self.eval_data is not None and every and trainer.step % every == 0:
            self._start_eval(trainer, final=False)

    def _trained(self, job: JobStatus, trainer: LoraTrainer) -> None:
        """The last unit ran: checkpoint, then evaluate the final adapter (if the job evaluates) before
        publishing it."""
        self.jobs.checkpoint(job, trainer)
        if self.eval_data is not None:
            self._start_eval(trainer, final=True)
        else:
            self._finish(job, trainer)

    # -- evaluation ----------------------------------------------------------------------------------
    def _start_eval(self, trainer: LoraTrainer, *, final: bool) -> None:
        tokenizer = self.scheduler.tokenizer
        # The ids SGLang itself stops generation on: the model's and its generation config's, and the
        # tokenizer's end token.
        eos = set(self.scheduler.model_config.hf_eos_token_id or ()) | {tokenizer.eos_token_id} - {None}
        self.eval_pass = EvalPass(
            trainer,
            self.eval_data,
            step=trainer.step,
            micro_batch_size=self.job.spec.training.micro_batch_size,
            eos_ids=eos,
            decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        )
        self._final_eval = final
        if self.eval_pass.done:  # nothing to score
            self._evaluated(self.job, trainer)

    def _evaluated(self, job: JobStatus, trainer: LoraTrainer) -> None:
        record = self.eval_pass.result()
        self.eval_pass = None
        job.evals.append(record)
        job.eval_loss, job.eval_accuracy = record.loss, record.accuracy
        job.retention_kept, job.retention_total = record.retention_kept, record.retention_total
        self.tracker.observe(record, trainer.lora_state)
        job.best_step = self.tracker.best_step
        if self.metrics is not None:
            self.metrics.evaluation(job.name, record)
        logger.info(
            "finetune job %s eval at step %d: loss %s, accuracy %s, retention %s/%s",
            job.name, record.step, record.loss, record.accuracy,
            record.retention_kept, record.retention_total,
        )  # fmt: skip
        if self._final_eval:
            self._finish(job, trainer)
        elif self.tracker.should_stop:
            job.stopped_early = True
            logger.info("finetune job %s stops early: eval loss has not improved since step %s",
                        job.name, self.tracker.best_step)  # fmt: skip
            self._finish(job, trainer)
        else:
            self.jobs.save(job)

    # -- letting go ----------------------------------------------------------------------------------
    def _finish(self, job: JobStatus, trainer: LoraTrainer) -> None:
        """Publish the final version (the best eval's adapter with ``publish: "best"``) and let go."""
        step = trainer.step
        if job.spec.publish.version == "best" and self.tracker is not None and self.tracker.best_weights:
            trainer.load_lora_state(self.tracker.best_weights)
            step = self.tracker.best_step
        self.publishing.publish(job, trainer, step=step, final=True)
        self._release()
        logger.info("finetune job %s trained; publishing the adapter of step %d", job.name, step)

    def _fail(self, job: JobStatus, exc: Exception, *, traceback: bool = False) -> None:
        logger.error("finetune job %s failed: %s", job.name, exc, exc_info=traceback)
        self.jobs.book.finish(job, "failed", f"{type(exc).__name__}: {exc}")
        self._release()
        self.jobs.save(job)

    def _cancelled(self, job: JobStatus) -> None:
        if self.job is job:
            self._release()

    def _release(self) -> None:
        if self.trainer is not None:
            self._on_release()
            self.lending.detach()
        if self.local_sgd is not None:
            self.local_sgd.close()
        self.trainer, self.job = None, None
        self.local_sgd, self._after_average = None, None
        self.eval_data, self.tracker, self.eval_pass = None, None, None
