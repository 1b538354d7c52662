"""The two test tiers, as a pytest plugin (``test/conftest.py`` loads it).

Every test under ``test/server/`` is marked ``server``: it starts a real server (or the quickstart, which
does). So is a test that needs the real pretrained model (a download on first use), where it is marked by
hand. ``python -m pytest -m "not server"`` is the engine-free tier: no server, no download, no network. A
test that starts a server without the mark fails at the start, naming itself: a server is started by running
``sglang_harli.launch_server`` (``ServerProcess`` does), ``sglang.launch_server`` or the quickstart in a
child process, and every child process of the test session is started through ``subprocess.Popen``.
"""

from __future__ import annotations

import subprocess

import pytest

SERVER_MODULES = ("sglang_harli.launch_server", "sglang.launch_server", "sglang_harli.quickstart")
_running: dict[str, pytest.Item | None] = {"item": None}
_sessions = [0]  # pytest sessions configured with this plugin (a test of the plugin runs one inside another)


def starts_server(args) -> bool:
    """Whether a child process's command line runs one of ``SERVER_MODULES`` (``python -m <module>``)."""
    if isinstance(args, (str, bytes)):
        return False
    args = [str(arg) for arg in args]
    return any(args[i] == "-m" and args[i + 1] in SERVER_MODULES for i in range(len(args) - 1))


_popen_init = subprocess.Popen.__init__


def _guarded_init(self, args, *rest, **kwargs):
    item = _running["item"]
    if item is not None and item.get_closest_marker("server") is None and starts_server(args):
        raise pytest.fail.Exception(
            f"{item.nodeid} starts a server but is not in the server tier: move it under test/server/",
            pytrace=False,
        )
    _popen_init(self, args, *rest, **kwargs)


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers",
        "server: starts a real server or needs the real pretrained model (everything in test/server/)",
    )
    _sessions[0] += 1
    subprocess.Popen.__init__ = _guarded_init


def pytest_unconfigure(config) -> None:
    _sessions[0] -= 1
    if not _sessions[0]:
        subprocess.Popen.__init__ = _popen_init


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if item.path.parent.name == "server":
            item.add_marker(pytest.mark.server)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    """Set before the test's fixtures are, so a server fixture is checked against the test that asked."""
    _running["item"] = item
