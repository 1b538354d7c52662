"""Hostile request bodies for the server tests: zstd frames that inflate to gigabytes from a few KiB, bodies
streamed from a generator (never held whole by the test), and the server's memory watched while it reads
them."""

from __future__ import annotations

import http.client
import json
import socket
import struct
import threading
import time
from collections.abc import Iterable
from urllib.parse import urlsplit

import psutil

ZSTD_MAGIC = struct.pack("<I", 0xFD2FB528)
RLE_BLOCK = 128 * 1024
"""The most one zstd block may hold: an RLE block of this many repeats is 4 bytes on the wire."""


def zstd_bomb(size: int, *, declare: bool = True, window_log: int = 20) -> bytes:
    """One zstd frame of RLE blocks that inflates to ``size`` zero bytes: 4 bytes per 128 KiB (3 GiB in
    96 KiB). ``declare``: the header states the content size (single segment, so its window is the whole
    content); otherwise it does not, and the frame asks for a ``2**window_log`` window."""
    blocks, left = [], size
    while left > 0:
        block = min(RLE_BLOCK, left)
        left -= block
        header = (1 if left == 0 else 0) | (1 << 1) | (block << 3)  # last?, type RLE, repeats
        blocks.append(struct.pack("<I", header)[:3] + b"\0")
    if declare:
        frame_header = bytes([0xE0]) + struct.pack("<Q", size)  # 8-byte content size, single segment
    else:
        frame_header = bytes([0x00, (window_log - 10) << 3])  # a window descriptor, no content size
    return ZSTD_MAGIC + frame_header + b"".join(blocks)


def json_filler(size: int, chunk: int = 1 << 16) -> Iterable[bytes]:
    """``size`` bytes of one valid JSON object (``{"x": "aaa...a"}``), ``chunk`` at a time."""
    head, tail = b'{"x": "', b'"}'
    yield head
    left = size - len(head) - len(tail)
    block = b"a" * chunk
    while left > 0:
        yield block[: min(chunk, left)]
        left -= chunk
    yield tail


def post_stream(
    url: str, path: str, chunks: Iterable[bytes], *, length: int | None = None, headers: dict | None = None
) -> tuple[int, dict]:
    """POST ``chunks`` to ``url + path`` from a thread while the answer is read here, so a server that
    answers before the body is all sent is heard (and the rest is not sent). ``length``: sent as
    ``Content-Length``; ``None``: chunked transfer encoding. The status and JSON body of the answer."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=120)
    head = [f"POST {path} HTTP/1.1", f"Host: {parts.netloc}", "Content-Type: application/json"]
    head += [f"{name}: {value}" for name, value in (headers or {}).items()]
    head.append(f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked")
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    answered = threading.Event()

    def send() -> None:
        try:
            for chunk in chunks:
                if answered.is_set():
                    return
                sock.sendall(chunk if length is not None else b"%x\r\n%s\r\n" % (len(chunk), chunk))
            if length is None:
                sock.sendall(b"0\r\n\r\n")
        except OSError:  # the server closed the connection after answering
            pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        response = http.client.HTTPResponse(sock)
        response.begin()
        answered.set()
        return response.status, json.loads(response.read())
    finally:
        answered.set()
        sock.close()
        sender.join(timeout=60)


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants."""
    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class PeakRss:
    """The most a process tree held above its resident size at ``__enter__``, sampled every 10 ms."""

    def __init__(self, pid: int):
        self.pid, self.growth = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.growth = max(self.growth, tree_rss(self.pid) - self.base)
            time.sleep(0.01)

    def __enter__(self) -> PeakRss:
        self.base = tree_rss(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.growth = max(self.growth, tree_rss(self.pid) - self.base)
