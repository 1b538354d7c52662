"""The Tinker API's snapshots, served hot as SGLang adapters, and the sampling sessions that sample them.

A sampling session samples either the base model or one snapshot (``save_weights_for_sampler``: an
adapter in PEFT's format, ``core.tinker.store``). ``Snapshots`` loads a snapshot into SGLang the first
time a session samples it, through the same hot publishing a job's versions use (``srt.jobs.publisher``),
and keeps at most ``MAX_SERVED_SNAPSHOTS`` loaded: the least recently sampled one that no request is
using is unloaded to make room (a named snapshot stays on disk and loads again when sampled; an unnamed
one, which only its session can reach, is deleted with it, and its session then answers 404).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import shutil
from collections import Counter, OrderedDict
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

from sglang_harli.core.errors import NotFound
from sglang_harli.srt.jobs.publisher import Publisher

logger = logging.getLogger(__name__)

MAX_SERVED_SNAPSHOTS = 8
"""Snapshots loaded in SGLang at once (the least recently sampled unused one is unloaded beyond this)."""


@dataclass
class SamplingSession:
    session_id: str
    base_model: str
    model_path: str | None = None
    """The ``tinker://`` path sampled, or ``None`` for an unnamed snapshot or the base model."""
    directory: Path | None = None
    """The snapshot's adapter directory; ``None`` samples the base model."""
    unnamed: bool = False


class Snapshots:
    """Snapshots loaded into SGLang as adapters, least recently sampled first out."""

    def __init__(self, publisher: Publisher, limit: int = MAX_SERVED_SNAPSHOTS):
        self.publisher, self.limit = publisher, limit
        self._served: OrderedDict[str, Path] = OrderedDict()  # adapter name -> directory
        self._unnamed: set[str] = set()
        self._in_use: Counter[str] = Counter()
        self._loads = itertools.count(1)  # a version per load: a reloaded name never meets its old self
        self._lock = asyncio.Lock()

    @staticmethod
    def adapter_name(directory: Path) -> str:
        return "tinker-" + sha256(str(directory).encode()).hexdigest()[:16]

    async def acquire(self, session: SamplingSession) -> str:
        """The SGLang adapter name to sample ``session`` with, loaded if it is not; ``release`` it after."""
        directory = session.directory
        assert directory is not None
        name = self.adapter_name(directory)
        async with self._lock:
            if name in self._served:
                self._served.move_to_end(name)
            else:
                if not directory.is_dir():
                    raise NotFound("sampling_session_id", f"{session.session_id}'s snapshot was evicted")
                await self.publisher.publish(name, next(self._loads), str(directory))
                self._served[name] = directory
                if session.unnamed:
                    self._unnamed.add(name)
            self._in_use[name] += 1
            await self._evict()
        return name

    def release(self, name: str) -> None:
        self._in_use[name] -= 1

    async def _evict(self) -> None:
        while len(self._served) > self.limit:
            victim = next((n for n in self._served if not self._in_use[n]), None)
            if victim is None:  # every loaded snapshot is being sampled: over the bound until one is not
                return
            directory = self._served.pop(victim)
            await self.publisher.unpublish(victim)
            if victim in self._unnamed:
                self._unnamed.discard(victim)
                shutil.rmtree(directory, ignore_errors=True)
            logger.info("tinker snapshot %s unloaded (%s)", victim, directory)
