"""A submitted job's examples staged on disk by the HTTP process (``--harli-state-dir``), before the
scheduler adopts them (``core.jobs.store``).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import msgspec

from sglang_harli.core.files import fsync_write
from sglang_harli.core.jobs.data import Example


class StagedExamples(msgspec.Struct, kw_only=True):
    """A submitted job's examples, written to ``incoming/`` by the HTTP process."""

    file: str
    sha256: str


def stage_examples(state_dir: str | os.PathLike, examples: list[Example]) -> StagedExamples:
    incoming = Path(state_dir) / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    name = f"{uuid.uuid4().hex}.msgpack"
    data = msgspec.msgpack.encode(examples)
    fsync_write(incoming / name, data)
    return StagedExamples(file=name, sha256=hashlib.sha256(data).hexdigest())


def discard_staged(state_dir: str | os.PathLike, staged: StagedExamples) -> None:
    """Remove a staged file the scheduler did not adopt (a refused job); a no-op once it was adopted."""
    (Path(state_dir) / "incoming" / Path(staged.file).name).unlink(missing_ok=True)
