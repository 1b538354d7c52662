"""Publishing, the scheduler's half: write a job's adapter version and ask for it to be served.

The adapter is written here, where the trainer is (atomically, ``core.jobs.adapters``); the tokenizer
manager, which owns the adapter-name registry, is then asked to load it (``Host.publish``) and answers
with ``AdapterServed`` (its half is ``srt.jobs.publisher``). A job whose final version is written is
``publishing`` until that answer, then ``completed`` (or ``failed`` if the adapter could not be served),
so a client that sees ``completed`` can use ``lora_path=<name>`` at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sglang_harli.core.errors import NotFound
from sglang_harli.core.jobs.adapters import AdapterStore
from sglang_harli.core.jobs.book import EvalRecord, JobStatus, PublishedVersion
from sglang_harli.core.jobs.control import JobControl
from sglang_harli.core.training.trainer import LoraTrainer
from sglang_harli.core.wire.control import Ack, AdapterServed, AdaptersToServe, AdapterVersion

logger = logging.getLogger(__name__)


class Publishing:
    def __init__(
        self, *, jobs: JobControl, store: AdapterStore, writes: bool, send: Callable[[AdapterVersion], None]
    ):
        self.jobs, self.store = jobs, store
        self._writes = writes  # with TP, rank 0 writes the gathered adapter; the others join the gather
        self._send = send  # to the tokenizer manager (``Host.publish``)

    def publish(
        self,
        job: JobStatus,
        trainer: LoraTrainer,
        *,
        step: int | None = None,
        final: bool = False,
        record: EvalRecord | None = None,
    ):
        """Write the trainer's adapter as the job's next version and ask for it to be served; ``final``:
        training is over and the job is ``publishing`` until the answer; ``record``: the evaluation of the
        adapter, whose retention the version carries."""
        version = len(job.published) + 1
        if self._writes:
            path = self.store.write(job.name, version, trainer.save_adapter)
        else:  # with TP: this rank's slices join the gathered adapter that rank 0 writes
            trainer.save_adapter(None)
            path = self.store.version_dir(job.name, version)
        step = trainer.step if step is None else step
        published = PublishedVersion(version=version, step=step, path=str(path), final=final)
        if record is not None:
            published.retention_kept, published.retention_total = (
                record.retention_kept,
                record.retention_total,
            )
        job.published.append(published)
        job.adapter_path = str(path)
        if final:
            self.jobs.book.trained(job)
        self.jobs.save(job)
        self._send(AdapterVersion(name=job.name, version=version, path=str(path)))

    def served(self, answer: AdapterServed) -> Ack:
        """The tokenizer manager's answer; a publishing job is done once its final version serves."""
        job = self.jobs.book.get(answer.name)
        version = next((v for v in job.published if v.version == answer.version), None)
        if version is None:
            raise NotFound("version", f"job {answer.name!r} has no version {answer.version}")
        version.loaded, version.error = answer.error is None, answer.error
        if job.state == "publishing" and answer.version == len(job.published):
            if answer.error is None:
                self.jobs.book.finish(job, "completed")
            else:
                error = f"the adapter was trained but could not be served: {answer.error}"
                self.jobs.book.finish(job, "failed", error)
        self.jobs.save(job)
        return Ack()

    def to_serve(self, request: AdaptersToServe) -> list[AdapterVersion]:
        """The newest adapter version of every job, for the HTTP side to serve again after a restart."""
        return [
            AdapterVersion(name=job.name, version=job.published[-1].version, path=job.published[-1].path)
            for job in self.jobs.book.all()
            if job.published and not job.published[-1].loaded
        ]
