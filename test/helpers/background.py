"""Child processes started at the end of collection and read when their test needs them.

A few engine-free checks are one expensive child process each (SGLang imported afresh for the launcher's
command lines, a whole ``benchmark.gpu --smoke`` run): started in the background as soon as pytest knows
they will run, they overlap the tests that come before them instead of adding to the tier's time. A test
module that has one defines ``prefetch()``, which ``test/conftest.py`` calls once collection is done if any
of the module's tests were collected.
"""

from __future__ import annotations

import os
import subprocess
import threading

_STARTED: dict[str, Background] = {}


class Background:
    """A child process running since it was made; ``result()`` waits for it (its output read meanwhile, so
    a full pipe never stalls it). ``yielding``: it runs at the lowest CPU priority, so the tests in the
    foreground (and a child that measures time, like the GPU benchmark's smoke run) keep their cores and it
    takes what is left; only for children whose results do not depend on timing."""

    def __init__(self, command: list[str], *, yielding: bool = False, **popen):
        if yielding:
            popen["preexec_fn"] = lambda: os.nice(19)
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
        )
        self._output: tuple[str, str] | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        self._output = self.proc.communicate()

    def result(self, timeout: float) -> subprocess.CompletedProcess:
        self._reader.join(timeout)
        if self._reader.is_alive():
            self.proc.kill()
            self._reader.join()
            raise TimeoutError(f"{self.proc.args} did not finish within {timeout} s")
        stdout, stderr = self._output
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, stdout, stderr)


class InThread:
    """A call that mostly waits on processes of its own (``torch.multiprocessing`` ranks), run in a thread
    since it was made; ``result()`` waits for it and returns what it returned (or raises what it raised)."""

    def __init__(self, call):
        self._value, self._error = None, None
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self._thread.start()

    def _run(self, call) -> None:
        try:
            self._value = call()
        except BaseException as exc:  # re-raised in the test that reads it
            self._error = exc

    def result(self, timeout: float):
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"still running after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._value


def start(key: str, make) -> Background | InThread:
    """The background child ``key``, made by ``make()`` the first time it is asked for."""
    if key not in _STARTED:
        _STARTED[key] = make()
    return _STARTED[key]


def stop_all() -> None:
    """End of the session: whatever was started and never read is killed."""
    for child in _STARTED.values():
        if isinstance(child, Background) and child.proc.poll() is None:
            child.proc.kill()
    _STARTED.clear()
