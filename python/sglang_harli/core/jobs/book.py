"""The job book: each job's status (``JobStatus``, the HTTP reply) and the state machine over them
(``JobBook``).

queued -> running -> publishing -> completed, and failed or cancelled from any unfinished state.
``publishing`` is a job whose training is over and whose final adapter is written, waiting for the
tokenizer manager to serve it. The book holds no tensors; the trainer that runs a job lives beside it.
"""

from __future__ import annotations

import time
from typing import Literal

import msgspec

from sglang_harli.core.errors import Conflict, NotFound
from sglang_harli.core.fleet.group import GroupStatus
from sglang_harli.core.jobs.spec import FinetuneJobSpec

JobState = Literal["queued", "running", "publishing", "completed", "failed", "cancelled"]


FINISHED_STATES = frozenset({"completed", "failed", "cancelled"})


class PublishedVersion(msgspec.Struct, kw_only=True):
    version: int
    step: int
    path: str
    loaded: bool = False
    """True once the server answers ``lora_path=<name>`` with this version."""
    final: bool = False
    """The job's last version (after its last step, early stop, or the best eval's adapter)."""
    error: str | None = None
    retention_kept: int | None = None
    """Of the evaluation at ``step`` (where the job has probes): probes still answered right."""
    retention_total: int = 0


class EvalRecord(msgspec.Struct, kw_only=True):
    """One evaluation of the adapter as it stood after optimizer step ``step``."""

    step: int
    loss: float | None = None
    """Mean cross-entropy over the eval set's target tokens."""
    accuracy: float | None = None
    """Share of eval target tokens the adapter predicts exactly (greedy)."""
    retention_kept: int | None = None
    """Retention probes whose greedy answer still contains the expected text."""
    retention_total: int = 0
    lost: list[int] = msgspec.field(default_factory=list)
    """Indices of the probes not kept."""
    kept_floor: bool | None = None
    """Whether the probes still answered right, of those the base model answered right, were at least
    ``eval.retention_floor`` of them (``None``: the job has no probes)."""


class JobStatus(msgspec.Struct, kw_only=True):
    name: str
    state: JobState = "queued"
    """``queued``, ``running``, ``publishing`` (trained; its final adapter is being loaded, and
    ``lora_path=<name>`` serves it once the job is ``completed``), ``completed``, ``failed`` or
    ``cancelled``."""
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    epochs: int = 0
    examples: int = 0
    """Training examples in the dataset (less any eval split; rehearsal examples not counted)."""
    rehearsal_examples: int = 0
    """The base model's answers to the job's rehearsal prompts, mixed into every epoch."""
    tokens_trained: int = 0
    loss: float | None = None
    """Mean completion-token loss of the latest optimizer step."""
    tokens_per_s: float | None = None
    output_dir: str = ""
    adapter_path: str | None = None
    """The newest published adapter directory (PEFT format)."""
    published: list[PublishedVersion] = msgspec.field(default_factory=list)
    error: str | None = None
    eval_loss: float | None = None
    """Of the latest evaluation (``evals[-1]``)."""
    eval_accuracy: float | None = None
    retention_kept: int | None = None
    retention_total: int = 0
    evals: list[EvalRecord] = msgspec.field(default_factory=list)
    """Every evaluation so far, oldest first."""
    best_step: int | None = None
    """Optimizer step of the lowest eval loss so far (among evaluations that kept the retention floor)."""
    floor_breaches: int = 0
    """Evaluations whose retention was below ``eval.retention_floor``."""
    unpublished_path: str | None = None
    """A job that forgot (no evaluation kept the retention floor) publishes nothing: the adapter that
    kept the most probes is written here instead, for inspection."""
    stopped_early: bool = False
    """Training ended before ``total_steps``: the eval loss stopped improving, or retention stayed below
    the floor, for ``training.early_stopping.patience`` evaluations."""
    resumes: int = 0
    """Times the job was resumed from a checkpoint after the server restarted (``--harli-state-dir``)."""
    checkpoint_step: int | None = None
    """Optimizer step of the newest checkpoint written or resumed from."""
    created_at: float = msgspec.field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    spec: FinetuneJobSpec | None = None
    instance: str | None = None
    """With ``--harli-peers``: the instance (base URL) this entry's job runs on."""
    group: GroupStatus | None = None
    """A job trained on several instances (``training.instances``): this member's place and everyone's
    contribution."""


class JobBook:
    """Every job this server was given, in submission order; at most one is running."""

    def __init__(self) -> None:
        self._jobs: dict[str, JobStatus] = {}

    def submit(self, spec: FinetuneJobSpec, *, examples: int, total_steps: int, output_dir: str) -> JobStatus:
        previous = self._jobs.get(spec.name)
        if previous is not None and not self.name_is_free(spec.name):
            raise Conflict("name", f"a job named {spec.name!r} already exists ({previous.state})")
        self._jobs.pop(spec.name, None)  # a failed or cancelled job that published nothing gives way
        status = JobStatus(
            name=spec.name,
            examples=examples,
            total_steps=total_steps,
            epochs=spec.training.epochs,
            output_dir=output_dir,
            spec=spec,
        )
        self._jobs[spec.name] = status
        return status

    def forget(self, name: str) -> None:
        """Drop a job that was never acknowledged (recording it failed)."""
        self._jobs.pop(name, None)

    def restore(self, job: JobStatus) -> None:
        """Take back a job recorded by an earlier run of the server."""
        self._jobs[job.name] = job

    def active(self) -> int:
        """Jobs queued, running or publishing."""
        return sum(job.state not in FINISHED_STATES for job in self._jobs.values())

    def name_is_free(self, name: str) -> bool:
        job = self._jobs.get(name)
        return job is None or (job.state in ("failed", "cancelled") and not job.published)

    def get(self, name: str) -> JobStatus:
        job = self._jobs.get(name)
        if job is None:
            raise NotFound("name", f"no job named {name!r}")
        return job

    def all(self) -> list[JobStatus]:
        return list(self._jobs.values())

    def next_queued(self) -> JobStatus | None:
        return next((j for j in self._jobs.values() if j.state == "queued"), None)

    def start(self, job: JobStatus) -> None:
        job.state = "running"
        job.started_at = time.time()

    def trained(self, job: JobStatus) -> None:
        """Training is over and the final adapter is written: it is served once the tokenizer says so."""
        job.state = "publishing"

    def finish(self, job: JobStatus, state: JobState, error: str | None = None) -> None:
        job.state = state
        job.error = error
        job.finished_at = time.time()

    def cancel(self, name: str) -> JobStatus:
        job = self.get(name)
        if job.state in FINISHED_STATES:
            raise Conflict("name", f"job {name!r} already {job.state}")
        self.finish(job, "cancelled")
        return job
