"""The scheduler's finetune side: the job book, the one trainer at work, and adapter publishing.

It lives inside SGLang's scheduler process because that is where the served weights are: the trainer's
frozen base is a set of views of ``model_runner.model`` (see ``weights.py``). The scheduler lends it time
through ``run()``, as many units as the QoS policy admitted (``core.colocation``), and every unit's run
time goes to the latency predictor. Any exception from a job fails that job, never the scheduler.

Before the first job, a short profiling pass times each kind of unit on synthetic data so the policy can
admit work beside decode from the first step; its result is cached per model and hardware.

Publishing crosses processes: the adapter is written here (atomically, ``core.adapter_store``), then the
tokenizer manager, which owns the adapter-name registry, is asked to load it (``HarliPublishReq``) and
answers with the ``jobs.published`` command. A job is ``completed`` only once its final adapter is
served, so a client that sees ``completed`` can use ``lora_path=<name>`` at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import torch

from sglang_harli.core.adapter_store import AdapterStore
from sglang_harli.core.colocation import CoLocation
from sglang_harli.core.config import HarliConfig
from sglang_harli.core.data import Example
from sglang_harli.core.evaluation import EvalData, EvalPass, EvalTracker
from sglang_harli.core.job_store import JobStore, JobStoreError, StagedExamples
from sglang_harli.core.jobs import (
    FINISHED_STATES,
    FinetuneJobSpec,
    JobBook,
    JobStatus,
    LoraSpec,
    PublishedVersion,
    ServingLimits,
    SpecError,
    TrainingSpec,
    check_servable,
)
from sglang_harli.core.memory import TrainerMemoryError
from sglang_harli.core.partition import make_partitioner
from sglang_harli.core.predictor import LatencyPredictor
from sglang_harli.core.qos import make_policy
from sglang_harli.core.tensor_parallel import TensorParallelError
from sglang_harli.core.trainer import LoraTrainer, plan_steps, training_mode
from sglang_harli.core.work import WORK_KINDS, FinetuneWork
from sglang_harli.models.builtin import cache_root
from sglang_harli.srt.control import HarliPublishReq
from sglang_harli.srt.lending import KvLending
from sglang_harli.srt.tensor_parallel import RankAgreement, training_group
from sglang_harli.srt.weights import bind_training_model

logger = logging.getLogger(__name__)

# SGLang's fused LoRA module names -> the PEFT names they serve.
_SERVED_AS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "o_proj": ("o_proj",),
    "down_proj": ("down_proj",),
}


class SubmitRequest(msgspec.Struct, kw_only=True):
    """What the HTTP side sends once it has validated the spec and tokenized the dataset."""

    spec: FinetuneJobSpec
    count: int
    """Trainable examples in the dataset."""
    examples: list[Example] = msgspec.field(default_factory=list)
    """The examples themselves, without --harli-state-dir."""
    staged: StagedExamples | None = None
    """With --harli-state-dir: where the HTTP process wrote them instead (``core.job_store``)."""
    evaluation: EvalData | None = None
    """The job's tokenized eval set and retention probes (``core.evaluation``), if it has ``eval``."""


class PublishedAck(msgspec.Struct, kw_only=True):
    name: str
    version: int
    error: str | None = None


class JobName(msgspec.Struct, kw_only=True):
    name: str


class PublishAgain(msgspec.Struct, kw_only=True):
    name: str
    version: int
    path: str


# A queued job starts in idle time; under unbroken decode load it starts anyway after this long.
START_WITHIN_S = 2.0
PROFILE_BUDGET_S = 3.0
# Decode step times on a shared CPU are noisy; a longer memory (about 200 steps) averages the noise
# while still following load drift within seconds.
PREDICTOR_FORGETTING = 0.995


