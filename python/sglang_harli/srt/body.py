"""Request bodies, read the one bounded way every Harli route family reads them (``/harli``, the fleet's
peer routes, ``/api/v1``), and answers written back.

A body is refused with 413 naming ``body`` as soon as it is known to be larger than its route family's
``BodyLimit``: by its ``Content-Length`` before any of it is read, else while it streams in (a chunked
upload is cut off at the limit). A ``Content-Encoding: zstd`` body (the Tinker SDK's ``forward_backward``)
is inflated a slice at a time and refused as soon as the output passes the same limit; a frame that
declares a larger content size, or needs a larger window, is refused from its header, before any memory
is given to it. So no request makes the server hold more than its limit of body, compressed or not.

JSON bodies decode into typed structs (``decode``): a wrong type, a missing field or a value out of range
is a 422 naming the JSON path (``core.errors.SpecInvalid``), and JSON that does not parse is a 400.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TypeVar

import msgspec
from fastapi import Request, Response

from sglang_harli.core.errors import SpecError, SpecInvalid, TooLarge

T = TypeVar("T")
ZSTD = "zstd"
MAX_RATIO = 1 << 15
"""The most a zstd block inflates to per byte on the wire (an RLE block: 4 bytes for 128 KiB)."""
MIN_STEP, MAX_STEP = 16, 1 << 16
"""Compressed bytes fed to the decompressor at a time (fewer as the room under the limit shrinks)."""
FRAME_HEADER_MAX = 18
MIN_WINDOW, MAX_WINDOW = 1 << 20, 1 << 27
"""Bounds on the zstd window a frame may ask for: at most the limit (rounded up to a power of two), at
least 1 MiB (so small limits still take ordinary frames), at most zstd's own default ceiling (128 MiB)."""


@dataclass(frozen=True)
class BodyLimit:
    """The most a route family takes: ``mb`` MiB, before and after inflation; ``flag`` says what sets it."""

    mb: float
    flag: str = "--harli-max-request-mb"

    @property
    def bytes(self) -> int:
        return int(self.mb * 2**20)

    def refusal(self, what: str = "larger") -> TooLarge:
        return TooLarge("body", f"{what} than {self.mb:g} MiB ({self.flag})")


async def read_body(request: Request, limit: BodyLimit) -> bytes:
    """The request body within ``limit``, inflated if it is zstd; ``TooLarge`` (413, ``body``) beyond it."""
    size_limit = limit.bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > size_limit:
        raise limit.refusal()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > size_limit:
            raise limit.refusal()
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding == ZSTD:
        return await asyncio.to_thread(inflate_zstd, body, limit)
    if encoding not in ("", "identity"):
        raise SpecError("content-encoding", f"{encoding!r} is not accepted; send zstd or no encoding")
    return body


def inflate_zstd(body: bytes, limit: BodyLimit) -> bytes:
    """A zstd body (one frame or several) inflated, but never past ``limit``: ``TooLarge`` as soon as the
    output passes it, or at once when a frame's header declares more content, or a larger window, than the
    limit allows. ``SpecError`` (400, ``body``) for data that is not zstd or is cut short.

    The compressed bytes are fed to the decompressor a slice at a time, each slice small enough that what
    it inflates to cannot overrun the room left: a zstd block inflates to at most ``MAX_RATIO`` times its
    size on the wire (an RLE block: 4 bytes, 128 KiB)."""
    import zstandard

    size_limit = limit.bytes
    window = min(max(MIN_WINDOW, 1 << max(size_limit - 1, 1).bit_length()), MAX_WINDOW)
    decompressor = zstandard.ZstdDecompressor(max_window_size=window)
    view, position, size, chunks = memoryview(body), 0, 0, []
    if not body:
        raise SpecError("body", "not zstd: empty")
    try:
        while position < len(body):  # one frame
            frame = zstandard.get_frame_parameters(bytes(view[position : position + FRAME_HEADER_MAX]))
            declared = frame.content_size
            if declared != zstandard.CONTENTSIZE_UNKNOWN and size + declared > size_limit:
                raise limit.refusal("declares a content size larger")
            if frame.window_size > window:
                raise limit.refusal("needs a zstd window larger")
            inflating = decompressor.decompressobj()
            while not inflating.eof:
                if position >= len(body):
                    raise SpecError("body", "not zstd: a frame is cut short")
                step = min(max((size_limit + 1 - size) // MAX_RATIO, MIN_STEP), MAX_STEP)
                piece = view[position : position + step]
                position += len(piece)
                out = inflating.decompress(piece)
                size += len(out)
                if size > size_limit:
                    raise limit.refusal("inflates larger")
                if out:
                    chunks.append(out)
            position -= len(inflating.unused_data)
    except zstandard.ZstdError as exc:
        if "too much memory" in str(exc):
            raise limit.refusal("needs a zstd window larger") from None
        raise SpecError("body", f"not zstd: {exc}") from None
    return b"".join(chunks)


def decode(body: bytes, type: type[T]) -> T:
    """A JSON body as ``type`` (an empty body as ``{}``): 400 naming ``body`` for JSON that does not
    parse, 422 naming the JSON path for one that does not fit the type."""
    try:
        return msgspec.json.decode(body or b"{}", type=type)
    except msgspec.ValidationError as exc:
        raise SpecInvalid.from_validation(exc) from None
    except msgspec.DecodeError as exc:
        raise SpecError("body", f"not JSON: {exc}") from None
    except RecursionError:
        raise SpecError("body", "nested too deeply") from None


def json_response(body, status: int = 200) -> Response:
    """``body`` (anything msgspec encodes) as a JSON response."""
    return Response(content=msgspec.json.encode(body), status_code=status, media_type="application/json")


def relayed(status: int, payload: bytes) -> Response:
    """A reply that is JSON already (the scheduler's, a peer's) as a response."""
    return Response(content=payload, status_code=status, media_type="application/json")
