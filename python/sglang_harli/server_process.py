"""A ``sglang_harli.launch_server`` child process: started, awaited, queried and stopped as a unit.

The quickstart, the test-suite and the benchmarks all need "start a real server, wait until it answers,
talk to it, stop it and everything it spawned"; this is that, once.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import requests

PORT_TAKEN = "error while attempting to bind on address"
"""What uvicorn logs when another process holds the port (the launcher then waits, never ready)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """A server at ``url``, already running (what the quickstart's ``--url`` talks to)."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def post(self, path: str, body: dict, timeout: float = 120, **kwargs) -> requests.Response:
        return requests.post(self.url + path, json=body, timeout=timeout, **kwargs)

    def get(self, path: str, timeout: float = 60, **kwargs) -> requests.Response:
        return requests.get(self.url + path, timeout=timeout, **kwargs)


class ServerProcess(RunningServer):
    """A server started by ``module``: ``sglang_harli.launch_server``, or plain ``sglang.launch_server``
    to compare with."""

    def __init__(
        self,
        args: list[str],
        log_path: Path | str,
        port: int | None = None,
        module: str = "sglang_harli.launch_server",
        env: dict[str, str] | None = None,
    ):
        """``env``: variables set for the server over this process's environment (``OMP_NUM_THREADS``).
        Without ``port`` a free one is picked; if another process takes it before the server binds it (a
        race no pick can close: SGLang's own processes pick free ports too), ``wait_ready`` starts the
        server again on another."""
        self._pick_port = port is None
        self.log_path = Path(log_path)
        self._command = [sys.executable, "-m", module, *args]
        self._env = None if env is None else {**os.environ, **env}
        self._spawn(port or free_port(), "w")

    def _spawn(self, port: int, mode: str) -> None:
        self.port = port
        super().__init__(f"http://127.0.0.1:{port}")
        self._log = open(self.log_path, mode)
        command = self._command[:3] + ["--port", str(port)] + self._command[3:]
        self.proc = subprocess.Popen(
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self._env,
            start_new_session=True,  # its own process group, so stop() reaches every child
        )

    def wait_ready(self, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                if self._pick_port and PORT_TAKEN in self.log_tail(5):
                    self.stop()
                    self._spawn(free_port(), "a")  # the log keeps the attempt that lost its port
            time.sleep(0.25)
        raise TimeoutError(f"server not ready within {timeout_s}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout_s: float = 30) -> None:
        """Stop the server at once: SIGINT, as Ctrl-C would (SGLang's SIGTERM drains requests first and
        notices the signal only within 5 s; a signal to every process of the group reads to it as a crashed
        child, with a 5 s diagnostic pause), and the launcher takes its processes down with it. Whatever of
        its process group still runs after ``timeout_s`` (a scheduler busy in a long unit can outlive the
        launcher) gets SIGKILL."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)
        deadline = time.monotonic() + timeout_s
        while self._group_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self._group_alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._log.close()

    def _group_alive(self) -> bool:
        """Whether any process of the server's process group is still running (zombies, dead but not yet
        reaped, do not count)."""
        if self.proc.poll() is None:
            return True
        for process in psutil.process_iter(["status"]):
            try:
                if (
                    os.getpgid(process.pid) == self.proc.pid
                    and process.info["status"] != psutil.STATUS_ZOMBIE
                ):
                    return True
            except (ProcessLookupError, psutil.Error):
                continue
        return False

    def kill(self) -> None:
        """A crash: SIGKILL to the server and everything it spawned, nothing flushed, nothing cleaned."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> ServerProcess:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
