"""Durable file writes: each file flushed to disk, a directory's entries flushed, and whole-or-nothing
writes by a rename into place. Shared by checkpoints, the job store and the Tinker store.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory; the manifest check still guards reads
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: readers see the old bytes or the new ones, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fsync_write(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)
