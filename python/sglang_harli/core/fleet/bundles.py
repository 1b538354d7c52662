"""The adapter bundles fleet instances exchange: a published version's files, their digest, the allowed file
names, written whole under the receiver's own root; and msgpack bodies decoded with a field-naming refusal.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Annotated, TypeVar

import msgspec

from sglang_harli.core.errors import SpecError, SpecInvalid
from sglang_harli.core.jobs.adapters import AdapterStore
from sglang_harli.core.jobs.spec import JOB_NAME_PATTERN

ADAPTER_FILE = re.compile(r"^(adapter_config\.json|adapter_model\.(safetensors|bin)|README\.md)$")
"""The files of a PEFT adapter directory a bundle may carry (the trainer writes the first two)."""


T = TypeVar("T")


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
