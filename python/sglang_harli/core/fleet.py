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
and writes the version under its own directory, whole or not at all (``core.adapter_store``): where it
lands is the receiver's choice, never the sender's. Peer calls carry the fleet's admin key
(``--admin-api-key``, the same on every instance); the peer routes refuse a call without it.
"""

from __future__ import annotations

import hashlib
import re
import socket
from pathlib import Path
from typing import Annotated, TypeVar
from urllib.parse import urlsplit

import msgspec

from sglang_harli.core.adapter_store import AdapterStore
from sglang_harli.core.errors import SpecError, SpecInvalid
from sglang_harli.core.jobs import JOB_NAME_PATTERN

ADAPTER_FILE = re.compile(r"^(adapter_config\.json|adapter_model\.(safetensors|bin)|README\.md)$")
"""The files of a PEFT adapter directory a bundle may carry (the trainer writes the first two)."""
T = TypeVar("T")
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


class FleetCapacity(msgspec.Struct, kw_only=True):
    """What an instance has to give a new job right now (``GET /harli/fleet/capacity``), from its
    co-location figures over the recent rate window."""

    finetunes: bool
    """It can finetune at all (LoRA enabled, a supported device and model)."""
    active_jobs: int
    """Jobs queued, running or publishing there: a new one shares the spare time with them."""
    free_share: float
    """Share of recent time decode left free (idle, or already given to finetune work)."""
    finetune_tokens_per_s: float
    lendable_tokens: int
    """KV-cache tokens free to lend as activation memory (0 without lending)."""
    store_port: int | None = None
    """The instance's rendezvous store for jobs trained on several instances (``core.local_sgd``)."""

    @property
    def score(self) -> tuple[float, int]:
        """What placement ranks by: the free share a new job would get, then memory to lend."""
        return (self.free_share / (self.active_jobs + 1), self.lendable_tokens)


def place(capacities: dict[str, FleetCapacity], count: int) -> list[str]:
    """The ``count`` instances (base URLs) with the most to give a new job, best first; ties keep the
    order given (this instance first). Fewer when fewer can finetune."""
    able = [url for url, capacity in capacities.items() if capacity.finetunes]
    return sorted(able, key=lambda url: capacities[url].score, reverse=True)[:count]


class AdapterBundle(msgspec.Struct, kw_only=True):
    """One published adapter version, as instances exchange it (msgpack over HTTP)."""

    name: Annotated[str, msgspec.Meta(pattern=JOB_NAME_PATTERN)]
    """The job's name: the adapter serves under it."""
    version: Annotated[int, msgspec.Meta(ge=1)]
    files: dict[str, bytes]
    """File name (no directories) to content, as PEFT wrote them."""
    digest: str
    """``bundle_digest(files)``: what the receiver checks before serving anything."""


class ServedAdapter(msgspec.Struct, kw_only=True):
    """An adapter an instance serves, and its newest version there."""

    name: str
    version: int


def bundle_digest(files: dict[str, bytes]) -> str:
    """sha256 over the files in name order, each as name, length and content."""
    digest = hashlib.sha256()
    for name in sorted(files):
        content = files[name]
        digest.update(name.encode() + b"\0" + str(len(content)).encode() + b"\0")
        digest.update(content)
    return digest.hexdigest()


def read_bundle(name: str, version: int, directory: str | Path) -> AdapterBundle:
    """The bundle of the adapter version written in ``directory``."""
    files = {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if ADAPTER_FILE.match(p.name)}
    if "adapter_config.json" not in files:
        raise FileNotFoundError(f"{directory} holds no adapter_config.json")
    return AdapterBundle(name=name, version=version, files=files, digest=bundle_digest(files))


def decode_msgpack(body: bytes, kind: type[T], what: str, *, field: str = "body") -> T:
    """A peer's msgpack message as ``kind``: ``SpecInvalid`` naming the field that does not match, or
    ``SpecError`` on ``field`` if it is not msgpack at all."""
    try:
        return msgspec.msgpack.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise SpecInvalid.from_validation(exc) from None
    except msgspec.DecodeError as exc:
        raise SpecError(field, f"not msgpack of {what}: {exc}") from None


def decode_bundle(body: bytes) -> AdapterBundle:
    """A peer's bundle, checked: schema (``SpecInvalid`` naming the field), file names, digest."""
    bundle = decode_msgpack(body, AdapterBundle, "an adapter bundle", field="bundle")
    for file_name in bundle.files:
        if not ADAPTER_FILE.match(file_name):
            raise SpecError("files", f"{file_name!r} is not a file of an adapter directory")
    if "adapter_config.json" not in bundle.files:
        raise SpecError("files", "adapter_config.json is missing")
    if bundle_digest(bundle.files) != bundle.digest:
        raise SpecError("digest", "the files do not match the bundle's digest")
    return bundle


def write_bundle(root: str | Path, bundle: AdapterBundle) -> Path:
    """Write a checked bundle as ``<root>/<name>/v<NNNN>/``, whole or not at all; returns that path."""

    def save(directory: str) -> None:
        for file_name, content in bundle.files.items():
            (Path(directory) / file_name).write_bytes(content)

    return AdapterStore(root).write(bundle.name, bundle.version, save)
