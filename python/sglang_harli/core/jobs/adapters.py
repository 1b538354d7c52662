"""Where trained adapters live on disk: ``<root>/<job>/v<NNNN>/`` plus a ``latest`` link.

A version directory appears whole or not at all: it is written to a temporary sibling and renamed into
place, so SGLang, PEFT or a copy job never read a half-written adapter, even after a crash. ``latest`` is
a symlink swapped with ``os.replace`` (also atomic) for people who want "the newest" without asking.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from sglang_harli.core.jobs.paths import job_child


class AdapterStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()

    def job_dir(self, name: str) -> Path:
        return job_child(self.root, name, "adapter directory")

    def version_dir(self, name: str, version: int) -> Path:
        return self.job_dir(name) / f"v{version:04d}"

    def write(self, name: str, version: int, save: Callable[[str], None]) -> Path:
        """Run ``save(tmp_dir)`` and publish its result as version ``version`` of job ``name``."""
        job_dir = self.job_dir(name)
        job_dir.mkdir(parents=True, exist_ok=True)
        final = self.version_dir(name, version)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=job_dir))
        try:
            save(str(tmp))
            if final.exists():  # a previous server run left this version behind: the new one wins
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        link_tmp = job_dir / f".latest-{os.getpid()}"
        link_tmp.unlink(missing_ok=True)
        link_tmp.symlink_to(final.name)
        os.replace(link_tmp, job_dir / "latest")
        return final
