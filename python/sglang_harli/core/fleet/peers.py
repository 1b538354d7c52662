"""A fleet of Harli instances of one model: who the peers are, what each knows of the others, and the
adapter bundles they hand each other.

Request traffic goes through SGLang's own router (``sglang-router``); Harli adds only a control plane
between its instances, over their ordinary HTTP APIs. ``--harli-peers`` lists the other instances (the
same list, give or take the instance itself, on every one). Each instance health-checks its peers and
skips a dead one, never waiting on it; every version a job publishes travels to every live peer as one
``AdapterBundle`` and is served there hot under the job's name, so ``lora_path: <job>`` answers
whichever instance the router picks. An instance that starts (or restarts) late pulls the newest version
of every adapter its peers serve before it reports healthy.

A bundle carries the adapter's files by name with a digest over them; the receiver checks the digest,
accepts only the file names PEFT writes for an adapter (no separators, so a peer can never name a path),
and writes the version under its own directory, whole or not at all (``core.jobs.adapters``): where it
lands is the receiver's choice, never the sender's. Peer calls carry the fleet's admin key
(``--admin-api-key``, the same on every instance); the peer routes refuse a call without it.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import msgspec

CHECK_PERIOD_S = 2.0
"""How often an instance checks each peer."""
PEER_TIMEOUT_S = 2.0
"""A peer that does not answer a check within this long is counted dead until it answers again."""


def parse_peers(value: str, *, own_port: int | None = None) -> list[str]:
    """``--harli-peers``: comma-separated base URLs (``http://host:port``), normalised; ``ValueError``
    naming the bad entry."""
    peers: list[str] = []
    for entry in (part.strip() for part in value.split(",")):
        if not entry:
            continue
        parts = urlsplit(entry)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError(f"{entry!r} is not a base URL like http://host:30000")
        url = f"{parts.scheme}://{parts.netloc}"
        if url not in peers:
            peers.append(url)
    return peers


def own_url(host: str, port: int) -> str:
    """This instance's base URL as its peers know it: ``--host``, or this machine's name when that is a
    wildcard address."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    return f"http://{host}:{port}"


def host_of(url: str) -> str:
    return urlsplit(url).hostname or ""


class PeerState(msgspec.Struct, kw_only=True):
    """What this instance knows of one peer."""

    url: str
    alive: bool
    """The last check answered (``GET /health``); a dead peer is skipped, never waited for."""
    last_seen_s: float | None
    """Seconds since the peer last answered; ``None`` if it never has."""
    error: str | None
    """Why the last check or push failed, if it did."""
    adapters_pushed: int
    """Adapter versions this instance handed the peer."""


class FleetStats(msgspec.Struct, kw_only=True):
    """``/harli/stats`` ``fleet``: present when ``--harli-peers`` is set."""

    peers: list[PeerState]
    adapters_received: int
    """Adapter versions peers handed this instance (pushed, or pulled at start-up), now served here."""
    push_failures: int
    """Versions that did not reach a live peer (it died meanwhile, or refused them)."""
