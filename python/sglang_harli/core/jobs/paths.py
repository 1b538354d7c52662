"""Per-job directories under a configured root, confined to it.

A job's name becomes a directory name (its adapters, its durable state), so the name is checked again here
even though the HTTP schema already did: no path separators, no leading dot, and no symlink planted at the
job's place that leads out of the root. The root itself may be a symlink; the operator chose it.
"""

from __future__ import annotations

import re
from pathlib import Path

from sglang_harli.core.jobs.spec import JOB_NAME_PATTERN, SpecError

_NAME = re.compile(JOB_NAME_PATTERN)


def job_child(root: Path, name: str, what: str) -> Path:
    """``root/name``, or ``SpecError`` (field ``name``) if that would be anywhere else."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise SpecError("name", f"{name!r} is not a valid job name (letters, digits, '.', '_', '-')")
    path = root / name
    if path.is_symlink():
        try:
            inside = path.resolve().is_relative_to(root.resolve())
        except (OSError, RuntimeError):
            inside = False
        if not inside:
            raise SpecError("name", f"the {what} of job {name!r} is a link out of its directory; refused")
    return path
