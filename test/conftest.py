"""Shared fixtures: the built-in tiny checkpoint and one real ``sglang_harli.launch_server`` per session."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from sglang_harli.models.builtin import materialize

REPO = Path(__file__).resolve().parents[1]
SERVER_START_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return materialize("tiny")


class Server:
    """A launched server process and its base URL; stopped with its whole process group."""

    def __init__(self, args: list[str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sglang_harli.launch_server", "--port", str(self.port), *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise TimeoutError(f"server not ready in {SERVER_START_TIMEOUT_S}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

    def post(self, path: str, body: dict, **kwargs) -> requests.Response:
        return requests.post(self.url + path, json=body, timeout=kwargs.pop("timeout", 120), **kwargs)

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.url + path, timeout=kwargs.pop("timeout", 60), **kwargs)


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_model_dir) -> Server:
    """The default main job: built-in tiny model, LoRA enabled, all target modules."""
    srv = Server(
        [
            "--enable-lora",
            "--max-lora-rank",
            "16",
            "--lora-target-modules",
            "all",
            "--max-loras-per-batch",
            "4",
        ],
        tmp_path_factory.mktemp("server") / "server.log",
    )
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()