class FinetuneService:
    def __init__(self, scheduler, config: HarliConfig, metrics=None):
        self.scheduler = scheduler
        self.config = config
        self.metrics = metrics
        self.book = JobBook()
        self.store = AdapterStore(config.output_dir or cache_root() / "adapters")
        # With --tp-size N every rank trains its slice; rank 0 decides when (``srt.tensor_parallel``).
        self.agreement = RankAgreement(scheduler)
        self.tensor_parallel, self.unsupported = None, None
        try:
            self.tensor_parallel = training_group(scheduler)
        except TensorParallelError as exc:  # the server serves; jobs get this reason
            self.unsupported = str(exc)
            logger.warning("finetuning is off: %s", exc)
        self.trainer: LoraTrainer | None = None
        self.job: JobStatus | None = None
        self._tokens_at_start = 0  # tokens a resumed job had trained before this run
        self.durable = JobStore(config.state_dir) if config.state_dir else None
        self.base_weights: dict[str, int] | None = None
        self._examples: dict[str, list[Example]] = {}
        self._eval_data: dict[str, EvalData] = {}
        # The running job's evaluation: its data, best-so-far tracking, and the pass in progress if any.
        self.eval_data: EvalData | None = None
        self.tracker: EvalTracker | None = None
        self.eval_pass: EvalPass | None = None
        self._final_eval = False  # the pass in progress is the last one, and publishing waits for it
        device = getattr(scheduler.tp_worker.model_runner, "device", "cpu")
        self.partitioner = make_partitioner(device, enabled=config.sm_partitions != "off")
        self.profile: dict = {"state": "not run"}
        self._predictor_path = self._cache_path()
        predictor = self._cached_predictor() or LatencyPredictor(forgetting=PREDICTOR_FORGETTING)
        self.colocation = CoLocation(
            predictor,
            make_policy(
                config.policy,
                predictor,
                slo_s=config.tpot_slo_ms / 1e3,
                idle_budget_s=config.idle_train_ms / 1e3,
                percentile=config.slo_percentile,
                static_units=config.static_units,
                splits=[split.name for split in self.partitioner.splits],
            ),
            slo_s=config.tpot_slo_ms / 1e3,
            window=config.stats_window,
        )
        self.partitioner.prepare()  # green contexts built now, not inside a token interval
        self.lending = KvLending(scheduler, config)
        self.commands = {
            "jobs.submit": self._submit,
            "jobs.list": lambda payload: self.book.all(),
            "jobs.get": lambda payload: self.book.get(msgspec.json.decode(payload, type=JobName).name),
            "jobs.cancel": self._cancel,
            "jobs.published": self._published,
            "jobs.served": self._served,
        }
        if self.durable is not None:
            self._restore_jobs()

    # -- durable state -------------------------------------------------------------------------------
    def _restore_jobs(self) -> None:
        """Take back the jobs of the previous run: unfinished ones queue again and resume from their
        newest checkpoint when they start; every published adapter is served again (see ``jobs.served``)."""
        for job in self.durable.load():
            for version in job.published:
                version.loaded, version.error = False, None
            if job.state == "running":
                last = job.published[-1] if job.published else None
                final = last is not None and (last.final or last.step >= job.total_steps)
                if final:  # it stopped between writing its final adapter and hearing that it served
                    self.book.finish(job, "completed")
                    self.durable.finished(job)
                else:
                    job.state, job.resumes = "queued", job.resumes + 1
            self.book.restore(job)
            logger.info("finetune job %s restored (%s, step %d)", job.name, job.state, job.step)

    def _served(self, payload: bytes) -> list[PublishAgain]:
        """The newest adapter version of every job, for the HTTP side to serve again after a restart."""
        return [
            PublishAgain(name=job.name, version=job.published[-1].version, path=job.published[-1].path)
            for job in self.book.all()
            if job.published and not job.published[-1].loaded
        ]

    def _save(self, job: JobStatus) -> None:
        if self.durable is not None:
            if job.state in FINISHED_STATES:
                self.durable.finished(job)
            else:
                self.durable.save(job)

    def _checkpoint(self, job: JobStatus, trainer: LoraTrainer) -> None:
        if self.durable is not None:
            job.checkpoint_step = trainer.step
            self.durable.checkpoint(job.name, trainer.state(), job)

    # -- limits --------------------------------------------------------------------------------------
    def limits(self) -> ServingLimits:
        manager = getattr(self.scheduler.tp_worker.model_runner, "lora_manager", None)
        if manager is None:
            return ServingLimits(enable_lora=False)
        served = set(getattr(manager, "target_modules", None) or ())
        modules = None
        if "all" not in served:
            modules = frozenset(m for name in served for m in _SERVED_AS.get(name, ()))
        return ServingLimits(enable_lora=True, max_lora_rank=manager.max_lora_rank, target_modules=modules)

    # -- commands ------------------------------------------------------------------------------------
    def _submit(self, payload: bytes) -> JobStatus:
        request = msgspec.json.decode(payload, type=SubmitRequest)
        spec = request.spec
        check_servable(spec, self.limits())
        if self.unsupported:
            raise SpecError("name", f"finetuning is not available on this server: {self.unsupported}", 501)
        if not request.count:
            raise SpecError("dataset", "no trainable examples")
        if spec.eval is not None and self.tensor_parallel is not None:
            raise SpecError("eval", "evaluation is not available with --tp-size above 1 yet", 501)
        if self.book.active() >= self.config.max_jobs and self.book.name_is_free(spec.name):
            raise SpecError(
                "name",
                f"{self.book.active()} jobs are queued or running, the most this server takes "
                "(--harli-max-jobs); retry when one has finished",
                status=429,
            )
        stored = msgspec.structs.replace(spec, dataset=msgspec.structs.replace(spec.dataset, records=None))
        output_dir = str(self.store.job_dir(spec.name))
        if self.durable is not None:
            self.durable.job_dir(spec.name)  # a name that cannot be stored is refused before it is taken
        job = self.book.submit(
            stored,
            examples=request.count,
            total_steps=plan_steps(request.count, spec.training),
            output_dir=output_dir,
        )
        if self.durable is not None:
            try:
                self.durable.add(job, request.staged, request.evaluation)
            except OSError as exc:  # a job that is not on disk is not acknowledged
                self.book.forget(spec.name)
                raise SpecError(
                    "name", f"could not record the job under --harli-state-dir: {exc}", 507
                ) from None
        else:
            self._examples[spec.name] = request.examples
            if request.evaluation is not None:
                self._eval_data[spec.name] = request.evaluation
        logger.info("finetune job %s queued: %d examples, %d steps", job.name, job.examples, job.total_steps)
        return job

    def _cancel(self, payload: bytes) -> JobStatus:
        name = msgspec.json.decode(payload, type=JobName).name
        job = self.book.cancel(name)
        self._examples.pop(name, None)
        self._eval_data.pop(name, None)
        if self.job is job:
            self._drop_trainer()
        self._save(job)
        logger.info("finetune job %s cancelled", name)
        return job

    def _published(self, payload: bytes) -> dict:
        ack = msgspec.json.decode(payload, type=PublishedAck)
        job = self.book.get(ack.name)
        version = next((v for v in job.published if v.version == ack.version), None)
        if version is None:
            raise SpecError("version", f"job {ack.name!r} has no version {ack.version}", status=404)
        version.loaded, version.error = ack.error is None, ack.error
        is_final = job.state == "running" and self.job is not job and ack.version == len(job.published)
        if is_final:
            if ack.error is None:
                self.book.finish(job, "completed")
            else:
                self.book.finish(
                    job, "failed", f"the adapter was trained but could not be served: {ack.error}"
                )
        self._save(job)
        return {"ok": True}

    # -- training ------------------------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        return self.trainer is not None or self.book.next_queued() is not None

    def upcoming(self, *, may_start: bool) -> list[FinetuneWork]:
        """The coming units to offer the policy; starts a queued job if ``may_start`` (or it waited long)."""
        if self.trainer is None:
            queued = self.book.next_queued()
            if queued is None:
                return []
            waited = time.time() - queued.created_at
            if not (may_start or waited > START_WITHIN_S) or not self.start_next():
                return []
        try:
            look_ahead = min(4 * self.trainer.units_per_micro_batch + 1, 256)
            if self.eval_pass is not None:
                return self.eval_pass.peek(look_ahead)
            return self.trainer.peek(look_ahead)
        except Exception as exc:  # planning is the job's code too: it fails the job, never the scheduler
            self._fail(self.job, exc, traceback=True)
            return []

    def run(
        self,
        *,
        units: int,
        budget_s: float | None = None,
        split: str = "shared",
        when: str = "idle",
        should_yield: Callable[[], bool] | None = None,
    ) -> int:
        """Run up to ``units`` training units, for at most ``budget_s`` seconds, stopping early as soon as
        ``should_yield()`` says a request arrived; returns the units run."""
        deadline = None if budget_s is None else time.perf_counter() + budget_s
        done = 0
        while done < units and self.trainer is not None:
            stop = (should_yield is not None and should_yield()) or (
                deadline is not None and time.perf_counter() >= deadline
            )
            if self.agreement.flag(stop):
                break
            job, trainer = self.job, self.trainer
            step_before = trainer.step
            try:
                if self.eval_pass is not None:
                    self._run_eval_unit(job, trainer, split, when)
                    done += 1
                    continue
                work = trainer.peek(1)[0]
                if work.kind == "forward" and not trainer.in_flight and not self.lending.prepare(work.tokens):
                    break  # not enough memory to start a micro-batch now; decode keeps its pages
                more = self._timed_unit(work, trainer.run_unit, split=split, when=when, trainer=trainer)
                done += 1
                self._sync(job, trainer)
                if not more:
                    self._checkpoint(job, trainer)
                    if self.eval_data is not None:  # evaluate the final adapter, then publish
                        self._start_eval(trainer, final=True)
                    else:
                        self._finish(job, trainer)
                elif trainer.step != step_before:
                    self._step_done(job, trainer)
            except TrainerMemoryError as exc:
                if trainer.in_flight and self.lending.out_of_memory():
                    logger.info("finetune job %s: %s; replaying it with a larger loan", job.name, exc)
                    break
                self._fail(job, exc)
            except Exception as exc:  # a failing job must not take decode down with it
                self._fail(job, exc, traceback=True)
        return done

    def _timed_unit(
        self,
        work: FinetuneWork,
        run: Callable[[], bool | None],
        *,
        split: str,
        when: str,
        trainer: LoraTrainer | None = None,
    ) -> bool | None:
        """Run one unit on ``split`` and tell the predictor and metrics its cost; with ``trainer`` (a
        training unit), also the tokens of the micro-batch it finished, if it finished one."""
        tokens_before = trainer.tokens_trained if trainer is not None else 0
        started = time.perf_counter()
        with self.partitioner.finetune(self.partitioner.split(split)):
            result = run()
        elapsed = time.perf_counter() - started
        trained = trainer.tokens_trained - tokens_before if trainer is not None else 0
        self.colocation.unit_done(work, elapsed, micro_batch_tokens=trained)
        if self.metrics is not None:
            self.metrics.unit(when, trained)
        return result

    def _step_done(self, job: JobStatus, trainer: LoraTrainer) -> None:
        """After an optimizer step: checkpoint (then publish) when one is due."""
        publish, checkpoint = job.spec.publish.every_steps, self.config.checkpoint_every_steps
        publish_now = bool(publish) and trainer.step % publish == 0
        if publish_now or (checkpoint and trainer.step % checkpoint == 0):
            self._checkpoint(job, trainer)
        if publish_now:
            self._publish(job, trainer)
        every = job.spec.eval.every_steps if job.spec.eval is not None else 0
        if self.eval_data is not None and every and trainer.step % every == 0:
            self._start_eval(trainer, final=False)

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

    def _run_eval_unit(self, job: JobStatus, trainer: LoraTrainer, split: str, when: str) -> None:
        """One unit of the evaluation in progress; eval work is finetune work to the policy."""
        self._timed_unit(self.eval_pass.peek(1)[0], self.eval_pass.run_unit, split=split, when=when)
        if self.eval_pass.done:
            self._evaluated(job, trainer)

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
            self._save(job)

    def _finish(self, job: JobStatus, trainer: LoraTrainer) -> None:
        """Publish the final version (the best eval's adapter with ``publish: "best"``) and let go."""
        step = trainer.step
        if job.spec.publish.version == "best" and self.tracker is not None and self.tracker.best_weights:
            trainer.load_lora_state(self.tracker.best_weights)
            step = self.tracker.best_step
        self._publish(job, trainer, step=step, final=True)
        self._drop_trainer()
        logger.info("finetune job %s trained; publishing the adapter of step %d", job.name, step)

    def _fail(self, job: JobStatus, exc: Exception, *, traceback: bool = False) -> None:
        logger.error("finetune job %s failed: %s", job.name, exc, exc_info=traceback)
        self.book.finish(job, "failed", f"{type(exc).__name__}: {exc}")
        self._drop_trainer()
        self._save(job)

    def start_next(self) -> bool:
        """Start the next queued job, if any; True if one is training now."""
        job = self.book.next_queued()
        if job is None:
            return False
        self.book.start(job)
        try:
            examples = self._examples.pop(job.name, None)
            if examples is None and self.durable is not None:
                examples = self.durable.examples(job.name)
            self.eval_data = self._eval_data.pop(job.name, None)
            if self.eval_data is None and self.durable is not None and job.spec.eval is not None:
                self.eval_data = self.durable.evaluation(job.name)
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
                    layers_per_unit=self.config.layers_per_unit,
                    saved_tensor_hooks=self.lending.hooks,
                    on_micro_batch_end=self.lending.micro_batch_done,
                    place_grads=self.lending.place_grads,
                    tensor_parallel=self.tensor_parallel,
                )
                checkpoint = self.durable.checkpoints(job.name).latest() if self.durable else None
                if checkpoint is not None:
                    self.trainer.restore(checkpoint)
                self.lending.attach(self.trainer)
        except Exception as exc:
            self._fail(job, exc, traceback=not isinstance(exc, JobStoreError))
            return self.book.next_queued() is not None and self.start_next()
        self.job = job
        job.total_steps = self.trainer.total_steps
        self._tokens_at_start = self.trainer.tokens_trained
        if checkpoint is not None:
            job.checkpoint_step = checkpoint.progress.step
            self._sync(job, self.trainer)
            logger.info("finetune job %s resumed from its checkpoint at step %d", job.name, job.step)
        self._save(job)
        logger.info("finetune job %s started: base weights %s", job.name, self.base_weights)
        return True

    def _drop_trainer(self) -> None:
        if self.trainer is not None:
            self._save_predictor()
            self.lending.detach()
        self.trainer, self.job = None, None
        self.eval_data, self.tracker, self.eval_pass = None, None, None

    # -- profiling -----------------------------------------------------------------------------------
    def _cache_path(self) -> Path:
        """One cache entry per model shape, hardware, unit granularity and deployment: a PD decode
        instance's steps (prebuilt batches, transfers in flight) are not a co-located server's, and one
        role's fit restored in the other admits by the wrong costs until it has relearnt them."""
        runner = self.scheduler.tp_worker.model_runner
        server_args = self.scheduler.server_args
        config_file = Path(server_args.model_path) / "config.json"
        device = getattr(runner, "device", "cpu")
        if str(device).startswith("cuda"):
            hardware = torch.cuda.get_device_name()
        else:
            hardware = f"{platform.processor() or platform.machine()} x{torch.get_num_threads()}"
        key = json.dumps(
            [
                config_file.read_text() if config_file.is_file() else server_args.model_path,
                hardware,
                str(getattr(runner, "dtype", "")),
                self.config.layers_per_unit,
                torch.__version__,
                str(server_args.disaggregation_mode),
                str(server_args.attention_backend),
            ]
        )
        return cache_root() / "predictor" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"

    def _cached_predictor(self) -> LatencyPredictor | None:
        if self.config.profile == "refresh" or self.tensor_parallel is not None:
            return None  # with TP every rank profiles, in step: no cache is read or written
        try:
            state = json.loads(self._predictor_path.read_text())
            predictor = LatencyPredictor.from_state(state, forgetting=PREDICTOR_FORGETTING)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        self.profile = {"state": "cached", "path": str(self._predictor_path)}
        return predictor

    def _save_predictor(self) -> None:
        if self.tensor_parallel is not None:
            return
        path = self._predictor_path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(".tmp")
            temporary.write_text(json.dumps(self.colocation.predictor.state()))
            temporary.replace(path)
        except OSError:
            logger.warning("could not cache the latency predictor at %s", path, exc_info=True)

    def run_profile(self) -> None:
        """Time every kind of unit on synthetic data, within ``PROFILE_BUDGET_S``, before any job runs.

        Runs at start-up, before the server takes requests, on a throwaway LoRA over the served weights;
        skipped with ``--harli-profile skip``, when LoRA serving is off, or when the cache has an entry.
        """
        if (
            self.unsupported
            or self.config.profile == "skip"
            or self.profile["state"] == "cached"
            or not self.limits().enable_lora
        ):
            if self.profile["state"] != "cached":
                self.profile = {"state": "skipped"}
            return
        started = time.perf_counter()
        runner = self.scheduler.tp_worker.model_runner
        predictor = self.colocation.predictor
        try:
            with training_mode():
                model, _ = bind_training_model(
                    runner.model, self.scheduler.server_args.model_path, self.tensor_parallel
                )
                vocab = model.config.vocab_size
                generator = torch.Generator().manual_seed(0)
                examples = [
                    Example(input_ids=ids, loss_mask=[True] * len(ids))
                    for length in (32, 128, 64, 256)
                    for ids in [torch.randint(vocab, (length,), generator=generator).tolist()]
                ]
                trainer = LoraTrainer(
                    model,
                    examples,
                    LoraSpec(r=16, target_modules=["q_proj", "v_proj"]),
                    TrainingSpec(epochs=1, micro_batch_size=1, gradient_accumulation_steps=2),
                    layers_per_unit=self.config.layers_per_unit,
                    tensor_parallel=self.tensor_parallel,
                )
                units = 0
                # With TP the ranks' clocks differ, so they agree on a unit count instead of a deadline.
                fixed = 4 * trainer.units_per_micro_batch if self.tensor_parallel is not None else None
                while (
                    units < fixed if fixed is not None else time.perf_counter() - started < PROFILE_BUDGET_S
                ):
                    upcoming = trainer.peek(1)
                    if not upcoming:
                        break
                    unit_started = time.perf_counter()
                    trainer.run_unit()
                    if units >= trainer.units_per_micro_batch:  # the first micro-batch warms caches up
                        predictor.observe_unit(upcoming[0], time.perf_counter() - unit_started)
                    units += 1
        except Exception as exc:  # profiling is an optimisation; the predictor also learns online
            logger.warning("finetune profiling failed: %s", exc, exc_info=True)
            self.profile = {"state": "failed", "error": f"{type(exc).__name__}: {exc}"}
            return
        learnt = predictor.snapshot().units
        known = [kind for kind in WORK_KINDS if kind in learnt and learnt[kind].samples]
        self.profile = {
            "state": "profiled",
            "seconds": round(time.perf_counter() - started, 3),
            "units": units,
            "kinds": known,
            "path": str(self._predictor_path),
        }
        self._save_predictor()
        logger.info("finetune unit costs profiled in %.2fs (%d units)", self.profile["seconds"], units)

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

    def _publish(
        self, job: JobStatus, trainer: LoraTrainer, step: int | None = None, final: bool = False
    ) -> None:
        version = len(job.published) + 1
        if self.agreement.leader:
            path = self.store.write(job.name, version, trainer.save_adapter)
        else:  # with TP: this rank's slices join the gathered adapter that rank 0 writes
            trainer.save_adapter(None)
            path = self.store.version_dir(job.name, version)
        step = trainer.step if step is None else step
        job.published.append(PublishedVersion(version=version, step=step, path=str(path), final=final))
        job.adapter_path = str(path)
        self._save(job)
        self.scheduler.ipc_channels.send_to_tokenizer.send_output(
            HarliPublishReq(name=job.name, version=version, path=str(path))
        )

    # -- stats ---------------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        states = [j.state for j in self.book.all()]
        return {
            "jobs": {s: states.count(s) for s in ("queued", "running", *sorted(FINISHED_STATES))},
            "training": self.job.name if self.job else None,
            "base_weights": self.base_weights,
            "output_dir": str(Path(self.store.root)),
            "state_dir": str(self.durable.root) if self.durable else None,
            "profile": self.profile,
            "partitions": self.partitioner.describe(),
            "memory": self.lending.snapshot(),
        }
