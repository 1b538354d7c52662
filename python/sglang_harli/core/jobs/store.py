"""Durable finetune jobs: what the server was asked to train survives a crash or a restart.

Layout under ``--harli-state-dir``::

    jobs/<name>/job.json            the job's status and spec, replaced atomically on every change
    jobs/<name>/examples.msgpack    its tokenized dataset, written once (before the submit is answered)
    jobs/<name>/checkpoints/        ``core.training.checkpoint`` directories, the newest two kept
    incoming/                       datasets staged by the HTTP process, adopted by the scheduler

The tokenized examples are stored rather than the request's dataset so that a resumed job trains on
exactly the tokens the first run trained on, whatever happened to the data file or the tokenizer since.
The HTTP process writes them (it tokenized them, and it is not the decode loop) to ``incoming/`` and
hashes them as it does; the scheduler adopts the file with a rename once it accepts the job, so an
accepted job is on disk before its 201, a refused one never touches the job's directory, and the decode
loop neither receives the examples over IPC nor reads them back.

Writes that can wait (status updates, checkpoints) go through one background thread in order, so the
decode loop never waits for a disk; ``flush()`` waits for them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import msgspec

from sglang_harli.core.files import atomic_write, fsync_write
from sglang_harli.core.jobs.book import JobStatus
from sglang_harli.core.jobs.data import Example
from sglang_harli.core.jobs.eval_data import EvalData
from sglang_harli.core.jobs.paths import job_child
from sglang_harli.core.jobs.staging import StagedExamples
from sglang_harli.core.training.checkpoint import CheckpointDir, TrainerState, encode

logger = logging.getLogger(__name__)

JOB_FILE, EXAMPLES_FILE, EVAL_FILE = "job.json", "examples.msgpack", "eval.msgpack"


class StoredJob(msgspec.Struct, kw_only=True):
    status: JobStatus
    examples_sha256: str | None = None
    """Digest of ``examples.msgpack``; a damaged dataset fails its job instead of training on garbage."""


class JobStoreError(Exception):
    """Stored state that cannot be used; the message says which and why."""


class JobStore:
    def __init__(self, state_dir: str | os.PathLike):
        self.root = Path(state_dir).expanduser()
        self.jobs_root = self.root / "jobs"
        self.incoming = self.root / "incoming"
        self.jobs_root.mkdir(parents=True, exist_ok=True)
        self._digests: dict[str, str | None] = {}
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="harli-state")
        self._pending: list[Future] = []

    def job_dir(self, name: str) -> Path:
        return job_child(self.jobs_root, name, "state directory")

    def checkpoints(self, name: str) -> CheckpointDir:
        return CheckpointDir(self.job_dir(name) / "checkpoints")

    # -- writes --------------------------------------------------------------------------------------
    def add(self, status: JobStatus, staged: StagedExamples, evaluation: EvalData | None = None) -> None:
        """Adopt a staged dataset as job ``status.name``'s and record the job (and its eval data), before
        it is acknowledged."""
        directory = self.job_dir(status.name)
        self.flush()  # nothing of an earlier job of this name is still being written
        if directory.exists():  # a failed or cancelled job of the same name gives way
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        os.replace(self.incoming / Path(staged.file).name, directory / EXAMPLES_FILE)
        if evaluation is not None:  # small: eval sets and probes are bounded like inline records
            fsync_write(directory / EVAL_FILE, msgspec.msgpack.encode(evaluation))
        self._digests[status.name] = staged.sha256
        self._write_status(status.name, self._encode(status))

    def save(self, status: JobStatus) -> None:
        """Record ``status`` as it is now; written in the background, in order."""
        self._submit(self._write_status, status.name, self._encode(status))

    def checkpoint(self, name: str, state: TrainerState, status: JobStatus) -> None:
        """Write a checkpoint, then the status that refers to it; both in the background."""
        data = self._encode(status)

        def write() -> None:
            self.checkpoints(name).write(state.progress.step, encode(state))
            self._write_status(name, data)

        self._submit(write)

    def finished(self, status: JobStatus) -> None:
        """A job that will not train again keeps only its record: dataset and checkpoints go."""
        data = self._encode(status)

        def write() -> None:
            self._write_status(status.name, data)
            directory = self.job_dir(status.name)
            shutil.rmtree(directory / "checkpoints", ignore_errors=True)
            (directory / EXAMPLES_FILE).unlink(missing_ok=True)
            (directory / EVAL_FILE).unlink(missing_ok=True)

        self._submit(write)

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self) -> None:
        self.flush()
        self._writer.shutdown(wait=True)

    # -- reads ---------------------------------------------------------------------------------------
    def load(self) -> list[JobStatus]:
        """Every stored job, oldest first. Unreadable records are logged and left for the operator."""
        shutil.rmtree(self.incoming, ignore_errors=True)  # staged by submits that never got an answer
        jobs = []
        for directory in sorted(self.jobs_root.iterdir()):
            if directory.name.startswith(".") or not directory.is_dir():
                continue
            try:
                stored = msgspec.json.decode((directory / JOB_FILE).read_bytes(), type=StoredJob)
            except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
                logger.error("ignoring the stored job in %s: %s", directory, exc)
                continue
            if stored.status.name != directory.name:
                logger.error("ignoring %s: its record names job %r", directory, stored.status.name)
                continue
            self._digests[directory.name] = stored.examples_sha256
            jobs.append(stored.status)
        return sorted(jobs, key=lambda job: job.created_at)

    def examples(self, name: str) -> list[Example]:
        try:
            data = (self.job_dir(name) / EXAMPLES_FILE).read_bytes()
        except OSError as exc:
            raise JobStoreError(f"the stored dataset of job {name!r} is missing ({exc.strerror})") from None
        if hashlib.sha256(data).hexdigest() != self._digests.get(name):
            raise JobStoreError(f"the stored dataset of job {name!r} is damaged (checksum mismatch)")
        return msgspec.msgpack.decode(data, type=list[Example])

    def evaluation(self, name: str) -> EvalData:
        try:
            return msgspec.msgpack.decode((self.job_dir(name) / EVAL_FILE).read_bytes(), type=EvalData)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise JobStoreError(f"the stored eval data of job {name!r} cannot be read ({exc})") from None

    # -- helpers -------------------------------------------------------------------------------------
    def _encode(self, status: JobStatus) -> bytes:
        return msgspec.json.encode(StoredJob(status=status, examples_sha256=self._digests.get(status.name)))

    def _write_status(self, name: str, data: bytes) -> None:
        directory = self.job_dir(name)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / JOB_FILE, data)

    def _submit(self, write: Callable, *args) -> None:
        def logged() -> None:
            try:
                write(*args)
            except Exception:  # a full disk must not fail training; the next write tries again
                logger.exception("could not write finetune state under %s", self.root)

        self._pending = [f for f in self._pending if not f.done()]
        self._pending.append(self._writer.submit(logged))
