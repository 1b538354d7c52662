"""The servers several modules share: the default one (``server``; the fuzzer goes last on it), one behind
API keys (``keyed_server``) and one where everything is small (``small_server``).

A server start costs about 25 s, and a live server about 5 GB of memory (launcher, scheduler, detokenizer):
enough idle ones evict the page cache the next start reads its libraries from. So the modules that share a
server run one after another (``pytest_collection_modifyitems``), and each shared server stops after the
last test that uses it (``pytest_runtest_teardown``) rather than at the end of the session.
"""

from __future__ import annotations

import pytest

from helpers.lending import lending_server
from helpers.servers import ADMIN_KEY, KEYED_MODEL_NAME, SERVER_ARGS, USER_KEY
from sglang_harli.server_process import ServerProcess


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_model_dir, data_dir) -> ServerProcess:
    """The default main job: built-in tiny model, LoRA enabled on all target modules, finetuning on."""
    run_dir = tmp_path_factory.mktemp("server")
    args = [
        *SERVER_ARGS,
        "--enable-metrics",
        "--harli-kv-poison",  # every lent KV page is checked on return: decode never wrote it
        "--harli-data-dir",
        str(data_dir),
        "--harli-output-dir",
        str(run_dir / "adapters"),
    ]
    with ServerProcess(args, run_dir / "server.log") as srv:
        _LIVE["server"] = srv
        yield srv


@pytest.fixture(scope="session")
def keyed_state_dir(tmp_path_factory):
    """The keyed server's --harli-state-dir (its Tinker saves land there)."""
    return tmp_path_factory.mktemp("keyed-state")


@pytest.fixture(scope="session")
def keyed_server(tmp_path_factory, keyed_state_dir, tiny_model_dir) -> ServerProcess:
    """A server behind SGLang's --api-key and --admin-api-key (``test_auth``), serving the tiny model under a
    name the Tinker cookbook knows, its state under --harli-state-dir (``test_tinker_cookbook``), with KV
    lending off."""
    args = [
        *SERVER_ARGS,
        "--served-model-name", KEYED_MODEL_NAME,
        "--api-key", USER_KEY, "--admin-api-key", ADMIN_KEY,
        "--harli-state-dir", str(keyed_state_dir),
        "--harli-kv-lending", "off",  # the flag reaches the scheduler (test_auth); Tinker clients never lend
    ]  # fmt: skip
    log = tmp_path_factory.mktemp("keyed") / "server.log"
    with ServerProcess(["--model-path", str(tiny_model_dir), *args], log) as srv:
        _LIVE["keyed_server"] = srv
        yield srv


@pytest.fixture(scope="session")
def small_server(tmp_path_factory) -> ServerProcess:
    """Everything small: an 8,192-token KV pool and a 1 MiB trainer budget (``test_lending``), and request,
    dataset and queue limits (``test_limits``); its ``data_dir`` is its --harli-data-dir."""
    run = tmp_path_factory.mktemp("small")
    (run / "data").mkdir()
    limits = [
        "--harli-data-dir", str(run / "data"), "--harli-max-request-mb", "0.05",
        "--harli-max-dataset-mb", "0.01", "--harli-max-jobs", "2",
    ]  # fmt: skip
    with lending_server(run, *limits) as srv:
        srv.data_dir = run / "data"
        _LIVE["small_server"] = srv
        yield srv


SHARED = ("keyed_server", "small_server", "server")
_LIVE: dict[str, ServerProcess] = {}  # shared servers started, by fixture name
_LAST_USE: dict[str, str] = {}  # shared server -> node id of the last test that uses it


def _group(module: list[pytest.Item]) -> int:
    """Where a server module runs: by the shared servers it uses, so each server's users are adjacent (the
    keyed server's, the small one's, then the default one's, with the fuzzer last on it), then the modules
    that start servers of their own."""
    uses = set().union(*(set(item.fixturenames) & set(SHARED) for item in module))
    if "keyed_server" in uses:
        return 0
    if "small_server" in uses:
        return 1 if "server" not in uses else 2
    if "server" in uses:
        return 4 if module[0].path.name == "test_fuzz_api.py" else 3
    return 5


def pytest_collection_modifyitems(items) -> None:
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(str(item.path), []).append(item)

    def rank(item: pytest.Item) -> tuple[int, int]:
        if item.path.parent.name != "server":
            return (-1, 0)  # the engine-free tier keeps its order, first
        return (_group(modules[str(item.path)]), 0)

    items.sort(key=rank)  # stable: within a group, modules and tests keep pytest's order
    for item in items:
        for name in set(item.fixturenames) & set(SHARED):
            _LAST_USE[name] = item.nodeid


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem) -> None:
    """A shared server stops once the last test that uses it is done, after that test's own fixtures are
    torn down (its fixture's own stop, at the end of the session, then finds it stopped)."""
    for name, nodeid in _LAST_USE.items():
        if nodeid == item.nodeid and name in _LIVE:
            _LIVE.pop(name).stop()
