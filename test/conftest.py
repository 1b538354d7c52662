"""Shared fixtures (the built-in tiny checkpoint, a data directory) and the two test tiers.

Tests under ``server/`` start a real server and are marked ``server``; the rest is the engine-free tier,
``python -m pytest -m "not server"``, in which starting a server fails the test (``helpers.tiers``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import background
from helpers.tiers import (  # noqa: F401 - the tiers' hooks, registered by being named here
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_runtest_setup,
    pytest_unconfigure,
)
from sglang_harli.models.builtin import materialize


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return materialize("tiny")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The server's --harli-data-dir: finetune jobs may read dataset files from here."""
    return tmp_path_factory.mktemp("data")


def pytest_collection_finish(session) -> None:
    """Start the background children of the modules that will run (``helpers.background``)."""
    if session.config.option.collectonly:
        return
    for module in {item.module for item in session.items if getattr(item, "module", None)}:
        if hasattr(module, "prefetch"):
            module.prefetch()


def pytest_sessionfinish(session) -> None:
    background.stop_all()
