"""Publishing, the tokenizer manager's half: hot-swap a job's adapter to a new version, and say so.

The scheduler writes a version and asks for it to be served (``core.jobs.publishing``); the ``Publisher``
of the HTTP side (``srt.service``) registered the handler of that request with the tokenizer manager at
start-up, publishes in the background and answers with ``core.wire.control.AdapterServed``. After a
restart with --harli-state-dir, ``serve_again`` publishes every job's newest version before the server
reports healthy (the start-up runs it).

SGLang's own ``/load_lora_adapter`` cannot replace an adapter: its scheduler refuses a second adapter of
the same name, and unload-then-load would leave a gap in which a request naming the adapter fails (or is
silently re-served the old files by SGLang's implicit reload). So a new version is loaded into the
scheduler under an internal name (``<job>@v<N>``) and a fresh ``lora_id``, and then the public name is
re-pointed to that id in one step under the registry's writer lock. From that moment the new version is
live and the caller is told so. Requests that already acquired the old id keep it until they finish; the
old version is retired in the background only then, exactly as SGLang's unload waits for in-flight
requests, so a long request never holds up the news that a new version serves (nor the next load).

This touches ``LoRARegistry`` internals (``_registry``, ``_counters``) because the registry has no
"replace" operation; everything else goes through the tokenizer manager's own communicator and locks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from sglang.srt.lora.lora_registry import LoRARef
from sglang.srt.managers.io_struct import LoadLoRAAdapterReqInput, UnloadLoRAAdapterReqInput
from sglang.srt.utils import ConcurrentCounter
from sglang.utils import TypeBasedDispatcher

from sglang_harli.core.wire.control import AdapterServed, AdaptersToServe, AdapterVersion, decode_reply
from sglang_harli.srt.control import HarliControlClient, HarliPublishReq

logger = logging.getLogger(__name__)

Published = Callable[[str, int, str], None]
"""Told of each version a job published here once it serves (name, version, path): the fleet's push."""


class Publisher:
    """The adapters this process has published, by name, and how a new version comes to serve."""

    def __init__(self, tokenizer_manager, control: HarliControlClient):
        self.tokenizer_manager = tokenizer_manager
        self.control = control
        self.on_published: Published | None = None
        self._versions: dict[str, int] = {}
        self._paths: dict[str, str] = {}
        self._tasks: set[asyncio.Task] = set()
        # SGLang's seam for replies: the scheduler's unsolicited HarliPublishReq is handled here.
        tokenizer_manager._result_dispatcher += TypeBasedDispatcher([(HarliPublishReq, self._on_request)])

    def _on_request(self, req: HarliPublishReq) -> None:
        """Runs in the manager's receive loop: publish in the background, then tell the scheduler."""
        self._spawn(self.publish_and_answer(req.adapter))

    async def publish_and_answer(self, adapter: AdapterVersion) -> None:
        """Serve ``adapter``, tell the scheduler whether it serves (``AdapterServed``), and hand it to the
        fleet's peers, if there are any (``on_published``)."""
        error = None
        try:
            await self.publish(adapter.name, adapter.version, adapter.path)
        except Exception as exc:
            logger.exception("publishing %s version %d failed", adapter.name, adapter.version)
            error = f"{type(exc).__name__}: {exc}"
        await self.control.call(AdapterServed(name=adapter.name, version=adapter.version, error=error))
        if error is None and self.on_published is not None:
            self.on_published(adapter.name, adapter.version, adapter.path)

    async def serve_again(self) -> None:
        """After a restart, serve every job's newest adapter again (``--harli-state-dir``)."""
        request = AdaptersToServe()
        for reply in await self.control.call(request):
            for adapter in decode_reply(request, reply.payload):
                logger.info("serving adapter %s version %d again", adapter.name, adapter.version)
                await self.publish_and_answer(adapter)

    async def publish(self, name: str, version: int, path: str) -> None:
        """Serve ``path`` as adapter ``name`` for new requests; ``RuntimeError`` if it cannot. Returns once
        the new version is live; the version it replaced is retired in the background."""
        tm = self.tokenizer_manager
        tm.auto_create_handle_loop()
        registry = tm.lora_registry
        async with tm.lora_update_lock:
            live = self._versions.get(name, 0)
            if version < live:  # a restart's re-publish racing the job's next version: never go back
                raise RuntimeError(f"version {live} of {name} already serves")
            if version == live:  # a job trained on several instances: a member's push of the same weights
                return  # came first (``core.fleet.local_sgd``: every member ends on the same average)
            internal = LoRARef(lora_name=f"{name}@v{version}", lora_path=path)
            load = LoadLoRAAdapterReqInput(
                lora_name=internal.lora_name, lora_path=path, lora_id=internal.lora_id
            )
            error = _merged_error(await tm.update_lora_adapter_communicator(load))
            if error:
                raise RuntimeError(error)

            public = LoRARef(lora_id=internal.lora_id, lora_name=name, lora_path=path)
            async with registry._registry_lock.writer_lock:
                old = registry._registry.get(name)
                registry._counters[public.lora_id] = ConcurrentCounter()
                registry._registry[name] = public
            tm.lora_ref_cache[name] = public
            self._versions[name], self._paths[name] = version, path
            logger.info("adapter %s now serves version %d (%s)", name, version, path)
        if old is not None:
            self._spawn(self._retire(name, old))

    async def unpublish(self, name: str) -> None:
        """Stop serving adapter ``name``: new requests naming it are refused at once, and its files are
        unloaded once the last request that acquired it has finished (the Tinker API's evicted snapshots)."""
        tm = self.tokenizer_manager
        registry = tm.lora_registry
        async with tm.lora_update_lock:
            async with registry._registry_lock.writer_lock:
                old = registry._registry.pop(name, None)
            tm.lora_ref_cache.pop(name, None)
            self._versions.pop(name, None)
            self._paths.pop(name, None)
        if old is not None:
            self._spawn(self._retire(name, old))

    def live(self) -> dict[str, tuple[int, str]]:
        """Every adapter this process has published, with the version that serves and its directory."""
        return {name: (version, self._paths[name]) for name, version in self._versions.items()}

    async def _retire(self, name: str, old: LoRARef) -> None:
        """Unload a replaced version once the last request that acquired it has finished."""
        tm = self.tokenizer_manager
        registry = tm.lora_registry
        counter = registry._counters.get(old.lora_id)
        if counter is not None:
            await counter.wait_for_zero()
            registry._counters.pop(old.lora_id, None)
        async with tm.lora_update_lock:
            unload = UnloadLoRAAdapterReqInput(lora_name=old.lora_name, lora_id=old.lora_id)
            error = _merged_error(await tm.update_lora_adapter_communicator(unload))
        if error:
            logger.warning("old version of adapter %s was not unloaded: %s", name, error)

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _merged_error(results) -> str | None:
    errors = [r.error_message or "failed" for r in results if not r.success]
    return "; ".join(errors) if errors else None
