"""The scheduler's finetune side: the job book, the one trainer at work, and adapter publishing.

It lives inside SGLang's scheduler process because that is where the served weights are: the trainer's
frozen base is a set of views of ``model_runner.model`` (see ``weights.py``). The scheduler lends it time
through ``run()``: a fixed number of units after each batch, and a time budget when there is no decode
work. Any exception from a job fails that job, never the scheduler.

Publishing crosses processes: the adapter is written here (atomically, ``core.adapter_store``), then the
tokenizer manager, which owns the adapter-name registry, is asked to load it (``HarliPublishReq``) and
answers with the ``jobs.published`` command. A job is ``completed`` only once its final adapter is
served, so a client that sees ``completed`` can use ``lora_path=<name>`` at once.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import msgspec

from sglang_harli.core.adapter_store import AdapterStore
from sglang_harli.core.config import HarliConfig
from sglang_harli.core.data import Example
from sglang_harli.core.jobs import (
    FINISHED_STATES,
    FinetuneJobSpec,
    JobBook,
    JobStatus,
    PublishedVersion,
    ServingLimits,
    SpecError,
    check_servable,
)
from sglang_harli.core.trainer import LoraTrainer, plan_steps, training_mode
from sglang_harli.models.builtin import cache_root
from sglang_harli.srt.control import HarliPublishReq
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
    examples: list[Example]


class PublishedAck(msgspec.Struct, kw_only=True):
    name: str
    version: int
    error: str | None = None


class JobName(msgspec.Struct, kw_only=True):
    name: str


class FinetuneService:
    def __init__(self, scheduler, config: HarliConfig):
        self.scheduler = scheduler
        self.config = config
        self.book = JobBook()
        self.store = AdapterStore(config.output_dir or cache_root() / "adapters")
        self.trainer: LoraTrainer | None = None
        self.job: JobStatus | None = None
        self.base_weights: dict[str, int] | None = None
        self._examples: dict[str, list[Example]] = {}
        self.commands = {
            "jobs.submit": self._submit,
            "jobs.list": lambda payload: self.book.all(),
            "jobs.get": lambda payload: self.book.get(msgspec.json.decode(payload, type=JobName).name),
            "jobs.cancel": self._cancel,
            "jobs.published": self._published,
        }

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
        if self.scheduler.tp_size > 1:
            raise SpecError("name", "finetuning with --tp-size above 1 is not supported yet", status=501)
        if not request.examples:
            raise SpecError("dataset", "no trainable examples")
        stored = msgspec.structs.replace(spec, dataset=msgspec.structs.replace(spec.dataset, records=None))
        job = self.book.submit(
            stored,
            examples=len(request.examples),
            total_steps=plan_steps(len(request.examples), spec.training),
            output_dir=str(self.store.job_dir(spec.name)),
        )
        self._examples[spec.name] = request.examples
        logger.info("finetune job %s queued: %d examples, %d steps", job.name, job.examples, job.total_steps)
        return job

    def _cancel(self, payload: bytes) -> JobStatus:
        name = msgspec.json.decode(payload, type=JobName).name
        job = self.book.cancel(name)
        self._examples.pop(name, None)
        if self.job is job:
            self._drop_trainer()
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
        return {"ok": True}

    # -- training ------------------------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        return self.trainer is not None or self.book.next_queued() is not None

    def run(self, *, units: int, budget_s: float | None = None) -> int:
        """Run up to ``units`` training units (and at most ``budget_s`` seconds); returns units run."""
        deadline = None if budget_s is None else time.perf_counter() + budget_s
        done = 0
        while done < units and (self.trainer is not None or self._start_next()):
            job, trainer = self.job, self.trainer
            step_before = trainer.step
            try:
                more = trainer.run_unit()
                done += 1
                self._sync(job, trainer)
                every = job.spec.publish.every_steps
                if not more:
                    self._publish(job, trainer)
                    self._drop_trainer()
                    logger.info("finetune job %s trained; publishing", job.name)
                elif every and trainer.step != step_before and trainer.step % every == 0:
                    self._publish(job, trainer)
            except Exception as exc:  # a failing job must not take decode down with it
                logger.exception("finetune job %s failed", job.name)
                self.book.finish(job, "failed", f"{type(exc).__name__}: {exc}")
                self._drop_trainer()
            if deadline is not None and time.perf_counter() >= deadline:
                break
        return done

    def _start_next(self) -> bool:
        job = self.book.next_queued()
        if job is None:
            return False
        examples = self._examples.pop(job.name)
        self.book.start(job)
        try:
            with training_mode():
                model, self.base_weights = bind_training_model(
                    self.scheduler.tp_worker.model_runner.model, self.scheduler.server_args.model_path
                )
                self.trainer = LoraTrainer(model, examples, job.spec.lora, job.spec.training)
        except Exception as exc:
            logger.exception("finetune job %s could not start", job.name)
            self.book.finish(job, "failed", f"{type(exc).__name__}: {exc}")
            return self.book.next_queued() is not None and self._start_next()
        self.job = job
        job.total_steps = self.trainer.total_steps
        logger.info("finetune job %s started: base weights %s", job.name, self.base_weights)
        return True

    def _drop_trainer(self) -> None:
        self.trainer, self.job = None, None

    def _sync(self, job: JobStatus, trainer: LoraTrainer) -> None:
        job.step, job.epoch, job.tokens_trained, job.loss = (
            trainer.step,
            min(trainer.epoch + 1, job.epochs),
            trainer.tokens_trained,
            trainer.loss,
        )
        elapsed = time.time() - (job.started_at or time.time())
        job.tokens_per_s = trainer.tokens_trained / elapsed if elapsed > 0 else None

    def _publish(self, job: JobStatus, trainer: LoraTrainer) -> None:
        version = len(job.published) + 1
        path = self.store.write(job.name, version, trainer.save_adapter)
        job.published.append(PublishedVersion(version=version, step=trainer.step, path=str(path)))
        job.adapter_path = str(path)
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
        }
