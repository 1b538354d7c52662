"""The fleet's control plane, in the HTTP server process (``core.fleet`` says what a fleet is).

``Fleet`` checks every peer of ``--harli-peers`` every ``CHECK_PERIOD_S`` (``GET /health``, never
waited for by anything else), hands every version a job publishes here to every live peer
(``published``, called by the ``Publisher`` once the version serves here), serves the versions peers
hand it (``receive``), and at start-up pulls from its peers the newest version of each adapter they serve
and it does not (``catch_up``, run before the server reports healthy). The peer routes are
``/harli/fleet/adapters`` in ``srt.jobs.routes``; every call between instances carries the admin key.

A push never blocks decode or a job: it runs as a background task of this process, one peer after the
other, and a peer that fails it is reported (``FleetStats``). Whenever a peer is seen coming up (at the
first check that reaches it, or again after it was down), this instance hands it the newest version of
every adapter served here that it lacks (``_sync``): so a version published while a peer was starting,
down, or not yet checked reaches it as soon as it answers. A version already served in a newer form is
refused (``srt.jobs.publisher``: never backwards).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import aiohttp
import msgspec

from sglang_harli.core.fleet.bundles import (
    AdapterBundle,
    ServedAdapter,
    decode_bundle,
    read_bundle,
    write_bundle,
)
from sglang_harli.core.fleet.peers import CHECK_PERIOD_S, PEER_TIMEOUT_S, FleetStats, PeerState
from sglang_harli.srt.jobs.publisher import Publisher

logger = logging.getLogger(__name__)

BUNDLE_TYPE = "application/msgpack"
TRANSFER_TIMEOUT_S = 120.0
"""An adapter of a large model at a high rank is hundreds of MB; a push or pull may take this long."""


class _Peer:
    def __init__(self, url: str):
        self.url = url
        self.alive = False
        self.seen_at: float | None = None
        self.error: str | None = None
        self.pushed = 0

    def state(self) -> PeerState:
        since = None if self.seen_at is None else time.monotonic() - self.seen_at
        return PeerState(
            url=self.url, alive=self.alive, last_seen_s=since, error=self.error, adapters_pushed=self.pushed
        )


class Fleet:
    def __init__(self, publisher: Publisher, url: str, peers: list[str], admin_key: str, root: str | Path):
        self.publisher = publisher
        self.url = url
        """This instance's base URL, as its peers know it."""
        self.peers = [_Peer(url) for url in peers]
        self.root = Path(root)
        """Where versions received from peers are written (``<root>/<job>/v<NNNN>``)."""
        self.headers = {"Authorization": f"Bearer {admin_key}"}
        """What every call to a peer carries: the fleet's admin key."""
        self._tasks: set[asyncio.Task] = set()
        self._pushes = asyncio.Lock()  # versions reach a peer in the order they were published here
        self.received = 0
        self.push_failures = 0

    # -- peers -----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Check the peers from now on, in the background."""
        self._spawn(self._check_forever())

    async def _check_forever(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(CHECK_PERIOD_S)

    async def check(self) -> None:
        """One round of health checks, all peers at once."""
        await asyncio.gather(*(self._check(peer) for peer in self.peers))

    async def _check(self, peer: _Peer) -> None:
        try:
            timeout = aiohttp.ClientTimeout(total=PEER_TIMEOUT_S)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.get(f"{peer.url}/health") as resp:
                    alive = resp.status == 200
                    error = None if alive else f"GET /health answered {resp.status}"
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            alive, error = False, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        came_up = alive and not peer.alive
        if alive:
            peer.seen_at = time.monotonic()
            if came_up:
                logger.info("fleet peer %s is up", peer.url)
        elif peer.alive:
            logger.warning("fleet peer %s is down: %s", peer.url, error)
        peer.alive, peer.error = alive, error
        if came_up and self.publisher.live():
            self._spawn(self._sync(peer))

    def live(self) -> list[str]:
        """The peers that answered their last check."""
        return [peer.url for peer in self.peers if peer.alive]

    def stats(self) -> FleetStats:
        return FleetStats(
            peers=[peer.state() for peer in self.peers],
            adapters_received=self.received,
            push_failures=self.push_failures,
        )

    # -- handing versions out --------------------------------------------------------------------------
    def published(self, name: str, version: int, path: str) -> None:
        """A version of ``name`` serves here now: hand it to every live peer, in the background."""
        self._spawn(self._push(name, version, path))

    async def _push(self, name: str, version: int, path: str) -> None:
        async with self._pushes:
            body = await _bundle_body(name, version, path)
            for peer in (p for p in self.peers if p.alive):
                await self._push_to(peer, name, version, body)

    async def _sync(self, peer: _Peer) -> None:
        """``peer`` came up: hand it the newest version of each adapter served here that it lacks."""
        async with self._pushes:
            try:
                timeout = aiohttp.ClientTimeout(total=PEER_TIMEOUT_S * 5)
                async with aiohttp.ClientSession(timeout=timeout, headers=self.headers) as session:
                    served = await _served_by(session, peer)
            except Exception as exc:  # it will be synced again when it next comes up
                peer.error = f"sync: {type(exc).__name__}: {exc}"
                return
            theirs = {adapter.name: adapter.version for adapter in served}
            for name, (version, path) in self.publisher.live().items():
                if theirs.get(name, 0) < version:
                    await self._push_to(peer, name, version, await _bundle_body(name, version, path))

    async def _push_to(self, peer: _Peer, name: str, version: int, body: bytes) -> None:
        try:
            status, text = await self._post(peer.url, "/harli/fleet/adapters", body)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            status, text = None, f"{type(exc).__name__}: {exc}"
        if status == 200:
            peer.pushed += 1
            return
        self.push_failures += 1
        peer.error = f"push of {name} v{version}: {status or ''} {text[:300]}".strip()
        logger.warning("fleet: %s", peer.error)

    async def _post(self, url: str, route: str, body: bytes) -> tuple[int, str]:
        timeout = aiohttp.ClientTimeout(total=TRANSFER_TIMEOUT_S)
        headers = {**self.headers, "Content-Type": BUNDLE_TYPE}
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.post(f"{url}{route}", data=body, headers=headers) as resp:
                return resp.status, await resp.text()

    # -- taking versions in ----------------------------------------------------------------------------
    async def receive(self, body: bytes) -> ServedAdapter:
        """A peer's bundle: check it (``SpecError`` naming the field), write it, serve it here."""
        bundle = decode_bundle(body)
        return await self._serve(bundle)

    async def _serve(self, bundle: AdapterBundle) -> ServedAdapter:
        live = self.publisher.live().get(bundle.name)
        if live is not None and live[0] >= bundle.version:  # already serving it, or newer
            return ServedAdapter(name=bundle.name, version=live[0])
        path = await asyncio.to_thread(write_bundle, self.root, bundle)
        await self.publisher.publish(bundle.name, bundle.version, str(path))
        self.received += 1
        logger.info("fleet: serving %s version %d from a peer", bundle.name, bundle.version)
        return ServedAdapter(name=bundle.name, version=bundle.version)

    def served(self) -> list[ServedAdapter]:
        return [ServedAdapter(name=n, version=v) for n, (v, _) in sorted(self.publisher.live().items())]

    def bundle(self, name: str) -> AdapterBundle | None:
        """The newest version of ``name`` served here, as a bundle (read from disk)."""
        live = self.publisher.live().get(name)
        return None if live is None else read_bundle(name, live[0], live[1])

    async def catch_up(self) -> None:
        """Start-up: serve the newest version of every adapter a live peer serves and this instance does
        not (or serves older), before the server reports healthy."""
        await self.check()
        timeout = aiohttp.ClientTimeout(total=TRANSFER_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout, headers=self.headers) as session:
            for peer in (p for p in self.peers if p.alive):
                try:
                    for adapter in await _served_by(session, peer):
                        live = self.publisher.live().get(adapter.name)
                        if live is not None and live[0] >= adapter.version:
                            continue
                        async with session.get(f"{peer.url}/harli/fleet/adapters/{adapter.name}") as resp:
                            resp.raise_for_status()
                            bundle = decode_bundle(await resp.read())
                        await self._serve(bundle)
                except Exception as exc:  # one peer's failure must not keep this instance from serving
                    peer.error = f"catch-up: {type(exc).__name__}: {exc}"
                    logger.warning("fleet: %s from %s", peer.error, peer.url)

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _served_by(session: aiohttp.ClientSession, peer: _Peer) -> list[ServedAdapter]:
    """The adapters ``peer`` serves, with their newest versions (``GET /harli/fleet/adapters``)."""
    async with session.get(f"{peer.url}/harli/fleet/adapters") as resp:
        resp.raise_for_status()
        return msgspec.json.decode(await resp.read(), type=list[ServedAdapter])


async def _bundle_body(name: str, version: int, path: str) -> bytes:
    """A version's bundle as it goes over the wire, read off the event loop."""
    return msgspec.msgpack.encode(await asyncio.to_thread(read_bundle, name, version, path))
